//! The hard disk footer (spec section "Hard Disk Footer Format") and CHS geometry
//! (spec appendix "CHS Calculation").

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::ImageFile;

use crate::SECTOR_SIZE;

/// Footer size in bytes.
pub const FOOTER_SIZE: usize = 512;
/// Size of the footer of a fixed disk made by Virtual PC before Virtual PC 2004: the spec
/// ("Hard Disk Footer Format") says such images end with a 511-byte footer (the last
/// reserved byte is missing).
pub const OLD_FOOTER_SIZE: usize = 511;
/// Footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// "Features" value every producer writes (reserved bit set).
pub const FEATURES_RESERVED: u32 = 2;
/// File format version 1.0.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// The largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track.
pub const MAX_GEOMETRY: Geometry = Geometry {
    cylinders: 65535,
    heads: 16,
    sectors: 255,
};
/// qemu's size limit for VHDs: 2040 GiB.
pub const MAX_SECTORS: u64 = 0xff00_0000;

const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VERSION: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIGINAL_SIZE: usize = 40;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_GEOMETRY: usize = 56;
const OFF_DISK_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;
const OFF_UNIQUE_ID: usize = 68;
const OFF_SAVED_STATE: usize = 84;

/// The one's complement of the byte sum of `bytes`, with the 4 bytes at `checksum_at`
/// counted as zero (spec: "Checksum").
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in bytes.iter().enumerate() {
        if !(checksum_at..checksum_at + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(b));
        }
    }
    !sum
}

/// Disk geometry (cylinders, heads, sectors per track).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// Sectors the geometry addresses.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// The geometry for `total_sectors`, by the spec's algorithm (appendix "CHS
    /// Calculation"), which addresses at most `total_sectors` (rounding down).
    pub fn for_sectors(total_sectors: u64) -> Geometry {
        let total = total_sectors.min(MAX_GEOMETRY.total_sectors());
        let (sectors, heads, cth): (u64, u64, u64);
        if total >= 65535 * 16 * 63 {
            sectors = 255;
            heads = 16;
            cth = total / sectors;
        } else {
            let mut s = 17u64;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            sectors = s;
            heads = h;
            cth = c;
        }
        Geometry {
            cylinders: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors: sectors as u8,
        }
    }

    /// The smallest geometry addressing at least `total_sectors`, as qemu-img picks it
    /// when it creates a VHD without `force_size` (the size is then rounded up to it).
    pub fn covering(total_sectors: u64) -> Geometry {
        let mut g = Geometry::for_sectors(total_sectors);
        let mut extra = 0;
        while g.total_sectors() < total_sectors && g != MAX_GEOMETRY {
            extra += 1;
            g = Geometry::for_sectors(total_sectors + extra);
        }
        g
    }
}

/// Disk types (spec: "Disk Type").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// Data, then the footer.
    Fixed,
    /// Footer copy, dynamic header, BAT, blocks, footer.
    Dynamic,
    /// A dynamic disk whose unallocated sectors come from a parent.
    Differencing,
}

impl DiskType {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    fn to_u32(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

/// The hard disk footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header, or [`NO_DATA_OFFSET`].
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application, e.g. `qemu`, `win `, `vpc `.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS (`Wi2k`, `Mac `).
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Current size.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// Stored checksum.
    pub checksum: u32,
    /// The checksum the bytes have.
    pub computed_checksum: u32,
    /// Unique id.
    pub unique_id: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

impl Footer {
    /// True when `b` starts with the footer cookie.
    pub fn is_footer(b: &[u8]) -> bool {
        b.starts_with(COOKIE)
    }

    /// Parses a footer read at `at` of `file` (checksum not enforced: see
    /// [`Footer::checksum_ok`]).
    pub fn parse(file: &ImageFile, b: &[u8; FOOTER_SIZE], at: u64) -> vconvert_core::Result<Self> {
        if !Footer::is_footer(b) {
            return Err(file.corrupt("VHD footer", at, "cookie 'conectix' not found"));
        }
        let dt = BigEndian::read_u32(&b[OFF_DISK_TYPE..]);
        let disk_type = DiskType::from_u32(dt).ok_or_else(|| {
            file.corrupt(
                "VHD footer",
                at + OFF_DISK_TYPE as u64,
                format!("unknown disk type {dt}"),
            )
        })?;
        let mut app = [0u8; 4];
        app.copy_from_slice(&b[OFF_CREATOR_APP..OFF_CREATOR_APP + 4]);
        let mut os = [0u8; 4];
        os.copy_from_slice(&b[OFF_CREATOR_OS..OFF_CREATOR_OS + 4]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16]);
        Ok(Footer {
            data_offset: BigEndian::read_u64(&b[OFF_DATA_OFFSET..]),
            timestamp: BigEndian::read_u32(&b[OFF_TIMESTAMP..]),
            creator_app: app,
            creator_version: BigEndian::read_u32(&b[OFF_CREATOR_VERSION..]),
            creator_os: os,
            original_size: BigEndian::read_u64(&b[OFF_ORIGINAL_SIZE..]),
            current_size: BigEndian::read_u64(&b[OFF_CURRENT_SIZE..]),
            geometry: Geometry {
                cylinders: u16::from_be_bytes([b[OFF_GEOMETRY], b[OFF_GEOMETRY + 1]]),
                heads: b[OFF_GEOMETRY + 2],
                sectors: b[OFF_GEOMETRY + 3],
            },
            disk_type,
            checksum: BigEndian::read_u32(&b[OFF_CHECKSUM..]),
            computed_checksum: checksum(b, OFF_CHECKSUM),
            unique_id: id,
            saved_state: b[OFF_SAVED_STATE],
        })
    }

    /// Whether the stored checksum is right.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.computed_checksum
    }

    /// Whether a reader takes the size from the CHS geometry rather than
    /// `current_size`, as qemu 10 decides: only Virtual PC (`vpc `) and qemu without
    /// `force_size` (`qemu`) size disks by geometry, and never with the maximum geometry.
    pub fn size_from_geometry(&self) -> bool {
        matches!(&self.creator_app, b"vpc " | b"qemu") && self.geometry != MAX_GEOMETRY
    }

    /// The guest-visible size in bytes, as qemu-img reports it.
    pub fn virtual_size(&self) -> u64 {
        if self.size_from_geometry() {
            self.geometry.total_sectors() * SECTOR_SIZE
        } else {
            self.current_size / SECTOR_SIZE * SECTOR_SIZE
        }
    }

    /// The creator application as text (non-printable bytes escaped).
    pub fn creator_app_text(&self) -> String {
        self.creator_app.escape_ascii().to_string()
    }

    /// Encodes the footer with a fresh checksum.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[OFF_FEATURES..OFF_FEATURES + 4].copy_from_slice(&FEATURES_RESERVED.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_be_bytes());
        b[OFF_TIMESTAMP..OFF_TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        b[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        b[OFF_CREATOR_VERSION..OFF_CREATOR_VERSION + 4]
            .copy_from_slice(&self.creator_version.to_be_bytes());
        b[OFF_CREATOR_OS..OFF_CREATOR_OS + 4].copy_from_slice(&self.creator_os);
        b[OFF_ORIGINAL_SIZE..OFF_ORIGINAL_SIZE + 8]
            .copy_from_slice(&self.original_size.to_be_bytes());
        b[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&self.current_size.to_be_bytes());
        b[OFF_GEOMETRY..OFF_GEOMETRY + 2].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[OFF_GEOMETRY + 2] = self.geometry.heads;
        b[OFF_GEOMETRY + 3] = self.geometry.sectors;
        b[OFF_DISK_TYPE..OFF_DISK_TYPE + 4].copy_from_slice(&self.disk_type.to_u32().to_be_bytes());
        b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[OFF_SAVED_STATE] = self.saved_state;
        let sum = checksum(&b, OFF_CHECKSUM);
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_rounds_10_mib_up_to_its_geometry() {
        // qemu-img create -f vpc x 10M reports 10514432 bytes.
        let g = Geometry::covering(10 << 20 >> 9);
        assert_eq!(g.total_sectors() * 512, 10_514_432);
        assert_eq!((g.cylinders, g.heads, g.sectors), (302, 4, 17));
        assert_eq!(Geometry::for_sectors(u64::MAX), MAX_GEOMETRY);
    }
}
