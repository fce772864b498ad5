//! Several vimport hosts over one PostgreSQL catalogue and one shared store directory
//! (issue 20): two real `vimport` processes on different ports. What one host creates
//! the other lists and imports; a staged upload stays on the host that received it and
//! its import, requested through the other host, runs there; a host killed (SIGKILL)
//! mid-conversion has its task failed by the other after its lease, naming it, with
//! the image `queued` and nothing in the store, and cleans its own workspace when it
//! comes back; unbound (web-download) tasks are claimed by one host each.
//!
//! Skipped without `VIMPORT_TEST_POSTGRES_URL` (set by `cargo xtask test`), failing
//! instead when PostgreSQL is mandatory (`VIMPORT_REQUIRE_POSTGRES=1`, which `cargo
//! xtask test` sets, or `CI`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Vimport;
use vconvert_engine::{ConvertOptions, Format, OpenOptions, Options};

/// Seconds a host holds a task without renewing it (it renews every third): short,
/// so a dead host is noticed soon, but with room for a busy test machine.
const LEASE: &str = "6";

fn disk(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut rng = vconvert_testkit::Rng::new(seed);
    rng.fill(&mut v[..len / 2]);
    v
}

/// Host `name` with its data in `dir/name`, the store in `dir/store`.
fn host(dir: &Path, name: &str, extra: &[(&str, &str)]) -> Vimport {
    let store = dir.join("store");
    let store = store.to_str().unwrap();
    let mut env = vec![
        ("VIMPORT_HOST_ID", name),
        ("VIMPORT_STORE_DIR", store),
        ("VIMPORT_TASK_LEASE", LEASE),
    ];
    env.extend_from_slice(extra);
    Vimport::start(&dir.join(name), &env)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for sub in ["", "staging", "convert"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            v.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    v
}

/// The host a task was bound to, from the catalogue itself.
fn task_host(url: &str, task_id: &str) -> Option<String> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query_one("SELECT host FROM tasks WHERE id=$1", &[&task_id])
        .unwrap()
        .get(0)
}

/// Polls `until` on `what` every 50 ms, failing after `limit`.
fn wait_for(what: &str, limit: Duration, mut until: impl FnMut() -> bool) {
    let start = Instant::now();
    while !until() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn listed(v: &Vimport, id: &str) -> bool {
    let (s, list) = v.json("GET", "/v2/images", None);
    assert_eq!(s, 200, "{list}");
    list["images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["id"] == id)
}

#[test]
fn two_hosts_share_images_and_imports_run_where_the_data_is() {
    let Some(url) = common::postgres_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = [("VIMPORT_DATABASE", url.as_str())];
    let a = host(dir.path(), "host-a", &db);
    let b = host(dir.path(), "host-b", &db);

    // Created on A, listed and seen on B.
    let id = a.create("made-on-a", "raw");
    assert!(listed(&b, &id));
    assert_eq!(b.image(&id)["name"], "made-on-a");

    // Staged on A, imported through B: the task is bound to A, which holds the data,
    // and B answers for it; the image is downloaded through B from the shared store.
    let bytes = disk(4 << 20, 1);
    assert_eq!(a.stage(&id, &bytes), 204);
    let (s, v) = b.import(&id);
    assert_eq!(s, 202, "{v}");
    let task = b.wait_import(&id, Duration::from_secs(60));
    assert_eq!(task["status"], "success", "{task}");
    let task_id = task["id"].as_str().unwrap();
    assert_eq!(task_host(&url, task_id).as_deref(), Some("host-a"));
    assert_eq!(a.image(&id)["status"], "active");
    let (s, file) = b.call("GET", &format!("/v2/images/{id}/file"), None);
    assert_eq!(s, 200);
    assert!(file == bytes, "B serves what A imported");
    assert!(files(&dir.path().join("host-a/workspace")).is_empty());

    // An upload through B (PUT /file) runs on B and is downloaded through A.
    let id2 = b.create("uploaded-on-b", "raw");
    let bytes2 = disk(2 << 20, 2);
    let (s, v) = b.call("PUT", &format!("/v2/images/{id2}/file"), Some(&bytes2));
    assert_eq!(s, 204, "{}", String::from_utf8_lossy(&v));
    assert_eq!(
        task_host(&url, b.last_task(&id2)["id"].as_str().unwrap()).as_deref(),
        Some("host-b")
    );
    let (s, file) = a.call("GET", &format!("/v2/images/{id2}/file"), None);
    assert_eq!(s, 200);
    assert!(file == bytes2);

    // Deleted through A, gone for B; a staged upload on B of an image deleted
    // through A is removed from B's workspace by B.
    assert_eq!(a.call("DELETE", &format!("/v2/images/{id}"), None).0, 204);
    assert_eq!(b.json("GET", &format!("/v2/images/{id}"), None).0, 404);
    let id3 = a.create("staged-on-b", "raw");
    assert_eq!(b.stage(&id3, &disk(1 << 20, 3)), 204);
    let staged = dir.path().join("host-b/workspace/staging").join(&id3);
    assert!(staged.is_file());
    assert_eq!(a.call("DELETE", &format!("/v2/images/{id3}"), None).0, 204);
    wait_for(
        "B removes the staged upload of an image deleted through A",
        Duration::from_secs(30),
        || !staged.exists(),
    );
    let store: Vec<_> = std::fs::read_dir(dir.path().join("store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(store, vec![id2.clone()], "only the active image is stored");
}

/// A qcow2 image (written by the engine) of `len` bytes of random data, and that data.
fn qcow2(dir: &Path, len: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut data = vec![0u8; len];
    vconvert_testkit::Rng::new(seed).fill(&mut data);
    let raw = dir.join(format!("guest-{seed}.raw"));
    std::fs::write(&raw, &data).unwrap();
    let src = vconvert_engine::open(&raw, Some(Format::Raw), &OpenOptions::default()).unwrap();
    let out = dir.join(format!("upload-{seed}.qcow2"));
    vconvert_engine::convert(
        src.as_ref(),
        &out,
        Format::Qcow2,
        Options::new(),
        &ConvertOptions::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&raw).unwrap();
    std::fs::remove_file(&out).unwrap();
    (bytes, data)
}

/// Waits until task `task_id`'s message says it is converting.
fn wait_converting(v: &Vimport, task_id: &str) {
    wait_for(
        "the import reaches its conversion",
        Duration::from_secs(60),
        || {
            let t = v.task(task_id);
            assert!(
                matches!(t["status"].as_str(), Some("pending" | "processing")),
                "{t}"
            );
            t["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("converting")
        },
    );
}

#[test]
fn a_host_killed_mid_conversion_has_its_task_failed_by_the_other() {
    let Some(url) = common::postgres_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = [("VIMPORT_DATABASE", url.as_str())];
    // A converts at 1 MiB/s, so its 16 MiB conversion is still running when it is
    // killed (the test waits for the conversion to start, not for a time).
    let slow = [db[0], ("VIMPORT_CONVERT_RATE_LIMIT", "1M")];
    let mut a = host(dir.path(), "host-a", &slow);
    let b = host(dir.path(), "host-b", &db);
    let (upload, guest) = qcow2(dir.path(), 16 << 20, 7);

    // Staged on A, import requested through B: A runs it, and is killed (SIGKILL)
    // in the middle of the conversion.
    let id = b.create("dies-on-a", "qcow2");
    assert_eq!(a.stage(&id, &upload), 204);
    let (s, v) = b.import(&id);
    assert_eq!(s, 202, "{v}");
    let task_id = b.image(&id)["os_glance_import_task"]
        .as_str()
        .unwrap()
        .to_string();
    wait_converting(&b, &task_id);
    assert_eq!(task_host(&url, &task_id).as_deref(), Some("host-a"));
    let a_workspace = dir.path().join("host-a/workspace");
    assert!(
        files(&a_workspace).len() >= 2,
        "a conversion in progress on A has its upload and output: {:?}",
        files(&a_workspace)
    );
    a.kill();
    assert!(
        !files(&a_workspace).is_empty(),
        "the killed host left its workspace files"
    );

    // B fails the task once A's lease is over, naming A; the image is queued again.
    wait_for(
        "B gives up the dead host's import",
        Duration::from_secs(60),
        || b.image(&id)["status"] == "queued",
    );
    let task = b.task(&task_id);
    assert_eq!(task["status"], "failure", "{task}");
    let message = task["message"].as_str().unwrap();
    assert!(message.contains("host host-a"), "{message}");
    assert!(message.contains("stage the image again"), "{message}");
    assert_eq!(task_host(&url, &task_id).as_deref(), Some("host-a"));
    let img = b.image(&id);
    assert_eq!(img["os_glance_failed_import"], "file", "{img}");
    assert!(img.get("os_glance_import_task").is_none(), "{img}");
    assert!(
        files(&dir.path().join("store")).is_empty(),
        "nothing of the abandoned import is in the store"
    );

    // A comes back: it cleans its own workspace, and the failed task stays failed
    // (it never runs twice).
    let a = host(dir.path(), "host-a", &db);
    assert!(
        files(&a_workspace).is_empty(),
        "A cleaned its workspace at start: {:?}",
        files(&a_workspace)
    );
    let again = a.task(&task_id);
    assert_eq!(again["status"], "failure");
    assert_eq!(again["message"], task["message"]);
    assert_eq!(a.image(&id)["status"], "queued");

    // And the image imports: staged on B this time, requested through A; the
    // conversion's result is the guest data.
    assert_eq!(b.stage(&id, &upload), 204);
    assert_eq!(a.import(&id).0, 202);
    let task = a.wait_import(&id, Duration::from_secs(60));
    assert_eq!(task["status"], "success", "{task}");
    assert_eq!(
        task_host(&url, task["id"].as_str().unwrap()).as_deref(),
        Some("host-b")
    );
    let (s, file) = a.call("GET", &format!("/v2/images/{id}/file"), None);
    assert_eq!(s, 200);
    assert!(file == guest, "the stored image is the guest data");
    assert!(files(&dir.path().join("host-a/workspace")).is_empty());
    assert!(files(&dir.path().join("host-b/workspace")).is_empty());
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM tasks WHERE image_id=$1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "one failed task, one that succeeded");
}

#[test]
fn web_download_tasks_are_claimed_by_either_host_and_end_once() {
    let Some(url) = common::postgres_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = [("VIMPORT_DATABASE", url.as_str())];
    // Unbound tasks (web-download) go to whichever host claims them first; none runs
    // twice. Each import here fails fast (the URI's host refuses connections), which
    // is enough to count the claims.
    let filter = [
        db[0],
        ("VIMPORT_WEB_DOWNLOAD_ALLOWED_PORTS", "9"),
        ("VIMPORT_MAX_WORKERS", "2"),
    ];
    let a = host(dir.path(), "host-a", &filter);
    let b = host(dir.path(), "host-b", &filter);
    let mut tasks = Vec::new();
    for n in 0..12 {
        let v = if n % 2 == 0 { &a } else { &b };
        let id = v.create(&format!("wd-{n}"), "raw");
        let (s, body) = v.json(
            "POST",
            &format!("/v2/images/{id}/import"),
            Some(r#"{"method":{"name":"web-download","uri":"http://127.0.0.1:9/disk.raw"}}"#),
        );
        assert_eq!(s, 202, "{body}");
        tasks.push(id);
    }
    for id in &tasks {
        let t = a.wait_import(id, Duration::from_secs(60));
        assert_eq!(t["status"], "failure", "{t}");
        assert_eq!(a.image(id)["status"], "queued");
    }
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let rows = c.query("SELECT host, status FROM tasks", &[]).unwrap();
    assert_eq!(rows.len(), tasks.len(), "one task per import");
    for r in &rows {
        let h: Option<String> = r.get(0);
        assert!(
            matches!(h.as_deref(), Some("host-a") | Some("host-b")),
            "each task was claimed by one host: {h:?}"
        );
    }
}
