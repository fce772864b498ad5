//! VHDX images (Hyper-V's virtual hard disk v2).
//!
//! This crate owns the VHDX on-disk structures of Microsoft's "[MS-VHDX]: Virtual Hard
//! Disk v2 (VHDX) File Format" (sections cited on each item): the file type identifier
//! and the two [`Header`]s ([`header`], §2.2), the two region tables ([`region`],
//! §2.2.3), the metadata region ([`metadata`], §2.6: file parameters, sizes, page 83
//! data, parent locator), the block allocation table with its payload and sector bitmap
//! entries interleaved by the chunk ratio ([`bat`], §2.5), and the log ([`log`], §2.3),
//! which the [`VhdxReader`] replays **in memory** when it is dirty, so that a disk copied
//! from a running VM reads as Hyper-V would see it while the source file stays untouched.
//! The [`VhdxWriter`] writes dynamic or fixed VHDX files in qemu-img's layout.
//!
//! Every checksum is CRC-32C (Castagnoli), computed with the `crc32c` crate.
//!
//! ```no_run
//! use vconvert_core::{ImageFile, ImageReader, NoReferences};
//! let file = ImageFile::open(std::path::Path::new("disk.vhdx"))?;
//! let img = vconvert_vhdx::VhdxReader::open(file, &NoReferences)?;
//! println!("{} bytes, log replayed: {}", img.virtual_size(), img.log_replayed());
//! # Ok::<(), vconvert_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod bat;
pub mod header;
pub mod log;
pub mod metadata;
mod overlay;
mod reader;
pub mod region;
mod writer;

pub use reader::VhdxReader;
pub use writer::{default_block_size, Layout, VhdxWriter};

/// One mebibyte: the alignment of regions, the log and payload blocks (§2.2, §2.5).
pub const MIB: u64 = 1 << 20;

/// A GUID as stored in VHDX: the first three fields little-endian (Microsoft's layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The nil GUID.
    pub const NIL: Guid = Guid([0; 16]);

    /// The GUID written `d1-d2-d3-d4` in text, laid out as Microsoft stores it.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// The 16 bytes at `at` of `b`.
    pub fn read(b: &[u8], at: usize) -> Self {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[at..at + 16]);
        Guid(g)
    }

    /// True for the nil GUID.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A random (RFC 4122 version 4) GUID from `id`, in Microsoft's byte order.
    pub fn random(id: &mut vconvert_core::Identity) -> vconvert_core::Result<Self> {
        let b = id.uuid_v4()?;
        // RFC order to Microsoft's mixed-endian layout.
        Ok(Guid([
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]))
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

/// The CRC-32C of `bytes` with the four checksum bytes at `at` taken as zero (how
/// every VHDX checksum is defined: headers, region tables, log entries).
pub fn checksum(bytes: &[u8], at: usize) -> u32 {
    let crc = crc32c::crc32c(&bytes[..at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &bytes[at + 4..])
}

/// Stores the checksum of `bytes` in its field at `at`.
pub fn seal(bytes: &mut [u8], at: usize) {
    let c = checksum(bytes, at);
    bytes[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_layout_and_text() {
        let g = Guid::from_fields(
            0x2DC2_7766,
            0xF623,
            0x4200,
            [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
        );
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xc2, 0x2d]);
        assert_eq!(g.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
    }

    #[test]
    fn checksum_is_castagnoli_with_the_field_zeroed() {
        // CRC-32C of "123456789" is 0xe3069283 (the standard check value).
        let mut b = b"123456789\0\0\0\0".to_vec();
        assert_eq!(checksum(&b, 9), crc32c::crc32c(b"123456789\0\0\0\0"));
        b[9..].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(checksum(&b, 9), crc32c::crc32c(b"123456789\0\0\0\0"));
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}
