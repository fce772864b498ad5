//! The hosted sparse extent header, `SparseExtentHeader` (spec "Hosted Sparse Extent
//! Header"): the first sector of every sparse extent file, and, in a stream-optimized
//! extent, the footer's copy of it.

use vconvert_core::{ImageFile, Result};

use crate::SECTOR_SIZE;

/// `magicNumber`: "KDMV" on disk (0x564d444b little-endian).
pub const MAGIC: [u8; 4] = *b"KDMV";
/// Magic of ESX Server sparse extents (`COWDisk`, spec "ESX Server Sparse Extents").
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// Size of the header on disk.
pub const HEADER_SIZE: usize = 512;
/// `gdOffset` value meaning "the grain directory is at the end of the stream; read the
/// footer" (spec "Stream-Optimized Compressed Sparse Extents").
pub const GD_AT_END: u64 = u64::MAX;

/// `flags` bit 0: the newline-detection characters are valid.
pub const FLAG_NEWLINE_CHECK: u32 = 1 << 0;
/// `flags` bit 1: a redundant grain directory and tables are kept.
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
/// `flags` bit 2: a grain table entry of 1 is a zeroed grain (spec 5.0, version 2).
pub const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
/// `flags` bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// `flags` bit 17: grains and metadata are preceded by markers.
pub const FLAG_MARKERS: u32 = 1 << 17;

/// `compressAlgorithm`: none.
pub const COMPRESSION_NONE: u16 = 0;
/// `compressAlgorithm`: deflate (zlib streams, RFC 1950).
pub const COMPRESSION_DEFLATE: u16 = 1;

/// The newline-detection characters `singleEndLineChar`, `nonEndLineChar`,
/// `doubleEndLineChar1`, `doubleEndLineChar2`; a text-mode transfer damages them.
pub const NEWLINE_CHARS: [u8; 4] = *b"\n \r\n";

/// Highest `version` we read (3: stream-optimized or ESXi change tracking).
pub const MAX_VERSION: u32 = 3;
/// `numGTEsPerGT` the spec mandates (and the most we accept).
pub const GTES_PER_GT: u32 = 512;
/// Largest grain we accept, in sectors (1 GiB, as qemu).
pub const MAX_GRAIN_SECTORS: u64 = 1 << 21;
/// Largest compressed grain we accept, in sectors (16 MiB): a compressed grain is
/// inflated into a buffer of its size. VMware and qemu write 64 KiB grains.
pub const MAX_COMPRESSED_GRAIN_SECTORS: u64 = 1 << 15;

/// Field offsets inside the header.
mod off {
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 8;
    pub const CAPACITY: usize = 12;
    pub const GRAIN_SIZE: usize = 20;
    pub const DESCRIPTOR_OFFSET: usize = 28;
    pub const DESCRIPTOR_SIZE: usize = 36;
    pub const NUM_GTES_PER_GT: usize = 44;
    pub const RGD_OFFSET: usize = 48;
    pub const GD_OFFSET: usize = 56;
    pub const OVERHEAD: usize = 64;
    pub const UNCLEAN_SHUTDOWN: usize = 72;
    pub const NEWLINE_CHARS: usize = 73;
    pub const COMPRESS_ALGORITHM: usize = 77;
}

/// A decoded `SparseExtentHeader`. Sizes and offsets are in sectors, as on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseExtentHeader {
    /// `version`: 1, 2 (zeroed-grain GTEs) or 3 (stream-optimized, change tracking).
    pub version: u32,
    /// `flags` (`FLAG_*`).
    pub flags: u32,
    /// `capacity`: sectors of the extent.
    pub capacity: u64,
    /// `grainSize`: sectors per grain.
    pub grain_size: u64,
    /// `descriptorOffset`: sector of the embedded descriptor (0: none).
    pub descriptor_offset: u64,
    /// `descriptorSize`: sectors of the embedded descriptor.
    pub descriptor_size: u64,
    /// `numGTEsPerGT`: entries per grain table (512).
    pub num_gtes_per_gt: u32,
    /// `rgdOffset`: sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// `gdOffset`: sector of the grain directory, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// `overHead`: sectors before the first grain.
    pub overhead: u64,
    /// `uncleanShutdown`.
    pub unclean_shutdown: bool,
    /// The four newline-detection characters as found.
    pub newline_chars: [u8; 4],
    /// `compressAlgorithm`.
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8; HEADER_SIZE], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseExtentHeader {
    /// A header for a new extent with the fixed fields set (newline characters,
    /// 512 GTEs per GT) and everything else zero.
    pub fn new(version: u32, flags: u32) -> Self {
        SparseExtentHeader {
            version,
            flags,
            capacity: 0,
            grain_size: 0,
            descriptor_offset: 0,
            descriptor_size: 0,
            num_gtes_per_gt: GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: 0,
            overhead: 0,
            unclean_shutdown: false,
            newline_chars: NEWLINE_CHARS,
            compress_algorithm: COMPRESSION_NONE,
        }
    }

    /// Decodes a header sector; `None` when the magic is not `KDMV`.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Option<Self> {
        if b[..4] != MAGIC {
            return None;
        }
        let mut newline_chars = [0u8; 4];
        newline_chars.copy_from_slice(&b[off::NEWLINE_CHARS..off::NEWLINE_CHARS + 4]);
        Some(SparseExtentHeader {
            version: u32_at(b, off::VERSION),
            flags: u32_at(b, off::FLAGS),
            capacity: u64_at(b, off::CAPACITY),
            grain_size: u64_at(b, off::GRAIN_SIZE),
            descriptor_offset: u64_at(b, off::DESCRIPTOR_OFFSET),
            descriptor_size: u64_at(b, off::DESCRIPTOR_SIZE),
            num_gtes_per_gt: u32_at(b, off::NUM_GTES_PER_GT),
            rgd_offset: u64_at(b, off::RGD_OFFSET),
            gd_offset: u64_at(b, off::GD_OFFSET),
            overhead: u64_at(b, off::OVERHEAD),
            unclean_shutdown: b[off::UNCLEAN_SHUTDOWN] != 0,
            newline_chars,
            compress_algorithm: u16::from_le_bytes([
                b[off::COMPRESS_ALGORITHM],
                b[off::COMPRESS_ALGORITHM + 1],
            ]),
        })
    }

    /// Encodes the header as one sector.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..4].copy_from_slice(&MAGIC);
        b[off::VERSION..off::VERSION + 4].copy_from_slice(&self.version.to_le_bytes());
        b[off::FLAGS..off::FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        let u64s = [
            (off::CAPACITY, self.capacity),
            (off::GRAIN_SIZE, self.grain_size),
            (off::DESCRIPTOR_OFFSET, self.descriptor_offset),
            (off::DESCRIPTOR_SIZE, self.descriptor_size),
            (off::RGD_OFFSET, self.rgd_offset),
            (off::GD_OFFSET, self.gd_offset),
            (off::OVERHEAD, self.overhead),
        ];
        for (at, v) in u64s {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[off::NUM_GTES_PER_GT..off::NUM_GTES_PER_GT + 4]
            .copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[off::UNCLEAN_SHUTDOWN] = u8::from(self.unclean_shutdown);
        b[off::NEWLINE_CHARS..off::NEWLINE_CHARS + 4].copy_from_slice(&self.newline_chars);
        b[off::COMPRESS_ALGORITHM..off::COMPRESS_ALGORITHM + 2]
            .copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Reads and decodes the header at byte `offset` of `file`; `structure` names it in
    /// errors ("sparse extent header", "stream footer").
    pub fn read(file: &ImageFile, offset: u64, structure: &'static str) -> Result<Self> {
        let mut b = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut b, offset, structure)?;
        Self::decode(&b)
            .ok_or_else(|| file.corrupt(structure, offset, "magic number is not 'KDMV'"))
    }

    /// True when `flag` is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Validates the fields a reader relies on, naming the offending field of the header
    /// at byte `at` of `file`. The grain directory offset is checked by the caller.
    pub fn validate(&self, file: &ImageFile, at: u64, structure: &'static str) -> Result<()> {
        let bad = |field: usize, reason: String| file.corrupt(structure, at + field as u64, reason);
        if self.version == 0 {
            return Err(bad(off::VERSION, "version 0 is invalid".into()));
        }
        if self.version > MAX_VERSION {
            return Err(vconvert_core::Error::unsupported(
                file.name(),
                format!("VMDK sparse extent version {}", self.version),
            ));
        }
        if self.has(FLAG_NEWLINE_CHECK) && self.newline_chars != NEWLINE_CHARS {
            return Err(bad(
                off::NEWLINE_CHARS,
                format!(
                    "newline-detection bytes are {:02x?}, not {:02x?}: the file was damaged by a text-mode transfer",
                    self.newline_chars, NEWLINE_CHARS
                ),
            ));
        }
        if self.grain_size == 0 || self.grain_size > MAX_GRAIN_SECTORS {
            return Err(bad(
                off::GRAIN_SIZE,
                format!(
                    "grain size of {} sectors is outside 1..={MAX_GRAIN_SECTORS}",
                    self.grain_size
                ),
            ));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > GTES_PER_GT {
            return Err(bad(
                off::NUM_GTES_PER_GT,
                format!(
                    "{} grain table entries per table is outside 1..={GTES_PER_GT}",
                    self.num_gtes_per_gt
                ),
            ));
        }
        if self.capacity > u64::MAX / SECTOR_SIZE / 2 {
            return Err(bad(
                off::CAPACITY,
                format!("capacity of {} sectors is invalid", self.capacity),
            ));
        }
        if self.has(FLAG_COMPRESSED) && self.grain_size > MAX_COMPRESSED_GRAIN_SECTORS {
            return Err(vconvert_core::Error::unsupported(
                file.name(),
                format!(
                    "compressed VMDK grains of {} sectors (at most {MAX_COMPRESSED_GRAIN_SECTORS})",
                    self.grain_size
                ),
            ));
        }
        if self.has(FLAG_COMPRESSED) && self.compress_algorithm > COMPRESSION_DEFLATE {
            return Err(vconvert_core::Error::unsupported(
                file.name(),
                format!("VMDK compression algorithm {}", self.compress_algorithm),
            ));
        }
        Ok(())
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR_SIZE
    }

    /// Guest sectors one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        u64::from(self.num_gtes_per_gt) * self.grain_size
    }

    /// Entries of the grain directory: one per grain table needed for the capacity.
    pub fn gd_entries(&self) -> u64 {
        self.capacity.div_ceil(self.gt_coverage().max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_field_offsets() {
        let mut h = SparseExtentHeader::new(1, FLAG_NEWLINE_CHECK | FLAG_REDUNDANT_GT);
        h.capacity = 20480;
        h.grain_size = 128;
        h.descriptor_offset = 1;
        h.descriptor_size = 20;
        h.rgd_offset = 21;
        h.gd_offset = 26;
        h.overhead = 128;
        let b = h.encode();
        // Bytes of a qemu-made 10 MiB monolithicSparse header.
        assert_eq!(&b[..0x10], b"KDMV\x01\0\0\0\x03\0\0\0\0\x50\0\0");
        assert_eq!(&b[0x48..0x4f], b"\0\n \r\n\0\0");
        assert_eq!(SparseExtentHeader::decode(&b), Some(h.clone()));
        let f = ImageFile::from_bytes("h.vmdk", b.to_vec());
        h.validate(&f, 0, "sparse extent header").unwrap();
        assert_eq!(h.gd_entries(), 1);
        let mut bad = h.clone();
        bad.newline_chars = *b"\n \n\n";
        let e = bad.validate(&f, 0, "sparse extent header").unwrap_err();
        assert!(e.to_string().contains("text-mode"), "{e}");
        let mut bad = h;
        bad.version = 4;
        assert!(bad
            .validate(&f, 0, "x")
            .unwrap_err()
            .to_string()
            .contains("version 4"));
        assert!(SparseExtentHeader::decode(&[0u8; 512]).is_none());
    }
}
