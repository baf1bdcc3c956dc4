//! cargo-fuzz target: guest programs against a virtio-blk device — descriptor tables, avail
//! ring, guest memory and register writes (the interpreter is
//! `blockemu_core::virtio::replay`, shared with the corpus regression test).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::virtio::replay::replay(data);
});
