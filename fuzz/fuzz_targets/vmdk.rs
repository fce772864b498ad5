//! Fuzz the vmdk reader: arbitrary bytes opened as vmdk.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise(data, Some(vconvert_core::Format::Vmdk));
});
