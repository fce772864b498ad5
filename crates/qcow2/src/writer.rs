//! Writing qcow2 images.
//!
//! Layout (one pass, in guest order, so memory stays bounded whatever the disk size):
//! cluster 0 holds the header; the L1 table follows; then data clusters (and packed
//! compressed clusters) in guest order, each L2 table written right after the data it
//! maps; at the end the refcount table and refcount blocks, sized so that they count
//! themselves. Every host cluster is referenced, so `qemu-img check` finds no leak.
//! Zero detection and compression run in parallel in [`ImageWriter::encode`]; host
//! offsets are assigned in [`ImageWriter::place`], in guest order, so the bytes are the
//! same at any thread count.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use vconvert_core::{
    is_zero, Chunk, ChunkEncoder, CreateParams, Error, ImageWriter, Options, Output, Result,
    RunKind, TargetFile, Workers,
};

use crate::compressed::{Compressor, DEFLATE_LEVEL, DEFLATE_MAX_LEVEL};
use crate::header::{
    compatible, extension, incompatible, CompressionType, MAGIC, MAX_BACKING_NAME, MAX_L1_BYTES,
    V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use crate::l2::{compressed_entry, COPIED, SUBCLUSTERS, ZERO};

/// zstd level for compressed clusters (qemu uses zstd's default).
const ZSTD_LEVEL: u32 = 3;
/// The highest zstd level `compression_level` accepts.
const ZSTD_MAX_LEVEL: u32 = 19;

/// How one guest cluster is to be stored.
#[derive(Debug)]
pub enum ClusterPlan {
    /// Left unallocated (reads as zeros: the image has no backing file).
    Unallocated,
    /// A zero cluster (version 3).
    Zero,
    /// Plain data; with extended L2, the allocated and zero subcluster bitmaps.
    Data {
        /// Subclusters holding data.
        alloc: u32,
        /// Subclusters reading as zeros.
        zero: u32,
    },
    /// A host cluster that is allocated but not written (`preallocation=metadata`).
    Preallocated,
    /// Compressed bytes.
    Compressed(Vec<u8>),
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(CompressionType, u32, Compressor)>> =
        const { RefCell::new(None) };
}

/// Writes a qcow2 image.
#[derive(Debug)]
pub struct Qcow2Writer {
    file: Arc<TargetFile>,
    name: String,
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
    lazy_refcounts: bool,
    compression_type: CompressionType,
    compress: bool,
    level: u32,
    preallocation: Preallocation,
    size: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    /// The L2 table being filled: its L1 index and words.
    l2: Option<(u64, Vec<u64>)>,
    /// Byte offset of the next allocation (mid-cluster after compressed data).
    next_free: u64,
    /// Refcounts of host clusters shared by compressed clusters (others have 1).
    shared: HashMap<u64, u64>,
    /// Backing file name and format stored in the header (`backing_file`,
    /// `backing_fmt`): unallocated clusters then read from it.
    backing: Option<(String, Option<String>)>,
}

/// qemu-img's `preallocation` for qcow2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Preallocation {
    Off,
    Metadata,
    Falloc,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Qcow2Writer {
    /// The `-o` keys qcow2 accepts.
    pub const OPTIONS: &'static [&'static str] = &[
        "compat",
        "cluster_size",
        "refcount_bits",
        "lazy_refcounts",
        "extended_l2",
        "compression_type",
        "preallocation",
        "compression_level",
        "backing_file",
        "backing_fmt",
    ];

    /// Creates the qcow2 target in `output` with `options`.
    pub fn create(output: &mut Output, params: &CreateParams, mut o: Options) -> Result<Self> {
        let compat = o.take_choice("compat", &["1.1", "v3", "0.10", "v2"])?;
        let version = match compat.as_deref() {
            Some("0.10" | "v2") => 2,
            _ => 3,
        };
        let cluster_size = o.take_size("cluster_size")?.unwrap_or(65536);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(Error::invalid(format!(
                "qcow2: cluster_size {cluster_size} must be a power of two from 512 to 2M"
            )));
        }
        let refcount_bits = match o.take("refcount_bits") {
            None => 16,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|b| b.is_power_of_two() && *b <= 64)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "qcow2: refcount_bits '{v}' must be a power of two up to 64"
                    ))
                })?,
        };
        let lazy = o.take_bool("lazy_refcounts")?.unwrap_or(false);
        let extended_l2 = o.take_bool("extended_l2")?.unwrap_or(false);
        let compression_type = match o
            .take_choice("compression_type", &["zlib", "zstd"])?
            .as_deref()
        {
            Some("zstd") => CompressionType::Zstd,
            _ => CompressionType::Zlib,
        };
        let preallocation = match o
            .take_choice("preallocation", &["off", "metadata", "falloc", "full"])?
            .as_deref()
        {
            Some("metadata") => Preallocation::Metadata,
            Some("falloc" | "full") => Preallocation::Falloc,
            _ => Preallocation::Off,
        };
        let level = match o.take("compression_level") {
            None => match compression_type {
                CompressionType::Zlib => DEFLATE_LEVEL,
                CompressionType::Zstd => ZSTD_LEVEL,
            },
            Some(v) => {
                let max = match compression_type {
                    CompressionType::Zlib => DEFLATE_MAX_LEVEL,
                    CompressionType::Zstd => ZSTD_MAX_LEVEL,
                };
                v.parse()
                    .ok()
                    .filter(|l| (1..=max).contains(l))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "qcow2: compression_level '{v}' must be 1 to {max} for {}",
                            compression_type.name()
                        ))
                    })?
            }
        };
        let backing_file = o.take("backing_file");
        let backing_fmt = o.take("backing_fmt");
        o.finish("qcow2", Self::OPTIONS)?;
        let backing = match (backing_file, backing_fmt) {
            (Some(f), fmt) => Some((f, fmt)),
            (None, Some(_)) => {
                return Err(Error::invalid("qcow2: backing_fmt needs a backing_file"))
            }
            (None, None) => None,
        };
        let v3_only = |what: &str| {
            Error::invalid(format!(
                "qcow2: {what} requires compat=1.1 (version 3); it is not possible with compat=0.10"
            ))
        };
        if version == 2 {
            if refcount_bits != 16 {
                return Err(v3_only("refcount_bits other than 16"));
            }
            if lazy {
                return Err(v3_only("lazy_refcounts"));
            }
            if extended_l2 {
                return Err(v3_only("extended_l2"));
            }
            if compression_type == CompressionType::Zstd {
                return Err(v3_only("compression_type=zstd"));
            }
        }
        if extended_l2 && cluster_size < 16384 {
            return Err(Error::invalid(
                "qcow2: extended_l2 needs a cluster_size of at least 16K",
            ));
        }
        if backing.is_some() && (params.compress || preallocation != Preallocation::Off) {
            return Err(Error::unsupported(
                output.target().display().to_string(),
                "compression (-c) or preallocation in a qcow2 image with a backing file",
            ));
        }
        if params.compress && preallocation != Preallocation::Off {
            return Err(Error::invalid(
                "qcow2: compression (-c) cannot be combined with preallocation",
            ));
        }
        let target = output.target().to_path_buf();
        let name = target.display().to_string();
        if params.existing {
            return Err(Error::unsupported(
                &name,
                "writing into an existing qcow2 image (-n); convert to a new file",
            ));
        }
        let cluster_bits = cluster_size.trailing_zeros();
        let entry = if extended_l2 { 16 } else { 8 };
        let l2_entries = cluster_size / entry;
        let l1_size = params.virtual_size.div_ceil(cluster_size * l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "{name}: {} bytes is too large for {cluster_size}-byte clusters",
                params.virtual_size
            )));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
        let file = output.create_file(&target)?;
        Ok(Qcow2Writer {
            file,
            name,
            version,
            cluster_bits,
            refcount_order: refcount_bits.trailing_zeros(),
            extended_l2,
            lazy_refcounts: lazy,
            compression_type,
            compress: params.compress,
            level,
            preallocation,
            size: params.virtual_size,
            l1_offset: cluster_size,
            l1: vec![0; l1_size as usize],
            l2: None,
            next_free: (1 + l1_clusters) * cluster_size,
            shared: HashMap::new(),
            backing,
        })
        .and_then(|w| {
            // The name and the format extension must fit in cluster 0 with the header.
            w.encode_header(0, 0).map(|_| w)
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / if self.extended_l2 { 16 } else { 8 }
    }

    fn write_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        vconvert_core::write_all_at(&self.file, &self.name, buf, offset, what)
    }

    /// Assigns host clusters and L2 entries to the clusters of `chunk` in guest order,
    /// writing metadata and compressed clusters at once and leaving the runs of plain
    /// data clusters (host offset, chunk offset, length) in `runs` for the caller.
    fn assign(
        &mut self,
        chunk: &Chunk,
        plans: Vec<ClusterPlan>,
        runs: &mut Vec<(u64, usize, usize)>,
    ) -> Result<()> {
        let cs = self.cs();
        // Consecutive data clusters land on consecutive host clusters: one run.
        let mut run: Option<(u64, usize, usize)> = None;
        for (k, plan) in plans.into_iter().enumerate() {
            let start = chunk.offset + k as u64 * cs;
            let cluster = start / cs;
            let len = cs.min(chunk.offset + chunk.len - start);
            match plan {
                ClusterPlan::Unallocated => {}
                ClusterPlan::Zero => {
                    if self.extended_l2 {
                        self.set_entry(cluster, 0, u64::from(u32::MAX) << 32)?;
                    } else {
                        self.set_entry(cluster, ZERO, 0)?;
                    }
                }
                ClusterPlan::Data { alloc, zero } => {
                    let host = self.alloc_cluster();
                    let at = (start - chunk.offset) as usize;
                    run = match run {
                        Some((h, s, l)) if h + l as u64 == host && s + l == at => {
                            Some((h, s, l + len as usize))
                        }
                        prev => {
                            runs.extend(prev);
                            Some((host, at, len as usize))
                        }
                    };
                    let bitmap = u64::from(alloc) | (u64::from(zero) << 32);
                    self.set_entry(cluster, host | COPIED, bitmap)?;
                }
                ClusterPlan::Preallocated => {
                    let host = self.alloc_cluster();
                    self.set_entry(cluster, host | COPIED, u64::from(u32::MAX))?;
                }
                ClusterPlan::Compressed(bytes) => {
                    let host = self.place_compressed(&bytes)?;
                    let entry = compressed_entry(host, bytes.len() as u64, self.cluster_bits);
                    self.set_entry(cluster, entry, 0)?;
                }
            }
        }
        runs.extend(run);
        Ok(())
    }

    /// Writes a run of data clusters from `chunk` (see [`ImageWriter::place`]).
    fn write_run(&self, chunk: &Chunk, run: Option<(u64, usize, usize)>) -> Result<()> {
        let Some((host, at, len)) = run else {
            return Ok(());
        };
        let bytes = chunk
            .data
            .get(at..at + len)
            .ok_or_else(|| Error::invalid("chunk holds no data for a data cluster"))?;
        self.write_at(bytes, host, "data clusters")
    }

    /// A fresh host cluster (after any partly used one).
    fn alloc_cluster(&mut self) -> u64 {
        let cs = self.cs();
        let host = self.next_free.div_ceil(cs) * cs;
        self.next_free = host + cs;
        host
    }

    /// Writes the current L2 table (if it maps anything) and points the L1 entry at it.
    fn flush_l2(&mut self) -> Result<()> {
        let Some((index, words)) = self.l2.take() else {
            return Ok(());
        };
        let host = self.alloc_cluster();
        let mut bytes = Vec::with_capacity(words.len() * 8);
        for w in &words {
            bytes.extend_from_slice(&w.to_be_bytes());
        }
        self.write_at(&bytes, host, "L2 table")?;
        if let Some(e) = self.l1.get_mut(index as usize) {
            *e = host | COPIED;
        }
        Ok(())
    }

    /// Sets the L2 entry of guest cluster `cluster` (words: entry and, with extended
    /// L2, the bitmap).
    fn set_entry(&mut self, cluster: u64, entry: u64, bitmap: u64) -> Result<()> {
        let per = self.l2_entries();
        let index = cluster / per;
        if self.l2.as_ref().is_some_and(|(i, _)| *i != index) {
            self.flush_l2()?;
        }
        let words = if self.extended_l2 { 2 * per } else { per } as usize;
        let (_, table) = self.l2.get_or_insert_with(|| (index, vec![0; words]));
        let slot = (cluster % per) as usize;
        if self.extended_l2 {
            table[2 * slot] = entry;
            table[2 * slot + 1] = bitmap;
        } else {
            table[slot] = entry;
        }
        Ok(())
    }

    /// Places a compressed cluster's bytes, packed after the previous ones.
    fn place_compressed(&mut self, bytes: &[u8]) -> Result<u64> {
        let cs = self.cs();
        let max_ref = if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << self.refcount_order)) - 1
        };
        let mut host = self.next_free;
        // A partly used cluster whose refcount cannot grow: start the next one.
        if host % cs != 0 && self.shared.get(&(host / cs)).copied().unwrap_or(1) >= max_ref {
            host = host.div_ceil(cs) * cs;
        }
        let len = bytes.len() as u64;
        let first = host / cs;
        let last = (host + len - 1) / cs;
        // Each host cluster a compressed cluster touches is referenced once more.
        for c in first..=last {
            *self.shared.entry(c).or_insert(0) += 1;
        }
        self.write_at(bytes, host, "compressed cluster")?;
        self.next_free = host + len;
        Ok(host)
    }

    fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    fn encode_header(&self, rt_offset: u64, rt_clusters: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.cs() as usize];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1.len() as u32);
        put64(&mut b, 40, self.l1_offset);
        put64(&mut b, 48, rt_offset);
        put32(&mut b, 56, rt_clusters as u32);
        if self.version >= 3 {
            let mut incompat = 0;
            if self.compression_type != CompressionType::Zlib {
                incompat |= incompatible::COMPRESSION_TYPE;
            }
            if self.extended_l2 {
                incompat |= incompatible::EXTENDED_L2;
            }
            put64(&mut b, 72, incompat);
            put64(
                &mut b,
                80,
                if self.lazy_refcounts {
                    compatible::LAZY_REFCOUNTS
                } else {
                    0
                },
            );
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, V3_HEADER_LENGTH);
            b[104] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
        }
        if let Some((name, fmt)) = &self.backing {
            // qcow2.txt "Header extensions": the backing format extension, the end of
            // the extensions, then the backing file name.
            let mut at = if self.version >= 3 {
                V3_HEADER_LENGTH
            } else {
                V2_HEADER_LENGTH
            } as usize;
            let mut ext = Vec::new();
            if let Some(f) = fmt {
                ext.extend_from_slice(&extension::BACKING_FORMAT.to_be_bytes());
                ext.extend_from_slice(&(f.len() as u32).to_be_bytes());
                ext.extend_from_slice(f.as_bytes());
                ext.resize(ext.len().next_multiple_of(8), 0);
            }
            ext.extend_from_slice(&[0u8; 8]);
            let end = at + ext.len() + name.len();
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize || end > b.len() {
                return Err(Error::invalid(format!(
                    "{}: the backing file name '{name}' ({} bytes) does not fit in the first \
                     cluster (at most {MAX_BACKING_NAME} bytes, and {} bytes with its format \
                     here)",
                    self.name,
                    name.len(),
                    b.len().saturating_sub(at + ext.len())
                )));
            }
            b[at..at + ext.len()].copy_from_slice(&ext);
            at += ext.len();
            b[at..end].copy_from_slice(name.as_bytes());
            put64(&mut b, 8, at as u64);
            put32(&mut b, 16, name.len() as u32);
        }
        Ok(b)
    }

    fn encode_refcount_block(&self, first: u64, count: u64) -> Vec<u8> {
        let cs = self.cs();
        let bits = self.refcount_bits();
        let mut b = vec![0u8; cs as usize];
        for i in 0..(cs * 8 / bits) {
            let c = first + i;
            if c >= first + count {
                break;
            }
            let rc = self.shared.get(&c).copied().unwrap_or(1);
            let bit = i * bits;
            if bits < 8 {
                b[(bit / 8) as usize] |= ((rc & ((1 << bits) - 1)) as u8) << (bit % 8);
            } else {
                let n = (bits / 8) as usize;
                let s = (bit / 8) as usize;
                let be = rc.to_be_bytes();
                b[s..s + n].copy_from_slice(&be[8 - n..]);
            }
        }
        b
    }
}

/// Compresses `src` with this thread's compressor.
fn compress_cluster(kind: CompressionType, level: u32, src: &[u8]) -> Result<Option<Vec<u8>>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((k, l, _)) if *k == kind && *l == level) {
            let c = Compressor::new(kind, level).map_err(Error::invalid)?;
            *slot = Some((kind, level, c));
        }
        let Some((_, _, c)) = slot.as_mut() else {
            return Err(Error::invalid("compressor missing"));
        };
        Ok(c.compress(src).map(<[u8]>::to_vec))
    })
}

/// The parallel half of [`Qcow2Writer`]: what each cluster of a chunk becomes
/// (unallocated, zero, data with its subcluster bitmaps, or compressed bytes).
#[derive(Clone, Copy, Debug)]
pub struct Qcow2Encoder {
    cluster_size: u64,
    version: u32,
    extended_l2: bool,
    compress: bool,
    compression_type: CompressionType,
    level: u32,
    preallocation: Preallocation,
    /// The image has a backing file: unallocated runs stay unallocated (they read
    /// from it), zeros must be stored as zeros.
    backing: bool,
}

impl Qcow2Encoder {
    /// The plan of one cluster of an image with a backing file. Runs unallocated in
    /// the source keep reading from the backing file where a whole (sub)cluster is
    /// unallocated; otherwise the (sub)cluster is written, the chunk then holding the
    /// backing file's bytes for its unallocated runs (as qemu copies on write).
    fn plan_over_backing(&self, chunk: &Chunk, start: u64, len: u64) -> ClusterPlan {
        let allocated = |from: u64, to: u64| {
            chunk
                .runs
                .iter()
                .any(|r| r.kind != RunKind::Unallocated && r.start < to && r.start + r.len > from)
        };
        if !allocated(start, start + len) {
            return ClusterPlan::Unallocated;
        }
        let bytes = chunk.bytes(start, len);
        let zero = bytes.is_none_or(is_zero);
        if self.extended_l2 {
            let sc = self.cluster_size / SUBCLUSTERS;
            let (mut alloc, mut zeros) = (0u32, 0u32);
            for i in 0..SUBCLUSTERS {
                let (a, b) = (start + i * sc, (start + (i + 1) * sc).min(start + len));
                if a >= start + len {
                    zeros |= 1 << i;
                    continue;
                }
                if !allocated(a, b) {
                    continue;
                }
                match chunk.bytes(a, b - a) {
                    Some(x) if !is_zero(x) => alloc |= 1 << i,
                    _ => zeros |= 1 << i,
                }
            }
            return match (alloc, zeros) {
                (0, u32::MAX) => ClusterPlan::Zero,
                _ => ClusterPlan::Data { alloc, zero: zeros },
            };
        }
        match (zero, self.version >= 3) {
            (true, true) => ClusterPlan::Zero,
            _ => ClusterPlan::Data {
                alloc: u32::MAX,
                zero: 0,
            },
        }
    }
}

impl ChunkEncoder for Qcow2Encoder {
    type Encoded = Vec<ClusterPlan>;

    fn encode(&self, chunk: &Chunk) -> Result<Vec<ClusterPlan>> {
        let cs = self.cluster_size;
        let sc = cs / SUBCLUSTERS;
        let mut plans = Vec::new();
        let mut start = chunk.offset;
        let end = chunk.offset + chunk.len;
        let mut padded = Vec::new();
        while start < end {
            let len = cs.min(end - start);
            if self.backing {
                plans.push(self.plan_over_backing(chunk, start, len));
                start += len;
                continue;
            }
            let overlapping = chunk
                .runs
                .iter()
                .filter(|r| r.start < start + len && r.start + r.len > start);
            let (mut any_data, mut any_zero) = (false, false);
            for r in overlapping {
                match r.kind {
                    RunKind::Data => any_data = true,
                    RunKind::Zero => any_zero = true,
                    RunKind::Unallocated => {}
                }
            }
            let bytes = if any_data {
                chunk.bytes(start, len)
            } else {
                None
            };
            let plan = match bytes {
                Some(b) if !is_zero(b) => {
                    if self.compress {
                        padded.clear();
                        padded.extend_from_slice(b);
                        padded.resize(cs as usize, 0);
                        match compress_cluster(self.compression_type, self.level, &padded)? {
                            Some(c) => ClusterPlan::Compressed(c),
                            None => ClusterPlan::Data {
                                alloc: u32::MAX,
                                zero: 0,
                            },
                        }
                    } else if self.extended_l2 {
                        let (mut alloc, mut zero) = (0u32, 0u32);
                        for i in 0..SUBCLUSTERS {
                            let s = (i * sc) as usize;
                            if s >= b.len() {
                                zero |= 1 << i;
                                continue;
                            }
                            let e = ((i + 1) * sc).min(b.len() as u64) as usize;
                            if is_zero(&b[s..e]) {
                                zero |= 1 << i;
                            } else {
                                alloc |= 1 << i;
                            }
                        }
                        ClusterPlan::Data { alloc, zero }
                    } else {
                        ClusterPlan::Data {
                            alloc: u32::MAX,
                            zero: 0,
                        }
                    }
                }
                _ if self.preallocation != Preallocation::Off => ClusterPlan::Preallocated,
                Some(_) => ClusterPlan::Unallocated,
                None if any_zero && self.version >= 3 => ClusterPlan::Zero,
                None => ClusterPlan::Unallocated,
            };
            plans.push(plan);
            start += len;
        }
        Ok(plans)
    }
}

impl ImageWriter for Qcow2Writer {
    type Encoder = Qcow2Encoder;

    fn chunk_size(&self) -> u64 {
        self.cs().max(1 << 20)
    }

    fn encoder(&self) -> Qcow2Encoder {
        Qcow2Encoder {
            cluster_size: self.cs(),
            version: self.version,
            extended_l2: self.extended_l2,
            compress: self.compress,
            compression_type: self.compression_type,
            level: self.level,
            preallocation: self.preallocation,
            backing: self.backing.is_some(),
        }
    }

    fn place(&mut self, chunk: &Chunk, plans: Vec<ClusterPlan>) -> Result<()> {
        let mut runs = Vec::new();
        self.assign(chunk, plans, &mut runs)?;
        for &(host, at, len) in &runs {
            self.write_run(chunk, Some((host, at, len)))?;
        }
        Ok(())
    }

    /// Host offsets for the whole batch in guest order (so the layout does not depend
    /// on the thread count), then the data runs written in parallel at those offsets.
    fn place_batch(
        &mut self,
        chunks: &[Chunk],
        plans: Vec<Vec<ClusterPlan>>,
        workers: &Workers,
    ) -> Result<()> {
        let mut jobs: Vec<(usize, (u64, usize, usize))> = Vec::new();
        let mut runs = Vec::new();
        for (i, (chunk, p)) in chunks.iter().zip(plans).enumerate() {
            runs.clear();
            self.assign(chunk, p, &mut runs)?;
            jobs.extend(runs.iter().map(|&r| (i, r)));
        }
        // The batch's data clusters are consecutive (allocated in guest order): one
        // reservation lets its direct writes run at once (see `TargetFile::reserve`).
        let first = jobs.iter().map(|&(_, (host, _, _))| host).min();
        let end = jobs
            .iter()
            .map(|&(_, (host, _, len))| host + len as u64)
            .max();
        if let (Some(first), Some(end)) = (first, end) {
            self.file.reserve(first, end - first);
        }
        let this = &*self;
        this.file
            .writers(workers)
            .try_for_each(&jobs, |&(i, run)| match chunks.get(i) {
                Some(chunk) => this.write_run(chunk, Some(run)),
                None => Err(Error::invalid("write job for a chunk outside the batch")),
            })
    }

    fn finish(mut self) -> Result<()> {
        self.flush_l2()?;
        let cs = self.cs();
        // Refcount table and blocks at the end, sized to count themselves.
        let data_clusters = self.next_free.div_ceil(cs);
        let per_block = cs * 8 / self.refcount_bits();
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = data_clusters + table + blocks;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs).max(1);
            if b == blocks && t == table {
                break;
            }
            blocks = b;
            table = t;
        }
        let total = data_clusters + table + blocks;
        let rt_offset = data_clusters * cs;
        let first_block = rt_offset + table * cs;
        let mut rt = vec![0u8; (table * cs) as usize];
        for i in 0..blocks {
            let off = first_block + i * cs;
            rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
            let b = self.encode_refcount_block(i * per_block, total.saturating_sub(i * per_block));
            self.write_at(&b, off, "refcount block")?;
        }
        self.write_at(&rt, rt_offset, "refcount table")?;
        let mut l1 = Vec::with_capacity(self.l1.len() * 8);
        for e in &self.l1 {
            l1.extend_from_slice(&e.to_be_bytes());
        }
        if !l1.is_empty() {
            self.write_at(&l1, self.l1_offset, "L1 table")?;
        }
        let end = total * cs;
        self.file
            .set_len(end)
            .map_err(|e| Error::io(&self.name, format!("cannot set length to {end}"), e))?;
        if self.preallocation == Preallocation::Falloc {
            rustix_fallocate(&self.file, &self.name, end)?;
        }
        let header = self.encode_header(rt_offset, table)?;
        self.write_at(&header, 0, "qcow2 header")
    }
}

fn rustix_fallocate(file: &File, name: &str, len: u64) -> Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)
        .map_err(|e| Error::io(name, "cannot preallocate", e.into()))
}
