//! VMDK differencing disks against the qemu-img oracle: `create -f vmdk -b PARENT -F
//! vmdk` and `convert -O vmdk -B PARENT -F vmdk` give what qemu-img gives (the parent
//! named by `parentFileNameHint` and its CID in `parentCID`, the size defaulting to the
//! parent's, the same grains allocated), pass `qemu-img check`, read the same through
//! qemu-img and take qemu-io's writes; qemu-img's refusals (a parent that is not vmdk,
//! flat layouts) are ours, and leave no file.

mod common;

use common::{fails, ok, s};

use std::path::{Path, PathBuf};

use vconvert_testkit::{qemu, tempdir, Qemu};

/// A qemu-made parent `sub/base.vmdk` (10 MiB, data at 0 and 6M).
fn make_base(q: &Qemu, dir: &Path) -> PathBuf {
    std::fs::create_dir(dir.join("sub")).unwrap();
    let base = dir.join("sub/base.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", s(&base), "10M"]);
    q.io(
        "vmdk",
        &base,
        &["write -P 0x11 0 1M".into(), "write -P 0x12 6M 300k".into()],
    );
    base
}

/// `qemu-img info --output=json` fields that describe the overlay, not its name.
fn summary(q: &Qemu, img: &Path) -> serde_json::Value {
    let v = q.info_json(Some("vmdk"), img);
    serde_json::json!({
        "virtual-size": v["virtual-size"],
        "backing-filename": v["backing-filename"],
        "full-backing-filename": v["full-backing-filename"],
        "parent-cid": v["format-specific"]["data"]["parent-cid"],
        "create-type": v["format-specific"]["data"]["create-type"],
    })
}

/// `qemu-img map --output=json` with host offsets and file names left out.
fn allocation(q: &Qemu, img: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&q.img(&["map", "--output=json", s(img)]).stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let m = e.as_object_mut().unwrap();
            m.remove("offset");
            m.remove("filename");
            e
        })
        .collect()
}

#[test]
fn create_vmdk_over_a_parent_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let base = make_base(&q, d);
    let base_cid = q.info_json(Some("vmdk"), &base)["format-specific"]["data"]["cid"].clone();
    assert!(base_cid.is_u64(), "{base_cid}");
    // (create options, size, where the overlay goes, its parent's name from there)
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        ("", None, "a.vmdk", "sub/base.vmdk"),
        ("", Some("20M"), "sub/b.vmdk", "base.vmdk"),
        (
            "subformat=twoGbMaxExtentSparse",
            None,
            "c.vmdk",
            "sub/base.vmdk",
        ),
        ("subformat=streamOptimized", None, "d.vmdk", "sub/base.vmdk"),
        (
            "zeroed_grain=on,adapter_type=lsilogic",
            None,
            "e.vmdk",
            "sub/base.vmdk",
        ),
    ];
    for (i, (opts, size, name, parent)) in cases.iter().enumerate() {
        let ours = d.join(name);
        let theirs = ours.with_file_name(format!("theirs{i}.vmdk"));
        let mut a = vec!["create", "-q", "-f", "vmdk", "-b", parent, "-F", "vmdk"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        let with = |img: &Path| {
            let mut v: Vec<String> = a.iter().map(|x| x.to_string()).collect();
            v.push(s(img).into());
            v.extend(size.map(String::from));
            v
        };
        let ours_args = with(&ours);
        ok(&ours_args.iter().map(String::as_str).collect::<Vec<_>>());
        q.img(&with(&theirs));
        let what = format!("create -b {parent} -o '{opts}' {name}");
        assert_eq!(q.check("vmdk", &ours).0, 0, "{what}: qemu-img check");
        q.assert_same("vmdk", &ours, "vmdk", &theirs);
        let mut want = summary(&q, &theirs);
        let got = summary(&q, &ours);
        assert_eq!(got["parent-cid"], base_cid, "{what}: parentCID");
        // qemu names its own file in the full backing name only through the hint.
        want["full-backing-filename"] = got["full-backing-filename"].clone();
        assert_eq!(got, want, "{what}: info");
        assert_eq!(
            std::fs::canonicalize(got["full-backing-filename"].as_str().unwrap()).unwrap(),
            std::fs::canonicalize(&base).unwrap(),
            "{what}: the parent"
        );
        if !opts.contains("streamOptimized") {
            // qemu writes into our overlay as into its own.
            for img in [&ours, &theirs] {
                q.io("vmdk", img, &["write -P 0x33 600k 70k".into()]);
            }
            q.assert_same("vmdk", &ours, "vmdk", &theirs);
            assert_eq!(q.check("vmdk", &ours).0, 0, "{what}: check after a write");
            assert_eq!(allocation(&q, &ours), allocation(&q, &theirs), "{what}");
        }
    }
}

#[test]
fn create_vmdk_over_a_parent_refuses_what_qemu_img_refuses() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    make_base(&q, d);
    let raw = d.join("sub/r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let new = d.join("x.vmdk");
    let n = s(&new);
    let cases: &[(&[&str], &str)] = &[
        (
            &["-b", "sub/base.vmdk"],
            "Backing file specified without backing format",
        ),
        (
            &["-b", "sub/r.raw", "-F", "raw"],
            "backing_file must be a vmdk image",
        ),
        (
            &["-b", "sub/base.vmdk", "-F", "raw"],
            "backing_file must be a vmdk image",
        ),
        (
            &[
                "-b",
                "sub/base.vmdk",
                "-F",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
            ],
            "Flat image can't have backing file",
        ),
        (
            &["-b", "sub/r.raw", "-F", "vmdk"],
            "Could not open backing image",
        ),
        // The parent is opened even with -u (its CID is recorded), as qemu does.
        (
            &["-u", "-b", "nope.vmdk", "-F", "vmdk"],
            "Could not open 'nope.vmdk'",
        ),
    ];
    for (args, msg) in cases {
        let mut a = vec!["create", "-f", "vmdk"];
        a.extend(args.iter());
        a.extend([n, "10M"]);
        let err = fails(&a);
        assert!(err.contains(msg), "{args:?}: {err}");
        let mut theirs = vec!["create".to_string(), "-f".into(), "vmdk".into()];
        theirs.extend(args.iter().map(|x| x.to_string()));
        theirs.extend([s(&d.join("t.vmdk")).to_string(), "10M".into()]);
        assert_ne!(q.img_status(&theirs), 0, "qemu-img accepts {args:?}");
        let _ = std::fs::remove_file(d.join("t.vmdk"));
        assert!(!new.exists(), "{args:?} left {n}");
    }
}

#[test]
fn convert_to_vmdk_over_a_parent_matches_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let d = dir.path();
    let base = make_base(&q, d);
    // A vmdk child and a qcow2 overlay of the same parent: data, a partial grain,
    // explicit zeros (over the parent's data too), zeros written as data.
    let writes: Vec<String> = [
        "write -P 0x22 512k 100k",
        "write -z 6M 128k",
        "write -P 0 3M 64k",
        "write -P 0x23 9M 4k",
    ]
    .map(String::from)
    .to_vec();
    let child = d.join("child.vmdk");
    q.img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "sub/base.vmdk",
        "-F",
        "vmdk",
        s(&child),
    ]);
    q.io("vmdk", &child, &writes);
    let over = d.join("over.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sub/base.vmdk",
        "-F",
        "vmdk",
        s(&over),
    ]);
    q.io("qcow2", &over, &writes);
    for (src, sfmt) in [(&child, "vmdk"), (&over, "qcow2")] {
        for opts in [
            "",
            "subformat=streamOptimized",
            "subformat=twoGbMaxExtentSparse",
            "zeroed_grain=on",
        ] {
            let what = format!("convert -B of {} with '{opts}'", src.display());
            let ours = d.join("ours.vmdk");
            let theirs = d.join("theirs.vmdk");
            let mut a = vec![
                "convert",
                "-f",
                sfmt,
                "-O",
                "vmdk",
                "-B",
                s(&base),
                "-F",
                "vmdk",
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
            assert_eq!(q.check("vmdk", &ours).0, 0, "{what}: qemu-img check");
            q.assert_same(sfmt, src, "vmdk", &ours);
            q.assert_same("vmdk", &theirs, "vmdk", &ours);
            assert_eq!(summary(&q, &ours), summary(&q, &theirs), "{what}: info");
            // The same grains are stored, the same left to the parent.
            assert_eq!(
                allocation(&q, &ours),
                allocation(&q, &theirs),
                "{what}: allocation"
            );
            for f in [&ours, &theirs] {
                for e in vconvert_testkit::dir_entries(d) {
                    let n = e.file_name().unwrap().to_string_lossy().into_owned();
                    let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
                    if n.starts_with(&stem) {
                        std::fs::remove_file(e).unwrap();
                    }
                }
            }
        }
    }
    // A parent of another format is refused, as qemu-img refuses it.
    let raw = d.join("flat.raw");
    std::fs::write(&raw, vec![0u8; 10 << 20]).unwrap();
    let out = d.join("bad.vmdk");
    let err = fails(&[
        "convert",
        "-O",
        "vmdk",
        "-B",
        s(&raw),
        "-F",
        "raw",
        s(&child),
        s(&out),
    ]);
    assert!(err.contains("backing_file must be a vmdk image"), "{err}");
    assert!(!out.exists());
}
