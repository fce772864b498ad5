//! The contract between the engine and a format: [`ImageReader`] for sources and
//! [`ImageWriter`] for targets.

use std::ops::Range;

use crate::{BlockMap, Format, Result};

/// What `info` shows of an image, in qemu-img's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageInfo {
    /// The image's format.
    pub format: Format,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes the image's files occupy on disk, if known.
    pub actual_size: Option<u64>,
    /// Cluster, grain or block size, where the format has one.
    pub cluster_size: Option<u64>,
    /// qemu-img's `dirty-flag`.
    pub dirty: bool,
    /// Backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// Backing file format as stored in the image.
    pub backing_format: Option<String>,
    /// The backing file name resolved against the image's directory.
    pub full_backing_file: Option<String>,
    /// qemu-img's `format-specific` object (`{"type": ..., "data": {...}}`), if any.
    pub format_specific: Option<serde_json::Value>,
    /// Internal snapshots (qcow2).
    pub snapshots: Vec<SnapshotInfo>,
}

/// An internal snapshot as `info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: String,
    /// Snapshot name (tag).
    pub name: String,
    /// Bytes of saved VM state.
    pub vm_state_size: u64,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u64,
    /// Creation time: nanoseconds.
    pub date_nsec: u64,
    /// Guest clock at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

impl ImageInfo {
    /// Info with only the format and size set.
    pub fn new(format: Format, virtual_size: u64) -> Self {
        ImageInfo {
            format,
            virtual_size,
            actual_size: None,
            cluster_size: None,
            dirty: false,
            backing_file: None,
            backing_format: None,
            full_backing_file: None,
            format_specific: None,
            snapshots: Vec::new(),
        }
    }
}

/// A readable disk image.
///
/// Reads are positional and take `&self`, so many threads read one image at once.
pub trait ImageReader: Send + Sync {
    /// The image's format.
    fn format(&self) -> Format;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// The block map of `range`, which must lie within `[0, virtual_size)`.
    fn block_map(&self, range: Range<u64>) -> Result<BlockMap>;

    /// Fills `buf` with the guest bytes at `offset` (`offset + buf.len()` must not exceed
    /// the virtual size). Unallocated ranges read as zeros or from the backing image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// What `info` shows.
    fn info(&self) -> Result<ImageInfo>;

    /// Findings that make the image unsafe to accept from a stranger even though it
    /// reads (e.g. a qcow2 corrupt bit, a VHD checksum mismatch, a VMDK footer that
    /// disagrees with its header). The inspector turns them into violations under an
    /// untrusted policy. Default: none.
    fn safety_findings(&self) -> Vec<String> {
        Vec::new()
    }

    /// The identifier a child disk names this image by when it is a parent (a VHDX's
    /// `DataWriteGuid`, MS-VHDX 2.2.2.1, which a child's `parent_linkage` must match), so
    /// a reader can tell that its parent changed since the child was made. Default:
    /// none (the format names no such identifier).
    fn parent_identity(&self) -> Option<String> {
        None
    }

    /// Things worth a warning that do not make the image unsafe (e.g. a VMDK sparse
    /// extent whose `uncleanShutdown` flag is set: VMware sets it while a disk is open).
    /// `info` prints them; the inspector reports them without refusing. Default: none.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Checks the image's metadata for consistency (qemu-img `check`). `None` when the
    /// format has nothing to check (raw, as in qemu-img).
    fn check(&self) -> Option<Result<CheckReport>> {
        None
    }

    /// The part of [`ImageReader::check`] that reads metadata only (never a data
    /// cluster, grain or block), in time linear in the metadata's size: what the
    /// inspector runs on an untrusted image before converting it. Default: `check`.
    fn check_metadata(&self) -> Option<Result<CheckReport>> {
        self.check()
    }

    /// The host file that [`crate::Location::File`] number `index` of this image's block
    /// maps refers to, when the reader can lend it: lets the engine see holes in the
    /// host file (a static VDI's unwritten blocks, say) as zeros, as qemu does.
    fn host_file(&self, _index: u32) -> Option<&crate::ImageFile> {
        None
    }

    /// qemu's block status of `range` (inside the virtual disk) in this image alone,
    /// as its qemu block driver reports it: unallocated ranges (where a backing image
    /// shows) carry neither data nor zero. Default: [`crate::status_of_map`] of
    /// [`ImageReader::block_map`], right for images without a backing image.
    fn layer_status(&self, range: Range<u64>) -> Result<Vec<crate::LayerStatus>> {
        Ok(crate::status_of_map(&self.block_map(range)?))
    }

    /// The backing image (parent) this image reads its unallocated ranges from.
    fn backing(&self) -> Option<&dyn ImageReader> {
        None
    }

    /// Whether the format has backing images (qemu's `supports_backing`): its
    /// unallocated ranges then read as zeros where no backing image covers them.
    fn supports_backing(&self) -> bool {
        false
    }
}

/// Checks that `range` is a forward range inside a virtual disk of `size` bytes; the
/// error names `file`.
pub fn check_guest_range(file: &str, range: &Range<u64>, size: u64) -> Result<()> {
    if range.start > range.end || range.end > size {
        return Err(crate::Error::invalid(format!(
            "{file}: range {:#x}..{:#x} is outside the virtual disk ({size} bytes)",
            range.start, range.end
        )));
    }
    Ok(())
}

/// Splits the `Data(File)` extents of `map` that lie over holes of their host file
/// (found with `SEEK_DATA`/`SEEK_HOLE`) into [`crate::ExtentKind::Zero`]: holes read as
/// zeros, and need neither reading nor storing.
pub fn refine_host_holes(map: BlockMap, reader: &dyn ImageReader) -> Result<BlockMap> {
    use crate::{ExtentKind, Location};
    let mut out = BlockMap::new(map.start());
    for e in map.extents() {
        let ExtentKind::Data(Location::File { file, offset }) = e.kind else {
            out.push(e.len, e.kind);
            continue;
        };
        let Some(host) = reader.host_file(file) else {
            out.push(e.len, e.kind);
            continue;
        };
        let storage = host.storage();
        let io = |err| crate::Error::io(host.name(), "cannot find data and holes", err);
        let end = offset.saturating_add(e.len);
        let mut pos = offset;
        while pos < end {
            let data = match storage.next_data(pos).map_err(io)? {
                Some(d) => d.clamp(pos, end),
                None => end,
            };
            out.push(data - pos, ExtentKind::Zero);
            if data >= end {
                break;
            }
            let hole = storage.next_hole(data).map_err(io)?.clamp(data, end);
            let hole = if hole == data { end } else { hole };
            out.push(
                hole - data,
                ExtentKind::Data(Location::File { file, offset: data }),
            );
            pos = hole;
        }
    }
    Ok(out)
}

/// What `check` found, in qemu-img's terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that make data wrong or unreadable (each a sentence).
    pub corruptions: Vec<String>,
    /// Space allocated but not used (each a sentence).
    pub leaks: Vec<String>,
    /// Clusters leaked, as qemu counts them.
    pub leaked_clusters: u64,
    /// Errors that stopped the check from completing.
    pub check_errors: u64,
    /// Offset of the end of the image's used space, where the format knows it.
    pub image_end_offset: Option<u64>,
    /// Clusters (or blocks, grains) of the virtual disk, where the format has them.
    pub total_clusters: Option<u64>,
    /// Of which allocated.
    pub allocated_clusters: Option<u64>,
    /// Of which not contiguous with the previous one.
    pub fragmented_clusters: Option<u64>,
    /// Of which compressed.
    pub compressed_clusters: Option<u64>,
}

/// How a writer is asked to create its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateParams {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The target exists and is written in place (qemu-img's `-n`).
    pub existing: bool,
    /// The target already reads as zeros (a fresh file, or `--target-is-zero`): zero and
    /// unallocated ranges need not be written.
    pub target_is_zero: bool,
    /// Compress data (qemu-img's `-c`).
    pub compress: bool,
    /// Seed for the identifiers a format stores (UUIDs, CIDs, unique ids, timestamps):
    /// `None` for fresh random ones, `Some` for reproducible output (tests, builds).
    /// Writers get them from [`crate::Identity`].
    pub identity_seed: Option<u64>,
}

/// What a range of a [`Chunk`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// Bytes in the chunk's buffer.
    Data,
    /// Zeros: allocated as zeros in the source, or data found to be all zero.
    Zero,
    /// Unallocated in the source.
    Unallocated,
}

/// A guest range inside a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Guest byte offset.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it is.
    pub kind: RunKind,
}

/// A piece of the source handed to a writer: `len` guest bytes from `offset`, covered by
/// coalesced `runs`. `offset` is a multiple of the writer's chunk size and `len` equals
/// it, except for the last chunk of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Guest byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Ordered runs covering `[offset, offset + len)`.
    pub runs: Vec<Run>,
    /// `len` bytes when any run is data (zeros outside data runs), else empty.
    pub data: crate::IoBuffer,
}

impl Chunk {
    /// True when any run is data.
    pub fn has_data(&self) -> bool {
        self.runs.iter().any(|r| r.kind == RunKind::Data)
    }

    /// For each `block`-sized piece of the chunk (the chunk starts on a block boundary;
    /// the last piece may be short): does it hold a non-zero byte? Block formats (VDI,
    /// VHD) allocate only those.
    pub fn nonzero_blocks(&self, block: u64) -> Vec<bool> {
        let mut out = Vec::new();
        let end = self.offset + self.len;
        let mut start = self.offset;
        while start < end && block > 0 {
            let len = block.min(end - start);
            let has_data = self.runs.iter().any(|r| {
                r.kind == RunKind::Data && r.start < start + len && r.start + r.len > start
            });
            out.push(has_data && self.bytes(start, len).is_some_and(|b| !crate::is_zero(b)));
            start += len;
        }
        out
    }

    /// The bytes of `[start, start + len)` (guest offsets inside the chunk); `None` when
    /// the chunk carries no data buffer (all zero).
    pub fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
        if self.data.is_empty() {
            return None;
        }
        let s = (start - self.offset) as usize;
        Some(&self.data[s..s + len as usize])
    }
}

/// The parallel half of an [`ImageWriter`]: prepares chunks (compression, zero checks)
/// without knowing where they will go, so that it can run on many chunks at once, and
/// while the writer places earlier ones.
pub trait ChunkEncoder: Send + Sync {
    /// What [`ChunkEncoder::encode`] produces (`()` when the chunk's bytes are written
    /// as they are).
    type Encoded: Send;

    /// Prepares one chunk; runs in parallel with other chunks and with placement.
    fn encode(&self, chunk: &Chunk) -> Result<Self::Encoded>;

    /// Whether [`ChunkEncoder::encode`] does no work: the conversion then calls it on
    /// the placing thread rather than start threads to run it beside placement.
    fn is_trivial(&self) -> bool {
        false
    }
}

/// The encoder of writers whose chunks need no preparation.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainChunks;

impl ChunkEncoder for PlainChunks {
    type Encoded = ();

    fn encode(&self, _chunk: &Chunk) -> Result<()> {
        Ok(())
    }

    fn is_trivial(&self) -> bool {
        true
    }
}

/// The encoder of writers that allocate fixed-size blocks: for each block of the chunk
/// (of `block_size` bytes, from the chunk's start), whether it holds non-zero bytes.
#[derive(Clone, Copy, Debug)]
pub struct NonzeroBlocks {
    /// The block size in bytes; 0 for a layout without blocks (nothing is scanned).
    pub block_size: u64,
}

impl ChunkEncoder for NonzeroBlocks {
    type Encoded = Vec<bool>;

    fn encode(&self, chunk: &Chunk) -> Result<Vec<bool>> {
        Ok(match self.block_size {
            0 => Vec::new(),
            b => chunk.nonzero_blocks(b),
        })
    }
}

/// What a writer's encoder makes of one chunk.
pub type Encoded<W> = <<W as ImageWriter>::Encoder as ChunkEncoder>::Encoded;

/// A writable target format.
///
/// The engine drives a writer in two phases per batch of chunks: its
/// [`ChunkEncoder`] runs in parallel on the batch's chunks (compression, zero checks),
/// then [`place`] runs once per chunk **in guest order** with the chunk and its
/// encoding, so placement, and hence the output, is the same whatever the thread count.
/// The engine encodes the next batch while the writer places the current one. Chunks
/// are lent, not given: the engine reuses their buffers. [`finish`] writes remaining
/// metadata and flushes; the engine then syncs and renames the files of the
/// [`crate::Output`].
///
/// [`place`]: ImageWriter::place
/// [`finish`]: ImageWriter::finish
pub trait ImageWriter: Send + Sync {
    /// The writer's parallel half.
    type Encoder: ChunkEncoder;

    /// The encoder for this writer's chunks (a copy of the settings it needs).
    fn encoder(&self) -> Self::Encoder;

    /// The chunk size the writer wants (a multiple of its cluster, grain or block size).
    fn chunk_size(&self) -> u64;

    /// Writes one chunk and its encoding; called in guest order. Chunks with no data
    /// may be skipped by the engine when the target already reads as zeros.
    fn place(&mut self, chunk: &Chunk, encoded: Encoded<Self>) -> Result<()>;

    /// Places a batch of chunks, in guest order. The default calls
    /// [`ImageWriter::place`] for each; a writer may instead assign every location in
    /// order first and then write the batch's data in parallel on `workers` (the
    /// conversion's thread count).
    fn place_batch(
        &mut self,
        chunks: &[Chunk],
        encoded: Vec<Encoded<Self>>,
        workers: &crate::Workers,
    ) -> Result<()> {
        let _ = workers;
        for (chunk, e) in chunks.iter().zip(encoded) {
            self.place(chunk, e)?;
        }
        Ok(())
    }

    /// Completes the image (metadata, footers) and flushes it.
    fn finish(self) -> Result<()>;
}
