//! Helpers shared by the VMDK integration tests.
#![allow(dead_code)]

use std::path::Path;

use vconvert_core::{
    Chunk, ChunkEncoder, CreateParams, Format, ImageFile, ImageReader, ImageWriter, Options,
    Output, Resolver, Result, Run, RunKind,
};
use vconvert_testkit::{read_all, Qemu};
use vconvert_vmdk::{VmdkReader, VmdkWriter};

/// A resolver that opens every file (VMDK parents only), like the CLI's default.
pub struct Open;

impl Resolver for Open {
    fn open_image(
        &self,
        _referrer: &ImageFile,
        path: &Path,
        _format: Option<Format>,
    ) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(VmdkReader::open(ImageFile::open(path)?, self)?))
    }

    fn open_file(&self, _referrer: &ImageFile, path: &Path) -> Result<ImageFile> {
        ImageFile::open(path)
    }
}

/// Opens a VMDK with every reference allowed.
pub fn open(path: &Path) -> VmdkReader {
    VmdkReader::open(ImageFile::open(path).expect("open"), &Open).expect("open vmdk")
}

/// What qemu reads from `path` (format `fmt`), as bytes.
pub fn qemu_bytes(q: &Qemu, fmt: &str, path: &Path) -> Vec<u8> {
    let raw = path.with_extension("qemu.raw");
    q.img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).ok();
    v
}

/// Asserts our reader and qemu read `path` identically.
pub fn assert_reads_like_qemu(q: &Qemu, path: &Path) -> VmdkReader {
    let r = open(path);
    let ours = read_all(&r).expect("read");
    let theirs = qemu_bytes(q, "vmdk", path);
    assert_eq!(ours.len(), theirs.len(), "size of {}", path.display());
    if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i:#x}", path.display());
    }
    vconvert_testkit::check_reader_consistency(&r).expect("consistency");
    r
}

/// Splits `bytes` (a whole disk) into chunks of `chunk` bytes with runs from `kinds`
/// (one kind per `granule` bytes) and drives `w` through encode/place/finish.
pub fn drive_writer(
    w: VmdkWriter,
    bytes: &[u8],
    kinds: &dyn Fn(u64) -> RunKind,
    granule: u64,
) -> Result<()> {
    let mut w = w;
    let size = bytes.len() as u64;
    let cs = w.chunk_size();
    let mut chunks = Vec::new();
    let mut off = 0u64;
    while off < size {
        let len = cs.min(size - off);
        let mut runs: Vec<Run> = Vec::new();
        let mut p = off;
        while p < off + len {
            let n = (granule - p % granule).min(off + len - p);
            let kind = kinds(p);
            match runs.last_mut() {
                Some(r) if r.kind == kind => r.len += n,
                _ => runs.push(Run {
                    start: p,
                    len: n,
                    kind,
                }),
            }
            p += n;
        }
        let has_data = runs.iter().any(|r| r.kind == RunKind::Data);
        let mut data = Vec::new();
        if has_data {
            data = bytes[off as usize..(off + len) as usize].to_vec();
            for r in &runs {
                if r.kind != RunKind::Data {
                    let s = (r.start - off) as usize;
                    data[s..s + r.len as usize].fill(0);
                }
            }
        }
        chunks.push(Chunk {
            offset: off,
            len,
            runs,
            data: data.into(),
        });
        off += len;
    }
    // Encode in parallel-ish (reverse order, to prove placement alone decides layout).
    let encoded: Vec<_> = chunks
        .iter()
        .rev()
        .map(|c| w.encoder().encode(c))
        .collect::<Result<Vec<_>>>()?;
    for (c, e) in chunks.iter().zip(encoded.into_iter().rev()) {
        w.place(c, e)?;
    }
    w.finish()
}

/// Writes `bytes` as a VMDK at `target` with `options` and commits.
pub fn write_vmdk(
    target: &Path,
    options: &str,
    bytes: &[u8],
    kinds: &dyn Fn(u64) -> RunKind,
    granule: u64,
    seed: u64,
) -> Result<()> {
    let mut out = Output::new(target, false);
    let params = CreateParams {
        virtual_size: bytes.len() as u64,
        existing: false,
        target_is_zero: true,
        compress: false,
        identity_seed: Some(seed),
    };
    let w = VmdkWriter::create(&mut out, &params, Options::parse(options)?)?;
    drive_writer(w, bytes, kinds, granule)?;
    out.commit()
}

/// Drives `w` over a disk of `size` bytes whose only data are `pieces` (offset, bytes),
/// giving only the chunks that hold data, as the engine does for a fresh target.
pub fn drive_sparse(mut w: VmdkWriter, size: u64, pieces: &[(u64, Vec<u8>)]) -> Result<()> {
    let cs = w.chunk_size();
    let mut chunk_ids: Vec<u64> = Vec::new();
    for (o, b) in pieces {
        for c in o / cs..=(o + b.len() as u64 - 1) / cs {
            chunk_ids.push(c);
        }
    }
    chunk_ids.sort_unstable();
    chunk_ids.dedup();
    for c in chunk_ids {
        let off = c * cs;
        let len = cs.min(size - off);
        let mut data = vec![0u8; len as usize];
        let mut covered = vec![false; len as usize];
        for (o, b) in pieces {
            let s = (*o).max(off);
            let e = (o + b.len() as u64).min(off + len);
            if s < e {
                data[(s - off) as usize..(e - off) as usize]
                    .copy_from_slice(&b[(s - o) as usize..(e - o) as usize]);
                covered[(s - off) as usize..(e - off) as usize].fill(true);
            }
        }
        let mut runs: Vec<Run> = Vec::new();
        for (i, cv) in covered.iter().enumerate() {
            let kind = if *cv {
                RunKind::Data
            } else {
                RunKind::Unallocated
            };
            match runs.last_mut() {
                Some(r) if r.kind == kind => r.len += 1,
                _ => runs.push(Run {
                    start: off + i as u64,
                    len: 1,
                    kind,
                }),
            }
        }
        let chunk = Chunk {
            offset: off,
            len,
            runs,
            data: data.into(),
        };
        let e = w.encoder().encode(&chunk)?;
        w.place(&chunk, e)?;
    }
    w.finish()
}

/// A fresh writer for `target`.
pub fn writer(out: &mut Output, size: u64, options: &str, seed: u64) -> Result<VmdkWriter> {
    let params = CreateParams {
        virtual_size: size,
        existing: false,
        target_is_zero: true,
        compress: false,
        identity_seed: Some(seed),
    };
    VmdkWriter::create(out, &params, Options::parse(options)?)
}

/// Compares our format-specific info with qemu's, key by key.
pub fn assert_info_like_qemu(q: &Qemu, r: &dyn ImageReader, path: &std::path::Path) {
    let theirs = q.info_json(Some("vmdk"), path);
    let ours = r.info().unwrap();
    assert_eq!(ours.virtual_size, theirs["virtual-size"].as_u64().unwrap());
    assert_eq!(
        ours.cluster_size,
        theirs["cluster-size"].as_u64(),
        "cluster-size"
    );
    let fs = ours.format_specific.unwrap();
    let tfs = &theirs["format-specific"];
    assert_eq!(fs["type"], tfs["type"]);
    for key in ["cid", "parent-cid", "create-type"] {
        assert_eq!(fs["data"][key], tfs["data"][key], "{key}");
    }
    let (a, b) = (
        fs["data"]["extents"].as_array().unwrap(),
        tfs["data"]["extents"].as_array().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
        let mut kx: Vec<_> = x.keys().collect();
        let mut ky: Vec<_> = y.keys().collect();
        kx.sort();
        ky.sort();
        assert_eq!(kx, ky, "extent keys");
        for k in x.keys() {
            assert_eq!(x[k], y[k], "extent key {k}");
        }
    }
}
