//! Images made by VmdkWriter, judged by qemu-img (compare, check, info) and read back.

mod common;

use std::path::Path;

use common::{
    assert_info_like_qemu, assert_reads_like_qemu, drive_sparse, open, write_vmdk, writer,
};
use vconvert_core::{
    ChunkEncoder, CreateParams, ExtentKind, ImageReader, Options, Output, RunKind,
};
use vconvert_testkit::{qemu, read_all, tempdir, Qemu, Rng};
use vconvert_vmdk::VmdkWriter;

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// A disk of `size` bytes: random data, zero blocks and unallocated blocks in 4 KiB
/// units, and the kind of each unit.
fn test_disk(size: u64, seed: u64) -> (Vec<u8>, Vec<RunKind>) {
    let mut rng = Rng::new(seed);
    let units = size.div_ceil(4096) as usize;
    let mut kinds = Vec::with_capacity(units);
    let mut bytes = vec![0u8; size as usize];
    let mut i = 0;
    while i < units {
        let n = (1 + rng.below(40) as usize).min(units - i);
        let kind = match rng.below(5) {
            0 | 1 => RunKind::Data,
            2 => RunKind::Zero,
            _ => RunKind::Unallocated,
        };
        for u in i..i + n {
            kinds.push(kind);
            if kind == RunKind::Data {
                let s = u * 4096;
                let e = (s + 4096).min(size as usize);
                // Some data units are all zero, to exercise zero detection.
                if rng.below(6) != 0 {
                    rng.fill(&mut bytes[s..e]);
                }
            }
        }
        i += n;
    }
    (bytes, kinds)
}

fn judge(q: &Qemu, path: &Path, raw: &Path) {
    q.assert_same("vmdk", path, "raw", raw);
    let (code, out) = q.check("vmdk", path);
    assert_eq!(code, 0, "qemu-img check {}: {out}", path.display());
    assert_reads_like_qemu(q, path);
}

#[test]
fn every_subformat_is_accepted_by_qemu() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let size = (13 << 20) + 7 * 512;
    for (i, sub) in SUBFORMATS.iter().enumerate() {
        let (bytes, kinds) = test_disk(size, 40 + i as u64);
        let raw = dir.path().join(format!("{sub}.raw"));
        std::fs::write(&raw, &bytes).unwrap();
        let path = dir.path().join(format!("{sub} out.vmdk"));
        write_vmdk(
            &path,
            &format!("subformat={sub}"),
            &bytes,
            &|p| kinds[(p / 4096) as usize],
            4096,
            1,
        )
        .unwrap();
        judge(&q, &path, &raw);
        let info = q.info_json(Some("vmdk"), &path);
        assert_eq!(info["format-specific"]["data"]["create-type"], *sub);
        let r = open(&path);
        assert_info_like_qemu(&q, &r, &path);
        assert!(r.safety_findings().is_empty(), "{:?}", r.safety_findings());
        assert!(r.check().unwrap().unwrap().corruptions.is_empty());
        if *sub == "streamOptimized" {
            // VMware layout: GD at end, footer and end-of-stream marker.
            let f = std::fs::read(&path).unwrap();
            assert_eq!(&f[56..64], &[0xff; 8], "gdOffset is GD_AT_END");
            assert_eq!(&f[4..8], &3u32.to_le_bytes());
            let n = f.len();
            assert_eq!(&f[n - 512..], &[0u8; 512][..], "EOS marker");
            assert_eq!(&f[n - 1024..n - 1020], b"KDMV", "footer");
            assert_eq!(&f[n - 1536 + 12..n - 1536 + 16], &3u32.to_le_bytes());
        }
    }
}

#[test]
fn output_is_reproducible() {
    let dir = tempdir();
    let size = 5 << 20;
    let (bytes, kinds) = test_disk(size, 9);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let a = dir.path().join(format!("a-{sub}.vmdk"));
        let b = dir.path().join(format!("b-{sub}.vmdk"));
        for p in [&a, &b] {
            write_vmdk(
                p,
                &format!("subformat={sub}"),
                &bytes,
                &|p| kinds[(p / 4096) as usize],
                4096,
                77,
            )
            .unwrap();
        }
        let (fa, fb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // The descriptor names the file; everything else is identical.
        let name_a = a.file_name().unwrap().to_str().unwrap().as_bytes().to_vec();
        let fa = replace(
            &fa,
            &name_a,
            b.file_name().unwrap().to_str().unwrap().as_bytes(),
        );
        assert!(fa == fb, "{sub} output differs between runs");
        let r = open(&a);
        assert_eq!(read_all(&r).unwrap(), bytes);
    }
}

fn replace(h: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < h.len() {
        if h[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(h[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn zeroed_grain_records_zero_runs() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let size = 4 << 20;
    let mut bytes = vec![0u8; size as usize];
    Rng::new(3).fill(&mut bytes[..1 << 20]);
    let kinds = |p: u64| match p >> 20 {
        0 => RunKind::Data,
        1 => RunKind::Zero,
        _ => RunKind::Unallocated,
    };
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "twoGbMaxExtentSparse",
    ] {
        let path = dir.path().join(format!("z-{sub}.vmdk"));
        write_vmdk(
            &path,
            &format!("zeroed_grain=on,subformat={sub}"),
            &bytes,
            &kinds,
            4096,
            5,
        )
        .unwrap();
        let raw = dir.path().join("z.raw");
        std::fs::write(&raw, &bytes).unwrap();
        judge(&q, &path, &raw);
        let r = open(&path);
        let map = r.block_map(0..size).unwrap();
        let kinds: Vec<_> = map.extents().iter().map(|e| (e.len, e.kind)).collect();
        let n = kinds.len();
        assert!(kinds[..n - 2].iter().all(|k| k.1.is_data()), "{kinds:?}");
        assert_eq!(kinds[n - 2], (1 << 20, ExtentKind::Zero));
        assert_eq!(kinds[n - 1], (2 << 20, ExtentKind::Unallocated));
    }
}

#[test]
fn two_gb_subformats_split_disks_over_2_gib() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let size: u64 = (5 << 30) + 512;
    let mut pieces = Vec::new();
    for (i, o) in [
        0u64,
        (2 << 30) - 4096,
        (4 << 30) + 3 * 65536 + 512,
        size - 512,
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = vec![0u8; 8192.min((size - o) as usize)];
        Rng::new(i as u64 + 1).fill(&mut b);
        pieces.push((o, b));
    }
    for sub in [
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "monolithicSparse",
        "streamOptimized",
    ] {
        let path = dir.path().join(format!("big-{sub}.vmdk"));
        let mut out = Output::new(&path, false);
        let w = writer(&mut out, size, &format!("subformat={sub}"), 2).unwrap();
        drive_sparse(w, size, &pieces).unwrap();
        out.commit().unwrap();
        let (code, text) = q.check("vmdk", &path);
        assert_eq!(code, 0, "{sub}: {text}");
        let info = q.info_json(Some("vmdk"), &path);
        assert_eq!(info["virtual-size"].as_u64(), Some(size));
        if sub.starts_with("twoGb") {
            let ext = info["format-specific"]["data"]["extents"]
                .as_array()
                .unwrap();
            assert_eq!(ext.len(), 3, "{sub}");
        }
        // Compare the written pieces through qemu-io and through our reader.
        let r = open(&path);
        for (o, b) in &pieces {
            let mut got = vec![0u8; b.len()];
            r.read_at(&mut got, *o).unwrap();
            assert!(got == *b, "{sub} at {o:#x}");
            let pat = dir.path().join("piece");
            std::fs::write(&pat, b).unwrap();
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "vmdk", "-c", &format!("read -v {o} 16")])
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let first: String = b[..16].iter().map(|x| format!("{x:02x} ")).collect();
            assert!(text.contains(first.trim()), "{sub} at {o:#x}: {text}");
        }
        let map = r.block_map(0..size).unwrap();
        map.check_invariants().unwrap();
        if !sub.ends_with("Flat") {
            assert!(map.data_bytes() <= 8 * 65536, "{sub}: {}", map.data_bytes());
        }
        for f in vconvert_testkit::dir_entries(dir.path()) {
            if f.file_name().unwrap().to_str().unwrap().starts_with("big-") {
                std::fs::remove_file(f).unwrap();
            }
        }
    }
}

#[test]
fn options_are_checked() {
    let dir = tempdir();
    let target = dir.path().join("x.vmdk");
    let params = CreateParams {
        virtual_size: 1 << 20,
        existing: false,
        target_is_zero: true,
        compress: false,
        identity_seed: Some(1),
    };
    let make = |opts: &str, params: &CreateParams| {
        let mut out = Output::new(&target, false);
        VmdkWriter::create(&mut out, params, Options::parse(opts).unwrap()).map(|_| ())
    };
    let e = make("compat6=on,hwversion=7", &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("compat6"), "{e}");
    let e = make("subformat=vmfs", &params).unwrap_err().to_string();
    assert!(e.contains("streamOptimized"), "{e}");
    let e = make("bogus=1", &params).unwrap_err().to_string();
    assert!(e.contains("zeroed_grain"), "{e}");
    let e = make("toolsversion=a\"b", &params).unwrap_err().to_string();
    assert!(e.contains("toolsversion"), "{e}");
    let c = CreateParams {
        compress: true,
        ..params.clone()
    };
    let e = make("", &c).unwrap_err().to_string();
    assert!(e.contains("compression"), "{e}");
    make("subformat=streamOptimized", &c).unwrap();
    let x = CreateParams {
        existing: true,
        ..params.clone()
    };
    assert!(make("", &x).is_err());
    assert_eq!(
        vconvert_testkit::dir_entries(dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "nothing left behind"
    );
}

#[test]
fn geometry_and_adapter_like_qemu() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for (opts, size) in [
        ("adapter_type=lsilogic,compat6=on", 3u64 << 30),
        ("", 10 << 20),
        ("zeroed_grain=on,adapter_type=buslogic", 100 << 20),
        ("subformat=twoGbMaxExtentSparse", (5 << 30) + 512),
    ] {
        for f in vconvert_testkit::dir_entries(dir.path()) {
            std::fs::remove_file(f).unwrap();
        }
        let ours = dir.path().join("ours.vmdk");
        let theirs = dir.path().join("theirs.vmdk");
        let mut out = Output::new(&ours, false);
        let w = writer(&mut out, size, opts, 1).unwrap();
        drive_sparse(w, size, &[]).unwrap();
        out.commit().unwrap();
        let mut args = vec!["create", "-q", "-f", "vmdk"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let s = size.to_string();
        args.extend([theirs.to_str().unwrap(), &s]);
        q.img(&args);
        let ddb = |p: &Path| -> Vec<String> {
            let d = open(p).descriptor().clone();
            d.entries
                .into_iter()
                .filter(|(k, _)| k.starts_with("ddb."))
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        };
        assert_eq!(ddb(&ours), ddb(&theirs));
        // Same metadata layout as qemu's: the headers match but for nothing.
        let first_extent = |p: &Path| {
            if opts.contains("twoGb") {
                let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
                p.with_file_name(format!("{stem}-s001.vmdk"))
            } else {
                p.to_path_buf()
            }
        };
        let (a, b) = (
            std::fs::read(first_extent(&ours)).unwrap(),
            std::fs::read(first_extent(&theirs)).unwrap(),
        );
        assert_eq!(a[..512], b[..512], "{opts}");
        assert_eq!(a.len(), b.len());
    }
}

#[test]
fn empty_disks() {
    let dir = tempdir();
    for sub in SUBFORMATS {
        let path = dir.path().join(format!("e-{sub}.vmdk"));
        write_vmdk(
            &path,
            &format!("subformat={sub}"),
            &[],
            &|_| RunKind::Data,
            4096,
            1,
        )
        .unwrap();
        let r = open(&path);
        assert_eq!(r.virtual_size(), 0, "{sub}");
        assert!(r.block_map(0..0).unwrap().extents().is_empty());
    }
}

#[test]
fn placement_out_of_order_is_refused() {
    use vconvert_core::{Chunk, ImageWriter, Run};
    let dir = tempdir();
    let path = dir.path().join("o.vmdk");
    let mut out = Output::new(&path, false);
    let mut w = writer(&mut out, 4 << 20, "", 1).unwrap();
    let chunk = |i: u64| Chunk {
        offset: i << 20,
        len: 1 << 20,
        runs: vec![Run {
            start: i << 20,
            len: 1 << 20,
            kind: RunKind::Data,
        }],
        data: vec![1u8; 1 << 20].into(),
    };
    let (a, b) = (chunk(2), chunk(1));
    let ea = w.encoder().encode(&a).unwrap();
    let eb = w.encoder().encode(&b).unwrap();
    w.place(&a, ea).unwrap();
    let e = w.place(&b, eb).unwrap_err().to_string();
    assert!(e.contains("guest order"), "{e}");
}

#[test]
fn sparse_disks_larger_than_2_tib() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let size: u64 = 3 << 40;
    let pieces = vec![
        (65536u64, vec![0x11u8; 4096]),
        ((2 << 40) + 512, vec![0x22u8; 70000]),
        (size - 4096, vec![0x33u8; 4096]),
    ];
    for sub in ["monolithicSparse", "streamOptimized"] {
        let path = dir.path().join(format!("huge-{sub}.vmdk"));
        let mut out = Output::new(&path, false);
        let w = writer(&mut out, size, &format!("subformat={sub}"), 2).unwrap();
        drive_sparse(w, size, &pieces).unwrap();
        out.commit().unwrap();
        let (code, text) = q.check("vmdk", &path);
        assert_eq!(code, 0, "{sub}: {text}");
        let r = open(&path);
        assert_eq!(r.virtual_size(), size);
        for (o, b) in &pieces {
            let mut got = vec![0u8; b.len()];
            r.read_at(&mut got, *o).unwrap();
            assert!(got == *b, "{sub} at {o:#x}");
            let out = std::process::Command::new("qemu-io")
                .args([
                    "-f",
                    "vmdk",
                    "-c",
                    &format!("read -P {} {o} {}", b[0], b.len()),
                ])
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                !text.contains("fail") && text.contains("read"),
                "{sub} at {o:#x}: {text}"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
    let mut out = Output::new(&dir.path().join("x.vmdk"), false);
    assert!(writer(&mut out, 65 << 40, "", 1).is_err());
}
