//! Zero detection, the hot kernel of sparse conversion.

/// True when every byte of `buf` is zero.
///
/// Scans 32 bytes at a time with plain integer loads so the compiler can vectorise it.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(32);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Splits `buf`, whose first byte is at absolute offset `start`, into blocks aligned to
/// multiples of `granularity` (absolute offsets) and returns the ranges (relative to
/// `buf`) of maximal runs of all-zero blocks. The first and last block may be partial.
/// A `granularity` of 0 finds nothing.
pub fn zero_runs(buf: &[u8], start: u64, granularity: u64) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    if granularity == 0 || buf.is_empty() {
        return out;
    }
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = start + pos as u64;
        let next_boundary = (abs / granularity + 1) * granularity;
        let end = ((next_boundary - start) as usize).min(buf.len());
        if is_zero(&buf[pos..end]) {
            match out.last_mut() {
                Some(r) if r.end == pos => r.end = end,
                _ => out.push(pos..end),
            }
        }
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_zero_and_nonzero_anywhere() {
        for len in [0usize, 1, 7, 31, 32, 33, 64, 100, 4096] {
            let buf = vec![0u8; len];
            assert!(is_zero(&buf));
            for i in 0..len {
                let mut b = buf.clone();
                b[i] = 1;
                assert!(!is_zero(&b), "len {len} byte {i}");
            }
        }
    }

    #[test]
    fn zero_runs_align_to_absolute_offsets() {
        // 10 bytes starting at absolute 6 with granularity 4: blocks [6,8) [8,12) [12,16).
        let mut buf = vec![0u8; 10];
        buf[3] = 9; // absolute 9, inside [8,12)
        assert_eq!(zero_runs(&buf, 6, 4), vec![0..2, 6..10]);
        assert_eq!(zero_runs(&buf, 6, 0), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(zero_runs(&[0u8; 8], 0, 4), vec![0..8]);
    }
}
