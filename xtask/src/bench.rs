//! `cargo xtask bench`: vconvert against qemu-img, side by side, on a realistic corpus.
//!
//! The corpus (an ext4 filesystem of real files, plus its qemu-made qcow2, compressed
//! qcow2, streamOptimized VMDK, VHD, VDI and VHDX forms) is built once into
//! `benches/corpus/` and reused. Each case runs vconvert and qemu-img alternately
//! (A B C A B C …), reports medians, ratios, peak RSS and output sizes, checks outputs
//! with `qemu-img compare`, and the run is written to `benches/RESULTS.md`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Corpus parameters.
struct Corpus {
    dir: PathBuf,
    virtual_size: &'static str,
    source_tree: &'static str,
}

pub(crate) fn run_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success())
}

fn qemu_img(args: &[&str]) -> bool {
    run_ok(Command::new("qemu-img").args(args))
}

/// Deterministic synthetic disk: ~23% data of mixed compressibility in 1 MiB pieces.
fn synthetic(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let words: [&[u8]; 8] = [
        b"the ",
        b"lib",
        b"\x00\x00\x00\x00",
        b"ELF",
        b"symbol_",
        b"0x7f",
        b"data ",
        b"\n",
    ];
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..size >> 20 {
        let r = next() % 100;
        if r >= 23 {
            continue;
        }
        if r < 6 {
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&next().to_le_bytes()[..c.len()]);
            }
        } else {
            let mut i = 0;
            while i < buf.len() {
                let w = words[(next() % 8) as usize];
                let n = w.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
        f.write_all_at(&buf, mib << 20)?;
    }
    Ok(())
}

fn build_corpus(c: &Corpus) -> Result<String, String> {
    std::fs::create_dir_all(&c.dir).map_err(|e| e.to_string())?;
    let raw = c.dir.join("disk.raw");
    let mut kind = String::new();
    if !raw.exists() {
        let tmp = c.dir.join("disk.raw.tmp");
        let _ = std::fs::remove_file(&tmp);
        let have_mkfs = Path::new(c.source_tree).is_dir()
            && run_ok(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-d", c.source_tree])
                    .arg(&tmp)
                    .arg(c.virtual_size),
            );
        if have_mkfs {
            kind = format!(
                "ext4 filesystem of {} (mkfs.ext4 -d), {}",
                c.source_tree, c.virtual_size
            );
        } else {
            eprintln!("mkfs.ext4 -d unavailable: using the synthetic corpus");
            let size = vconvert_size(c.virtual_size);
            synthetic(&tmp, size).map_err(|e| e.to_string())?;
            kind = format!(
                "synthetic disk, {} (23% data, mixed compressibility)",
                c.virtual_size
            );
        }
        std::fs::rename(&tmp, &raw).map_err(|e| e.to_string())?;
        std::fs::write(c.dir.join("KIND"), &kind).map_err(|e| e.to_string())?;
    }
    if kind.is_empty() {
        kind = std::fs::read_to_string(c.dir.join("KIND")).unwrap_or_default();
    }
    let forms: [(&str, &[&str]); 6] = [
        ("disk.qcow2", &["-O", "qcow2"]),
        ("disk-c.qcow2", &["-O", "qcow2", "-c"]),
        (
            "disk-stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        ("disk.vhd", &["-O", "vpc"]),
        ("disk.vdi", &["-O", "vdi"]),
        ("disk.vhdx", &["-O", "vhdx"]),
    ];
    for (name, args) in forms {
        let out = c.dir.join(name);
        if out.exists() {
            continue;
        }
        eprintln!("building corpus: {name}");
        let tmp = c.dir.join(format!("{name}.tmp"));
        let mut a = vec!["convert", "-f", "raw"];
        a.extend_from_slice(args);
        let (r, t) = (raw.display().to_string(), tmp.display().to_string());
        a.push(&r);
        a.push(&t);
        if !qemu_img(&a) {
            return Err(format!("qemu-img could not build {name}"));
        }
        std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    }
    Ok(kind)
}

fn vconvert_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().unwrap_or(1);
    match unit {
        "G" => n << 30,
        "M" => n << 20,
        _ => n,
    }
}

/// Reads `path` through (not timed), so that each run starts with its source in the page
/// cache: this VM gives page cache back to the host between runs (seen: 8 GiB cached,
/// then 4 GiB), which otherwise makes some runs read from disk.
fn warm(path: &Path) {
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = std::io::copy(&mut f, &mut std::io::sink());
    }
}

/// [`warm`], then `sync`: a run starts with its source cached and no dirty pages.
pub(crate) fn warm_and_sync(path: &Path) {
    warm(path);
    let _ = Command::new("sync").status();
}

/// One timed run of `cmd` converting `src`: wall seconds and peak RSS in KiB (from
/// /usr/bin/time). The source is read into the page cache and dirty pages left by the
/// previous run are flushed first (`sync`), neither timed, so every run starts alike and
/// none pays for another's writeback.
pub(crate) fn timed(src: &Path, cmd: &[String]) -> Option<(f64, Option<u64>)> {
    warm(src);
    let _ = Command::new("sync").status();
    let rss_file = std::env::temp_dir().join(format!("vconvert-bench-rss-{}", std::process::id()));
    let have_time = Path::new("/usr/bin/time").exists();
    let mut c = if have_time {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M", "-o"]).arg(&rss_file).args(cmd);
        c
    } else {
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        c
    };
    let start = Instant::now();
    let ok = c
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success());
    let secs = start.elapsed().as_secs_f64();
    if !ok {
        return None;
    }
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|s| s.trim().lines().last()?.trim().parse().ok());
    Some((secs, rss))
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Whether a case named `name` runs: every case without `--only`, else those whose name
/// contains one of its words.
fn selected(only: &[String], name: &str) -> bool {
    only.is_empty() || only.iter().any(|o| name.contains(o.as_str()))
}

/// The 1-minute load average now.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// "median (min–max)" of `v`, in seconds.
pub(crate) fn spread(v: &[f64]) -> String {
    let mut v = v.to_vec();
    let med = median(&mut v);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) if v.len() > 1 => format!("{med:.2} ({lo:.2}–{hi:.2})"),
        _ => format!("{med:.2}"),
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

struct Case {
    name: &'static str,
    src: &'static str,
    src_fmt: &'static str,
    out_fmt: &'static str,
    args: &'static [&'static str],
    cp_floor: bool,
}

const CASES: [Case; 9] = [
    Case {
        name: "raw → qcow2",
        src: "disk.raw",
        src_fmt: "raw",
        out_fmt: "qcow2",
        args: &[],
        cp_floor: true,
    },
    Case {
        name: "raw → qcow2 -c",
        src: "disk.raw",
        src_fmt: "raw",
        out_fmt: "qcow2",
        args: &["-c"],
        cp_floor: false,
    },
    Case {
        name: "compressed qcow2 → raw",
        src: "disk-c.qcow2",
        src_fmt: "qcow2",
        out_fmt: "raw",
        args: &[],
        cp_floor: false,
    },
    Case {
        name: "qcow2 → raw",
        src: "disk.qcow2",
        src_fmt: "qcow2",
        out_fmt: "raw",
        args: &[],
        cp_floor: true,
    },
    Case {
        name: "raw → vmdk streamOptimized",
        src: "disk.raw",
        src_fmt: "raw",
        out_fmt: "vmdk",
        args: &["-o", "subformat=streamOptimized"],
        cp_floor: false,
    },
    Case {
        name: "streamOptimized vmdk → qcow2",
        src: "disk-stream.vmdk",
        src_fmt: "vmdk",
        out_fmt: "qcow2",
        args: &[],
        cp_floor: false,
    },
    Case {
        name: "vhd → vdi",
        src: "disk.vhd",
        src_fmt: "vpc",
        out_fmt: "vdi",
        args: &[],
        cp_floor: true,
    },
    Case {
        name: "vhdx → raw",
        src: "disk.vhdx",
        src_fmt: "vhdx",
        out_fmt: "raw",
        args: &[],
        cp_floor: true,
    },
    Case {
        name: "raw → vhdx",
        src: "disk.raw",
        src_fmt: "raw",
        out_fmt: "vhdx",
        args: &[],
        cp_floor: true,
    },
];

fn convert_cmd(prog: &str, extra: &[&str], case: &Case, src: &Path, out: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec![prog.into(), "convert".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.extend(
        ["-f", case.src_fmt, "-O", case.out_fmt]
            .iter()
            .map(|s| s.to_string()),
    );
    v.extend(case.args.iter().map(|s| s.to_string()));
    v.push(src.display().to_string());
    v.push(out.display().to_string());
    v
}

fn machine() -> String {
    let sh = |c: &str| {
        Command::new("sh")
            .args(["-c", c])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "- CPU: {} ({} cores)\n- memory: {}\n- kernel: {}\n- {}\n- {}\n- date: {}\n",
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        sh("nproc"),
        sh("free -h | awk '/Mem:/{print $2}'"),
        sh("uname -sr"),
        sh("qemu-img --version | head -1"),
        sh("rustc --version"),
        sh("date -u '+%F %H:%M UTC'"),
    )
}

/// Runs the benchmark; `quick` uses a small corpus to check the harness itself.
pub fn bench(
    root: &Path,
    quick: bool,
    rounds: usize,
    only: &[String],
    ceph_conf: Option<&Path>,
) -> bool {
    let corpus = if quick {
        Corpus {
            dir: root.join("benches/corpus-quick"),
            virtual_size: "256M",
            source_tree: "/usr/lib/python3",
        }
    } else {
        Corpus {
            dir: root.join("benches/corpus"),
            virtual_size: "3G",
            source_tree: "/usr/lib/x86_64-linux-gnu",
        }
    };
    if !run_ok(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--bin",
                "vconvert",
                "--bin",
                "vimport",
            ])
            .args(
                ceph_conf
                    .map(|_| ["--features", "vconvert-import/rbd"])
                    .into_iter()
                    .flatten(),
            )
            .current_dir(root),
    ) {
        return false;
    }
    let vconvert = root.join("target/release/vconvert").display().to_string();
    let kind = match build_corpus(&corpus) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cannot build the corpus: {e}");
            return false;
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out_dir = corpus.dir.join("out");
    let _ = std::fs::create_dir_all(&out_dir);
    let mut flushed = String::from(
        "| case | vconvert s | qemu-img -t none -W -m 16 s | speed-up median | worst round | vconvert -t unsafe s | qemu-img -W -m 16 s | speed-up median | worst round | floor (cp --sparse) s | vconvert RSS MiB | qemu-img RSS MiB | size vs qemu | qemu-img compare | load (1 min) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut compressed = String::from(
        "| case | vconvert s | qemu-img -W -m 16 s | speed-up median | worst round | qemu-img default s | speed-up median | vconvert RSS MiB | qemu-img RSS MiB | size vs qemu | qemu-img compare | load (1 min) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for case in CASES.iter().filter(|c| selected(only, c.name)) {
        let src = corpus.dir.join(case.src);
        // Equal durability (see the notes in RESULTS.md): vconvert's default (O_DIRECT,
        // synced before the rename) against qemu-img `-t none -W -m 16` (O_DIRECT, flushed
        // at the end); `vconvert -t unsafe` against qemu-img's default cache mode (never
        // flushes) with `-W -m 16`. Compressed writes: against qemu-img's fastest flags
        // and its defaults.
        let compressed_write =
            case.args.contains(&"-c") || case.args.iter().any(|a| a.contains("streamOptimized"));
        let tools: Vec<(&str, Vec<&str>)> = if compressed_write {
            vec![
                ("vconvert", vec![]),
                ("qemu-fast", vec!["-W", "-m", "16"]),
                ("qemu-default", vec![]),
            ]
        } else {
            vec![
                ("vconvert", vec![]),
                ("qemu-direct", vec!["-t", "none", "-W", "-m", "16"]),
                ("vconvert-unsafe", vec!["-t", "unsafe"]),
                ("qemu-fast", vec!["-W", "-m", "16"]),
            ]
        };
        let load_before = loadavg();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); tools.len()];
        let mut rss: Vec<Option<u64>> = vec![None; tools.len()];
        let mut failed = vec![false; tools.len()];
        // Round 0 (uncompressed output only) is a warm-up, not counted: each tool's
        // first timed run then replaces an output of its own, as every later one does.
        // Without it the first round of a case wrote into memory the VM had given back
        // to its host (free page reporting) and paid the host's page faults: raw ->
        // qcow2 `-t unsafe` took 1.8-1.9 s when its page cache came from there, 0.19 s
        // from freshly freed pages.
        let first = usize::from(compressed_write);
        for round in first..=rounds {
            // Every other round runs the tools in the opposite order, so no tool
            // always runs in the slot after the same other run (which left the page
            // cache and the disk in the same state each time).
            let mut order: Vec<usize> = (0..tools.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (tool, extra) = &tools[i];
                let out = out_dir.join(format!("{tool}.{}", case.out_fmt));
                let _ = std::fs::remove_file(&out);
                let prog = if tool.starts_with("vconvert") {
                    vconvert.as_str()
                } else {
                    "qemu-img"
                };
                match timed(&src, &convert_cmd(prog, extra, case, &src, &out)) {
                    Some(_) if round == 0 => {}
                    Some((t, r)) => {
                        times[i].push(t);
                        rss[i] = rss[i].max(r);
                    }
                    None => failed[i] = true,
                }
            }
        }
        let load = format!("{load_before}–{}", loadavg());
        let ours = out_dir.join(format!("vconvert.{}", case.out_fmt));
        let theirs = out_dir.join(format!("qemu-fast.{}", case.out_fmt));
        let same = !failed[0]
            && run_ok(
                Command::new("qemu-img")
                    .args(["compare", "-f", case.src_fmt, "-F", case.out_fmt])
                    .arg(&src)
                    .arg(&ours),
            );
        let fmt_t = |i: usize| {
            if failed[i] {
                "failed".to_string()
            } else {
                spread(&times[i])
            }
        };
        // Speed-up of `ours` over `theirs`: medians, and the worst round (each round
        // runs both, one after the other).
        let speedup = |ours: usize, theirs: usize| -> (String, String) {
            if failed[ours] || failed[theirs] {
                return ("—".into(), "—".into());
            }
            let med = median(&mut times[theirs].clone()) / median(&mut times[ours].clone());
            let worst = times[ours]
                .iter()
                .zip(&times[theirs])
                .map(|(o, t)| t / o)
                .fold(f64::INFINITY, f64::min);
            (format!("{med:.2}×"), format!("{worst:.2}×"))
        };
        let mib = |r: Option<u64>| r.map_or("—".into(), |k| format!("{}", k / 1024));
        let fast = tools.iter().position(|t| t.0 == "qemu-fast").unwrap_or(1);
        let size = if failed[0] || failed[fast] {
            "—".into()
        } else {
            format!(
                "{:.3}",
                allocated(&ours) as f64 / allocated(&theirs).max(1) as f64
            )
        };
        let verdict = if same {
            "identical"
        } else if failed[0] {
            "—"
        } else {
            "DIFFERS"
        };
        let row = if compressed_write {
            let (m1, w1) = speedup(0, 1);
            let (m2, _) = speedup(0, 2);
            format!(
                "| {} | {} | {} | {m1} | {w1} | {} | {m2} | {} | {} | {size} | {verdict} | {load} |\n",
                case.name,
                fmt_t(0),
                fmt_t(1),
                fmt_t(2),
                mib(rss[0]),
                mib(rss[1]),
            )
        } else {
            let floor = if case.cp_floor {
                let raw = corpus.dir.join("disk.raw");
                let dst = out_dir.join("cp.raw");
                let mut t = Vec::new();
                for _ in 0..rounds {
                    let _ = std::fs::remove_file(&dst);
                    let cmd: Vec<String> = vec![
                        "cp".into(),
                        "--sparse=always".into(),
                        raw.display().to_string(),
                        dst.display().to_string(),
                    ];
                    if let Some((s, _)) = timed(&raw, &cmd) {
                        t.push(s);
                    }
                }
                format!("{:.2}", median(&mut t))
            } else {
                "—".into()
            };
            let (fm, fw) = speedup(0, 1);
            let (um, uw) = speedup(2, 3);
            format!(
                "| {} | {} | {} | {fm} | {fw} | {} | {} | {um} | {uw} | {floor} | {} | {} | {size} | {verdict} | {load} |\n",
                case.name,
                fmt_t(0),
                fmt_t(1),
                fmt_t(2),
                fmt_t(3),
                mib(rss[0].max(rss[2])),
                mib(rss[1].max(rss[3])),
            )
        };
        eprint!("{row}");
        if compressed_write {
            compressed.push_str(&row);
        } else {
            flushed.push_str(&row);
        }
    }
    // Scaling of compressed work with the thread count.
    let mut scaling =
        String::from("| case | threads | vconvert s | speed-up vs -m 1 |\n|---|---|---|---|\n");
    for case in CASES.iter().filter(|c| {
        (c.args.contains(&"-c") || c.args.iter().any(|a| a.contains("stream")))
            && selected(only, "scaling")
    }) {
        let src = corpus.dir.join(case.src);
        let mut base = f64::NAN;
        let mut threads = vec![1usize];
        let mut t = 2;
        while t <= cores {
            threads.push(t);
            t *= 2;
        }
        if *threads.last().unwrap_or(&1) != cores {
            threads.push(cores);
        }
        for &n in &threads {
            let out = out_dir.join(format!("scale.{}", case.out_fmt));
            let nstr = n.to_string();
            let mut v = Vec::new();
            for _ in 0..rounds {
                let _ = std::fs::remove_file(&out);
                if let Some((s, _)) = timed(
                    &src,
                    &convert_cmd(&vconvert, &["-m", &nstr], case, &src, &out),
                ) {
                    v.push(s);
                }
            }
            let med = median(&mut v);
            if n == 1 {
                base = med;
            }
            let row = format!(
                "| {} | {n} | {:.2} | {:.2}× |\n",
                case.name,
                med,
                base / med
            );
            eprint!("{row}");
            scaling.push_str(&row);
        }
    }
    let imports = if selected(only, "vimport") {
        match crate::bench_import::bench_imports(root, &corpus.dir, &out_dir, rounds) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("vimport cases: {e}");
                format!("not run: {e}\n")
            }
        }
    } else {
        "not run (`--only` left them out)\n".into()
    };
    let concurrent = if selected(only, "vimport-concurrent") {
        match crate::bench_import::bench_concurrent(root, &corpus.dir, &out_dir, rounds) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("vimport concurrency case: {e}");
                format!("not run: {e}\n")
            }
        }
    } else {
        "not run (`--only` left it out)\n".into()
    };
    let rbd = match ceph_conf {
        Some(conf) if selected(only, "rbd") => {
            match crate::bench_import::bench_rbd(root, &corpus.dir, &out_dir, conf, rounds) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("RBD cases: {e}");
                    format!("not run: {e}\n")
                }
            }
        }
        Some(_) => "not run (`--only` left them out)\n".into(),
        None => "not run (no `--ceph-conf`)\n".into(),
    };
    let _ = std::fs::remove_dir_all(&out_dir);
    let only_note = if only.is_empty() {
        String::new()
    } else {
        format!(" --only {}", only.join(","))
    };
    let results = format!(
        "# Benchmark results\n\nWritten by `cargo xtask bench{}{only_note} --rounds {rounds}` ({rounds} rounds; in each round every tool runs once, one after the other, in the opposite order every other round; \
times are median (min–max); before every timed run the source is read into the page cache and `sync` flushes the previous run's writes, neither timed; \
for uncompressed output an uncounted warm-up round comes first, since this VM gives freed memory back to its host (free page reporting) and a run whose page cache comes from there pays the host's page faults: \
raw → qcow2 `-t unsafe` took 1.8–1.9 s that way, 0.19 s writing into pages freed just before, as a tool's later rounds do when they replace its previous output). \
Speed-up = qemu-img time / vconvert time (above 1: vconvert is faster): of the medians, and the worst round (the smallest ratio of the two tools' times within one round). \
Size = allocated bytes of vconvert's output / qemu-img's. RSS = peak resident set size (`/usr/bin/time`). \
Load = the 1-minute load average before and after the case: **this machine is shared** (other jobs run on its 2 cores during the bench), so figures swing from run to run; compare tools within a row, never rows of different runs.\n\n\
Conversions whose output is uncompressed are compared **at equal durability**, both ways: \
*flushed*, vconvert's default (data written with O_DIRECT, synced before the rename into place) against `qemu-img convert -t none -W -m 16` (O_DIRECT, flushed at the end); \
*unflushed*, `vconvert -t unsafe` against qemu-img's default cache mode (`unsafe`: never flushes) with `-W -m 16`. \
Compressed writes (`-c`, streamOptimized) are compared with qemu-img's fastest flags and its defaults, default cache mode.\n\n## Machine\n\n{}\n## Corpus\n\n{kind}; qcow2, compressed qcow2, streamOptimized VMDK, VHD, VDI and VHDX forms made by qemu-img.\n\n## Conversions with uncompressed output, at equal durability\n\n{flushed}\n## Compressed writes\n\n{compressed}\n## Scaling of compressed work\n\n{scaling}\n## vimport: upload and import end to end\n\n{imports}\n## vimport: two imports at once\n\n{concurrent}\n## vimport into Ceph RBD\n\n{rbd}",
        if quick { " --quick" } else { "" },
        machine()
    );
    // A partial run (`--only`) never replaces the full run's RESULTS.md.
    let path = if quick {
        root.join("benches/RESULTS-quick.md")
    } else if !only.is_empty() {
        let words: String = only
            .join("-")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        root.join(format!("benches/RESULTS-only-{words}.md"))
    } else {
        root.join("benches/RESULTS.md")
    };
    if std::fs::write(&path, results).is_err() {
        return false;
    }
    eprintln!("wrote {}", path.display());
    true
}
