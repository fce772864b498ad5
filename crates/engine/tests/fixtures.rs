//! The committed fixtures in `testdata/` read back to the SHA-256 recorded for their
//! raw content, without qemu-img.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use vconvert_core::Format;
use vconvert_engine::{open, OpenOptions};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

#[test]
fn every_fixture_reads_to_its_recorded_hash() {
    let sums = std::fs::read_to_string(testdata().join("SHA256SUMS")).unwrap();
    let mut checked = 0;
    for line in sums
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        // "<sha256 of raw content>  <file>  <format>  <virtual size>"
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "bad line {line:?}");
        let path = testdata().join(f[1]);
        let format: Format = f[2].parse().unwrap();
        let img =
            open(&path, None, &OpenOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", f[1]));
        assert_eq!(img.format(), format, "{} probes as {}", f[1], img.format());
        assert_eq!(img.virtual_size(), f[3].parse::<u64>().unwrap(), "{}", f[1]);
        vconvert_testkit::check_reader_consistency(img.as_ref()).unwrap();
        let bytes = vconvert_testkit::read_all(img.as_ref()).unwrap();
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, f[0], "{}", f[1]);
        checked += 1;
    }
    assert!(checked > 0, "no fixtures listed");
}
