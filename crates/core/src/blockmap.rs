//! The sparse block map: which guest ranges of a virtual disk hold data, which are
//! allocated as zeros, and which are unallocated, and where the data bytes live.
//!
//! A [`BlockMap`] covers one guest range `[start, end)` with ordered, non-overlapping,
//! coalesced extents. Readers build maps lazily for any range, so a huge sparse disk
//! never needs its whole map in memory.

use std::ops::Range;

/// Where the bytes of a data extent live, as the format's reader understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Plain bytes at `offset` of file number `file` of the image (0 is the image file
    /// itself; others are e.g. VMDK extent files or an external data file).
    File {
        /// Index of the file within the image.
        file: u32,
        /// Host byte offset of the extent's first byte.
        offset: u64,
    },
    /// A compressed unit starting at `offset` of file number `file` (one per cluster or
    /// grain: compressed extents never coalesce).
    Compressed {
        /// Index of the file within the image.
        file: u32,
        /// Host byte offset of the compressed unit.
        offset: u64,
    },
    /// Somewhere only the reader knows (e.g. a backing image's data).
    Opaque,
}

/// What a guest range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data stored at a location.
    Data(Location),
    /// Allocated by the format as zeros (qcow2 zero clusters, VDI zero blocks, raw holes).
    Zero,
    /// Not allocated: reads as zeros, or from a backing image.
    Unallocated,
}

impl ExtentKind {
    /// True for [`ExtentKind::Data`].
    pub fn is_data(self) -> bool {
        matches!(self, ExtentKind::Data(_))
    }
}

/// One guest range of a block map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest byte offset of the first byte.
    pub start: u64,
    /// Length in bytes (never 0 inside a map).
    pub len: u64,
    /// What the range is.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether `next`, starting where `self` ends, can merge into `self`.
    fn joins(&self, next: &Extent) -> bool {
        if self.end() != next.start {
            return false;
        }
        match (self.kind, next.kind) {
            (ExtentKind::Zero, ExtentKind::Zero) => true,
            (ExtentKind::Unallocated, ExtentKind::Unallocated) => true,
            (ExtentKind::Data(Location::Opaque), ExtentKind::Data(Location::Opaque)) => true,
            (
                ExtentKind::Data(Location::File {
                    file: a,
                    offset: oa,
                }),
                ExtentKind::Data(Location::File {
                    file: b,
                    offset: ob,
                }),
            ) => a == b && oa.checked_add(self.len) == Some(ob),
            _ => false,
        }
    }
}

/// Ordered, non-overlapping, coalesced extents covering exactly `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    start: u64,
    end: u64,
    extents: Vec<Extent>,
}

impl BlockMap {
    /// An empty map beginning at guest offset `start`; grow it with [`BlockMap::push`].
    pub fn new(start: u64) -> Self {
        BlockMap {
            start,
            end: start,
            extents: Vec::new(),
        }
    }

    /// A map of `range` that is one extent of `kind` (or empty if the range is empty).
    pub fn uniform(range: Range<u64>, kind: ExtentKind) -> Self {
        let mut map = BlockMap::new(range.start);
        map.push(range.end.saturating_sub(range.start), kind);
        map
    }

    /// Appends `len` bytes of `kind` at the end, merging with the last extent when they
    /// are contiguous and alike. A zero `len` is ignored.
    pub fn push(&mut self, len: u64, kind: ExtentKind) {
        if len == 0 {
            return;
        }
        let ext = Extent {
            start: self.end,
            len,
            kind,
        };
        self.end = self.end.saturating_add(len);
        match self.extents.last_mut() {
            Some(last) if last.joins(&ext) => last.len += len,
            _ => self.extents.push(ext),
        }
    }

    /// Appends every extent of `other`, which must start where `self` ends.
    pub fn append(&mut self, other: &BlockMap) {
        debug_assert_eq!(other.start, self.end);
        for e in &other.extents {
            self.push(e.len, e.kind);
        }
    }

    /// First guest byte covered.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last guest byte covered.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The extents, in guest order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Total bytes of data extents.
    pub fn data_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind.is_data())
            .map(|e| e.len)
            .sum()
    }

    /// The part of the map inside `range` (clipped to the map), with data locations
    /// advanced to the clipped start.
    pub fn clip(&self, range: Range<u64>) -> BlockMap {
        let lo = range.start.clamp(self.start, self.end);
        let hi = range.end.clamp(lo, self.end);
        let mut out = BlockMap::new(lo);
        // Binary search for the first extent ending after `lo`.
        let first = self.extents.partition_point(|e| e.end() <= lo);
        for e in &self.extents[first..] {
            if e.start >= hi {
                break;
            }
            let s = e.start.max(lo);
            let t = e.end().min(hi);
            let skip = s - e.start;
            let kind = match e.kind {
                ExtentKind::Data(Location::File { file, offset }) => {
                    ExtentKind::Data(Location::File {
                        file,
                        offset: offset + skip,
                    })
                }
                k => k,
            };
            out.push(t - s, kind);
        }
        out
    }

    /// Checks the invariants: extents ordered, contiguous from `start` to `end`, non-empty
    /// and coalesced. Used by tests of every reader.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut pos = self.start;
        for (i, e) in self.extents.iter().enumerate() {
            if e.start != pos {
                return Err(format!("extent {i} starts at {} not {pos}", e.start));
            }
            if e.len == 0 {
                return Err(format!("extent {i} is empty"));
            }
            if i > 0 && self.extents[i - 1].joins(e) {
                return Err(format!("extents {} and {i} are not coalesced", i - 1));
            }
            pos = e.end();
        }
        if pos != self.end {
            return Err(format!("extents end at {pos}, map at {}", self.end));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = ExtentKind> {
        prop_oneof![
            Just(ExtentKind::Zero),
            Just(ExtentKind::Unallocated),
            Just(ExtentKind::Data(Location::Opaque)),
            (0u32..2, 0u64..1 << 20)
                .prop_map(|(file, offset)| ExtentKind::Data(Location::File { file, offset })),
            (0u64..1 << 20)
                .prop_map(|offset| ExtentKind::Data(Location::Compressed { file: 0, offset })),
        ]
    }

    /// What a map says of each byte: kind class and, for file data, the host byte.
    fn per_byte(map: &BlockMap) -> Vec<(u8, Option<(u32, u64)>)> {
        let mut v = Vec::new();
        for e in map.extents() {
            for i in 0..e.len {
                v.push(match e.kind {
                    ExtentKind::Zero => (0, None),
                    ExtentKind::Unallocated => (1, None),
                    ExtentKind::Data(Location::Opaque) => (2, None),
                    ExtentKind::Data(Location::File { file, offset }) => {
                        (3, Some((file, offset + i)))
                    }
                    ExtentKind::Data(Location::Compressed { file, offset }) => {
                        (4, Some((file, offset)))
                    }
                });
            }
        }
        v
    }

    proptest! {
        #[test]
        fn push_coalesces_and_preserves_bytes(
            start in 0u64..1000,
            parts in proptest::collection::vec((1u64..40, kind_strategy()), 0..40),
        ) {
            let mut map = BlockMap::new(start);
            let mut expected = Vec::new();
            for (len, kind) in &parts {
                let single = BlockMap::uniform(0..*len, *kind);
                expected.extend(per_byte(&single));
                map.push(*len, *kind);
            }
            prop_assert!(map.check_invariants().is_ok(), "{:?}", map.check_invariants());
            prop_assert_eq!(map.end() - map.start(), parts.iter().map(|p| p.0).sum::<u64>());
            prop_assert_eq!(per_byte(&map), expected);
        }

        #[test]
        fn clip_is_the_same_bytes(
            parts in proptest::collection::vec((1u64..40, kind_strategy()), 1..30),
            a in 0u64..1200, b in 0u64..1200,
        ) {
            let mut map = BlockMap::new(0);
            for (len, kind) in &parts { map.push(*len, *kind); }
            let (lo, hi) = (a.min(b), a.max(b));
            let clipped = map.clip(lo..hi);
            prop_assert!(clipped.check_invariants().is_ok());
            let all = per_byte(&map);
            let lo_c = (lo as usize).min(all.len());
            let hi_c = (hi as usize).min(all.len());
            prop_assert_eq!(clipped.start(), lo_c as u64);
            // Compressed units keep their unit offset; everything else is byte-exact.
            prop_assert_eq!(per_byte(&clipped), all[lo_c..hi_c].to_vec());
        }
    }

    #[test]
    fn file_data_joins_only_when_host_contiguous() {
        let mut m = BlockMap::new(0);
        m.push(
            10,
            ExtentKind::Data(Location::File {
                file: 0,
                offset: 100,
            }),
        );
        m.push(
            5,
            ExtentKind::Data(Location::File {
                file: 0,
                offset: 110,
            }),
        );
        m.push(
            5,
            ExtentKind::Data(Location::File {
                file: 0,
                offset: 500,
            }),
        );
        m.push(
            5,
            ExtentKind::Data(Location::Compressed { file: 0, offset: 9 }),
        );
        m.push(
            5,
            ExtentKind::Data(Location::Compressed { file: 0, offset: 9 }),
        );
        assert_eq!(m.extents().len(), 4);
        assert_eq!(m.extents()[0].len, 15);
        assert_eq!(m.data_bytes(), 30);
    }
}
