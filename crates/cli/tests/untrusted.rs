//! Every attack class an import service meets, against `--untrusted`: the hostile image
//! is built (with qemu-img where it can, by hand otherwise), then `convert --untrusted`
//! must fail cleanly (exit 1, the reason named) before creating any output, and
//! `info --untrusted` must refuse it too. The referenced host file holds a marker that
//! must never appear in any file we write.

mod common;

use common::{s, vconvert};

use std::path::{Path, PathBuf};

use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

const MARKER: &[u8] = b"HOST-SECRET-0123456789-";

/// A host file full of the marker.
fn secret(dir: &Path) -> PathBuf {
    let p = dir.join("secret.bin");
    std::fs::write(&p, MARKER.repeat((1 << 20) / MARKER.len() + 1)).unwrap();
    p
}

/// Asserts `convert --untrusted` and `info --untrusted` refuse `img` (declared `fmt`)
/// naming `reason`, with no output file and no marker anywhere new.
fn assert_refused(dir: &Path, img: &Path, fmt: Option<&str>, reason: &str) {
    let before: Vec<PathBuf> = vconvert_testkit::dir_entries(dir);
    let out = dir.join("out.raw");
    let mut args = vec!["convert", "--untrusted", "-O", "raw"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.extend([s(img), s(&out)]);
    let r = vconvert(&args);
    let err = String::from_utf8_lossy(&r.stderr).to_lowercase();
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}: convert: {err}",
        img.display()
    );
    assert!(
        err.contains(&reason.to_lowercase()),
        "{}: '{reason}' not in: {err}",
        img.display()
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "{}: output created", img.display());
    assert_eq!(vconvert_testkit::dir_entries(dir), before, "files appeared");
    let mut args = vec!["info", "--untrusted"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.push(s(img));
    let r = vconvert(&args);
    let err = String::from_utf8_lossy(&r.stderr).to_lowercase();
    assert_eq!(r.status.code(), Some(1), "{}: info: {err}", img.display());
    assert!(
        err.contains(&reason.to_lowercase()),
        "{}: info: '{reason}' not in: {err}",
        img.display()
    );
}

fn qcow2_with(q: &Qemu, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(extra);
    args.extend([s(&p), "4M"]);
    q.img(&args);
    p
}

#[test]
fn qcow2_references_and_flags_are_refused() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sec = secret(dir.path());
    let abs = sec.display().to_string();
    let img = qcow2_with(&q, dir.path(), "backing.qcow2", &["-b", &abs, "-F", "raw"]);
    assert_refused(dir.path(), &img, None, "backing");
    let json = format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{abs}"}}}}"#);
    let img = qcow2_with(
        &q,
        dir.path(),
        "json.qcow2",
        &["-u", "-b", &json, "-F", "raw"],
    );
    assert_refused(dir.path(), &img, None, "json:");
    let victim = dir.path().join("victim.bin");
    let img = qcow2_with(
        &q,
        dir.path(),
        "datafile.qcow2",
        &["-o", &format!("data_file={}", victim.display())],
    );
    std::fs::copy(&sec, &victim).unwrap();
    assert_refused(dir.path(), &img, None, "victim.bin");
    let img = qcow2_with(
        &q,
        dir.path(),
        "luks.qcow2",
        &[
            "--object",
            "secret,id=s0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
        ],
    );
    assert_refused(dir.path(), &img, None, "encrypted");
    let img = qcow2_with(&q, dir.path(), "corrupt.qcow2", &[]);
    let mut b = std::fs::read(&img).unwrap();
    b[79] |= 2;
    std::fs::write(&img, b).unwrap();
    assert_refused(dir.path(), &img, None, "corrupt bit");
    let img = dir.path().join("huge.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "100T"]);
    assert_refused(dir.path(), &img, None, "exceeds the limit");
}

#[test]
fn declared_format_must_be_the_content_and_only_one_format() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sec = secret(dir.path());
    let img = qcow2_with(
        &q,
        dir.path(),
        "raw-claim.img",
        &["-b", s(&sec), "-F", "raw"],
    );
    assert_refused(dir.path(), &img, Some("raw"), "qcow2");
    // A qcow2 header and an ISO 9660 volume descriptor in one file.
    let img = dir.path().join("iso.qcow2");
    q.img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let mut b = std::fs::read(&img).unwrap();
    b.resize(b.len().max(40000), 0);
    b[32769..32774].copy_from_slice(b"CD001");
    std::fs::write(&img, b).unwrap();
    assert_refused(dir.path(), &img, Some("qcow2"), "iso");
}

#[test]
fn vmdk_extents_outside_the_image_are_refused() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sec = secret(dir.path());
    for (name, create_type, path) in [
        ("abs.vmdk", "monolithicFlat", sec.display().to_string()),
        (
            "dotdot.vmdk",
            "streamOptimized",
            "../secret.bin".to_string(),
        ),
    ] {
        let sub = dir.path().join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let img = sub.join(name);
        std::fs::write(
            &img,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"{create_type}\"\n\nRW 2048 FLAT \"{path}\" 0\n\n\
                 ddb.virtualHWVersion = \"4\"\n"
            ),
        )
        .unwrap();
        assert_refused(&sub, &img, Some("vmdk"), "secret.bin");
    }
    // A sparse VMDK whose embedded descriptor names an extra extent.
    let img = dir.path().join("embedded.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", s(&img), "1M"]);
    let mut b = std::fs::read(&img).unwrap();
    let text = String::from_utf8_lossy(&b[512..512 + 20 * 512]).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("RW "))
        .unwrap()
        .to_string();
    let extra = format!("{line}\nRW 2048 FLAT \"{}\" 0", sec.display());
    let new = text.replacen(&line, &extra, 1);
    let new = new.trim_end_matches('\0').as_bytes();
    b[512..512 + new.len()].copy_from_slice(new);
    std::fs::write(&img, b).unwrap();
    assert_refused(dir.path(), &img, Some("vmdk"), "secret.bin");
    // A streamOptimized footer that disagrees with its header (capacity).
    let stream = dir.path().join("stream.vmdk");
    let mut b = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/disk-stream.vmdk"),
    )
    .unwrap();
    let foot = b.len() - 1024;
    assert_eq!(&b[foot..foot + 4], b"KDMV");
    let cap = u64::from_le_bytes(b[foot + 12..foot + 20].try_into().unwrap());
    b[foot + 12..foot + 20].copy_from_slice(&(cap * 2).to_le_bytes());
    std::fs::write(&stream, b).unwrap();
    assert_refused(dir.path(), &stream, Some("vmdk"), "disagrees");
    // An embedded descriptor with a line that is no descriptor syntax.
    let odd_line = dir.path().join("oddline.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", s(&odd_line), "1M"]);
    let mut b = std::fs::read(&odd_line).unwrap();
    let text = String::from_utf8_lossy(&b[512..512 + 20 * 512]).into_owned();
    let new = text.replacen(
        "# Extent description",
        "format c: /y\n# Extent description",
        1,
    );
    let new = new.trim_end_matches('\0').as_bytes();
    b[512..512 + new.len()].copy_from_slice(new);
    std::fs::write(&odd_line, b).unwrap();
    assert_refused(dir.path(), &odd_line, Some("vmdk"), "not a comment");
    // A flat VMDK made by qemu: its descriptor names its data file.
    let flat = dir.path().join("flat.vmdk");
    q.img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&flat),
        "1M",
    ]);
    assert_refused(dir.path(), &flat, Some("vmdk"), "refers to file");
    // A single-file sparse VMDK whose createType is outside the allow-list.
    let odd = dir.path().join("odd.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", s(&odd), "1M"]);
    let mut b = std::fs::read(&odd).unwrap();
    let text = String::from_utf8_lossy(&b[512..512 + 20 * 512]).into_owned();
    let new = text.replacen("monolithicSparse", "twoGbMaxExtentSparse", 1);
    let new = new.trim_end_matches('\0').as_bytes();
    b[512..512 + new.len()].copy_from_slice(new);
    std::fs::write(&odd, b).unwrap();
    assert_refused(dir.path(), &odd, Some("vmdk"), "createtype");
}

#[test]
fn vhd_and_vdi_parents_and_checksums_are_refused() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sec = secret(dir.path());
    // A differencing VHD whose parent name is the host file.
    let vhd = dir.path().join("diff.vhd");
    q.img(&["create", "-q", "-f", "vpc", s(&vhd), "4M"]);
    let mut b = std::fs::read(&vhd).unwrap();
    let fix_footer = |b: &mut Vec<u8>, at: usize| {
        b[at + 60..at + 64].copy_from_slice(&4u32.to_be_bytes());
        b[at + 64..at + 68].fill(0);
        let sum = !b[at..at + 512]
            .iter()
            .fold(0u32, |a, &x| a.wrapping_add(x.into()));
        b[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
    };
    let len = b.len();
    fix_footer(&mut b, 0);
    fix_footer(&mut b, len - 512);
    let name: Vec<u8> = sec
        .display()
        .to_string()
        .encode_utf16()
        .flat_map(|u| u.to_be_bytes())
        .collect();
    b[512 + 64..512 + 64 + name.len()].copy_from_slice(&name);
    b[512 + 36..512 + 40].fill(0);
    let sum = !b[512..1536]
        .iter()
        .fold(0u32, |a, &x| a.wrapping_add(x.into()));
    b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(&vhd, &b).unwrap();
    assert_refused(dir.path(), &vhd, None, "secret.bin");
    // A VHD whose footer checksum is wrong.
    let bad = dir.path().join("sum.vhd");
    q.img(&["create", "-q", "-f", "vpc", s(&bad), "4M"]);
    let mut b = std::fs::read(&bad).unwrap();
    b[64] ^= 1;
    std::fs::write(&bad, b).unwrap();
    assert_refused(dir.path(), &bad, None, "checksum");
    // A differencing VDI.
    let vdi = dir.path().join("diff.vdi");
    q.img(&["create", "-q", "-f", "vdi", s(&vdi), "4M"]);
    let mut b = std::fs::read(&vdi).unwrap();
    b[0x1b8..0x1c8].fill(7);
    std::fs::write(&vdi, b).unwrap();
    assert_refused(dir.path(), &vdi, None, "differencing");
}

#[test]
fn converted_output_is_inspected_again() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sec = secret(dir.path());
    // A legitimate qcow2 whose guest disk starts with a qcow2 header naming a host
    // file: converting it to raw would leave a trap for the next prober.
    let inner = qcow2_with(&q, dir.path(), "inner.qcow2", &["-b", s(&sec), "-F", "raw"]);
    let guest = dir.path().join("guest.raw");
    let mut disk = std::fs::read(&inner).unwrap();
    disk.resize(4 << 20, 0);
    std::fs::write(&guest, disk).unwrap();
    let outer = dir.path().join("outer.qcow2");
    q.img(&["convert", "-f", "raw", "-O", "qcow2", s(&guest), s(&outer)]);
    let out = dir.path().join("out.raw");
    let r = vconvert(&["convert", "--untrusted", "-O", "raw", s(&outer), s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("converted image was removed"), "{err}");
    assert!(!out.exists());
    // The same conversion to qcow2 is fine: a qcow2 file is unambiguous.
    let ok = dir.path().join("out.qcow2");
    let r = vconvert(&["convert", "--untrusted", "-O", "qcow2", s(&outer), s(&ok)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    q.assert_same("qcow2", &outer, "qcow2", &ok);
    let _ = Layout::random(1, 0, 0);
}

#[test]
fn hidden_vmdk_descriptor_and_qcow2_overlap_are_refused_before_any_output() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let sec = secret(dir.path());
    // The header points at a clean descriptor appended at the end; sector 1, where qemu
    // reads the parent, names the host file.
    let img = dir.path().join("two.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", s(&img), "1M"]);
    let mut b = std::fs::read(&img).unwrap();
    let text = String::from_utf8_lossy(&b[512..512 * 21])
        .trim_end_matches('\0')
        .to_string();
    let sector = (b.len() / 512) as u64;
    b[0x1c..0x24].copy_from_slice(&sector.to_le_bytes());
    let mut clean = text.clone().into_bytes();
    clean.resize(20 * 512, 0);
    b.extend(clean);
    let evil = text.replacen(
        "createType=",
        &format!("parentFileNameHint=\"{}\"\ncreateType=", sec.display()),
        1,
    );
    b[512..512 + evil.len()].copy_from_slice(evil.as_bytes());
    std::fs::write(&img, b).unwrap();
    assert_refused(
        dir.path(),
        &img,
        Some("vmdk"),
        "rule: VMDK parentFileNameHint",
    );
    assert_refused(dir.path(), &img, None, "rule: VMDK descriptor location");
    // A qcow2 L2 entry mapping guest cluster 0 onto the refcount table.
    let img = qcow2_with(&q, dir.path(), "overlap.qcow2", &[]);
    q.io("qcow2", &img, &["write -P 0xab 0 64k".to_string()]);
    let mut b = std::fs::read(&img).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l2 = (be(&b, be(&b, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let reftable = be(&b, 48) | 1 << 63;
    b[l2..l2 + 8].copy_from_slice(&reftable.to_be_bytes());
    std::fs::write(&img, b).unwrap();
    assert_refused(dir.path(), &img, Some("qcow2"), "rule: metadata overlap");
    // An ISO declared raw.
    let iso = dir.path().join("cd.iso");
    let mut b = vec![0u8; 1 << 20];
    b[0x8000] = 1;
    b[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(&iso, b).unwrap();
    assert_refused(dir.path(), &iso, Some("raw"), "declare it as iso");
    // Undeclared, it converts; copied to raw it is still an ISO, and accepted as one.
    let out = dir.path().join("cd.raw");
    let r = vconvert(&["convert", "--untrusted", "-O", "raw", s(&iso), s(&out)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&iso).unwrap());
    std::fs::remove_file(&out).unwrap();
    // A raw disk whose MBR defines no partition.
    let mbr = dir.path().join("mbr.raw");
    let mut b = vec![0u8; 1 << 20];
    b[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&mbr, b).unwrap();
    assert_refused(dir.path(), &mbr, Some("raw"), "rule: MBR partition entries");
}

#[test]
fn unclean_shutdown_vmdk_is_accepted_with_a_warning() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let img = dir.path().join("unclean.vmdk");
    q.img(&["create", "-q", "-f", "vmdk", s(&img), "1M"]);
    q.io("vmdk", &img, &["write -P 0x5a 0 64k".to_string()]);
    let mut b = std::fs::read(&img).unwrap();
    b[72] = 1;
    std::fs::write(&img, b).unwrap();
    let r = vconvert(&["info", "--untrusted", s(&img)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("uncleanShutdown"),
        "{err}"
    );
    let out = dir.path().join("out.raw");
    let r = vconvert(&["convert", "--untrusted", "-O", "raw", s(&img), s(&out)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    q.assert_same("vmdk", &img, "raw", &out);
}
