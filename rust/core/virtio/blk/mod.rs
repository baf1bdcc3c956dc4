//! virtio-blk: the request format ([`request`]), the config space ([`config`]) and the
//! device ([`device`]).

pub mod config;
pub mod device;
pub mod request;

pub use device::{VirtioBlk, VirtioBlkConfig, VirtioStats};
