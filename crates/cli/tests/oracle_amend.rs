//! `vconvert amend` against the qemu-img oracle: compat and lazy_refcounts changed on
//! copies of qemu-made images by both programs give images that compare equal, pass
//! `qemu-img check` and show the same format-specific info; what we refuse leaves
//! the image untouched.

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
    let err = fails(&["amend", "-o", "compat=0.10", s(&img)]);
    assert!(err.contains("zero clusters"), "{err}");
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
