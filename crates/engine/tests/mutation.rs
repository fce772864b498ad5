//! Hostile-input robustness in the normal test suite: every fixture in `testdata/`,
//! mutated deterministically (bit flips in headers and tables, extreme field values,
//! truncation, random bursts), is opened, inspected, mapped, read and converted. Each
//! case must end in `Ok` or an error: never a panic, never longer than a time bound,
//! never more address space than a bound (this test binary runs under RLIMIT_AS).

mod vhdx_build;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use vconvert_core::{Format, ImageFile, Options};
use vconvert_engine::{convert, inspect_file, open_file, ConvertOptions, OpenOptions, Policy};
use vconvert_testkit::Rng;

/// Address space the whole test process may use.
const ADDRESS_SPACE_LIMIT: u64 = 6 << 30;
/// Time one case may take.
const CASE_TIME_LIMIT: Duration = Duration::from_secs(20);
/// Mutations per fixture.
const CASES_PER_FIXTURE: u64 = 120;
/// Largest disk a case converts (others are only mapped and sampled).
const CONVERT_LIMIT: u64 = 256 << 20;

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    sums.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let name = l.split_whitespace().nth(1).unwrap().to_string();
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

/// One deterministic mutation of `orig`, chosen by `case`.
fn mutate(orig: &[u8], rng: &mut Rng, case: u64) -> (String, Vec<u8>) {
    let mut b = orig.to_vec();
    let len = b.len().max(1) as u64;
    // Most metadata lives in the first 64 KiB or the last 2 KiB (footers).
    let hot = |rng: &mut Rng| -> usize {
        if rng.below(4) == 0 {
            (len - 1 - rng.below(2048.min(len))) as usize
        } else {
            rng.below(65536.min(len)) as usize
        }
    };
    let what = match case % 5 {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = hot(rng);
                b[i] ^= 1 << rng.below(8);
            }
            format!("{n} bit flips")
        }
        1 => {
            let at = hot(rng) & !3;
            let vals: [&[u8]; 6] = [
                &[0xff; 4],
                &[0xff; 8],
                &[0; 8],
                &[0x80, 0, 0, 0],
                &[0, 0, 0, 0x80],
                &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ];
            let v = vals[rng.below(vals.len() as u64) as usize];
            let end = (at + v.len()).min(b.len());
            b[at..end].copy_from_slice(&v[..end - at]);
            format!("value {v:02x?} at {at:#x}")
        }
        2 => {
            let cut = rng.below(len) as usize;
            b.truncate(cut);
            format!("truncated to {cut}")
        }
        3 => {
            let at = rng.below(len) as usize;
            let n = (16 + rng.below(240) as usize).min(b.len() - at);
            let mut burst = vec![0u8; n];
            rng.fill(&mut burst);
            b[at..at + n].copy_from_slice(&burst);
            format!("{n} random bytes at {at:#x}")
        }
        _ => {
            // Duplicate a 512-byte sector over another (tables pointing at each other).
            let from = (rng.below(len) as usize) & !511;
            let to = (hot(rng)) & !511;
            let n = 512.min(b.len() - from).min(b.len() - to);
            let chunk = b[from..from + n].to_vec();
            b[to..to + n].copy_from_slice(&chunk);
            format!("sector {from:#x} copied to {to:#x}")
        }
    };
    (what, b)
}

/// Everything a hostile image goes through; errors are fine, panics are not.
fn exercise(name: &str, bytes: Vec<u8>, dir: &std::path::Path) {
    let file = ImageFile::from_bytes(name, bytes);
    let _ = inspect_file(file.clone(), None, &Policy::untrusted());
    let no_refs = OpenOptions::default();
    let mut formats: Vec<Option<Format>> = vec![None];
    formats.extend(Format::ALL.iter().map(|f| Some(*f)));
    for fmt in formats {
        let Ok(img) = open_file(file.clone(), fmt, &no_refs) else {
            continue;
        };
        let _ = img.info();
        let _ = img.check();
        let size = img.virtual_size();
        let Ok(map) = img.block_map(0..size.min(1 << 40)) else {
            continue;
        };
        // Read a sample of every data extent (bounded).
        let mut budget: u64 = 8 << 20;
        for e in map.extents().iter().filter(|e| e.kind.is_data()) {
            let n = e.len.min(1 << 20).min(budget);
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n as usize];
            let _ = img.read_at(&mut buf, e.start);
            budget -= n;
        }
        if size <= CONVERT_LIMIT {
            let out = dir.join("out.raw");
            let opts = ConvertOptions {
                threads: 2,
                ..ConvertOptions::default()
            };
            let _ = convert(img.as_ref(), &out, Format::Raw, Options::new(), &opts);
            let _ = std::fs::remove_file(&out);
        }
    }
}

/// Runs [`exercise`] on a thread; fails the test, naming `label`, when it panics or
/// outlives [`CASE_TIME_LIMIT`].
fn exercise_bounded(label: &str, name: &str, bytes: Vec<u8>, dir: &std::path::Path) {
    let (tx, rx) = mpsc::channel();
    let (name, dir) = (name.to_string(), dir.to_path_buf());
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(move || exercise(&name, bytes, &dir));
        let _ = tx.send(r.is_ok());
    });
    match rx.recv_timeout(CASE_TIME_LIMIT) {
        Ok(true) => {}
        Ok(false) => panic!("{label}: panicked"),
        Err(_) => panic!("{label}: did not finish within {CASE_TIME_LIMIT:?}"),
    }
}

#[test]
fn mutated_fixtures_never_panic_hang_or_balloon() {
    let limit = rustix::process::Rlimit {
        current: Some(ADDRESS_SPACE_LIMIT),
        maximum: Some(ADDRESS_SPACE_LIMIT),
    };
    rustix::process::setrlimit(rustix::process::Resource::As, limit).unwrap();
    let dir = vconvert_testkit::tempdir();
    let fixtures = fixtures();
    assert!(!fixtures.is_empty());
    let mut total = 0;
    for (name, orig) in fixtures {
        let mut rng = Rng::new(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }));
        for case in 0..CASES_PER_FIXTURE {
            let (what, bytes) = mutate(&orig, &mut rng, case);
            let label = format!("{name} case {case} ({what})");
            exercise_bounded(&label, &name, bytes, dir.path());
            total += 1;
        }
    }
    assert!(total >= CASES_PER_FIXTURE);
}

/// Hand-made VHDX images: a dynamic one with a dirty log of two entries (a data
/// sector and a BAT page) and a Hyper-V-style one (4 KiB sectors, ZERO and UNMAPPED
/// blocks). VHDX structures lie far beyond the first 64 KiB and are all checksummed, so
/// mutations aim at them, and half the cases fix the checksums afterwards so the
/// damage reaches the parsers behind them.
fn vhdx_bases() -> Vec<(String, Vec<u8>, vhdx_build::Placed)> {
    use vhdx_build::{data, entry, make_dirty, pattern, Block, Vhdx};
    let mib = 1u64 << 20;
    let mut v = Vhdx::new(3 * mib + 4096, mib, 512);
    v.blocks.push((0, Block::Full(pattern(mib as usize, 1))));
    v.blocks.push((2, Block::Full(pattern(4096, 2))));
    let (mut dirty, placed) = v.build();
    let guid = vconvert_vhdx::Guid([7; 16]);
    let b0 = placed.blocks[0].1;
    let page = dirty[placed.bat as usize..placed.bat as usize + 4096].to_vec();
    let e1 = entry(guid, 5, 0, placed.end, &[data(b0 + 4096, pattern(4096, 3))]);
    let e2 = entry(guid, 6, 0, placed.end, &[data(placed.bat, page)]);
    make_dirty(&mut dirty, guid, &[e1, e2]);
    let mut h = Vhdx::new(2 * mib, mib, 4096);
    h.blocks.push((0, Block::Full(pattern(mib as usize, 4))));
    h.blocks.push((1, Block::State(3)));
    let (hv, hv_placed) = h.build();
    vec![
        ("dirty.vhdx".into(), dirty, placed),
        ("hyperv.vhdx".into(), hv, hv_placed),
    ]
}

/// Recomputes the CRC-32C of both headers, both region tables and the log's first
/// two entries, whatever they hold now.
fn vhdx_reseal(b: &mut [u8], placed: &vhdx_build::Placed) {
    for (at, len) in [
        (64usize << 10, 4096usize),
        (128 << 10, 4096),
        (192 << 10, 64 << 10),
        (256 << 10, 64 << 10),
    ] {
        if b.len() >= at + len {
            vconvert_vhdx::seal(&mut b[at..at + len], 4);
        }
    }
    let mut pos = placed.log as usize;
    for _ in 0..2 {
        if b.len() < pos + 12 || &b[pos..pos + 4] != b"loge" {
            break;
        }
        let len = u32::from_le_bytes(b[pos + 8..pos + 12].try_into().unwrap()) as usize;
        if len < 64 || b.len() < pos + len || len > 1 << 20 {
            break;
        }
        vconvert_vhdx::seal(&mut b[pos..pos + len], 4);
        pos += len;
    }
}

#[test]
fn mutated_vhdx_structures_never_panic_hang_or_balloon() {
    let limit = rustix::process::Rlimit {
        current: Some(ADDRESS_SPACE_LIMIT),
        maximum: Some(ADDRESS_SPACE_LIMIT),
    };
    rustix::process::setrlimit(rustix::process::Resource::As, limit).unwrap();
    let dir = vconvert_testkit::tempdir();
    for (name, orig, placed) in vhdx_bases() {
        let mut rng = Rng::new(orig.len() as u64);
        let mut opened = 0;
        // (start, length) of every structure.
        let hot = [
            (64u64 << 10, 128u64),
            (128 << 10, 128),
            (192 << 10, 96),
            (256 << 10, 96),
            (placed.log, 12288),
            (placed.bat, 64),
            (placed.meta, 256),
            (placed.meta + (64 << 10), 64),
        ];
        for case in 0..CASES_PER_FIXTURE {
            let mut b = orig.clone();
            let (start, len) = hot[rng.below(hot.len() as u64) as usize];
            let at = (start + rng.below(len)) as usize;
            let what = match case % 4 {
                0 => {
                    b[at] ^= 1 << rng.below(8);
                    format!("bit flip at {at:#x}")
                }
                1 => {
                    let v: [u8; 8] = match rng.below(4) {
                        0 => [0xff; 8],
                        1 => [0; 8],
                        2 => (1u64 << 40).to_le_bytes(),
                        _ => rng.next_u64().to_le_bytes(),
                    };
                    let end = (at + 8).min(b.len());
                    b[at..end].copy_from_slice(&v[..end - at]);
                    format!("value {v:02x?} at {at:#x}")
                }
                2 => {
                    let cut = (start + rng.below(len.max(1 << 20))) as usize;
                    b.truncate(cut.min(b.len()));
                    format!("truncated to {cut}")
                }
                _ => {
                    let n = (1 + rng.below(64) as usize).min(b.len() - at);
                    let mut burst = vec![0u8; n];
                    rng.fill(&mut burst);
                    b[at..at + n].copy_from_slice(&burst);
                    format!("{n} random bytes at {at:#x}")
                }
            };
            let resealed = case % 2 == 1;
            if resealed {
                vhdx_reseal(&mut b, &placed);
            }
            let label = format!("{name} case {case} ({what}, resealed {resealed})");
            let file = ImageFile::from_bytes(&name, b.clone());
            if open_file(file, Some(Format::Vhdx), &OpenOptions::default()).is_ok() {
                opened += 1;
            }
            exercise_bounded(&label, &name, b, dir.path());
        }
        // The mutations must reach the parsers behind the checksums: a fair share of
        // damaged images still open (and then get mapped, read and converted).
        assert!(
            opened >= CASES_PER_FIXTURE / 5,
            "{name}: only {opened} of {CASES_PER_FIXTURE} mutated images opened"
        );
    }
}

#[test]
fn regression_inputs_never_panic_or_hang() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/regressions");
    let work = vconvert_testkit::tempdir();
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "md") {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&p).unwrap();
        exercise_bounded(&name, &name, bytes, work.path());
        seen += 1;
    }
    assert!(seen > 0, "no regression inputs in {}", dir.display());
}
