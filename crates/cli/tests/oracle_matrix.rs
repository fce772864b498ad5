//! The oracle matrix: qemu-made images of every format and variant converted by
//! `vconvert` to every writer variant, judged by `qemu-img compare` (content) and
//! `qemu-img check` (metadata we write), then converted back to raw by `vconvert`.
//! Also `info --output=json` of qemu-made images against qemu-img's, key by key.

mod common;

use common::{ok, s, vconvert};

use std::path::Path;
use std::process::Command;

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

/// Sources qemu makes: (format, qemu-img -o options, virtual size).
const SOURCES: &[(&str, &str, u64)] = &[
    ("raw", "", 9 << 20),
    ("vdi", "", 9 << 20),
    ("vdi", "static=on", 6 << 20),
    ("vdi", "", (7 << 20) + 3584),
    ("vpc", "", 9 << 20),
    ("vpc", "subformat=fixed", 5 << 20),
    ("vpc", "force_size=on", (7 << 20) + 3584),
    ("vpc", "subformat=fixed,force_size=on", 3 << 20),
    ("qcow2", "", 9 << 20),
    ("qcow2", "compat=0.10", 5 << 20),
    ("qcow2", "cluster_size=512", 3 << 20),
    ("qcow2", "cluster_size=2M,refcount_bits=1", 9 << 20),
    (
        "qcow2",
        "refcount_bits=64,lazy_refcounts=on",
        (7 << 20) + 3584,
    ),
    ("qcow2", "extended_l2=on", 9 << 20),
    ("qcow2", "-c", 9 << 20),
    ("qcow2", "-c,compression_type=zstd", 6 << 20),
    ("qcow2", "-c,cluster_size=4k", (5 << 20) + 512),
    ("vmdk", "", 9 << 20),
    ("vmdk", "subformat=monolithicFlat", 5 << 20),
    ("vmdk", "subformat=twoGbMaxExtentSparse", (7 << 20) + 3584),
    ("vmdk", "subformat=streamOptimized", 9 << 20),
    ("vmdk", "zeroed_grain=on", 6 << 20),
    ("vhdx", "", 9 << 20),
    ("vhdx", "subformat=fixed,block_size=1M", 5 << 20),
    ("vhdx", "block_size=2M,log_size=2M", (7 << 20) + 3584),
    ("vhdx", "block_state_zero=off", 6 << 20),
];

/// Targets vconvert writes: (format, -o options).
const TARGETS: &[(&str, &str)] = &[
    ("raw", ""),
    ("vdi", ""),
    ("vdi", "static=on"),
    ("vpc", ""),
    ("vpc", "subformat=fixed"),
    ("vpc", "force_size=on"),
    ("vpc", "subformat=fixed,azure=on"),
    ("qcow2", ""),
    ("qcow2", "compat=0.10"),
    ("qcow2", "cluster_size=512"),
    ("qcow2", "cluster_size=2M"),
    ("qcow2", "refcount_bits=1"),
    ("qcow2", "refcount_bits=64,lazy_refcounts=on"),
    ("qcow2", "extended_l2=on"),
    ("qcow2", "preallocation=metadata"),
    ("qcow2", "compression_type=zstd"),
    ("qcow2", "-c"),
    ("qcow2", "-c,compression_type=zstd,cluster_size=4k"),
    ("vmdk", ""),
    ("vmdk", "subformat=monolithicFlat"),
    ("vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk", "subformat=twoGbMaxExtentFlat"),
    ("vmdk", "subformat=streamOptimized"),
    ("vmdk", "zeroed_grain=on,adapter_type=lsilogic"),
    ("vhdx", ""),
    ("vhdx", "subformat=fixed"),
    ("vhdx", "block_size=1M,log_size=2M"),
    ("vhdx", "block_state_zero=off,block_size=32M"),
];

/// Splits `-c,rest` into the compress flag and the `-o` options.
fn compress_and_options(opts: &str) -> (bool, &str) {
    match opts.strip_prefix("-c") {
        Some(rest) => (true, rest.trim_start_matches(',')),
        None => (false, opts),
    }
}

/// Formats (and VMDK subformats) `qemu-img check` supports.
fn checkable(format: &str, options: &str) -> bool {
    matches!(format, "qcow2" | "vdi" | "vhdx") || (format == "vmdk" && !options.contains("Flat"))
}

fn ext(format: &str) -> &str {
    match format {
        "vpc" => "vhd",
        f => f,
    }
}

fn build_source(q: &Qemu, dir: &Path, i: usize) -> (std::path::PathBuf, &'static str) {
    let (fmt, opts, size) = SOURCES[i];
    let path = dir.join(format!("src{i}.{}", ext(fmt)));
    let (compress, opts) = compress_and_options(opts);
    let layout = Layout::random(size, 6, 100 + i as u64);
    if compress || opts.contains("streamOptimized") {
        // qemu-io cannot write into compressed or streamOptimized images: build raw,
        // then convert with qemu-img.
        let plain = dir.join(format!("plain{i}.raw"));
        q.build(&layout, "raw", "", &plain);
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if compress {
            args.push("-c");
        }
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&plain), s(&path)]);
        q.img(&args);
        std::fs::remove_file(&plain).ok();
    } else {
        q.build(&layout, fmt, opts, &path);
    }
    (path, fmt)
}

#[test]
fn every_source_to_every_target_and_back() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for (i, source) in SOURCES.iter().enumerate() {
        let (src, sfmt) = build_source(&q, dir.path(), i);
        for (j, &(tfmt, topts)) in TARGETS.iter().enumerate() {
            let what = format!("{source:?} -> {tfmt} {topts}");
            let out = dir.path().join(format!("out{i}-{j}.{}", ext(tfmt)));
            let (compress, topts) = compress_and_options(topts);
            let mut args = vec!["convert", "-f", sfmt, "-O", tfmt];
            if compress {
                args.push("-c");
            }
            if !topts.is_empty() {
                args.extend(["-o", topts]);
            }
            args.extend([s(&src), s(&out)]);
            ok(&args);
            assert_eq!(
                q.compare(sfmt, &src, tfmt, &out),
                0,
                "{what}: content differs"
            );
            if checkable(tfmt, topts) {
                let (code, text) = q.check(tfmt, &out);
                assert_eq!(code, 0, "{what}: qemu-img check: {text}");
            }
            // qemu-img reads back what we say we wrote (options in format-specific).
            if i == 0 {
                assert_info_matches(&q, tfmt, &out);
            }
            // And back to raw through our reader of the target format.
            let back = dir.path().join(format!("back{i}-{j}.raw"));
            ok(&["convert", "-f", tfmt, "-O", "raw", s(&out), s(&back)]);
            assert_eq!(
                q.compare(sfmt, &src, "raw", &back),
                0,
                "{what}: back to raw differs"
            );
            if tfmt == "vpc" {
                assert_vpc_size(&q, topts, &out, &src, sfmt);
            }
            std::fs::remove_file(&out).ok();
            std::fs::remove_file(&back).ok();
        }
    }
}

/// Our `info --output=json` against qemu-img's: every key qemu prints must be there
/// with the same value; `format-specific` is compared whole where qemu prints one.
pub fn assert_info_matches(q: &Qemu, fmt: &str, path: &Path) {
    let ours: serde_json::Value =
        serde_json::from_slice(&ok(&["info", "--output=json", "-f", fmt, s(path)]).stdout).unwrap();
    let theirs = q.info_json(Some(fmt), path);
    let (o, t) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    for (k, v) in t {
        assert_eq!(o.get(k), Some(v), "{fmt} {}: key {k}", path.display());
    }
    for k in o.keys() {
        assert!(
            t.contains_key(k) || k == "format-specific",
            "{fmt} {}: extra key {k}",
            path.display()
        );
    }
}

#[test]
fn info_json_matches_qemu_img_for_every_source() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for (i, source) in SOURCES.iter().enumerate() {
        let (src, fmt) = build_source(&q, dir.path(), i);
        assert_info_matches(&q, fmt, &src);
        // check: same exit code and, where qemu checks the format, the same JSON.
        let ours = vconvert(&["check", "--output=json", "-f", fmt, s(&src)]);
        let theirs = Command::new("qemu-img")
            .args(["check", "--output=json", "-f", fmt, s(&src)])
            .output()
            .unwrap();
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "check {:?}",
            SOURCES[i]
        );
        if theirs.status.code() == Some(0) {
            let a: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
            let b: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
            assert_eq!(a, b, "check {source:?}");
        }
        // measure for a qcow2 target: within 1% of qemu-img's figures.
        let ours: serde_json::Value = serde_json::from_slice(
            &ok(&[
                "measure",
                "--output=json",
                "-f",
                fmt,
                "-O",
                "qcow2",
                s(&src),
            ])
            .stdout,
        )
        .unwrap();
        let theirs: serde_json::Value = serde_json::from_slice(
            &q.img(&[
                "measure",
                "--output=json",
                "-f",
                fmt,
                "-O",
                "qcow2",
                s(&src),
            ])
            .stdout,
        )
        .unwrap();
        for key in ["required", "fully-allocated"] {
            let (a, b) = (ours[key].as_f64().unwrap(), theirs[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= b * 0.01,
                "measure {key} of {source:?}: ours {a}, qemu-img's {b}"
            );
        }
    }
}

/// A VHD we write has the size qemu-img gives the same request: rounded up to the CHS
/// geometry, exact with `force_size`, a multiple of 1 MiB with `azure`; qemu reads it
/// back at that size.
fn assert_vpc_size(q: &Qemu, opts: &str, ours: &Path, src: &Path, sfmt: &str) {
    let size = q.info_json(Some(sfmt), src)["virtual-size"]
        .as_u64()
        .unwrap();
    let got = q.info_json(Some("vpc"), ours)["virtual-size"]
        .as_u64()
        .unwrap();
    if opts.contains("azure") {
        assert_eq!(got, size.div_ceil(1 << 20) << 20, "{opts}");
        return;
    }
    let dir = tempdir();
    let theirs = dir.path().join("q.vhd");
    let qopts = if opts.is_empty() {
        "subformat=dynamic"
    } else {
        opts
    };
    q.img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        qopts,
        s(&theirs),
        &size.to_string(),
    ]);
    let want = q.info_json(Some("vpc"), &theirs)["virtual-size"]
        .as_u64()
        .unwrap();
    assert_eq!(got, want, "vpc {opts} of a {size}-byte disk");
}

#[test]
fn fixed_vhd_is_probed_without_f_unlike_qemu() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let src = dir.path().join("fixed.vhd");
    q.build(
        &Layout::random(3 << 20, 4, 9),
        "vpc",
        "subformat=fixed",
        &src,
    );
    let info: serde_json::Value =
        serde_json::from_slice(&ok(&["info", "--output=json", s(&src)]).stdout).unwrap();
    assert_eq!(info["format"], "vpc");
    // qemu-img sees a raw file; -f vpc and -f raw both do what the user asked.
    assert_eq!(q.info_json(None, &src)["format"], "raw");
    let as_raw: serde_json::Value =
        serde_json::from_slice(&ok(&["info", "--output=json", "-f", "raw", s(&src)]).stdout)
            .unwrap();
    assert_eq!(as_raw["format"], "raw");
    let out = dir.path().join("out.raw");
    ok(&["convert", "-O", "raw", s(&src), s(&out)]);
    q.assert_same("vpc", &src, "raw", &out);
}

#[test]
fn create_makes_what_qemu_img_create_makes() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let cases = [
        ("raw", ""),
        ("qcow2", ""),
        ("qcow2", "compat=0.10,cluster_size=4k"),
        ("qcow2", "extended_l2=on,refcount_bits=8"),
        ("vdi", ""),
        ("vdi", "static=on"),
        ("vpc", ""),
        ("vpc", "subformat=fixed,force_size=on"),
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vmdk", "subformat=twoGbMaxExtentFlat"),
        ("vhdx", ""),
        ("vhdx", "subformat=fixed,block_size=1M"),
    ];
    for (i, (fmt, opts)) in cases.into_iter().enumerate() {
        for size in ["10M", "3000K"] {
            let ours = dir.path().join(format!("ours{i}-{size}.{}", ext(fmt)));
            let theirs = dir.path().join(format!("theirs{i}-{size}.{}", ext(fmt)));
            let mut a = vec!["create", "-q", "-f", fmt];
            if !opts.is_empty() {
                a.extend(["-o", opts]);
            }
            let mut ca = a.clone();
            ca.extend([s(&ours), size]);
            ok(&ca);
            a.extend([s(&theirs), size]);
            q.img(&a);
            let (o, t) = (
                q.info_json(Some(fmt), &ours),
                q.info_json(Some(fmt), &theirs),
            );
            assert_eq!(
                o["virtual-size"], t["virtual-size"],
                "create {fmt} {opts} {size}"
            );
            assert_eq!(
                stable(&o["format-specific"]),
                stable(&t["format-specific"]),
                "create {fmt} {opts} {size}"
            );
            if checkable(fmt, opts) {
                let (code, text) = q.check(fmt, &ours);
                assert_eq!(code, 0, "create {fmt} {opts}: {text}");
            }
            assert_eq!(q.compare(fmt, &ours, fmt, &theirs), 0);
        }
    }
}

/// `format-specific` without what differs between any two fresh images: random ids and
/// file names.
fn stable(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    if let Some(d) = v.get_mut("data").and_then(|d| d.as_object_mut()) {
        d.remove("cid");
        if let Some(serde_json::Value::Array(ext)) = d.get_mut("extents") {
            for e in ext {
                if let Some(o) = e.as_object_mut() {
                    o.remove("filename");
                }
            }
        }
    }
    v
}
