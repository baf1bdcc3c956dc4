//! Disk geometry (filled in by the geometry work).
