//! vimport killed at any instant: the real binary runs concurrent clients importing
//! qemu-made uploads of all five formats while it is killed with SIGKILL at seeded
//! random moments (and aborted by a fail point at each named step of the workflow,
//! deterministically) and restarted; the clients retry what was interrupted. Afterwards
//! every invariant must hold: every image `active` or `queued`; every active image's
//! bytes are its source's guest data and its checksums are those of its bytes; no file
//! in the workspace; no object in the store without an active image (and none missing);
//! every task final (`success` or `failure`) and consistent with its image; no task of
//! a deleted image.
//!
//! The short forms run in the normal suite; `soak_long` (`cargo xtask soak`) aborts at
//! every step for every format, then runs 20 seeded rounds in a row with more clients
//! and more kills (`VIMPORT_SOAK_SEED`: the first seed, default 1000;
//! `VIMPORT_SOAK_ROUNDS`: how many).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use md5::Md5;
use serde_json::Value;
use sha2::{Digest, Sha512};
use vconvert_import::failpoint;
use vconvert_testkit::{qemu, tempdir, Layout, Qemu, Rng};

const TOKEN: &str = "soak-token";

/// One run of the real binary, its output in files of the data directory's parent.
struct Proc {
    child: Child,
    base: String,
}

/// Starts vimport on `data` with extra `VIMPORT_*` settings; stderr is appended to
/// `log`. Waits for its "listening" line.
fn start(data: &Path, env: &[(&str, &str)], log: &Path) -> Proc {
    let out_path = log.with_extension("stdout");
    let out = File::create(&out_path).expect("stdout file");
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vimport"));
    cmd.env_clear()
        .env("VIMPORT_DATA_DIR", data)
        .env("VIMPORT_LISTEN", "127.0.0.1:0")
        .env("VIMPORT_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start vimport");
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("listening on http://")) {
            let base = line[line.find("http://").unwrap_or(0)..].trim().to_string();
            return Proc { child, base };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "vimport exited at start ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "vimport did not start in 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Proc {
    /// SIGKILL, then reap.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to die by itself (a fail point); true if it did.
    fn wait_death(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The address of the service now (it changes at each restart).
struct Shared {
    base: RwLock<String>,
}

impl Shared {
    fn base(&self) -> String {
        self.base.read().map(|b| b.clone()).unwrap_or_default()
    }

    fn set(&self, base: &str) {
        if let Ok(mut b) = self.base.write() {
            *b = base.to_string();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .build()
}

/// A request; `Err` when the service is unreachable or died during it.
fn call(
    agent: &ureq::Agent,
    base: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let req = agent
        .request(method, &format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {TOKEN}"));
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let mut out = Vec::new();
    resp.into_reader()
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok((status, out))
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

/// An upload and the guest data it holds.
struct Source {
    glance: &'static str,
    qemu_format: &'static str,
    bytes: Vec<u8>,
    guest: Vec<u8>,
}

/// The five formats, as (Glance name, qemu-img name, qemu-img -o options).
const FORMATS: [(&str, &str, &str); 5] = [
    ("raw", "raw", ""),
    ("qcow2", "qcow2", ""),
    ("vdi", "vdi", ""),
    ("vmdk", "vmdk", "subformat=streamOptimized"),
    ("vhd", "vpc", ""),
];

/// Uploads of every format made by qemu-img from random layouts of `size` bytes, and
/// their guest data as qemu-img reads it.
fn sources(q: &Qemu, dir: &Path, size: u64, seed: u64) -> Vec<Arc<Source>> {
    FORMATS
        .iter()
        .enumerate()
        .map(|(i, &(glance, qfmt, opts))| {
            let seed = seed.wrapping_mul(31).wrapping_add(i as u64 + 1);
            // The layout is built in raw (streamOptimized cannot be written in place),
            // then converted; the guest data is what qemu-img reads back.
            let layout = dir.join(format!("layout-{seed}.raw"));
            q.build(&Layout::random(size, 6, seed), "raw", "", &layout);
            let img = dir.join(format!("src-{seed}.{qfmt}"));
            let raw = dir.join(format!("guest-{seed}.raw"));
            let (l, a, b) = (
                layout.display().to_string(),
                img.display().to_string(),
                raw.display().to_string(),
            );
            let mut args = vec!["convert", "-f", "raw", "-O", qfmt];
            if qfmt == "qcow2" {
                args.push("-c");
            }
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([l.as_str(), a.as_str()]);
            q.img(&args);
            q.img(&["convert", "-f", qfmt, "-O", "raw", a.as_str(), b.as_str()]);
            let _ = std::fs::remove_file(&layout);
            let s = Source {
                glance,
                qemu_format: qfmt,
                bytes: std::fs::read(&img).expect("source"),
                guest: std::fs::read(&raw).expect("guest data"),
            };
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file(&raw);
            Arc::new(s)
        })
        .collect()
}

/// What a client learned while importing one source.
#[derive(Default)]
struct Outcome {
    /// Imports it saw interrupted (its task failed with "interrupted").
    interrupted: usize,
}

/// Creates an image of `src` and drives it to `active` (by stage and import, or by
/// one `PUT /file` when `direct`), retrying whatever a crash interrupted, until
/// `limit`. Returns the image id.
fn import_until_active(
    shared: &Shared,
    src: &Source,
    name: &str,
    limit: Duration,
    direct: bool,
    outcome: &mut Outcome,
) -> String {
    let agent = agent();
    let started = Instant::now();
    let mut id: Option<String> = None;
    let mut seen_tasks: HashSet<String> = HashSet::new();
    let pause = || std::thread::sleep(Duration::from_millis(30));
    loop {
        assert!(
            started.elapsed() < limit,
            "{name}: not active after {limit:?} (image {id:?})"
        );
        let base = shared.base();
        let Some(image_id) = id.clone() else {
            let body = format!(
                r#"{{"name":"{name}","disk_format":"{}","container_format":"bare"}}"#,
                src.glance
            );
            match call(&agent, &base, "POST", "/v2/images", Some(body.as_bytes())) {
                Ok((201, b)) => id = json(&b)["id"].as_str().map(str::to_string),
                Ok((s, b)) => panic!("{name}: create answered {s}: {}", json(&b)),
                Err(_) => pause(),
            }
            continue;
        };
        let img = match call(
            &agent,
            &base,
            "GET",
            &format!("/v2/images/{image_id}"),
            None,
        ) {
            Ok((200, b)) => json(&b),
            Ok((s, b)) => panic!("{name}: GET image {image_id} answered {s}: {}", json(&b)),
            Err(_) => {
                pause();
                continue;
            }
        };
        // Every task of a queued image ended, and in failure only by an interruption.
        if img["status"] == "queued" {
            let path = format!("/v2/images/{image_id}/tasks");
            if let Ok((200, b)) = call(&agent, &base, "GET", &path, None) {
                for task in json(&b)["tasks"].as_array().cloned().unwrap_or_default() {
                    let t = task["id"].as_str().unwrap_or("").to_string();
                    if seen_tasks.contains(&t) {
                        continue;
                    }
                    let message = task["message"].as_str().unwrap_or("");
                    assert!(
                        task["status"] == "failure" && message.contains("interrupted"),
                        "{name}: image {image_id} is queued and its task did not fail by an \
                         interruption: {task}"
                    );
                    seen_tasks.insert(t);
                    outcome.interrupted += 1;
                }
            }
        }
        let import = |agent: &ureq::Agent| {
            call(
                agent,
                &base,
                "POST",
                &format!("/v2/images/{image_id}/import"),
                Some(br#"{"method":{"name":"glance-direct"}}"#),
            )
        };
        match img["status"].as_str().unwrap_or("") {
            "active" => return image_id,
            "queued" if direct => {
                let put = call(
                    &agent,
                    &base,
                    "PUT",
                    &format!("/v2/images/{image_id}/file"),
                    Some(&src.bytes),
                );
                match put {
                    Ok((204 | 409, _)) | Err(_) => {}
                    Ok((s, b)) => panic!("{name}: PUT /file answered {s}: {}", json(&b)),
                }
            }
            "saving" => pause(),
            "queued" => {
                let staged = call(
                    &agent,
                    &base,
                    "PUT",
                    &format!("/v2/images/{image_id}/stage"),
                    Some(&src.bytes),
                );
                match staged {
                    Ok((204, _)) => {
                        let _ = import(&agent);
                    }
                    Ok((409, _)) | Err(_) => pause(),
                    Ok((s, b)) => panic!("{name}: stage answered {s}: {}", json(&b)),
                }
            }
            "uploading" => match import(&agent) {
                Ok((202, _)) => {}
                Ok((409, _)) | Err(_) => pause(),
                Ok((s, b)) => panic!("{name}: import answered {s}: {}", json(&b)),
            },
            "importing" => pause(),
            other => panic!("{name}: unexpected image status {other:?}: {img}"),
        }
    }
}

/// Creates an image of `src`, stages it and starts its import, once, whatever fails;
/// returns the image id if it was created.
fn start_import(shared: &Shared, src: &Source, name: &str) -> Option<String> {
    let agent = agent();
    let base = shared.base();
    let body = format!(
        r#"{{"name":"{name}","disk_format":"{}","container_format":"bare"}}"#,
        src.glance
    );
    let id = match call(&agent, &base, "POST", "/v2/images", Some(body.as_bytes())) {
        Ok((201, b)) => json(&b)["id"].as_str()?.to_string(),
        _ => return None,
    };
    if let Ok((204, _)) = call(
        &agent,
        &base,
        "PUT",
        &format!("/v2/images/{id}/stage"),
        Some(&src.bytes),
    ) {
        let _ = call(
            &agent,
            &base,
            "POST",
            &format!("/v2/images/{id}/import"),
            Some(br#"{"method":{"name":"glance-direct"}}"#),
        );
    }
    Some(id)
}

/// Deletes image `id`, retrying across crashes until the service says it is gone.
fn delete_until_gone(shared: &Shared, id: &str, limit: Duration) {
    let agent = agent();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < limit,
            "image {id} not deleted after {limit:?}"
        );
        let base = shared.base();
        match call(&agent, &base, "DELETE", &format!("/v2/images/{id}"), None) {
            Ok((204 | 404, _)) => {}
            Ok((s, b)) => panic!("DELETE {id} answered {s}: {}", json(&b)),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(30));
                continue;
            }
        }
        match call(&agent, &base, "GET", &format!("/v2/images/{id}"), None) {
            Ok((404, _)) => return,
            Ok((s, b)) => panic!(
                "image {id} still answers {s} after its delete: {}",
                json(&b)
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(30)),
        }
    }
}

/// Every image, following the pages of `GET /v2/images` (`next` links).
fn list_images(agent: &ureq::Agent, base: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut path = "/v2/images?limit=1000".to_string();
    loop {
        let (s, b) = call(agent, base, "GET", &path, None)?;
        if s != 200 {
            return Err(format!("GET {path} answered {s}"));
        }
        let page = json(&b);
        out.extend(page["images"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => path = next.to_string(),
            None => return Ok(out),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Regular files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The catalogue as the database holds it: images (id → status, task) and tasks
/// (id → image, status, message).
struct Catalogue {
    images: BTreeMap<String, (String, Option<String>)>,
    tasks: BTreeMap<String, (String, String, String)>,
}

fn catalogue(db: &Path) -> Catalogue {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the catalogue");
    let mut images = BTreeMap::new();
    let mut st = c
        .prepare("SELECT id, status, task_id FROM images")
        .expect("images");
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .expect("images");
    for r in rows {
        let (id, v): (String, (String, Option<String>)) = r.expect("image row");
        images.insert(id, v);
    }
    let mut tasks = BTreeMap::new();
    let mut st = c
        .prepare("SELECT id, image_id, status, message FROM tasks")
        .expect("tasks");
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
        .expect("tasks");
    for r in rows {
        let (id, v): (String, (String, String, String)) = r.expect("task row");
        tasks.insert(id, v);
    }
    Catalogue { images, tasks }
}

/// Checks every invariant against the running service at `base`, its data directory,
/// and what the clients expect: `expected` maps each image that must be active to its
/// source; `deleted` images must be gone. Returns the catalogue.
fn check_invariants(
    base: &str,
    data: &Path,
    expected: &HashMap<String, Arc<Source>>,
    deleted: &[String],
) -> Catalogue {
    let agent = agent();
    let listed = list_images(&agent, base).expect("list images");
    let mut active: HashSet<String> = HashSet::new();
    for img in &listed {
        let id = img["id"].as_str().expect("id").to_string();
        let status = img["status"].as_str().unwrap_or("");
        assert!(
            status == "active" || status == "queued",
            "image {id} is {status}, not active or queued: {img}"
        );
        if status != "active" {
            continue;
        }
        active.insert(id.clone());
        let (s, bytes) =
            call(&agent, base, "GET", &format!("/v2/images/{id}/file"), None).expect("download");
        assert_eq!(s, 200, "download of active image {id}");
        assert_eq!(img["size"], bytes.len() as u64, "size of {id}");
        assert_eq!(
            img["checksum"].as_str(),
            Some(hex(&Md5::digest(&bytes)).as_str()),
            "MD5 of {id}"
        );
        assert_eq!(
            img["os_hash_value"].as_str(),
            Some(hex(&Sha512::digest(&bytes)).as_str()),
            "SHA-512 of {id}"
        );
        if let Some(src) = expected.get(&id) {
            assert_eq!(
                img["disk_format"], "raw",
                "{id} ({}) is stored as raw",
                src.qemu_format
            );
            assert!(
                bytes == src.guest,
                "image {id} ({} upload): stored bytes differ from the guest data",
                src.qemu_format
            );
        }
    }
    for id in expected.keys() {
        assert!(active.contains(id), "image {id} is not active");
    }
    for id in deleted {
        assert!(
            !listed.iter().any(|i| i["id"] == id.as_str()),
            "deleted image {id} is listed"
        );
    }
    let ws = files_under(&data.join("workspace"));
    assert!(ws.is_empty(), "files left in the workspace: {ws:?}");
    let store: Vec<PathBuf> = files_under(&data.join("store"));
    let stored: HashSet<String> = store
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    for p in &store {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(
            active.contains(name),
            "store object {} belongs to no active image",
            p.display()
        );
    }
    for id in &active {
        assert!(stored.contains(id), "active image {id} has no store object");
    }
    let cat = catalogue(&data.join("vimport.db"));
    // The API shows the catalogue: the same images, in the same statuses.
    let api: BTreeMap<String, String> = listed
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap_or("").to_string(),
                i["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let db: BTreeMap<String, String> = cat
        .images
        .iter()
        .map(|(id, (status, _))| (id.clone(), status.clone()))
        .collect();
    assert_eq!(api, db, "the listing and the catalogue differ");
    for (id, (image, status, message)) in &cat.tasks {
        assert!(
            status == "success" || status == "failure",
            "task {id} of image {image} is {status} ({message})"
        );
        let Some((img_status, _)) = cat.images.get(image) else {
            panic!("task {id} belongs to image {image}, which is gone");
        };
        if status == "success" {
            assert_eq!(
                img_status, "active",
                "task {id} succeeded but {image} is not active"
            );
        }
    }
    // An active image has exactly one successful task (the rest failed); a queued one
    // has none.
    for (id, (status, _)) in &cat.images {
        let successes = cat
            .tasks
            .values()
            .filter(|(image, s, _)| image == id && s == "success")
            .count();
        let want = usize::from(status == "active");
        assert_eq!(
            successes, want,
            "{status} image {id} has {successes} successful tasks"
        );
    }
    for id in deleted {
        assert!(
            !cat.images.contains_key(id),
            "deleted image {id} in the catalogue"
        );
        assert!(
            !cat.tasks.values().any(|(image, _, _)| image == id),
            "tasks of deleted image {id} left behind"
        );
    }
    cat
}

/// What was in flight at a kill, from the service's own view just before it.
fn steps_in_flight(base: &str) -> Vec<&'static str> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    let Ok(images) = list_images(&agent, base) else {
        return vec![];
    };
    let mut steps = Vec::new();
    for img in images {
        match img["status"].as_str() {
            Some("uploading") => steps.push("staging"),
            Some("saving") => steps.push("PUT /file (receiving or importing)"),
            Some("importing") => {
                let t = img["os_glance_import_task"].as_str().unwrap_or("");
                let Ok((200, b)) = call(&agent, base, "GET", &format!("/v2/tasks/{t}"), None)
                else {
                    continue;
                };
                let m = json(&b)["message"].as_str().unwrap_or("").to_string();
                steps.push(if m.starts_with("converting") {
                    "converting"
                } else if m.starts_with("computing") {
                    "hashing"
                } else if m.starts_with("storing") {
                    "storing"
                } else if m.starts_with("waiting for a worker") {
                    "queued for a worker"
                } else {
                    "inspecting"
                });
            }
            _ => {}
        }
    }
    steps
}

/// The random soak: `clients` clients each import every format `per_client` times (and
/// delete every third image they imported) while the service is SIGKILLed `kills`
/// times at seeded random moments. Returns the kills counted by step in flight.
fn random_soak(
    q: &Qemu,
    seed: u64,
    clients: usize,
    per_client: usize,
    kills: usize,
    image_size: u64,
) -> BTreeMap<&'static str, usize> {
    let dir = tempdir();
    let data = dir.path().join("data");
    let log = dir.path().join("vimport.log");
    let srcs = sources(q, dir.path(), image_size, seed);
    let env = [
        ("VIMPORT_MAX_WORKERS", "2"),
        ("VIMPORT_CONVERT_RATE_LIMIT", "32M"),
    ];
    let mut proc = start(&data, &env, &log);
    let shared = Arc::new(Shared {
        base: RwLock::new(proc.base.clone()),
    });
    let expected: Arc<Mutex<HashMap<String, Arc<Source>>>> = Arc::default();
    let deleted: Arc<Mutex<Vec<String>>> = Arc::default();
    let interrupted = Arc::new(AtomicUsize::new(0));
    let limit = Duration::from_secs(300);
    let mut handles = Vec::new();
    for c in 0..clients {
        let (shared, srcs) = (shared.clone(), srcs.clone());
        let (expected, deleted, interrupted) =
            (expected.clone(), deleted.clone(), interrupted.clone());
        handles.push(std::thread::spawn(move || {
            let mut outcome = Outcome::default();
            let mut n = 0;
            for round in 0..per_client {
                for k in 0..srcs.len() {
                    // Each client starts at a different format.
                    let src = &srcs[(k + c) % srcs.len()];
                    let name = format!("c{c}-r{round}-{}", src.glance);
                    n += 1;
                    if n % 4 == 0 {
                        // Deleted while its import runs (or whatever step it reached).
                        if let Some(id) = start_import(&shared, src, &name) {
                            delete_until_gone(&shared, &id, limit);
                            deleted.lock().unwrap().push(id);
                        }
                        continue;
                    }
                    let id =
                        import_until_active(&shared, src, &name, limit, n % 5 == 0, &mut outcome);
                    if n % 3 == 0 {
                        delete_until_gone(&shared, &id, limit);
                        deleted.lock().unwrap().push(id);
                    } else {
                        expected.lock().unwrap().insert(id, src.clone());
                    }
                }
            }
            interrupted.fetch_add(outcome.interrupted, Ordering::SeqCst);
        }));
    }
    // The killer, on the test's thread.
    let mut rng = Rng::new(seed);
    let mut by_step: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut done_kills = 0;
    while done_kills < kills {
        let wait = Duration::from_millis(150 + rng.below(900));
        let t = Instant::now();
        while t.elapsed() < wait && !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        let steps = steps_in_flight(&proc.base);
        proc.kill9();
        done_kills += 1;
        if steps.is_empty() {
            *by_step.entry("idle").or_default() += 1;
        }
        for s in steps {
            *by_step.entry(s).or_default() += 1;
        }
        proc = start(&data, &env, &log);
        shared.set(&proc.base);
    }
    for h in handles {
        h.join().expect("client");
    }
    let expected = expected.lock().unwrap().clone();
    let deleted = deleted.lock().unwrap().clone();
    check_invariants(&proc.base, &data, &expected, &deleted);
    // And once more after a clean restart: recovery must not undo finished work.
    proc.kill9();
    let proc = start(&data, &env, &log);
    check_invariants(&proc.base, &data, &expected, &deleted);
    eprintln!(
        "soak seed {seed}: {} images ({} deleted, some during their import) by {clients} clients, {done_kills} kills \
         (imports seen interrupted: {}), kills by step in flight: {by_step:?}",
        expected.len() + deleted.len(),
        deleted.len(),
        interrupted.load(Ordering::SeqCst)
    );
    by_step.insert("total kills", done_kills);
    by_step
}

/// What the catalogue must say of an image whose first import was aborted at `step`.
fn expect_after(step: &str, cat: &Catalogue, id: &str) {
    let mut tasks: Vec<(&String, &(String, String, String))> = cat
        .tasks
        .iter()
        .filter(|(_, (image, _, _))| image == id)
        .collect();
    tasks.sort_by_key(|(_, (_, status, _))| status == "success");
    let statuses: Vec<&str> = tasks.iter().map(|(_, (_, s, _))| s.as_str()).collect();
    match step {
        // No task existed yet: one import, which succeeded.
        "stage.receiving" | "stage.received" => assert_eq!(statuses, ["success"], "{step}"),
        // The stored object was complete and its checksums known: recovery records it,
        // the same task succeeds and the client never imports again.
        "store.moved" | "store.recorded" => assert_eq!(statuses, ["success"], "{step}"),
        // Anything earlier is undone: the interrupted task failed, a retry succeeded.
        _ => {
            assert_eq!(statuses, ["failure", "success"], "{step}");
            assert!(tasks[0].1 .2.contains("interrupted"), "{step}: {tasks:?}");
        }
    }
}

/// Aborts the service at `step` during an import of `src` (or a delete), restarts it
/// without fail points and checks what recovery made of it.
fn fail_point_case(src: &Arc<Source>, step: &str, direct: bool, dir: &Path) {
    let how = if direct { "file" } else { "stage" };
    let data = dir.join(format!("fp-{step}-{}-{how}", src.glance));
    let log = dir.join(format!("fp-{step}-{}-{how}.log", src.glance));
    let armed = format!("{step}=abort");
    let deleting = step.starts_with("delete.");
    let limit = Duration::from_secs(60);
    let armed_env = [(failpoint::ENV, armed.as_str())];
    let mut proc = start(&data, if deleting { &[] } else { &armed_env }, &log);
    let shared = Arc::new(Shared {
        base: RwLock::new(proc.base.clone()),
    });
    let mut expected = HashMap::new();
    let mut deleted = Vec::new();
    let id;
    if deleting {
        id = import_until_active(&shared, src, step, limit, false, &mut Outcome::default());
        proc.kill9();
        proc = start(&data, &armed_env, &log);
        shared.set(&proc.base);
        let agent = agent();
        let r = call(
            &agent,
            &proc.base,
            "DELETE",
            &format!("/v2/images/{id}"),
            None,
        );
        assert!(r.is_err(), "{step}: the delete was answered: {r:?}");
        assert!(
            proc.wait_death(limit),
            "{step}: the fail point did not fire"
        );
        proc = start(&data, &[], &log);
        shared.set(&proc.base);
        delete_until_gone(&shared, &id, limit);
        deleted.push(id.clone());
    } else {
        let client = {
            let (shared, src, step) = (shared.clone(), src.clone(), step.to_string());
            std::thread::spawn(move || {
                import_until_active(&shared, &src, &step, limit, direct, &mut Outcome::default())
            })
        };
        assert!(
            proc.wait_death(limit),
            "{step} ({}): the fail point did not fire",
            src.glance
        );
        // Recovery alone, before any client retries: check the files at once.
        proc = start(&data, &[], &log);
        shared.set(&proc.base);
        id = client.join().expect("client");
        expected.insert(id.clone(), src.clone());
    }
    let cat = check_invariants(&proc.base, &data, &expected, &deleted);
    if !deleting {
        expect_after(step, &cat, &id);
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!("fail point {step}")),
        "{step}: no abort in the log:\n{text}"
    );
    // Recovery names what it finished or removed.
    let said = match step {
        "store.moved" => Some("recorded it"),
        "delete.recorded" => Some("removed store object"),
        _ => None,
    };
    if let Some(said) = said {
        assert!(
            text.lines().any(|l| l.contains(said) && l.contains(&id)),
            "{step}: recovery did not log '{said}' naming {id}:\n{text}"
        );
    }
}

/// The steps an import of a `glance` upload to raw reaches (a raw upload is not
/// converted).
fn steps_for(glance: &str) -> Vec<&'static str> {
    failpoint::STEPS
        .iter()
        .copied()
        .filter(|s| glance != "raw" || !s.starts_with("convert."))
        .collect()
}

/// Aborts at every step for uploads of `glances`; returns the aborts by step.
fn fail_points(q: &Qemu, glances: &[&str]) -> BTreeMap<&'static str, usize> {
    let dir = tempdir();
    let srcs = sources(q, dir.path(), 4 << 20, 7);
    let mut n = BTreeMap::new();
    for src in srcs.iter().filter(|s| glances.contains(&s.glance)) {
        for step in steps_for(src.glance) {
            fail_point_case(src, step, false, dir.path());
            *n.entry(step).or_default() += 1;
            // The same workflow behind `PUT /file` (no import call, no delete).
            if step != "import.accepted" && !step.starts_with("delete.") {
                fail_point_case(src, step, true, dir.path());
                *n.entry(step).or_default() += 1;
            }
        }
    }
    n
}

#[test]
fn killed_at_each_fail_point_recovers() {
    let Some(q) = qemu() else { return };
    let n = fail_points(&q, &["raw", "qcow2"]);
    eprintln!(
        "fail points: aborts by step (raw and qcow2 uploads, staged and PUT) {n:?}; \
         invariants held"
    );
}

#[test]
fn soak_short() {
    let Some(q) = qemu() else { return };
    let seed = std::env::var("VIMPORT_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(22);
    let by_step = random_soak(&q, seed, 4, 1, 3, 4 << 20);
    assert!(by_step["total kills"] >= 1, "the soak killed nothing");
}

#[test]
#[ignore = "long soak: cargo xtask soak"]
fn soak_long() {
    let Some(q) = qemu() else { return };
    let first = std::env::var("VIMPORT_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rounds: u64 = std::env::var("VIMPORT_SOAK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let n = fail_points(&q, &["raw", "qcow2", "vdi", "vmdk", "vhd"]);
    eprintln!("fail points: aborts by step (every format, staged and PUT) {n:?}; invariants held");
    let mut total: BTreeMap<&'static str, usize> = BTreeMap::new();
    for seed in first..first + rounds {
        for (k, v) in random_soak(&q, seed, 8, 2, 10, 8 << 20) {
            *total.entry(k).or_default() += v;
        }
    }
    eprintln!("soak: {rounds} rounds from seed {first}: kills by step in flight {total:?}; every invariant held");
}
