//! Comparing the guest contents of two images (qemu-img `compare`), in parallel.
//!
//! Ranges that neither image holds as data read as zeros on both sides and cost no
//! reads; where only one side has data, only that side is read and checked for zeros.

use std::ops::Range;

use rayon::prelude::*;
use vconvert_core::{is_zero, BlockMap, Error, ImageReader, Result};

/// Bytes compared per parallel task.
const CHUNK: u64 = 1 << 20;
/// Granularity of reported offsets, as qemu-img reports them.
const SECTOR: u64 = 512;

/// How to compare.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// Also fail on different sizes and on different allocation status (`-s`).
    pub strict: bool,
    /// Worker threads; 0 means every core.
    pub threads: usize,
}

/// What a comparison found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Same guest contents.
    Identical {
        /// The sizes differ but the larger image's extra part reads as zeros.
        size_mismatch: bool,
    },
    /// The first differing 512-byte sector starts at this offset.
    ContentMismatch {
        /// Guest offset of the sector.
        offset: u64,
        /// The sizes differ.
        size_mismatch: bool,
    },
    /// Strict mode: the sizes differ.
    StrictSizeMismatch,
    /// Strict mode: allocation status differs from this offset on.
    StrictAllocationMismatch {
        /// Guest offset.
        offset: u64,
    },
}

/// Compares the guest contents of `a` and `b`.
pub fn compare(
    a: &dyn ImageReader,
    b: &dyn ImageReader,
    opts: &CompareOptions,
) -> Result<Comparison> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    let size_mismatch = sa != sb;
    if opts.strict && size_mismatch {
        return Ok(Comparison::StrictSizeMismatch);
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {threads} worker threads: {e}")))?;
    let window = CHUNK * 16 * threads as u64;
    let common = sa.min(sb);
    let mut pos = 0;
    while pos < common {
        let end = common.min(pos + window);
        let (ma, mb) = (a.block_map(pos..end)?, b.block_map(pos..end)?);
        if opts.strict {
            if let Some(offset) = first_status_difference(&ma, &mb) {
                return Ok(Comparison::StrictAllocationMismatch { offset });
            }
        }
        let chunks = chunk_ranges(pos..end);
        let found = pool.install(|| {
            chunks
                .par_iter()
                .map(|r| first_difference(a, &ma, b, &mb, r.clone()))
                .collect::<Result<Vec<_>>>()
        })?;
        if let Some(offset) = found.into_iter().flatten().next() {
            return Ok(Comparison::ContentMismatch {
                offset: offset / SECTOR * SECTOR,
                size_mismatch,
            });
        }
        pos = end;
    }
    // The larger image's extra part must read as zeros.
    let larger = if sa > sb { a } else { b };
    let mut pos = common;
    let total = sa.max(sb);
    while pos < total {
        let end = total.min(pos + window);
        let map = larger.block_map(pos..end)?;
        let chunks = chunk_ranges(pos..end);
        let found = pool.install(|| {
            chunks
                .par_iter()
                .map(|r| first_nonzero(larger, &map, r.clone()))
                .collect::<Result<Vec<_>>>()
        })?;
        if let Some(offset) = found.into_iter().flatten().next() {
            return Ok(Comparison::ContentMismatch {
                offset: offset / SECTOR * SECTOR,
                size_mismatch,
            });
        }
        pos = end;
    }
    Ok(Comparison::Identical { size_mismatch })
}

fn chunk_ranges(r: Range<u64>) -> Vec<Range<u64>> {
    let mut v = Vec::new();
    let mut p = r.start;
    while p < r.end {
        let e = r.end.min((p / CHUNK + 1) * CHUNK);
        v.push(p..e);
        p = e;
    }
    v
}

/// First offset in `r` where one map says data and the other does not.
fn first_status_difference(ma: &BlockMap, mb: &BlockMap) -> Option<u64> {
    let (ea, eb) = (ma.extents(), mb.extents());
    let (mut i, mut j) = (0, 0);
    while i < ea.len() && j < eb.len() {
        let start = ea[i].start.max(eb[j].start);
        if ea[i].kind.is_data() != eb[j].kind.is_data() {
            return Some(start);
        }
        let (end_a, end_b) = (ea[i].end(), eb[j].end());
        if end_a <= end_b {
            i += 1;
        }
        if end_b <= end_a {
            j += 1;
        }
    }
    None
}

fn first_nonzero(img: &dyn ImageReader, map: &BlockMap, r: Range<u64>) -> Result<Option<u64>> {
    let sub = map.clip(r.clone());
    if sub.data_bytes() == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; (r.end - r.start) as usize];
    img.read_at(&mut buf, r.start)?;
    if is_zero(&buf) {
        return Ok(None);
    }
    Ok(buf.iter().position(|&b| b != 0).map(|i| r.start + i as u64))
}

fn first_difference(
    a: &dyn ImageReader,
    ma: &BlockMap,
    b: &dyn ImageReader,
    mb: &BlockMap,
    r: Range<u64>,
) -> Result<Option<u64>> {
    let (da, db) = (
        ma.clip(r.clone()).data_bytes() > 0,
        mb.clip(r.clone()).data_bytes() > 0,
    );
    match (da, db) {
        (false, false) => Ok(None),
        (true, false) => first_nonzero(a, ma, r),
        (false, true) => first_nonzero(b, mb, r),
        (true, true) => {
            let len = (r.end - r.start) as usize;
            let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
            a.read_at(&mut x, r.start)?;
            b.read_at(&mut y, r.start)?;
            if x == y {
                return Ok(None);
            }
            // Find the first differing 4 KiB block quickly, then the byte.
            let first = x
                .chunks(4096)
                .zip(y.chunks(4096))
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            let base = first * 4096;
            let i = x[base..]
                .iter()
                .zip(&y[base..])
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            Ok(Some(r.start + (base + i) as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vconvert_core::{ExtentKind, Location};

    #[test]
    fn status_difference_is_found() {
        let mut a = BlockMap::new(0);
        a.push(100, ExtentKind::Zero);
        a.push(100, ExtentKind::Data(Location::Opaque));
        let mut b = BlockMap::new(0);
        b.push(150, ExtentKind::Unallocated);
        b.push(50, ExtentKind::Data(Location::Opaque));
        assert_eq!(first_status_difference(&a, &b), Some(100));
        assert_eq!(first_status_difference(&a, &a), None);
    }
}
