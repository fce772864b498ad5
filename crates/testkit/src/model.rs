//! An in-memory disk with an explicit block map: the model every reader and writer is
//! checked against in property tests.

use std::ops::Range;

use proptest::prelude::*;
use vconvert_core::{
    BlockMap, Error, ExtentKind, Format, ImageInfo, ImageReader, Location, Result,
};

/// A virtual disk in memory: its bytes and a block map that says which are data.
#[derive(Clone, Debug)]
pub struct ModelImage {
    /// The whole disk's bytes (zero outside data extents).
    pub bytes: Vec<u8>,
    /// The block map of the whole disk.
    pub map: BlockMap,
}

/// What kind a model extent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Random bytes (sometimes all zero, to exercise zero detection).
    Data,
    /// Allocated zeros.
    Zero,
    /// Unallocated.
    Unallocated,
}

impl ModelImage {
    /// Builds a model from `(length, kind, seed)` parts. Data parts with a seed divisible
    /// by 5 are all zeros; others are random bytes from the seed.
    pub fn from_parts(parts: &[(u64, ModelKind, u64)]) -> Self {
        let size: u64 = parts.iter().map(|p| p.0).sum();
        let mut bytes = vec![0u8; size as usize];
        let mut map = BlockMap::new(0);
        let mut pos = 0u64;
        for &(len, kind, seed) in parts {
            let k = match kind {
                ModelKind::Data => {
                    if seed % 5 != 0 {
                        crate::Rng::new(seed).fill(&mut bytes[pos as usize..(pos + len) as usize]);
                    }
                    ExtentKind::Data(Location::Opaque)
                }
                ModelKind::Zero => ExtentKind::Zero,
                ModelKind::Unallocated => ExtentKind::Unallocated,
            };
            map.push(len, k);
            pos += len;
        }
        ModelImage { bytes, map }
    }

    /// A proptest strategy of models up to about `max_size` bytes made of parts that are
    /// multiples of `granule` bytes.
    pub fn strategy(
        max_parts: usize,
        granule: u64,
        max_granules: u64,
    ) -> impl Strategy<Value = ModelImage> {
        let kind = prop_oneof![
            3 => Just(ModelKind::Data),
            1 => Just(ModelKind::Zero),
            2 => Just(ModelKind::Unallocated),
        ];
        proptest::collection::vec((1..=max_granules, kind, any::<u64>()), 1..=max_parts).prop_map(
            move |parts| {
                let parts: Vec<_> = parts
                    .into_iter()
                    .map(|(n, k, s)| (n * granule, k, s))
                    .collect();
                ModelImage::from_parts(&parts)
            },
        )
    }
}

impl ImageReader for ModelImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        if range.start > range.end || range.end > self.virtual_size() {
            return Err(Error::invalid("model: range outside the disk"));
        }
        Ok(self.map.clip(range))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset as usize + buf.len();
        if end > self.bytes.len() {
            return Err(Error::invalid("model: read outside the disk"));
        }
        buf.copy_from_slice(&self.bytes[offset as usize..end]);
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo::new(Format::Raw, self.virtual_size()))
    }
}

/// Reads a whole image through its reader.
pub fn read_all(img: &dyn ImageReader) -> Result<Vec<u8>> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        img.read_at(c, (i as u64) << 20)?;
    }
    Ok(v)
}

/// Checks that `img`'s block map of the whole disk, and of some sub-ranges, keeps the
/// map invariants, and that data outside data extents reads as zeros (no backing).
pub fn check_reader_consistency(img: &dyn ImageReader) -> std::result::Result<(), String> {
    let size = img.virtual_size();
    let map = img.block_map(0..size).map_err(|e| e.to_string())?;
    map.check_invariants()?;
    if map.start() != 0 || map.end() != size {
        return Err(format!(
            "map covers {}..{} not 0..{size}",
            map.start(),
            map.end()
        ));
    }
    let bytes = read_all(img).map_err(|e| e.to_string())?;
    for e in map.extents() {
        if !e.kind.is_data() && !vconvert_core::is_zero(&bytes[e.start as usize..e.end() as usize])
        {
            return Err(format!("non-data extent {e:?} does not read as zeros"));
        }
    }
    for (a, b) in [(0, size / 3), (size / 3, size / 2 + 7), (size / 2, size)] {
        let (a, b) = (a.min(size), b.min(size));
        let sub = img.block_map(a..b).map_err(|e| e.to_string())?;
        sub.check_invariants()?;
        if sub.start() != a || sub.end() != b {
            return Err(format!(
                "sub-map of {a}..{b} covers {}..{}",
                sub.start(),
                sub.end()
            ));
        }
    }
    Ok(())
}
