//! The bytes a replayed log lays over the file, kept in memory: non-overlapping ranges
//! of data (whole 4 KiB sectors from data descriptors) or zeros (zero descriptors),
//! later updates replacing earlier ones. The source file is never written.

use std::collections::BTreeMap;
use std::sync::Arc;

/// What a range of the overlay holds.
#[derive(Clone, Debug)]
enum Piece {
    /// Zeros.
    Zero,
    /// Bytes of `data` from `skip`.
    Data { data: Arc<Vec<u8>>, skip: usize },
}

/// Ranges of file bytes replaced by the log.
#[derive(Clone, Debug, Default)]
pub(crate) struct Overlay {
    /// start -> (end, piece); ranges do not overlap.
    ranges: BTreeMap<u64, (u64, Piece)>,
}

impl Overlay {
    /// One past the last byte the overlay writes (0 when empty).
    pub(crate) fn end(&self) -> u64 {
        self.ranges.values().map(|(e, _)| *e).max().unwrap_or(0)
    }

    /// Removes `[start, end)` from every range, keeping what lies outside.
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<u64> = self
            .ranges
            .range(..end)
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let (e, piece) = self.ranges.remove(&s).expect("present");
            if s < start {
                self.ranges.insert(s, (start, piece.clone()));
            }
            if e > end {
                let tail = match piece {
                    Piece::Zero => Piece::Zero,
                    Piece::Data { data, skip } => Piece::Data {
                        data,
                        skip: skip + (end - s) as usize,
                    },
                };
                self.ranges.insert(end, (e, tail));
            }
        }
    }

    /// Lays `data` over the file at `offset`.
    pub(crate) fn write(&mut self, offset: u64, data: Vec<u8>) {
        let end = offset + data.len() as u64;
        self.cut(offset, end);
        self.ranges.insert(
            offset,
            (
                end,
                Piece::Data {
                    data: Arc::new(data),
                    skip: 0,
                },
            ),
        );
    }

    /// Lays zeros over `[offset, offset + len)`.
    pub(crate) fn zero(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        self.cut(offset, end);
        self.ranges.insert(offset, (end, Piece::Zero));
    }

    /// The overlay's ranges inside `[start, end)`, clipped, in order.
    pub(crate) fn ranges_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(start);
        self.ranges
            .range(first..end)
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, (e, _))| ((*s).max(start), (*e).min(end)))
            .collect()
    }

    /// Replaces the bytes of `buf` (file bytes at `offset`) that the overlay covers.
    pub(crate) fn apply(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        let first = self
            .ranges
            .range(..=offset)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(offset);
        for (&s, (e, piece)) in self.ranges.range(first..end) {
            if *e <= offset {
                continue;
            }
            let lo = s.max(offset);
            let hi = (*e).min(end);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match piece {
                Piece::Zero => out.fill(0),
                Piece::Data { data, skip } => {
                    let from = skip + (lo - s) as usize;
                    out.copy_from_slice(&data[from..from + out.len()]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_updates_win_and_cut_earlier_ones() {
        let mut o = Overlay::default();
        o.write(4096, vec![1; 4096]);
        o.write(8192, vec![2; 4096]);
        o.zero(6000, 3000);
        o.write(0, vec![3; 100]);
        let mut buf = vec![9u8; 16384];
        o.apply(&mut buf, 0);
        assert!(buf[..100].iter().all(|&b| b == 3));
        assert!(buf[100..4096].iter().all(|&b| b == 9));
        assert!(buf[4096..6000].iter().all(|&b| b == 1));
        assert!(buf[6000..9000].iter().all(|&b| b == 0));
        assert!(buf[9000..12288].iter().all(|&b| b == 2));
        assert!(buf[12288..].iter().all(|&b| b == 9));
        let mut part = vec![9u8; 10];
        o.apply(&mut part, 8995);
        assert_eq!(part, [0, 0, 0, 0, 0, 2, 2, 2, 2, 2]);
        assert_eq!(
            o.ranges_in(5000, 10000),
            vec![(5000, 6000), (6000, 9000), (9000, 10000)]
        );
        assert_eq!(o.end(), 12288);
        assert!(o.ranges_in(200, 4000).is_empty());
    }
}
