//! Hand-made VHDX images for tests: any logical sector size and block size (qemu-img
//! makes only 512-byte sectors), every payload block state, differencing disks with a
//! parent locator, and dirty logs.
#![allow(dead_code)]

use vconvert_vhdx::bat::{BatEntry, Geometry};
use vconvert_vhdx::header::Header;
use vconvert_vhdx::log::{encode_entry, Update};
use vconvert_vhdx::metadata::{self, encode_locator, encode_region};
use vconvert_vhdx::region::{Region, RegionTable, BAT_REGION, METADATA_REGION};
use vconvert_vhdx::{Guid, MIB};

/// A payload block of a hand-made image.
#[derive(Clone, Debug)]
pub enum Block {
    /// FULLY_PRESENT with these bytes (at most the block size).
    Full(Vec<u8>),
    /// PARTIALLY_PRESENT: the bytes and which logical sectors are present.
    Partial(Vec<u8>, Vec<bool>),
    /// A state without data (ZERO, UNMAPPED, UNDEFINED, NOT_PRESENT).
    State(u8),
}

/// Where the builder put things.
#[derive(Clone, Debug, Default)]
pub struct Placed {
    /// BAT region offset.
    pub bat: u64,
    /// Metadata region offset.
    pub meta: u64,
    /// Log offset.
    pub log: u64,
    /// File offset of each placed block's data, by block index.
    pub blocks: Vec<(u64, u64)>,
    /// End of the file.
    pub end: u64,
}

/// A hand-made VHDX.
#[derive(Clone, Debug)]
pub struct Vhdx {
    pub size: u64,
    pub block_size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    /// Parent locator pairs of a differencing disk.
    pub parent: Option<Vec<(String, String)>>,
    pub blocks: Vec<(u64, Block)>,
}

impl Vhdx {
    pub fn new(size: u64, block_size: u64, logical_sector: u32) -> Self {
        Vhdx {
            size,
            block_size,
            logical_sector,
            physical_sector: 4096,
            parent: None,
            blocks: Vec::new(),
        }
    }

    /// The image's bytes and layout.
    pub fn build(&self) -> (Vec<u8>, Placed) {
        let has_parent = self.parent.is_some();
        let g = Geometry::new(
            self.size,
            self.block_size,
            u64::from(self.logical_sector),
            has_parent,
        );
        let log = MIB;
        let bat = 2 * MIB;
        let bat_len = (g.total_entries * 8).div_ceil(MIB).max(1) * MIB;
        let meta = bat + bat_len;
        let mut next = meta + MIB;
        let mut b = vec![0u8; next as usize];
        b[..8].copy_from_slice(b"vhdxfile");
        for (i, at) in [64u64 << 10, 128 << 10].into_iter().enumerate() {
            let h = Header {
                sequence_number: 10 + i as u64,
                file_write_guid: Guid([1; 16]),
                data_write_guid: Guid([2; 16]),
                log_guid: Guid::NIL,
                log_version: 0,
                version: 1,
                log_length: MIB as u32,
                log_offset: log,
            };
            b[at as usize..at as usize + 4096].copy_from_slice(&h.encode());
        }
        let rt = RegionTable {
            entries: vec![
                Region {
                    guid: BAT_REGION,
                    file_offset: bat,
                    length: bat_len as u32,
                    required: true,
                },
                Region {
                    guid: METADATA_REGION,
                    file_offset: meta,
                    length: MIB as u32,
                    required: true,
                },
            ],
        }
        .encode();
        for at in [192usize << 10, 256 << 10] {
            b[at..at + rt.len()].copy_from_slice(&rt);
        }
        let mut fp = (self.block_size as u32).to_le_bytes().to_vec();
        fp.extend_from_slice(&(if has_parent { 2u32 } else { 0 }).to_le_bytes());
        let mut items = vec![
            (metadata::FILE_PARAMETERS, 4, fp),
            (
                metadata::VIRTUAL_DISK_SIZE,
                6,
                self.size.to_le_bytes().to_vec(),
            ),
            (metadata::PAGE_83_DATA, 6, vec![3; 16]),
            (
                metadata::LOGICAL_SECTOR_SIZE,
                6,
                self.logical_sector.to_le_bytes().to_vec(),
            ),
            (
                metadata::PHYSICAL_SECTOR_SIZE,
                6,
                self.physical_sector.to_le_bytes().to_vec(),
            ),
        ];
        if let Some(pairs) = &self.parent {
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            items.push((metadata::PARENT_LOCATOR, 4, encode_locator(&refs)));
        }
        let region = encode_region(&items, MIB as usize);
        b[meta as usize..(meta + MIB) as usize].copy_from_slice(&region);
        let mut entries = vec![0u64; g.total_entries as usize];
        let mut placed = Placed {
            bat,
            meta,
            log,
            ..Placed::default()
        };
        let lss = u64::from(self.logical_sector);
        let mut bitmaps: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
        for (block, kind) in &self.blocks {
            let idx = g.payload_index(*block) as usize;
            let (state, data) = match kind {
                Block::State(s) => {
                    entries[idx] = BatEntry {
                        state: *s,
                        offset: 0,
                    }
                    .encode();
                    continue;
                }
                Block::Full(d) => (6, d),
                Block::Partial(d, present) => {
                    let chunk = block / g.chunk_ratio;
                    let bm = bitmaps
                        .entry(chunk)
                        .or_insert_with(|| vec![0u8; MIB as usize]);
                    let first = (block % g.chunk_ratio) * (self.block_size / lss);
                    for (i, p) in present.iter().enumerate() {
                        if *p {
                            let s = first + i as u64;
                            bm[(s / 8) as usize] |= 1 << (s % 8);
                        }
                    }
                    (7, d)
                }
            };
            let at = next;
            next += self.block_size.div_ceil(MIB) * MIB;
            b.resize(next as usize, 0);
            b[at as usize..at as usize + data.len()].copy_from_slice(data);
            entries[idx] = BatEntry { state, offset: at }.encode();
            placed.blocks.push((*block, at));
        }
        for (chunk, bm) in bitmaps {
            let at = next;
            next += MIB;
            b.resize(next as usize, 0);
            b[at as usize..(at + MIB) as usize].copy_from_slice(&bm);
            let idx = (chunk * (g.chunk_ratio + 1) + g.chunk_ratio) as usize;
            entries[idx] = BatEntry {
                state: 6,
                offset: at,
            }
            .encode();
        }
        for (i, e) in entries.iter().enumerate() {
            let at = bat as usize + 8 * i;
            b[at..at + 8].copy_from_slice(&e.to_le_bytes());
        }
        placed.end = next;
        (b, placed)
    }
}

/// Makes `b` dirty: both headers get `guid` as their log GUID and the log (at 1 MiB)
/// holds `entries` (each from [`entry`]) one after another.
pub fn make_dirty(b: &mut [u8], guid: Guid, entries: &[Vec<u8>]) {
    for at in [64usize << 10, 128 << 10] {
        let mut h = Header::parse(&b[at..at + 4096], at as u64).unwrap();
        h.log_guid = guid;
        b[at..at + 4096].copy_from_slice(&h.encode());
    }
    let mut pos = MIB as usize;
    for e in entries {
        b[pos..pos + e.len()].copy_from_slice(e);
        pos += e.len();
    }
}

/// A log entry of `updates` at `sequence` whose sequence starts at log offset `tail`.
pub fn entry(guid: Guid, sequence: u64, tail: u64, file_end: u64, updates: &[Update]) -> Vec<u8> {
    encode_entry(guid, sequence, tail, file_end, file_end, updates)
}

/// A data update: the 4 KiB `sector` at `offset`.
pub fn data(offset: u64, sector: Vec<u8>) -> Update {
    assert_eq!(sector.len(), 4096);
    Update::Data {
        offset,
        bytes: sector,
    }
}

/// Bytes `n` long from `seed`.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}
