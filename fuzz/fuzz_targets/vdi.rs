//! Fuzz the vdi reader: arbitrary bytes opened as vdi.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise(data, Some(vconvert_core::Format::Vdi));
});
