//! `vconvert amend` against the qemu-img oracle: compat and lazy_refcounts changed on
//! copies of qemu-made images by both programs give images that compare equal, pass
//! `qemu-img check` and show the same format-specific info; what we refuse leaves
//! the image untouched. Down to compat=0.10, zero clusters are expanded (with and
//! without a backing file, host clusters, snapshots) and a crash midway leaves a
//! version 3 image reading the same.

mod common;

use common::{fails, ok, s};

use vconvert_testkit::{qemu, tempdir, Layout};

#[test]
fn amend_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let layout = Layout::random(5 << 20, 6, 70);
    let plain = d.join("plain.raw");
    layout.write_raw(&plain);
    // Images without zero clusters (data only), so every change is possible, with and
    // without a backing file and snapshots.
    let v3 = d.join("v3.qcow2");
    q.img(&["convert", "-f", "raw", "-O", "qcow2", s(&plain), s(&v3)]);
    let v2 = d.join("v2.qcow2");
    q.img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&plain),
        s(&v2),
    ]);
    let over = d.join("over.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        s(&v2),
        "-F",
        "qcow2",
        s(&over),
    ]);
    q.io("qcow2", &over, &["write -P 9 1M 64k".into()]);
    let snap = d.join("snap.qcow2");
    std::fs::copy(&v3, &snap).unwrap();
    q.img(&["snapshot", "-c", "s1", s(&snap)]);
    for img in [&v3, &v2, &over, &snap] {
        for opts in [
            "compat=0.10",
            "compat=1.1",
            "lazy_refcounts=on",
            "compat=1.1,lazy_refcounts=on",
            "lazy_refcounts=off",
        ] {
            let what = format!("amend -o {opts} {}", img.display());
            let ours = d.join("ours.qcow2");
            let theirs = d.join("theirs.qcow2");
            std::fs::copy(img, &ours).unwrap();
            std::fs::copy(img, &theirs).unwrap();
            let qemu_ok = q.img_status(&["amend", "-o", opts, s(&theirs)]) == 0;
            let out = common::vconvert(&["amend", "-o", opts, s(&ours)]);
            assert_eq!(
                out.status.success(),
                qemu_ok,
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(q.check("qcow2", &ours).0, 0, "{what}: check");
            q.assert_same("qcow2", &ours, "qcow2", &theirs);
            let fs = |p| q.info_json(Some("qcow2"), p)["format-specific"].clone();
            assert_eq!(fs(&ours), fs(&theirs), "{what}: format-specific");
        }
    }
}

/// A copy of `img` amended to compat=0.10 by us and by qemu-img: ours is
/// check-clean, reads as `img` did (through its backing file, and in each snapshot
/// named), as qemu-img's does, and is version 2.
fn downgrade_both(
    q: &vconvert_testkit::Qemu,
    d: &std::path::Path,
    img: &std::path::Path,
    snaps: &[&str],
) {
    let what = format!("amend -o compat=0.10 {}", img.display());
    let ours = d.join("ours.qcow2");
    let theirs = d.join("theirs.qcow2");
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &theirs).unwrap();
    q.img(&["amend", "-o", "compat=0.10", s(&theirs)]);
    ok(&["amend", "-o", "compat=0.10", s(&ours)]);
    let (rc, report) = q.check("qcow2", &ours);
    assert_eq!(rc, 0, "{what}: check: {report}");
    q.assert_same("qcow2", &ours, "qcow2", img);
    q.assert_same("qcow2", &ours, "qcow2", &theirs);
    let info = q.info_json(Some("qcow2"), &ours);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10", "{what}");
    for snap in snaps {
        let flat = |from: &std::path::Path, to: &str| {
            let out = d.join(to);
            q.img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                "-l",
                &format!("snapshot.name={snap}"),
                s(from),
                s(&out),
            ]);
            out
        };
        let a = flat(img, "snap-before.raw");
        let b = flat(&ours, "snap-after.raw");
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{what}: snapshot {snap} reads differently"
        );
    }
}

#[test]
fn amend_to_0_10_expands_zero_clusters() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    // Zero clusters without a host cluster (`write -z -u` on data, `write -z` on
    // unallocated space) and with one (`write -z` over data keeps the cluster).
    let writes: Vec<String> = [
        "write -P 1 0 256k",
        "write -P 2 1M 128k",
        "write -z -u 64k 64k",
        "write -z 1M 64k",
        "write -z 2M 128k",
        "write -P 3 3M 64k",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let alone = d.join("alone.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&alone), "4M"]);
    q.io("qcow2", &alone, &writes);
    downgrade_both(&q, d, &alone, &[]);

    // Over a backing file whose data the zero clusters hide.
    let base = d.join("base.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    q.io("qcow2", &base, &["write -P 7 0 4M".into()]);
    let over = d.join("over.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&over),
    ]);
    q.io("qcow2", &over, &writes);
    downgrade_both(&q, d, &over, &[]);

    // Preallocated metadata: every cluster is a zero cluster with a host cluster.
    let pre = d.join("pre.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        s(&pre),
        "4M",
    ]);
    q.io("qcow2", &pre, &["write -P 5 512k 64k".into()]);
    downgrade_both(&q, d, &pre, &[]);

    // Snapshots sharing L2 tables and host clusters with the active layer, zeroed
    // after the snapshot (the snapshot still reads the data there).
    let snap = d.join("snap.qcow2");
    std::fs::copy(&over, &snap).unwrap();
    q.img(&["snapshot", "-c", "s1", s(&snap)]);
    q.io(
        "qcow2",
        &snap,
        &["write -z 0 64k".into(), "write -z 3M 64k".into()],
    );
    q.img(&["snapshot", "-c", "s2", s(&snap)]);
    downgrade_both(&q, d, &snap, &["s1", "s2"]);
    let pre_snap = d.join("pre-snap.qcow2");
    std::fs::copy(&pre, &pre_snap).unwrap();
    q.img(&["snapshot", "-c", "s1", s(&pre_snap)]);
    q.io("qcow2", &pre_snap, &["write -z 512k 64k".into()]);
    downgrade_both(&q, d, &pre_snap, &["s1"]);

    // A crash after the zeros are written, or after an L2 table is: a version 3 image
    // reading as before (leaks at worst), which the amend then finishes.
    for point in ["qcow2-amend-zeros-written", "qcow2-amend-l2-written"] {
        for img in [&over, &snap] {
            let work = d.join("crash.qcow2");
            std::fs::copy(img, &work).unwrap();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_vconvert"))
                .args(["amend", "-o", "compat=0.10", s(&work)])
                .env("VCONVERT_FAIL_POINT", point)
                .output()
                .unwrap();
            assert!(out.status.code().is_none(), "{point}: stopped there");
            let (code, text) = q.check("qcow2", &work);
            assert!(code == 0 || code == 3, "{point}: after the crash: {text}");
            q.assert_same("qcow2", &work, "qcow2", img);
            let info = q.info_json(Some("qcow2"), &work);
            assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{point}");
            ok(&["amend", "-o", "compat=0.10", s(&work)]);
            let _ = q.img_status(&["check", "-q", "-r", "leaks", s(&work)]);
            assert_eq!(q.check("qcow2", &work).0, 0, "{point}: check after redoing");
            q.assert_same("qcow2", &work, "qcow2", img);
        }
    }
}

#[test]
fn amend_refusals_leave_the_image_alone() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("z.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    q.io(
        "qcow2",
        &img,
        &["write -P 1 0 64k".into(), "write -z 64k 64k".into()],
    );
    let before = std::fs::read(&img).unwrap();
    let err = fails(&["amend", "-o", "compat=0.10,lazy_refcounts=on", s(&img)]);
    assert!(err.contains("Lazy refcounts only supported"), "{err}");
    let err = fails(&["amend", "-o", "cluster_size=4k", s(&img)]);
    assert!(err.contains("compat"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let raw = dir.path().join("x.raw");
    std::fs::write(&raw, [0u8; 512]).unwrap();
    let err = fails(&["amend", "-f", "raw", "-o", "compat=1.1", s(&raw)]);
    assert!(err.contains("does not support option amendment"), "{err}");
    ok(&["amend", "-o", "lazy_refcounts=on", s(&img)]);
}

/// An image whose L2 table names its refcount table as a zero cluster with a host
/// cluster (`qemu-img check` finds the overlap): every command that writes in place
/// refuses it before writing (amend would have written zeros over the refcount table).
#[test]
fn in_place_commands_refuse_corrupt_metadata() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    q.io("qcow2", &img, &["write -P 1 0 64k".into()]);
    let mut bytes = std::fs::read(&img).unwrap();
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let l1 = be(&bytes[40..48]) as usize;
    let l2 = (be(&bytes[l1..l1 + 8]) & 0x00ff_ffff_ffff_fe00) as usize;
    let reftable = be(&bytes[48..56]);
    let entry: u64 = (1 << 63) | reftable | 1;
    bytes[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    assert_eq!(q.check("qcow2", &img).0, 2, "qemu-img finds it corrupt");
    let base = dir.path().join("b.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    // (arguments before the file, after it).
    let cases: &[(&[&str], &[&str])] = &[
        (&["amend", "-o", "compat=0.10"], &[]),
        (&["resize"], &["+1M"]),
        (&["snapshot", "-c", "s1"], &[]),
        (&["rebase", "-b", "b.raw", "-F", "raw"], &[]),
    ];
    for (args, tail) in cases {
        let mut all = args.to_vec();
        all.push(s(&img));
        all.extend(tail.iter());
        let err = fails(&all);
        assert!(
            err.contains("corruption(s) in its metadata"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read(&img).unwrap(), bytes, "{args:?}: untouched");
    }
}
