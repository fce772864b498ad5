//! Fuzz the qcow2 reader: arbitrary bytes opened as qcow2.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise(data, Some(vconvert_core::Format::Qcow2));
});
