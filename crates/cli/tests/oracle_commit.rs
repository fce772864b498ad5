//! `vconvert commit` against the qemu-img oracle: chains made by qemu (qcow2 and raw
//! bases, compressed and zero clusters in the base, a top larger than its base, `-d`,
//! `-b` further down) committed by both programs on copies give bases that compare
//! equal and pass `qemu-img check`, and tops that read the same; a crash at any step
//! (fail points) leaves the chain reading as before and every image consistent.

mod common;

use common::{ok, s};

use std::path::{Path, PathBuf};
use std::process::Command;

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

/// Makes in `dir`: base (format `bfmt`, options), mid.qcow2 over it, top.qcow2 over mid.
fn chain(q: &Qemu, dir: &Path, bfmt: &str, bopts: &str) -> [PathBuf; 3] {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join(format!("base.{bfmt}"));
    let plain = dir.join("plain.raw");
    Layout::random(6 << 20, 6, 90).write_raw(&plain);
    let mut a = vec!["convert", "-f", "raw", "-O", bfmt];
    if bopts == "-c" {
        a.push("-c");
    } else if !bopts.is_empty() {
        a.extend(["-o", bopts]);
    }
    a.extend([s(&plain), s(&base)]);
    q.img(&a);
    if bfmt == "qcow2" && bopts != "-c" {
        q.io("qcow2", &base, &["write -z 2M 128k".into()]);
    }
    let mid = dir.join("mid.qcow2");
    let bname = format!("base.{bfmt}");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &bname,
        "-F",
        bfmt,
        s(&mid),
        "7M",
    ]);
    q.io(
        "qcow2",
        &mid,
        &[
            "write -P 0x11 1M 200k".into(),
            "write -z 4M 64k".into(),
            "write -P 3 6M 100k".into(),
        ],
    );
    let top = dir.join("top.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    q.io(
        "qcow2",
        &top,
        &[
            "write -P 0x22 1100k 64k".into(),
            "write -P 0x33 2M 64k".into(),
            "discard 5M 64k".into(),
        ],
    );
    std::fs::remove_file(&plain).unwrap();
    [base, mid, top]
}

#[test]
fn commit_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let cases: &[(&str, &str, &[&str], usize)] = &[
        // (base format, base options, commit args, image committed: 1 mid, 2 top)
        ("qcow2", "", &[], 2),
        ("qcow2", "-c", &[], 1),
        ("qcow2", "compat=0.10", &["-d"], 2),
        ("qcow2", "cluster_size=4k", &[], 1),
        ("raw", "", &[], 1),
        ("qcow2", "", &["-b", "base"], 2),
    ];
    for (n, &(bfmt, bopts, args, which)) in cases.iter().enumerate() {
        let what = format!("{bfmt} {bopts:?} commit {args:?} of image {which}");
        let ours = chain(&q, &dir.path().join(format!("ours{n}")), bfmt, bopts);
        let theirs = chain(&q, &dir.path().join(format!("theirs{n}")), bfmt, bopts);
        let before = dir.path().join(format!("before{n}.raw"));
        q.img(&["convert", "-O", "raw", s(&ours[2]), s(&before)]);
        let run = |imgs: &[PathBuf; 3]| {
            let mut a: Vec<String> = vec!["commit".into()];
            for x in args.iter() {
                a.push(if *x == "base" {
                    imgs[0].display().to_string()
                } else {
                    x.to_string()
                });
            }
            a.push(imgs[which].display().to_string());
            a
        };
        let mine = run(&ours);
        ok(&mine.iter().map(String::as_str).collect::<Vec<_>>());
        let mut qa = run(&theirs);
        qa.insert(1, "-q".into());
        q.img(&qa);
        let below = if args.contains(&"-b") { 0 } else { which - 1 };
        let bf = if below == 0 { bfmt } else { "qcow2" };
        q.assert_same(bf, &ours[below], bf, &theirs[below]);
        for img in &ours {
            if img.extension().is_some_and(|e| e == "qcow2") {
                let (code, text) = q.check("qcow2", img);
                assert_eq!(code, 0, "{what}: check {}: {text}", img.display());
            }
        }
        q.assert_same("qcow2", &ours[which], "qcow2", &theirs[which]);
        if !args.contains(&"-b") {
            // The chain through the committed image still reads as before.
            q.assert_same("raw", &before, "qcow2", &ours[2]);
        }
    }
}

#[test]
fn a_crash_during_commit_leaves_the_chain_as_it_was() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for (n, point) in ["commit-copying", "commit-copied", "qcow2-emptied"]
        .iter()
        .enumerate()
    {
        let imgs = chain(&q, &dir.path().join(format!("c{n}")), "qcow2", "");
        let before = dir.path().join(format!("before{n}.raw"));
        q.img(&["convert", "-O", "raw", s(&imgs[2]), s(&before)]);
        let out = Command::new(env!("CARGO_BIN_EXE_vconvert"))
            .args(["commit", s(&imgs[2])])
            .env("VCONVERT_FAIL_POINT", point)
            .output()
            .unwrap();
        assert!(
            out.status.code().is_none(),
            "{point}: the fail point stops the process"
        );
        for img in &imgs {
            let (code, text) = q.check("qcow2", img);
            assert!(code == 0 || code == 3, "{point}: {}: {text}", img.display());
        }
        q.assert_same("raw", &before, "qcow2", &imgs[2]);
        // Done again, the commit completes and the top reads the same.
        ok(&["commit", s(&imgs[2])]);
        q.assert_same("raw", &before, "qcow2", &imgs[2]);
        let _ = q.img_status(&["check", "-q", "-r", "leaks", s(&imgs[1])]);
        assert_eq!(
            q.check("qcow2", &imgs[1]).0,
            0,
            "{point}: base after redoing"
        );
    }
}
