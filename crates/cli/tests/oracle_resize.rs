//! `vconvert resize` against the qemu-img oracle: raw and qcow2 variants resized by
//! both programs (grow, shrink, through a larger L1 table, overlays over longer
//! backing files) compare equal and pass `qemu-img check`; formats and sizes qemu-img
//! refuses are refused with its words; and a crash at every step (fail points, the
//! process aborts as `kill -9` would stop it) leaves an image without corruption that
//! reads as before or after the resize. `--preallocation=metadata|falloc|full` grows
//! as qemu-img does (same content, same allocation in `qemu-img map`, the space
//! reserved on disk).

mod common;

use common::{fails, ok, s};

use std::path::{Path, PathBuf};
use std::process::Command;

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

/// qcow2 images qemu makes: (-o options, size, with a backing file larger than it).
const QCOW2: &[(&str, u64, bool)] = &[
    ("", 9 << 20, false),
    ("compat=0.10", 5 << 20, false),
    ("cluster_size=512", 2 << 20, false),
    ("cluster_size=4k,refcount_bits=1", 3 << 20, false),
    ("refcount_bits=64,lazy_refcounts=on", 6 << 20, false),
    ("extended_l2=on", 9 << 20, false),
    ("preallocation=metadata", 4 << 20, false),
    ("", 4 << 20, true),
    ("extended_l2=on", 4 << 20, true),
    ("cluster_size=512", 2 << 20, true),
];

/// Resize sequences (each step `--shrink` allowed).
const STEPS: &[&[&str]] = &[
    &["+3M"],
    &["-1M"],
    &["-1M", "+5M"],
    &["40M"],
    &["2M", "12M"],
];

fn build_qcow2(q: &Qemu, dir: &Path, i: usize) -> PathBuf {
    let (opts, size, backed) = QCOW2[i];
    let path = dir.join(format!("q{i}.qcow2"));
    if backed {
        let base = dir.join(format!("base{i}.raw"));
        Layout::random(16 << 20, 6, 40 + i as u64).write_raw(&base);
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "raw"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let size = size.to_string();
        args.extend([s(&path), size.as_str()]);
        q.img(&args);
        q.io(
            "qcow2",
            &path,
            &["write -P 0x42 64k 200k".into(), "write -z 512k 64k".into()],
        );
    } else {
        q.build(
            &Layout::random(size, 6, 20 + i as u64),
            "qcow2",
            opts,
            &path,
        );
    }
    path
}

/// Resizes copies of `img` by both programs, step by step; asserts the results
/// compare equal, and ours passes `qemu-img check`. Returns false when we refused (an
/// unsupported case) on an unchanged image.
fn resize_both(q: &Qemu, fmt: &str, img: &Path, steps: &[&str], what: &str) -> bool {
    let ours = img.with_extension("ours");
    let theirs = img.with_extension("theirs");
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &theirs).unwrap();
    for step in steps {
        let out = common::vconvert(&["resize", "--shrink", "-f", fmt, s(&ours), step]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("not supported"), "{what} {step}: {err}");
            // Refused before any write: the image is as it was.
            q.assert_same(fmt, &ours, fmt, &theirs);
            if fmt == "qcow2" {
                assert_eq!(q.check(fmt, &ours).0, 0, "{what}: check after a refusal");
            }
            return false;
        }
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Image resized.\n");
        q.img(&["resize", "-q", "--shrink", "-f", fmt, s(&theirs), step]);
        let size = |p: &Path| q.info_json(Some(fmt), p)["virtual-size"].clone();
        assert_eq!(size(&ours), size(&theirs), "{what} {step}: size");
        q.assert_same(fmt, &ours, fmt, &theirs);
        if fmt == "qcow2" {
            let (code, text) = q.check(fmt, &ours);
            assert_eq!(code, 0, "{what} {step}: qemu-img check: {text}");
        }
    }
    true
}

#[test]
fn resize_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let mut done = 0;
    for (i, variant) in QCOW2.iter().enumerate() {
        let img = build_qcow2(&q, dir.path(), i);
        for steps in STEPS {
            done += usize::from(resize_both(
                &q,
                "qcow2",
                &img,
                steps,
                &format!("{variant:?}"),
            ));
        }
    }
    assert_eq!(done, QCOW2.len() * STEPS.len(), "resizes done");
    let raw = dir.path().join("r.raw");
    q.build(&Layout::random((5 << 20) + 1536, 6, 9), "raw", "", &raw);
    for steps in STEPS {
        assert!(resize_both(&q, "raw", &raw, steps, "raw"));
    }
    for prealloc in ["falloc", "full"] {
        let a = dir.path().join(format!("{prealloc}.raw"));
        std::fs::copy(&raw, &a).unwrap();
        let arg = format!("--preallocation={prealloc}");
        ok(&["resize", "-q", "-f", "raw", &arg, s(&a), "+4M"]);
        q.assert_same("raw", &raw, "raw", &a);
        let allocated = std::fs::metadata(&a).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        assert!(allocated.unwrap() >= 4 << 20, "{prealloc}: space reserved");
    }
}

/// qemu-img's map of a qcow2 image without host offsets, adjacent ranges of the same
/// kind merged: where the image is allocated, as data or as zero clusters.
fn allocation(q: &Qemu, img: &Path) -> Vec<serde_json::Value> {
    let out = q.img(&["map", "--output=json", "-f", "qcow2", s(img)]);
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut merged: Vec<serde_json::Value> = Vec::new();
    for mut e in map {
        let o = e.as_object_mut().unwrap();
        o.remove("offset");
        // Whether data reads as zeros from a hole of the host file depends on where
        // the file system blocks fall, not on the image.
        if o["data"] == true {
            o.remove("zero");
        }
        if let Some(last) = merged.last_mut() {
            let key = |v: &serde_json::Value| {
                let mut v = v.clone();
                let o = v.as_object_mut().unwrap();
                o.remove("start");
                o.remove("length");
                v
            };
            if key(last) == key(&e) {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        merged.push(e);
    }
    merged
}

#[test]
fn resize_preallocation_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    // Plain, compat=0.10, 512-byte clusters (the L1 table moves, new refcount blocks
    // among the preallocated clusters), 1-bit and 64-bit refcounts, extended L2,
    // overlays.
    let mut images: Vec<(PathBuf, String)> = [0, 1, 2, 3, 4, 5, 7, 8]
        .into_iter()
        .map(|i| (build_qcow2(&q, dir.path(), i), format!("{:?}", QCOW2[i])))
        .collect();
    // A size off the cluster grid, the last cluster unallocated (read as zeros, or
    // from a backing file), allocated as zeros, or data.
    let base = dir.path().join("odd-base.raw");
    Layout::random(16 << 20, 6, 90).write_raw(&base);
    for (k, (backed, cmds)) in [
        (false, &[][..]),
        (true, &[][..]),
        (false, &["write -P 3 0 500k", "write -z 960k 40k"][..]),
        (true, &["write -P 3 0 500k", "write -P 4 960k 40k"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("odd{k}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if backed {
            args.extend(["-b", s(&base), "-F", "raw"]);
        }
        args.extend([s(&img), "1000k"]);
        q.img(&args);
        q.io(
            "qcow2",
            &img,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        );
        images.push((img, format!("1000k, backed {backed}, {cmds:?}")));
    }
    for (img, label) in &images {
        let img = img.as_path();
        for mode in ["metadata", "falloc", "full"] {
            // 40M: with 512-byte clusters the refcount table (one cluster, 8 MiB of
            // file) must grow.
            for size in ["+3M", "40M"] {
                let what = format!("{label} --preallocation={mode} {size}");
                let ours = img.with_extension("ours");
                let theirs = img.with_extension("theirs");
                std::fs::copy(img, &ours).unwrap();
                std::fs::copy(img, &theirs).unwrap();
                let arg = format!("--preallocation={mode}");
                let out = ok(&["resize", "-f", "qcow2", &arg, s(&ours), size]);
                assert_eq!(String::from_utf8_lossy(&out.stdout), "Image resized.\n");
                q.img(&["resize", "-q", "-f", "qcow2", &arg, s(&theirs), size]);
                let (code, text) = q.check("qcow2", &ours);
                assert_eq!(code, 0, "{what}: qemu-img check: {text}");
                let vsize = |p: &Path| q.info_json(Some("qcow2"), p)["virtual-size"].clone();
                assert_eq!(vsize(&ours), vsize(&theirs), "{what}: size");
                q.assert_same("qcow2", &ours, "qcow2", &theirs);
                q.assert_same("qcow2", &ours, "qcow2", img);
                assert_eq!(
                    allocation(&q, &ours),
                    allocation(&q, &theirs),
                    "{what}: allocation"
                );
                if mode != "metadata" {
                    let grown = vsize(&ours).as_u64().unwrap()
                        - q.info_json(Some("qcow2"), img)["virtual-size"]
                            .as_u64()
                            .unwrap();
                    assert!(
                        vconvert_testkit::allocated_bytes(&ours) >= grown,
                        "{what}: the new space is reserved on disk"
                    );
                }
            }
        }
    }
}

/// An image with internal snapshots s1 and s2 (data written between and after them),
/// made by qemu with `opts` and, when `backed`, over a longer backing file.
fn with_snapshots(q: &Qemu, dir: &Path, name: &str, opts: &str, backed: bool) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let base = dir.join(format!("{name}.base.raw"));
    if backed {
        Layout::random(16 << 20, 6, 77).write_raw(&base);
        args.extend(["-b", s(&base), "-F", "raw"]);
    }
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&path), "4M"]);
    q.img(&args);
    let w = |cmds: &[&str]| {
        q.io(
            "qcow2",
            &path,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    w(&["write -P 1 0 1M", "write -P 2 3M 1M", "write -z 1M 64k"]);
    q.img(&["snapshot", "-c", "s1", s(&path)]);
    w(&["write -P 3 512k 1M", "write -P 4 4032k 64k"]);
    q.img(&["snapshot", "-c", "s2", s(&path)]);
    w(&["write -P 5 0 64k", "write -z 3M 128k"]);
    path
}

#[test]
fn resize_with_internal_snapshots_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let images = [
        with_snapshots(&q, d, "plain.qcow2", "", false),
        with_snapshots(&q, d, "small.qcow2", "cluster_size=512", false),
        with_snapshots(&q, d, "ext.qcow2", "extended_l2=on", false),
        with_snapshots(&q, d, "over.qcow2", "", true),
    ];
    // Growing (in the L1 table, past it, with preallocation, over the longer backing
    // file) and shrinking (cutting L2 tables the snapshots share, dropping whole ones).
    let steps: &[&[&str]] = &[
        &["+3M"],
        &["40M"],
        &["--preallocation=full", "+1M"],
        &["--shrink", "3000k"],
        &["--shrink", "1M", "--shrink", "9M"],
        // The last cluster, partial, holds data the snapshots share: copied on growth.
        &["--shrink", "3300k", "--shrink", "+1M"],
        &["--shrink", "3300k", "--preallocation=metadata", "+1M"],
    ];
    for img in &images {
        // Each snapshot's content, as qemu-img applies it on the original.
        for step in steps {
            let what = format!("{} {step:?}", img.display());
            let ours = img.with_extension("ours");
            let theirs = img.with_extension("theirs");
            std::fs::copy(img, &ours).unwrap();
            std::fs::copy(img, &theirs).unwrap();
            let shrunk = img.with_extension("shrunk");
            for args in step.chunks(2) {
                let (flag, size) = if args.len() == 2 {
                    (args[0], args[1])
                } else {
                    ("--shrink", args[0])
                };
                std::fs::copy(&theirs, &shrunk).unwrap();
                ok(&["resize", "-q", "-f", "qcow2", flag, s(&ours), size]);
                q.img(&["resize", "-q", "-f", "qcow2", flag, s(&theirs), size]);
            }
            let (code, text) = q.check("qcow2", &ours);
            assert_eq!(code, 0, "{what}: qemu-img check: {text}");
            if step.contains(&"3300k") {
                // Growing past a partial last cluster: qemu-img (without a backing
                // file) lets the bytes the shrink cut off read again; we give zeros
                // there (compare pads the shorter image with zeros).
                q.assert_same("qcow2", &ours, "qcow2", &shrunk);
                let size = |p: &Path| q.info_json(Some("qcow2"), p)["virtual-size"].clone();
                assert_eq!(size(&ours), size(&theirs), "{what}: size");
            } else {
                q.assert_same("qcow2", &ours, "qcow2", &theirs);
            }
            let list =
                |p: &Path| String::from_utf8(q.img(&["snapshot", "-l", s(p)]).stdout).unwrap();
            assert_eq!(list(&ours), list(&theirs), "{what}: snapshot -l");
            assert_eq!(list(&ours), list(img), "{what}: snapshot -l before");
            for snap in ["s1", "s2"] {
                let want = img.with_extension("want");
                std::fs::copy(img, &want).unwrap();
                q.img(&["snapshot", "-a", snap, s(&want)]);
                // Applied by us (resizing back to the snapshot's size) and by qemu-img.
                let a = img.with_extension("applied");
                std::fs::copy(&ours, &a).unwrap();
                ok(&["snapshot", "-a", snap, s(&a)]);
                let (code, text) = q.check("qcow2", &a);
                assert_eq!(code, 0, "{what}: check after applying {snap}: {text}");
                q.assert_same("qcow2", &a, "qcow2", &want);
                std::fs::copy(&ours, &a).unwrap();
                q.img(&["snapshot", "-a", snap, s(&a)]);
                q.assert_same("qcow2", &a, "qcow2", &want);
            }
        }
    }
    // compat=0.10 images with snapshots are refused both ways, as qemu-img refuses.
    let v2 = with_snapshots(&q, d, "v2.qcow2", "compat=0.10", false);
    let before = std::fs::read(&v2).unwrap();
    for args in [&["+1M"][..], &["--shrink", "1M"]] {
        let mut all = vec!["resize", s(&v2)];
        all.splice(1..1, args[..args.len() - 1].iter().copied());
        all.push(args[args.len() - 1]);
        let err = fails(&all);
        assert!(
            err.contains("Can't resize a v2 image which has snapshots"),
            "{err}"
        );
        assert_ne!(q.img_status(&["resize", "-q", "--shrink", s(&v2), "+0"]), 0);
    }
    assert_eq!(std::fs::read(&v2).unwrap(), before);
}

#[test]
fn resize_refuses_what_qemu_img_refuses() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for fmt in ["vdi", "vmdk", "vpc"] {
        let img = dir.path().join(format!("x.{fmt}"));
        q.img(&["create", "-q", "-f", fmt, s(&img), "4M"]);
        let err = fails(&["resize", "-f", fmt, s(&img), "+1M"]);
        assert!(
            err.contains("Image format driver does not support resize"),
            "{err}"
        );
    }
    let img = dir.path().join("x.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let before = std::fs::read(&img).unwrap();
    let err = fails(&["resize", s(&img), "1M"]);
    assert!(err.contains("Use the --shrink option"), "{err}");
    let err = fails(&["resize", "--shrink", s(&img), "-4M"]);
    assert!(err.contains("New image size must be positive"), "{err}");
    let err = fails(&["resize", s(&img), "5000000"]);
    assert!(err.contains("multiple of 512"), "{err}");
    for shrink in [&["--shrink"][..], &[]] {
        let mut args = vec!["resize", "--preallocation=full"];
        args.extend(shrink);
        args.extend([s(&img), "1M"]);
        let err = fails(&args);
        assert!(
            err.contains("Preallocation can only be used for growing images"),
            "{err}"
        );
    }
    let err = fails(&["resize", "--preallocation=bad", s(&img), "+1M"]);
    assert!(err.contains("Invalid preallocation mode 'bad'"), "{err}");
    let raw = dir.path().join("x.raw");
    std::fs::write(&raw, [0u8; 512]).unwrap();
    let err = fails(&[
        "resize",
        "-f",
        "raw",
        "--preallocation=metadata",
        s(&raw),
        "+1M",
    ]);
    assert!(
        err.contains("Unsupported preallocation mode: metadata"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "refusals write nothing"
    );
}

/// Runs our resize with `VCONVERT_FAIL_POINT=point`; the process must stop there.
fn crash_at(point: &str, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_vconvert"))
        .args(args)
        .env("VCONVERT_FAIL_POINT", point)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.status.code().is_none(),
        "{point}: the process should have stopped at the fail point: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_crash_at_any_step_leaves_a_consistent_image() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    // (image, resize argument, fail points it passes).
    let small = build_qcow2(&q, dir.path(), 2); // 512-byte clusters: the L1 table moves
    let plain = build_qcow2(&q, dir.path(), 0);
    let overlay = build_qcow2(&q, dir.path(), 9); // 512-byte clusters: new L2 tables
                                                  // Snapshots share the L2 table the new end cuts: it is copied.
    let snapped = with_snapshots(&q, dir.path(), "snapped.qcow2", "cluster_size=512", false);
    let cases: &[(&Path, &str, &[&str])] = &[
        (
            &snapped,
            "3530k",
            &[
                "qcow2-shrink-header",
                "qcow2-shrink-l2-copied",
                "qcow2-shrink-unmapped",
                "qcow2-shrink-released",
            ],
        ),
        (
            &small,
            "3M",
            &[
                "qcow2-grow-l1-written",
                "qcow2-grow-l1-counted",
                "qcow2-grow-header",
            ],
        ),
        (&plain, "2G", &["qcow2-grow-l1-zeroed"]),
        (&overlay, "3M", &["qcow2-grow-l2-counted"]),
        (
            &overlay,
            "40M",
            &["qcow2-refcount-block-written", "qcow2-grow-l1-counted"],
        ),
        (
            &plain,
            "3M",
            &[
                "qcow2-shrink-header",
                "qcow2-shrink-unmapped",
                "qcow2-shrink-released",
            ],
        ),
    ];
    // With preallocation: (image, size, --preallocation, fail points).
    let pre_cases: &[(&Path, &str, &str, &[&str])] = &[
        (
            &small,
            "4M",
            "--preallocation=full",
            &[
                "qcow2-refcount-block-written",
                "qcow2-grow-preallocated",
                "qcow2-grow-l2-counted",
                "qcow2-grow-l1-counted",
                "qcow2-grow-header",
            ],
        ),
        (
            &plain,
            "+3M",
            "--preallocation=metadata",
            &["qcow2-grow-preallocated"],
        ),
        // The refcount table moves to a larger one.
        (
            &small,
            "40M",
            "--preallocation=metadata",
            &[
                "qcow2-reftable-written",
                "qcow2-reftable-switched",
                "qcow2-grow-preallocated",
            ],
        ),
    ];
    let all = cases
        .iter()
        .map(|&(i, z, p)| (i, z, "--preallocation=off", p))
        .chain(pre_cases.iter().copied());
    for (img, size, prealloc, points) in all {
        // What qemu-img makes of the same resize.
        let after = img.with_extension("after");
        std::fs::copy(img, &after).unwrap();
        q.img(&["resize", "-q", "--shrink", prealloc, s(&after), size]);
        for point in points {
            let work = img.with_extension("crash");
            std::fs::copy(img, &work).unwrap();
            crash_at(point, &["resize", "--shrink", prealloc, s(&work), size]);
            let (code, text) = q.check("qcow2", &work);
            assert!(
                code == 0 || code == 3,
                "{point}: corrupt after the crash: {text}"
            );
            // Before or after: qemu-img compare pads the shorter image with zeros.
            let same_before = q.compare("qcow2", img, "qcow2", &work) == 0;
            let same_after = q.compare("qcow2", &after, "qcow2", &work) == 0;
            assert!(
                same_before || same_after,
                "{point}: reads neither as before nor after"
            );
            // Leaks, if any, are reclaimed by check -r leaks; then the image is clean.
            let _ = q.img_status(&["check", "-q", "-r", "leaks", s(&work)]);
            let (code, text) = q.check("qcow2", &work);
            assert_eq!(code, 0, "{point}: after check -r leaks: {text}");
            // And the interrupted resize can be done again.
            ok(&["resize", "-q", "--shrink", prealloc, s(&work), size]);
            q.assert_same("qcow2", &after, "qcow2", &work);
            assert_eq!(q.check("qcow2", &work).0, 0, "{point}: check after redoing");
        }
    }
}
