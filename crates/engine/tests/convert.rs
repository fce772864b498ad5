//! Engine behaviour: round trips through the raw writer, determinism across thread
//! counts, cleanup on failure and cancellation, lazy maps of huge sparse disks.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use vconvert_core::{
    BlockMap, Error, ExtentKind, Format, ImageFile, ImageInfo, ImageReader, Options, Result,
    Storage,
};
use vconvert_engine::{convert, open_file, CancelToken, ConvertOptions, OpenOptions, RawBytes};
use vconvert_testkit::{dir_entries, tempdir, ModelImage, ModelKind};

fn raw_opts(threads: usize) -> ConvertOptions<'static> {
    ConvertOptions {
        threads,
        ..ConvertOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn model_to_raw_reads_back_equal(
        model in ModelImage::strategy(12, 512, 3000),
        threads in 1usize..5,
        sparse in prop_oneof![Just(0u64), Just(512), Just(4096), Just(65536)],
    ) {
        let dir = tempdir();
        let out = dir.path().join("out.raw");
        // The observer is given the target's bytes in order as they are placed.
        let seen = std::sync::Mutex::new(Vec::new());
        let observe = |b: RawBytes<'_>| {
            let mut seen = seen.lock().unwrap();
            match b {
                RawBytes::Data(d) => seen.extend_from_slice(d),
                RawBytes::Zeros(n) => {
                    let len = seen.len() + n as usize;
                    seen.resize(len, 0)
                }
            }
        };
        let opts = ConvertOptions { threads, sparse_size: sparse, mem_per_thread: 1 << 20, observe_raw: Some(&observe), ..ConvertOptions::default() };
        convert(&model, &out, Format::Raw, Options::new(), &opts).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        prop_assert_eq!(bytes.len(), model.bytes.len());
        prop_assert!(bytes == model.bytes, "content differs");
        prop_assert!(*seen.lock().unwrap() == bytes, "observed bytes differ from the output");
        prop_assert_eq!(dir_entries(dir.path()).len(), 1);
        // Read back through the raw reader too: its map must be consistent.
        let back = vconvert_engine::open(&out, Some(Format::Raw), &OpenOptions::default()).unwrap();
        vconvert_testkit::check_reader_consistency(back.as_ref()).unwrap();
    }
}

#[test]
fn output_is_identical_at_any_thread_count() {
    let parts: Vec<_> = (0..40u64)
        .map(|i| {
            let kind = [ModelKind::Data, ModelKind::Unallocated, ModelKind::Zero][(i % 3) as usize];
            ((i * 7919 % 300 + 1) * 4096, kind, i + 1)
        })
        .collect();
    let model = ModelImage::from_parts(&parts);
    let dir = tempdir();
    let mut outs = Vec::new();
    for threads in [1, 2, 8] {
        let out = dir.path().join(format!("m{threads}.raw"));
        convert(
            &model,
            &out,
            Format::Raw,
            Options::new(),
            &raw_opts(threads),
        )
        .unwrap();
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], model.bytes);
    assert!(outs.iter().all(|o| *o == outs[0]));
}

/// Conversions sharing a thread budget (as vimport's imports do) write the same bytes
/// as one with threads of its own, whatever the budget's size, and give every thread
/// back.
#[test]
fn output_is_identical_with_a_shared_thread_budget_of_any_size() {
    let parts: Vec<_> = (0..40u64)
        .map(|i| {
            let kind = [ModelKind::Data, ModelKind::Unallocated, ModelKind::Zero][(i % 3) as usize];
            ((i * 7919 % 300 + 1) * 4096, kind, i + 1)
        })
        .collect();
    let model = ModelImage::from_parts(&parts);
    let dir = tempdir();
    for format in [Format::Raw, Format::Qcow2] {
        let own = dir.path().join(format!("own.{format}"));
        let opts = ConvertOptions {
            // Batches of several chunks: raw's 2 MiB chunks are read and written by
            // several threads, qcow2's encoded by several (raw has no encoding).
            mem_per_thread: if format == Format::Raw {
                16 << 20
            } else {
                256 << 10
            },
            identity_seed: Some(7),
            ..raw_opts(2)
        };
        convert(&model, &own, format, Options::new(), &opts).unwrap();
        let own = std::fs::read(&own).unwrap();
        if format == Format::Raw {
            assert_eq!(own, model.bytes);
        }
        for size in [0, 1, 4] {
            let budget = vconvert_core::ThreadBudget::new(size);
            let opts = ConvertOptions {
                threads: 0,
                shared_threads: Some(budget.clone()),
                ..opts.clone()
            };
            // Two conversions at once over one budget.
            let outs: Vec<Vec<u8>> = std::thread::scope(|s| {
                let runs: Vec<_> = (0..2)
                    .map(|i| {
                        let (model, opts) = (&model, &opts);
                        let out = dir.path().join(format!("b{size}-{i}.{format}"));
                        s.spawn(move || {
                            convert(model, &out, format, Options::new(), opts).unwrap();
                            std::fs::read(&out).unwrap()
                        })
                    })
                    .collect();
                runs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for out in outs {
                assert!(out == own, "{format}, budget {size}: different bytes");
            }
            assert_eq!(budget.lent(), 0);
            assert!(budget.peak() <= size);
            if size > 0 {
                assert!(
                    budget.peak() > 0,
                    "the conversions borrowed from the budget"
                );
            }
        }
    }
}

/// A reader that fails once a read reaches `fail_at`.
struct FailingReader {
    inner: ModelImage,
    fail_at: u64,
}

impl ImageReader for FailingReader {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.inner.block_map(range)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset + buf.len() as u64 > self.fail_at {
            return Err(Error::corrupt(
                "src.img",
                "data",
                offset,
                "simulated failure",
            ));
        }
        self.inner.read_at(buf, offset)
    }
    fn info(&self) -> Result<ImageInfo> {
        self.inner.info()
    }
}

fn all_data(size: u64) -> ModelImage {
    ModelImage::from_parts(&[(size, ModelKind::Data, 7)])
}

#[test]
fn failed_conversion_leaves_no_target() {
    let dir = tempdir();
    let out = dir.path().join("out.raw");
    let src = FailingReader {
        inner: all_data(24 << 20),
        fail_at: 20 << 20,
    };
    let err = convert(&src, &out, Format::Raw, Options::new(), &raw_opts(2)).unwrap_err();
    assert!(err.to_string().contains("simulated failure"), "{err}");
    assert!(
        dir_entries(dir.path()).is_empty(),
        "left {:?}",
        dir_entries(dir.path())
    );
}

/// Storage that claims `len` bytes at open but ends at `truncated_at` (a file truncated
/// while being converted).
#[derive(Debug)]
struct ShrinkingStorage {
    bytes: Vec<u8>,
    truncated_at: usize,
}

impl Storage for ShrinkingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let o = offset as usize;
        if o >= self.truncated_at {
            return Ok(0);
        }
        let n = buf.len().min(self.truncated_at - o);
        buf[..n].copy_from_slice(&self.bytes[o..o + n]);
        Ok(n)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
}

#[test]
fn source_truncated_mid_way_fails_cleanly() {
    let dir = tempdir();
    let storage = ShrinkingStorage {
        bytes: vec![0x5a; 16 << 20],
        truncated_at: 9 << 20,
    };
    let file = ImageFile::from_storage(Path::new("shrinking.raw"), Arc::new(storage)).unwrap();
    let src = open_file(file, Some(Format::Raw), &OpenOptions::default()).unwrap();
    let out = dir.path().join("out.raw");
    let err = convert(
        src.as_ref(),
        &out,
        Format::Raw,
        Options::new(),
        &raw_opts(2),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("shrinking.raw") && msg.contains("end of file"),
        "{msg}"
    );
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn cancel_leaves_no_target() {
    let dir = tempdir();
    let out = dir.path().join("out.raw");
    let src = all_data(64 << 20);
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let progress = move |done: u64, _total: u64| {
        if done >= 8 << 20 {
            c2.cancel();
        }
    };
    let opts = ConvertOptions {
        threads: 2,
        mem_per_thread: 2 << 20,
        cancel,
        progress: Some(&progress),
        ..ConvertOptions::default()
    };
    let err = convert(&src, &out, Format::Raw, Options::new(), &opts).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn missing_target_directory_is_a_clear_error() {
    let dir = tempdir();
    let out = dir.path().join("no/such/dir/out.raw");
    let err = convert(
        &all_data(1 << 20),
        &out,
        Format::Raw,
        Options::new(),
        &raw_opts(1),
    )
    .unwrap_err();
    assert!(err.to_string().contains("out.raw"), "{err}");
}

/// A huge disk that is almost all unallocated, counting block-map calls and reads.
struct HugeSparse {
    size: u64,
    data_at: u64,
    maps: AtomicU64,
    read_bytes: AtomicU64,
}

impl ImageReader for HugeSparse {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        let mut m = BlockMap::uniform(0..self.size, ExtentKind::Unallocated);
        let mut d = BlockMap::new(0);
        d.push(self.data_at, ExtentKind::Unallocated);
        d.push(4096, ExtentKind::Data(vconvert_core::Location::Opaque));
        d.push(self.size - self.data_at - 4096, ExtentKind::Unallocated);
        m = if self.data_at < self.size { d } else { m };
        Ok(m.clip(range))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8 | 1;
        }
        Ok(())
    }
    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo::new(Format::Raw, self.size))
    }
}

#[test]
fn huge_sparse_disk_reads_only_its_data() {
    let dir = tempdir();
    let out = dir.path().join("huge.raw");
    // 8 TiB fits every common filesystem's file size limit as a sparse file.
    let src = HugeSparse {
        size: 8 << 40,
        data_at: 5 << 40,
        maps: AtomicU64::new(0),
        read_bytes: AtomicU64::new(0),
    };
    convert(&src, &out, Format::Raw, Options::new(), &raw_opts(2)).unwrap();
    assert_eq!(src.read_bytes.load(Ordering::Relaxed), 4096);
    // Windows grow while they hold no data: thousands of map calls, not millions.
    assert!(
        src.maps.load(Ordering::Relaxed) < 20_000,
        "{} map calls",
        src.maps.load(Ordering::Relaxed)
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 8 << 40);
    assert!(vconvert_testkit::allocated_bytes(&out) < 1 << 20);
    let back = vconvert_engine::open(&out, Some(Format::Raw), &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    back.read_at(&mut buf, 5 << 40).unwrap();
    assert!(buf.iter().all(|&b| b & 1 == 1));
}

#[test]
fn existing_target_gets_zeros_written() {
    let dir = tempdir();
    let out = dir.path().join("existing.raw");
    std::fs::write(&out, vec![0xffu8; 3 << 20]).unwrap();
    let model = ModelImage::from_parts(&[
        (1 << 20, ModelKind::Data, 3),
        (1 << 20, ModelKind::Unallocated, 0),
        (1 << 20, ModelKind::Zero, 0),
    ]);
    let opts = ConvertOptions {
        existing: true,
        ..raw_opts(2)
    };
    convert(&model, &out, Format::Raw, Options::new(), &opts).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), model.bytes);
    // With --target-is-zero the zero ranges are trusted, not written.
    std::fs::write(&out, vec![0xffu8; 3 << 20]).unwrap();
    let opts = ConvertOptions {
        existing: true,
        target_is_zero: true,
        ..raw_opts(2)
    };
    convert(&model, &out, Format::Raw, Options::new(), &opts).unwrap();
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got[..1 << 20], model.bytes[..1 << 20]);
    assert!(got[1 << 20..].iter().all(|&b| b == 0xff));
}

#[test]
fn sparse_size_zero_allocates_everything() {
    let dir = tempdir();
    let out = dir.path().join("full.raw");
    let model = ModelImage::from_parts(&[
        (1 << 20, ModelKind::Data, 3),
        (3 << 20, ModelKind::Unallocated, 0),
    ]);
    let opts = ConvertOptions {
        sparse_size: 0,
        ..raw_opts(2)
    };
    convert(&model, &out, Format::Raw, Options::new(), &opts).unwrap();
    assert!(vconvert_testkit::allocated_bytes(&out) >= 4 << 20);
    assert_eq!(std::fs::read(&out).unwrap(), model.bytes);
}

#[test]
fn memory_in_flight_is_bounded() {
    /// Tracks how many bytes the engine asks to read between two map calls at most.
    struct Counting {
        inner: ModelImage,
        in_window: AtomicU64,
        max_window: AtomicU64,
    }
    impl ImageReader for Counting {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.inner.virtual_size()
        }
        fn block_map(&self, r: Range<u64>) -> Result<BlockMap> {
            self.in_window.store(0, Ordering::SeqCst);
            self.inner.block_map(r)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let now =
                self.in_window.fetch_add(buf.len() as u64, Ordering::SeqCst) + buf.len() as u64;
            self.max_window.fetch_max(now, Ordering::SeqCst);
            self.inner.read_at(buf, offset)
        }
        fn info(&self) -> Result<ImageInfo> {
            self.inner.info()
        }
    }
    let src = Counting {
        inner: all_data(96 << 20),
        in_window: AtomicU64::new(0),
        max_window: AtomicU64::new(0),
    };
    let dir = tempdir();
    let opts = ConvertOptions {
        threads: 2,
        mem_per_thread: 4 << 20,
        ..ConvertOptions::default()
    };
    convert(
        &src,
        &dir.path().join("o.raw"),
        Format::Raw,
        Options::new(),
        &opts,
    )
    .unwrap();
    // One window is one batch: threads x mem_per_thread / 2.
    assert!(
        src.max_window.load(Ordering::SeqCst) <= 4 << 20,
        "{}",
        src.max_window.load(Ordering::SeqCst)
    );
}

/// A writer that checks the chunk contract and rebuilds the disk in memory.
struct CheckingWriter {
    chunk_size: u64,
    disk: Vec<u8>,
    last_offset: Option<u64>,
}

/// Encodes a chunk as its offset, so placement can check it got the right encoding.
struct OffsetEncoder;

impl vconvert_core::ChunkEncoder for OffsetEncoder {
    type Encoded = u64;
    fn encode(&self, chunk: &vconvert_core::Chunk) -> Result<u64> {
        Ok(chunk.offset)
    }
}

impl vconvert_core::ImageWriter for CheckingWriter {
    type Encoder = OffsetEncoder;
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    fn encoder(&self) -> OffsetEncoder {
        OffsetEncoder
    }
    fn place(&mut self, chunk: &vconvert_core::Chunk, encoded: u64) -> Result<()> {
        assert_eq!(encoded, chunk.offset, "encoding belongs to its chunk");
        assert_eq!(chunk.offset % self.chunk_size, 0);
        assert!(
            self.last_offset.is_none_or(|l| l < chunk.offset),
            "chunks come in guest order"
        );
        self.last_offset = Some(chunk.offset);
        let mut pos = chunk.offset;
        for r in &chunk.runs {
            assert_eq!(r.start, pos, "runs cover the chunk in order");
            pos += r.len;
            if !chunk.data.is_empty() && r.kind != vconvert_core::RunKind::Data {
                assert!(
                    vconvert_core::is_zero(chunk.bytes(r.start, r.len).unwrap()),
                    "non-data run {r:?} is not zeros"
                );
            }
            if r.kind == vconvert_core::RunKind::Data {
                let s = r.start as usize;
                self.disk[s..s + r.len as usize]
                    .copy_from_slice(chunk.bytes(r.start, r.len).unwrap());
            }
        }
        assert_eq!(pos, chunk.offset + chunk.len);
        Ok(())
    }
    fn finish(self) -> Result<()> {
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn chunks_keep_their_contract_with_recycled_buffers(
        model in ModelImage::strategy(16, 512, 600),
        threads in 1usize..4,
    ) {
        let mut w = CheckingWriter { chunk_size: 64 << 10, disk: vec![0u8; model.bytes.len()], last_offset: None };
        let params = vconvert_core::CreateParams {
            virtual_size: model.virtual_size(), existing: false, target_is_zero: true, compress: false, identity_seed: None,
        };
        let opts = ConvertOptions { threads, mem_per_thread: 128 << 10, ..ConvertOptions::default() };
        vconvert_engine::copy_image(&model, &mut w, &params, &opts).unwrap();
        prop_assert!(w.disk == model.bytes);
    }
}

/// Only a new raw target's bytes are the guest's in order: observing any other target
/// is refused before anything is written.
#[test]
fn observing_a_non_raw_target_is_refused() {
    let model = ModelImage::from_parts(&[(65536, ModelKind::Data, 1)]);
    let dir = tempdir();
    let observe = |_: RawBytes<'_>| {};
    let opts = ConvertOptions {
        observe_raw: Some(&observe),
        ..ConvertOptions::default()
    };
    let out = dir.path().join("out.qcow2");
    let err = convert(&model, &out, Format::Qcow2, Options::new(), &opts).unwrap_err();
    assert!(err.to_string().contains("raw target"), "{err}");
    assert!(dir_entries(dir.path()).is_empty());
    let existing = dir.path().join("existing.raw");
    std::fs::write(&existing, vec![1u8; 65536]).unwrap();
    let opts = ConvertOptions {
        existing: true,
        ..opts
    };
    let err = convert(&model, &existing, Format::Raw, Options::new(), &opts).unwrap_err();
    assert!(err.to_string().contains("existing target"), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), vec![1u8; 65536]);
}
