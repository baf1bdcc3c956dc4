//! cargo-fuzz target: everything an NBD server could say to our client — the handshake
//! (greeting, option replies) and the replies to a read, a write and a flush
//! (`blockemu_core::block::nbd::proto::fuzz_session`). Must never panic or allocate unboundedly.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::block::nbd::proto::fuzz_session(data);
});
