//! `vconvert map` against `qemu-img map`: the JSON (parsed) and the human output of
//! qemu-made images of every format and variant, of backing chains (depth, zeros past
//! a short backing image, relative names), and of ranges (`--start-offset`,
//! `--max-length`).

mod common;

use common::{ok, s, vconvert};

use std::path::{Path, PathBuf};

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

/// Images qemu makes: (format, -o options, with `-c` first to compress, size).
const SOURCES: &[(&str, &str, u64)] = &[
    ("raw", "", 9 << 20),
    ("raw", "", (7 << 20) + 3584),
    ("vdi", "", 9 << 20),
    ("vdi", "static=on", 6 << 20),
    ("vpc", "", 9 << 20),
    ("vpc", "subformat=fixed", 5 << 20),
    ("vpc", "force_size=on", (7 << 20) + 3584),
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
    ("qcow2", "extended_l2=on,cluster_size=16k", 5 << 20),
    ("qcow2", "preallocation=metadata", 6 << 20),
    ("qcow2", "preallocation=falloc", 3 << 20),
    ("qcow2", "-c", 9 << 20),
    ("qcow2", "-c,compression_type=zstd", 6 << 20),
    ("vmdk", "", 9 << 20),
    ("vmdk", "subformat=monolithicFlat", 5 << 20),
    ("vmdk", "subformat=twoGbMaxExtentSparse", (7 << 20) + 3584),
    ("vmdk", "subformat=streamOptimized", 9 << 20),
    ("vmdk", "zeroed_grain=on", 6 << 20),
];

fn build(q: &Qemu, dir: &Path, i: usize) -> PathBuf {
    let (fmt, opts, size) = SOURCES[i];
    let path = dir.join(format!("img{i}.{fmt}"));
    let layout = Layout::random(size, 8, 300 + i as u64);
    let (compress, opts) = match opts.strip_prefix("-c") {
        Some(rest) => (true, rest.trim_start_matches(',')),
        None => (false, opts),
    };
    if compress || opts.contains("streamOptimized") {
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
    } else {
        q.build(&layout, fmt, opts, &path);
    }
    path
}

/// `map ARGS` by both programs: JSON compared parsed, human output compared as text
/// (when qemu-img succeeds: compressed clusters make it fail, and us with it).
fn assert_same_map(q: &Qemu, args: &[&str], what: &str) {
    let mut json_args = vec!["map", "--output=json"];
    json_args.extend(args);
    let theirs: serde_json::Value =
        serde_json::from_slice(&q.img(&json_args).stdout).expect("qemu-img map JSON");
    let ours: serde_json::Value =
        serde_json::from_slice(&ok(&json_args).stdout).expect("vconvert map JSON");
    assert_eq!(ours, theirs, "{what}: map --output=json {args:?}");

    let mut human_args = vec!["map"];
    human_args.extend(args);
    let theirs = std::process::Command::new("qemu-img")
        .args(&human_args)
        .output()
        .unwrap();
    let ours = vconvert(&human_args);
    assert_eq!(
        ours.status.success(),
        theirs.status.success(),
        "{what}: map {args:?} exit status"
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "{what}: map {args:?}"
    );
}

#[test]
fn map_of_every_variant_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for (i, source) in SOURCES.iter().enumerate() {
        let path = build(&q, dir.path(), i);
        let what = format!("{source:?}");
        let fmt = source.0;
        assert_same_map(&q, &["-f", fmt, s(&path)], &what);
        assert_same_map(
            &q,
            &[
                "-f",
                fmt,
                "--start-offset",
                "1000k",
                "--max-length",
                "3M",
                s(&path),
            ],
            &what,
        );
    }
}

#[test]
fn map_of_backing_chains_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    Layout::random(8 << 20, 6, 7).write_raw(&base);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mid = dir.path().join("sub/mid.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base.raw",
        "-F",
        "raw",
        s(&mid),
        "10M",
    ]);
    q.io(
        "qcow2",
        &mid,
        &[
            "write -P 0x5a 1M 300k".into(),
            "write -z 3M 1M".into(),
            "write -P 7 5M 8k".into(),
            "write -z 5M 4k".into(),
        ],
    );
    // A top image larger than its backing image: zeros past the backing's end.
    let top = dir.path().join("top.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "12M",
    ]);
    q.io(
        "qcow2",
        &top,
        &[
            "write -P 0xa5 2M 64k".into(),
            "discard 1M 64k".into(),
            "write -P 1 11M 4k".into(),
        ],
    );
    let ext = dir.path().join("ext.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        s(&mid),
        "-F",
        "qcow2",
        s(&ext),
    ]);
    q.io(
        "qcow2",
        &ext,
        &["write -P 5 68k 4k".into(), "write -z 200k 8k".into()],
    );
    // A VMDK chain.
    let vbase = dir.path().join("vbase.vmdk");
    q.build(&Layout::random(6 << 20, 5, 8), "vmdk", "", &vbase);
    let vtop = dir.path().join("vtop.vmdk");
    q.img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        s(&vbase),
        "-F",
        "vmdk",
        s(&vtop),
    ]);
    q.io("vmdk", &vtop, &["write -P 3 1M 100k".into()]);
    for img in [&top, &mid, &ext, &vtop] {
        assert_same_map(&q, &[s(img)], &img.display().to_string());
        assert_same_map(
            &q,
            &["--start-offset", "900k", "--max-length", "5M", s(img)],
            &img.display().to_string(),
        );
    }
    // Relative to the working directory, as qemu-img names the files.
    let rel = |args: &[&str]| {
        let run = |prog: &str| {
            std::process::Command::new(prog)
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap()
                .stdout
        };
        assert_eq!(
            String::from_utf8_lossy(&run(env!("CARGO_BIN_EXE_vconvert"))),
            String::from_utf8_lossy(&run("qemu-img"))
        );
    };
    rel(&["map", "top.qcow2"]);
    rel(&["map", "--output=json", "top.qcow2"]);
}
