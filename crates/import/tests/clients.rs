//! The real OpenStack clients against the real `vimport`: `python-glanceclient`'s
//! `glance` CLI and `openstacksdk`, unchanged, from a Python venv, over loopback.
//!
//! Each test starts `vimport` on a free loopback port with a temporary data dir and
//! three tokens (an admin project and two ordinary ones), then drives one workflow of
//! Glance's Image API v2 through one client: create/stage/import, create-via-import in
//! one call, upload with `PUT /file`, `web-download` from a loopback HTTP server the
//! test runs, show/list with filters and paging, update and tags, tasks, download and
//! delete, and the failures (declared format that lies, hostile backing file, truncated
//! image) that must leave the image `queued` with a precise task message. Uploads are
//! qemu-img-made qcow2, streamOptimized vmdk, vhd and vdi; every stored image is
//! downloaded through the client and judged against its source by `qemu-img compare`.
//!
//! The venv comes from `VIMPORT_TEST_VENV` (set by `cargo xtask test`), else
//! `target/test-venv` if it exists. Without it the tests are reported skipped, unless
//! `VIMPORT_REQUIRE_CLIENTS=1` (CI), where they fail.
//!
//! `VIMPORT_CLIENTS_AGAINST=URL` points the same tests at another Image API (Glance
//! itself, for comparison) instead of starting vimport; the checks of vimport's own
//! files and of tenancy (three tokens) are then expected to fail.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vconvert_testkit::{qemu, Layout, Qemu};

/// The admin token and its project.
const ADMIN: &str = "tok-admin";
const ADMIN_PROJECT: &str = "p-admin";
/// Two ordinary projects.
const ALICE: &str = "tok-alice";
const ALICE_PROJECT: &str = "p-alice";
const BOB: &str = "tok-bob";
const BOB_PROJECT: &str = "p-bob";

/// How long an import of a few MiB may take on a loaded 2-core machine.
const IMPORT_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------
// The venv

/// The venv with the OpenStack clients, or `None` (test skipped).
///
/// # Panics
/// When it is missing and `VIMPORT_REQUIRE_CLIENTS=1`.
fn venv() -> Option<PathBuf> {
    let candidate = match std::env::var_os("VIMPORT_TEST_VENV") {
        Some(v) => PathBuf::from(v),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv"),
    };
    let usable = candidate.join("bin/glance").is_file() && candidate.join("bin/python3").is_file();
    if usable {
        return Some(candidate);
    }
    let why = format!(
        "no venv with the OpenStack clients at {} (make it with `cargo xtask test`, or \
         python3 -m venv DIR && DIR/bin/pip install python-glanceclient openstacksdk, \
         then VIMPORT_TEST_VENV=DIR)",
        candidate.display()
    );
    if std::env::var("VIMPORT_REQUIRE_CLIENTS").as_deref() == Ok("1") {
        panic!("the client tests are required (VIMPORT_REQUIRE_CLIENTS=1): {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Everything one test needs: qemu-img, the venv, a temp dir.
struct Env {
    q: Qemu,
    venv: PathBuf,
    dir: tempfile::TempDir,
}

fn env() -> Option<Env> {
    let q = qemu()?;
    let venv = venv()?;
    Some(Env {
        q,
        venv,
        dir: vconvert_testkit::tempdir(),
    })
}

// ---------------------------------------------------------------------------------
// vimport

/// A running `vimport`, stopped on drop.
struct Server {
    child: Option<Child>,
    url: String,
    data: PathBuf,
    agent: ureq::Agent,
}

impl Server {
    /// Starts vimport with its data under `dir`; `web_port` is the port `web-download`
    /// may fetch from (on 127.0.0.1).
    fn start(dir: &Path, web_port: Option<u16>) -> Server {
        let data = dir.join("vimport-data");
        if let Ok(url) = std::env::var("VIMPORT_CLIENTS_AGAINST") {
            // Another Image API (e.g. Glance itself, for comparison): nothing started.
            return Server {
                child: None,
                url,
                data,
                agent: ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(60))
                    .build(),
            };
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vimport"));
        cmd.env_clear()
            .env("VIMPORT_DATA_DIR", &data)
            .env("VIMPORT_LISTEN", "127.0.0.1:0")
            .env(
                "VIMPORT_TOKENS",
                format!(
                    "{ADMIN}:{ADMIN_PROJECT}:admin,{ALICE}:{ALICE_PROJECT},{BOB}:{BOB_PROJECT}"
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("vimport.log")).expect("vimport log"),
            ));
        if let Some(port) = web_port {
            cmd.env("VIMPORT_WEB_DOWNLOAD_ALLOWED_HOSTS", "127.0.0.1")
                .env("VIMPORT_WEB_DOWNLOAD_ALLOWED_PORTS", port.to_string());
        }
        let mut child = cmd.spawn().expect("start vimport");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read vimport's first line");
        let addr = line
            .trim()
            .strip_prefix("vimport listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "vimport's first line is {line:?}; log:\n{}",
                    std::fs::read_to_string(dir.join("vimport.log")).unwrap_or_default()
                )
            })
            .to_string();
        // Keep draining stdout so vimport never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Server {
            child: Some(child),
            url: if addr.starts_with("http") {
                addr
            } else {
                format!("http://{addr}")
            },
            data,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }

    /// A request as the clients send it (`X-Auth-Token`); status and JSON body.
    fn http(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.url))
            .set("X-Auth-Token", token);
        let res = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let mut text = String::new();
        resp.into_reader()
            .read_to_string(&mut text)
            .expect("response body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The image as the admin sees it over HTTP.
    fn image(&self, id: &str) -> Value {
        let (s, v) = self.http("GET", &format!("/v2/images/{id}"), ADMIN, None);
        assert_eq!(s, 200, "GET image {id}: {v}");
        v
    }

    /// The image's tasks over HTTP (`GET /v2/images/{id}/tasks`), newest first.
    fn image_tasks(&self, id: &str) -> Vec<Value> {
        let (s, v) = self.http("GET", &format!("/v2/images/{id}/tasks"), ADMIN, None);
        assert_eq!(s, 200, "GET /v2/images/{id}/tasks: {v}");
        v["tasks"].as_array().cloned().unwrap_or_default()
    }

    /// Polls image `id` until its import is over: `active`, or back to `queued` with
    /// every task finished. Returns the image.
    fn wait_settled(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let img = self.image(id);
            let status = img["status"].as_str().unwrap_or("").to_string();
            let locked = img.get("os_glance_import_task").is_some();
            let done = match status.as_str() {
                "active" | "killed" => true,
                "queued" if !locked => {
                    let tasks = self.image_tasks(id);
                    !tasks.is_empty()
                        && tasks
                            .iter()
                            .all(|t| matches!(t["status"].as_str(), Some("success" | "failure")))
                }
                _ => false,
            };
            if done {
                return img;
            }
            assert!(
                start.elapsed() < IMPORT_LIMIT,
                "image {id} still not settled after {IMPORT_LIMIT:?}: {img}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The newest task of image `id`.
    fn last_task(&self, id: &str) -> Value {
        let mut tasks = self.image_tasks(id);
        tasks.sort_by(|a, b| a["created_at"].as_str().cmp(&b["created_at"].as_str()));
        tasks
            .pop()
            .unwrap_or_else(|| panic!("image {id} has no task"))
    }

    /// Files in the store.
    fn stored_files(&self) -> Vec<PathBuf> {
        vconvert_testkit::dir_entries(&self.data.join("store"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_file_name("vimport.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------
// The glance CLI

/// What one `glance` run left.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "success={}\nstdout:\n{}\nstderr:\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// The `glance` CLI against one vimport.
struct Glance {
    bin: PathBuf,
    url: String,
    home: PathBuf,
}

impl Glance {
    fn new(env: &Env, srv: &Server) -> Glance {
        let home = env.dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        Glance {
            bin: env.venv.join("bin/glance"),
            url: srv.url.clone(),
            home,
        }
    }

    /// `glance --os-image-url URL --os-auth-token TOKEN ARGS` with standard input
    /// closed (glance reads a non-tty stdin as image data) and a private `HOME`
    /// (glance caches the image schema there).
    fn run(&self, token: &str, args: &[&str]) -> Run {
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" <&-"#)
            .arg(&self.bin)
            .args(["--os-image-url", &self.url, "--os-auth-token", token])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .output()
            .expect("run glance");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs glance, which must succeed; returns its stdout.
    fn ok(&self, token: &str, args: &[&str]) -> String {
        let r = self.run(token, args);
        assert!(r.ok, "glance {}:\n{r}", args.join(" "));
        r.stdout
    }

    /// `glance image-show` as a map of the printed properties.
    fn show(&self, token: &str, id: &str) -> BTreeMap<String, String> {
        props(&self.ok(token, &["image-show", "--max-column-width", "100000", id]))
    }
}

/// Cells of a prettytable's rows (header included), continuation rows (wrapped
/// values, whose first cell is empty) joined to the row above.
fn table(out: &str) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for line in out.lines() {
        let Some(inner) = line.strip_prefix('|').and_then(|l| l.strip_suffix('|')) else {
            continue;
        };
        let cells: Vec<String> = inner.split('|').map(|c| c.trim().to_string()).collect();
        match rows.last_mut() {
            Some(last) if cells[0].is_empty() && last.len() == cells.len() => {
                for (l, c) in last.iter_mut().zip(cells).skip(1) {
                    if !c.is_empty() {
                        l.push_str(&c);
                    }
                }
            }
            _ => rows.push(cells),
        }
    }
    rows
}

/// A `Property | Value` table as a map.
fn props(out: &str) -> BTreeMap<String, String> {
    table(out)
        .into_iter()
        .skip(1)
        .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.clone())))
        .collect()
}

/// The `ID` column of `glance image-list`, in order.
fn list_ids(out: &str) -> Vec<String> {
    table(out)
        .into_iter()
        .skip(1)
        .filter_map(|r| r.first().cloned())
        .collect()
}

// ---------------------------------------------------------------------------------
// openstacksdk

/// `tests/clients/sdk_driver.py` in the venv's Python: openstacksdk with a token and
/// `image_endpoint_override`, one JSON request and answer per line.
struct Sdk {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Sdk {
    fn new(env: &Env, srv: &Server, token: &str) -> Sdk {
        let log = env.dir.path().join(format!("sdk-{token}.log"));
        let mut child = Command::new(env.venv.join("bin/python3"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/sdk_driver.py"))
            .arg(&srv.url)
            .arg(token)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", env.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start the openstacksdk driver");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Sdk {
            child,
            stdin,
            stdout,
            log,
        }
    }

    /// Calls `op`; `Ok(result)` or `Err({type, status, message})`.
    fn call(&mut self, op: &str, args: Value) -> Result<Value, Value> {
        let line = json!({"op": op, "args": args}).to_string();
        writeln!(self.stdin, "{line}").expect("write to the sdk driver");
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("read the sdk driver");
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|e| {
            panic!(
                "sdk driver answered {answer:?} ({e}) to {line}; its stderr:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
        match v.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => Err(v["error"].clone()),
        }
    }

    /// Calls `op`, which must succeed.
    fn ok(&mut self, op: &str, args: Value) -> Value {
        let what = format!("{op} {args}");
        self.call(op, args)
            .unwrap_or_else(|e| panic!("openstacksdk {what} failed: {e:#}"))
    }
}

impl Drop for Sdk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// A loopback HTTP server for web-download

/// Serves fixed files on 127.0.0.1 and records the paths asked for.
struct WebServer {
    port: u16,
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebServer {
    fn start(files: HashMap<String, Vec<u8>>) -> WebServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the web server");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (stop2, hits2) = (stop.clone(), hits.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
                let path = read_request_path(&mut conn);
                hits2.lock().unwrap().push(path.clone());
                let _ = match files.get(&path) {
                    Some(body) => conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| conn.write_all(body)),
                    None => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            }
        });
        WebServer {
            port,
            stop,
            hits,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

/// The path of an HTTP request's first line (its head is read whole).
fn read_request_path(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1).unwrap_or("").to_string()
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// Images

/// A qemu-img-made upload: its path and its qemu-img format name.
struct Source {
    path: PathBuf,
    qemu_format: &'static str,
}

/// Glance's `disk_format` for each upload kind, qemu-img's format and options.
const KINDS: [(&str, &str, &str); 4] = [
    ("qcow2", "qcow2", ""),
    ("vmdk", "vmdk", "subformat=streamOptimized"),
    ("vhd", "vpc", ""),
    ("vdi", "vdi", ""),
];

/// An upload of Glance `disk_format` `kind`: 6 MiB of scattered random data (each
/// seed its own), made by qemu-img (qcow2 compressed).
fn source(env: &Env, kind: &str, seed: u64) -> Source {
    let (_, qfmt, opts) = KINDS
        .iter()
        .copied()
        .find(|k| k.0 == kind)
        .unwrap_or_else(|| panic!("no such upload kind {kind}"));
    let dir = env.dir.path();
    let raw = dir.join(format!("layout-{seed}.raw"));
    env.q
        .build(&Layout::random(6 << 20, 6, seed), "raw", "", &raw);
    let path = dir.join(format!("src-{seed}.{kind}"));
    let (r, p) = (raw.display().to_string(), path.display().to_string());
    let mut args = vec!["convert", "-f", "raw", "-O", qfmt];
    if qfmt == "qcow2" {
        args.push("-c");
    }
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([r.as_str(), p.as_str()]);
    env.q.img(&args);
    Source {
        path,
        qemu_format: qfmt,
    }
}

/// A qcow2 whose backing file is the host's `/etc/passwd`.
fn hostile_backing(env: &Env) -> PathBuf {
    let path = env.dir.path().join("hostile.qcow2");
    let p = path.display().to_string();
    env.q.img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        &p,
        "6M",
    ]);
    path
}

/// An uncompressed qcow2 cut to half its length: its L2 tables point past the end.
fn truncated_qcow2(env: &Env) -> PathBuf {
    let raw = env.dir.path().join("trunc.raw");
    let layout = Layout::random(6 << 20, 6, 99);
    env.q.build(&layout, "raw", "", &raw);
    let path = env.dir.path().join("truncated.qcow2");
    let (r, p) = (raw.display().to_string(), path.display().to_string());
    env.q.img(&["convert", "-f", "raw", "-O", "qcow2", &r, &p]);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    path
}

/// Asserts the stored bytes of image `img` (downloaded to `got`) are `src`'s content.
fn assert_stored(env: &Env, src: &Source, img: &Value, got: &Path) {
    let fmt = match img["disk_format"].as_str() {
        Some("vhd") => "vpc",
        Some(f) => f,
        None => panic!("image has no disk_format: {img}"),
    };
    env.q.assert_same(src.qemu_format, &src.path, fmt, got);
    let vsize = env.q.info_json(Some(src.qemu_format), &src.path)["virtual-size"].clone();
    assert_eq!(img["virtual_size"], vsize, "virtual_size of {img}");
    let size = std::fs::metadata(got).unwrap().len();
    assert_eq!(img["size"], json!(size), "size of {img}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The status of the image after it settled, with the log on failure.
fn assert_active(srv: &Server, img: &Value) {
    assert_eq!(
        img["status"],
        "active",
        "image not active: {img}\ntasks: {:?}\nvimport log:\n{}",
        srv.image_tasks(img["id"].as_str().unwrap_or("")),
        srv.log()
    );
}

// =================================================================================
// glance CLI

/// `image-create` (record), `image-stage`, `image-import --import-method glance-direct`
/// of a compressed qcow2; then `image-tasks`, `image-download` and qemu-img compare.
#[test]
fn glance_stage_import() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let src = source(&env, "qcow2", 1);
    let created = props(&g.ok(
        ALICE,
        &[
            "image-create",
            "--name",
            "staged",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
        ],
    ));
    assert_eq!(created["status"], "queued", "{created:?}");
    assert_eq!(created["owner"], ALICE_PROJECT);
    assert_eq!(created["visibility"], "private");
    let id = created["id"].clone();
    g.ok(ALICE, &["image-stage", "--file", &s(&src.path), &id]);
    assert_eq!(g.show(ALICE, &id)["status"], "uploading");
    g.ok(
        ALICE,
        &["image-import", "--import-method", "glance-direct", &id],
    );
    let img = srv.wait_settled(&id);
    assert_active(&srv, &img);
    let shown = g.show(ALICE, &id);
    assert_eq!(shown["status"], "active");
    assert!(
        !shown.contains_key("os_glance_import_task"),
        "import lock left: {shown:?}"
    );
    let tasks = g.ok(ALICE, &["image-tasks", &id]);
    let rows = table(&tasks);
    assert!(
        rows.iter()
            .skip(1)
            .any(|r| r.contains(&"success".to_string())),
        "no successful task in image-tasks:\n{tasks}"
    );
    let got = env.dir.path().join("got.raw");
    g.ok(ALICE, &["image-download", "--file", &s(&got), &id]);
    assert_stored(&env, &src, &img, &got);
}

/// `image-create-via-import --file` (create, stage and import in one command) of a
/// streamOptimized vmdk.
#[test]
fn glance_create_via_import() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let src = source(&env, "vmdk", 2);
    let out = props(&g.ok(
        ALICE,
        &[
            "image-create-via-import",
            "--name",
            "via-import",
            "--disk-format",
            "vmdk",
            "--container-format",
            "bare",
            "--file",
            &s(&src.path),
        ],
    ));
    let id = out["id"].clone();
    let img = srv.wait_settled(&id);
    assert_active(&srv, &img);
    let got = env.dir.path().join("got");
    g.ok(ALICE, &["image-download", "--file", &s(&got), &id]);
    assert_stored(&env, &src, &img, &got);
}

/// `image-create --file` (the classic `PUT /v2/images/{id}/file`) of a vhd, and
/// `image-upload` of a vdi into an existing record: both answer when `active`.
#[test]
fn glance_upload_put_file() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let vhd = source(&env, "vhd", 3);
    let out = props(&g.ok(
        ALICE,
        &[
            "image-create",
            "--name",
            "put-vhd",
            "--disk-format",
            "vhd",
            "--container-format",
            "bare",
            "--file",
            &s(&vhd.path),
        ],
    ));
    assert_eq!(out["status"], "active", "image-create --file: {out:?}");
    let img = srv.image(&out["id"]);
    let got = env.dir.path().join("got-vhd");
    g.ok(ALICE, &["image-download", "--file", &s(&got), &out["id"]]);
    assert_stored(&env, &vhd, &img, &got);

    let vdi = source(&env, "vdi", 4);
    let rec = props(&g.ok(
        ALICE,
        &[
            "image-create",
            "--name",
            "put-vdi",
            "--disk-format",
            "vdi",
            "--container-format",
            "bare",
        ],
    ));
    g.ok(
        ALICE,
        &["image-upload", "--file", &s(&vdi.path), &rec["id"]],
    );
    let img = srv.image(&rec["id"]);
    assert_active(&srv, &img);
    let got = env.dir.path().join("got-vdi");
    g.ok(ALICE, &["image-download", "--file", &s(&got), &rec["id"]]);
    assert_stored(&env, &vdi, &img, &got);
}

/// `image-create-via-import --import-method web-download --uri` from a loopback HTTP
/// server; a URI outside the allow-list is refused and the image stays `queued`.
#[test]
fn glance_web_download() {
    let Some(env) = env() else { return };
    let src = source(&env, "qcow2", 5);
    let web = WebServer::start(HashMap::from([(
        "/images/disk.qcow2".to_string(),
        std::fs::read(&src.path).unwrap(),
    )]));
    let srv = Server::start(env.dir.path(), Some(web.port));
    let g = Glance::new(&env, &srv);
    let info = g.ok(ALICE, &["import-info"]);
    assert!(info.contains("web-download"), "import-info:\n{info}");
    let out = props(&g.ok(
        ALICE,
        &[
            "image-create-via-import",
            "--name",
            "web",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
            "--import-method",
            "web-download",
            "--uri",
            &web.url("/images/disk.qcow2"),
        ],
    ));
    let id = out["id"].clone();
    let img = srv.wait_settled(&id);
    assert_active(&srv, &img);
    assert_eq!(web.hits(), ["/images/disk.qcow2"]);
    let got = env.dir.path().join("got");
    g.ok(ALICE, &["image-download", "--file", &s(&got), &id]);
    assert_stored(&env, &src, &img, &got);

    // A port outside web_download_allowed_ports: refused before anything is fetched.
    let rec = props(&g.ok(
        ALICE,
        &[
            "image-create",
            "--name",
            "web-refused",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
        ],
    ));
    let refused_uri = format!("http://127.0.0.1:{}/images/disk.qcow2", web.port ^ 1);
    let r = g.run(
        ALICE,
        &[
            "image-import",
            "--import-method",
            "web-download",
            "--uri",
            &refused_uri,
            &rec["id"],
        ],
    );
    assert!(!r.ok, "a URI outside the allow-list was accepted:\n{r}");
    assert!(
        r.stderr.contains("does not pass filtering"),
        "the refusal does not say why:\n{r}"
    );
    assert_eq!(srv.image(&rec["id"])["status"], "queued");
    assert_eq!(web.hits().len(), 1, "the refused URI was fetched");
}

/// Show and list: extra properties, filters (`--property-filter`, `--tag`,
/// `--visibility`, `--owner`, name), sorting, paging through `next` links
/// (`--page-size`), `--limit`; another project's private image is invisible (404).
#[test]
fn glance_show_list() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let create = |token: &str, name: &str, extra: &[&str]| -> String {
        let mut args = vec![
            "image-create",
            "--name",
            name,
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
        ];
        args.extend(extra);
        props(&g.ok(token, &args))["id"].clone()
    };
    let a1 = create(
        ALICE,
        "a1",
        &["--property", "os_distro=debian", "--tags", "gold"],
    );
    let a2 = create(ALICE, "a2", &["--property", "os_distro=fedora"]);
    let a3 = create(
        ALICE,
        "a3",
        &[
            "--property",
            "os_distro=debian",
            "--min-disk",
            "3",
            "--disk-format",
            "raw",
        ],
    );
    let a4 = create(ALICE, "a4", &[]);
    let a5 = create(ALICE, "a5", &["--tags", "gold"]);
    let pub1 = create(ADMIN, "p1", &["--visibility", "public"]);
    let bob1 = create(BOB, "b1", &[]);

    let shown = g.show(ALICE, &a3);
    assert_eq!(shown["name"], "a3");
    assert_eq!(shown["os_distro"], "debian");
    assert_eq!(shown["min_disk"], "3");
    assert_eq!(shown["owner"], ALICE_PROJECT);
    assert_eq!(shown["protected"], "False");

    let list = |token: &str, args: &[&str]| -> Vec<String> {
        let mut a = vec!["image-list"];
        a.extend(args);
        list_ids(&g.ok(token, &a))
    };
    // Alice sees her own and the public image, sorted by name (glance's default).
    assert_eq!(
        list(ALICE, &[]),
        [
            a1.as_str(),
            a2.as_str(),
            a3.as_str(),
            a4.as_str(),
            a5.as_str(),
            pub1.as_str()
        ],
        "alice's default list"
    );
    // Paging: two per request, glance follows the `next` links.
    assert_eq!(
        list(ALICE, &["--page-size", "2"]),
        [
            a1.as_str(),
            a2.as_str(),
            a3.as_str(),
            a4.as_str(),
            a5.as_str(),
            pub1.as_str()
        ],
        "paged list"
    );
    assert_eq!(
        list(ALICE, &["--page-size", "2", "--limit", "3"]),
        [a1.as_str(), a2.as_str(), a3.as_str()],
        "--limit 3"
    );
    assert_eq!(
        list(ALICE, &["--sort-key", "name", "--sort-dir", "desc"]),
        [
            pub1.as_str(),
            a5.as_str(),
            a4.as_str(),
            a3.as_str(),
            a2.as_str(),
            a1.as_str()
        ],
        "name desc"
    );
    assert_eq!(
        list(ALICE, &["--sort", "disk_format:desc,name:asc"]),
        [
            a3.as_str(),
            a1.as_str(),
            a2.as_str(),
            a4.as_str(),
            a5.as_str(),
            pub1.as_str()
        ],
        "--sort disk_format:desc,name:asc"
    );
    assert_eq!(
        list(ALICE, &["--property-filter", "os_distro=debian"]),
        [a1.as_str(), a3.as_str()],
        "os_distro=debian"
    );
    assert_eq!(
        list(ALICE, &["--tag", "gold"]),
        [a1.as_str(), a5.as_str()],
        "tag gold"
    );
    assert_eq!(
        list(ALICE, &["--visibility", "public"]),
        [pub1.as_str()],
        "visibility public"
    );
    assert_eq!(
        list(ALICE, &["--property-filter", "name=a4"]),
        [a4.as_str()],
        "name=a4"
    );
    assert_eq!(
        list(ADMIN, &["--owner", BOB_PROJECT]),
        [bob1.as_str()],
        "admin lists bob's images"
    );
    // Bob's private image is invisible to Alice: not listed, 404 to show.
    assert!(!list(ALICE, &["--page-size", "1"]).contains(&bob1));
    let r = g.run(ALICE, &["image-show", &bob1]);
    assert!(!r.ok, "alice can see bob's private image:\n{r}");
    assert!(
        r.stderr.contains(&format!("No image found with ID {bob1}")),
        "{r}"
    );
}

/// `image-update` (name, extra property added and removed, `--min-ram`), tags added
/// and removed, `--protected` refusing `image-delete` with 403.
#[test]
fn glance_update_tags_delete() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let id = props(&g.ok(
        ALICE,
        &[
            "image-create",
            "--name",
            "before",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
            "--property",
            "hw_disk_bus=scsi",
            "--property",
            "custom.key=1",
        ],
    ))["id"]
        .clone();
    let upd = props(&g.ok(
        ALICE,
        &[
            "image-update",
            "--name",
            "after",
            "--min-ram",
            "512",
            "--property",
            "os_distro=ubuntu",
            "--remove-property",
            "custom.key",
            &id,
        ],
    ));
    assert_eq!(upd["name"], "after");
    assert_eq!(upd["min_ram"], "512");
    assert_eq!(upd["os_distro"], "ubuntu");
    assert_eq!(upd["hw_disk_bus"], "scsi");
    assert!(!upd.contains_key("custom.key"), "{upd:?}");
    let img = srv.image(&id);
    assert_eq!(img["min_ram"], 512);
    assert!(img.get("custom.key").is_none(), "{img}");

    g.ok(ALICE, &["image-tag-update", &id, "alpha"]);
    g.ok(ALICE, &["image-tag-update", &id, "beta"]);
    g.ok(ALICE, &["image-tag-delete", &id, "alpha"]);
    assert_eq!(srv.image(&id)["tags"], json!(["beta"]));

    g.ok(ALICE, &["image-update", "--protected", "True", &id]);
    let r = g.run(ALICE, &["image-delete", &id]);
    assert!(!r.ok, "a protected image was deleted:\n{r}");
    assert!(r.stderr.contains("not permitted"), "{r}");
    assert_eq!(srv.image(&id)["status"], "queued");

    // Another project cannot delete it either: it cannot even see it.
    g.ok(ALICE, &["image-update", "--protected", "False", &id]);
    let r = g.run(BOB, &["image-delete", &id]);
    assert!(!r.ok, "bob deleted alice's image:\n{r}");
    g.ok(ALICE, &["image-delete", &id]);
    let r = g.run(ALICE, &["image-show", &id]);
    assert!(!r.ok, "a deleted image is still shown:\n{r}");
}

/// Image members through the glance CLI: Alice shares a `shared` image with Bob's
/// project (`member-create`), Bob sees it listed only after `member-update …
/// accepted` (and with `--member-status pending` before), cannot share it on, and
/// `member-delete` withdraws it.
#[test]
fn glance_members() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let id = props(&g.ok(
        ALICE,
        &[
            "image-create",
            "--name",
            "golden",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--visibility",
            "shared",
        ],
    ))["id"]
        .clone();
    let bob_list = |extra: &[&str]| {
        let mut args = vec!["image-list"];
        args.extend_from_slice(extra);
        list_ids(&g.ok(BOB, &args))
    };
    assert!(bob_list(&[]).is_empty());

    let created = table(&g.ok(ALICE, &["member-create", &id, BOB_PROJECT]));
    assert_eq!(
        created[0],
        ["Image ID", "Member ID", "Status"],
        "{created:?}"
    );
    assert_eq!(
        created[1],
        [id.as_str(), BOB_PROJECT, "pending"],
        "{created:?}"
    );
    let r = g.run(ALICE, &["member-create", &id, BOB_PROJECT]);
    assert!(
        !r.ok && r.stderr.contains("409"),
        "a member added twice:\n{r}"
    );

    assert!(bob_list(&[]).is_empty(), "listed before Bob accepted");
    assert_eq!(
        bob_list(&["--visibility", "shared", "--member-status", "pending"]),
        [id.as_str()]
    );
    // Bob may not share it on, nor answer for another project.
    let r = g.run(BOB, &["member-create", &id, "p-carol"]);
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a member shared it on:\n{r}"
    );
    let r = g.run(ALICE, &["member-update", &id, BOB_PROJECT, "accepted"]);
    assert!(
        !r.ok && r.stderr.contains("403"),
        "the owner answered:\n{r}"
    );

    let upd = table(&g.ok(BOB, &["member-update", &id, BOB_PROJECT, "accepted"]));
    assert_eq!(upd[1], [id.as_str(), BOB_PROJECT, "accepted"], "{upd:?}");
    assert_eq!(bob_list(&[]), [id.as_str()]);
    assert_eq!(g.show(BOB, &id)["visibility"], "shared");
    let members = table(&g.ok(ALICE, &["member-list", "--image-id", &id]));
    assert_eq!(members.len(), 2, "{members:?}");
    assert_eq!(members[1], [id.as_str(), BOB_PROJECT, "accepted"]);

    g.ok(BOB, &["member-update", &id, BOB_PROJECT, "rejected"]);
    assert!(bob_list(&[]).is_empty(), "listed after Bob rejected");
    g.ok(ALICE, &["member-delete", &id, BOB_PROJECT]);
    let members = table(&g.ok(ALICE, &["member-list", "--image-id", &id]));
    assert_eq!(members.len(), 1, "{members:?}");
    let r = g.run(BOB, &["image-show", &id]);
    assert!(!r.ok, "Bob still sees the image after member-delete:\n{r}");
}

/// Delete of an active image removes its stored file.
#[test]
fn glance_delete_active() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let src = source(&env, "vdi", 6);
    let out = props(&g.ok(
        ADMIN,
        &[
            "image-create",
            "--name",
            "to-delete",
            "--disk-format",
            "vdi",
            "--container-format",
            "bare",
            "--file",
            &s(&src.path),
        ],
    ));
    assert_eq!(out["status"], "active", "{out:?}");
    assert_eq!(srv.stored_files().len(), 1);
    g.ok(ADMIN, &["image-delete", &out["id"]]);
    assert!(
        srv.stored_files().is_empty(),
        "stored file left: {:?}",
        srv.stored_files()
    );
    let (st, _) = srv.http("GET", &format!("/v2/images/{}", out["id"]), ADMIN, None);
    assert_eq!(st, 404);
}

/// `task-list` (with `--status`) and `task-show` after one good and one failed import.
#[test]
fn glance_tasks() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let good = source(&env, "vhd", 7);
    let create = |name: &str, fmt: &str, file: &Path| -> String {
        props(&g.ok(
            ALICE,
            &[
                "image-create-via-import",
                "--name",
                name,
                "--disk-format",
                fmt,
                "--container-format",
                "bare",
                "--file",
                &s(file),
            ],
        ))["id"]
            .clone()
    };
    let ok_id = create("good", "vhd", &good.path);
    let bad_id = create("bad", "vdi", &good.path);
    assert_active(&srv, &srv.wait_settled(&ok_id));
    assert_eq!(srv.wait_settled(&bad_id)["status"], "queued");

    let all = g.ok(ALICE, &["task-list"]);
    let rows = table(&all);
    assert_eq!(rows.len(), 3, "task-list:\n{all}");
    let failed = g.ok(ALICE, &["task-list", "--status", "failure"]);
    let failed_rows = table(&failed);
    assert_eq!(
        failed_rows.len(),
        2,
        "task-list --status failure:\n{failed}"
    );
    let task_id = failed_rows[1][0].clone();
    let t = props(&g.ok(ALICE, &["task-show", &task_id]));
    assert_eq!(t["status"], "failure");
    assert_eq!(t["type"], "api_image_import");
    assert!(t["message"].contains("vdi"), "task message: {t:?}");
    assert!(
        t["input"].contains(&bad_id) || t.get("image_id") == Some(&bad_id),
        "{t:?}"
    );
    // Bob sees none of Alice's tasks.
    let bobs = g.ok(BOB, &["task-list"]);
    assert_eq!(table(&bobs).len(), 1, "bob's task-list:\n{bobs}");
}

/// Failures: a qcow2 declared `vmdk`, a qcow2 whose backing file is `/etc/passwd`, a
/// truncated qcow2 (imported and `PUT`), and a `disk_format` vimport does not
/// convert. Each ends with the image `queued` and a message that names the cause.
#[test]
fn glance_failures() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let g = Glance::new(&env, &srv);
    let qcow2 = source(&env, "qcow2", 8);
    let hostile = hostile_backing(&env);
    let truncated = truncated_qcow2(&env);
    let via_import = |name: &str, fmt: &str, file: &Path| -> (String, Value, Value) {
        let id = props(&g.ok(
            ALICE,
            &[
                "image-create-via-import",
                "--name",
                name,
                "--disk-format",
                fmt,
                "--container-format",
                "bare",
                "--file",
                &s(file),
            ],
        ))["id"]
            .clone();
        let img = srv.wait_settled(&id);
        let task = srv.last_task(&id);
        (id, img, task)
    };
    let cases: [(&str, &str, &Path, &[&str]); 3] = [
        ("liar", "vmdk", &qcow2.path, &["qcow2", "vmdk"]),
        ("hostile", "qcow2", &hostile, &["backing"]),
        ("truncated", "qcow2", &truncated, &["qcow2"]),
    ];
    for (name, fmt, file, words) in cases {
        let (id, img, task) = via_import(name, fmt, file);
        assert_eq!(img["status"], "queued", "{name}: {img}");
        assert_eq!(task["status"], "failure", "{name}: {task}");
        let msg = task["message"].as_str().unwrap_or("");
        for w in words {
            assert!(msg.contains(w), "{name}: task message {msg:?} lacks {w:?}");
        }
        assert!(
            !msg.contains(&s(&srv.data)),
            "{name}: task message {msg:?} shows the server's paths"
        );
        // glance image-tasks shows the same message.
        let shown = g.ok(ALICE, &["image-tasks", &id]);
        assert!(shown.contains("failure"), "{name}: image-tasks:\n{shown}");
        assert!(
            img.get("os_glance_import_task").is_none(),
            "{name}: lock left: {img}"
        );
    }
    // PUT /file of the truncated image: glance exits non-zero with the reason, the
    // image stays queued.
    let r = g.run(
        ALICE,
        &[
            "image-create",
            "--name",
            "put-truncated",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
            "--file",
            &s(&truncated),
        ],
    );
    assert!(!r.ok, "a truncated qcow2 was stored:\n{r}");
    let id = props(&r.stdout)
        .get("id")
        .cloned()
        .unwrap_or_else(|| panic!("no image printed:\n{r}"));
    assert!(
        r.stderr.contains("400") || r.stderr.contains("qcow2"),
        "no reason given:\n{r}"
    );
    assert_eq!(srv.image(&id)["status"], "queued");
    // A format vimport does not convert: 400 at create, naming what it accepts.
    let r = g.run(
        ALICE,
        &[
            "image-create",
            "--name",
            "ploop",
            "--disk-format",
            "ploop",
            "--container-format",
            "bare",
        ],
    );
    assert!(!r.ok, "disk_format ploop was accepted:\n{r}");
    assert!(
        r.stderr.contains("qcow2"),
        "the refusal does not list the formats:\n{r}"
    );
    assert!(
        srv.stored_files().is_empty(),
        "store not empty: {:?}",
        srv.stored_files()
    );
}

// =================================================================================
// openstacksdk

fn sdk_id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// `create_image` (record), `stage_image`, `import_image(glance-direct)` of a vmdk,
/// `image_tasks`, `download_image` (which checks the hash) and qemu-img compare.
#[test]
fn sdk_stage_import() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let src = source(&env, "vmdk", 11);
    let rec = sdk.ok(
        "create_image",
        json!({"name": "sdk-staged", "disk_format": "vmdk", "container_format": "bare"}),
    );
    assert_eq!(rec["status"], "queued", "{rec}");
    let id = sdk_id(&rec);
    sdk.ok(
        "stage_image",
        json!({"image": id, "filename": s(&src.path)}),
    );
    assert_eq!(
        sdk.ok("get_image", json!({"image": id}))["status"],
        "uploading"
    );
    sdk.ok(
        "import_image",
        json!({"image": id, "method": "glance-direct"}),
    );
    let img = srv.wait_settled(&id);
    assert_active(&srv, &img);
    let tasks = sdk.ok("image_tasks", json!({"image": id}));
    assert!(
        tasks
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["status"] == "success")),
        "image_tasks: {tasks}"
    );
    let got = env.dir.path().join("got");
    sdk.ok("download_image", json!({"image": id, "output": s(&got)}));
    assert_stored(&env, &src, &img, &got);
}

/// `create_image(filename=…, use_import=True)`: create, stage and import in one call
/// (needs the `OpenStack-image-import-methods` header), of a vdi.
#[test]
fn sdk_create_via_import() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let src = source(&env, "vdi", 12);
    let rec = sdk.ok(
        "create_image",
        json!({"name": "sdk-import", "filename": s(&src.path), "disk_format": "vdi",
               "container_format": "bare", "use_import": true}),
    );
    let id = sdk_id(&rec);
    let img = srv.wait_settled(&id);
    assert_active(&srv, &img);
    // The SDK's own properties survive.
    assert_eq!(img["owner_specified.openstack.object"], "images/sdk-import");
    let got = env.dir.path().join("got");
    sdk.ok("download_image", json!({"image": id, "output": s(&got)}));
    assert_stored(&env, &src, &img, &got);
}

/// Image members through openstacksdk: `add_member`, `members`, `update_member`
/// (Bob accepts: the image appears in his `images()`), `get_member`,
/// `remove_member`.
#[test]
fn sdk_members() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut alice = Sdk::new(&env, &srv, ALICE);
    let mut bob = Sdk::new(&env, &srv, BOB);
    let rec = alice.ok(
        "create_image",
        json!({"name": "sdk-shared", "disk_format": "raw", "container_format": "bare",
               "visibility": "shared"}),
    );
    let id = sdk_id(&rec);
    let ids = |v: Value| -> Vec<String> { v.as_array().unwrap().iter().map(sdk_id).collect() };
    let m = alice.ok("add_member", json!({"image": id, "member": BOB_PROJECT}));
    assert_eq!(m["status"], "pending", "{m}");
    let all = alice.ok("members", json!({"image": id}));
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    assert_eq!(all[0]["status"], "pending", "{all}");
    assert!(ids(bob.ok("images", json!({}))).is_empty());
    let err = bob
        .call("add_member", json!({"image": id, "member": "p-carol"}))
        .expect_err("a member shared the image on");
    assert!(err.to_string().contains("403"), "{err}");

    let m = bob.ok(
        "update_member",
        json!({"image": id, "member": BOB_PROJECT, "status": "accepted"}),
    );
    assert_eq!(m["status"], "accepted", "{m}");
    assert_eq!(ids(bob.ok("images", json!({}))), [id.as_str()]);
    let m = bob.ok("get_member", json!({"image": id, "member": BOB_PROJECT}));
    assert_eq!(m["status"], "accepted", "{m}");

    alice.ok("remove_member", json!({"image": id, "member": BOB_PROJECT}));
    assert!(ids(bob.ok("images", json!({}))).is_empty());
    assert_eq!(alice.ok("members", json!({"image": id})), json!([]));
}

/// `create_image(filename=…)`: the SDK's default upload, `PUT /file`, of a qcow2.
#[test]
fn sdk_upload_put_file() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let src = source(&env, "qcow2", 13);
    let rec = sdk.ok(
        "create_image",
        json!({"name": "sdk-put", "filename": s(&src.path), "disk_format": "qcow2",
               "container_format": "bare"}),
    );
    let id = sdk_id(&rec);
    let img = srv.image(&id);
    assert_active(&srv, &img);
    let got = env.dir.path().join("got");
    sdk.ok("download_image", json!({"image": id, "output": s(&got)}));
    assert_stored(&env, &src, &img, &got);
}

/// `create_image(use_import=True, import_method="web-download", uri=…)` of a vhd from
/// the loopback server.
#[test]
fn sdk_web_download() {
    let Some(env) = env() else { return };
    let src = source(&env, "vhd", 14);
    let web = WebServer::start(HashMap::from([(
        "/disk.vhd".to_string(),
        std::fs::read(&src.path).unwrap(),
    )]));
    let srv = Server::start(env.dir.path(), Some(web.port));
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let info = sdk.ok("get_import_info", json!({}));
    assert!(
        info.to_string().contains("web-download"),
        "import info: {info}"
    );
    let rec = sdk.ok(
        "create_image",
        json!({"name": "sdk-web", "disk_format": "vhd", "container_format": "bare",
               "use_import": true, "import_method": "web-download",
               "uri": web.url("/disk.vhd")}),
    );
    let id = sdk_id(&rec);
    let img = srv.wait_settled(&id);
    assert_active(&srv, &img);
    assert_eq!(web.hits(), ["/disk.vhd"]);
    let got = env.dir.path().join("got");
    sdk.ok("download_image", json!({"image": id, "output": s(&got)}));
    assert_stored(&env, &src, &img, &got);

    // A missing file on the server: the task fails, the image is back to queued.
    let rec = sdk.ok(
        "create_image",
        json!({"name": "sdk-web-404", "disk_format": "vhd", "container_format": "bare",
               "use_import": true, "import_method": "web-download",
               "uri": web.url("/missing.vhd")}),
    );
    let id = sdk_id(&rec);
    let img = srv.wait_settled(&id);
    assert_eq!(img["status"], "queued", "{img}");
    let task = srv.last_task(&id);
    assert_eq!(task["status"], "failure", "{task}");
    assert!(
        task["message"].as_str().unwrap_or("").contains("404"),
        "task message does not give the HTTP status: {task}"
    );
}

/// `get_image`, `find_image` by name, `images()` with filters, sorting and paging
/// (`limit` makes the SDK follow `next`), and tenancy: another project's private image
/// is `NotFoundException`, a public one is visible.
#[test]
fn sdk_show_list() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut alice = Sdk::new(&env, &srv, ALICE);
    let mut bob = Sdk::new(&env, &srv, BOB);
    let mut admin = Sdk::new(&env, &srv, ADMIN);
    let mut ids = Vec::new();
    for (i, name) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
        let mut args = json!({"name": name, "disk_format": "qcow2", "container_format": "bare",
                              "os_distro": if i % 2 == 0 { "debian" } else { "fedora" }});
        if i < 2 {
            args["tags"] = json!(["gold"]);
        }
        ids.push(sdk_id(&alice.ok("create_image", args)));
    }
    let public = sdk_id(&admin.ok(
        "create_image",
        json!({"name": "s-public", "disk_format": "qcow2", "container_format": "bare",
               "visibility": "public"}),
    ));
    let bobs = sdk_id(&bob.ok(
        "create_image",
        json!({"name": "s-bob", "disk_format": "qcow2", "container_format": "bare"}),
    ));

    let got = alice.ok("get_image", json!({"image": ids[2]}));
    assert_eq!(got["name"], "s3");
    assert_eq!(got["owner"], ALICE_PROJECT);
    assert_eq!(got["os_distro"], "debian", "{got}");
    assert_eq!(
        got["properties"]["owner_specified.openstack.object"], "images/s3",
        "{got}"
    );
    let found = alice.ok("find_image", json!({"name_or_id": "s4"}));
    assert_eq!(sdk_id(&found), ids[3]);

    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|i| i["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let all = names(alice.ok("images", json!({"sort": "name:asc"})));
    assert_eq!(
        all,
        ["s-public", "s1", "s2", "s3", "s4", "s5"],
        "alice's images"
    );
    let paged = names(alice.ok(
        "images",
        json!({"limit": 2, "sort_key": "name", "sort_dir": "desc"}),
    ));
    assert_eq!(
        paged,
        ["s5", "s4", "s3", "s2", "s1", "s-public"],
        "paged by 2, desc"
    );
    assert_eq!(
        names(alice.ok("images", json!({"tag": "gold", "sort": "name:asc"}))),
        ["s1", "s2"]
    );
    assert_eq!(
        names(alice.ok("images", json!({"visibility": "public"}))),
        ["s-public"]
    );
    assert_eq!(names(alice.ok("images", json!({"name": "s2"}))), ["s2"]);
    assert_eq!(
        names(alice.ok(
            "images",
            json!({"status": "queued", "owner": ALICE_PROJECT, "sort": "name:asc"})
        )),
        ["s1", "s2", "s3", "s4", "s5"]
    );
    assert_eq!(
        names(admin.ok("images", json!({"owner": BOB_PROJECT}))),
        ["s-bob"]
    );
    // Tenancy.
    let err = alice
        .call("get_image", json!({"image": bobs}))
        .expect_err("alice reads bob's private image");
    assert_eq!(err["status"], 404, "{err}");
    assert_eq!(
        bob.ok("get_image", json!({"image": public}))["name"],
        "s-public"
    );
}

/// `update_image` (JSON patch: name, min_disk, an extra property), `add_tag`,
/// `remove_tag`, `is_protected` refusing `delete_image` (403), then delete.
#[test]
fn sdk_update_tags_delete() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let id = sdk_id(&sdk.ok(
        "create_image",
        json!({"name": "sdk-upd", "disk_format": "raw", "container_format": "bare",
               "hw_scsi_model": "virtio-scsi"}),
    ));
    let upd = sdk.ok(
        "update_image",
        json!({"image": id, "name": "sdk-upd2", "min_disk": 7, "os_distro": "arch"}),
    );
    assert_eq!(upd["name"], "sdk-upd2", "{upd}");
    let img = srv.image(&id);
    assert_eq!(img["name"], "sdk-upd2");
    assert_eq!(img["min_disk"], 7);
    assert_eq!(img["os_distro"], "arch", "{img}");
    assert_eq!(img["hw_scsi_model"], "virtio-scsi");

    sdk.ok("add_tag", json!({"image": id, "tag": "one"}));
    sdk.ok("add_tag", json!({"image": id, "tag": "two"}));
    sdk.ok("remove_tag", json!({"image": id, "tag": "one"}));
    assert_eq!(srv.image(&id)["tags"], json!(["two"]));

    sdk.ok("update_image", json!({"image": id, "is_protected": true}));
    let err = sdk
        .call("delete_image", json!({"image": id}))
        .expect_err("a protected image was deleted");
    assert_eq!(err["status"], 403, "{err}");
    sdk.ok("update_image", json!({"image": id, "is_protected": false}));
    sdk.ok("delete_image", json!({"image": id}));
    let err = sdk
        .call("get_image", json!({"image": id}))
        .expect_err("a deleted image is still there");
    assert_eq!(err["status"], 404, "{err}");
}

/// `tasks()` (filtered by status), `get_task`, `image_tasks` after a good and a failed
/// import.
#[test]
fn sdk_tasks() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let src = source(&env, "qcow2", 15);
    let create = |sdk: &mut Sdk, name: &str, fmt: &str| -> String {
        sdk_id(&sdk.ok(
            "create_image",
            json!({"name": name, "filename": s(&src.path), "disk_format": fmt,
                   "container_format": "bare", "use_import": true}),
        ))
    };
    let good = create(&mut sdk, "t-good", "qcow2");
    let bad = create(&mut sdk, "t-bad", "vhd");
    assert_active(&srv, &srv.wait_settled(&good));
    assert_eq!(srv.wait_settled(&bad)["status"], "queued");
    let all = sdk.ok("tasks", json!({}));
    assert_eq!(all.as_array().map(Vec::len), Some(2), "tasks: {all}");
    let failed = sdk.ok("tasks", json!({"status": "failure"}));
    let failed = failed.as_array().cloned().unwrap_or_default();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let task = sdk.ok("get_task", json!({"task": failed[0]["id"]}));
    assert_eq!(task["status"], "failure");
    assert_eq!(task["type"], "api_image_import");
    assert_eq!(task["owner_id"], ALICE_PROJECT, "{task}");
    let msg = task["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("vhd") && msg.contains("qcow2"),
        "task message {msg:?}"
    );
    let it = sdk.ok("image_tasks", json!({"image": bad}));
    assert_eq!(it.as_array().map(Vec::len), Some(1), "{it}");
    assert_eq!(it[0]["status"], "failure");
}

/// Failures through the SDK: a vmdk declared `qcow2`, a hostile backing file, a
/// truncated qcow2 (each imported: image back to `queued`, precise message), and a
/// truncated `PUT` (the SDK raises with the reason and deletes its image, as it does
/// on any failed upload).
#[test]
fn sdk_failures() {
    let Some(env) = env() else { return };
    let srv = Server::start(env.dir.path(), None);
    let mut sdk = Sdk::new(&env, &srv, ALICE);
    let vmdk = source(&env, "vmdk", 16);
    let hostile = hostile_backing(&env);
    let truncated = truncated_qcow2(&env);
    let cases: [(&str, &str, &Path, &[&str]); 3] = [
        ("s-liar", "qcow2", &vmdk.path, &["vmdk", "qcow2"]),
        ("s-hostile", "qcow2", &hostile, &["backing"]),
        ("s-truncated", "qcow2", &truncated, &["qcow2"]),
    ];
    for (name, fmt, file, words) in cases {
        let rec = sdk.ok(
            "create_image",
            json!({"name": name, "disk_format": fmt, "container_format": "bare"}),
        );
        let id = sdk_id(&rec);
        sdk.ok("stage_image", json!({"image": id, "filename": s(file)}));
        sdk.ok("import_image", json!({"image": id}));
        let img = srv.wait_settled(&id);
        assert_eq!(img["status"], "queued", "{name}: {img}");
        let tasks = sdk.ok("image_tasks", json!({"image": id}));
        let task = &tasks[0];
        assert_eq!(task["status"], "failure", "{name}: {tasks}");
        let msg = task["message"].as_str().unwrap_or("");
        for w in words {
            assert!(msg.contains(w), "{name}: task message {msg:?} lacks {w:?}");
        }
        assert!(
            !msg.contains(&s(&srv.data)),
            "{name}: task message {msg:?} shows the server's paths"
        );
    }
    let err = sdk
        .call(
            "create_image",
            json!({"name": "s-put-truncated", "filename": s(&truncated),
                   "disk_format": "qcow2", "container_format": "bare"}),
        )
        .expect_err("a truncated qcow2 was stored");
    let text = err.to_string();
    assert!(
        text.contains("qcow2"),
        "the SDK's error does not give the reason: {err}"
    );
    assert!(srv.stored_files().is_empty(), "{:?}", srv.stored_files());
}
