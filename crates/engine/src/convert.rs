//! The parallel sparse copy from any [`ImageReader`] to any [`ImageWriter`].
//!
//! The disk is walked in windows whose block map is fetched lazily. Chunks of the
//! writer's chunk size that hold data are read, zero-scanned and encoded in parallel
//! ([`Workers`]: threads that block when idle, never spin), then placed by the writer
//! in guest order, so the output is the same at any thread count. A few batches of
//! chunks are in memory at a time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vconvert_core::{
    zero_runs, BlockMap, Chunk, ChunkEncoder, CreateParams, Encoded, Error, ExtentKind, Format,
    ImageReader, ImageWriter, IoBuffer, Options, Output, Result, Run, RunKind, ThreadBudget,
    Workers,
};

use crate::registry::{with_writer, WriterJob};

/// Largest window of the source's block map fetched at once while it holds no data.
const MAX_WINDOW: u64 = 1 << 30;

/// Cap on `threads x mem_per_thread`, so that memory stays bounded at any thread count
/// (measured before the cap: peak RSS 427 MiB with `-m 16`, 942 MiB with `-m 64`; at
/// this cap the batches still hold several chunks per thread).
const MAX_IN_FLIGHT: u64 = 256 << 20;

/// How often a durable conversion flushes what it has written so far (see
/// [`Output::sync_in_background`]): the disk then works while the conversion does,
/// instead of the final sync writing everything after it.
const WRITEBACK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// A shared flag that cancels a running conversion; the target is then removed.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        CancelToken::default()
    }

    /// Asks the conversion to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Progress of a conversion: guest bytes done out of the virtual size.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// The bytes of a raw target, in order from its first byte to its last, as they are
/// placed (see [`ConvertOptions::observe_raw`]).
#[derive(Clone, Copy, Debug)]
pub enum RawBytes<'a> {
    /// These bytes.
    Data(&'a [u8]),
    /// This many zero bytes.
    Zeros(u64),
}

/// Sees a raw target's bytes as they are placed (see [`ConvertOptions::observe_raw`]).
pub type RawObserver<'a> = &'a (dyn Fn(RawBytes<'_>) + Sync);

/// How to convert.
#[derive(Clone)]
pub struct ConvertOptions<'a> {
    /// Worker threads (`-m`) that encode and write; 0 means every core (with
    /// `shared_threads`, the caller's and the whole budget). Reading (and decompressing) the source
    /// runs on as many threads again.
    pub threads: usize,
    /// Extra threads shared with the other conversions given the same budget (a
    /// service's running imports): each parallel step borrows up to `threads - 1`
    /// from it while it runs and makes do with what is free, so together the
    /// conversions never start more than the budget beyond their own reading and
    /// placing threads. `None`: this conversion starts its own. The output is the
    /// same either way.
    pub shared_threads: Option<ThreadBudget>,
    /// Zero detection granularity in bytes (`-S`, default 4 KiB); 0 disables detection
    /// and makes the output fully allocated, as qemu-img does.
    pub sparse_size: u64,
    /// Bound on in-flight buffers per thread, in bytes (their total is also capped at
    /// 256 MiB, whatever the thread count).
    pub mem_per_thread: u64,
    /// Rename the finished target into place without flushing it to stable storage
    /// (qemu-img's `-t unsafe`). Off by default: a finished conversion is durable.
    pub no_sync: bool,
    /// Write page-aligned data around the page cache (`O_DIRECT`, qemu-img's `-t none`)
    /// where the filesystem allows it. On by default; used only when the target is
    /// synced (`no_sync` off), since then the data has to reach the disk anyway.
    pub direct: bool,
    /// Write into an existing target (`-n`).
    pub existing: bool,
    /// The existing target already reads as zeros (`--target-is-zero`).
    pub target_is_zero: bool,
    /// Compress (`-c`).
    pub compress: bool,
    /// Stops the conversion when cancelled.
    pub cancel: CancelToken,
    /// Called after every batch with (bytes done, total).
    pub progress: Option<Progress<'a>>,
    /// Seed for stored identifiers (see [`CreateParams::identity_seed`]).
    pub identity_seed: Option<u64>,
    /// Limit on the guest bytes processed per second (qemu-img's `-r`); `None`: no limit.
    pub rate_limit: Option<u64>,
    /// The virtual size of the target's backing file, when it has one (qemu-img's `-B`,
    /// given to the writer as the `backing_file` option): as qemu-img does, only what
    /// the source's own layer allocates is copied (data, and zeros as zeros); what it
    /// leaves to its backing image stays unallocated, to read from the target's backing
    /// file, which must hold the same content. Zeros past the backing file's end are
    /// not stored (the target reads zeros there).
    pub target_backing_size: Option<u64>,
    /// Given every byte of a new raw target once, in order, as batches are placed: a
    /// caller hashes the output while it is written instead of reading it again. The
    /// pieces cover exactly `0..virtual size`; ranges the conversion leaves as holes
    /// come as [`RawBytes::Zeros`]. Only for a new raw target (not `existing`): any
    /// other target is refused, since its bytes are not the guest's in order.
    pub observe_raw: Option<RawObserver<'a>>,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            threads: 0,
            shared_threads: None,
            sparse_size: 4096,
            mem_per_thread: 64 << 20,
            no_sync: false,
            direct: true,
            existing: false,
            target_is_zero: false,
            compress: false,
            cancel: CancelToken::new(),
            progress: None,
            identity_seed: None,
            rate_limit: None,
            target_backing_size: None,
            observe_raw: None,
        }
    }
}

/// Converts `src` into a new `format` image at `target` with creation `options`.
///
/// The target is written as a temporary file beside it and renamed into place once
/// complete and synced; on any error or cancellation no target file remains (with
/// `existing`, the target is written in place, as qemu-img `-n` does).
pub fn convert(
    src: &dyn ImageReader,
    target: &Path,
    format: Format,
    options: Options,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    if opts.observe_raw.is_some() && (format != Format::Raw || opts.existing) {
        return Err(Error::invalid(format!(
            "only a new raw target's bytes can be observed as they are written, not {}",
            if opts.existing {
                "an existing target's".to_string()
            } else {
                format!("a {format} target's")
            }
        )));
    }
    let mut output = Output::new(target, opts.existing);
    if !opts.no_sync {
        output.write_direct(opts.direct);
        output.sync_in_background(WRITEBACK_INTERVAL);
    }
    let params = CreateParams {
        virtual_size: src.virtual_size(),
        existing: opts.existing,
        // Over a backing file, zeros must be written too.
        target_is_zero: (!opts.existing || opts.target_is_zero)
            && opts.target_backing_size.is_none(),
        compress: opts.compress,
        identity_seed: opts.identity_seed,
    };
    with_writer(
        format,
        &mut output,
        &params,
        options,
        CopyJob {
            src,
            opts,
            params: &params,
        },
    )?;
    opts.cancel.check()?;
    output.commit_with(!opts.no_sync)
}

struct CopyJob<'a, 'b> {
    src: &'a dyn ImageReader,
    opts: &'a ConvertOptions<'b>,
    params: &'a CreateParams,
}

impl WriterJob for CopyJob<'_, '_> {
    fn run<W: ImageWriter>(self, mut writer: W) -> Result<()> {
        copy_image(self.src, &mut writer, self.params, self.opts)?;
        writer.finish()
    }
}

/// Streams every chunk of `src` that the target needs through `writer` (without
/// calling [`ImageWriter::finish`]).
pub fn copy_image<W: ImageWriter>(
    src: &dyn ImageReader,
    writer: &mut W,
    params: &CreateParams,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    let threads = match (opts.threads, &opts.shared_threads) {
        // The caller's thread and the whole budget: a conversion alone uses it all.
        (0, Some(budget)) => budget.threads() + 1,
        (0, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (n, _) => n,
    };
    // Threads that block when idle (see `Workers`): encoding and placement use
    // `threads` of them, reading as many more (all borrowed from a shared budget).
    let workers = match &opts.shared_threads {
        Some(budget) => Workers::shared(threads, budget),
        None => Workers::new(threads),
    };

    let size = src.virtual_size();
    let chunk_size = writer.chunk_size().max(512);
    // Four batches are in flight: one being read, one queued, one being encoded and one
    // being placed; each chunk holds its source bytes and, at most, an encoded copy.
    let budget = opts
        .mem_per_thread
        .saturating_mul(threads as u64)
        .min(MAX_IN_FLIGHT);
    let mut batch = (budget / (8 * chunk_size)).clamp(1, 4096) as usize;
    // Under a rate limit, batches of about a tenth of a second's budget, so the output
    // grows (and progress moves) smoothly instead of in bursts followed by long sleeps.
    if let Some(rate) = opts.rate_limit.filter(|r| *r > 0) {
        batch = batch.min((rate / 10 / chunk_size).max(1) as usize);
    }
    let report = |done: u64| {
        if let Some(p) = opts.progress {
            p(done, size);
        }
    };
    report(0);
    let started = std::time::Instant::now();
    let mut processed = 0u64;
    let throttle = |processed: u64| {
        if let Some(rate) = opts.rate_limit.filter(|r| *r > 0) {
            let due = std::time::Duration::from_secs_f64(processed as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    };
    // The reader side runs one batch ahead of encoding and placement, on threads of its
    // own: placement blocks in writes (direct writes wait for the disk), and reads
    // (with decompression) must go on meanwhile. Measured: compressed qcow2 -> raw
    // 1.4-1.55 s with one pool for both, 1.07-1.11 s with two.
    let buffers = BufferPool::default();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(1);
        let reader = Reader {
            buffers: &buffers,
            src,
            workers: &workers,
            chunk_size,
            batch,
            sparse_size: opts.sparse_size,
            every_chunk: opts.sparse_size == 0 || !params.target_is_zero,
            cancel: &opts.cancel,
            top_layer: opts.target_backing_size,
        };
        scope.spawn(move || reader.run(&tx));
        let encoder = writer.encoder();
        // How far the raw observer has been given the target's bytes.
        let mut observed = 0u64;
        let mut placed_batch = |placed: Option<Batch>| {
            if let Some(batch) = placed {
                processed += batch.chunks.iter().map(|c| c.len).sum::<u64>();
                if let Some(observe) = opts.observe_raw {
                    observed = observe_chunks(observe, &batch.chunks, observed);
                }
                for chunk in batch.chunks {
                    buffers.put(chunk.data);
                }
                throttle(processed);
                report(batch.done);
            }
        };
        // Placement is the serial part: batch N is placed while batch N + 1 is encoded,
        // so the encoding threads do not wait for it (placement order, and so the
        // output, stay the same).
        let mut encoded_batch: Option<(Batch, Vec<Encoded<W>>)> = None;
        for msg in rx {
            let batch = msg?;
            opts.cancel.check()?;
            let previous = encoded_batch.take();
            let (encoded, placed) = if encoder.is_trivial() {
                // Nothing to overlap: two thread starts a batch saved.
                let placed = place_encoded(&mut *writer, previous, &workers);
                (
                    batch.chunks.iter().map(|c| encoder.encode(c)).collect(),
                    placed,
                )
            } else {
                workers.join(
                    || workers.map(&batch.chunks, |chunk| encoder.encode(chunk)),
                    || place_encoded(&mut *writer, previous, &workers),
                )
            };
            // Errors in guest order: the earlier batch's placement first, then the first
            // chunk that failed to encode.
            placed_batch(placed?);
            let encoded = encoded.into_iter().collect::<Result<Vec<_>>>()?;
            encoded_batch = Some((batch, encoded));
        }
        placed_batch(place_encoded(&mut *writer, encoded_batch, &workers)?);
        if let Some(observe) = opts.observe_raw {
            if observed < size {
                observe(RawBytes::Zeros(size - observed));
            }
        }
        // The reader stops early only by sending an error (handled above) or when the
        // channel closes after the last batch.
        opts.cancel.check()
    })
}

/// Gives `observe` the raw target's bytes from `from` to the end of `chunks` (placed, in
/// guest order): the gaps between chunks and chunks without data are zeros. Returns
/// where it stopped.
fn observe_chunks(observe: RawObserver<'_>, chunks: &[Chunk], from: u64) -> u64 {
    let mut at = from;
    for c in chunks {
        if c.offset > at {
            observe(RawBytes::Zeros(c.offset - at));
        }
        match c.data.get(..c.len as usize).filter(|_| c.has_data()) {
            Some(data) => observe(RawBytes::Data(data)),
            None => observe(RawBytes::Zeros(c.len)),
        }
        at = c.offset + c.len;
    }
    at
}

/// Places an encoded batch, if any, and gives the batch back (to recycle its buffers).
fn place_encoded<W: ImageWriter>(
    writer: &mut W,
    encoded: Option<(Batch, Vec<Encoded<W>>)>,
    workers: &Workers,
) -> Result<Option<Batch>> {
    let Some((batch, encoded)) = encoded else {
        return Ok(None);
    };
    writer.place_batch(&batch.chunks, encoded, workers)?;
    Ok(Some(batch))
}

/// Chunk buffers returned after placement, reused by the reader: fresh buffers would
/// cost a page fault per 4 KiB. They are page-aligned ([`IoBuffer`]): the
/// kernel copies into and out of them five times faster than into a plain `Vec`.
#[derive(Default)]
struct BufferPool {
    free: std::sync::Mutex<Vec<IoBuffer>>,
}

impl BufferPool {
    /// A buffer of `len` bytes whose contents are unspecified (callers overwrite or
    /// zero every byte).
    fn get(&self, len: usize) -> IoBuffer {
        let mut v = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default();
        v.resize(len);
        v
    }

    fn put(&self, v: IoBuffer) {
        if v.capacity() == 0 {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            // More than a few batches' worth is never in flight.
            if f.len() < 8192 {
                f.push(v);
            }
        }
    }
}

/// Chunks read from the source, and how far the disk is done once they are placed.
struct Batch {
    chunks: Vec<Chunk>,
    done: u64,
}

/// The reading side of [`copy_image`]: walks the block map in windows and reads the
/// chunks that hold data, in parallel, one batch at a time.
struct Reader<'a> {
    buffers: &'a BufferPool,
    src: &'a dyn ImageReader,
    workers: &'a Workers,
    chunk_size: u64,
    batch: usize,
    sparse_size: u64,
    every_chunk: bool,
    cancel: &'a CancelToken,
    /// Copy the source's own layer only, over a backing file of this size (see
    /// [`ConvertOptions::target_backing_size`]).
    top_layer: Option<u64>,
}

impl Reader<'_> {
    /// Sends batches in guest order; stops at the first error (sent too) or when the
    /// receiver is gone.
    fn run(&self, tx: &std::sync::mpsc::SyncSender<Result<Batch>>) {
        if let Err(e) = self.walk(tx) {
            let _ = tx.send(Err(e));
        }
    }

    fn walk(&self, tx: &std::sync::mpsc::SyncSender<Result<Batch>>) -> Result<()> {
        let size = self.src.virtual_size();
        let base_window = self.batch as u64 * self.chunk_size;
        let mut window = base_window;
        let mut pos = 0u64;
        let fully_allocated = self.sparse_size == 0;
        while pos < size {
            self.cancel.check()?;
            let end = size.min(pos.saturating_add(window));
            let map = vconvert_core::refine_host_holes(self.src.block_map(pos..end)?, self.src)?;
            let map = match self.top_layer {
                Some(backing_size) => top_layer_map(self.src, map, backing_size)?,
                None => map,
            };
            if map.start() != pos || map.end() != end {
                return Err(Error::invalid(format!(
                    "reader returned a block map of {:#x}..{:#x} for {pos:#x}..{end:#x}",
                    map.start(),
                    map.end()
                )));
            }
            let ranges = chunks_to_copy(&map, self.chunk_size, self.every_chunk);
            window = if ranges.is_empty() {
                (window * 2).min(MAX_WINDOW.max(base_window))
            } else {
                base_window
            };
            let groups = ranges.len().div_ceil(self.batch);
            for (g, group) in ranges.chunks(self.batch).enumerate() {
                self.cancel.check()?;
                let chunks = self.workers.try_map(group, |r| {
                    read_chunk(
                        self.src,
                        &map.clip(r.clone()),
                        self.sparse_size,
                        fully_allocated,
                        self.top_layer.is_some(),
                        self.buffers,
                    )
                })?;
                // The window's last batch also reports the zeros after its data.
                let done = if g + 1 == groups {
                    end
                } else {
                    group.last().map_or(pos, |r| r.end)
                };
                if tx.send(Ok(Batch { chunks, done })).is_err() {
                    return Ok(());
                }
            }
            pos = end;
            // A window without data still reports progress.
            if ranges.is_empty()
                && tx
                    .send(Ok(Batch {
                        chunks: Vec::new(),
                        done: pos,
                    }))
                    .is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The chunk ranges of `map` to copy: those touching data, or all of them.
fn chunks_to_copy(map: &BlockMap, chunk_size: u64, every_chunk: bool) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for e in map.extents() {
        if !(every_chunk || e.kind.is_data()) {
            continue;
        }
        let first = e.start / chunk_size;
        let last = (e.end() - 1) / chunk_size;
        for c in first..=last {
            let start = (c * chunk_size).max(map.start());
            if out.last().is_some_and(|r| r.start == start) {
                continue;
            }
            out.push(start..(start + chunk_size).min(map.end()));
        }
    }
    out
}

/// The map of `full` (the source's map through its chain) with what the source's own
/// layer leaves to its backing image marked unallocated, and what reads as zeros for
/// want of a backing image marked zero (a target with a backing file must store it),
/// except past `backing_size`, the end of the target's backing file (as qemu-img).
fn top_layer_map(src: &dyn ImageReader, full: BlockMap, backing_size: u64) -> Result<BlockMap> {
    let range = full.start()..full.end();
    let covered = match (src.supports_backing(), src.backing()) {
        (true, Some(b)) => b.virtual_size(),
        _ => 0,
    };
    // Ranges that read through to the backing image, in order.
    let through: Vec<std::ops::Range<u64>> = src
        .layer_status(range.clone())?
        .into_iter()
        .filter(|s| !s.allocated() && s.start < covered)
        .map(|s| s.start..s.end().min(covered))
        .collect();
    let mut out = BlockMap::new(range.start);
    let mut j = 0;
    for e in full.extents() {
        let mut pos = e.start;
        while pos < e.end() {
            while j < through.len() && through[j].end <= pos {
                j += 1;
            }
            let (end, inside) = match through.get(j) {
                Some(t) if t.start <= pos => (t.end.min(e.end()), true),
                Some(t) => (t.start.min(e.end()), false),
                None => (e.end(), false),
            };
            let kind = match (inside, e.kind) {
                (true, _) => ExtentKind::Unallocated,
                (false, ExtentKind::Unallocated) => ExtentKind::Zero,
                (false, ExtentKind::Data(vconvert_core::Location::File { file, offset })) => {
                    ExtentKind::Data(vconvert_core::Location::File {
                        file,
                        offset: offset + (pos - e.start),
                    })
                }
                (false, k) => k,
            };
            // Zeros past the end of the target's backing file need no storing.
            let split = backing_size.clamp(pos, end);
            let zero = matches!(kind, ExtentKind::Zero | ExtentKind::Unallocated);
            out.push(split - pos, kind);
            out.push(
                end - split,
                if zero {
                    ExtentKind::Unallocated
                } else {
                    kind_from(kind, split - pos)
                },
            );
            pos = end;
        }
    }
    Ok(out)
}

/// `kind` advanced by `skip` bytes (file data moves its offset).
fn kind_from(kind: ExtentKind, skip: u64) -> ExtentKind {
    match kind {
        ExtentKind::Data(vconvert_core::Location::File { file, offset }) => {
            ExtentKind::Data(vconvert_core::Location::File {
                file,
                offset: offset + skip,
            })
        }
        k => k,
    }
}

/// Reads the data of one chunk and splits it into runs, turning all-zero blocks of
/// `sparse_size` bytes into zero runs. With `over_backing` (a target with a backing
/// file), a chunk that stores anything also carries the bytes of its unallocated runs
/// (read through the source's chain), for the writer to copy on write, and keeps its
/// buffer even without data runs (zeros may have to be written as data).
fn read_chunk(
    src: &dyn ImageReader,
    map: &BlockMap,
    sparse_size: u64,
    fully_allocated: bool,
    over_backing: bool,
    buffers: &BufferPool,
) -> Result<Chunk> {
    let offset = map.start();
    let len = map.end() - offset;
    let mut runs: Vec<Run> = Vec::new();
    let mut push = |start: u64, len: u64, kind: RunKind| {
        if len == 0 {
            return;
        }
        match runs.last_mut() {
            Some(r) if r.kind == kind && r.start + r.len == start => r.len += len,
            _ => runs.push(Run { start, len, kind }),
        }
    };
    let mut data = IoBuffer::default();
    let stores = map
        .extents()
        .iter()
        .any(|e| e.kind != ExtentKind::Unallocated);
    let keep = over_backing && stores;
    if fully_allocated || map.data_bytes() > 0 || keep {
        data = buffers.get(len as usize);
    }
    for e in map.extents() {
        let rel = (e.start - offset) as usize..(e.end() - offset) as usize;
        // A reused buffer holds old bytes: everything but data must read as zeros.
        if !e.kind.is_data() && !data.is_empty() {
            data[rel.clone()].fill(0);
        }
        match e.kind {
            ExtentKind::Data(_) => {
                let buf = &mut data[rel.clone()];
                src.read_at(buf, e.start)?;
                let mut p = 0usize;
                if !fully_allocated {
                    for z in zero_runs(buf, e.start, sparse_size) {
                        push(e.start + p as u64, (z.start - p) as u64, RunKind::Data);
                        push(e.start + z.start as u64, z.len() as u64, RunKind::Zero);
                        p = z.end;
                    }
                }
                push(e.start + p as u64, (buf.len() - p) as u64, RunKind::Data);
            }
            ExtentKind::Unallocated if over_backing => {
                if keep {
                    src.read_at(&mut data[rel.clone()], e.start)?;
                }
                push(e.start, e.len, RunKind::Unallocated)
            }
            _ if fully_allocated => push(e.start, e.len, RunKind::Data),
            ExtentKind::Zero => push(e.start, e.len, RunKind::Zero),
            ExtentKind::Unallocated => push(e.start, e.len, RunKind::Unallocated),
        }
    }
    if !keep && !runs.iter().any(|r| r.kind == RunKind::Data) {
        buffers.put(std::mem::take(&mut data));
    }
    Ok(Chunk {
        offset,
        len,
        runs,
        data,
    })
}
