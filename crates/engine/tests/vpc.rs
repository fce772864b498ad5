//! VHD specifics on hand-made images: which size each creator application gets (against
//! qemu-img), checksum mismatches, sector bitmaps, differencing disks and bad BATs.

use std::path::Path;

use vconvert_core::{ExtentKind, Format, ImageFile, Options};
use vconvert_engine::{convert, inspect, open, ConvertOptions, OpenOptions, Policy};
use vconvert_testkit::{qemu, read_all, tempdir, ModelImage, ModelKind};
use vconvert_vpc::checksum;

/// Writes a dynamic VHD of `model` with our writer.
fn make_dynamic(path: &Path, model: &ModelImage, options: &str) {
    let opts = ConvertOptions {
        identity_seed: Some(3),
        ..ConvertOptions::default()
    };
    convert(
        model,
        path,
        Format::Vpc,
        Options::parse(options).unwrap(),
        &opts,
    )
    .unwrap();
}

/// Applies `edit` to the footer(s) of `b` (both copies) and fixes their checksums.
fn edit_footers(b: &mut [u8], edit: impl Fn(&mut [u8])) {
    let len = b.len();
    let mut bases = vec![len - 512];
    if &b[..8] == b"conectix" {
        bases.push(0);
    }
    for base in bases {
        let f = &mut b[base..base + 512];
        edit(f);
        let sum = checksum(f, 64);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
    }
}

fn edit_dynamic_header(b: &mut [u8], edit: impl Fn(&mut [u8])) {
    let h = &mut b[512..1536];
    edit(h);
    let sum = checksum(h, 36);
    h[36..40].copy_from_slice(&sum.to_be_bytes());
}

fn data_model(size: u64) -> ModelImage {
    ModelImage::from_parts(&[
        (size / 4, ModelKind::Data, 1),
        (size / 4, ModelKind::Unallocated, 0),
        (size - size / 2, ModelKind::Data, 2),
    ])
}

#[test]
fn every_creator_application_gets_the_size_qemu_gives_it() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let base = dir.path().join("base.vhd");
    make_dynamic(&base, &data_model(10 << 20), "");
    let apps: [&[u8; 4]; 10] = [
        b"vpc ", b"vs  ", b"win ", b"d2v ", b"qemu", b"qem2", b"tap\0", b"CTXS", b"wa\0\0", b"vbox",
    ];
    for app in apps {
        for max_geometry in [false, true] {
            let mut b = std::fs::read(&base).unwrap();
            edit_footers(&mut b, |f| {
                f[28..32].copy_from_slice(app);
                // current_size 10 MiB - 1 KiB; the geometry says 10,514,432 bytes.
                f[48..56].copy_from_slice(&((10u64 << 20) - 1024).to_be_bytes());
                if max_geometry {
                    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
                }
            });
            let p = dir.path().join("app.vhd");
            std::fs::write(&p, &b).unwrap();
            let ours = open(&p, None, &OpenOptions::default())
                .unwrap()
                .virtual_size();
            let theirs = q.info_json(Some("vpc"), &p)["virtual-size"]
                .as_u64()
                .unwrap();
            assert_eq!(
                ours,
                theirs,
                "creator {:?}, max geometry {max_geometry}",
                app.escape_ascii().to_string()
            );
        }
    }
}

#[test]
fn checksum_mismatch_is_a_finding_and_refused_when_untrusted() {
    let dir = tempdir();
    let p = dir.path().join("sum.vhd");
    make_dynamic(&p, &data_model(4 << 20), "");
    let mut b = std::fs::read(&p).unwrap();
    b[64] ^= 0x55; // footer copy checksum
    b[512 + 36] ^= 0x55; // dynamic header checksum
    std::fs::write(&p, &b).unwrap();
    let img = open(&p, None, &OpenOptions::default()).unwrap();
    let findings = img.safety_findings();
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(findings[0].contains("footer checksum"), "{findings:?}");
    let report = inspect(&p, Some(Format::Vpc), &Policy::untrusted()).unwrap();
    assert!(
        report.violations.iter().any(|v| v.contains("checksum")),
        "{report:?}"
    );
    assert!(report.ensure_safe("sum.vhd").is_err());
}

#[test]
fn sector_bitmap_makes_the_map_exact_to_the_sector() {
    let dir = tempdir();
    let p = dir.path().join("bm.vhd");
    make_dynamic(&p, &data_model(4 << 20), "");
    let mut b = std::fs::read(&p).unwrap();
    // The first block's bitmap: clear the bits of sectors 1 and 8..16.
    let bat0 = u32::from_be_bytes(b[1536..1540].try_into().unwrap()) as usize * 512;
    b[bat0] = 0b1011_1111;
    b[bat0 + 1] = 0;
    std::fs::write(&p, &b).unwrap();
    let img = open(&p, None, &OpenOptions::default()).unwrap();
    let map = img.block_map(0..8192).unwrap();
    let kinds: Vec<_> = map
        .extents()
        .iter()
        .map(|e| (e.start, e.len, e.kind.is_data()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, 512, true),
            (512, 512, false),
            (1024, 3072, true),
            (4096, 4096, false),
        ]
    );
    let all = read_all(img.as_ref()).unwrap();
    assert!(all[512..1024].iter().all(|&x| x == 0));
    assert!(all[4096..8192].iter().all(|&x| x == 0));
    assert!(matches!(map.extents()[1].kind, ExtentKind::Unallocated));
}

#[test]
fn differencing_disk_reads_its_parent_only_when_allowed() {
    let dir = tempdir();
    let parent = dir.path().join("parent.vhd");
    let parent_model = ModelImage::from_parts(&[(4 << 20, ModelKind::Data, 9)]);
    make_dynamic(&parent, &parent_model, "");
    let child = dir.path().join("child.vhd");
    // The child holds data only in its second half.
    let child_model = ModelImage::from_parts(&[
        (2 << 20, ModelKind::Unallocated, 0),
        (2 << 20, ModelKind::Data, 4),
    ]);
    make_dynamic(&child, &child_model, "");
    let mut b = std::fs::read(&child).unwrap();
    edit_footers(&mut b, |f| f[60..64].copy_from_slice(&4u32.to_be_bytes()));
    edit_dynamic_header(&mut b, |h| {
        let name: Vec<u8> = "parent.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_be_bytes())
            .collect();
        h[64..64 + name.len()].copy_from_slice(&name);
    });
    std::fs::write(&child, &b).unwrap();

    let img = open(
        &child,
        None,
        &OpenOptions {
            allow_external_files: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let all = read_all(img.as_ref()).unwrap();
    assert!(all[..2 << 20] == parent_model.bytes[..2 << 20]);
    assert!(all[2 << 20..4 << 20] == child_model.bytes[2 << 20..]);
    assert_eq!(
        img.info().unwrap().backing_file.as_deref(),
        Some("parent.vhd")
    );

    let err = match open(&child, None, &OpenOptions::default()) {
        Ok(_) => panic!("a differencing disk opened without references allowed"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("refused") && err.contains("parent.vhd"),
        "{err}"
    );
    let report = inspect(&child, Some(Format::Vpc), &Policy::untrusted()).unwrap();
    assert!(report.ensure_safe("child.vhd").is_err(), "{report:?}");
}

#[test]
fn bad_block_allocation_tables_are_refused() {
    let dir = tempdir();
    let p = dir.path().join("bat.vhd");
    make_dynamic(&p, &data_model(6 << 20), "");
    let orig = std::fs::read(&p).unwrap();
    let open_bytes = |b: Vec<u8>| {
        vconvert_engine::open_file(
            ImageFile::from_bytes("bad.vhd", b),
            Some(Format::Vpc),
            &OpenOptions::default(),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    // Two blocks at the same place.
    let mut b = orig.clone();
    let first: [u8; 4] = b[1536..1540].try_into().unwrap();
    b[1540..1544].copy_from_slice(&first);
    let e = open_bytes(b);
    assert!(
        e.contains("block allocation table") && e.contains("overlaps block"),
        "{e}"
    );
    // A block inside the BAT.
    let mut b = orig.clone();
    b[1536..1540].copy_from_slice(&3u32.to_be_bytes());
    let e = open_bytes(b);
    assert!(e.contains("overlaps metadata"), "{e}");
    // A block past the end of the file.
    let mut b = orig.clone();
    b[1536..1540].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
    let e = open_bytes(b);
    assert!(e.contains("past the end"), "{e}");
    // Too few BAT entries for the disk.
    let mut b = orig.clone();
    edit_dynamic_header(&mut b, |h| h[28..32].copy_from_slice(&1u32.to_be_bytes()));
    let e = open_bytes(b);
    assert!(e.contains("cannot hold"), "{e}");
    // BAT offset past the end.
    let mut b = orig;
    edit_dynamic_header(&mut b, |h| {
        h[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    let e = open_bytes(b);
    assert!(
        e.contains("bad.vhd") && e.contains("block allocation table"),
        "{e}"
    );
}
