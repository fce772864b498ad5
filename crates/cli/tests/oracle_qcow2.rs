//! qcow2 specifics against the qemu-img oracle: backing chains (relative names, loops,
//! depth), external data files, the corrupt bit, unknown and encrypted features,
//! snapshots in `info`, `check` of leaks, and compressed output (deterministic across
//! thread counts, about the size of qemu-img's).

mod common;

use common::{fails, json, ok, s, vconvert};

use std::path::Path;
use std::process::Command;

use vconvert_testkit::{dir_entries, qemu, tempdir, write_compressible_raw, Layout};

#[test]
fn backing_chains_flatten_like_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    Layout::random(8 << 20, 6, 1).write_raw(&base);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mid = dir.path().join("sub/mid.qcow2");
    // Relative backing names resolve against the overlay's directory.
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
    ]);
    q.io(
        "qcow2",
        &mid,
        &["write -P 0x5a 1M 300k".into(), "write -z 3M 1M".into()],
    );
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
    ]);
    q.io(
        "qcow2",
        &top,
        &["write -P 0xa5 2M 64k".into(), "discard 1M 64k".into()],
    );
    for (fmt, opts) in [("raw", ""), ("qcow2", ""), ("vdi", "")] {
        let out = dir.path().join(format!("flat.{fmt}"));
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&top), s(&out)]);
        ok(&args);
        q.assert_same("qcow2", &top, fmt, &out);
    }
    // info --backing-chain, key by key with qemu-img.
    let ours = json(&ok(&["info", "--backing-chain", "--output=json", s(&top)]));
    let theirs: serde_json::Value = serde_json::from_slice(
        &q.img(&["info", "--backing-chain", "--output=json", s(&top)])
            .stdout,
    )
    .unwrap();
    assert_eq!(ours, theirs);
    // Untrusted: the backing file is refused before any output exists.
    let out = dir.path().join("refused.raw");
    let err = fails(&["convert", "--untrusted", "-O", "raw", s(&top), s(&out)]);
    assert!(err.contains("backing"), "{err}");
    assert!(!out.exists());
}

#[test]
fn backing_loops_and_deep_chains_are_refused() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
    ]);
    q.img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    let err = fails(&["convert", "-O", "raw", s(&b), s(&dir.path().join("x.raw"))]);
    assert!(err.contains("loop"), "{err}");
    let mut prev = dir.path().join("c0.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&prev), "1M"]);
    for i in 1..=20 {
        let next = dir.path().join(format!("c{i}.qcow2"));
        let name = format!("c{}.qcow2", i - 1);
        q.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &name,
            "-F",
            "qcow2",
            s(&next),
        ]);
        prev = next;
    }
    let err = fails(&["info", s(&prev)]);
    assert!(err.contains("deeper than 16"), "{err}");
}

#[test]
fn external_data_files_are_read_when_trusted_only() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    for raw in ["off", "on"] {
        let img = dir.path().join(format!("df-{raw}.qcow2"));
        let data = dir.path().join(format!("df-{raw}.data"));
        q.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw={raw}", s(&data)),
            s(&img),
            "8M",
        ]);
        q.io(
            "qcow2",
            &img,
            &["write -P 0x33 0 1M".into(), "write -P 0x44 5M 64k".into()],
        );
        let out = dir.path().join(format!("df-{raw}.raw"));
        ok(&["convert", "-O", "raw", s(&img), s(&out)]);
        q.assert_same("qcow2", &img, "raw", &out);
        let ours = json(&ok(&["info", "--output=json", s(&img)]));
        assert_eq!(ours, q.info_json(None, &img));
        let refused = dir.path().join(format!("refused-{raw}.raw"));
        let err = fails(&["convert", "--untrusted", "-O", "raw", s(&img), s(&refused)]);
        assert!(err.contains("df-"), "{err}");
        assert!(!refused.exists());
    }
}

/// Sets incompatible feature `bit` in the header of `path`.
fn set_incompatible_bit(path: &Path, bit: u32) {
    let mut b = std::fs::read(path).unwrap();
    let mut f = u64::from_be_bytes(b[72..80].try_into().unwrap());
    f |= 1 << bit;
    b[72..80].copy_from_slice(&f.to_be_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn corrupt_unknown_and_encrypted_images_are_refused_by_name() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    q.build(&Layout::random(4 << 20, 3, 2), "qcow2", "", &img);
    set_incompatible_bit(&img, 1);
    // info shows it like qemu-img; convert refuses unless -U.
    assert_eq!(
        json(&ok(&["info", "--output=json", s(&img)])),
        q.info_json(None, &img)
    );
    let out = dir.path().join("c.raw");
    let err = fails(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert!(err.contains("corrupt bit"), "{err}");
    assert!(!out.exists());
    ok(&["convert", "-U", "-O", "raw", s(&img), s(&out)]);
    q.assert_same("qcow2", &img, "raw", &out);

    // An incompatible feature we do not know, named from the feature name table.
    let unk = dir.path().join("u.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&unk), "1M"]);
    set_incompatible_bit(&unk, 5);
    let err = fails(&["info", s(&unk)]);
    assert!(
        err.contains("incompatible feature") && err.contains("bit 5"),
        "{err}"
    );

    let enc = dir.path().join("e.qcow2");
    q.img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&enc),
        "1M",
    ]);
    let err = fails(&[
        "convert",
        "-O",
        "raw",
        s(&enc),
        s(&dir.path().join("e.raw")),
    ]);
    assert!(err.contains("encrypted"), "{err}");
}

#[test]
fn snapshots_are_listed_like_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("s.qcow2");
    q.build(&Layout::random(4 << 20, 3, 3), "qcow2", "", &img);
    q.img(&["snapshot", "-c", "first", s(&img)]);
    q.io("qcow2", &img, &["write -P 0x77 0 1M".into()]);
    q.img(&["snapshot", "-c", "second one", s(&img)]);
    assert_eq!(
        json(&ok(&["info", "--output=json", s(&img)])),
        q.info_json(None, &img)
    );
    let ours = String::from_utf8(ok(&["info", s(&img)]).stdout).unwrap();
    let theirs = String::from_utf8(q.img(&["info", s(&img)]).stdout).unwrap();
    assert_eq!(ours, theirs);
    // Snapshots share clusters: check must count them as qemu does.
    let ours = json(&vconvert(&["check", "--output=json", s(&img)]));
    let theirs: serde_json::Value =
        serde_json::from_slice(&q.img(&["check", "--output=json", s(&img)]).stdout).unwrap();
    assert_eq!(ours, theirs);
}

/// `qemu-img check --output=json`, whatever its exit code.
fn qemu_check_json(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn check_finds_leaks_and_corruptions_like_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("leak.qcow2");
    q.build(&Layout::random(4 << 20, 3, 4), "qcow2", "", &img);
    // Leak: one more cluster at the end with refcount 1 and nothing using it.
    let mut b = std::fs::read(&img).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(b[rt..rt + 8].try_into().unwrap()) as usize;
    let clusters = b.len().div_ceil(65536);
    b.resize(clusters * 65536 + 65536, 0);
    b[block + 2 * clusters..block + 2 * clusters + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let ours = vconvert(&["check", "--output=json", s(&img)]);
    assert_eq!(ours.status.code(), Some(3));
    assert_eq!(json(&ours), qemu_check_json(&img));
    // Repair: both tools fix the leak the same way.
    let (mine, theirs) = (
        dir.path().join("mine.qcow2"),
        dir.path().join("theirs.qcow2"),
    );
    std::fs::copy(&img, &mine).unwrap();
    std::fs::copy(&img, &theirs).unwrap();
    let fixed = vconvert(&["check", "-r", "leaks", "--output=json", s(&mine)]);
    assert_eq!(fixed.status.code(), Some(0));
    let qfixed = Command::new("qemu-img")
        .args(["check", "-r", "leaks", "--output=json", s(&theirs)])
        .output()
        .unwrap();
    let mut ja = json(&fixed);
    let mut jb: serde_json::Value = serde_json::from_slice(&qfixed.stdout).unwrap();
    ja.as_object_mut().unwrap().remove("filename");
    jb.as_object_mut().unwrap().remove("filename");
    assert_eq!(ja, jb);
    assert_eq!(q.check("qcow2", &mine).0, 0);
    // Corruption: a data cluster's refcount dropped to 0.
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (0..8192)
        .map(|i| u64::from_be_bytes(b[l2 + 8 * i..l2 + 8 * i + 8].try_into().unwrap()))
        .find(|e| e & 0x00ff_ffff_ffff_fe00 != 0)
        .unwrap()
        & 0x00ff_ffff_ffff_fe00;
    let idx = block + 2 * (data as usize / 65536);
    b[idx..idx + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let ours = vconvert(&["check", "--output=json", s(&img)]);
    assert_eq!(ours.status.code(), Some(2));
    assert_eq!(q.check("qcow2", &img).0, 2);
    assert_eq!(
        json(&ours)["corruptions"],
        qemu_check_json(&img)["corruptions"]
    );
}

#[test]
fn compressed_output_is_deterministic_and_as_small_as_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let src = dir.path().join("text.raw");
    write_compressible_raw(&src, 48 << 20, 11);
    for opts in ["compression_type=zlib", "compression_type=zstd"] {
        let mut outs = Vec::new();
        for m in ["1", "2", "4"] {
            let out = dir.path().join(format!("c{m}.qcow2"));
            ok(&[
                "convert",
                "-c",
                "-m",
                m,
                "-O",
                "qcow2",
                "-o",
                opts,
                s(&src),
                s(&out),
            ]);
            outs.push(std::fs::read(&out).unwrap());
        }
        assert!(
            outs.iter().all(|o| *o == outs[0]),
            "{opts}: output depends on threads"
        );
        let ours = dir.path().join("c1.qcow2");
        q.assert_same("raw", &src, "qcow2", &ours);
        assert_eq!(q.check("qcow2", &ours).0, 0);
        let theirs = dir.path().join("q.qcow2");
        q.img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&src),
            s(&theirs),
        ]);
        let (a, b) = (
            outs[0].len() as f64,
            std::fs::metadata(&theirs).unwrap().len() as f64,
        );
        assert!(a <= b * 1.02, "{opts}: ours {a} bytes, qemu-img's {b}");
        for e in dir_entries(dir.path()) {
            if e.extension().is_some_and(|x| x == "qcow2") {
                std::fs::remove_file(e).unwrap();
            }
        }
    }
}

/// Our deflate (libdeflate) uses deflate's whole 32 KiB window, qemu's only 4 KiB; qemu
/// inflates a whole cluster in one call, so matches further back than 4 KiB inside the
/// cluster must read back in qemu-img. Clusters made of one 8 KiB block repeated only
/// shrink that much with such matches.
#[test]
fn compressed_clusters_with_long_distance_matches_read_in_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let src = dir.path().join("repeats.raw");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut data = Vec::new();
    for _ in 0..64 {
        // 8 KiB of noise over 16 letters (4 KiB windows compress it to about half),
        // repeated 8 times per 64 KiB cluster.
        let block: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x >> 60) as u8
            })
            .collect();
        for _ in 0..8 {
            data.extend_from_slice(&block);
        }
    }
    std::fs::write(&src, &data).unwrap();
    let ours = dir.path().join("c.qcow2");
    ok(&["convert", "-c", "-O", "qcow2", s(&src), s(&ours)]);
    q.assert_same("raw", &src, "qcow2", &ours);
    assert_eq!(q.check("qcow2", &ours).0, 0);
    let theirs = dir.path().join("q.qcow2");
    q.img(&["convert", "-c", "-O", "qcow2", s(&src), s(&theirs)]);
    let (a, b) = (
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len(),
    );
    assert!(
        a * 3 < b,
        "long matches should make ours far smaller: ours {a} bytes, qemu-img's {b}"
    );
    // And back into a plain file through qemu-img's reader and through ours.
    let back = dir.path().join("back.raw");
    q.img(&["convert", "-f", "qcow2", "-O", "raw", s(&ours), s(&back)]);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    std::fs::remove_file(&back).unwrap();
    ok(&["convert", "-O", "raw", s(&ours), s(&back)]);
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

#[test]
fn persistent_bitmaps_are_listed_and_counted_like_qemu_img() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("bm.qcow2");
    q.build(&Layout::random(16 << 20, 4, 21), "qcow2", "", &img);
    q.img(&["bitmap", "--add", s(&img), "b0"]);
    q.img(&["bitmap", "--add", "-g", "128k", s(&img), "second"]);
    q.io("qcow2", &img, &["write -P 0x3c 2M 1M".into()]);
    assert_eq!(
        json(&ok(&["info", "--output=json", s(&img)])),
        q.info_json(None, &img)
    );
    let ours = String::from_utf8(ok(&["info", s(&img)]).stdout).unwrap();
    let theirs = String::from_utf8(q.img(&["info", s(&img)]).stdout).unwrap();
    assert_eq!(ours, theirs);
    // Bitmap tables and data are referenced: no leaks.
    assert_eq!(
        json(&ok(&["check", "--output=json", s(&img)])),
        qemu_check_json(&img)
    );
    let out = dir.path().join("bm.raw");
    ok(&["convert", "-O", "raw", s(&img), s(&out)]);
    q.assert_same("qcow2", &img, "raw", &out);
}

#[test]
fn convert_reads_an_internal_snapshot_with_l() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("snap.qcow2");
    q.build(&Layout::random(6 << 20, 4, 31), "qcow2", "", &img);
    q.img(&["snapshot", "-c", "before", s(&img)]);
    q.io(
        "qcow2",
        &img,
        &["write -P 0x99 0 2M".into(), "discard 3M 1M".into()],
    );
    for (arg, name) in [("before", "a"), ("snapshot.name=before", "b"), ("1", "c")] {
        let ours = dir.path().join(format!("{name}.raw"));
        let theirs = dir.path().join(format!("{name}-q.raw"));
        ok(&["convert", "-l", arg, "-O", "raw", s(&img), s(&ours)]);
        q.img(&["convert", "-l", arg, "-O", "raw", s(&img), s(&theirs)]);
        q.assert_same("raw", &ours, "raw", &theirs);
    }
    // The current state differs from the snapshot.
    let now = dir.path().join("now.raw");
    ok(&["convert", "-O", "raw", s(&img), s(&now)]);
    assert_ne!(q.compare("raw", &now, "raw", &dir.path().join("a.raw")), 0);
    let err = fails(&["convert", "-l", "nope", "-O", "raw", s(&img), s(&now)]);
    assert!(
        err.contains("no snapshot 'nope'") && err.contains("before"),
        "{err}"
    );
}

/// An L2 entry past the virtual size (left by a crash in the middle of a shrink) still
/// holds its cluster: `check` must not call it a leak, and `check -r leaks` must not
/// free it (qemu counts every entry of every table).
#[test]
fn clusters_named_past_the_virtual_size_are_not_leaks() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("shrunk.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    q.io(
        "qcow2",
        &img,
        &["write -P 0x11 0 64k".into(), "write -P 0x22 3M 64k".into()],
    );
    // Header field `size` (big-endian u64 at byte 24) set to 1 MiB, as a shrink that
    // stopped before freeing the clusters past the new end leaves it.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    assert_eq!(q.check("qcow2", &img).0, 0, "qemu-img sees no leak");
    let out = vconvert(&["check", "--output=json", s(&img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(json(&out)["leaks"].as_u64().unwrap_or(0), 0);
    ok(&["check", "-r", "leaks", s(&img)]);
    let (code, text) = q.check("qcow2", &img);
    assert_eq!(code, 0, "after vconvert check -r leaks: {text}");
}
