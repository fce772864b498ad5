//! Test helpers shared by every vconvert crate: the qemu-img oracle.
//!
//! [`qemu`] returns the oracle when `qemu-img` is installed. When it is missing the
//! test is reported skipped (a line on stderr), unless `VCONVERT_REQUIRE_QEMU=1` (set by
//! CI), in which case the test fails. [`Layout`] describes a test disk (random data at
//! unaligned sector offsets, zero writes, discards) that [`Qemu::build`] makes with
//! qemu-img and qemu-io in any format.

mod model;

pub use model::{check_reader_consistency, read_all, ModelImage, ModelKind};

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The qemu-img / qemu-io oracle.
#[derive(Debug, Clone, Copy)]
pub struct Qemu(());

/// The oracle, or `None` (test skipped) when qemu-img is absent and not required.
///
/// # Panics
/// When qemu-img is absent and `VCONVERT_REQUIRE_QEMU=1`.
pub fn qemu() -> Option<Qemu> {
    let found = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(Qemu(()));
    }
    if std::env::var("VCONVERT_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!(
            "qemu-img is required (VCONVERT_REQUIRE_QEMU=1) but was not found: install qemu-utils"
        );
    }
    eprintln!("SKIPPED: qemu-img not found (install qemu-utils to run the oracle tests)");
    None
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn must(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Qemu {
    /// Runs `qemu-img ARGS`, which must succeed.
    pub fn img<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        must(Command::new("qemu-img").args(args))
    }

    /// Runs `qemu-img ARGS` and returns its exit code.
    pub fn img_status<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> i32 {
        run(Command::new("qemu-img").args(args))
            .status
            .code()
            .unwrap_or(-1)
    }

    /// Runs `qemu-io -f FMT -c CMD ... FILE`, which must succeed.
    pub fn io(&self, format: &str, file: &Path, cmds: &[String]) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", format]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = must(c.arg(file));
        // qemu-io reports errors of a -c command on stdout and still exits 0.
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("error") && !text.contains("failed"),
            "qemu-io {cmds:?} on {}: {text}",
            file.display()
        );
    }

    /// `qemu-img compare -f FA -F FB A B`: 0 identical, 1 different, 2+ errors.
    pub fn compare(&self, fa: &str, a: &Path, fb: &str, b: &Path) -> i32 {
        let out = run(Command::new("qemu-img")
            .args(["compare", "-f", fa, "-F", fb])
            .arg(a)
            .arg(b));
        if out.status.code() != Some(0) {
            eprintln!(
                "qemu-img compare {} {}: {}{}",
                a.display(),
                b.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.code().unwrap_or(-1)
    }

    /// Asserts `qemu-img compare` finds `a` and `b` identical.
    pub fn assert_same(&self, fa: &str, a: &Path, fb: &str, b: &Path) {
        assert_eq!(
            self.compare(fa, a, fb, b),
            0,
            "qemu-img compare: {} ({fa}) and {} ({fb}) differ",
            a.display(),
            b.display()
        );
    }

    /// `qemu-img check -f FMT FILE`: 0 clean, 2 corrupt, 3 leaks, 63 not supported.
    pub fn check(&self, format: &str, file: &Path) -> (i32, String) {
        let out = run(Command::new("qemu-img")
            .args(["check", "-f", format])
            .arg(file));
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `qemu-img info --output=json [-f FMT] FILE`.
    pub fn info_json(&self, format: Option<&str>, file: &Path) -> serde_json::Value {
        let mut c = Command::new("qemu-img");
        c.args(["info", "--output=json"]);
        if let Some(f) = format {
            c.args(["-f", f]);
        }
        let out = must(c.arg(file));
        serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
    }

    /// Makes an image of `format` at `path` holding `layout`, with `options` (`-o`).
    /// Data is written into a raw image, converted with qemu-img, then zero writes and
    /// discards are applied with qemu-io so the format records them natively.
    pub fn build(&self, layout: &Layout, format: &str, options: &str, path: &Path) {
        let raw = path.with_extension("layout.raw");
        layout.write_raw(&raw);
        let mut args: Vec<String> = vec![
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            format.into(),
        ];
        if !options.is_empty() {
            args.push("-o".into());
            args.push(options.into());
        }
        args.push(raw.display().to_string());
        args.push(path.display().to_string());
        self.img(&args);
        std::fs::remove_file(&raw).ok();
        let cmds: Vec<String> = layout
            .ops
            .iter()
            .filter_map(|op| match *op {
                // Every other zero write may unmap (qcow2 then drops the host cluster).
                Op::Zero { offset, len } if (offset / 512) % 2 == 1 => {
                    Some(format!("write -z -u {offset} {len}"))
                }
                Op::Zero { offset, len } => Some(format!("write -z {offset} {len}")),
                Op::Discard { offset, len } => Some(format!("discard {offset} {len}")),
                Op::Data { .. } => None,
            })
            .collect();
        if !cmds.is_empty() {
            self.io(format, path, &cmds);
        }
    }
}

/// One write of a test layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Pseudo-random bytes from `seed`.
    Data {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Seed of the bytes.
        seed: u64,
    },
    /// `qemu-io write -z`.
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `qemu-io discard`.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// A test disk: a size and writes applied in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Virtual size in bytes.
    pub size: u64,
    /// Writes.
    pub ops: Vec<Op>,
}

/// A small deterministic PRNG (splitmix64), so tests need no extra crate.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

impl Layout {
    /// `count` data writes of random sizes at unaligned sector offsets, then some zero
    /// writes and discards at sector granularity, all within `size`.
    pub fn random(size: u64, count: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let sectors = (size / 512).max(1);
        let mut ops = Vec::new();
        for i in 0..count {
            let offset = rng.below(sectors) * 512;
            let max = (size - offset).min(3 << 20);
            let len = (1 + rng.below(max / 512).max(1)) * 512;
            let len = len.min(size - offset);
            if len > 0 {
                ops.push(Op::Data {
                    offset,
                    len,
                    seed: seed ^ (i as u64 + 1),
                });
            }
        }
        for i in 0..count / 3 {
            let offset = rng.below(sectors) * 512;
            let len = ((1 + rng.below(256)) * 512).min(size - offset);
            if len == 0 {
                continue;
            }
            if i % 2 == 0 {
                ops.push(Op::Zero { offset, len });
            } else {
                ops.push(Op::Discard { offset, len });
            }
        }
        Layout { size, ops }
    }

    /// Writes the data ops into a sparse raw file of `size` bytes (zero writes and
    /// discards are left to [`Qemu::build`]).
    pub fn write_raw(&self, path: &Path) {
        let f = std::fs::File::create(path).expect("create raw");
        f.set_len(self.size).expect("set_len");
        for op in &self.ops {
            if let Op::Data { offset, len, seed } = *op {
                let mut buf = vec![0u8; len as usize];
                Rng::new(seed).fill(&mut buf);
                f.write_all_at(&buf, offset).expect("write");
            }
        }
    }

    /// Bytes covered by data writes (an upper bound of the data a sparse copy holds).
    pub fn data_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Data { len, .. } => *len,
                _ => 0,
            })
            .sum()
    }
}

/// Bytes a file occupies on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// The entries of a directory (to check that nothing was left behind).
pub fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes a raw image of `size` bytes whose data compresses like real file systems do
/// (roughly 3:1 with deflate): log-like text lines with varying numbers and words,
/// some random binary stretches, and zero holes.
pub fn write_compressible_raw(path: &Path, size: u64, seed: u64) {
    const WORDS: [&str; 24] = [
        "kernel", "request", "block", "device", "error", "cluster", "offset", "image", "convert",
        "thread", "socket", "accepted", "timeout", "user", "session", "write", "read", "flush",
        "commit", "table", "index", "value", "status", "ok",
    ];
    let mut rng = Rng::new(seed);
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("set_len");
    let chunk = 1u64 << 20;
    let mut pos = 0;
    while pos < size {
        let len = chunk.min(size - pos);
        match rng.below(8) {
            // A hole.
            0 => {}
            // Random bytes (already compressed data, say).
            1 => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                f.write_all_at(&buf, pos).expect("write");
            }
            _ => {
                let mut buf = Vec::with_capacity(len as usize + 128);
                while (buf.len() as u64) < len {
                    let line = format!(
                        "{} {} {}={} {} {:x}\n",
                        1_700_000_000 + rng.below(1_000_000),
                        WORDS[rng.below(24) as usize],
                        WORDS[rng.below(24) as usize],
                        rng.below(100_000),
                        WORDS[rng.below(24) as usize],
                        rng.next_u64() >> 40,
                    );
                    buf.extend_from_slice(line.as_bytes());
                }
                buf.truncate(len as usize);
                f.write_all_at(&buf, pos).expect("write");
            }
        }
        pos += len;
    }
}
