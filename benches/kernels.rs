//! Micro-benchmarks of the hot kernels: zero detection, deflate/inflate of one 64 KiB
//! cluster as qcow2 stores it (raw deflate) and VMDK stores a grain (zlib), and the
//! decoding of a qcow2 L2 table and a VMDK grain table.
//! Throughput is reported in bytes (or table entries) per second.

use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;
use vconvert_qcow2::compressed::{decompress, Compressor};
use vconvert_qcow2::l2;
use vconvert_qcow2::CompressionType;
use vconvert_vmdk::grain;

fn main() {
    divan::main();
}

const CLUSTER: usize = 64 << 10;

/// A cluster of text-like data with some binary noise: compressible like a filesystem.
fn sample_cluster() -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"lib",
        b"symbol_table ",
        b"\x00\x00\x7fELF",
        b"0123456789",
        b"the quick brown fox ",
        b"\n",
    ];
    let mut v = Vec::with_capacity(CLUSTER);
    let mut s = 0x2545_f491_4f6c_dd1du64;
    while v.len() < CLUSTER {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(words[(s % 6) as usize]);
        if s.is_multiple_of(11) {
            v.extend_from_slice(&s.to_le_bytes());
        }
    }
    v.truncate(CLUSTER);
    v
}

#[divan::bench(args = [4096, 65536, 2 << 20])]
fn zero_detection(bencher: Bencher, len: usize) {
    let buf = vec![0u8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench(|| vconvert_core::is_zero(divan::black_box(&buf)));
}

/// The qcow2 writer's cluster compressor (libdeflate, raw deflate) at a few levels.
#[divan::bench(args = [1, 4, 6, 9])]
fn deflate_raw_cluster(bencher: Bencher, level: u32) {
    let data = sample_cluster();
    let mut c = Compressor::new(CompressionType::Zlib, level).expect("compressor");
    bencher
        .counter(BytesCount::new(CLUSTER))
        .bench_local(|| c.compress(divan::black_box(&data)).map(<[u8]>::len));
}

/// The qcow2 reader's cluster inflater.
#[divan::bench]
fn inflate_raw_cluster(bencher: Bencher) {
    let data = sample_cluster();
    let mut c = Compressor::new(CompressionType::Zlib, 6).expect("compressor");
    let packed = c.compress(&data).unwrap_or_default().to_vec();
    bencher
        .counter(BytesCount::new(CLUSTER))
        .with_inputs(|| vec![0u8; CLUSTER])
        .bench_refs(|out| {
            decompress(CompressionType::Zlib, divan::black_box(&packed), out).is_ok()
        });
}

/// The VMDK writer's grain compressor (libdeflate, zlib stream).
#[divan::bench]
fn zlib_grain(bencher: Bencher) {
    let data = sample_cluster();
    bencher.counter(BytesCount::new(CLUSTER)).bench(|| {
        grain::deflate(divan::black_box(&data))
            .map(|v| v.len())
            .unwrap_or(0)
    });
}

/// Decoding one qcow2 L2 table of 64 KiB clusters (8192 entries: data, compressed,
/// zero and unallocated in turn), as the reader does for every table it loads.
#[divan::bench]
fn l2_table_decode(bencher: Bencher) {
    let bits = 16;
    let entries: Vec<u64> = (0..8192u64)
        .map(|i| match i % 4 {
            0 => l2::COPIED | ((i + 1) << bits),
            1 => l2::compressed_entry((i + 1) << 12, 3000, bits),
            2 => l2::ZERO,
            _ => 0,
        })
        .collect();
    bencher.counter(ItemsCount::new(entries.len())).bench(|| {
        divan::black_box(&entries)
            .iter()
            .filter(|&&e| l2::decode(e, None, bits, 3, false).is_ok())
            .count()
    });
}

/// Decoding one VMDK grain table (512 little-endian entries).
#[divan::bench]
fn grain_table_decode(bencher: Bencher) {
    let gt: Vec<u32> = (0..512u32).map(|i| i * 128).collect();
    let bytes = grain::encode_entries(&gt);
    bencher
        .counter(ItemsCount::new(gt.len()))
        .bench(|| grain::decode_entries(divan::black_box(&bytes)).len());
}
