//! VHDX specifics: qemu-made images of every kind, hand-made ones qemu cannot make
//! (4 KiB logical sectors, Hyper-V's 32 MiB blocks, differencing disks, dirty logs),
//! the log replayed in memory with the source untouched, and hostile structures.

mod vhdx_build;

use std::path::Path;

use sha2::{Digest, Sha256};
use vconvert_core::{ExtentKind, Format, Options};
use vconvert_engine::{convert, inspect, open, ConvertOptions, OpenOptions, Policy};
use vconvert_testkit::{qemu, read_all, tempdir, Layout, ModelImage, ModelKind};
use vconvert_vhdx::log::Update;
use vconvert_vhdx::{Guid, MIB};
use vhdx_build::{data, entry, make_dirty, pattern, Block, Vhdx};

fn sha(p: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

fn trusted() -> OpenOptions {
    OpenOptions {
        allow_external_files: true,
        ..OpenOptions::default()
    }
}

fn to_raw(src: &Path, out: &Path) {
    let img = open(src, Some(Format::Vhdx), &trusted()).unwrap();
    convert(
        img.as_ref(),
        out,
        Format::Raw,
        Options::new(),
        &ConvertOptions::default(),
    )
    .unwrap();
}

#[test]
fn qemu_made_vhdx_of_every_shape_converts_to_every_format() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sources = [
        ("", 9u64 << 20),
        ("subformat=fixed", 5 << 20),
        ("log_size=2M", 9 << 20),
        ("block_size=1M", (7 << 20) + 3584),
        ("block_size=32M,block_state_zero=off", 40 << 20),
        ("subformat=fixed,block_size=2M", (3 << 20) + 512),
    ];
    let targets = [
        (Format::Raw, ""),
        (Format::Qcow2, ""),
        (Format::Vdi, ""),
        (Format::Vmdk, ""),
        (Format::Vpc, "force_size=on"),
        (Format::Vhdx, ""),
        (Format::Vhdx, "subformat=fixed"),
    ];
    for (i, (opts, size)) in sources.into_iter().enumerate() {
        let src = dir.path().join(format!("s{i}.vhdx"));
        q.build(&Layout::random(size, 6, 40 + i as u64), "vhdx", opts, &src);
        let img = open(&src, None, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Vhdx);
        vconvert_testkit::check_reader_consistency(img.as_ref()).unwrap();
        for (format, topts) in targets {
            let out = dir.path().join(format!("o{i}.{format}"));
            convert(
                img.as_ref(),
                &out,
                format,
                Options::parse(topts).unwrap(),
                &ConvertOptions::default(),
            )
            .unwrap();
            q.assert_same("vhdx", &src, format.name(), &out);
            if format == Format::Vhdx {
                let (code, text) = q.check("vhdx", &out);
                assert_eq!(code, 0, "{opts} -> vhdx {topts}: {text}");
            }
        }
    }
}

#[test]
fn sparse_vhdx_over_2_gib() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let src = dir.path().join("big.vhdx");
    q.img(&["create", "-q", "-f", "vhdx", src.to_str().unwrap(), "3G"]);
    q.io(
        "vhdx",
        &src,
        &[
            "write -P 0x5a 0 64k".into(),
            "write -P 0xa5 2147479552 8192".into(),
            "write -P 0x33 2684354560 65536".into(),
        ],
    );
    let img = open(&src, None, &OpenOptions::default()).unwrap();
    let map = img.block_map(0..3 << 30).unwrap();
    // Four 16 MiB blocks: one at 0, two around 2 GiB, one at 2.5 GiB.
    assert_eq!(map.data_bytes(), 4 * (16 << 20), "{map:?}");
    let out = dir.path().join("big.qcow2");
    convert(
        img.as_ref(),
        &out,
        Format::Qcow2,
        Options::new(),
        &ConvertOptions::default(),
    )
    .unwrap();
    q.assert_same("vhdx", &src, "qcow2", &out);
    let back = dir.path().join("back.vhdx");
    convert(
        open(&out, None, &OpenOptions::default()).unwrap().as_ref(),
        &back,
        Format::Vhdx,
        Options::new(),
        &ConvertOptions::default(),
    )
    .unwrap();
    assert_eq!(q.check("vhdx", &back).0, 0);
    q.assert_same("qcow2", &out, "vhdx", &back);
}

/// A dynamic image of `lss`-byte sectors and `bs`-byte blocks: block 0 full of a
/// pattern, block 2 ZERO, the rest not present; then a dirty log whose first entry
/// rewrites a data sector of block 0 and whose second makes block 1 present at a
/// block the file already holds (a BAT change not yet written back).
fn dirty_image(lss: u32, bs: u64) -> (Vec<u8>, Vec<u8>) {
    let size = 4 * bs + 3 * 4096;
    let mut v = Vhdx::new(size, bs, lss);
    let block0 = pattern(bs as usize, 1);
    v.blocks.push((0, Block::Full(block0.clone())));
    v.blocks.push((2, Block::State(2)));
    // Block 3's data is in the file (placed), but the on-disk BAT says NOT_PRESENT.
    let block1 = pattern(bs as usize, 9);
    v.blocks.push((3, Block::Full(block1.clone())));
    let (mut b, placed) = v.build();
    let b0 = placed.blocks.iter().find(|x| x.0 == 0).unwrap().1;
    let b3 = placed.blocks.iter().find(|x| x.0 == 3).unwrap().1;
    let g = vconvert_vhdx::bat::Geometry::new(size, bs, u64::from(lss), false);
    // On disk: block 3 is not present, block 1 not present.
    let e3 = placed.bat as usize + 8 * g.payload_index(3) as usize;
    b[e3..e3 + 8].copy_from_slice(&0u64.to_le_bytes());
    // The log: sector 5 of block 0 rewritten; block 1's entry pointing at the data.
    let guid = Guid([0x42; 16]);
    let new_sector = pattern(4096, 77);
    let e1 = placed.bat + 8 * g.payload_index(1);
    let bat_page = e1 & !4095;
    let mut page = b[bat_page as usize..bat_page as usize + 4096].to_vec();
    let entry1 = vconvert_vhdx::bat::BatEntry {
        state: 6,
        offset: b3,
    }
    .encode();
    page[(e1 - bat_page) as usize..(e1 - bat_page) as usize + 8]
        .copy_from_slice(&entry1.to_le_bytes());
    let end = placed.end;
    let first = entry(
        guid,
        100,
        0,
        end,
        &[data(b0 + 5 * 4096, new_sector.clone())],
    );
    let second = entry(
        guid,
        101,
        0,
        end,
        &[
            data(bat_page, page),
            Update::Zero {
                offset: b0 + 8 * 4096,
                len: 8192,
            },
        ],
    );
    make_dirty(&mut b, guid, &[first, second]);
    // What Hyper-V would read.
    let mut want = vec![0u8; size as usize];
    want[..bs as usize].copy_from_slice(&block0);
    want[5 * 4096..6 * 4096].copy_from_slice(&new_sector);
    want[8 * 4096..10 * 4096].fill(0);
    want[bs as usize..2 * bs as usize].copy_from_slice(&block1);
    (b, want)
}

fn dirty_log_reads_right(lss: u32, bs: u64) {
    let dir = tempdir();
    let (bytes, want) = dirty_image(lss, bs);
    let src = dir.path().join("dirty.vhdx");
    std::fs::write(&src, &bytes).unwrap();
    let before = sha(&src);
    let img = open(&src, None, &OpenOptions::default()).unwrap();
    assert_eq!(img.format(), Format::Vhdx);
    assert_eq!(read_all(img.as_ref()).unwrap(), want);
    vconvert_testkit::check_reader_consistency(img.as_ref()).unwrap();
    let info = img.info().unwrap();
    assert!(info.dirty);
    assert_eq!(
        info.format_specific.as_ref().unwrap()["data"]["log-replayed"],
        true
    );
    assert_eq!(info.format_specific.unwrap()["data"]["log-entries"], 2);
    let out = dir.path().join("out.raw");
    to_raw(&src, &out);
    assert_eq!(std::fs::read(&out).unwrap(), want);
    assert_eq!(sha(&src), before, "the source was written");
    // qemu-img replays the log into a copy (check -r opens it read-write): the same.
    // (qemu reads only 512-byte logical sectors.)
    if let (Some(q), 512) = (qemu(), lss) {
        let copy = dir.path().join("copy.vhdx");
        std::fs::write(&copy, &bytes).unwrap();
        q.img_status(&["check", "-r", "all", "-f", "vhdx", copy.to_str().unwrap()]);
        q.assert_same("vhdx", &copy, "raw", &out);
    }
}

#[test]
fn dirty_log_is_replayed_in_memory_and_the_source_is_untouched() {
    dirty_log_reads_right(512, MIB);
}

#[test]
fn hyper_v_style_dirty_vhdx_with_4k_sectors_and_32m_blocks_converts_right() {
    dirty_log_reads_right(4096, 32 * MIB);
}

#[test]
fn four_k_logical_sectors_are_read_where_qemu_refuses_them() {
    let dir = tempdir();
    let bs = 32 * MIB;
    let size = 3 * bs + 4096 * 5;
    let mut v = Vhdx::new(size, bs, 4096);
    v.blocks.push((0, Block::Full(pattern(bs as usize, 3))));
    v.blocks.push((3, Block::Full(pattern(4096 * 5, 4))));
    v.blocks.push((1, Block::State(3)));
    // State 5: UNMAPPED as the 0.95 draft numbered it (qemu reads zeros too).
    v.blocks.push((2, Block::State(5)));
    let (b, _) = v.build();
    let src = dir.path().join("hv.vhdx");
    std::fs::write(&src, &b).unwrap();
    let img = open(&src, None, &OpenOptions::default()).unwrap();
    let got = read_all(img.as_ref()).unwrap();
    assert_eq!(&got[..bs as usize], &pattern(bs as usize, 3)[..]);
    assert!(got[bs as usize..3 * bs as usize].iter().all(|&x| x == 0));
    assert_eq!(&got[3 * bs as usize..], &pattern(4096 * 5, 4)[..]);
    let out = dir.path().join("hv.raw");
    to_raw(&src, &out);
    assert_eq!(std::fs::read(&out).unwrap(), got);
    // qemu refuses logical sectors other than 512 bytes ("Operation not supported").
    if let Some(q) = qemu() {
        assert_ne!(q.compare("vhdx", &src, "raw", &out), 0);
    }
}

#[test]
fn differencing_vhdx_reads_through_its_parent_and_is_refused_untrusted() {
    let dir = tempdir();
    let bs = MIB;
    let size = 4 * MIB;
    let parent_bytes = pattern(size as usize, 5);
    let mut p = Vhdx::new(size, bs, 512);
    for k in 0..4 {
        let s = (k * bs) as usize;
        p.blocks
            .push((k, Block::Full(parent_bytes[s..s + bs as usize].to_vec())));
    }
    std::fs::write(dir.path().join("parent.vhdx"), p.build().0).unwrap();
    let mut c = Vhdx::new(size, bs, 512);
    c.parent = Some(vec![
        (
            "parent_linkage".into(),
            "{02020202-0202-0202-0202-020202020202}".into(),
        ),
        ("relative_path".into(), ".\\parent.vhdx".into()),
        ("absolute_win32_path".into(), "C:\\vms\\parent.vhdx".into()),
    ]);
    let child0 = pattern(bs as usize, 6);
    // Block 0: fully in the child; block 1: sectors 0..8 and 100 in the child; block 2:
    // not present (the parent's); block 3: zero.
    c.blocks.push((0, Block::Full(child0.clone())));
    let child1 = pattern(bs as usize, 7);
    let mut present = vec![false; (bs / 512) as usize];
    for s in (0..8).chain([100]) {
        present[s] = true;
    }
    c.blocks
        .push((1, Block::Partial(child1.clone(), present.clone())));
    c.blocks.push((3, Block::State(2)));
    let child = dir.path().join("child.vhdx");
    std::fs::write(&child, c.build().0).unwrap();

    let img = open(&child, None, &trusted()).unwrap();
    let mut want = parent_bytes.clone();
    want[..bs as usize].copy_from_slice(&child0);
    for (s, p) in present.iter().enumerate() {
        if *p {
            let at = bs as usize + s * 512;
            want[at..at + 512].copy_from_slice(&child1[s * 512..(s + 1) * 512]);
        }
    }
    want[3 * bs as usize..].fill(0);
    assert_eq!(read_all(img.as_ref()).unwrap(), want);
    vconvert_testkit::check_reader_consistency(img.as_ref()).unwrap();
    let map = img.block_map(3 * bs..4 * bs).unwrap();
    assert_eq!(map.extents()[0].kind, ExtentKind::Zero);
    let info = img.info().unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("parent.vhdx"));
    assert_eq!(info.backing_format.as_deref(), Some("vhdx"));

    // Without references allowed it is refused, and the inspector says why.
    let e = open(&child, None, &OpenOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("refused") && e.contains("parent.vhdx"), "{e}");
    let r = inspect(&child, Some(Format::Vhdx), &Policy::untrusted()).unwrap();
    assert!(!r.violations.is_empty(), "{r:?}");

    // A parent whose DataWriteGuid is not the child's parent_linkage changed after the
    // child was made: refused, naming the locator; parent_linkage2 is accepted too.
    for (linkage2, accepted) in [
        (None, false),
        (Some("{02020202-0202-0202-0202-020202020202}"), true),
    ] {
        let mut locator = vec![
            (
                "parent_linkage".to_string(),
                "{0a0a0a0a-0a0a-0a0a-0a0a-0a0a0a0a0a0a}".to_string(),
            ),
            ("relative_path".into(), ".\\parent.vhdx".into()),
        ];
        if let Some(l2) = linkage2 {
            locator.push(("parent_linkage2".into(), l2.into()));
        }
        c.parent = Some(locator);
        let other = dir.path().join("stale-child.vhdx");
        std::fs::write(&other, c.build().0).unwrap();
        match open(&other, None, &trusted()) {
            Ok(img) => {
                assert!(accepted, "a stale parent was read");
                assert_eq!(read_all(img.as_ref()).unwrap(), want);
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!accepted, "{e}");
                assert!(
                    e.contains("parent_linkage") && e.contains("DataWriteGuid"),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn plain_vhdx_passes_the_untrusted_inspector() {
    let dir = tempdir();
    let src = dir.path().join("ok.vhdx");
    let model = ModelImage::from_parts(&[
        (2 << 20, ModelKind::Data, 1),
        (2 << 20, ModelKind::Unallocated, 0),
    ]);
    convert(
        &model,
        &src,
        Format::Vhdx,
        Options::new(),
        &ConvertOptions::default(),
    )
    .unwrap();
    let r = inspect(&src, Some(Format::Vhdx), &Policy::untrusted()).unwrap();
    assert_eq!(r.format, Format::Vhdx);
    assert!(r.violations.is_empty(), "{r:?}");
    assert_eq!(r.signatures, vec!["vhdx"]);
}

/// Rewrites BAT entry `index` of a hand-made image.
fn set_entry(b: &mut [u8], bat: u64, index: u64, raw: u64) {
    let at = (bat + 8 * index) as usize;
    b[at..at + 8].copy_from_slice(&raw.to_le_bytes());
}

#[test]
fn hostile_structures_are_refused_by_name_and_offset() {
    let dir = tempdir();
    let mut v = Vhdx::new(4 * MIB, MIB, 512);
    v.blocks.push((0, Block::Full(pattern(MIB as usize, 1))));
    let (good, placed) = v.build();
    let try_open = |b: &[u8]| {
        let p = dir.path().join("h.vhdx");
        std::fs::write(&p, b).unwrap();
        open(&p, Some(Format::Vhdx), &OpenOptions::default()).map(|_| ())
    };
    try_open(&good).unwrap();
    let full = |off: u64| {
        vconvert_vhdx::bat::BatEntry {
            state: 6,
            offset: off,
        }
        .encode()
    };
    // A block over the metadata region.
    let mut b = good.clone();
    set_entry(&mut b, placed.bat, 1, full(placed.meta));
    let e = try_open(&b).unwrap_err().to_string();
    assert!(
        e.contains("VHDX BAT at offset 0x200008") && e.contains("overlaps region"),
        "{e}"
    );
    // A block over the log, over the header section, over another block.
    for (off, what) in [
        (MIB, "the log"),
        (0, "header section"),
        (placed.blocks[0].1, "overlaps entry"),
    ] {
        let mut b = good.clone();
        set_entry(&mut b, placed.bat, 2, full(off));
        let e = try_open(&b).unwrap_err().to_string();
        assert!(e.contains(what) && e.contains("0x200010"), "{what}: {e}");
    }
    // A reserved state.
    let mut b = good.clone();
    set_entry(&mut b, placed.bat, 1, 4);
    assert!(try_open(&b).unwrap_err().to_string().contains("state 4"));
    // Partially present in a disk without a parent.
    let mut b = good.clone();
    set_entry(&mut b, placed.bat, 1, 7 | (placed.blocks[0].1 + 8 * MIB));
    assert!(try_open(&b).unwrap_err().to_string().contains("state 7"));
    // A block past the end of the file: opens, read fails naming it, check says 2.
    let mut b = good.clone();
    set_entry(&mut b, placed.bat, 3, full(1 << 40));
    let p = dir.path().join("trunc.vhdx");
    std::fs::write(&p, &b).unwrap();
    let img = open(&p, None, &OpenOptions::default()).unwrap();
    let e = img.block_map(0..4 * MIB).unwrap_err().to_string();
    assert!(
        e.contains("VHDX BAT at offset 0x200018") && e.contains("truncated"),
        "{e}"
    );
    assert_eq!(img.check().unwrap().unwrap().corruptions.len(), 1);
    assert_eq!(img.safety_findings().len(), 1);
    let r = inspect(&p, None, &Policy::untrusted()).unwrap();
    assert!(
        r.violations.iter().any(|v| v.contains("past the end")),
        "{r:?}"
    );
    // Both headers broken.
    let mut b = good.clone();
    b[(64 << 10) + 8] ^= 1;
    b[(128 << 10) + 8] ^= 1;
    let e = try_open(&b).unwrap_err().to_string();
    assert!(
        e.contains("VHDX header at offset 0x10000") && e.contains("checksum"),
        "{e}"
    );
    // One header broken: the other is used, and it is a finding.
    let mut b = good.clone();
    b[(128 << 10) + 8] ^= 1;
    let p = dir.path().join("one.vhdx");
    std::fs::write(&p, &b).unwrap();
    let img = open(&p, None, &OpenOptions::default()).unwrap();
    assert!(img.safety_findings()[0].contains("header copy"));
    // Region tables differing is a finding; both broken is an error.
    let mut b = good.clone();
    b[(192 << 10) + 4] ^= 1;
    b[(256 << 10) + 4] ^= 1;
    let e = try_open(&b).unwrap_err().to_string();
    assert!(e.contains("VHDX region table at offset 0x30000"), "{e}");
    // An absurd disk size in the metadata.
    let mut b = good.clone();
    let item = (placed.meta + (64 << 10) + 8) as usize;
    b[item..item + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = try_open(&b).unwrap_err().to_string();
    assert!(
        e.contains("VHDX virtual disk size") && e.contains("64 TiB"),
        "{e}"
    );
}

#[test]
fn check_and_info_follow_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let src = dir.path().join("q.vhdx");
    q.build(
        &Layout::random(6 << 20, 5, 3),
        "vhdx",
        "block_size=1M",
        &src,
    );
    let img = open(&src, None, &OpenOptions::default()).unwrap();
    let report = img.check().unwrap().unwrap();
    assert!(report.corruptions.is_empty());
    let theirs = q.info_json(Some("vhdx"), &src);
    let info = img.info().unwrap();
    assert_eq!(theirs["virtual-size"].as_u64(), Some(info.virtual_size));
    assert_eq!(theirs["cluster-size"].as_u64(), info.cluster_size);
    assert!(theirs.get("format-specific").is_none() && info.format_specific.is_none());
    assert_eq!(theirs["dirty-flag"].as_bool(), Some(info.dirty));
}

#[test]
fn sector_bitmap_entries_of_a_dynamic_disk_are_ignored() {
    // 4097 blocks of 1 MiB with 512-byte sectors: chunk ratio 4096, so entry 4096 is
    // the first sector bitmap entry; the spec says it must be 0, it is never read.
    let size = 4097 * MIB;
    let mut v = Vhdx::new(size, MIB, 512);
    v.blocks.push((4096, Block::Full(pattern(MIB as usize, 8))));
    let (mut b, placed) = v.build();
    let g = vconvert_vhdx::bat::Geometry::new(size, MIB, 512, false);
    assert_eq!(g.bitmap_index(0), 4096);
    assert_eq!(g.payload_index(4096), 4097);
    set_entry(&mut b, placed.bat, 4096, 6 | (1 << 40));
    let dir = tempdir();
    let p = dir.path().join("sb.vhdx");
    std::fs::write(&p, &b).unwrap();
    let img = open(&p, None, &OpenOptions::default()).unwrap();
    let map = img.block_map(0..size).unwrap();
    assert_eq!(map.data_bytes(), MIB);
    let mut last = vec![0u8; MIB as usize];
    img.read_at(&mut last, 4096 * MIB).unwrap();
    assert_eq!(last, pattern(MIB as usize, 8));
}
