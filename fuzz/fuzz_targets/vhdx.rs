//! Fuzz the vhdx reader. VHDX structures sit at fixed offsets up to 4 MiB and are all
//! CRC-32C checksummed, so arbitrary bytes would stop at the first checksum: the input
//! is XORed over the structures of a valid, dirty 5 MiB VHDX (file identifier, both
//! headers, both region tables, the log, the BAT, the metadata table and items, then
//! payload; an empty input leaves it valid), and when the first byte is odd the
//! checksums of the headers, region tables and the log's first entry are recomputed so
//! the fuzzer reaches what lies behind them (log replay, metadata, BAT states).
#![no_main]

#[path = "common.rs"]
mod common;

const MIB: usize = 1 << 20;

/// (file offset, bytes of input laid there) in input order.
const SLOTS: [(usize, usize); 10] = [
    (8, 56),
    (64 << 10, 128),
    (128 << 10, 128),
    (192 << 10, 96),
    (256 << 10, 96),
    (MIB, 8192),
    (2 * MIB, 512),
    (3 * MIB, 192),
    (3 * MIB + (64 << 10), 256),
    (4 * MIB, MIB),
];

/// A valid dirty 5 MiB VHDX: 1 MiB blocks, block 0 present at 4 MiB, block 1 ZERO,
/// and a log entry rewriting a sector of block 0 and the BAT's first page.
fn skeleton() -> Vec<u8> {
    use vconvert_vhdx::bat::BatEntry;
    use vconvert_vhdx::header::Header;
    use vconvert_vhdx::log::{encode_entry, Update};
    use vconvert_vhdx::metadata::*;
    use vconvert_vhdx::region::*;
    use vconvert_vhdx::Guid;
    let mut f = vec![0u8; 5 * MIB];
    f[..8].copy_from_slice(b"vhdxfile");
    let guid = Guid([9; 16]);
    for (i, at) in [64usize << 10, 128 << 10].into_iter().enumerate() {
        let h = Header {
            sequence_number: i as u64,
            file_write_guid: Guid([1; 16]),
            data_write_guid: Guid([2; 16]),
            log_guid: guid,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB as u64,
        };
        f[at..at + 4096].copy_from_slice(&h.encode());
    }
    let rt = RegionTable {
        entries: vec![
            Region {
                guid: BAT_REGION,
                file_offset: 2 * MIB as u64,
                length: MIB as u32,
                required: true,
            },
            Region {
                guid: METADATA_REGION,
                file_offset: 3 * MIB as u64,
                length: MIB as u32,
                required: true,
            },
        ],
    }
    .encode();
    for at in [192usize << 10, 256 << 10] {
        f[at..at + rt.len()].copy_from_slice(&rt);
    }
    let mut fp = (MIB as u32).to_le_bytes().to_vec();
    fp.extend_from_slice(&0u32.to_le_bytes());
    let meta = encode_region(
        &[
            (FILE_PARAMETERS, FLAG_IS_REQUIRED, fp),
            (
                VIRTUAL_DISK_SIZE,
                6,
                (3 * MIB as u64).to_le_bytes().to_vec(),
            ),
            (PAGE_83_DATA, 6, vec![3; 16]),
            (LOGICAL_SECTOR_SIZE, 6, 512u32.to_le_bytes().to_vec()),
            (PHYSICAL_SECTOR_SIZE, 6, 4096u32.to_le_bytes().to_vec()),
        ],
        MIB,
    );
    f[3 * MIB..4 * MIB].copy_from_slice(&meta);
    let full = BatEntry {
        state: 6,
        offset: 4 * MIB as u64,
    }
    .encode();
    f[2 * MIB..2 * MIB + 8].copy_from_slice(&full.to_le_bytes());
    f[2 * MIB + 8..2 * MIB + 16].copy_from_slice(&2u64.to_le_bytes());
    for (i, b) in f[4 * MIB..5 * MIB].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let page = f[2 * MIB..2 * MIB + 4096].to_vec();
    let entry = encode_entry(
        guid,
        7,
        0,
        5 * MIB as u64,
        5 * MIB as u64,
        &[
            Update::Data {
                offset: 4 * MIB as u64 + 4096,
                bytes: vec![0x5a; 4096],
            },
            Update::Data {
                offset: 2 * MIB as u64,
                bytes: page,
            },
            Update::Zero {
                offset: 4 * MIB as u64 + 8192,
                len: 4096,
            },
        ],
    );
    f[MIB..MIB + entry.len()].copy_from_slice(&entry);
    f
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static SKELETON: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut file = SKELETON.get_or_init(skeleton).clone();
    for (at, len) in SLOTS {
        let n = len.min(rest.len());
        for (f, d) in file[at..at + n].iter_mut().zip(&rest[..n]) {
            *f ^= d;
        }
        rest = &rest[n..];
    }
    if flags & 1 == 1 {
        for (at, len) in [
            (64 << 10, 4096),
            (128 << 10, 4096),
            (192 << 10, 64 << 10),
            (256 << 10, 64 << 10),
        ] {
            vconvert_vhdx::seal(&mut file[at..at + len], 4);
        }
        let len = u32::from_le_bytes(file[MIB + 8..MIB + 12].try_into().unwrap()) as usize;
        if (64..=MIB).contains(&len) {
            vconvert_vhdx::seal(&mut file[MIB..MIB + len], 4);
        }
    }
    common::exercise(&file, Some(vconvert_core::Format::Vhdx));
});
