//! cargo-fuzz target: raw guest access sequences against an IDE channel (the interpreter is
//! `blockemu_core::ide::replay`, shared with the corpus regression test).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::ide::replay::replay(data);
});
