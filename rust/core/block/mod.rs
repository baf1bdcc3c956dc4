//! Block layer.
