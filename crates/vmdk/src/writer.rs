//! Writing VMDK images: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat and streamOptimized.
//!
//! Sparse layouts follow qemu: header, embedded descriptor area, redundant grain
//! directory and tables, grain directory and tables all preallocated, then grains
//! appended in guest order. streamOptimized follows VMware (spec "Stream-Optimized
//! Compressed Sparse Extents"): header with `gdOffset = GD_AT_END`, descriptor,
//! compressed grains with markers in guest order, each grain table after its grains,
//! then the grain directory, the footer and the end-of-stream marker.
//!
//! [`ImageWriter::encode`] decides which grains are stored (all-zero grains never are)
//! and compresses stream grains in parallel; [`ImageWriter::place`] lays them out in
//! guest order, so the output does not depend on the thread count.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vconvert_core::{
    is_zero, Chunk, ChunkEncoder, CreateParams, Error, Identity, ImageWriter, Options, Output,
    Result, RunKind, TargetFile,
};

use crate::descriptor::{Access, ExtentLine, NewDescriptor, CID_NONE};
use crate::grain::{self, ENTRY_SIZE, GTE_UNALLOCATED, GTE_ZEROED};
use crate::header::{
    SparseExtentHeader, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_CHECK,
    FLAG_REDUNDANT_GT, FLAG_ZEROED_GRAIN, GD_AT_END, GTES_PER_GT,
};
use crate::marker::{
    GrainMarker, MetadataMarker, GRAIN_MARKER_SIZE, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT,
};
use crate::SECTOR_SIZE;

/// Grain size the writer uses: 128 sectors (64 KiB), as VMware and qemu.
pub const GRAIN_SECTORS: u64 = 128;
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR_SIZE;
/// Chunk size asked of the engine: 16 grains.
const CHUNK_SIZE: u64 = 1 << 20;
/// Extent size of the twoGbMaxExtent subformats (qemu's: 2 GiB).
const TWO_GB: u64 = 2 << 30;
/// Sectors reserved for the embedded descriptor of a sparse extent (qemu's 20).
const EMBEDDED_DESCRIPTOR_SECTORS: u64 = 20;
/// Largest virtual disk of the sparse subformats (64 TiB, ESXi's limit).
const MAX_SPARSE_SIZE: u64 = 64 << 40;
/// Sectors of one grain table.
const GT_SECTORS: u64 = GTES_PER_GT as u64 * ENTRY_SIZE / SECTOR_SIZE;

/// The layouts the writer makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse extent file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor file and one flat extent file.
    MonolithicFlat,
    /// A descriptor file and sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor file and flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One compressed sparse extent, grains in guest order, metadata at the end.
    StreamOptimized,
}

impl Subformat {
    /// Every subformat, by its `createType` name.
    pub const ALL: [(Subformat, &'static str); 5] = [
        (Subformat::MonolithicSparse, "monolithicSparse"),
        (Subformat::MonolithicFlat, "monolithicFlat"),
        (Subformat::TwoGbMaxExtentSparse, "twoGbMaxExtentSparse"),
        (Subformat::TwoGbMaxExtentFlat, "twoGbMaxExtentFlat"),
        (Subformat::StreamOptimized, "streamOptimized"),
    ];

    /// The `createType` name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("", |(_, n)| n)
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(f, _)| *f)
    }
}

/// What `encode` decided for one grain.
#[derive(Debug)]
enum GrainOut {
    /// Store the grain (stream: these marker + compressed bytes, padded to a sector).
    Data(Option<Vec<u8>>),
    /// A zeroed-grain GTE.
    Zero,
}

/// The encoding of one chunk: the grains to store, in guest order.
#[derive(Debug, Default)]
pub struct EncodedChunk {
    grains: Vec<(u64, GrainOut)>,
}

/// Layout and progress of one sparse extent file (not stream).
#[derive(Debug)]
struct SparseOut {
    header: SparseExtentHeader,
    /// First sector of the grain tables and of the redundant ones.
    gt_sector: u64,
    rgt_sector: u64,
    /// Sector where the next grain goes.
    next: u64,
    /// The grain table being filled (index, entries).
    current: Option<(u64, Vec<u32>)>,
}

/// Progress of a stream-optimized extent.
#[derive(Debug)]
struct StreamOut {
    header: SparseExtentHeader,
    /// Byte offset of the next write.
    next: u64,
    current: Option<(u64, Vec<u32>)>,
    gd: Vec<u32>,
}

#[derive(Debug)]
enum OutKind {
    Flat,
    Sparse(SparseOut),
    Stream(StreamOut),
}

/// One extent file being written.
#[derive(Debug)]
struct OutExtent {
    /// Guest bytes `[start, start + len)`.
    start: u64,
    len: u64,
    file: Arc<TargetFile>,
    name: String,
    kind: OutKind,
}

/// The parent of a differencing disk (qemu-img `create -f vmdk -b PARENT`): the
/// child's descriptor names it (spec "The Descriptor File": `parentCID`,
/// `parentFileNameHint`), and grains the child leaves unallocated read from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// `parentFileNameHint`: the parent's name as given (relative names resolve
    /// against the child's directory).
    pub hint: String,
    /// `parentCID`: the parent's content ID when the child was made.
    pub cid: u32,
}

/// Writes a VMDK image.
#[derive(Debug)]
pub struct VmdkWriter {
    subformat: Subformat,
    size: u64,
    zeroed_grain: bool,
    /// The image has a parent: every grain the source's layer stores is written, zeros
    /// too (they must hide the parent), and grains it leaves alone stay unallocated.
    has_parent: bool,
    extents: Vec<OutExtent>,
    /// The descriptor: embedded in extent 0 or a file of its own.
    descriptor: String,
    descriptor_file: Option<(Arc<TargetFile>, String)>,
    /// The last grain placed: placement must move forward (grain tables are written
    /// once, when placement leaves them).
    last_grain: Option<u64>,
}

fn check_text(key: &str, v: &str) -> Result<()> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(Error::invalid(format!(
            "invalid value '{v}' for option '{key}': use letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// `NAME-s001.EXT` style names beside `target` (qemu's naming).
fn extent_path(target: &Path, tag: &str) -> PathBuf {
    let file = target
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match file.rfind('.') {
        Some(i) if i > 0 => (&file[..i], &file[i..]),
        _ => (file.as_str(), ""),
    };
    target.with_file_name(format!("{stem}-{tag}{ext}"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn write_at(file: &TargetFile, name: &str, buf: &[u8], offset: u64) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|e| {
        Error::io(
            name,
            format!("cannot write {} bytes at offset {offset:#x}", buf.len()),
            e,
        )
    })
}

fn set_len(file: &File, name: &str, len: u64) -> Result<()> {
    file.set_len(len)
        .map_err(|e| Error::io(name, format!("cannot set length to {len}"), e))
}

/// A sparse extent header and layout for `capacity` sectors, as qemu lays it out.
fn sparse_layout(capacity: u64, zeroed_grain: bool) -> SparseOut {
    let (version, mut flags) = if zeroed_grain {
        (2, FLAG_ZEROED_GRAIN)
    } else {
        (1, 0)
    };
    flags |= FLAG_NEWLINE_CHECK | FLAG_REDUNDANT_GT;
    let mut h = SparseExtentHeader::new(version, flags);
    h.capacity = capacity;
    h.grain_size = GRAIN_SECTORS;
    h.descriptor_offset = 1;
    h.descriptor_size = EMBEDDED_DESCRIPTOR_SECTORS;
    let gd_entries = h.gd_entries();
    let gd_sectors = (gd_entries * ENTRY_SIZE).div_ceil(SECTOR_SIZE);
    let gts = gd_entries * GT_SECTORS;
    h.rgd_offset = h.descriptor_offset + h.descriptor_size;
    let rgt_sector = h.rgd_offset + gd_sectors;
    h.gd_offset = rgt_sector + gts;
    let gt_sector = h.gd_offset + gd_sectors;
    h.overhead = (gt_sector + gts).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
    SparseOut {
        next: h.overhead,
        header: h,
        gt_sector,
        rgt_sector,
        current: None,
    }
}

impl VmdkWriter {
    /// The `-o` keys vmdk accepts.
    pub const OPTIONS: &'static [&'static str] = &[
        "subformat",
        "adapter_type",
        "hwversion",
        "toolsversion",
        "compat6",
        "zeroed_grain",
    ];

    /// Creates the VMDK target (and its extent files) in `output` with `options`.
    pub fn create(output: &mut Output, params: &CreateParams, options: Options) -> Result<Self> {
        Self::create_over(output, params, options, None)
    }

    /// Creates the VMDK target as [`VmdkWriter::create`] does, a differencing disk of
    /// `parent` when given (sparse and streamOptimized layouts; flat ones cannot have
    /// a parent, as in qemu).
    pub fn create_over(
        output: &mut Output,
        params: &CreateParams,
        mut options: Options,
        parent: Option<Parent>,
    ) -> Result<Self> {
        let names: Vec<&str> = Subformat::ALL.iter().map(|(_, n)| *n).collect();
        let subformat = options
            .take_choice("subformat", &names)?
            .and_then(|s| Subformat::from_name(&s))
            .unwrap_or(Subformat::MonolithicSparse);
        let adapter = options
            .take_choice(
                "adapter_type",
                &["ide", "lsilogic", "buslogic", "legacyESX"],
            )?
            .unwrap_or_else(|| "ide".into());
        let hwversion = options.take("hwversion");
        let toolsversion = options
            .take("toolsversion")
            .unwrap_or_else(|| "2147483647".into());
        let compat6 = options.take_bool("compat6")?.unwrap_or(false);
        let zeroed_grain = options.take_bool("zeroed_grain")?.unwrap_or(false);
        options.finish("vmdk", Self::OPTIONS)?;
        if compat6 && hwversion.is_some() {
            return Err(Error::invalid(
                "compat6 cannot be enabled with hwversion set",
            ));
        }
        let hwversion = hwversion.unwrap_or_else(|| if compat6 { "6" } else { "4" }.into());
        check_text("hwversion", &hwversion)?;
        check_text("toolsversion", &toolsversion)?;

        let target = output.target().to_path_buf();
        let tname = target.display().to_string();
        if parent.is_some()
            && matches!(
                subformat,
                Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
            )
        {
            return Err(Error::invalid(format!(
                "{tname}: Flat image can't have backing file"
            )));
        }
        if params.existing {
            return Err(Error::unsupported(
                &tname,
                "writing into an existing VMDK image (-n)",
            ));
        }
        if params.compress && subformat != Subformat::StreamOptimized {
            return Err(Error::unsupported(
                &tname,
                format!(
                    "compression (-c) of {} VMDK images (use -o subformat=streamOptimized)",
                    subformat.name()
                ),
            ));
        }
        let size = params.virtual_size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let sparse = matches!(
            subformat,
            Subformat::MonolithicSparse | Subformat::TwoGbMaxExtentSparse
        );
        // Grain table entries are u32 sectors, so a sparse file holds at most 2 TiB of
        // grains (checked as grains are placed); the disk may be larger when sparse, as
        // in qemu, up to ESXi's 64 TiB.
        if subformat != Subformat::MonolithicFlat
            && subformat != Subformat::TwoGbMaxExtentFlat
            && size > MAX_SPARSE_SIZE
        {
            return Err(Error::invalid(format!(
                "{tname}: a {} VMDK image can be at most {MAX_SPARSE_SIZE} bytes; the disk is {size} bytes",
                subformat.name()
            )));
        }

        let mut ident = Identity::new(params.identity_seed);
        let mut cid = ident.next_u64()? as u32;
        if cid == CID_NONE {
            cid = 0x0fff_ffff;
        }

        // Files, extent lines.
        let mut extents = Vec::new();
        let mut lines = Vec::new();
        let mut descriptor_file = None;
        match subformat {
            Subformat::MonolithicSparse | Subformat::StreamOptimized => {
                let file = output.create_file(&target)?;
                let kind = if sparse {
                    OutKind::Sparse(sparse_layout(size / SECTOR_SIZE, zeroed_grain))
                } else {
                    OutKind::Stream(stream_layout(size / SECTOR_SIZE, zeroed_grain))
                };
                if size > 0 {
                    lines.push(ExtentLine {
                        access: Access::ReadWrite,
                        sectors: size / SECTOR_SIZE,
                        kind: "SPARSE".into(),
                        file: Some(file_name(&target)),
                        offset: 0,
                    });
                }
                extents.push(OutExtent {
                    start: 0,
                    len: size,
                    file,
                    name: tname.clone(),
                    kind,
                });
            }
            _ => {
                descriptor_file = Some((output.create_file(&target)?, tname.clone()));
                let split = match subformat {
                    Subformat::MonolithicFlat => size,
                    _ => TWO_GB,
                };
                // An empty disk has no extent (qemu writes none either).
                let mut start = 0u64;
                let mut n = 0;
                while start < size {
                    n += 1;
                    let len = split.min(size - start);
                    let tag = match subformat {
                        Subformat::MonolithicFlat => "flat".to_string(),
                        Subformat::TwoGbMaxExtentFlat => format!("f{n:03}"),
                        _ => format!("s{n:03}"),
                    };
                    let path = extent_path(&target, &tag);
                    let name = path.display().to_string();
                    let file = output.create_file(&path)?;
                    let kind = if sparse {
                        OutKind::Sparse(sparse_layout(len / SECTOR_SIZE, zeroed_grain))
                    } else {
                        set_len(&file, &name, len)?;
                        OutKind::Flat
                    };
                    lines.push(ExtentLine {
                        access: Access::ReadWrite,
                        sectors: len / SECTOR_SIZE,
                        kind: if sparse { "SPARSE" } else { "FLAT" }.into(),
                        file: Some(file_name(&path)),
                        offset: 0,
                    });
                    extents.push(OutExtent {
                        start,
                        len,
                        file,
                        name,
                        kind,
                    });
                    start += len;
                }
            }
        }
        let heads: u64 = if adapter == "ide" { 16 } else { 255 };
        let ddb = [
            ("ddb.virtualHWVersion", hwversion),
            (
                "ddb.geometry.cylinders",
                (size / SECTOR_SIZE / (heads * 63)).to_string(),
            ),
            ("ddb.geometry.heads", heads.to_string()),
            ("ddb.geometry.sectors", "63".to_string()),
            ("ddb.adapterType", adapter),
            ("ddb.toolsVersion", toolsversion),
        ];
        let descriptor = NewDescriptor {
            cid,
            parent_cid: parent.as_ref().map_or(CID_NONE, |p| p.cid),
            create_type: subformat.name(),
            parent_file_name_hint: parent.as_ref().map(|p| p.hint.as_str()),
            extents: &lines,
            ddb: &ddb,
        }
        .emit();
        let mut w = VmdkWriter {
            subformat,
            size,
            zeroed_grain,
            has_parent: parent.is_some(),
            extents,
            descriptor,
            descriptor_file,
            last_grain: None,
        };
        w.fit_descriptor()?;
        Ok(w)
    }

    /// Makes room for an embedded descriptor longer than the reserved area.
    fn fit_descriptor(&mut self) -> Result<()> {
        if self.descriptor_file.is_some() {
            return Ok(());
        }
        let sectors = (self.descriptor.len() as u64).div_ceil(SECTOR_SIZE);
        let Some(e) = self.extents.first_mut() else {
            return Ok(());
        };
        match &mut e.kind {
            OutKind::Sparse(s) if sectors > s.header.descriptor_size => {
                Err(Error::invalid(format!(
                    "{}: descriptor of {} bytes does not fit",
                    e.name,
                    self.descriptor.len()
                )))
            }
            OutKind::Stream(s) => {
                s.header.descriptor_size = sectors.max(1);
                let end = s.header.descriptor_offset + s.header.descriptor_size;
                s.header.overhead = end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
                s.next = s.header.overhead * SECTOR_SIZE;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The subformat being written.
    pub fn subformat(&self) -> Subformat {
        self.subformat
    }

    fn extent_index(&self, guest: u64) -> usize {
        self.extents
            .partition_point(|e| e.start + e.len <= guest)
            .min(self.extents.len().saturating_sub(1))
    }
}

/// A stream-optimized header and empty state for `capacity` sectors.
fn stream_layout(capacity: u64, zeroed_grain: bool) -> StreamOut {
    let mut flags = FLAG_NEWLINE_CHECK | FLAG_COMPRESSED | FLAG_MARKERS;
    if zeroed_grain {
        flags |= FLAG_ZEROED_GRAIN;
    }
    let mut h = SparseExtentHeader::new(3, flags);
    h.capacity = capacity;
    h.grain_size = GRAIN_SECTORS;
    h.descriptor_offset = 1;
    h.descriptor_size = 1;
    h.gd_offset = GD_AT_END;
    h.overhead = GRAIN_SECTORS;
    h.compress_algorithm = COMPRESSION_DEFLATE;
    let gd = vec![GTE_UNALLOCATED; h.gd_entries() as usize];
    StreamOut {
        next: h.overhead * SECTOR_SIZE,
        header: h,
        current: None,
        gd,
    }
}

/// The guest bytes of grain `[gs, ge)` of `chunk`: borrowed from the chunk when the
/// grain is whole, a zero-padded copy when it is the disk's partial last one.
fn grain_bytes(chunk: &Chunk, gs: u64, ge: u64) -> Cow<'_, [u8]> {
    match chunk.bytes(gs, ge - gs) {
        Some(b) if b.len() as u64 == GRAIN_BYTES => Cow::Borrowed(b),
        b => {
            let mut v = vec![0u8; GRAIN_BYTES as usize];
            if let Some(b) = b {
                v[..b.len()].copy_from_slice(b);
            }
            Cow::Owned(v)
        }
    }
}

/// The parallel half of [`VmdkWriter`]: which grains of a chunk hold data, and, for
/// streamOptimized, their compressed grain records.
#[derive(Clone, Debug)]
pub struct VmdkEncoder {
    subformat: Subformat,
    size: u64,
    zeroed_grain: bool,
    has_parent: bool,
    /// The first extent's name, for errors.
    name: String,
}

impl ChunkEncoder for VmdkEncoder {
    type Encoded = EncodedChunk;

    fn encode(&self, chunk: &Chunk) -> Result<EncodedChunk> {
        let mut out = EncodedChunk::default();
        if matches!(
            self.subformat,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        ) {
            return Ok(out);
        }
        let end = (chunk.offset + chunk.len).min(self.size);
        if chunk.offset % GRAIN_BYTES != 0 || (end % GRAIN_BYTES != 0 && end != self.size) {
            return Err(Error::invalid(format!(
                "vmdk writer: chunk {:#x}+{:#x} is not aligned to grains",
                chunk.offset, chunk.len
            )));
        }
        let mut gs = chunk.offset;
        while gs < end {
            let ge = (gs + GRAIN_BYTES).min(end);
            let runs = chunk
                .runs
                .iter()
                .filter(|r| r.start < ge && r.start + r.len > gs);
            let (mut data, mut unalloc, mut stored) = (false, false, false);
            for r in runs {
                data |= r.kind == RunKind::Data;
                unalloc |= r.kind == RunKind::Unallocated;
                stored |= r.kind != RunKind::Unallocated;
            }
            let zeros = chunk.bytes(gs, ge - gs).is_none_or(is_zero);
            let nonzero = data && !zeros;
            // Over a parent, what the layer stores is written even when zero (as
            // qemu-img writes it: a zeroed-grain GTE when the grain is wholly zeros and
            // the image has them, else a grain of zeros); the rest of a stored grain
            // holds the parent's bytes (copy on write).
            let write = if self.has_parent {
                stored && !(self.zeroed_grain && !unalloc && zeros)
            } else {
                nonzero
            };
            let g = gs / GRAIN_BYTES;
            if write {
                let bytes = if self.subformat == Subformat::StreamOptimized {
                    let z = grain::deflate(&grain_bytes(chunk, gs, ge))
                        .map_err(|e| Error::io(&self.name, "cannot compress", e))?;
                    let marker = GrainMarker {
                        lba: gs / SECTOR_SIZE,
                        size: z.len() as u32,
                    };
                    let total = (GRAIN_MARKER_SIZE + z.len()).div_ceil(SECTOR_SIZE as usize)
                        * SECTOR_SIZE as usize;
                    let mut v = Vec::with_capacity(total);
                    v.extend_from_slice(&marker.encode());
                    v.extend_from_slice(&z);
                    v.resize(total, 0);
                    Some(v)
                } else {
                    None
                };
                out.grains.push((g, GrainOut::Data(bytes)));
            } else if self.zeroed_grain && !unalloc && (stored || !self.has_parent) {
                out.grains.push((g, GrainOut::Zero));
            }
            gs = ge;
        }
        Ok(out)
    }
}

impl ImageWriter for VmdkWriter {
    type Encoder = VmdkEncoder;

    fn chunk_size(&self) -> u64 {
        CHUNK_SIZE
    }

    fn encoder(&self) -> VmdkEncoder {
        VmdkEncoder {
            subformat: self.subformat,
            size: self.size,
            zeroed_grain: self.zeroed_grain,
            has_parent: self.has_parent,
            name: self
                .extents
                .first()
                .map(|x| x.name.clone())
                .unwrap_or_default(),
        }
    }

    fn place(&mut self, chunk: &Chunk, encoded: EncodedChunk) -> Result<()> {
        if matches!(
            self.subformat,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        ) {
            return self.place_flat(chunk);
        }
        // Runs of whole data grains to write: (extent, file offset, guest offset, length).
        let mut runs: Vec<(usize, u64, u64, u64)> = Vec::new();
        for (g, out) in encoded.grains {
            if self.last_grain.is_some_and(|l| g <= l) {
                return Err(Error::invalid(format!(
                    "vmdk writer: grain {g} placed after grain {}; chunks must be placed in guest order",
                    self.last_grain.unwrap_or_default()
                )));
            }
            self.last_grain = Some(g);
            let gs = g * GRAIN_BYTES;
            let i = self.extent_index(gs);
            let Some(e) = self.extents.get_mut(i) else {
                return Err(Error::invalid("vmdk writer: grain outside the disk"));
            };
            let rel_grain = (gs - e.start) / GRAIN_BYTES;
            let gt = rel_grain / u64::from(GTES_PER_GT);
            let slot = (rel_grain % u64::from(GTES_PER_GT)) as usize;
            match &mut e.kind {
                OutKind::Sparse(s) => {
                    if s.current.as_ref().is_some_and(|(c, _)| *c != gt) {
                        flush_sparse_gt(&e.file, &e.name, s)?;
                    }
                    let gte = match out {
                        GrainOut::Zero => GTE_ZEROED,
                        GrainOut::Data(_) => {
                            let ge = (gs + GRAIN_BYTES).min(self.size);
                            let sector = s.next;
                            let gte = u32::try_from(sector).map_err(|_| {
                                Error::invalid(format!(
                                    "{}: the image file would exceed 2 TiB",
                                    e.name
                                ))
                            })?;
                            let at = sector * SECTOR_SIZE;
                            match (grain_bytes(chunk, gs, ge), runs.last_mut()) {
                                // Whole grains are written from the chunk, runs of
                                // consecutive ones at once (after the loop).
                                (Cow::Borrowed(_), Some(r))
                                    if r.0 == i && r.1 + r.3 == at && r.2 + r.3 == gs =>
                                {
                                    r.3 += GRAIN_BYTES
                                }
                                (Cow::Borrowed(_), _) => runs.push((i, at, gs, GRAIN_BYTES)),
                                // A short last grain, padded with zeros.
                                (Cow::Owned(padded), _) => write_at(&e.file, &e.name, &padded, at)?,
                            }
                            s.next += GRAIN_SECTORS;
                            gte
                        }
                    };
                    let (_, t) = s
                        .current
                        .get_or_insert_with(|| (gt, vec![GTE_UNALLOCATED; GTES_PER_GT as usize]));
                    t[slot] = gte;
                }
                OutKind::Stream(s) => {
                    if s.current.as_ref().is_some_and(|(c, _)| *c != gt) {
                        flush_stream_gt(&e.file, &e.name, s)?;
                    }
                    let gte = match out {
                        GrainOut::Zero => GTE_ZEROED,
                        GrainOut::Data(bytes) => {
                            let bytes = bytes.unwrap_or_default();
                            let gte = u32::try_from(s.next / SECTOR_SIZE).map_err(|_| {
                                Error::invalid(format!(
                                    "{}: the image file would exceed 2 TiB",
                                    e.name
                                ))
                            })?;
                            write_at(&e.file, &e.name, &bytes, s.next)?;
                            s.next += bytes.len() as u64;
                            gte
                        }
                    };
                    let (_, t) = s
                        .current
                        .get_or_insert_with(|| (gt, vec![GTE_UNALLOCATED; GTES_PER_GT as usize]));
                    t[slot] = gte;
                }
                OutKind::Flat => {}
            }
        }
        // The chunk buffer is page-aligned and so are grains (the grain area starts on
        // a grain boundary): these writes can go around the page cache.
        for (i, at, gs, len) in runs {
            let e = &self.extents[i];
            let bytes = chunk.bytes(gs, len).ok_or_else(|| {
                Error::invalid(format!("vmdk writer: no data for grains at {gs:#x}"))
            })?;
            write_at(&e.file, &e.name, bytes, at)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        for (i, e) in self.extents.iter_mut().enumerate() {
            match &mut e.kind {
                OutKind::Flat => {}
                OutKind::Sparse(s) => {
                    flush_sparse_gt(&e.file, &e.name, s)?;
                    let n = s.header.gd_entries();
                    let sector = |base: u64, k: u64| {
                        u32::try_from(base + k * GT_SECTORS).map_err(|_| {
                            Error::invalid(format!("{}: grain tables lie past 2 TiB", e.name))
                        })
                    };
                    let gd = (0..n)
                        .map(|k| sector(s.gt_sector, k))
                        .collect::<Result<Vec<u32>>>()?;
                    let rgd = (0..n)
                        .map(|k| sector(s.rgt_sector, k))
                        .collect::<Result<Vec<u32>>>()?;
                    write_at(
                        &e.file,
                        &e.name,
                        &grain::encode_entries(&rgd),
                        s.header.rgd_offset * SECTOR_SIZE,
                    )?;
                    write_at(
                        &e.file,
                        &e.name,
                        &grain::encode_entries(&gd),
                        s.header.gd_offset * SECTOR_SIZE,
                    )?;
                    if i == 0 && self.descriptor_file.is_none() {
                        write_at(
                            &e.file,
                            &e.name,
                            self.descriptor.as_bytes(),
                            s.header.descriptor_offset * SECTOR_SIZE,
                        )?;
                    }
                    write_at(&e.file, &e.name, &s.header.encode(), 0)?;
                    set_len(&e.file, &e.name, s.next * SECTOR_SIZE)?;
                }
                OutKind::Stream(s) => {
                    flush_stream_gt(&e.file, &e.name, s)?;
                    // Grain directory.
                    let gd_bytes = pad_sector(grain::encode_entries(&s.gd));
                    let gd_sectors = gd_bytes.len() as u64 / SECTOR_SIZE;
                    write_at(
                        &e.file,
                        &e.name,
                        &MetadataMarker::new(MARKER_GD, gd_sectors).encode(),
                        s.next,
                    )?;
                    let gd_at = s.next + SECTOR_SIZE;
                    write_at(&e.file, &e.name, &gd_bytes, gd_at)?;
                    s.next = gd_at + gd_bytes.len() as u64;
                    // Footer: the header with the real GD offset.
                    let mut footer = s.header.clone();
                    footer.gd_offset = gd_at / SECTOR_SIZE;
                    write_at(
                        &e.file,
                        &e.name,
                        &MetadataMarker::new(MARKER_FOOTER, 1).encode(),
                        s.next,
                    )?;
                    write_at(&e.file, &e.name, &footer.encode(), s.next + SECTOR_SIZE)?;
                    write_at(
                        &e.file,
                        &e.name,
                        &MetadataMarker::new(MARKER_EOS, 0).encode(),
                        s.next + 2 * SECTOR_SIZE,
                    )?;
                    s.next += 3 * SECTOR_SIZE;
                    write_at(
                        &e.file,
                        &e.name,
                        self.descriptor.as_bytes(),
                        s.header.descriptor_offset * SECTOR_SIZE,
                    )?;
                    write_at(&e.file, &e.name, &s.header.encode(), 0)?;
                    set_len(&e.file, &e.name, s.next)?;
                }
            }
        }
        if let Some((f, name)) = &self.descriptor_file {
            write_at(f, name, self.descriptor.as_bytes(), 0)?;
            set_len(f, name, self.descriptor.len() as u64)?;
        }
        Ok(())
    }
}

impl VmdkWriter {
    fn place_flat(&mut self, chunk: &Chunk) -> Result<()> {
        for run in chunk.runs.iter().filter(|r| r.kind == RunKind::Data) {
            let Some(bytes) = chunk.bytes(run.start, run.len) else {
                continue;
            };
            let mut pos = run.start;
            let end = (run.start + run.len).min(self.size);
            while pos < end {
                let i = self.extent_index(pos);
                let Some(e) = self.extents.get(i) else {
                    break;
                };
                let t = end.min(e.start + e.len);
                if t <= pos {
                    break;
                }
                let src = &bytes[(pos - run.start) as usize..(t - run.start) as usize];
                if !is_zero(src) {
                    write_at(&e.file, &e.name, src, pos - e.start)?;
                }
                pos = t;
            }
        }
        Ok(())
    }
}

fn pad_sector(mut v: Vec<u8>) -> Vec<u8> {
    let n = (v.len() as u64).div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE;
    v.resize(n as usize, 0);
    v
}

/// Writes the current grain table of a sparse extent to its preallocated place and to
/// the redundant copy.
fn flush_sparse_gt(file: &TargetFile, name: &str, s: &mut SparseOut) -> Result<()> {
    if let Some((gt, entries)) = s.current.take() {
        let bytes = grain::encode_entries(&entries);
        write_at(
            file,
            name,
            &bytes,
            (s.gt_sector + gt * GT_SECTORS) * SECTOR_SIZE,
        )?;
        write_at(
            file,
            name,
            &bytes,
            (s.rgt_sector + gt * GT_SECTORS) * SECTOR_SIZE,
        )?;
    }
    Ok(())
}

/// Appends the current grain table of a stream after a GT marker and records it in
/// the grain directory.
fn flush_stream_gt(file: &TargetFile, name: &str, s: &mut StreamOut) -> Result<()> {
    if let Some((gt, entries)) = s.current.take() {
        let bytes = grain::encode_entries(&entries);
        write_at(
            file,
            name,
            &MetadataMarker::new(MARKER_GT, GT_SECTORS).encode(),
            s.next,
        )?;
        let at = s.next + SECTOR_SIZE;
        write_at(file, name, &bytes, at)?;
        let slot =
            s.gd.get_mut(gt as usize)
                .ok_or_else(|| Error::invalid("vmdk writer: grain table outside the directory"))?;
        *slot = u32::try_from(at / SECTOR_SIZE)
            .map_err(|_| Error::invalid(format!("{name}: the image file would exceed 2 TiB")))?;
        s.next = at + bytes.len() as u64;
    }
    Ok(())
}
