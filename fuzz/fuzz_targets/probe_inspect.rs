//! The probe and the safety inspector on arbitrary bytes.
#![no_main]

use vconvert_core::{Format, ImageFile};
use vconvert_engine::{inspect_file, Policy};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = ImageFile::from_bytes("fuzz.img", data.to_vec());
    let _ = vconvert_engine::probe(&file);
    for declared in [None, Some(Format::Raw), Some(Format::Qcow2)] {
        let _ = inspect_file(file.clone(), declared, &Policy::untrusted());
    }
});
