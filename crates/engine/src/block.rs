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
//!
//! An observer, when given, sees every byte of the converted image in guest order
//! (zeros included) while the batch holding them is written, so a caller can hash what
//! it stored without reading it back.

use vconvert_core::{
    Chunk, CreateParams, Error, ImageReader, ImageWriter, PlainChunks, Result, RunKind, Workers,
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

/// Sees the converted image's bytes in guest order, every one of them, as they are
/// written (see the module doc).
pub type Observer<'a> = &'a mut (dyn FnMut(&[u8]) + Send + Sync);

/// Converts `src` into `target` as a raw image: its data runs only (see the module
/// doc); `observe` (if any) is fed the whole image in guest order. `target` must be at
/// least the virtual size and read as zeros. On error or cancellation the target holds
/// part of the image: the caller removes it.
pub fn convert_to_block(
    src: &dyn ImageReader,
    target: &dyn BlockTarget,
    opts: &ConvertOptions<'_>,
    observe: Option<Observer<'_>>,
) -> Result<()> {
    let params = CreateParams {
        virtual_size: src.virtual_size(),
        existing: false,
        target_is_zero: true,
        compress: false,
        identity_seed: None,
    };
    let mut writer = BlockWriter {
        target,
        observe,
        observed: 0,
        size: src.virtual_size(),
    };
    copy_image(src, &mut writer, &params, opts)?;
    opts.cancel.check()?;
    writer.finish()
}

/// Zeros fed to an observer for the ranges no chunk covers.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Feeds `n` zeros to `observe`.
fn observe_zeros(observe: &mut (dyn FnMut(&[u8]) + Send + Sync), mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64);
        observe(&ZEROS[..k as usize]);
        n -= k;
    }
}

/// The [`ImageWriter`] over a [`BlockTarget`].
struct BlockWriter<'a, 'o> {
    target: &'a dyn BlockTarget,
    observe: Option<Observer<'o>>,
    /// Guest bytes fed to `observe` so far.
    observed: u64,
    /// The virtual size.
    size: u64,
}

impl BlockWriter<'_, '_> {
    fn write(&mut self, chunks: &[Chunk]) -> Result<()> {
        let writes: Vec<(u64, &[u8])> = chunks
            .iter()
            .flat_map(|c| {
                c.runs
                    .iter()
                    .filter(|r| r.kind == RunKind::Data)
                    .filter_map(move |r| Some((r.start, c.bytes(r.start, r.len)?)))
            })
            .collect();
        let target = self.target;
        let write = || {
            if writes.is_empty() {
                return Ok(());
            }
            let (first, last) = (writes[0].0, writes[writes.len() - 1]);
            target.write_batch(&writes).map_err(|e| {
                Error::io(
                    target.name(),
                    format!(
                        "cannot write data at {first:#x}..{:#x}",
                        last.0 + last.1.len() as u64
                    ),
                    e,
                )
            })
        };
        let Some(observe) = self.observe.as_mut() else {
            return write();
        };
        // The observer reads the batch while it is written (chunks come in guest order).
        let observed = &mut self.observed;
        let (written, ()) = rayon::join(write, || {
            for c in chunks {
                observe_zeros(&mut **observe, c.offset.saturating_sub(*observed));
                match c.data.get(..c.len as usize) {
                    Some(bytes) if !c.data.is_empty() => observe(bytes),
                    _ => observe_zeros(&mut **observe, c.len),
                }
                *observed = c.offset + c.len;
            }
        });
        written
    }
}

impl ImageWriter for BlockWriter<'_, '_> {
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

    fn place_batch(
        &mut self,
        chunks: &[Chunk],
        _encoded: Vec<()>,
        _workers: &Workers,
    ) -> Result<()> {
        self.write(chunks)
    }

    fn finish(mut self) -> Result<()> {
        if let Some(observe) = self.observe.as_mut() {
            observe_zeros(&mut **observe, self.size.saturating_sub(self.observed));
        }
        self.target
            .flush()
            .map_err(|e| Error::io(self.target.name(), "cannot flush", e))
    }
}
