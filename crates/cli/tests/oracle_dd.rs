//! `vconvert dd` against `qemu-img dd`: the same operands on qemu-made sources give
//! outputs that compare equal and have the same virtual size.

mod common;

use common::{fails, ok, s};

use vconvert_testkit::{qemu, tempdir, Layout};

#[test]
fn dd_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let layout = Layout::random((5 << 20) + 1536, 8, 99);
    let raw = d.join("src.raw");
    q.build(&layout, "raw", "", &raw);
    let qcow = d.join("src.qcow2");
    q.build(&layout, "qcow2", "", &qcow);
    let cases: &[(&str, &str, &[&str])] = &[
        ("raw", "raw", &["bs=64k", "count=10", "skip=2"]),
        ("raw", "raw", &["bs=1M", "skip=3"]),
        ("raw", "raw", &["bs=1M", "count=100"]),
        ("raw", "raw", &["bs=512", "skip=7", "count=3000"]),
        ("raw", "qcow2", &["bs=4k", "skip=100"]),
        ("qcow2", "raw", &["bs=64k", "skip=3", "count=50"]),
        ("qcow2", "vdi", &["bs=1k", "skip=1"]),
        ("qcow2", "qcow2", &[]),
    ];
    for (i, (ifmt, ofmt, ops)) in cases.iter().enumerate() {
        let src = if *ifmt == "raw" { &raw } else { &qcow };
        let ours = d.join(format!("ours{i}.{ofmt}"));
        let theirs = d.join(format!("theirs{i}.{ofmt}"));
        let iff = format!("if={}", src.display());
        let run = |out: &std::path::Path| {
            let mut a = vec![
                "dd".to_string(),
                "-f".into(),
                ifmt.to_string(),
                "-O".into(),
                ofmt.to_string(),
            ];
            a.extend(ops.iter().map(|x| x.to_string()));
            a.push(iff.clone());
            a.push(format!("of={}", out.display()));
            a
        };
        ok(&run(&ours).iter().map(String::as_str).collect::<Vec<_>>());
        q.img(&run(&theirs));
        q.assert_same(ofmt, &ours, ofmt, &theirs);
        let size = |p| q.info_json(Some(ofmt), p)["virtual-size"].clone();
        assert_eq!(size(&ours), size(&theirs), "dd {ops:?}");
    }
    let out = d.join("x.raw");
    let err = fails(&[
        "dd",
        "bs=1M",
        "skip=100",
        &format!("if={}", s(&raw)),
        &format!("of={}", s(&out)),
    ]);
    assert!(err.contains("cannot skip to specified offset"), "{err}");
    assert!(!out.exists());
    let err = fails(&["dd", &format!("if={}", s(&raw))]);
    assert!(
        err.contains("Must specify both input and output files"),
        "{err}"
    );
}
