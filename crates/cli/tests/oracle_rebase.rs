//! `vconvert rebase` against the qemu-img oracle: on copies of a qemu-made chain,
//! safe rebases (onto another backing file, onto none, onto an unrelated file) and
//! unsafe ones give images that compare equal to qemu-img's (and, safe, to the image
//! before), pass `qemu-img check` and name the same backing file; a crash before the
//! header switch leaves the image reading as before. Images with extended L2 entries
//! (subclusters partly allocated, as data or zeros) are rebased safely too, and images
//! with internal snapshots are rebased (and committed into) as qemu-img does.

mod common;

use common::{fails, ok, s};

use std::process::Command;

use vconvert_testkit::{qemu, tempdir, Layout};

#[test]
fn rebase_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.raw");
    Layout::random(8 << 20, 6, 80).write_raw(&base);
    let other = d.join("other.raw");
    Layout::random(6 << 20, 6, 81).write_raw(&other);
    std::fs::create_dir(d.join("sub")).unwrap();
    let mid = d.join("sub/mid.qcow2");
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
        &["write -P 0x5a 1M 300k".into(), "write -z 3M 1M".into()],
    );
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=4k",
        "extended_l2=on",
        "extended_l2=on,cluster_size=128k",
    ] {
        let top = d.join("top.qcow2");
        let mut a = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
        ];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.push(s(&top));
        q.img(&a);
        q.io(
            "qcow2",
            &top,
            &[
                "write -P 0xa5 2M 64k".into(),
                "discard 1M 64k".into(),
                // Clusters partly written (with extended L2 entries: some subclusters
                // allocated, data or zeros, the rest read from the backing file).
                "write -P 0xb6 5M 6k".into(),
                "write -z 5132k 8k".into(),
                "write -z 6152k 12k".into(),
                "write -P 0xc7 7180k 4k".into(),
            ],
        );
        let cases: &[&[&str]] = &[
            &["-b", "base.raw", "-F", "raw"],
            &["-b", ""],
            &["-b", "other.raw", "-F", "raw"],
            &["-u", "-b", "sub/mid.qcow2", "-F", "qcow2"],
            &["-u", "-b", "other.raw", "-F", "raw"],
        ];
        for args in cases {
            let what = format!("{opts:?} rebase {args:?}");
            let ours = d.join("ours.qcow2");
            let theirs = d.join("theirs.qcow2");
            std::fs::copy(&top, &ours).unwrap();
            std::fs::copy(&top, &theirs).unwrap();
            let mut mine = vec!["rebase"];
            mine.extend(args.iter());
            mine.push(s(&ours));
            ok(&mine);
            let mut qa = vec!["rebase"];
            qa.extend(args.iter());
            qa.push(s(&theirs));
            q.img(&qa);
            assert_eq!(q.check("qcow2", &ours).0, 0, "{what}: check");
            q.assert_same("qcow2", &ours, "qcow2", &theirs);
            if !args.contains(&"-u") {
                q.assert_same("qcow2", &ours, "qcow2", &top);
            }
            let info = |p| {
                let v = q.info_json(Some("qcow2"), p);
                (
                    v["backing-filename"].clone(),
                    v["backing-filename-format"].clone(),
                )
            };
            assert_eq!(info(&ours), info(&theirs), "{what}: backing file");
        }
        // A crash after the copies, before the header switch: the image reads as before.
        let work = d.join("crash.qcow2");
        std::fs::copy(&top, &work).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_vconvert"))
            .args(["rebase", "-b", "other.raw", "-F", "raw", s(&work)])
            .env("VCONVERT_FAIL_POINT", "qcow2-rebase-copied")
            .output()
            .unwrap();
        assert!(
            out.status.code().is_none(),
            "the fail point stops the process"
        );
        let (code, text) = q.check("qcow2", &work);
        assert!(code == 0 || code == 3, "after the crash: {text}");
        q.assert_same("qcow2", &work, "qcow2", &top);
        assert_eq!(
            q.info_json(Some("qcow2"), &work)["backing-filename"],
            "sub/mid.qcow2"
        );
    }
    let top = d.join("top.qcow2");
    let err = fails(&["rebase", "-b", "base.raw", s(&top)]);
    assert!(err.contains("backing format must be specified"), "{err}");
    let err = fails(&["rebase", "-b", "nope.raw", "-F", "raw", s(&top)]);
    assert!(err.contains("Could not open new backing file"), "{err}");
}

/// Images with internal snapshots: the L2 tables the write must change are shared
/// with the snapshots, so the active state gets copies. A safe rebase of an overlay
/// with snapshots, and a commit into a base with snapshots, give what qemu-img gives
/// (active state and every snapshot applied), check-clean.
#[test]
fn rebase_and_commit_with_internal_snapshots_match_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let old = d.join("old.raw");
    Layout::random(4 << 20, 6, 83).write_raw(&old);
    let new = d.join("new.raw");
    Layout::random(4 << 20, 6, 84).write_raw(&new);
    let io = |p: &std::path::Path, cmds: &[&str]| {
        q.io(
            "qcow2",
            p,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    let snapshots_read_the_same = |a: &std::path::Path, b: &std::path::Path, what: &str| {
        for snap in ["s1", "s2"] {
            let (x, y) = (d.join("x.qcow2"), d.join("y.qcow2"));
            std::fs::copy(a, &x).unwrap();
            std::fs::copy(b, &y).unwrap();
            q.img(&["snapshot", "-a", snap, s(&x)]);
            q.img(&["snapshot", "-a", snap, s(&y)]);
            q.assert_same("qcow2", &x, "qcow2", &y);
            assert_eq!(q.check("qcow2", &x).0, 0, "{what}: {snap} applied");
        }
    };
    for opts in ["cluster_size=4k", "extended_l2=on"] {
        let what = format!("rebase {opts}");
        let top = d.join("top.qcow2");
        q.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "old.raw",
            "-F",
            "raw",
            s(&top),
        ]);
        io(&top, &["write -P 1 0 64k", "write -P 2 1M 6k"]);
        q.img(&["snapshot", "-c", "s1", s(&top)]);
        io(&top, &["write -P 3 2M 64k"]);
        q.img(&["snapshot", "-c", "s2", s(&top)]);
        let (ours, theirs) = (d.join("ours.qcow2"), d.join("theirs.qcow2"));
        std::fs::copy(&top, &ours).unwrap();
        std::fs::copy(&top, &theirs).unwrap();
        ok(&["rebase", "-b", "new.raw", "-F", "raw", s(&ours)]);
        q.img(&["rebase", "-b", "new.raw", "-F", "raw", s(&theirs)]);
        let (code, text) = q.check("qcow2", &ours);
        assert_eq!(code, 0, "{what}: check: {text}");
        q.assert_same("qcow2", &ours, "qcow2", &theirs);
        q.assert_same("qcow2", &ours, "qcow2", &top);
        snapshots_read_the_same(&ours, &theirs, &what);
    }
    // Commit into a base whose snapshots share its tables.
    let base = d.join("base.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&base),
        "4M",
    ]);
    io(&base, &["write -P 1 0 1M", "write -P 2 3M 64k"]);
    q.img(&["snapshot", "-c", "s1", s(&base)]);
    io(&base, &["write -P 3 512k 8k"]);
    q.img(&["snapshot", "-c", "s2", s(&base)]);
    let over = d.join("over.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&over),
    ]);
    io(
        &over,
        &["write -P 4 4k 8k", "write -P 5 3M 4k", "write -P 6 2M 4k"],
    );
    let ours = d.join("c-ours");
    let theirs = d.join("c-theirs");
    for (dst, vconvert) in [(&ours, true), (&theirs, false)] {
        std::fs::create_dir_all(dst).unwrap();
        std::fs::copy(&base, dst.join("base.qcow2")).unwrap();
        std::fs::copy(&over, dst.join("over.qcow2")).unwrap();
        let o = dst.join("over.qcow2");
        if vconvert {
            ok(&["commit", "-q", s(&o)]);
        } else {
            q.img(&["commit", "-q", s(&o)]);
        }
    }
    let (a, b) = (ours.join("base.qcow2"), theirs.join("base.qcow2"));
    let (code, text) = q.check("qcow2", &a);
    assert_eq!(code, 0, "commit: check: {text}");
    q.assert_same("qcow2", &a, "qcow2", &b);
    q.assert_same("qcow2", &a, "qcow2", &over);
    snapshots_read_the_same(&a, &b, "commit");
}
