//! `convert_to_block`: a raw conversion into a target that is not a local file (an RBD
//! image in vimport), checked against the in-memory model: the target ends up with the
//! model's bytes, only non-zero data is ever written, an observer sees every byte in
//! guest order, the result does not depend on the
//! thread count, and a cancelled or failing conversion reports it.

use std::io;
use std::sync::Mutex;

use proptest::prelude::*;
use vconvert_engine::{convert_to_block, BlockTarget, ConvertOptions};
use vconvert_testkit::{ModelImage, ModelKind};

/// A block device in memory that starts as zeros and records every write.
struct MemTarget {
    bytes: Mutex<Vec<u8>>,
    writes: Mutex<Vec<(u64, usize)>>,
    flushed: Mutex<bool>,
    chunk: u64,
    fail_at: Option<u64>,
}

impl MemTarget {
    fn new(size: u64, chunk: u64) -> MemTarget {
        MemTarget {
            bytes: Mutex::new(vec![0; size as usize]),
            writes: Mutex::new(Vec::new()),
            flushed: Mutex::new(false),
            chunk,
            fail_at: None,
        }
    }
}

impl BlockTarget for MemTarget {
    fn name(&self) -> &str {
        "mem:test"
    }

    fn chunk_size(&self) -> u64 {
        self.chunk
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        for &(off, buf) in writes {
            let end = off + buf.len() as u64;
            if self.fail_at.is_some_and(|f| (off..end).contains(&f)) {
                return Err(io::Error::other("injected write error"));
            }
            assert!(
                end <= bytes.len() as u64,
                "write past the end: {off}+{}",
                buf.len()
            );
            bytes[off as usize..end as usize].copy_from_slice(buf);
            self.writes.lock().unwrap().push((off, buf.len()));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        *self.flushed.lock().unwrap() = true;
        Ok(())
    }
}

fn opts(threads: usize) -> ConvertOptions<'static> {
    ConvertOptions {
        threads,
        ..ConvertOptions::default()
    }
}

/// Every written range holds some non-zero byte of the model's data extents: zero and
/// unallocated ranges, and all-zero data, are never written (4 KiB zero detection).
fn assert_only_data_written(model: &ModelImage, writes: &[(u64, usize)]) {
    for &(off, len) in writes {
        let piece = &model.bytes[off as usize..off as usize + len];
        for block in piece.chunks(4096) {
            assert!(
                block.iter().any(|&b| b != 0),
                "an all-zero block was written in {off:#x}+{len:#x}"
            );
        }
    }
}

#[test]
fn only_data_runs_reach_the_target() {
    let m = 1u64 << 20;
    let model = ModelImage::from_parts(&[
        (m, ModelKind::Data, 1),
        (3 * m, ModelKind::Unallocated, 0),
        (m, ModelKind::Zero, 0),
        // All zeros although allocated as data (seed divisible by 5).
        (2 * m, ModelKind::Data, 10),
        (m / 2, ModelKind::Data, 7),
        (m / 2, ModelKind::Unallocated, 0),
    ]);
    let t = MemTarget::new(model.bytes.len() as u64, 4 << 20);
    convert_to_block(&model, &t, &opts(2), None).unwrap();
    assert!(*t.bytes.lock().unwrap() == model.bytes);
    assert!(*t.flushed.lock().unwrap());
    let writes = t.writes.lock().unwrap();
    let written: usize = writes.iter().map(|w| w.1).sum();
    assert_eq!(written as u64, m + m / 2, "exactly the non-zero data");
    assert_only_data_written(&model, &writes);
}

#[test]
fn a_cancelled_conversion_says_so() {
    let model = ModelImage::from_parts(&[(8 << 20, ModelKind::Data, 3)]);
    let t = MemTarget::new(8 << 20, 1 << 20);
    let o = opts(1);
    o.cancel.cancel();
    let e = convert_to_block(&model, &t, &o, None).unwrap_err();
    assert!(matches!(e, vconvert_core::Error::Cancelled), "{e}");
    assert!(!*t.flushed.lock().unwrap());
}

#[test]
fn a_write_error_names_the_target_and_the_range() {
    let model = ModelImage::from_parts(&[(8 << 20, ModelKind::Data, 3)]);
    let mut t = MemTarget::new(8 << 20, 1 << 20);
    t.fail_at = Some(5 << 20);
    let e = convert_to_block(&model, &t, &opts(2), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mem:test"), "{e}");
    assert!(e.contains("injected write error"), "{e}");
    assert!(!*t.flushed.lock().unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_model_converts_to_its_bytes_whatever_the_thread_count(
        model in ModelImage::strategy(10, 4096, 300),
        chunk_bits in 16u32..=22,
    ) {
        let size = model.bytes.len() as u64;
        for threads in [1, 3] {
            let t = MemTarget::new(size, 1 << chunk_bits);
            // The observer sees the whole image, zeros included, in guest order.
            let mut seen = Vec::new();
            let mut observe = |b: &[u8]| seen.extend_from_slice(b);
            convert_to_block(&model, &t, &opts(threads), Some(&mut observe)).unwrap();
            prop_assert!(*t.bytes.lock().unwrap() == model.bytes);
            prop_assert!(seen == model.bytes);
            assert_only_data_written(&model, &t.writes.lock().unwrap());
        }
    }
}
