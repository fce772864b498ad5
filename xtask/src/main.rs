//! `cargo xtask`: developer tasks that are more than one cargo command.

mod bench;
mod bench_import;
mod ceph;
mod guard;
mod postgres;
mod test;

use std::path::{Path, PathBuf};
use std::process::{exit, Command, Stdio};

const HELP: &str = "\
cargo xtask <TASK>

Tasks:
  test [ARGS]                  the README's test command: installs qemu-utils, PostgreSQL
                               and Ceph when missing (as root), makes target/test-venv
                               with the OpenStack clients (reused), starts a throwaway
                               PostgreSQL on 127.0.0.1 (catalogue and several-hosts
                               tests; without it the command fails) and a throwaway Ceph
                               (target/test-ceph), then cargo test --workspace --release
                               [--features vconvert-import/rbd] ARGS, then stops both
                               (CI=1: client and RBD tests must run, not skip)
  lint                         cargo fmt --check, then clippy -D warnings on every target
  soak                         the long #[ignore] tests of the workspace, in release mode
  fuzz [--seconds N] [TARGET]  run cargo-fuzz targets (all when none is named) for N
                               seconds each (default 60), seeded from testdata/, and
                               record each campaign in fuzz/README.md
  bench [--quick] [--rounds N] [--only WORD,...] [--ceph-conf PATH]
                               vconvert vs qemu-img side by side on a realistic corpus
                               (built once in benches/corpus/), and vimport's upload and
                               import end to end; writes benches/RESULTS.md (--quick: a
                               small corpus, benches/RESULTS-quick.md; --only: the cases
                               whose name holds a WORD: scaling, vimport (both vimport
                               cases), vimport-concurrent (two imports at once), rbd;
                               written to benches/RESULTS-only-WORDS.md;
                               BENCH_VIMPORT_BIN=PATH measures another vimport build);
                               --ceph-conf: also vimport into RBD on that cluster
                               (e.g. scripts/ceph-dev.sh's) against qemu-img + rbd import
";

const FUZZ_TARGETS: [&str; 7] = [
    "qcow2",
    "vdi",
    "vmdk",
    "vpc",
    "vhdx",
    "convert_any",
    "probe_inspect",
];

/// The workspace `cargo xtask` runs in: `cargo run` sets `CARGO_MANIFEST_DIR` for the
/// process (the checkout it was started in, even when several checkouts share one
/// `CARGO_TARGET_DIR` and so one built xtask); the compile-time value otherwise.
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo(args: &[&str]) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    Command::new(cargo)
        .args(args)
        .current_dir(root())
        .status()
        .is_ok_and(|s| s.success())
}

/// The value after `counter` in a libFuzzer status line (e.g. "cov: 123").
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn fuzz(args: &[String]) -> bool {
    let mut seconds = 60u64;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--seconds" {
            match it.next().and_then(|s| s.parse().ok()) {
                Some(n) => seconds = n,
                None => {
                    eprintln!("--seconds needs a number");
                    return false;
                }
            }
        } else if FUZZ_TARGETS.contains(&a.as_str()) {
            targets.push(a.clone());
        } else {
            eprintln!(
                "unknown fuzz target '{a}'; targets: {}",
                FUZZ_TARGETS.join(", ")
            );
            return false;
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.iter().map(|s| s.to_string()).collect();
    }
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_fuzz && !cargo(&["install", "cargo-fuzz", "--locked"]) {
        eprintln!("cannot install cargo-fuzz");
        return false;
    }
    let root = root();
    for target in &targets {
        let corpus = root.join("fuzz/corpus").join(target);
        let _ = std::fs::create_dir_all(&corpus);
        if let Ok(rd) = std::fs::read_dir(root.join("testdata")) {
            for e in rd.flatten() {
                let p = e.path();
                let is_image = p.is_file()
                    && !matches!(p.extension().and_then(|x| x.to_str()), Some("md") | None)
                    && p.file_name().is_some_and(|n| n != "SHA256SUMS");
                if is_image {
                    let _ = std::fs::copy(&p, corpus.join(e.file_name()));
                }
            }
        }
        eprintln!("$ cargo +nightly fuzz run {target} ({seconds} s)");
        let out = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-dict=fuzz/dicts/images.dict")
            .arg("-rss_limit_mb=2048")
            .arg("-max_len=4194304")
            .arg("-timeout=20")
            .current_dir(&root)
            .stderr(Stdio::piped())
            .output();
        let Ok(out) = out else {
            eprintln!("cannot run cargo fuzz");
            return false;
        };
        let log = String::from_utf8_lossy(&out.stderr);
        let status_lines: Vec<&str> = log.lines().filter(|l| l.contains(" cov: ")).collect();
        let last = status_lines.last().copied().unwrap_or("");
        let execs = last
            .strip_prefix('#')
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let cov = field(last, "cov:").unwrap_or(0);
        let crashed = !out.status.success();
        let date = Command::new("date")
            .args(["-u", "+%F %H:%M"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let row = format!(
            "| {date} | {target} | {seconds} | {execs} | {cov} | {} |\n",
            if crashed {
                "yes: see fuzz/artifacts"
            } else {
                "0"
            }
        );
        eprint!("{row}");
        let readme = root.join("fuzz/README.md");
        let mut text = std::fs::read_to_string(&readme).unwrap_or_default();
        text.push_str(&row);
        let _ = std::fs::write(&readme, text);
        if crashed {
            eprintln!(
                "{}",
                log.lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            return false;
        }
    }
    true
}

/// `cargo xtask bench`'s options. Every argument must be one of them: a misspelt
/// option stops before the half-hour run starts instead of running with defaults.
#[derive(Debug, PartialEq)]
struct BenchArgs {
    quick: bool,
    rounds: usize,
    only: Vec<String>,
    ceph_conf: Option<PathBuf>,
}

impl BenchArgs {
    /// `Ok(None)` when help was asked for.
    fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut b = BenchArgs {
            quick: false,
            rounds: 3,
            only: Vec::new(),
            ceph_conf: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--help" | "-h" => return Ok(None),
                "--quick" => b.quick = true,
                "--rounds" => {
                    let v = value()?;
                    b.rounds =
                        v.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("--rounds needs a positive number, not '{v}'")
                        })?;
                }
                "--only" => b.only = value()?.split(',').map(str::to_string).collect(),
                "--ceph-conf" => b.ceph_conf = Some(PathBuf::from(value()?)),
                other => return Err(format!("unknown option '{other}'")),
            }
        }
        Ok(Some(b))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().cloned().unwrap_or_default();
    let ok = match task.as_str() {
        "lint" => {
            cargo(&["fmt", "--all", "--", "--check"])
                && cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
        }
        "test" => test::test(&root(), &args[1..]),
        "soak" => cargo(&["test", "--workspace", "--release", "--", "--ignored"]),
        "fuzz" => fuzz(&args[1..]),
        "bench" => match BenchArgs::parse(&args[1..]) {
            Ok(Some(b)) => {
                bench::bench(&root(), b.quick, b.rounds, &b.only, b.ceph_conf.as_deref())
            }
            Ok(None) => {
                print!("{HELP}");
                true
            }
            Err(e) => {
                eprintln!("bench: {e}\n\n{HELP}");
                false
            }
        },
        "" | "help" | "--help" | "-h" => {
            print!("{HELP}");
            true
        }
        other => {
            eprintln!("unknown task '{other}'\n\n{HELP}");
            false
        }
    };
    exit(if ok { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<BenchArgs>, String> {
        BenchArgs::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn bench_options_are_read() {
        let b = parse(&[
            "--rounds",
            "5",
            "--only",
            "vimport,rbd",
            "--ceph-conf",
            "/c",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(b.rounds, 5);
        assert_eq!(b.only, ["vimport", "rbd"]);
        assert_eq!(b.ceph_conf.as_deref(), Some(Path::new("/c")));
        assert!(!b.quick);
        assert!(parse(&["--quick"]).unwrap().unwrap().quick);
    }

    #[test]
    fn bench_help_and_unknown_options_do_not_run_the_bench() {
        assert_eq!(parse(&["--rounds", "5", "--help"]), Ok(None));
        assert!(parse(&["--round", "5"]).unwrap_err().contains("'--round'"));
        assert!(parse(&["--rounds"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--rounds", "0"]).is_err());
        assert!(parse(&["--rounds", "five"]).is_err());
    }
}
