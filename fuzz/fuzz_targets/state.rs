//! cargo-fuzz target: random bytes loaded as device state into fresh devices (the interpreter
//! is `blockemu_core::state::fuzz`, shared with the corpus regression test). A load must fail
//! with a State error or leave devices that keep working; nothing may panic or hang.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::state::fuzz::replay(data);
});
