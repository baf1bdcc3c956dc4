//! Fuzz interpreter (placeholder until the fuzz target lands).
