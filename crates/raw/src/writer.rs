//! Writing raw images: sparse by default, holes never written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vconvert_core::{
    Chunk, CreateParams, Error, ImageWriter, Options, Output, PlainChunks, Result, RunKind,
    TargetFile, Workers,
};

/// How the raw target's space is reserved (qemu-img's `preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preallocation {
    /// Sparse file: only data is written.
    Off,
    /// Space reserved with `fallocate`, reads as zeros.
    Falloc,
    /// Every byte written (zeros where there is no data).
    Full,
}

/// Chunk size the raw writer asks for.
const CHUNK_SIZE: u64 = 2 << 20;

/// Writes a raw image.
#[derive(Debug)]
pub struct RawWriter {
    file: Arc<TargetFile>,
    name: String,
    target_is_zero: bool,
}

impl RawWriter {
    /// The `-o` keys raw accepts.
    pub const OPTIONS: &'static [&'static str] = &["preallocation"];

    /// Creates the raw target in `output` (or opens it in place) with `options`.
    pub fn create(
        output: &mut Output,
        params: &CreateParams,
        mut options: Options,
    ) -> Result<Self> {
        let prealloc = match options
            .take_choice("preallocation", &["off", "falloc", "full"])?
            .as_deref()
        {
            Some("falloc") => Preallocation::Falloc,
            Some("full") => Preallocation::Full,
            _ => Preallocation::Off,
        };
        options.finish("raw", Self::OPTIONS)?;
        let target = output.target().to_path_buf();
        let name = target.display().to_string();
        if params.compress {
            return Err(Error::unsupported(&name, "compression (-c) of raw images"));
        }
        let file = output.create_file(&target)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(&name, "cannot stat", e))?
            .len();
        let size = params.virtual_size;
        if params.existing {
            if len < size {
                return Err(Error::invalid(format!(
                    "{name}: existing target ({len} bytes) is smaller than the source ({size} bytes)"
                )));
            }
        } else {
            file.set_len(size)
                .map_err(|e| Error::io(&name, format!("cannot set length to {size}"), e))?;
            match prealloc {
                Preallocation::Off => {}
                Preallocation::Falloc => {
                    rustix::fs::fallocate(&*file, rustix::fs::FallocateFlags::empty(), 0, size)
                        .map_err(|e| Error::io(&name, "cannot preallocate (falloc)", e.into()))?;
                }
                Preallocation::Full => write_zeros(&file, &name, 0, size)?,
            }
        }
        Ok(RawWriter {
            file,
            name,
            target_is_zero: params.target_is_zero,
        })
    }
}

/// Writes `len` zero bytes at `offset`.
fn write_zeros(file: &File, name: &str, offset: u64, len: u64) -> Result<()> {
    const BUF: u64 = 1 << 20;
    let zeros = vec![0u8; BUF.min(len) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = BUF.min(offset + len - pos) as usize;
        file.write_all_at(&zeros[..n], pos)
            .map_err(|e| Error::io(name, format!("cannot write zeros at offset {pos:#x}"), e))?;
        pos += n as u64;
    }
    Ok(())
}

impl RawWriter {
    /// Writes the chunk's data runs at their guest offsets and makes its zero runs
    /// read as zeros (unless the target already does).
    fn write_chunk(&self, chunk: &Chunk) -> Result<()> {
        for run in &chunk.runs {
            match run.kind {
                RunKind::Data => {
                    let bytes = chunk.bytes(run.start, run.len).unwrap_or_default();
                    vconvert_core::write_all_at(&self.file, &self.name, bytes, run.start, "data")?;
                }
                RunKind::Zero | RunKind::Unallocated if !self.target_is_zero => {
                    let punched = rustix::fs::fallocate(
                        &*self.file,
                        rustix::fs::FallocateFlags::PUNCH_HOLE
                            | rustix::fs::FallocateFlags::KEEP_SIZE,
                        run.start,
                        run.len,
                    );
                    if punched.is_err() {
                        write_zeros(&self.file, &self.name, run.start, run.len)?;
                    }
                }
                RunKind::Zero | RunKind::Unallocated => {}
            }
        }
        Ok(())
    }
}

impl ImageWriter for RawWriter {
    type Encoder = PlainChunks;

    fn chunk_size(&self) -> u64 {
        CHUNK_SIZE
    }

    fn encoder(&self) -> PlainChunks {
        PlainChunks
    }

    fn place(&mut self, chunk: &Chunk, _encoded: ()) -> Result<()> {
        self.write_chunk(chunk)
    }

    /// A raw chunk's place is its guest offset, so the chunks of a batch are written
    /// in parallel: several writes in flight keep the disk busy when they go around the
    /// page cache, and the bytes are the same in any order.
    fn place_batch(
        &mut self,
        chunks: &[Chunk],
        _encoded: Vec<()>,
        workers: &Workers,
    ) -> Result<()> {
        // Its data runs, joined where they touch, are allocated first so that their
        // direct writes run at once (see `TargetFile::reserve`).
        let mut pending: Option<std::ops::Range<u64>> = None;
        let data = chunks
            .iter()
            .flat_map(|c| c.runs.iter())
            .filter(|r| r.kind == RunKind::Data);
        for r in data {
            match pending.as_mut() {
                Some(p) if p.end == r.start => p.end += r.len,
                _ => {
                    if let Some(p) = pending.replace(r.start..r.start + r.len) {
                        self.file.reserve(p.start, p.end - p.start);
                    }
                }
            }
        }
        if let Some(p) = pending {
            self.file.reserve(p.start, p.end - p.start);
        }
        let this = &*self;
        this.file
            .writers(workers)
            .try_for_each(chunks, |c| this.write_chunk(c))
    }

    fn finish(self) -> Result<()> {
        Ok(())
    }
}
