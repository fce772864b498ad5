//! The inspector's format-independent checks: declared vs probed format, content that
//! matches two formats, formats we refuse, size limits.

use std::path::Path;

use vconvert_core::{Format, ImageFile};
use vconvert_engine::{inspect_file, inspect_file_as, DeclaredFormat, Policy};

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

/// One 16-byte MBR partition table entry: boot flag, start CHS, type, end CHS, start
/// LBA, sectors.
fn pte(disk: &mut Vec<u8>, n: usize, boot: u8, chs: [u8; 3], kind: u8, lba: u32) {
    let mut e = vec![boot, chs[0], chs[1], chs[2], kind, 0, 0, 0];
    e.extend(lba.to_le_bytes());
    e.extend(0u32.to_le_bytes());
    with(disk, 446 + 16 * n, &e);
}

/// A 1 MiB raw disk with a protective MBR (one 0xEE entry at CHS 0/0/2, LBA 1) and a
/// GPT header at LBA 1.
fn gpt_disk() -> Vec<u8> {
    let mut disk = vec![0u8; 1 << 20];
    with(&mut disk, 510, &[0x55, 0xaa]);
    pte(&mut disk, 0, 0, [0, 2, 0], 0xee, 1);
    with(&mut disk, 512, b"EFI PART");
    disk
}

#[test]
fn raw_disk_with_a_valid_partition_table_is_accepted() {
    let r = report(gpt_disk(), Some(Format::Raw), &Policy::untrusted());
    assert_eq!(r.format, Format::Raw);
    assert_eq!(r.signatures, vec!["mbr", "gpt"]);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.virtual_size, Some(1 << 20));
    // A classic MBR: two partitions, one active.
    let mut mbr = vec![0u8; 1 << 20];
    with(&mut mbr, 510, &[0x55, 0xaa]);
    pte(&mut mbr, 0, 0x80, [1, 1, 0], 0x83, 2048);
    pte(&mut mbr, 1, 0, [1, 1, 0], 0x82, 4096);
    let r = report(mbr, None, &Policy::untrusted());
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    // A FAT boot sector has the signature but no partition table.
    let mut fat = vec![0u8; 1 << 20];
    with(&mut fat, 510, &[0x55, 0xaa]);
    with(&mut fat, 0x10, &[2]);
    with(&mut fat, 0x15, &[0xf8]);
    let r = report(fat, Some(Format::Raw), &Policy::untrusted());
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(r.signatures.is_empty(), "{:?}", r.signatures);
}

/// oslo.utils' `test_gpt_mbr_check`, case by case: each broken table is refused under
/// the untrusted policy with the rule named, and accepted under the trusted one.
#[test]
fn partition_tables_breaking_oslo_rules_are_refused() {
    type Patch = fn(&mut Vec<u8>);
    let cases: [(&str, Patch, &str); 7] = [
        (
            "boot flag 0x0a",
            |d| pte(d, 0, 0x0a, [0, 2, 0], 0xee, 1),
            "has boot flag 0x0a",
        ),
        (
            "no partition defined",
            |d| pte(d, 0, 0, [0, 2, 0], 0, 1),
            "no partition is defined",
        ),
        (
            "protective MBR with a second partition",
            |d| pte(d, 1, 0, [0, 2, 0], 0xee, 1),
            "only entry 0 may be defined",
        ),
        (
            "protective MBR at CHS 0/0/1",
            |d| pte(d, 0, 0, [0, 1, 0], 0xee, 1),
            "not [00, 02, 00]",
        ),
        (
            "protective MBR at LBA 2",
            |d| pte(d, 0, 0, [0, 2, 0], 0xee, 2),
            "starts at lba 2, not 1",
        ),
        (
            "GPT header without a boot signature",
            |d| d[510..512].fill(0),
            "no mbr boot signature",
        ),
        (
            "extra partition next to the protective one",
            |d| pte(d, 2, 0, [1, 1, 0], 0x83, 2048),
            "only entry 0 may be defined",
        ),
    ];
    for (what, patch, rule) in cases {
        let mut disk = gpt_disk();
        patch(&mut disk);
        let r = report(disk.clone(), Some(Format::Raw), &Policy::untrusted());
        assert!(
            r.violations
                .iter()
                .any(|v| v.to_lowercase().contains(&rule.to_lowercase()) && v.contains("(rule: ")),
            "{what}: '{rule}' not in {:?}",
            r.violations
        );
        let r = report(disk, Some(Format::Raw), &Policy::trusted());
        assert!(r.violations.is_empty(), "{what}: {:?}", r.violations);
    }
    // oslo tolerates any start CHS and LBA for other partition types.
    let mut d = gpt_disk();
    pte(&mut d, 0, 0, [1, 0, 0], 0x8e, 2);
    let r = report(d, Some(Format::Raw), &Policy::untrusted());
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}

/// An ISO 9660 (or UDF) image: a primary volume descriptor at sector 16.
fn iso(id: &[u8; 5]) -> Vec<u8> {
    let mut disk = vec![0u8; 1 << 20];
    with(&mut disk, 0x8000, &[1]);
    with(&mut disk, 0x8001, id);
    disk
}

#[test]
fn iso_content_must_be_declared_iso() {
    for id in [b"CD001", b"NSR02", b"NSR03"] {
        let r = report(iso(id), Some(Format::Raw), &Policy::untrusted());
        assert!(
            r.violations.iter().any(|v| v.contains("declare it as iso")),
            "{:?}",
            r.violations
        );
        let file = ImageFile::from_bytes("upload.iso", iso(id));
        let r = inspect_file_as(file, Some(DeclaredFormat::Iso), &Policy::untrusted()).unwrap();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.virtual_size, Some(1 << 20));
        assert!(r.signatures.contains(&"iso"));
    }
    // An isohybrid ISO (with an MBR for USB sticks) is an ISO.
    let mut hybrid = iso(b"CD001");
    with(&mut hybrid, 510, &[0x55, 0xaa]);
    with(&mut hybrid, 446, &[0x80, 0, 1, 0, 0x17]);
    let file = ImageFile::from_bytes("hybrid.iso", hybrid);
    let r = inspect_file_as(file, Some(DeclaredFormat::Iso), &Policy::untrusted()).unwrap();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    // Declaring iso for what is not one, or for an ISO that is also a qcow2.
    let file = ImageFile::from_bytes("disk.iso", vec![0u8; 1 << 20]);
    let r = inspect_file_as(file, Some(DeclaredFormat::Iso), &Policy::untrusted()).unwrap();
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("declared format iso does not match")),
        "{:?}",
        r.violations
    );
    let mut poly = iso(b"CD001");
    with(&mut poly, 0, b"QFI\xfb\0\0\0\x03");
    let file = ImageFile::from_bytes("poly.iso", poly);
    let r = inspect_file_as(file, Some(DeclaredFormat::Iso), &Policy::untrusted()).unwrap();
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("both qcow2 and iso")),
        "{:?}",
        r.violations
    );
    assert_eq!(
        "iso".parse::<DeclaredFormat>().unwrap(),
        DeclaredFormat::Iso
    );
    assert_eq!(
        "vhd".parse::<DeclaredFormat>().unwrap(),
        DeclaredFormat::Image(Format::Vpc)
    );
    assert_eq!(
        "vhdx".parse::<DeclaredFormat>().unwrap(),
        DeclaredFormat::Image(Format::Vhdx)
    );
    assert!("ploop".parse::<DeclaredFormat>().is_err());
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
        (&b"WithoutFreeSpace\x02\0\0\0"[..], "parallels"),
        (&b"Bochs Virtual HD Image\0"[..], "bochs"),
        (
            &b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0"[..],
            "cloop",
        ),
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
