//! Block status: what qemu's block layer says of a guest range of one image layer, the
//! vocabulary of `qemu-img map`.
//!
//! A format's reader answers for its own layer only ([`crate::ImageReader::layer_status`]),
//! the way a qemu block driver's `block_status` does: data (with its host position when
//! the bytes lie plainly in a file), zero, compressed, or nothing (the backing image
//! shows through). The engine adds what qemu's generic layer adds: the backing chain
//! and its depth, zeros past the end of a chain, and host-file holes under data the
//! format asks to refine.

use crate::{BlockMap, ExtentKind, Location};

/// The status of one guest range of one image layer (qemu's `BDRV_BLOCK_*` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStatus {
    /// Guest byte offset of the first byte.
    pub start: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// `BDRV_BLOCK_DATA`: the layer stores bytes for the range.
    pub data: bool,
    /// `BDRV_BLOCK_ZERO`: the range reads as zeros.
    pub zero: bool,
    /// `BDRV_BLOCK_COMPRESSED`: the data is compressed.
    pub compressed: bool,
    /// `BDRV_BLOCK_OFFSET_VALID`: the range's first byte lies plainly at this host
    /// offset of file number `.0` of the layer (see [`crate::ImageReader::host_file`]).
    pub offset: Option<(u32, u64)>,
    /// `BDRV_BLOCK_RECURSE`: data whose host range lies over holes of its file reads as
    /// zeros there (flat and preallocated layouts), so the host file is asked too.
    pub recurse: bool,
}

impl LayerStatus {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// `BDRV_BLOCK_ALLOCATED`: this layer decides what the range reads as.
    pub fn allocated(&self) -> bool {
        self.data || self.zero
    }
}

/// The status a block map implies, extent by extent: file data with its offset,
/// compressed data without one, zeros, and unallocated ranges as nothing.
pub fn status_of_map(map: &BlockMap) -> Vec<LayerStatus> {
    map.extents()
        .iter()
        .map(|e| {
            let mut s = LayerStatus {
                start: e.start,
                len: e.len,
                ..LayerStatus::default()
            };
            match e.kind {
                ExtentKind::Data(Location::File { file, offset }) => {
                    s.data = true;
                    s.offset = Some((file, offset));
                }
                ExtentKind::Data(Location::Compressed { .. }) => {
                    s.data = true;
                    s.compressed = true;
                }
                ExtentKind::Data(Location::Opaque) => s.data = true,
                ExtentKind::Zero => s.zero = true,
                ExtentKind::Unallocated => {}
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_kinds_become_flags() {
        let mut m = BlockMap::new(0);
        m.push(10, ExtentKind::Data(Location::File { file: 1, offset: 7 }));
        m.push(5, ExtentKind::Zero);
        m.push(5, ExtentKind::Unallocated);
        m.push(
            5,
            ExtentKind::Data(Location::Compressed { file: 0, offset: 9 }),
        );
        let s = status_of_map(&m);
        assert_eq!(s.len(), 4);
        assert!(s[0].data && !s[0].zero && s[0].offset == Some((1, 7)));
        assert!(s[1].zero && s[1].allocated() && s[1].offset.is_none());
        assert!(!s[2].allocated() && s[2].start == 15);
        assert!(s[3].compressed && s[3].data && s[3].offset.is_none());
    }
}
