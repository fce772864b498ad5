//! The inspector's format-independent checks: declared vs probed format, content that
//! matches two formats, formats we refuse, size limits.

use std::path::Path;

use vconvert_core::{Format, ImageFile};
use vconvert_engine::{inspect_file, Policy};

fn with(bytes: &mut Vec<u8>, at: usize, what: &[u8]) {
    if bytes.len() < at + what.len() {
        bytes.resize(at + what.len(), 0);
    }
    bytes[at..at + what.len()].copy_from_slice(what);
}

fn report(bytes: Vec<u8>, declared: Option<Format>, policy: &Policy) -> vconvert_engine::Report {
    let file = ImageFile::from_bytes("upload.img", bytes);
    inspect_file(file, declared, policy).unwrap()
}

#[test]
fn plain_raw_disk_is_accepted_even_with_partition_table_or_iso() {
    let mut disk = vec![0u8; 1 << 20];
    with(&mut disk, 510, &[0x55, 0xaa]);
    with(&mut disk, 512, b"EFI PART");
    with(&mut disk, 0x8001, b"CD001");
    let r = report(disk, Some(Format::Raw), &Policy::untrusted());
    assert_eq!(r.format, Format::Raw);
    assert_eq!(r.signatures, vec!["gpt", "iso"]);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.virtual_size, Some(1 << 20));
}

#[test]
fn declared_raw_that_is_another_format_is_refused() {
    let mut vdi = vec![0u8; 4096];
    with(&mut vdi, 0x40, &0xbeda_107fu32.to_le_bytes());
    let r = report(vdi, Some(Format::Raw), &Policy::untrusted());
    assert_eq!(r.format, Format::Vdi);
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("declared format raw") && v.contains("vdi")),
        "{:?}",
        r.violations
    );
    assert!(r
        .ensure_safe("upload.img")
        .unwrap_err()
        .to_string()
        .contains("refused"));
}

#[test]
fn content_matching_two_formats_is_refused() {
    let mut poly = b"QFI\xfb\0\0\0\x03".to_vec();
    with(&mut poly, 0x8001, b"CD001");
    let r = report(poly, None, &Policy::untrusted());
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("both qcow2 and iso")),
        "{:?}",
        r.violations
    );
}

#[test]
fn formats_we_do_not_convert_are_refused_by_name() {
    for (magic, name) in [
        (&b"LUKS\xba\xbe\0\x01"[..], "luks"),
        (&b"QED\0"[..], "qed"),
        (&b"QFI\xfb\0\0\0\x01"[..], "qcow"),
    ] {
        let mut b = magic.to_vec();
        b.resize(8192, 0);
        let r = report(b, None, &Policy::untrusted());
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains(&format!("a {name} image"))),
            "{name}: {:?}",
            r.violations
        );
    }
}

#[test]
fn virtual_size_over_the_limit_is_refused() {
    let policy = Policy {
        max_virtual_size: 1 << 20,
        ..Policy::untrusted()
    };
    let r = report(vec![0u8; 2 << 20], None, &policy);
    assert!(
        r.violations.iter().any(|v| v.contains("exceeds the limit")),
        "{:?}",
        r.violations
    );
    let r = report(vec![0u8; 1 << 20], None, &policy);
    assert!(r.violations.is_empty());
}

#[test]
fn unreadable_file_is_an_error_not_a_report() {
    assert!(vconvert_engine::inspect(
        Path::new("/nonexistent/upload.img"),
        None,
        &Policy::untrusted()
    )
    .is_err());
}
