//! The vimport cases of `cargo xtask bench`: an upload staged over loopback, then
//! imported to raw until the image is `active`, against what Glance's import does with
//! the same upload (its image conversion plugin's `qemu-img convert -f FMT -O raw`,
//! then the store's copy of the converted file with MD5 and SHA-512 computed as it is
//! copied, as glance_store's filesystem driver does).
//!
//! vimport runs as a real process on loopback with its default configuration
//! (`output_format` raw, files under a data directory beside the corpus); the client
//! is a minimal HTTP/1.1 one over `TcpStream` (the upload is sent with `sendfile`), so
//! polling costs next to nothing. Phases come from the task's message, polled every
//! 10 ms: "inspecting the upload", then "converting …", then "computing checksums",
//! then "storing the image", then the task's `success`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{loadavg, median, run_ok, spread, timed};

const TOKEN: &str = "bench-token";

/// The uploads: corpus file, Glance `disk_format`, qemu-img format.
const UPLOADS: [(&str, &str, &str); 4] = [
    ("disk.qcow2", "qcow2", "qcow2"),
    ("disk-c.qcow2", "qcow2", "qcow2"),
    ("disk-stream.vmdk", "vmdk", "vmdk"),
    ("disk.vhd", "vhd", "vpc"),
];

/// A request body.
enum Body<'a> {
    None,
    Json(&'a str),
    File(&'a Path),
}

/// One HTTP/1.1 exchange with vimport at `addr` (`Connection: close`).
fn http(addr: &str, method: &str, path: &str, body: Body<'_>) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let (ctype, len) = match &body {
        Body::None => ("application/json", 0),
        Body::Json(j) => ("application/json", j.len() as u64),
        Body::File(p) => (
            "application/octet-stream",
            std::fs::metadata(p).map_err(|e| e.to_string())?.len(),
        ),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {TOKEN}\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    let io = |e: std::io::Error| format!("{method} {path}: {e}");
    s.write_all(head.as_bytes()).map_err(io)?;
    match body {
        Body::None => {}
        Body::Json(j) => s.write_all(j.as_bytes()).map_err(io)?,
        Body::File(p) => {
            let mut f = std::fs::File::open(p).map_err(io)?;
            std::io::copy(&mut f, &mut s).map_err(io)?;
        }
    }
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(io)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no status line"))?;
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The body of a chunked response.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The string value of the first `"key"` in `json` (enough for these answers).
fn field(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    None
}

/// The vimport binary measured: `BENCH_VIMPORT_BIN` (another build, e.g. an older
/// one, to compare), else this workspace's release build.
fn vimport_bin(root: &Path) -> PathBuf {
    std::env::var_os("BENCH_VIMPORT_BIN")
        .map_or_else(|| root.join("target/release/vimport"), PathBuf::from)
}

/// vimport, started on loopback; killed on drop.
struct Service {
    child: Child,
    addr: String,
}

impl Service {
    fn start(bin: &Path, data: &Path, env: &[(&str, &str)]) -> Result<Service, String> {
        let _ = std::fs::remove_dir_all(data);
        std::fs::create_dir_all(data).map_err(|e| e.to_string())?;
        let out = data.with_extension("stdout");
        let mut child = Command::new(bin)
            .envs(env.iter().copied())
            .env("VIMPORT_DATA_DIR", data)
            .env("VIMPORT_LISTEN", "127.0.0.1:0")
            .env("VIMPORT_TOKEN", TOKEN)
            .env("VIMPORT_WORKSPACE_BYTES", "64G")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
            .stderr(std::fs::File::create(data.with_extension("log")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if let Some(at) = text.find("listening on http://") {
                let addr = text[at + "listening on http://".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                return Ok(Service { child, addr });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("vimport exited at start ({status})"));
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return Err("vimport did not start in 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One upload staged and imported: seconds of each phase, and the stored MD5.
struct Import {
    stage: f64,
    inspect: f64,
    convert: f64,
    /// From "computing checksums" (the output checked) until "storing the image".
    hash_tail: f64,
    /// The record and the move into the store, until `success`.
    store: f64,
    total: f64,
    checksum: String,
}

/// Creates an image and stages `file` into it (`warm`: the file read into the page
/// cache first, not timed). Returns the image id and the staging seconds.
fn create_staged(
    a: &str,
    file: &Path,
    disk_format: &str,
    warm: bool,
) -> Result<(String, f64), String> {
    let body =
        format!(r#"{{"name":"bench","disk_format":"{disk_format}","container_format":"bare"}}"#);
    let (s, b) = http(a, "POST", "/v2/images", Body::Json(&body))?;
    let id = field(&b, "id")
        .filter(|_| s == 201)
        .ok_or(format!("create: {s} {b}"))?;
    if warm {
        crate::bench::warm_and_sync(file);
    }
    let t = Instant::now();
    let (s, b) = http(
        a,
        "PUT",
        &format!("/v2/images/{id}/stage"),
        Body::File(file),
    )?;
    let stage = t.elapsed().as_secs_f64();
    if !(200..300).contains(&s) {
        return Err(format!("stage: {s} {b}"));
    }
    Ok((id, stage))
}

/// Requests the `glance-direct` import of staged image `id`.
fn start_import(a: &str, id: &str) -> Result<(), String> {
    let (s, b) = http(
        a,
        "POST",
        &format!("/v2/images/{id}/import"),
        Body::Json(r#"{"method":{"name":"glance-direct"}}"#),
    )?;
    if s != 202 {
        return Err(format!("import: {s} {b}"));
    }
    Ok(())
}

/// [`create_staged`], then the import started once the upload is synced. Returns the
/// image id, the staging seconds and the instant the import was requested.
fn create_stage_import(
    a: &str,
    file: &Path,
    disk_format: &str,
    warm: bool,
) -> Result<(String, f64, Instant), String> {
    let (id, stage) = create_staged(a, file, disk_format, warm)?;
    let _ = Command::new("sync").status();
    let t = Instant::now();
    start_import(a, &id)?;
    Ok((id, stage, t))
}

/// Polls image `id`'s import task every 10 ms until it succeeds (seconds since `t`,
/// and the image's JSON, checked `active`), fails, or runs past `limit` seconds;
/// `each` sees every poll's time and task message.
fn wait_active(
    a: &str,
    id: &str,
    t: Instant,
    limit: f64,
    mut each: impl FnMut(f64, &str),
) -> Result<(f64, String), String> {
    let total = loop {
        let (_, b) = http(a, "GET", &format!("/v2/images/{id}/tasks"), Body::None)?;
        let now = t.elapsed().as_secs_f64();
        let message = field(&b, "message").unwrap_or_default();
        each(now, &message);
        match field(&b, "status").as_deref() {
            Some("success") => break now,
            Some("failure") => return Err(format!("import failed: {message}")),
            _ => {}
        }
        if now > limit {
            return Err(format!("import not done in {limit:.0} s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (_, img) = http(a, "GET", &format!("/v2/images/{id}"), Body::None)?;
    if field(&img, "status").as_deref() != Some("active") {
        return Err(format!("image not active after its task succeeded: {img}"));
    }
    Ok((total, img))
}

fn import_once(svc: &Service, file: &Path, disk_format: &str) -> Result<Import, String> {
    let a = svc.addr.as_str();
    let (id, stage, t) = create_stage_import(a, file, disk_format, true)?;
    let (mut converting, mut hashing, mut storing) = (None, None, None);
    let (total, img) = wait_active(a, &id, t, 600.0, |now, message| {
        if converting.is_none() && message.starts_with("converting") {
            converting = Some(now);
        }
        if hashing.is_none() && message.starts_with("computing checksums") {
            hashing = Some(now);
        }
        if storing.is_none() && message.starts_with("storing") {
            storing = Some(now);
        }
    })?;
    let checksum = field(&img, "checksum").unwrap_or_default();
    let _ = http(a, "DELETE", &format!("/v2/images/{id}"), Body::None);
    // A phase shorter than a poll may be missed: it then counts as none.
    let converting = converting.unwrap_or(0.0);
    let storing = storing.unwrap_or(total);
    let hashing = hashing.unwrap_or(storing);
    Ok(Import {
        stage,
        inspect: converting,
        convert: hashing - converting,
        hash_tail: storing - hashing,
        store: total - storing,
        total,
        checksum,
    })
}

/// Glance's copy into its filesystem store: the converted file read and written in
/// 64 KiB chunks (glance_store's `WRITE_CHUNKSIZE`), MD5 and the SHA-512 `os_hash`
/// updated with each chunk (hashlib). Prints the MD5.
const GLANCE_STORE_COPY: &str = r#"
import hashlib, sys
md5, sha = hashlib.md5(), hashlib.sha512()
with open(sys.argv[1], 'rb') as src, open(sys.argv[2], 'wb') as dst:
    while True:
        buf = src.read(65536)
        if not buf:
            break
        md5.update(buf)
        sha.update(buf)
        dst.write(buf)
print(md5.hexdigest())
"#;

/// The hashing glance_store's drivers do while writing an image: MD5 and the SHA-512
/// `os_hash` over 64 KiB chunks (hashlib), without the write. Prints the MD5.
const GLANCE_HASH: &str = r#"
import hashlib, sys
md5, sha = hashlib.md5(), hashlib.sha512()
with open(sys.argv[1], 'rb') as src:
    while True:
        buf = src.read(65536)
        if not buf:
            break
        md5.update(buf)
        sha.update(buf)
print(md5.hexdigest())
"#;

/// Glance's path for `file`: seconds of `qemu-img convert`, of the store copy, and the
/// MD5 it computed.
fn glance_once(file: &Path, qemu_fmt: &str, dir: &Path) -> Result<(f64, f64, String), String> {
    let converted = dir.join("glance.converted");
    let stored = dir.join("glance.stored");
    let _ = std::fs::remove_file(&converted);
    let _ = std::fs::remove_file(&stored);
    let cmd: Vec<String> = ["qemu-img", "convert", "-f", qemu_fmt, "-O", "raw"]
        .iter()
        .map(|s| s.to_string())
        .chain([file.display().to_string(), converted.display().to_string()])
        .collect();
    let (convert, _) = timed(file, &cmd).ok_or("qemu-img convert failed")?;
    let t = Instant::now();
    let out = Command::new("python3")
        .args(["-c", GLANCE_STORE_COPY])
        .arg(&converted)
        .arg(&stored)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let copy = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err("the store copy failed".into());
    }
    let _ = std::fs::remove_file(&converted);
    let _ = std::fs::remove_file(&stored);
    Ok((
        convert,
        copy,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// The disk's write bandwidth for `file`'s size: `dd … conv=fsync` into `dir`, as a
/// staged upload is written and synced.
fn disk_baseline(file: &Path, dir: &Path) -> Option<f64> {
    let dst = dir.join("baseline.dd");
    let cmd: Vec<String> = vec![
        "dd".into(),
        format!("if={}", file.display()),
        format!("of={}", dst.display()),
        "bs=4M".into(),
        "conv=fsync".into(),
        "status=none".into(),
    ];
    let r = timed(file, &cmd).map(|(s, _)| s);
    let _ = std::fs::remove_file(&dst);
    r
}

/// The loopback + disk bandwidth for `file`'s size: the plainest receiver of an upload,
/// timed as staging is (from the connection until the file is synced). The file is
/// sent over a loopback TCP connection as the bench's client sends an upload
/// (`sendfile`); a thread reads it in 4 MiB `read`s, `write`s each into a new file in
/// `dir` through the page cache and syncs it at the end. No HTTP, no checks.
fn loopback_baseline(file: &Path, dir: &Path) -> Option<f64> {
    let dst = dir.join("baseline.tcp");
    crate::bench::warm_and_sync(file);
    let listener = TcpListener::bind("127.0.0.1:0").ok()?;
    let addr = listener.local_addr().ok()?;
    let receiver = {
        let dst = dst.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let (mut conn, _) = listener.accept()?;
            let mut out = std::fs::File::create(&dst)?;
            let mut buf = vec![0u8; 4 << 20];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
            out.sync_all()
        })
    };
    let t = Instant::now();
    let sent = (|| -> std::io::Result<()> {
        let mut conn = TcpStream::connect(addr)?;
        std::io::copy(&mut std::fs::File::open(file)?, &mut conn)?;
        conn.shutdown(std::net::Shutdown::Write)
    })();
    let received = receiver.join().ok().and_then(|r| r.ok());
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&dst);
    (sent.is_ok() && received.is_some()).then_some(secs)
}

/// Runs the vimport cases; returns their Markdown section.
pub fn bench_imports(
    root: &Path,
    corpus: &Path,
    out_dir: &Path,
    rounds: usize,
) -> Result<String, String> {
    let bin = vimport_bin(root);
    let data: PathBuf = out_dir.join("vimport");
    std::fs::create_dir_all(out_dir).map_err(|e| e.to_string())?;
    if !run_ok(Command::new("python3").args(["-c", "import hashlib"])) {
        return Err("python3 is needed for Glance's store copy".into());
    }
    let svc = Service::start(&bin, &data, &[])?;
    let mut table = String::from(
        "| upload | MiB | stage s | stage MB/s | disk (dd conv=fsync) MB/s | stage / disk | loopback + disk MB/s | stage / loopback + disk | inspect s | convert + check (hashing overlapped) s | hash tail s | store s | vimport import → active s | Glance: qemu-img convert s | Glance: store copy + MD5 + SHA-512 s | Glance path s | vimport / Glance median | worst round | MD5 equal | load (1 min) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, disk_format, qemu_fmt) in UPLOADS {
        let file = corpus.join(name);
        if !file.exists() {
            continue;
        }
        let mib = std::fs::metadata(&file).map_or(0, |m| m.len()) as f64 / (1 << 20) as f64;
        let load_before = loadavg();
        let mut runs: Vec<Import> = Vec::new();
        let mut glance: Vec<(f64, f64)> = Vec::new();
        let mut disk: Vec<f64> = Vec::new();
        let mut wire: Vec<f64> = Vec::new();
        let mut same = true;
        // Round 0 is a warm-up of all three, not counted (this VM's free page
        // reporting: see the conversions' warm-up in `bench`).
        for round in 0..=rounds {
            let run = import_once(&svc, &file, disk_format)?;
            let (c, s, md5) = glance_once(&file, qemu_fmt, out_dir)?;
            let d = disk_baseline(&file, out_dir);
            let w = loopback_baseline(&file, out_dir);
            if round == 0 {
                continue;
            }
            same &= md5 == run.checksum;
            runs.push(run);
            glance.push((c, s));
            disk.extend(d);
            wire.extend(w);
        }
        let col = |f: &dyn Fn(&Import) -> f64| {
            let v: Vec<f64> = runs.iter().map(f).collect();
            spread(&v)
        };
        let med = |f: &dyn Fn(&Import) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            median(&mut v)
        };
        let stage_mbs = mib * 1.048576 / med(&|r| r.stage);
        let disk_mbs = mib * 1.048576 / median(&mut disk.clone());
        let wire_mbs = mib * 1.048576 / median(&mut wire.clone());
        let glance_total: Vec<f64> = glance.iter().map(|(c, s)| c + s).collect();
        let ratio = med(&|r| r.total) / median(&mut glance_total.clone());
        let worst = runs
            .iter()
            .zip(&glance_total)
            .map(|(r, g)| r.total / g)
            .fold(0.0, f64::max);
        let row = format!(
            "| {name} ({disk_format}) | {mib:.0} | {} | {stage_mbs:.0} | {disk_mbs:.0} | {:.0} % | {wire_mbs:.0} | {:.0} % | {} | {} | {} | {} | {} | {} | {} | {} | {ratio:.2}× | {worst:.2}× | {} | {load_before}–{} |\n",
            col(&|r| r.stage),
            100.0 * stage_mbs / disk_mbs,
            100.0 * stage_mbs / wire_mbs,
            col(&|r| r.inspect),
            col(&|r| r.convert),
            col(&|r| r.hash_tail),
            col(&|r| r.store),
            col(&|r| r.total),
            spread(&glance.iter().map(|g| g.0).collect::<Vec<_>>()),
            spread(&glance.iter().map(|g| g.1).collect::<Vec<_>>()),
            spread(&glance_total),
            if same { "yes" } else { "NO" },
            loadavg(),
        );
        eprint!("{row}");
        table.push_str(&row);
    }
    drop(svc);
    let _ = std::fs::remove_dir_all(&data);
    Ok(format!(
        "Each upload, {rounds} rounds: vimport (default configuration, one import at a time) stages it over loopback (`PUT /v2/images/{{id}}/stage`, synced before the answer) and imports it (`glance-direct`) to raw; \
phases from the task's message polled every 10 ms (inspect: until \"converting\"; convert: until \"computing checksums\", with MD5 and SHA-512 (OpenSSL's) computed as the output is written, and the check of the output; hash tail: the rest of the hashing, until \"storing the image\"; store: the record and the move into the store, until the task's success). \
The first round of each upload is a warm-up, not counted (as for the conversions above). \
vimport's conversion is durable (O_DIRECT, synced before it is stored). \
The Glance path is what Glance's import does after staging: its conversion plugin's `qemu-img convert -f FMT -O raw` (default cache mode, never flushed), then glance_store's filesystem copy of the result with MD5 and SHA-512 (Python hashlib) in 64 KiB chunks (not flushed either). \
\"vimport / Glance\" = import → active over that path (goal ≤ 0.5×; the worst round is the largest ratio); \"MD5 equal\": vimport's `checksum` is the MD5 Glance's path computed. \
The disk column is `dd conv=fsync` of the upload into the same filesystem (staging writes and syncs the upload too). \
The loopback + disk column is the plainest receiver of the same upload over loopback TCP: the file sent as the upload is (`sendfile`), read in 4 MiB `read`s, written through the page cache and synced, timed from the connection to the sync (no HTTP); the goal is staging at ≥ 90 % of it.\n\n{table}"
    ))
}

/// The uploads of the concurrency case: corpus file, Glance `disk_format`.
const CONCURRENT_UPLOADS: [(&str, &str); 2] = [("disk.qcow2", "qcow2"), ("disk-c.qcow2", "qcow2")];

/// Stages `file` as a new image; its id.
fn staged(svc: &Service, file: &Path, disk_format: &str) -> Result<String, String> {
    create_staged(svc.addr.as_str(), file, disk_format, false).map(|(id, _)| id)
}

/// Imports the staged images `ids` at once (`glance-direct`); seconds from the first
/// request until every one is `active`. The images are deleted afterwards.
fn import_all(svc: &Service, ids: &[String]) -> Result<f64, String> {
    let a = svc.addr.as_str();
    let _ = Command::new("sync").status();
    let t = Instant::now();
    for id in ids {
        start_import(a, id)?;
    }
    let mut left: Vec<&String> = ids.iter().collect();
    while !left.is_empty() {
        let mut still = Vec::new();
        for id in left {
            let (_, b) = http(a, "GET", &format!("/v2/images/{id}"), Body::None)?;
            match field(&b, "status").as_deref() {
                Some("active") => {}
                Some("importing" | "uploading") => still.push(id),
                other => return Err(format!("image {id} ended {other:?}: {b}")),
            }
        }
        left = still;
        if t.elapsed() > Duration::from_secs(600) {
            return Err("imports not done in 10 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let total = t.elapsed().as_secs_f64();
    for id in ids {
        let _ = http(a, "DELETE", &format!("/v2/images/{id}"), Body::None);
    }
    Ok(total)
}

/// Two imports at once against one: vimport's running conversions borrow their
/// threads from one budget (`convert_threads`, default every core). Each round runs
/// one import alone and two at once, in alternating order; returns the Markdown
/// section.
pub fn bench_concurrent(
    root: &Path,
    corpus: &Path,
    out_dir: &Path,
    rounds: usize,
) -> Result<String, String> {
    let bin = vimport_bin(root);
    let data: PathBuf = out_dir.join("vimport-concurrent");
    std::fs::create_dir_all(out_dir).map_err(|e| e.to_string())?;
    let svc = Service::start(&bin, &data, &[])?;
    let mut table = String::from(
        "| upload | MiB | one import s | two at once s | two / one median | worst round | load (1 min) |\n|---|---|---|---|---|---|---|\n",
    );
    for (name, disk_format) in CONCURRENT_UPLOADS {
        let file = corpus.join(name);
        if !file.exists() {
            continue;
        }
        let mib = std::fs::metadata(&file).map_or(0, |m| m.len()) as f64 / (1 << 20) as f64;
        let load_before = loadavg();
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            crate::bench::warm_and_sync(&file);
            let single = vec![staged(&svc, &file, disk_format)?];
            let pair = vec![
                staged(&svc, &file, disk_format)?,
                staged(&svc, &file, disk_format)?,
            ];
            if round % 2 == 0 {
                one.push(import_all(&svc, &single)?);
                two.push(import_all(&svc, &pair)?);
            } else {
                two.push(import_all(&svc, &pair)?);
                one.push(import_all(&svc, &single)?);
            }
        }
        let ratio = median(&mut two.clone()) / median(&mut one.clone());
        let worst = one.iter().zip(&two).map(|(o, t)| t / o).fold(0.0, f64::max);
        let row = format!(
            "| {name} ({disk_format}) | {mib:.0} | {} | {} | {ratio:.2}× | {worst:.2}× | {load_before}–{} |\n",
            spread(&one),
            spread(&two),
            loadavg(),
        );
        eprint!("{row}");
        table.push_str(&row);
    }
    drop(svc);
    let _ = std::fs::remove_dir_all(&data);
    Ok(format!(
        "Each upload, {rounds} rounds: vimport (default configuration: `max_workers` 2, `convert_threads` every core, shared by the running conversions) imports one staged copy to raw alone, and two staged copies at once (in alternating order from round to round); \
seconds from the first import request until every image is `active` (staging not timed). \
\"two / one\" = the two imports' time over the one's (2.00×: no gain from running them together; the worst round is the largest ratio).\n\n{table}"
    ))
}

/// Allocated bytes of the files under `dir` (recursively).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// `rbd ARGS` (or `ceph ARGS`) against the cluster of `conf`; its stdout.
fn ceph_tool(tool: &str, conf: &Path, args: &[&str]) -> Result<String, String> {
    let o = Command::new(tool)
        .arg("--conf")
        .arg(conf)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Bytes RBD image `spec` (pool/name) holds in the pool: the sum of `rbd du`'s used
/// sizes of the image and its snapshots (vimport's data is in its snapshot `snap`).
fn rbd_used(conf: &Path, spec: &str) -> Result<u64, String> {
    let out = ceph_tool("rbd", conf, &["du", spec, "--format", "json"])?;
    let key = "\"used_size\"";
    let mut sum = None;
    for part in out.split(key).skip(1) {
        let n: u64 = part
            .trim_start_matches([':', ' '])
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("rbd du {spec}: {out}"))?;
        sum = Some(sum.unwrap_or(0) + n);
    }
    sum.ok_or_else(|| format!("rbd du {spec}: {out}"))
}

/// One import into RBD: seconds from import start to `active`, the peak allocated
/// bytes of vimport's workspace (the staged upload included), the bytes the image
/// holds in the pool, and its MD5.
fn rbd_import_once(
    svc: &Service,
    file: &Path,
    workspace: &Path,
    conf: &Path,
    pool: &str,
) -> Result<(f64, u64, u64, String), String> {
    let a = svc.addr.as_str();
    let (id, _, t) = create_stage_import(a, file, "qcow2", false)?;
    let mut peak = allocated(workspace);
    let (total, img) = wait_active(a, &id, t, 1200.0, |_, _| {
        peak = peak.max(allocated(workspace));
    })?;
    let used = rbd_used(conf, &format!("{pool}/{id}"))?;
    let checksum = field(&img, "checksum").unwrap_or_default();
    let _ = http(a, "DELETE", &format!("/v2/images/{id}"), Body::None);
    Ok((total, peak, used, checksum))
}

/// Glance's path into RBD for `file`: `qemu-img convert -O raw` to a local file, then
/// `rbd import` of it. Seconds of each and of the MD5 + SHA-512 pass glance_store
/// makes over what it writes, the converted file's allocated bytes (its workspace,
/// beside the staged upload), the bytes in the pool, and the MD5 of the converted file.
fn glance_rbd_once(
    file: &Path,
    dir: &Path,
    conf: &Path,
    pool: &str,
) -> Result<(f64, f64, f64, u64, u64, String), String> {
    use std::os::unix::fs::MetadataExt;
    let converted = dir.join("glance-rbd.converted");
    let _ = std::fs::remove_file(&converted);
    let cmd: Vec<String> = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw"]
        .iter()
        .map(|s| s.to_string())
        .chain([file.display().to_string(), converted.display().to_string()])
        .collect();
    let (convert, _) = timed(file, &cmd).ok_or("qemu-img convert failed")?;
    let workspace = std::fs::metadata(&converted)
        .map_err(|e| e.to_string())?
        .blocks()
        * 512;
    let spec = format!("{pool}/glance-bench");
    let _ = ceph_tool("rbd", conf, &["rm", "--no-progress", &spec]);
    let t = Instant::now();
    ceph_tool(
        "rbd",
        conf,
        &[
            "import",
            "--no-progress",
            converted.to_str().ok_or("path")?,
            &spec,
        ],
    )?;
    let import = t.elapsed().as_secs_f64();
    let used = rbd_used(conf, &spec)?;
    let _ = ceph_tool("rbd", conf, &["rm", "--no-progress", &spec]);
    // glance_store's RBD driver updates MD5 and the SHA-512 `os_hash` with every chunk
    // it writes: the same hashlib pass over the converted file, timed on its own.
    let t = Instant::now();
    let out = Command::new("python3")
        .args(["-c", GLANCE_HASH])
        .arg(&converted)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let hashing = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err("hashing the converted file failed".into());
    }
    let md5 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let _ = std::fs::remove_file(&converted);
    Ok((convert, import, hashing, workspace, used, md5))
}

/// The RBD cases: the corpus qcow2 (plain and compressed) imported by vimport (store
/// `rbd`, built with the `rbd` feature) into a pool of its own on the cluster of
/// `conf`, against Glance's path (`qemu-img convert` to a local raw file, then `rbd
/// import`). Returns their Markdown section.
pub fn bench_rbd(
    root: &Path,
    corpus: &Path,
    out_dir: &Path,
    conf: &Path,
    rounds: usize,
) -> Result<String, String> {
    let bin = root.join("target/release/vimport");
    let data: PathBuf = out_dir.join("vimport-rbd");
    let pool = "vimport-bench";
    let rm_pool = || {
        let _ = ceph_tool(
            "ceph",
            conf,
            &[
                "osd",
                "pool",
                "rm",
                pool,
                pool,
                "--yes-i-really-really-mean-it",
            ],
        );
    };
    rm_pool();
    ceph_tool("ceph", conf, &["osd", "pool", "create", pool, "8", "8"])?;
    ceph_tool("rbd", conf, &["pool", "init", pool])?;
    let conf_s = conf.display().to_string();
    let result = (|| {
        let svc = Service::start(
            &bin,
            &data,
            &[
                ("VIMPORT_STORE", "rbd"),
                ("VIMPORT_RBD_POOL", pool),
                ("VIMPORT_CEPH_CONF", &conf_s),
            ],
        )?;
        let mut table = String::from(
            "| upload | MiB | vimport import → active s (hashes included) | vimport peak workspace MiB | vimport bytes in pool MiB | Glance: qemu-img convert s | Glance: rbd import s | Glance path s | Glance: MD5 + SHA-512 s | Glance path with hashing s | Glance peak workspace MiB | Glance bytes in pool MiB | vimport / Glance path | vimport / Glance path with hashing | MD5 equal |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        for name in ["disk.qcow2", "disk-c.qcow2"] {
            let file = corpus.join(name);
            if !file.exists() {
                continue;
            }
            let size = std::fs::metadata(&file).map_or(0, |m| m.len());
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let mut same = true;
            for _ in 0..rounds {
                let r = rbd_import_once(&svc, &file, &data.join("workspace"), conf, pool)?;
                let g = glance_rbd_once(&file, out_dir, conf, pool)?;
                same &= r.3 == g.5;
                ours.push(r);
                theirs.push(g);
            }
            // The upload itself is in both workspaces: vimport's staged upload is in
            // its peak; Glance's staging area holds it too.
            let total: Vec<f64> = theirs.iter().map(|g| g.0 + g.1).collect();
            let hashed: Vec<f64> = theirs.iter().map(|g| g.0 + g.1 + g.2).collect();
            let ours_med = median(&mut ours.iter().map(|r| r.0).collect::<Vec<_>>());
            let ratio = ours_med / median(&mut total.clone());
            let ratio_hashed = ours_med / median(&mut hashed.clone());
            let row = format!(
                "| {name} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {:.0} (+ {:.0} staged) | {:.0} | {ratio:.2}× | {ratio_hashed:.2}× | {} |\n",
                mib(size),
                spread(&ours.iter().map(|r| r.0).collect::<Vec<_>>()),
                mib(ours.iter().map(|r| r.1).max().unwrap_or(0)),
                mib(ours[0].2),
                spread(&theirs.iter().map(|g| g.0).collect::<Vec<_>>()),
                spread(&theirs.iter().map(|g| g.1).collect::<Vec<_>>()),
                spread(&total),
                spread(&theirs.iter().map(|g| g.2).collect::<Vec<_>>()),
                spread(&hashed),
                mib(theirs.iter().map(|g| g.3).max().unwrap_or(0)),
                mib(size),
                mib(theirs[0].4),
                if same { "yes" } else { "NO" },
            );
            eprint!("{row}");
            table.push_str(&row);
        }
        drop(svc);
        Ok::<String, String>(table)
    })();
    rm_pool();
    let _ = std::fs::remove_dir_all(&data);
    let table = result?;
    Ok(format!(
        "Each qcow2 upload, {rounds} rounds, into a pool of its own (`{pool}`) on the Ceph cluster of `--ceph-conf`: vimport (store `rbd`, built with the `rbd` feature) stages it and imports it (`glance-direct`), timed from the import request to the task's success; its peak workspace is the allocated bytes under its workspace (the staged upload included), sampled every 10 ms. \
The Glance path is its conversion plugin's `qemu-img convert -f qcow2 -O raw` to a local file, then the RBD driver's copy of it (`rbd import`, which skips zeroed blocks); its workspace is the converted file's allocated bytes beside the staged upload. \
vimport's time includes the MD5 and SHA-512 it computes over the raw image as it writes it (the image's `checksum` and `os_hash_value`); `rbd import` computes neither, while glance_store's RBD driver does both over every chunk it writes: the \"MD5 + SHA-512\" column times that pass (hashlib, 64 KiB chunks) over the converted file, and \"Glance path with hashing\" adds it. \
Bytes in pool = `rbd du` used size of the image. \"MD5 equal\": vimport's `checksum` is the MD5 of Glance's converted file.\n\n{table}"
    ))
}
