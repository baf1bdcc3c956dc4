//! cargo-fuzz target: everything an NBD client could say to our server — client flags,
//! options (GO, INFO, EXPORT_NAME, LIST, ABORT, unknown), then requests with payloads
//! (`blockemu_core::block::nbd::server::fuzz_session`, over an in-memory stream against
//! memory-disk exports). Must never panic, hang or allocate unboundedly.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::block::nbd::server::fuzz_session(data);
});
