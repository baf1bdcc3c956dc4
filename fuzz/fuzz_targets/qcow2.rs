//! Random bytes opened as a qcow2 image in memory, then a few reads and writes: never a panic,
//! never unbounded memory. The interpreter is `blockemu_core::block::qcow2::fuzz::run`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::block::qcow2::fuzz::run(data);
});
