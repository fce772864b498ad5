//! `vconvert snapshot` against the qemu-img oracle: on copies of qemu-made qcow2
//! variants, the same sequence of snapshot creations, guest writes, applies and
//! deletions by both programs gives images that compare equal (current state and every
//! snapshot's content), pass `qemu-img check`, and list the same snapshots (`-l`,
//! qemu-img's table, dates aside).

mod common;

use common::{fails, ok, s};

use std::path::Path;

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

const VARIANTS: &[&str] = &[
    "",
    "compat=0.10",
    "cluster_size=4k,refcount_bits=4",
    "refcount_bits=64",
    "extended_l2=on",
    "cluster_size=512",
];

/// The listing without the DATE column (the snapshots were made at other moments).
fn listing(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 7 && f[0].chars().all(|c| c.is_ascii_digit()) {
                f.drain(4..6); // the date and time
            }
            f.join(" ")
        })
        .collect()
}

fn snapshot_contents(q: &Qemu, img: &Path, name: &str) -> Vec<u8> {
    let out = img.with_extension(format!("{name}.raw"));
    let l = format!("snapshot.name={name}");
    q.img(&[
        "convert",
        "-f",
        "qcow2",
        "-l",
        &l,
        "-O",
        "raw",
        s(img),
        s(&out),
    ]);
    std::fs::read(&out).unwrap()
}

#[test]
fn snapshots_match_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for (i, opts) in VARIANTS.iter().enumerate() {
        let src = dir.path().join(format!("v{i}.qcow2"));
        q.build(
            &Layout::random(6 << 20, 6, 60 + i as u64),
            "qcow2",
            opts,
            &src,
        );
        let ours = dir.path().join(format!("ours{i}.qcow2"));
        let theirs = dir.path().join(format!("theirs{i}.qcow2"));
        std::fs::copy(&src, &ours).unwrap();
        std::fs::copy(&src, &theirs).unwrap();
        let writes = |n: u8| {
            vec![
                format!("write -P {n} {}k 100k", 64 * u64::from(n)),
                format!("write -z {}k 64k", 1024 + 128 * u64::from(n)),
                format!("discard {}k 64k", 3072 + 64 * u64::from(n)),
            ]
        };
        // (program args after "snapshot", guest writes after it)
        let steps: &[(&[&str], Option<u8>)] = &[
            (&["-c", "first"], Some(1)),
            (&["-c", "second"], Some(2)),
            (&["-c", "third"], None),
            (&["-a", "first"], Some(3)),
            (&["-d", "second"], None),
            (&["-a", "3"], Some(4)),
            (&["-c", "fourth"], None),
            (&["-d", "first"], None),
        ];
        for (args, write) in steps {
            let what = format!("{opts:?} snapshot {args:?}");
            let mut a = vec!["snapshot"];
            a.extend(args.iter());
            let mut mine = a.clone();
            mine.push(s(&ours));
            ok(&mine);
            let mut qa = a.clone();
            qa.push(s(&theirs));
            q.img(&qa);
            let (code, text) = q.check("qcow2", &ours);
            assert_eq!(code, 0, "{what}: qemu-img check: {text}");
            q.assert_same("qcow2", &ours, "qcow2", &theirs);
            assert_eq!(
                listing(&ok(&["snapshot", "-l", s(&ours)]).stdout),
                listing(&q.img(&["snapshot", "-l", s(&theirs)]).stdout),
                "{what}: snapshot -l"
            );
            // Our listing of qemu's image is qemu's, byte for byte.
            assert_eq!(
                String::from_utf8_lossy(&ok(&["snapshot", "-l", s(&theirs)]).stdout),
                String::from_utf8_lossy(&q.img(&["snapshot", "-l", s(&theirs)]).stdout),
            );
            if let Some(n) = write {
                q.io("qcow2", &ours, &writes(*n));
                q.io("qcow2", &theirs, &writes(*n));
            }
        }
        for name in ["third", "fourth"] {
            assert_eq!(
                snapshot_contents(&q, &ours, name),
                snapshot_contents(&q, &theirs, name),
                "{opts:?}: snapshot {name}"
            );
        }
    }
}

#[test]
fn snapshot_refusals() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("x.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let err = fails(&["snapshot", "-a", "nope", s(&img)]);
    assert!(err.contains("Could not apply snapshot 'nope'"), "{err}");
    let err = fails(&["snapshot", "-d", "nope", s(&img)]);
    assert!(err.contains("Could not delete snapshot 'nope'"), "{err}");
    let raw = dir.path().join("x.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let err = fails(&["snapshot", "-f", "raw", "-c", "s", s(&raw)]);
    assert!(err.contains("Could not create snapshot 's'"), "{err}");
    // Nothing to list: nothing printed.
    assert!(ok(&["snapshot", "-l", s(&img)]).stdout.is_empty());
}
