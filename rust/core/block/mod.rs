//! The block layer: backends (where bytes live) and the node that guards them.

pub mod backend;
pub mod fault;

pub use backend::Backend;
pub use fault::{FaultInjector, FaultRules, OpKind};
