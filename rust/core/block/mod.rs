//! The block layer: backends (where bytes live) and the node that guards them.

pub mod backend;

pub use backend::Backend;
