//! Overlays against the qemu-img oracle: `create -b/-F` (and `-o backing_file=…,
//! backing_fmt=…`) and `convert -B`, for qcow2 variants. The images must pass
//! `qemu-img check`, read the same as qemu-img's through qemu-img (`compare`), show the
//! same backing chain in `qemu-img info --backing-chain`, take writes from qemu-io, and
//! (`convert -B`) allocate what qemu-img's allocate.

mod common;

use common::{fails, ok, s};

use std::path::Path;

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

/// `qemu-img info --backing-chain --output=json`, each image's keys that do not name
/// the image itself.
fn chain(q: &Qemu, img: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(
        &q.img(&["info", "--backing-chain", "--output=json", s(img)])
            .stdout,
    )
    .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let keys = [
                "virtual-size",
                "format",
                "backing-filename",
                "backing-filename-format",
                "cluster-size",
            ];
            let mut m = serde_json::Map::new();
            for k in keys {
                if let Some(x) = node.get(k) {
                    m.insert(k.into(), x.clone());
                }
            }
            // Below the top image the nodes are the same files.
            if i > 0 {
                m.insert("filename".into(), node["filename"].clone());
                m.insert(
                    "full-backing-filename".into(),
                    node["full-backing-filename"].clone(),
                );
            }
            serde_json::Value::Object(m)
        })
        .collect()
}

/// A chain made by qemu: base.raw <- sub/mid.qcow2 <- (tests build on it).
fn make_chain(q: &Qemu, dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    Layout::random(8 << 20, 6, 11).write_raw(&base);
    std::fs::create_dir(dir.join("sub")).unwrap();
    let mid = dir.join("sub/mid.qcow2");
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
            "write -P 7 9M 100k".into(),
        ],
    );
    mid
}

#[test]
fn create_with_a_backing_file_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let mid = make_chain(&q, d);
    // (create args before the file, size, where): relative names resolve against the
    // new image's directory; the size defaults to the backing file's.
    let cases: &[(&[&str], Option<&str>, &str)] = &[
        (&["-b", "sub/mid.qcow2", "-F", "qcow2"], None, "a.qcow2"),
        (&["-b", "mid.qcow2", "-F", "qcow2"], None, "sub/b.qcow2"),
        (
            &["-b", "../base.raw", "-F", "raw"],
            Some("12M"),
            "sub/c.qcow2",
        ),
        (
            &[
                "-o",
                "backing_file=sub/mid.qcow2,backing_fmt=qcow2,compat=0.10",
            ],
            None,
            "d.qcow2",
        ),
        (
            &[
                "-o",
                "extended_l2=on,cluster_size=128k",
                "-b",
                s(&mid),
                "-F",
                "qcow2",
            ],
            Some("6M"),
            "e.qcow2",
        ),
        (
            &["-o", "cluster_size=512", "-b", "base.raw", "-F", "raw"],
            None,
            "f.qcow2",
        ),
    ];
    for (i, (args, size, name)) in cases.iter().enumerate() {
        let ours = d.join(name);
        let theirs = d.join(format!("theirs{i}.qcow2"));
        let theirs = if name.starts_with("sub/") {
            d.join(format!("sub/theirs{i}.qcow2"))
        } else {
            theirs
        };
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        a.extend(args.iter());
        let mut ours_args = a.clone();
        ours_args.push(s(&ours));
        let mut theirs_args = a.clone();
        theirs_args.push(s(&theirs));
        if let Some(sz) = size {
            ours_args.push(sz);
            theirs_args.push(sz);
        }
        ok(&ours_args);
        q.img(&theirs_args);
        let what = format!("create {args:?} {name}");
        assert_eq!(q.check("qcow2", &ours).0, 0, "{what}: qemu-img check");
        q.assert_same("qcow2", &ours, "qcow2", &theirs);
        assert_eq!(
            chain(&q, &ours),
            chain(&q, &theirs),
            "{what}: backing chain"
        );
        // qemu writes into our overlay; it still reads like qemu's after the same write.
        for img in [&ours, &theirs] {
            q.io("qcow2", img, &["write -P 0x33 1536k 70k".into()]);
        }
        q.assert_same("qcow2", &ours, "qcow2", &theirs);
        assert_eq!(q.check("qcow2", &ours).0, 0, "{what}: check after a write");
    }
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    make_chain(&q, d);
    let new = d.join("x.qcow2");
    let err = fails(&["create", "-f", "qcow2", "-b", "sub/mid.qcow2", s(&new)]);
    assert!(
        err.contains("Backing file specified without backing format"),
        "{err}"
    );
    assert!(err.contains("Detected format of qcow2"), "{err}");
    let err = fails(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "nope.qcow2",
        "-F",
        "qcow2",
        s(&new),
    ]);
    assert!(err.contains("Could not open backing image"), "{err}");
    let err = fails(&[
        "create",
        "-f",
        "raw",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        s(&new),
    ]);
    assert!(
        err.contains("Backing file not supported for file format 'raw'"),
        "{err}"
    );
    let err = fails(&[
        "create",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "nope",
        "-F",
        "raw",
        s(&new),
    ]);
    assert!(
        err.contains("Image creation needs a size parameter"),
        "{err}"
    );
    assert!(!new.exists());
    // -u with a size: the backing file is not opened.
    ok(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "nope",
        "-F",
        "raw",
        s(&new),
        "1M",
    ]);
    let info = q.info_json(Some("qcow2"), &new);
    assert_eq!(info["backing-filename"], "nope");
}

#[test]
fn convert_with_a_backing_file_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let mid = make_chain(&q, d);
    // A top image larger than its backing image, with data, zeros and discards.
    let top = d.join("top.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&mid),
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
            "write -P 0xa6 2100k 3k".into(),
            "discard 1M 64k".into(),
            "write -z 5M 200k".into(),
            "write -P 1 11M 4k".into(),
        ],
    );
    let flat = d.join("flat.raw");
    Layout::random(10 << 20, 6, 12).write_raw(&flat);
    for (src, sfmt) in [(&top, "qcow2"), (&flat, "raw")] {
        for opts in ["", "compat=0.10", "extended_l2=on", "cluster_size=4k"] {
            let what = format!("convert -B of {} with '{opts}'", src.display());
            let ours = d.join("ours.qcow2");
            let theirs = d.join("theirs.qcow2");
            let mut a = vec![
                "convert",
                "-f",
                sfmt,
                "-O",
                "qcow2",
                "-B",
                s(&mid),
                "-F",
                "qcow2",
            ];
            if !opts.is_empty() {
                a.extend(["-o", opts]);
            }
            let mut ours_args = a.clone();
            ours_args.extend([s(src), s(&ours)]);
            let mut theirs_args = a.clone();
            theirs_args.extend([s(src), s(&theirs)]);
            ok(&ours_args);
            q.img(&theirs_args);
            assert_eq!(q.check("qcow2", &ours).0, 0, "{what}: qemu-img check");
            q.assert_same(sfmt, src, "qcow2", &ours);
            q.assert_same("qcow2", &theirs, "qcow2", &ours);
            assert_eq!(
                chain(&q, &ours),
                chain(&q, &theirs),
                "{what}: backing chain"
            );
            // The same ranges are left to the backing file (host offsets aside).
            let map = |p: &Path| -> Vec<(u64, u64, bool, u64)> {
                let v: serde_json::Value =
                    serde_json::from_slice(&q.img(&["map", "--output=json", s(p)]).stdout).unwrap();
                let mut out: Vec<(u64, u64, bool, u64)> = Vec::new();
                for e in v.as_array().unwrap() {
                    let (start, len) =
                        (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                    let (present, depth) = (
                        e["present"].as_bool().unwrap(),
                        e["depth"].as_u64().unwrap(),
                    );
                    match out.last_mut() {
                        Some(l) if l.2 == present && l.3 == depth => l.1 += len,
                        _ => out.push((start, len, present, depth)),
                    }
                }
                out
            };
            if !opts.contains("extended_l2") {
                assert_eq!(map(&ours), map(&theirs), "{what}: allocation");
            }
            std::fs::remove_file(&ours).unwrap();
            std::fs::remove_file(&theirs).unwrap();
        }
    }
}
