//! Stream-optimized markers (spec "Stream-Optimized Compressed Sparse Extents"): every
//! grain is preceded by a grain marker, and every metadata block (grain table, grain
//! directory, footer) by a one-sector metadata marker; an all-zero marker sector ends
//! the stream.

use crate::SECTOR_SIZE;

/// Size of a grain marker: `lba` (u64) and `size` (u32), then the compressed bytes.
pub const GRAIN_MARKER_SIZE: usize = 12;
/// Size of a metadata marker on disk: `numSectors` (u64), `size` (u32, 0), `type` (u32),
/// padded to a sector.
pub const METADATA_MARKER_SIZE: usize = SECTOR_SIZE as usize;

/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;

/// The marker before a compressed grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrainMarker {
    /// Guest sector of the grain's first byte (relative to the extent).
    pub lba: u64,
    /// Bytes of compressed data that follow.
    pub size: u32,
}

impl GrainMarker {
    /// Decodes the 12 bytes of a grain marker.
    pub fn decode(b: &[u8; GRAIN_MARKER_SIZE]) -> Self {
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&b[..8]);
        let mut size = [0u8; 4];
        size.copy_from_slice(&b[8..12]);
        GrainMarker {
            lba: u64::from_le_bytes(lba),
            size: u32::from_le_bytes(size),
        }
    }

    /// Encodes the marker.
    pub fn encode(&self) -> [u8; GRAIN_MARKER_SIZE] {
        let mut b = [0u8; GRAIN_MARKER_SIZE];
        b[..8].copy_from_slice(&self.lba.to_le_bytes());
        b[8..].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

/// A metadata marker: `num_sectors` sectors of metadata of `kind` follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataMarker {
    /// Sectors of the metadata that follows (0 for end of stream).
    pub num_sectors: u64,
    /// `size`: always 0 in a metadata marker (non-zero means a grain marker).
    pub size: u32,
    /// `type` (`MARKER_*`).
    pub kind: u32,
}

impl MetadataMarker {
    /// A marker announcing `num_sectors` sectors of `kind`.
    pub fn new(kind: u32, num_sectors: u64) -> Self {
        MetadataMarker {
            num_sectors,
            size: 0,
            kind,
        }
    }

    /// Decodes the first 16 bytes of a marker sector.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let n: [u8; 8] = b.get(..8)?.try_into().ok()?;
        let s: [u8; 4] = b.get(8..12)?.try_into().ok()?;
        let t: [u8; 4] = b.get(12..16)?.try_into().ok()?;
        Some(MetadataMarker {
            num_sectors: u64::from_le_bytes(n),
            size: u32::from_le_bytes(s),
            kind: u32::from_le_bytes(t),
        })
    }

    /// Encodes the marker as one sector.
    pub fn encode(&self) -> [u8; METADATA_MARKER_SIZE] {
        let mut b = [0u8; METADATA_MARKER_SIZE];
        b[..8].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[12..16].copy_from_slice(&self.kind.to_le_bytes());
        b
    }

    /// True when this is a metadata marker of `kind`.
    pub fn is(&self, kind: u32) -> bool {
        self.size == 0 && self.kind == kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip() {
        let g = GrainMarker {
            lba: 0x800,
            size: 0x55,
        };
        assert_eq!(g.encode()[..], *b"\0\x08\0\0\0\0\0\0\x55\0\0\0");
        assert_eq!(GrainMarker::decode(&g.encode()), g);
        let m = MetadataMarker::new(MARKER_FOOTER, 1);
        let b = m.encode();
        assert_eq!(MetadataMarker::decode(&b), Some(m));
        assert!(m.is(MARKER_FOOTER) && !m.is(MARKER_EOS));
        assert!(MetadataMarker::decode(&[0u8; 10]).is_none());
        assert!(MetadataMarker::decode(&[0u8; 512]).unwrap().is(MARKER_EOS));
    }
}
