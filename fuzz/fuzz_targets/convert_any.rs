//! End to end: arbitrary bytes, probed as whatever they look like, converted to raw in
//! memory.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise(data, None);
});
