//! Micro-benchmarks of the hot kernels: zero detection, and deflate/inflate of one
//! 64 KiB cluster as qcow2 stores it (raw deflate) and VMDK stores a grain (zlib).
//! Throughput is reported in bytes per second.

use std::io::{Read, Write};

use divan::counter::BytesCount;
use divan::Bencher;
use flate2::Compression;

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

#[divan::bench(args = [1, 6])]
fn deflate_raw_cluster(bencher: Bencher, level: u32) {
    let data = sample_cluster();
    bencher.counter(BytesCount::new(CLUSTER)).bench(|| {
        let mut e = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(CLUSTER),
            Compression::new(level),
        );
        e.write_all(&data).ok();
        e.finish().map(|v| v.len()).unwrap_or(0)
    });
}

#[divan::bench]
fn inflate_raw_cluster(bencher: Bencher) {
    let data = sample_cluster();
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
    e.write_all(&data).ok();
    let packed = e.finish().unwrap_or_default();
    bencher
        .counter(BytesCount::new(CLUSTER))
        .with_inputs(|| vec![0u8; CLUSTER])
        .bench_refs(|out| {
            let mut d = flate2::read::DeflateDecoder::new(divan::black_box(&packed[..]));
            d.read_exact(out).is_ok()
        });
}

#[divan::bench]
fn zlib_grain(bencher: Bencher) {
    let data = sample_cluster();
    bencher.counter(BytesCount::new(CLUSTER)).bench(|| {
        let mut e =
            flate2::write::ZlibEncoder::new(Vec::with_capacity(CLUSTER), Compression::default());
        e.write_all(&data).ok();
        e.finish().map(|v| v.len()).unwrap_or(0)
    });
}
