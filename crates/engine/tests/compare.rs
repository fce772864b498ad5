//! `compare` against models whose differences are known.

use proptest::prelude::*;
use vconvert_engine::{compare, CompareOptions, Comparison};
use vconvert_testkit::{ModelImage, ModelKind};

fn opts(strict: bool) -> CompareOptions {
    CompareOptions { strict, threads: 2 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn finds_the_first_differing_sector(model in ModelImage::strategy(10, 512, 4000), pick in any::<u64>()) {
        let same = compare(&model, &model.clone(), &opts(false)).unwrap();
        prop_assert_eq!(same, Comparison::Identical { size_mismatch: false });
        // Flip one byte anywhere (in a data, zero or unallocated extent): the flipped
        // copy claims data there so the byte is read.
        let mut other = model.clone();
        let at = pick % other.bytes.len() as u64;
        other.bytes[at as usize] ^= 0x40;
        other.map = vconvert_core::BlockMap::uniform(0..other.bytes.len() as u64, vconvert_core::ExtentKind::Data(vconvert_core::Location::Opaque));
        let got = compare(&model, &other, &opts(false)).unwrap();
        prop_assert_eq!(got, Comparison::ContentMismatch { offset: at / 512 * 512, size_mismatch: false });
    }
}

#[test]
fn size_mismatch_rules_follow_qemu() {
    let small = ModelImage::from_parts(&[(4 << 20, ModelKind::Data, 3)]);
    let mut big = ModelImage::from_parts(&[
        (4 << 20, ModelKind::Data, 3),
        (1 << 20, ModelKind::Unallocated, 0),
    ]);
    assert_eq!(
        compare(&small, &big, &opts(false)).unwrap(),
        Comparison::Identical {
            size_mismatch: true
        }
    );
    assert_eq!(
        compare(&small, &big, &opts(true)).unwrap(),
        Comparison::StrictSizeMismatch
    );
    big = ModelImage::from_parts(&[(4 << 20, ModelKind::Data, 3), (1 << 20, ModelKind::Data, 7)]);
    assert_eq!(
        compare(&big, &small, &opts(false)).unwrap(),
        Comparison::ContentMismatch {
            offset: 4 << 20,
            size_mismatch: true
        }
    );
}

#[test]
fn strict_mode_sees_allocation_differences() {
    let a = ModelImage::from_parts(&[
        (1 << 20, ModelKind::Data, 5),
        (1 << 20, ModelKind::Unallocated, 0),
    ]);
    let b = ModelImage::from_parts(&[
        (1 << 20, ModelKind::Data, 5),
        (1 << 20, ModelKind::Data, 10),
    ]); // seed 10: zeros
    assert_eq!(
        compare(&a, &b, &opts(false)).unwrap(),
        Comparison::Identical {
            size_mismatch: false
        }
    );
    assert_eq!(
        compare(&a, &b, &opts(true)).unwrap(),
        Comparison::StrictAllocationMismatch { offset: 1 << 20 }
    );
}
