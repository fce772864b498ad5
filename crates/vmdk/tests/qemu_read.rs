//! Images made by qemu-img, read by VmdkReader and compared byte by byte with what
//! qemu-img convert reads.

mod common;

use common::{assert_info_like_qemu, assert_reads_like_qemu, open, qemu_bytes};
use vconvert_core::{ExtentKind, ImageReader, Location};
use vconvert_testkit::{qemu, tempdir, Layout, Op};

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

fn data_only(mut l: Layout) -> Layout {
    l.ops.retain(|o| matches!(o, Op::Data { .. }));
    l
}

#[test]
fn every_qemu_subformat_reads_identically() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    // Not a multiple of the grain size: the last grain is partial.
    let size = (24 << 20) + 3 * 512;
    for (i, sub) in SUBFORMATS.iter().enumerate() {
        let layout = Layout::random(size, 12, 100 + i as u64);
        let layout = if *sub == "streamOptimized" {
            data_only(layout)
        } else {
            layout
        };
        let path = dir.path().join(format!("{sub}.vmdk"));
        q.build(&layout, "vmdk", &format!("subformat={sub}"), &path);
        let r = assert_reads_like_qemu(&q, &path);
        assert_eq!(r.create_type(), *sub);
        assert_info_like_qemu(&q, &r, &path);
        let report = r.check().unwrap().unwrap();
        assert!(
            report.corruptions.is_empty(),
            "{sub}: {:?}",
            report.corruptions
        );
        assert!(
            r.safety_findings().is_empty(),
            "{sub}: {:?}",
            r.safety_findings()
        );
        let map = r.block_map(0..size).unwrap();
        if *sub == "streamOptimized" {
            assert!(map
                .extents()
                .iter()
                .any(|e| matches!(e.kind, ExtentKind::Data(Location::Compressed { .. }))));
        }
        if sub.contains("Sparse") {
            assert!(map.data_bytes() < size, "{sub} is sparse");
        }
    }
}

#[test]
fn zeroed_grains_read_as_zero_extents() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let path = dir.path().join("z.vmdk");
    let size = 8 << 20;
    let layout = Layout {
        size,
        ops: vec![
            Op::Data {
                offset: 0,
                len: size,
                seed: 7,
            },
            Op::Zero {
                offset: 1 << 20,
                len: 1 << 20,
            },
        ],
    };
    q.build(&layout, "vmdk", "zeroed_grain=on", &path);
    let r = assert_reads_like_qemu(&q, &path);
    let map = r.block_map((1 << 20)..(2 << 20)).unwrap();
    assert_eq!(map.extents().len(), 1);
    assert_eq!(map.extents()[0].kind, ExtentKind::Zero);
}

#[test]
fn two_gb_extents_over_2_gib() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let path = dir.path().join(format!("{sub}.vmdk"));
        let size: u64 = 5 << 30;
        q.img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            path.to_str().unwrap(),
            &size.to_string(),
        ]);
        let writes = [
            (2u64 << 30) - 40960,
            (4u64 << 30) + 12345 * 512,
            size - 4096,
        ];
        let cmds: Vec<String> = writes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                format!("write -P {} {o} 81920", 0x11 * (i + 1))
                    .replace("81920", if *o == size - 4096 { "4096" } else { "81920" })
            })
            .collect();
        q.io("vmdk", &path, &cmds);
        let r = open(&path);
        assert_eq!(r.virtual_size(), size);
        assert_eq!(
            r.info().unwrap().format_specific.unwrap()["data"]["extents"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        for (i, &o) in writes.iter().enumerate() {
            let len = if o == size - 4096 { 4096 } else { 81920 };
            let mut buf = vec![0u8; len + 8192];
            let start = o - 4096;
            let end = (start + buf.len() as u64).min(size);
            let buf = &mut buf[..(end - start) as usize];
            r.read_at(buf, start).unwrap();
            let pat = (0x11 * (i + 1)) as u8;
            assert!(buf[..4096].iter().all(|&b| b == 0));
            assert!(
                buf[4096..4096 + len].iter().all(|&b| b == pat),
                "{sub} write {i}"
            );
            assert!(buf[4096 + len..].iter().all(|&b| b == 0));
        }
        if sub.contains("Sparse") {
            let map = r.block_map(0..size).unwrap();
            map.check_invariants().unwrap();
            assert!(map.data_bytes() <= 4 * 65536 + 2 * 65536);
        }
    }
}

#[test]
fn child_reads_through_parent() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "4M"]);
    q.io("vmdk", &base, &["write -P 0x22 0 4M".to_string()]);
    q.img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        child.to_str().unwrap(),
    ]);
    q.io("vmdk", &child, &["write -P 0x33 1M 64k".to_string()]);
    let r = assert_reads_like_qemu(&q, &child);
    let info = r.info().unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("base.vmdk"));
    assert_info_like_qemu(&q, &r, &child);
    assert!(r.safety_findings().is_empty(), "{:?}", r.safety_findings());
    let map = r.block_map(0..4 << 20).unwrap();
    assert!(map
        .extents()
        .iter()
        .any(|e| e.kind == ExtentKind::Data(Location::Opaque)));
    // Refused without references.
    let e = vconvert_vmdk::VmdkReader::open(
        vconvert_core::ImageFile::open(&child).unwrap(),
        &vconvert_core::NoReferences,
    )
    .unwrap_err();
    assert!(matches!(e, vconvert_core::Error::Refused { .. }), "{e}");
    let _ = qemu_bytes;
}
