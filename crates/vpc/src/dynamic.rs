//! The dynamic disk header (spec section "Dynamic Disk Header Format") and its parent
//! locator entries.

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{ImageFile, Result};

use crate::footer::checksum;

/// Dynamic header size in bytes.
pub const DYNAMIC_HEADER_SIZE: usize = 1024;
/// Dynamic header cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Block size everyone writes: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// BAT entry of an unallocated block.
pub const BAT_UNUSED: u32 = 0xffff_ffff;
/// Largest block size we read.
pub const MAX_BLOCK_SIZE: u32 = 1 << 28;
/// Most BAT entries we load (64 Mi entries: 128 TiB of 2 MiB blocks, far past the
/// 2 TiB a VHD can address).
pub const MAX_TABLE_ENTRIES: u32 = 64 << 20;
/// Largest parent locator we read.
pub const MAX_LOCATOR_BYTES: u32 = 64 << 10;

const OFF_TABLE_OFFSET: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MAX_ENTRIES: usize = 28;
const OFF_BLOCK_SIZE: usize = 32;
const OFF_CHECKSUM: usize = 36;
const OFF_PARENT_ID: usize = 40;
const OFF_PARENT_TIMESTAMP: usize = 56;
const OFF_PARENT_NAME: usize = 64;
const PARENT_NAME_BYTES: usize = 512;
const OFF_LOCATORS: usize = 576;
const LOCATOR_SIZE: usize = 24;
const LOCATORS: usize = 8;

/// A parent locator entry: where a differencing disk's parent path is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// Platform code: `W2ku`, `W2ru`, `Wi2r`, `Wi2k`, `Mac `, `MacX`.
    pub platform: [u8; 4],
    /// Bytes of locator data.
    pub data_len: u32,
    /// Byte offset of the locator data in the file.
    pub data_offset: u64,
}

/// The dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Byte offset of the block allocation table.
    pub table_offset: u64,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes per block (data only, without the sector bitmap).
    pub block_size: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// The checksum the bytes have.
    pub computed_checksum: u32,
    /// Parent's unique id (differencing disks).
    pub parent_id: [u8; 16],
    /// Parent's modification time.
    pub parent_timestamp: u32,
    /// Parent's file name (UTF-16 big-endian in the file).
    pub parent_name: String,
    /// Parent locators in use.
    pub locators: Vec<ParentLocator>,
}

/// Decodes UTF-16 (big- or little-endian) up to the first NUL.
pub fn utf16(bytes: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

impl DynamicHeader {
    /// Reads and checks the dynamic header at `offset` of `file`.
    pub fn read(file: &ImageFile, offset: u64) -> Result<Self> {
        let mut b = [0u8; DYNAMIC_HEADER_SIZE];
        file.read_exact_at(&mut b, offset, "VHD dynamic header")?;
        let at = |o: usize| offset + o as u64;
        if &b[..8] != COOKIE {
            return Err(file.corrupt("VHD dynamic header", offset, "cookie 'cxsparse' not found"));
        }
        let version = BigEndian::read_u32(&b[OFF_VERSION..]);
        if version != HEADER_VERSION {
            return Err(file.corrupt(
                "VHD dynamic header",
                at(OFF_VERSION),
                format!("version {version:#x} is not 1.0"),
            ));
        }
        let block_size = BigEndian::read_u32(&b[OFF_BLOCK_SIZE..]);
        if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(file.corrupt(
                "VHD dynamic header",
                at(OFF_BLOCK_SIZE),
                format!(
                    "block size {block_size} is not a power of two from 512 to {MAX_BLOCK_SIZE}"
                ),
            ));
        }
        let max_table_entries = BigEndian::read_u32(&b[OFF_MAX_ENTRIES..]);
        if max_table_entries > MAX_TABLE_ENTRIES {
            return Err(file.corrupt(
                "VHD dynamic header",
                at(OFF_MAX_ENTRIES),
                format!("{max_table_entries} BAT entries exceed the limit of {MAX_TABLE_ENTRIES}"),
            ));
        }
        let mut parent_id = [0u8; 16];
        parent_id.copy_from_slice(&b[OFF_PARENT_ID..OFF_PARENT_ID + 16]);
        let mut locators = Vec::new();
        for i in 0..LOCATORS {
            let o = OFF_LOCATORS + i * LOCATOR_SIZE;
            let mut platform = [0u8; 4];
            platform.copy_from_slice(&b[o..o + 4]);
            if platform == [0; 4] {
                continue;
            }
            locators.push(ParentLocator {
                platform,
                data_len: BigEndian::read_u32(&b[o + 8..]),
                data_offset: BigEndian::read_u64(&b[o + 16..]),
            });
        }
        Ok(DynamicHeader {
            table_offset: BigEndian::read_u64(&b[OFF_TABLE_OFFSET..]),
            max_table_entries,
            block_size,
            checksum: BigEndian::read_u32(&b[OFF_CHECKSUM..]),
            computed_checksum: checksum(&b, OFF_CHECKSUM),
            parent_id,
            parent_timestamp: BigEndian::read_u32(&b[OFF_PARENT_TIMESTAMP..]),
            parent_name: utf16(
                &b[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_BYTES],
                true,
            ),
            locators,
        })
    }

    /// Whether the stored checksum is right.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.computed_checksum
    }

    /// Bytes of the sector bitmap in front of each block (rounded up to a sector).
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / 512).div_ceil(8).div_ceil(512) * 512
    }

    /// Encodes a header without parent (dynamic disks).
    pub fn encode(&self) -> [u8; DYNAMIC_HEADER_SIZE] {
        let mut b = [0u8; DYNAMIC_HEADER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8].copy_from_slice(&self.table_offset.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&HEADER_VERSION.to_be_bytes());
        b[OFF_MAX_ENTRIES..OFF_MAX_ENTRIES + 4]
            .copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_be_bytes());
        let sum = checksum(&b, OFF_CHECKSUM);
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }
}
