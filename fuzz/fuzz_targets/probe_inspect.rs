//! The probe and the safety inspector on arbitrary bytes.
#![no_main]

use vconvert_core::{Format, ImageFile};
use vconvert_engine::{inspect_file_as, DeclaredFormat, Policy};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = ImageFile::from_bytes("fuzz.img", data.to_vec());
    let _ = vconvert_engine::probe(&file);
    for declared in [
        None,
        Some(DeclaredFormat::Image(Format::Raw)),
        Some(DeclaredFormat::Image(Format::Qcow2)),
        Some(DeclaredFormat::Image(Format::Vmdk)),
        Some(DeclaredFormat::Iso),
    ] {
        let _ = inspect_file_as(file.clone(), declared, &Policy::untrusted());
    }
});
