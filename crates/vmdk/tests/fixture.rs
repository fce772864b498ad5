//! The committed fixture `testdata/disk-stream.vmdk`: a streamOptimized image in
//! VMware's layout (GD at the end, footer, end-of-stream marker) made by VmdkWriter.
//! Regenerate it with `cargo test -p vconvert-vmdk --test fixture -- --ignored`.

mod common;

use std::path::PathBuf;

use vconvert_core::{ImageFile, ImageReader, NoReferences, RunKind};
use vconvert_testkit::{qemu, read_all, Rng};
use vconvert_vmdk::VmdkReader;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/disk-stream.vmdk")
}

/// The fixture's virtual disk: 4 MiB with random bytes, text and a repeated byte at
/// unaligned offsets, zeros elsewhere.
fn fixture_bytes() -> Vec<u8> {
    let mut v = vec![0u8; 4 << 20];
    Rng::new(1).fill(&mut v[192 << 10..256 << 10]);
    let mut text = Vec::new();
    let mut i = 0;
    while text.len() < 512 << 10 {
        text.extend_from_slice(format!("vconvert VMDK fixture, line {i}\n").as_bytes());
        i += 1;
    }
    v[(1 << 20) + 512..(1 << 20) + 512 + (512 << 10)].copy_from_slice(&text[..512 << 10]);
    v[(3 << 20) + 512..(3 << 20) + 512 + 100 * 1024].fill(0xab);
    v
}

#[test]
fn fixture_reads_back() {
    let r = VmdkReader::open(ImageFile::open(&fixture_path()).unwrap(), &NoReferences).unwrap();
    assert_eq!(r.create_type(), "streamOptimized");
    assert!(read_all(&r).unwrap() == fixture_bytes());
    assert!(r.safety_findings().is_empty());
    assert!(r.check().unwrap().unwrap().corruptions.is_empty());
    assert!(std::fs::metadata(fixture_path()).unwrap().len() < 200 << 10);
    let f = std::fs::read(fixture_path()).unwrap();
    assert_eq!(&f[56..64], &[0xff; 8], "GD at end");
    if let Some(q) = qemu() {
        assert!(common::qemu_bytes(&q, "vmdk", &fixture_path()) == fixture_bytes());
    }
}

#[test]
#[ignore = "regenerates testdata/disk-stream.vmdk"]
fn regenerate_fixture() {
    let bytes = fixture_bytes();
    let kinds = |p: u64| {
        if vconvert_core::is_zero(&fixture_bytes_at(p)) {
            RunKind::Unallocated
        } else {
            RunKind::Data
        }
    };
    common::write_vmdk(
        &fixture_path(),
        "subformat=streamOptimized",
        &bytes,
        &kinds,
        4096,
        42,
    )
    .unwrap();
}

fn fixture_bytes_at(p: u64) -> Vec<u8> {
    let b = fixture_bytes();
    b[p as usize..(p as usize + 4096).min(b.len())].to_vec()
}
