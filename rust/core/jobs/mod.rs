//! Worker pool and jobs (filled in by the jobs work).
