//! The region table (MS-VHDX §2.2.3), stored twice (192 KiB and 256 KiB): where the
//! BAT and the metadata region lie. Regions are 1 MiB-aligned, must not overlap each
//! other, the header section or the log, and an unknown region marked required makes
//! the file unreadable.

use vconvert_core::{ImageFile, Result};

use crate::{checksum, seal, u32_at, u64_at, Guid, MIB};

/// Offsets of region table 1 and 2 (§2.2).
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Size of a region table, all of it covered by the checksum (§2.2.3).
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// Region table signature `regi` (§2.2.3.1).
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Most entries a region table may hold (§2.2.3.1 EntryCount).
pub const MAX_ENTRIES: u32 = 2047;
/// The BAT region (§2.2.3.2).
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The metadata region (§2.2.3.2).
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

const OFF_CHECKSUM: usize = 4;
const OFF_COUNT: usize = 8;
const ENTRIES_AT: usize = 16;
const ENTRY_SIZE: usize = 32;

/// One region: `length` bytes at `file_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: Guid,
    /// Byte offset; a multiple of 1 MiB, at least 1 MiB.
    pub file_offset: u64,
    /// Bytes; a multiple of 1 MiB.
    pub length: u32,
    /// A reader that does not know the region must refuse the file.
    pub required: bool,
}

impl Region {
    /// One past the region's last byte.
    pub fn end(&self) -> u64 {
        self.file_offset + u64::from(self.length)
    }
}

/// The region table: the BAT and metadata regions (others are skipped unless required).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// Every entry, in table order.
    pub entries: Vec<Region>,
}

impl RegionTable {
    /// Parses and validates a table copy read at `at`; the reason it is invalid as text.
    pub fn parse(b: &[u8], at: u64) -> std::result::Result<RegionTable, String> {
        if b.len() < REGION_TABLE_SIZE || &b[..4] != REGION_SIGNATURE {
            return Err(format!("no 'regi' signature at {at:#x}"));
        }
        let stored = u32_at(b, OFF_CHECKSUM);
        let computed = checksum(&b[..REGION_TABLE_SIZE], OFF_CHECKSUM);
        if stored != computed {
            return Err(format!(
                "checksum at {:#x} is {stored:#010x}, the table's CRC-32C is {computed:#010x}",
                at + OFF_CHECKSUM as u64
            ));
        }
        let count = u32_at(b, OFF_COUNT);
        if count > MAX_ENTRIES {
            return Err(format!(
                "{count} entries at {:#x} (at most {MAX_ENTRIES})",
                at + OFF_COUNT as u64
            ));
        }
        let mut entries: Vec<Region> = Vec::new();
        for i in 0..count as usize {
            let e = ENTRIES_AT + i * ENTRY_SIZE;
            let eat = at + e as u64;
            let r = Region {
                guid: Guid::read(b, e),
                file_offset: u64_at(b, e + 16),
                length: u32_at(b, e + 24),
                required: u32_at(b, e + 28) & 1 != 0,
            };
            if r.file_offset % MIB != 0 || u64::from(r.length) % MIB != 0 || r.length == 0 {
                return Err(format!(
                    "region {} at {eat:#x}: {} bytes at {:#x} is not a non-empty 1 MiB-aligned range",
                    r.guid, r.length, r.file_offset
                ));
            }
            if r.file_offset < crate::header::HEADER_SECTION_SIZE {
                return Err(format!(
                    "region {} at {eat:#x} lies inside the header section",
                    r.guid
                ));
            }
            if r.file_offset.checked_add(u64::from(r.length)).is_none() {
                return Err(format!("region {} at {eat:#x} overflows", r.guid));
            }
            if let Some(o) = entries
                .iter()
                .find(|o| o.guid == r.guid || (r.file_offset < o.end() && o.file_offset < r.end()))
            {
                return Err(format!(
                    "region {} at {eat:#x} ({:#x}..{:#x}) overlaps or repeats region {} ({:#x}..{:#x})",
                    r.guid,
                    r.file_offset,
                    r.end(),
                    o.guid,
                    o.file_offset,
                    o.end()
                ));
            }
            entries.push(r);
        }
        Ok(RegionTable { entries })
    }

    /// The region `guid`, if present.
    pub fn find(&self, guid: Guid) -> Option<&Region> {
        self.entries.iter().find(|r| r.guid == guid)
    }

    /// The 64 KiB of the table, checksummed.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(REGION_SIGNATURE);
        b[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (i, r) in self.entries.iter().enumerate() {
            let e = ENTRIES_AT + i * ENTRY_SIZE;
            b[e..e + 16].copy_from_slice(&r.guid.0);
            b[e + 16..e + 24].copy_from_slice(&r.file_offset.to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&r.length.to_le_bytes());
            b[e + 28..e + 32].copy_from_slice(&u32::from(r.required).to_le_bytes());
        }
        seal(&mut b, OFF_CHECKSUM);
        b
    }
}

/// The region table in force and what was wrong with the other copy.
#[derive(Clone, Debug)]
pub struct Regions {
    /// The table used.
    pub table: RegionTable,
    /// Problems of the other copy: invalid, or different from the one used.
    pub other_problem: Option<String>,
}

/// Reads both copies; the first valid one is used (§2.2.3: the copies are identical in
/// a consistent file).
pub fn read_regions(file: &ImageFile) -> Result<Regions> {
    let mut copies = Vec::new();
    for at in REGION_TABLE_OFFSETS {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        file.read_exact_at(&mut b, at, "VHDX region table")?;
        copies.push(RegionTable::parse(&b, at));
    }
    let second = copies.pop().expect("two copies");
    let first = copies.pop().expect("two copies");
    match (first, second) {
        (Ok(a), Ok(b)) => {
            let other_problem = (a != b).then(|| {
                format!(
                    "region table 2 at {:#x} differs from region table 1",
                    REGION_TABLE_OFFSETS[1]
                )
            });
            Ok(Regions {
                table: a,
                other_problem,
            })
        }
        (Ok(a), Err(e)) | (Err(e), Ok(a)) => Ok(Regions {
            table: a,
            other_problem: Some(format!("a region table copy is invalid: {e}")),
        }),
        (Err(e1), Err(e2)) => Err(file.corrupt(
            "VHDX region table",
            REGION_TABLE_OFFSETS[0],
            format!("neither region table is valid: table 1: {e1}; table 2: {e2}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RegionTable {
        RegionTable {
            entries: vec![
                Region {
                    guid: BAT_REGION,
                    file_offset: 2 * MIB,
                    length: MIB as u32,
                    required: true,
                },
                Region {
                    guid: METADATA_REGION,
                    file_offset: 3 * MIB,
                    length: MIB as u32,
                    required: true,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_find() {
        let t = table();
        let p = RegionTable::parse(&t.encode(), 0).unwrap();
        assert_eq!(p, t);
        assert_eq!(p.find(METADATA_REGION).unwrap().file_offset, 3 * MIB);
    }

    #[test]
    fn each_rule_refuses() {
        let mut b = table().encode();
        b[40] ^= 1;
        assert!(RegionTable::parse(&b, 0).unwrap_err().contains("checksum"));
        let mut t = table();
        t.entries[1].file_offset = 2 * MIB;
        assert!(RegionTable::parse(&t.encode(), 0)
            .unwrap_err()
            .contains("overlaps"));
        let mut t = table();
        t.entries[1].file_offset = 3 * MIB + 512;
        assert!(RegionTable::parse(&t.encode(), 0)
            .unwrap_err()
            .contains("aligned"));
        let mut t = table();
        t.entries[0].file_offset = 0;
        assert!(RegionTable::parse(&t.encode(), 0)
            .unwrap_err()
            .contains("header section"));
        let mut b = table().encode();
        b[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&5000u32.to_le_bytes());
        seal(&mut b, OFF_CHECKSUM);
        assert!(RegionTable::parse(&b, 0).unwrap_err().contains("at most"));
    }
}
