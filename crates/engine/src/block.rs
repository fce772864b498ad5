//! Conversion into a raw target that is not a local file: a block device of a storage
//! cluster (an RBD image), reached through [`BlockTarget`].
//!
//! The target already has the virtual size and reads as zeros where nothing was
//! written (a new RBD image does), so only the source's data runs are written: zero
//! and unallocated ranges never are. Each batch of chunks (bounded by the copy's
//! in-flight memory, see [`ConvertOptions::mem_per_thread`]) goes to
//! [`BlockTarget::write_batch`] at once, which may run its writes concurrently (librbd's
//! asynchronous I/O). The bytes are the same in any order: the result is deterministic.
//! Creating the target, and removing it when the conversion fails or is cancelled, is
//! the caller's.

use vconvert_core::{
    Chunk, CreateParams, Error, ImageReader, ImageWriter, PlainChunks, Result, RunKind,
};

use crate::convert::{copy_image, ConvertOptions};

/// A raw target that is not a local path. Its blocking calls are made from the
/// conversion's threads.
pub trait BlockTarget: Send + Sync {
    /// The target's name in messages (e.g. `rbd:images/ID`).
    fn name(&self) -> &str;
    /// The size of the chunks to copy: the target's natural write unit (an RBD image's
    /// object size), a power of two.
    fn chunk_size(&self) -> u64;
    /// Writes every `(offset, bytes)`, possibly concurrently, and returns once all
    /// are written (the buffers are borrowed until then).
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> std::io::Result<()>;
    /// Makes everything written durable in the target.
    fn flush(&self) -> std::io::Result<()>;
}

/// Converts `src` into `target` as a raw image: its data runs only (see the module
/// doc). `target` must be at least the virtual size and read as zeros. On error or
/// cancellation the target holds part of the image: the caller removes it.
pub fn convert_to_block(
    src: &dyn ImageReader,
    target: &dyn BlockTarget,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    let params = CreateParams {
        virtual_size: src.virtual_size(),
        existing: false,
        target_is_zero: true,
        compress: false,
        identity_seed: None,
    };
    let mut writer = BlockWriter { target };
    copy_image(src, &mut writer, &params, opts)?;
    opts.cancel.check()?;
    writer.finish()
}

/// The [`ImageWriter`] over a [`BlockTarget`].
struct BlockWriter<'a> {
    target: &'a dyn BlockTarget,
}

impl BlockWriter<'_> {
    fn write(&self, chunks: &[Chunk]) -> Result<()> {
        let writes: Vec<(u64, &[u8])> = chunks
            .iter()
            .flat_map(|c| {
                c.runs
                    .iter()
                    .filter(|r| r.kind == RunKind::Data)
                    .filter_map(move |r| Some((r.start, c.bytes(r.start, r.len)?)))
            })
            .collect();
        if writes.is_empty() {
            return Ok(());
        }
        let (first, last) = (writes[0].0, writes[writes.len() - 1]);
        self.target.write_batch(&writes).map_err(|e| {
            Error::io(
                self.target.name(),
                format!(
                    "cannot write data at {first:#x}..{:#x}",
                    last.0 + last.1.len() as u64
                ),
                e,
            )
        })
    }
}

impl ImageWriter for BlockWriter<'_> {
    type Encoder = PlainChunks;

    fn encoder(&self) -> PlainChunks {
        PlainChunks
    }

    fn chunk_size(&self) -> u64 {
        self.target.chunk_size()
    }

    fn place(&mut self, chunk: &Chunk, _encoded: ()) -> Result<()> {
        self.write(std::slice::from_ref(chunk))
    }

    fn place_batch(&mut self, chunks: &[Chunk], _encoded: Vec<()>) -> Result<()> {
        self.write(chunks)
    }

    fn finish(self) -> Result<()> {
        self.target
            .flush()
            .map_err(|e| Error::io(self.target.name(), "cannot flush", e))
    }
}
