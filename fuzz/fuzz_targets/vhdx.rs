//! Fuzz the vhdx reader. VHDX structures sit at fixed offsets up to 4 MiB and are all
//! CRC-32C checksummed, so arbitrary bytes would stop at the first checksum: the input
//! is laid out over the structures of an otherwise empty 5 MiB file (file identifier,
//! both headers, both region tables, the log, the BAT, the metadata table and items,
//! then payload), and when the first byte is odd the checksums of the headers, region
//! tables and the log's first entry are recomputed so the fuzzer reaches what lies
//! behind them (log replay, metadata, BAT states, sector bitmaps).
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

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut file = vec![0u8; 5 * MIB];
    file[..8].copy_from_slice(b"vhdxfile");
    for (at, len) in SLOTS {
        let n = len.min(rest.len());
        file[at..at + n].copy_from_slice(&rest[..n]);
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
