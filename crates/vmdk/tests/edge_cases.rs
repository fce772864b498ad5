//! Hand-made and damaged images: descriptor syntax, extent types, references, footers,
//! corrupt tables. None of these may panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::{open, write_vmdk};
use vconvert_core::{
    Error, ExtentKind, Format, ImageFile, ImageReader, NoReferences, Resolver, Result, RunKind,
};
use vconvert_testkit::{qemu, read_all, tempdir, Rng};
use vconvert_vmdk::VmdkReader;

/// Files in memory, by path; records what was asked for.
#[derive(Default)]
struct Mem {
    files: HashMap<PathBuf, Vec<u8>>,
    asked: Mutex<Vec<PathBuf>>,
}

impl Resolver for Mem {
    fn open_image(
        &self,
        referrer: &ImageFile,
        path: &Path,
        _f: Option<Format>,
    ) -> Result<Box<dyn ImageReader>> {
        let f = self.open_file(referrer, path)?;
        Ok(Box::new(VmdkReader::open(f, self)?))
    }

    fn open_file(&self, referrer: &ImageFile, path: &Path) -> Result<ImageFile> {
        self.asked.lock().unwrap().push(path.to_path_buf());
        match self.files.get(path) {
            Some(b) => Ok(ImageFile::from_bytes(path.to_str().unwrap(), b.clone())),
            None => NoReferences.open_file(referrer, path),
        }
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

fn open_mem(desc: &str, mem: &Mem) -> Result<VmdkReader> {
    VmdkReader::open(
        ImageFile::from_bytes("d/disk.vmdk", desc.as_bytes().to_vec()),
        mem,
    )
}

#[test]
fn descriptor_with_crlf_comments_quotes_and_zero_extents() {
    let a = pattern(4096, 1);
    let mut b = vec![0u8; 8192];
    b[1024..].copy_from_slice(&pattern(7168, 2));
    let mut mem = Mem::default();
    mem.files.insert("d/my disk-f001.vmdk".into(), a.clone());
    mem.files.insert("d/second.vmdk".into(), b.clone());
    let desc = "# Disk DescriptorFile\r\n# a comment\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\n\
parentCID=ffffffff\r\ncreateType=\"monolithicFlat\"\r\n\r\n# Extent description\r\n\
RW 8 FLAT \"my disk-f001.vmdk\" 0\r\n   RW 4 ZERO\r\nRDONLY 6 FLAT \"second.vmdk\" 2\r\n\r\n\
#DDB\r\nddb.virtualHWVersion = \"4\"\r\n";
    let r = open_mem(desc, &mem).unwrap();
    assert_eq!(r.virtual_size(), 18 * 512);
    let got = read_all(&r).unwrap();
    assert!(got[..4096] == a[..]);
    assert!(got[4096..6144].iter().all(|&x| x == 0));
    assert!(got[6144..] == b[1024..4096]);
    let map = r.block_map(0..18 * 512).unwrap();
    assert_eq!(map.extents().len(), 3);
    assert_eq!(map.extents()[1].kind, ExtentKind::Zero);
    vconvert_testkit::check_reader_consistency(&r).unwrap();
    assert!(r.safety_findings().is_empty(), "{:?}", r.safety_findings());
    let info = r.info().unwrap();
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["data"]["cid"], 0xffff_fffeu32);
    assert_eq!(fs["data"]["extents"][1]["format"], "ZERO");
    assert_eq!(info.cluster_size, None);
}

#[test]
fn crlf_descriptor_and_spaces_read_like_qemu() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let data = pattern(1 << 20, 5);
    std::fs::write(
        dir.path().join("a disk-flat.vmdk"),
        [&[0u8; 1024][..], &data].concat(),
    )
    .unwrap();
    let desc = dir.path().join("a disk.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\r\nversion=1\r\nCID=12345678\r\nparentCID=ffffffff\r\n\
createType=\"monolithicFlat\"\r\n# extents\r\nRW 2048 FLAT \"a disk-flat.vmdk\" 2\r\n",
    )
    .unwrap();
    let r = common::assert_reads_like_qemu(&q, &desc);
    assert_eq!(read_all(&r).unwrap(), data);
}

#[test]
fn noaccess_extents_are_not_opened() {
    let mem = Mem::default();
    let desc = "# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
NOACCESS 16 FLAT \"secret.vmdk\" 0\n";
    let r = open_mem(desc, &mem).unwrap();
    assert!(mem.asked.lock().unwrap().is_empty());
    assert!(read_all(&r).unwrap().iter().all(|&b| b == 0));
    assert!(r.safety_findings().iter().any(|f| f.contains("NOACCESS")));
}

#[test]
fn unsupported_extent_types_are_named() {
    let mut mem = Mem::default();
    mem.files.insert("d/x.vmdk".into(), vec![0u8; 4096]);
    for kind in ["VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW", "WHATEVER"] {
        let desc = format!("# Disk DescriptorFile\ncreateType=\"vmfs\"\nRW 8 {kind} \"x.vmdk\"\n");
        let e = open_mem(&desc, &mem).unwrap_err().to_string();
        assert!(
            e.contains("unsupported VMDK extent type") && e.contains(kind),
            "{e}"
        );
    }
    let mut cowd = b"COWD".to_vec();
    cowd.resize(2048, 0);
    let e = VmdkReader::open(ImageFile::from_bytes("c.vmdk", cowd), &NoReferences).unwrap_err();
    assert!(
        e.to_string().contains("unsupported VMDK extent type"),
        "{e}"
    );
}

#[test]
fn references_go_through_the_resolver() {
    let desc =
        "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../../etc/passwd\" 0\n";
    let e = open_mem(desc, &Mem::default()).unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    let mut mem = Mem::default();
    mem.files
        .insert("d/../../etc/passwd".into(), vec![1u8; 4096]);
    let r = open_mem(desc, &mem).unwrap();
    assert!(
        r.safety_findings().iter().any(|f| f.contains("outside")),
        "{:?}",
        r.safety_findings()
    );
    let desc = "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/passwd\" 0\nthis is junk\n";
    let mut mem = Mem::default();
    mem.files.insert("/etc/passwd".into(), vec![1u8; 4096]);
    let r = open_mem(desc, &mem).unwrap();
    let f = r.safety_findings();
    assert!(
        f.iter().any(|f| f.contains("outside")) && f.iter().any(|f| f.contains("junk")),
        "{f:?}"
    );
}

#[test]
fn bad_descriptors_are_errors() {
    for desc in [
        "hello world\n",
        "createType=\"x\"\n",
        "# Disk DescriptorFile\nRW 0 FLAT \"a\" 0\n",
        "# Disk DescriptorFile\nRW 99999999999999999999 FLAT \"a\" 0\n",
        "# Disk DescriptorFile\nRW 36028797018963968 ZERO\n",
        "",
    ] {
        let e = open_mem(desc, &Mem::default()).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{desc:?}: {e}");
    }
    // A descriptor without extents is an empty disk (qemu writes those for size 0).
    let r = open_mem(
        "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n",
        &Mem::default(),
    )
    .unwrap();
    assert_eq!(r.virtual_size(), 0);
    let big = vec![b'#'; (1 << 20) + 1];
    assert!(VmdkReader::open(ImageFile::from_bytes("big", big), &NoReferences).is_err());
}

fn stream_image(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let mut bytes = vec![0u8; size as usize];
    Rng::new(11).fill(&mut bytes[65536..3 * 65536]);
    bytes[size as usize - 100..].fill(0x5a);
    let path = dir.join("s.vmdk");
    write_vmdk(
        &path,
        "subformat=streamOptimized",
        &bytes,
        &|_| RunKind::Data,
        4096,
        3,
    )
    .unwrap();
    (path, bytes)
}

#[test]
fn stream_footer_disagreement_is_a_finding() {
    let dir = tempdir();
    let (path, bytes) = stream_image(dir.path(), 1 << 20);
    let mut f = std::fs::read(&path).unwrap();
    // The first header claims twice the capacity; the footer is used.
    let cap = u64::from_le_bytes(f[12..20].try_into().unwrap());
    f[12..20].copy_from_slice(&(2 * cap).to_le_bytes());
    let r = VmdkReader::open(ImageFile::from_bytes("s.vmdk", f.clone()), &NoReferences).unwrap();
    assert_eq!(read_all(&r).unwrap(), bytes);
    assert!(r
        .safety_findings()
        .iter()
        .any(|x| x.contains("footer") && x.contains("capacity")));
    // No footer at all: a clear error.
    let n = f.len();
    f[n - 1536..].fill(0);
    let e = VmdkReader::open(ImageFile::from_bytes("s.vmdk", f), &NoReferences).unwrap_err();
    assert!(e.to_string().contains("footer"), "{e}");
}

#[test]
fn embedded_descriptor_naming_other_files_opens_nothing() {
    let dir = tempdir();
    let path = dir.path().join("m.vmdk");
    let bytes = pattern(1 << 20, 4);
    write_vmdk(&path, "", &bytes, &|_| RunKind::Data, 4096, 3).unwrap();
    let mut f = std::fs::read(&path).unwrap();
    let text = b"# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"m.vmdk\"\nRW 2048 FLAT \"/etc/shadow\" 0\n";
    f[512..512 + 10240].fill(0);
    f[512..512 + text.len()].copy_from_slice(text);
    let mem = Mem::default();
    let r = VmdkReader::open(ImageFile::from_bytes("m.vmdk", f), &mem).unwrap();
    assert!(mem.asked.lock().unwrap().is_empty());
    assert_eq!(read_all(&r).unwrap(), bytes);
    assert!(r.safety_findings().iter().any(|x| x.contains("2 extents")));
}

#[test]
fn check_finds_bad_and_duplicate_grains() {
    let dir = tempdir();
    let path = dir.path().join("m.vmdk");
    let bytes = pattern(1 << 20, 4);
    write_vmdk(&path, "", &bytes, &|_| RunKind::Data, 4096, 3).unwrap();
    let mut f = std::fs::read(&path).unwrap();
    let gd = u64::from_le_bytes(f[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(f[gd..gd + 4].try_into().unwrap()) as usize * 512;
    let first = f[gt..gt + 4].to_vec();
    f[gt + 4..gt + 8].copy_from_slice(&first); // grain 1 = grain 0
    f[gt + 8..gt + 12].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // past EOF
    f[gt + 12..gt + 16].copy_from_slice(&3u32.to_le_bytes()); // into metadata
    let r = VmdkReader::open(ImageFile::from_bytes("m.vmdk", f), &NoReferences).unwrap();
    let report = r.check().unwrap().unwrap();
    let c = report.corruptions.join("\n");
    assert!(c.contains("used by 2"), "{c}");
    assert!(c.contains("past the end"), "{c}");
    assert!(c.contains("metadata"), "{c}");
    // Past EOF reads as zeros, as in qemu.
    let mut buf = vec![1u8; 65536];
    r.read_at(&mut buf, 2 * 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn redundant_gd_used_when_primary_is_invalid() {
    let dir = tempdir();
    let path = dir.path().join("m.vmdk");
    let bytes = pattern(1 << 20, 8);
    write_vmdk(&path, "", &bytes, &|_| RunKind::Data, 4096, 3).unwrap();
    let mut f = std::fs::read(&path).unwrap();
    f[56..64].copy_from_slice(&0x00ff_ffffu64.to_le_bytes());
    let r = VmdkReader::open(ImageFile::from_bytes("m.vmdk", f), &NoReferences).unwrap();
    assert_eq!(read_all(&r).unwrap(), bytes);
    assert!(r.safety_findings().iter().any(|x| x.contains("redundant")));
}

#[test]
fn damaged_images_never_panic() {
    let dir = tempdir();
    let (stream, _) = stream_image(dir.path(), 1 << 20);
    let sparse = dir.path().join("m.vmdk");
    write_vmdk(
        &sparse,
        "zeroed_grain=on",
        &pattern(1 << 20, 4),
        &|p| {
            if p < 4096 * 100 {
                RunKind::Data
            } else {
                RunKind::Zero
            }
        },
        4096,
        3,
    )
    .unwrap();
    let mut rng = Rng::new(99);
    for base in [
        std::fs::read(&stream).unwrap(),
        std::fs::read(&sparse).unwrap(),
    ] {
        for round in 0..400 {
            let mut f = base.clone();
            let flips = 1 + rng.below(8);
            for _ in 0..flips {
                // Mostly metadata: header, descriptor, tables, footer.
                let at = match rng.below(4) {
                    0 => rng.below(80) as usize,
                    1 => rng.below(65536) as usize,
                    2 => f.len() - 1 - rng.below(4096.min(f.len() as u64)) as usize,
                    _ => rng.below(f.len() as u64) as usize,
                };
                f[at] = rng.next_u64() as u8;
            }
            if round % 50 == 0 {
                f.truncate(rng.below(f.len() as u64) as usize);
            }
            let Ok(r) = VmdkReader::open(ImageFile::from_bytes("x.vmdk", f), &NoReferences) else {
                continue;
            };
            let size = r.virtual_size();
            let _ = r.info();
            let _ = r.safety_findings();
            let window = size.min(4 << 20);
            let _ = r.block_map(0..window);
            let mut buf = vec![0u8; window as usize];
            let _ = r.read_at(&mut buf, 0);
            if size <= 64 << 20 {
                let _ = r.check();
            }
        }
    }
}

#[test]
fn qemu_reads_our_footer_stream_like_we_do() {
    let Some(q) = qemu() else { return };
    let dir = tempdir();
    let (path, bytes) = stream_image(dir.path(), (3 << 20) + 512);
    let r = common::assert_reads_like_qemu(&q, &path);
    assert_eq!(read_all(&r).unwrap(), bytes);
    let _ = open;
}

/// Builds a sparse extent by hand: `grain_sectors` per grain, `grains` (index, bytes),
/// with or without compression and markers.
fn hand_made(
    version: u32,
    flags: u32,
    grain_sectors: u64,
    capacity: u64,
    grains: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    use vconvert_vmdk::grain::{deflate, encode_entries};
    use vconvert_vmdk::header::{SparseExtentHeader, FLAG_COMPRESSED, FLAG_MARKERS};
    use vconvert_vmdk::marker::GrainMarker;
    let mut h = SparseExtentHeader::new(version, flags);
    h.capacity = capacity;
    h.grain_size = grain_sectors;
    h.gd_offset = 1;
    h.overhead = 8;
    let gd_entries = h.gd_entries() as usize;
    let mut f = vec![0u8; 8 * 512];
    // GD at sector 1, GTs from sector 2 (one sector of GD suffices here).
    let gd: Vec<u32> = (0..gd_entries as u32).map(|i| 2 + 4 * i).collect();
    assert!(2 + 4 * gd_entries <= 8);
    f[512..512 + gd.len() * 4].copy_from_slice(&encode_entries(&gd));
    let gb = (grain_sectors * 512) as usize;
    for (idx, bytes) in grains {
        let sector = (f.len() / 512) as u32;
        let gt_at = 2 * 512 + *idx as usize * 4;
        f[gt_at..gt_at + 4].copy_from_slice(&sector.to_le_bytes());
        if flags & FLAG_COMPRESSED != 0 {
            let z = deflate(bytes).unwrap();
            if flags & FLAG_MARKERS != 0 {
                f.extend_from_slice(
                    &GrainMarker {
                        lba: idx * grain_sectors,
                        size: z.len() as u32,
                    }
                    .encode(),
                );
            }
            f.extend_from_slice(&z);
            f.resize(f.len().div_ceil(512) * 512, 0);
        } else {
            let mut b = bytes.clone();
            b.resize(gb, 0);
            f.extend_from_slice(&b);
        }
    }
    f[..512].copy_from_slice(&h.encode());
    f
}

#[test]
fn hand_made_layouts() {
    use vconvert_vmdk::header::{FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_CHECK};
    // 4 KiB grains, 40 grains: GT 0 only.
    let g0 = pattern(4096, 1);
    let g7 = pattern(4096, 2);
    for (version, flags) in [
        (1, FLAG_NEWLINE_CHECK),
        (3, 0), // ESXi change tracking: version 3, not compressed
        (3, FLAG_COMPRESSED | FLAG_MARKERS),
        (1, FLAG_COMPRESSED), // compressed without markers
    ] {
        let f = hand_made(version, flags, 8, 320, &[(0, g0.clone()), (7, g7.clone())]);
        let r = VmdkReader::open(ImageFile::from_bytes("h.vmdk", f), &NoReferences)
            .unwrap_or_else(|e| panic!("v{version} {flags:#x}: {e}"));
        let all = read_all(&r).unwrap();
        assert_eq!(all.len(), 320 * 512);
        assert!(all[..4096] == g0[..], "v{version} {flags:#x}");
        assert!(all[7 * 4096..8 * 4096] == g7[..]);
        assert!(all[4096..7 * 4096].iter().all(|&b| b == 0));
        let map = r.block_map(0..320 * 512).unwrap();
        assert_eq!(map.data_bytes(), 2 * 4096);
        vconvert_testkit::check_reader_consistency(&r).unwrap();
        assert!(
            r.check().unwrap().unwrap().corruptions.is_empty(),
            "{:?}",
            r.check()
        );
        assert_eq!(r.info().unwrap().cluster_size, Some(4096));
    }
    // A compressed grain that inflates to more than a grain, or to too little.
    let f = hand_made(
        3,
        FLAG_COMPRESSED | FLAG_MARKERS,
        8,
        320,
        &[(0, pattern(8192, 3))],
    );
    let r = VmdkReader::open(ImageFile::from_bytes("h.vmdk", f), &NoReferences).unwrap();
    let e = read_all(&r).unwrap_err().to_string();
    assert!(
        e.contains("compressed grain") && e.contains("more than"),
        "{e}"
    );
    let f = hand_made(
        3,
        FLAG_COMPRESSED | FLAG_MARKERS,
        8,
        320,
        &[(0, pattern(100, 3))],
    );
    let r = VmdkReader::open(ImageFile::from_bytes("h.vmdk", f), &NoReferences).unwrap();
    assert!(read_all(&r).is_err());
    // Version 4 is refused by name; huge grains are refused.
    let mut f = hand_made(1, 0, 8, 320, &[]);
    f[4] = 4;
    let e = VmdkReader::open(ImageFile::from_bytes("h.vmdk", f), &NoReferences).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let f = hand_made(1, 0, 1 << 22, 1 << 22, &[]);
    assert!(VmdkReader::open(ImageFile::from_bytes("h.vmdk", f), &NoReferences).is_err());
}

#[test]
fn descriptor_file_naming_a_stream_extent() {
    // ovftool style: a descriptor with createType streamOptimized and an RDONLY extent.
    let dir = tempdir();
    let (path, bytes) = stream_image(dir.path(), 1 << 20);
    let mut mem = Mem::default();
    mem.files
        .insert("d/dest-0.vmdk".into(), std::fs::read(&path).unwrap());
    let desc = "# Disk DescriptorFile\nversion=1\nCID=2bdc5c77\nparentCID=ffffffff\ncreateType=streamOptimized\n\nRDONLY 2048 SPARSE \"dest-0.vmdk\"\n";
    let r = open_mem(desc, &mem).unwrap();
    assert_eq!(r.create_type(), "streamOptimized");
    assert!(read_all(&r).unwrap() == bytes);
    let fs = r.info().unwrap().format_specific.unwrap();
    assert_eq!(fs["data"]["extents"][0]["compressed"], true);
    assert_eq!(fs["data"]["extents"][0]["format"], "SPARSE");
    assert_eq!(fs["data"]["extents"][0]["filename"], "d/dest-0.vmdk");
}

#[test]
fn create_type_must_fit_the_structure() {
    let mut mem = Mem::default();
    mem.files.insert("d/x.vmdk".into(), vec![7u8; 4096]);
    for (ct, bad) in [
        ("monolithicSparse", true),
        ("streamOptimized", true),
        ("twoGbMaxExtentSparse", true),
        ("monolithicFlat", false),
        ("twoGbMaxExtentFlat", false),
        ("vmfs", false),
        ("madeUp", true),
    ] {
        let desc = format!("# Disk DescriptorFile\ncreateType=\"{ct}\"\nRW 8 FLAT \"x.vmdk\" 0\n");
        let r = open_mem(&desc, &mem).unwrap();
        assert_eq!(r.create_type(), ct);
        let f = r.safety_findings();
        assert_eq!(
            f.iter().any(|x| x.contains("createType")),
            bad,
            "{ct}: {f:?}"
        );
    }
}

#[test]
fn many_extents_naming_one_file_open_it_once() {
    let mut mem = Mem::default();
    mem.files.insert("d/x.vmdk".into(), pattern(512, 1));
    let mut desc = String::from("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n");
    for _ in 0..vconvert_vmdk::MAX_EXTENTS {
        desc.push_str("RW 1 FLAT \"x.vmdk\" 0\n");
    }
    let r = open_mem(&desc, &mem).unwrap();
    assert_eq!(mem.asked.lock().unwrap().len(), 1);
    assert_eq!(r.virtual_size(), 512 * vconvert_vmdk::MAX_EXTENTS as u64);
    let mut buf = vec![0u8; 1024];
    r.read_at(&mut buf, 512 * 100).unwrap();
    assert_eq!(buf[..512], buf[512..]);
    desc.push_str("RW 1 ZERO\n");
    assert!(open_mem(&desc, &mem)
        .unwrap_err()
        .to_string()
        .contains("limit"));
}
