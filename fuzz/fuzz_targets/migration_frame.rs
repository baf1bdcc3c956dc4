//! cargo-fuzz target: random bytes as a stream of migration frames into the frame parser (the
//! interpreter is `blockemu_core::migration::frame::fuzz`, shared with the corpus regression
//! test). The first byte picks the mode: bit 0 set recomputes every frame's CRC first, so that
//! mutations reach the header and bound checks. A frame is accepted whole or refused with a
//! Protocol error; nothing may panic, and nothing is buffered beyond a frame's bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockemu_core::migration::frame::fuzz::replay(data);
});
