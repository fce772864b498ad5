//! Every writer against every reader: random block maps and data written through each
//! format's writer (and its variants) read back equal through its reader, with a
//! consistent block map, and the same bytes whatever the thread count.

use proptest::prelude::*;
use vconvert_core::{Format, Options};
use vconvert_engine::{convert, open, ConvertOptions, OpenOptions};
use vconvert_testkit::{check_reader_consistency, read_all, tempdir, ModelImage};

/// The writer variants under test: format and `-o` options; a leading `-c,` asks for
/// compression.
const VARIANTS: &[(Format, &str)] = &[
    (Format::Vdi, ""),
    (Format::Vdi, "static=on"),
    (Format::Vpc, ""),
    (Format::Vpc, "subformat=fixed"),
    (Format::Vpc, "force_size=on"),
    (Format::Qcow2, ""),
    (Format::Qcow2, "compat=0.10,cluster_size=512"),
    (Format::Qcow2, "extended_l2=on,cluster_size=16k"),
    (Format::Qcow2, "refcount_bits=1,preallocation=metadata"),
    (Format::Qcow2, "-c"),
    (Format::Qcow2, "-c,compression_type=zstd,cluster_size=4k"),
    (Format::Vmdk, ""),
    (Format::Vmdk, "subformat=monolithicFlat"),
    (Format::Vmdk, "subformat=twoGbMaxExtentSparse"),
    (Format::Vmdk, "subformat=streamOptimized"),
    (Format::Vmdk, "zeroed_grain=on"),
    (Format::Vhdx, "block_size=1M"),
    (Format::Vhdx, "subformat=fixed,block_size=1M"),
    (
        Format::Vhdx,
        "block_state_zero=off,block_size=2M,log_size=2M",
    ),
];

fn opts(threads: usize, compress: bool) -> ConvertOptions<'static> {
    ConvertOptions {
        threads,
        compress,
        mem_per_thread: 1 << 20,
        identity_seed: Some(7),
        ..ConvertOptions::default()
    }
}

/// Converts `model` to `format` and checks what reads back.
fn round_trip(model: &ModelImage, format: Format, options: &str, threads: usize) -> Vec<u8> {
    let dir = tempdir();
    let out = dir.path().join("out.img");
    let (compress, o) = match options.strip_prefix("-c") {
        Some(rest) => (true, rest.trim_start_matches(',')),
        None => (false, options),
    };
    convert(
        model,
        &out,
        format,
        Options::parse(o).unwrap(),
        &opts(threads, compress),
    )
    .unwrap_or_else(|e| panic!("convert to {format} {options}: {e}"));
    // Multi-file VMDKs refer to their extent files.
    let trusted = OpenOptions {
        allow_external_files: true,
        ..OpenOptions::default()
    };
    let back = open(&out, Some(format), &trusted).unwrap();
    check_reader_consistency(back.as_ref()).unwrap();
    let got = read_all(back.as_ref()).unwrap();
    let n = model.bytes.len();
    assert!(
        got.len() >= n,
        "{format} {options}: image shrank to {}",
        got.len()
    );
    assert!(
        got[..n] == model.bytes[..],
        "{format} {options}: content differs"
    );
    assert!(
        got[n..].iter().all(|&b| b == 0),
        "{format} {options}: padding is not zero"
    );
    std::fs::read(&out).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn every_writer_reads_back_equal(
        model in ModelImage::strategy(10, 64 << 10, 40),
        variant in 0..VARIANTS.len(),
    ) {
        let (format, options) = VARIANTS[variant];
        let one = round_trip(&model, format, options, 1);
        let four = round_trip(&model, format, options, 4);
        prop_assert!(one == four, "{} {}: output differs between 1 and 4 threads", format, options);
    }
}

#[test]
fn unaligned_sizes_round_trip_in_every_format() {
    for size in [512u64, (10 << 20) | 3584, (3 << 20) + 512] {
        let model = ModelImage::from_parts(&[
            (size / 2, vconvert_testkit::ModelKind::Data, 1),
            (size - size / 2, vconvert_testkit::ModelKind::Unallocated, 0),
        ]);
        for &(format, options) in VARIANTS {
            round_trip(&model, format, options, 2);
        }
    }
}
