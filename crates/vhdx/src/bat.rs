//! The block allocation table (MS-VHDX §2.5): 64-bit entries, state in bits 0–2 and the
//! file offset in MiB in bits 20–63; payload block entries interleaved with one sector
//! bitmap entry after every `chunk_ratio` payload entries.
//!
//! Reserved bits (3–19) are ignored, as Hyper-V does; the reserved payload state 4 and
//! sector bitmap states other than 0 and 6 (in a differencing disk) are corruption.
//! Sector bitmap entries of fixed and dynamic disks are never read (§2.5.1.2 says they
//! must be 0), so they are ignored; state 5 reads as unmapped, as qemu reads it.

use crate::MIB;

/// Payload block: not in this file (a differencing disk reads its parent; others zero).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
/// Payload block: contents undefined (read as zeros).
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
/// Payload block: reads as zeros.
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
/// Payload block: unmapped by a trim (read as zeros).
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
/// Payload block: unmapped, as the 0.95 draft of the spec numbered it (qemu reads it
/// as zeros, and so does vconvert).
pub const PAYLOAD_BLOCK_UNMAPPED_V095: u8 = 5;
/// Payload block: all of it in this file at the entry's offset.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
/// Payload block: sectors present per the sector bitmap, the rest in the parent.
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block: not allocated.
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
/// Sector bitmap block: allocated at the entry's offset.
pub const SB_BLOCK_PRESENT: u8 = 6;
/// Bytes of a sector bitmap block (§2.4).
pub const SECTOR_BITMAP_BLOCK: u64 = MIB;

/// A decoded BAT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatEntry {
    /// Bits 0–2.
    pub state: u8,
    /// File offset in bytes (bits 20–63, in MiB).
    pub offset: u64,
}

impl BatEntry {
    /// Decodes the raw entry.
    pub fn decode(raw: u64) -> Self {
        BatEntry {
            state: (raw & 7) as u8,
            offset: (raw >> 20) << 20,
        }
    }

    /// Encodes it.
    pub fn encode(&self) -> u64 {
        u64::from(self.state & 7) | ((self.offset >> 20) << 20)
    }
}

/// The BAT's shape for a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per payload block.
    pub block_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks of the disk.
    pub payload_blocks: u64,
    /// Entries the BAT must hold.
    pub total_entries: u64,
}

impl Geometry {
    /// The shape of a disk of `size` bytes (§2.5: entries for every payload block and,
    /// for differencing disks, a sector bitmap entry after every full or last chunk).
    pub fn new(size: u64, block_size: u64, logical_sector: u64, has_parent: bool) -> Self {
        let chunk_ratio = (1u64 << 23) * logical_sector / block_size;
        let payload_blocks = size.div_ceil(block_size);
        let bitmap_blocks = payload_blocks.div_ceil(chunk_ratio);
        let total_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size,
            chunk_ratio,
            payload_blocks,
            total_entries,
        }
    }

    /// Index of payload block `block`'s entry.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// Index of the sector bitmap entry of the chunk holding payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// True when entry `index` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, index: u64) -> bool {
        index % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// The payload block of entry `index` (which is not a bitmap entry).
    pub fn block_of_index(&self, index: u64) -> u64 {
        index - index / (self.chunk_ratio + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_ignore_reserved_bits() {
        let e = BatEntry {
            state: PAYLOAD_BLOCK_FULLY_PRESENT,
            offset: 9 * MIB,
        };
        assert_eq!(BatEntry::decode(e.encode()), e);
        assert_eq!(BatEntry::decode(e.encode() | 0xff8), e);
    }

    #[test]
    fn interleaving_by_chunk_ratio() {
        // 512-byte sectors, 32 MiB blocks: chunk ratio 128.
        let g = Geometry::new(10 << 30, 32 << 20, 512, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_blocks, 320);
        assert_eq!(g.total_entries, 320 + 2);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert_eq!(g.bitmap_index(128), 257);
        assert!(g.is_bitmap_index(128) && !g.is_bitmap_index(129));
        assert_eq!(g.block_of_index(129), 128);
        // Hyper-V's 4 KiB sectors, 32 MiB blocks: 1024.
        let h = Geometry::new(127 << 30, 32 << 20, 4096, true);
        assert_eq!(h.chunk_ratio, 1024);
        assert_eq!(h.total_entries, 4 * 1025);
        for b in 0..h.payload_blocks {
            let i = h.payload_index(b);
            assert!(!h.is_bitmap_index(i));
            assert_eq!(h.block_of_index(i), b);
        }
        assert_eq!(Geometry::new(0, 1 << 20, 512, false).total_entries, 0);
    }
}
