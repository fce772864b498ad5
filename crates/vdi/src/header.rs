//! The VDI header (VirtualBox `VDIHEADER1`, version 1.1) and block map entries.

use vconvert_core::{Error, ImageFile, Result};

/// The pre-header signature at 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Header version 1.1 (major 1 in the high half, minor 1 in the low half).
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Header version 1.0: the 1.1 layout without the trailing LCHS geometry.
pub const VERSION_1_0: u32 = 0x0001_0000;
/// Bytes of pre-header plus a major-version-0 header (`VDIHEADER0`); the block map of
/// such an image follows right after, and the data after the block map.
pub const HEADER0_END: u32 = 0x1a4;
/// The text qemu and vconvert write at the start of the file.
pub const PRE_HEADER_TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Bytes of pre-header plus header that we read and write (qemu's layout: the block map
/// follows at 0x200).
pub const HEADER_BYTES: usize = 0x200;
/// `cbHeader` of a version 1.1 header as qemu writes it.
pub const HEADER_SIZE_V1_1: u32 = 0x180;
/// Sector size; the only one VirtualBox and qemu use.
pub const SECTOR_SIZE: u32 = 512;
/// Block size everyone writes.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Block map entry of a block that is not allocated (reads as zeros or from the parent).
pub const BLOCK_FREE: u32 = 0xffff_ffff;
/// Block map entry of a block discarded as zeros (VirtualBox writes it on compaction).
pub const BLOCK_ZERO: u32 = 0xffff_fffe;
/// Largest block size we read.
pub const MAX_BLOCK_SIZE: u32 = 1 << 28;
/// Largest block map we load (64 Mi blocks: 64 TiB of 1 MiB blocks).
pub const MAX_BLOCKS: u32 = 64 << 20;

// Field offsets (version 1.1).
const OFF_SIGNATURE: usize = 0x40;
const OFF_VERSION: usize = 0x44;
const OFF_HEADER_SIZE: usize = 0x48;
const OFF_IMAGE_TYPE: usize = 0x4c;
const OFF_IMAGE_FLAGS: usize = 0x50;
const OFF_DESCRIPTION: usize = 0x54;
const OFF_BLOCK_MAP: usize = 0x154;
const OFF_DATA: usize = 0x158;
const OFF_CYLINDERS: usize = 0x15c;
const OFF_HEADS: usize = 0x160;
const OFF_SECTORS: usize = 0x164;
const OFF_SECTOR_SIZE: usize = 0x168;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_BLOCK_SIZE: usize = 0x178;
const OFF_BLOCK_EXTRA: usize = 0x17c;
const OFF_BLOCKS: usize = 0x180;
const OFF_BLOCKS_ALLOCATED: usize = 0x184;
const OFF_UUID_IMAGE: usize = 0x188;
const OFF_UUID_LAST_SNAP: usize = 0x198;
const OFF_UUID_LINK: usize = 0x1a8;
const OFF_UUID_PARENT: usize = 0x1b8;

/// VDI image types (`VDI_IMAGE_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    /// Dynamically allocated ("normal").
    Dynamic,
    /// Fully allocated ("fixed").
    Static,
    /// Undo image.
    Undo,
    /// Differencing image (has a parent).
    Diff,
}

impl ImageType {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(ImageType::Dynamic),
            2 => Some(ImageType::Static),
            3 => Some(ImageType::Undo),
            4 => Some(ImageType::Diff),
            _ => None,
        }
    }

    fn to_u32(self) -> u32 {
        match self {
            ImageType::Dynamic => 1,
            ImageType::Static => 2,
            ImageType::Undo => 3,
            ImageType::Diff => 4,
        }
    }

    /// The name VirtualBox uses.
    pub fn name(self) -> &'static str {
        match self {
            ImageType::Dynamic => "dynamic",
            ImageType::Static => "static",
            ImageType::Undo => "undo",
            ImageType::Diff => "differencing",
        }
    }
}

/// A block map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEntry {
    /// Not allocated.
    Free,
    /// Allocated as zeros.
    Zero,
    /// Index of the block in the data area.
    Allocated(u32),
}

impl BlockEntry {
    /// Decodes an on-disk entry.
    pub fn from_u32(v: u32) -> Self {
        match v {
            BLOCK_FREE => BlockEntry::Free,
            BLOCK_ZERO => BlockEntry::Zero,
            i => BlockEntry::Allocated(i),
        }
    }

    /// Encodes the entry.
    pub fn to_u32(self) -> u32 {
        match self {
            BlockEntry::Free => BLOCK_FREE,
            BlockEntry::Zero => BLOCK_ZERO,
            BlockEntry::Allocated(i) => i,
        }
    }
}

/// The fields of a VDI header that matter for reading and writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdiHeader {
    /// `cbHeader`.
    pub header_size: u32,
    /// Dynamic, static, ...
    pub image_type: ImageType,
    /// `fFlags`.
    pub image_flags: u32,
    /// Byte offset of the block map.
    pub block_map_offset: u32,
    /// Byte offset of the data area.
    pub data_offset: u32,
    /// Legacy geometry: cylinders, heads, sectors per track.
    pub geometry: (u32, u32, u32),
    /// Bytes per sector (512).
    pub sector_size: u32,
    /// Guest-visible size in bytes.
    pub disk_size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Bytes of extra data in front of each block.
    pub block_extra: u32,
    /// Entries in the block map.
    pub blocks: u32,
    /// Blocks allocated in the data area.
    pub blocks_allocated: u32,
    /// Image UUID.
    pub uuid_image: [u8; 16],
    /// UUID of the last snapshot.
    pub uuid_last_snap: [u8; 16],
    /// Link UUID (of the parent's image UUID).
    pub uuid_link: [u8; 16],
    /// Parent UUID (of the parent's last snapshot).
    pub uuid_parent: [u8; 16],
}

fn u32_at(b: &[u8; HEADER_BYTES], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8; HEADER_BYTES], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

fn uuid_at(b: &[u8; HEADER_BYTES], off: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[off..off + 16]);
    u
}

/// Formats a UUID stored in VirtualBox's (little-endian first three fields) byte order.
pub fn uuid_string(u: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6], u[8], u[9], u[10], u[11], u[12], u[13],
        u[14], u[15]
    )
}

/// Converts an RFC-order UUID to VirtualBox's on-disk order.
pub fn uuid_to_disk(rfc: [u8; 16]) -> [u8; 16] {
    let mut u = rfc;
    u[..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

impl VdiHeader {
    /// Reads and checks the header of `file`.
    pub fn read(file: &ImageFile) -> Result<Self> {
        let mut b = [0u8; HEADER_BYTES];
        if file.len() < (OFF_UUID_PARENT + 16) as u64 {
            return Err(file.corrupt(
                "VDI header",
                0,
                format!("file is too short ({} bytes) for a VDI header", file.len()),
            ));
        }
        let n = file.len().min(HEADER_BYTES as u64) as usize;
        file.read_exact_at(&mut b[..n], 0, "VDI header")?;
        let sig = u32_at(&b, OFF_SIGNATURE);
        if sig != SIGNATURE {
            return Err(file.corrupt(
                "VDI header",
                OFF_SIGNATURE as u64,
                format!("signature is {sig:#010x}, not {SIGNATURE:#010x}"),
            ));
        }
        let version = u32_at(&b, OFF_VERSION);
        if version >> 16 == 0 {
            let h = Self::from_header0(file, &b)?;
            h.validate(file)?;
            return Ok(h);
        }
        if version != VERSION_1_1 && version != VERSION_1_0 {
            return Err(Error::unsupported(
                file.name(),
                format!(
                    "VDI header version {}.{} (0.x, 1.0 and 1.1 are read)",
                    version >> 16,
                    version & 0xffff
                ),
            ));
        }
        let type_raw = u32_at(&b, OFF_IMAGE_TYPE);
        let image_type = ImageType::from_u32(type_raw).ok_or_else(|| {
            file.corrupt(
                "VDI header",
                OFF_IMAGE_TYPE as u64,
                format!("unknown image type {type_raw}"),
            )
        })?;
        let h = VdiHeader {
            header_size: u32_at(&b, OFF_HEADER_SIZE),
            image_type,
            image_flags: u32_at(&b, OFF_IMAGE_FLAGS),
            block_map_offset: u32_at(&b, OFF_BLOCK_MAP),
            data_offset: u32_at(&b, OFF_DATA),
            geometry: (
                u32_at(&b, OFF_CYLINDERS),
                u32_at(&b, OFF_HEADS),
                u32_at(&b, OFF_SECTORS),
            ),
            sector_size: u32_at(&b, OFF_SECTOR_SIZE),
            disk_size: u64_at(&b, OFF_DISK_SIZE),
            block_size: u32_at(&b, OFF_BLOCK_SIZE),
            block_extra: u32_at(&b, OFF_BLOCK_EXTRA),
            blocks: u32_at(&b, OFF_BLOCKS),
            blocks_allocated: u32_at(&b, OFF_BLOCKS_ALLOCATED),
            uuid_image: uuid_at(&b, OFF_UUID_IMAGE),
            uuid_last_snap: uuid_at(&b, OFF_UUID_LAST_SNAP),
            uuid_link: uuid_at(&b, OFF_UUID_LINK),
            uuid_parent: uuid_at(&b, OFF_UUID_PARENT),
        };
        h.validate(file)?;
        Ok(h)
    }

    /// A major-version-0 header (`VDIHEADER0`, written by the first innotek releases):
    /// type, flags, comment, legacy geometry, disk size, block size, block counts and
    /// three UUIDs from 0x48; no offsets (the block map follows the header at 0x1a4),
    /// no block extra data, no parent UUID.
    fn from_header0(file: &ImageFile, b: &[u8; HEADER_BYTES]) -> Result<Self> {
        let type_raw = u32_at(b, 0x48);
        let image_type = ImageType::from_u32(type_raw).ok_or_else(|| {
            file.corrupt("VDI header", 0x48, format!("unknown image type {type_raw}"))
        })?;
        let blocks = u32_at(b, 0x16c);
        let data_offset = u64::from(HEADER0_END) + 4 * u64::from(blocks);
        let data_offset = u32::try_from(data_offset).map_err(|_| {
            file.corrupt("VDI header", 0x16c, format!("{blocks} blocks is too many"))
        })?;
        Ok(VdiHeader {
            header_size: HEADER0_END - 0x48,
            image_type,
            image_flags: u32_at(b, 0x4c),
            block_map_offset: HEADER0_END,
            data_offset,
            geometry: (u32_at(b, 0x150), u32_at(b, 0x154), u32_at(b, 0x158)),
            sector_size: SECTOR_SIZE,
            disk_size: u64_at(b, 0x160),
            block_size: u32_at(b, 0x168),
            block_extra: 0,
            blocks,
            blocks_allocated: u32_at(b, 0x170),
            uuid_image: uuid_at(b, 0x174),
            uuid_last_snap: uuid_at(b, 0x184),
            uuid_link: uuid_at(b, 0x194),
            uuid_parent: [0; 16],
        })
    }

    fn validate(&self, file: &ImageFile) -> Result<()> {
        let bad = |off: usize, reason: String| Err(file.corrupt("VDI header", off as u64, reason));
        if self.image_type == ImageType::Diff || self.uuid_parent != [0u8; 16] {
            return Err(Error::unsupported(
                file.name(),
                format!(
                    "differencing VDI images (parent {}): VirtualBox finds the parent through \
                     its media registry, which vconvert does not read; merge the image into \
                     its parent with VirtualBox (VBoxManage clonemedium) and convert that",
                    uuid_string(&self.uuid_parent)
                ),
            ));
        }
        if self.image_type == ImageType::Undo {
            return Err(Error::unsupported(file.name(), "VDI undo images"));
        }
        if self.sector_size != SECTOR_SIZE {
            return bad(
                OFF_SECTOR_SIZE,
                format!("sector size {} is not 512", self.sector_size),
            );
        }
        if !self.block_size.is_power_of_two()
            || self.block_size < SECTOR_SIZE
            || self.block_size > MAX_BLOCK_SIZE
        {
            return bad(
                OFF_BLOCK_SIZE,
                format!(
                    "block size {} is not a power of two between 512 and {MAX_BLOCK_SIZE}",
                    self.block_size
                ),
            );
        }
        if self.block_extra % SECTOR_SIZE != 0 || self.block_extra > MAX_BLOCK_SIZE {
            return bad(
                OFF_BLOCK_EXTRA,
                format!("block extra size {} is invalid", self.block_extra),
            );
        }
        if self.blocks > MAX_BLOCKS {
            return bad(
                OFF_BLOCKS,
                format!("{} blocks exceed the limit of {MAX_BLOCKS}", self.blocks),
            );
        }
        let capacity = u64::from(self.blocks) * u64::from(self.block_size);
        if self.virtual_size() > capacity {
            return bad(
                OFF_DISK_SIZE,
                format!(
                    "disk size {} does not fit in {} blocks of {} bytes",
                    self.disk_size, self.blocks, self.block_size
                ),
            );
        }
        if self.blocks_allocated > self.blocks {
            return bad(
                OFF_BLOCKS_ALLOCATED,
                format!(
                    "{} blocks allocated but the image has {} blocks",
                    self.blocks_allocated, self.blocks
                ),
            );
        }
        let map_end = u64::from(self.block_map_offset) + 4 * u64::from(self.blocks);
        // A version 0 header ends at 0x1a4; version 1 headers at 0x1c8.
        let header_end = if self.header_size == HEADER0_END - 0x48 {
            HEADER0_END
        } else {
            (OFF_UUID_PARENT + 16) as u32
        };
        if self.block_map_offset < header_end {
            return bad(
                OFF_BLOCK_MAP,
                format!(
                    "block map offset {:#x} overlaps the header",
                    self.block_map_offset
                ),
            );
        }
        file.check_range(
            "VDI block map",
            self.block_map_offset.into(),
            4 * u64::from(self.blocks),
        )?;
        if u64::from(self.data_offset) < map_end {
            return bad(
                OFF_DATA,
                format!(
                    "data offset {:#x} overlaps the block map (which ends at {map_end:#x})",
                    self.data_offset
                ),
            );
        }
        Ok(())
    }

    /// Guest-visible size: the disk size rounded up to whole sectors, as qemu reads it.
    pub fn virtual_size(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(SECTOR_SIZE)) * u64::from(SECTOR_SIZE)
    }

    /// Host byte offset of data block `index`.
    pub fn block_offset(&self, index: u32) -> u64 {
        u64::from(self.data_offset)
            + u64::from(index) * (u64::from(self.block_size) + u64::from(self.block_extra))
            + u64::from(self.block_extra)
    }

    /// Encodes the header (with qemu's pre-header text) into the first 0x200 bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..PRE_HEADER_TEXT.len()].copy_from_slice(PRE_HEADER_TEXT);
        let mut put32 = |off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put32(OFF_SIGNATURE, SIGNATURE);
        put32(OFF_VERSION, VERSION_1_1);
        put32(OFF_HEADER_SIZE, self.header_size);
        put32(OFF_IMAGE_TYPE, self.image_type.to_u32());
        put32(OFF_IMAGE_FLAGS, self.image_flags);
        put32(OFF_BLOCK_MAP, self.block_map_offset);
        put32(OFF_DATA, self.data_offset);
        put32(OFF_CYLINDERS, self.geometry.0);
        put32(OFF_HEADS, self.geometry.1);
        put32(OFF_SECTORS, self.geometry.2);
        put32(OFF_SECTOR_SIZE, self.sector_size);
        put32(OFF_BLOCK_SIZE, self.block_size);
        put32(OFF_BLOCK_EXTRA, self.block_extra);
        put32(OFF_BLOCKS, self.blocks);
        put32(OFF_BLOCKS_ALLOCATED, self.blocks_allocated);
        b[OFF_DISK_SIZE..OFF_DISK_SIZE + 8].copy_from_slice(&self.disk_size.to_le_bytes());
        b[OFF_UUID_IMAGE..OFF_UUID_IMAGE + 16].copy_from_slice(&self.uuid_image);
        b[OFF_UUID_LAST_SNAP..OFF_UUID_LAST_SNAP + 16].copy_from_slice(&self.uuid_last_snap);
        b[OFF_UUID_LINK..OFF_UUID_LINK + 16].copy_from_slice(&self.uuid_link);
        b[OFF_UUID_PARENT..OFF_UUID_PARENT + 16].copy_from_slice(&self.uuid_parent);
        let _ = OFF_DESCRIPTION;
        b
    }
}
