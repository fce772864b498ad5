//! Property: whatever the layout of data, zeros and unallocated ranges, what VmdkWriter
//! writes, VmdkReader reads back identically, in every subformat.

mod common;

use proptest::prelude::*;
use vconvert_core::{ExtentKind, ImageReader, RunKind};
use vconvert_testkit::{read_all, tempdir, ModelImage};

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn write_then_read_is_identity(
        model in ModelImage::strategy(10, 4096, 48),
        sub in 0usize..5,
        zeroed in any::<bool>(),
        tail in 0u64..8,
    ) {
        // Sometimes end the disk off the grain size (a partial last grain).
        let mut bytes = model.bytes.clone();
        bytes.resize(bytes.len() + tail as usize * 512, 0);
        let size = bytes.len() as u64;
        let kind = |p: u64| {
            if p >= model.bytes.len() as u64 {
                return RunKind::Unallocated;
            }
            match model.map.clip(p..p + 1).extents()[0].kind {
                ExtentKind::Data(_) => RunKind::Data,
                ExtentKind::Zero => RunKind::Zero,
                ExtentKind::Unallocated => RunKind::Unallocated,
            }
        };
        let dir = tempdir();
        let path = dir.path().join("p.vmdk");
        let opts = format!(
            "subformat={}{}",
            SUBFORMATS[sub],
            if zeroed && !SUBFORMATS[sub].ends_with("Flat") { ",zeroed_grain=on" } else { "" }
        );
        common::write_vmdk(&path, &opts, &bytes, &kind, 512, 1).unwrap();
        let r = common::open(&path);
        prop_assert_eq!(r.virtual_size(), size);
        prop_assert!(read_all(&r).unwrap() == bytes);
        vconvert_testkit::check_reader_consistency(&r).unwrap();
        // Nothing the source did not hold as data becomes data.
        let map = r.block_map(0..size).unwrap();
        for e in map.extents() {
            if e.kind.is_data() && !SUBFORMATS[sub].ends_with("Flat") {
                let covered = model.map.clip(e.start..e.end().min(model.bytes.len() as u64));
                prop_assert!(covered.data_bytes() > 0, "{:?}", e);
            }
        }
        prop_assert!(r.check().unwrap().unwrap().corruptions.is_empty());
    }
}
