//! vimport's HTTP API over real HTTP on loopback: auth, the happy path on raw, and the
//! clear 4xx answers to wrong requests.

mod common;

use std::time::Duration;

use common::Vimport;
use sha2::{Digest, Sha512};

fn disk(seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; 3 << 20];
    let mut rng = vconvert_testkit::Rng::new(seed as u64);
    rng.fill(&mut v[4096..(1 << 20)]);
    v
}

#[test]
fn requests_without_the_token_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vimport::start(dir.path(), &[]);
    for (m, p) in [
        ("GET", "/v2/images"),
        ("POST", "/v2/images"),
        ("GET", "/v2/info/import"),
    ] {
        assert_eq!(v.call_with(m, p, None, None).0, 401, "{m} {p}");
        assert_eq!(v.call_with(m, p, None, Some("wrong")).0, 401, "{m} {p}");
    }
    let (s, body) = v.json("GET", "/v2/info/import", None);
    assert_eq!(s, 200);
    assert_eq!(body["import-methods"]["value"][0], "glance-direct");
}

#[test]
fn raw_upload_is_stored_with_its_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vimport::start(dir.path(), &[]);
    let bytes = disk(1);
    let id = v.create("one", "raw");
    assert_eq!(v.stage(&id, &bytes), 204);
    assert_eq!(v.image(&id)["status"], "uploading");
    let (s, _) = v.import(&id);
    assert_eq!(s, 202);
    let task = v.wait_import(&id, Duration::from_secs(60));
    assert_eq!(task["status"], "success", "{task}");
    let img = v.image(&id);
    assert_eq!(img["status"], "active");
    assert_eq!(img["disk_format"], "raw");
    assert_eq!(img["virtual_size"], bytes.len() as u64);
    assert_eq!(img["size"], bytes.len() as u64);
    assert_eq!(img["os_hash_algo"], "sha512");
    let sha: String = Sha512::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(img["os_hash_value"], sha);
    let (s, file) = v.call("GET", &format!("/v2/images/{id}/file"), None);
    assert_eq!(s, 200);
    assert!(file == bytes);
    let (ws, store) = v.files();
    assert!(ws.is_empty(), "staging copy removed: {ws:?}");
    assert_eq!(store.len(), 1);
    let (s, list) = v.json("GET", "/v2/images", None);
    assert_eq!(s, 200);
    assert_eq!(list["images"].as_array().unwrap().len(), 1);
    assert_eq!(v.call("DELETE", &format!("/v2/images/{id}"), None).0, 204);
    assert_eq!(v.call("GET", &format!("/v2/images/{id}"), None).0, 404);
    assert!(v.files().1.is_empty());
}

#[test]
fn wrong_requests_get_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vimport::start(dir.path(), &[("VIMPORT_IMAGE_SIZE_CAP", "1M")]);
    let msg = |b: &serde_json::Value| b["error"]["message"].as_str().unwrap_or("").to_string();
    let (s, b) = v.json("POST", "/v2/images", Some("{not json"));
    assert_eq!(s, 400);
    assert!(msg(&b).contains("not valid JSON"), "{b}");
    for bad in ["ploop", "ami", "qed"] {
        let (s, b) = v.json(
            "POST",
            "/v2/images",
            Some(&format!(
                r#"{{"name":"x","disk_format":"{bad}","container_format":"bare"}}"#
            )),
        );
        assert_eq!(s, 400);
        assert!(msg(&b).contains(bad) && msg(&b).contains("vhd"), "{b}");
    }
    let (s, b) = v.json(
        "POST",
        "/v2/images",
        Some(r#"{"name":"x","disk_format":"raw","container_format":"ova"}"#),
    );
    assert_eq!(s, 400, "{b}");
    // vpc is accepted and shown as vhd.
    let (s, b) = v.json(
        "POST",
        "/v2/images",
        Some(r#"{"name":"x","disk_format":"vpc","container_format":"bare"}"#),
    );
    assert_eq!((s, b["disk_format"].as_str()), (201, Some("vhd")));

    let id = v.create("x", "raw");
    let (s, b) = v.import(&id);
    assert_eq!(s, 409, "import before stage");
    assert!(msg(&b).contains("stage its data first"), "{b}");
    let (s, b) = v.json(
        "POST",
        &format!("/v2/images/{id}/import"),
        Some(r#"{"method":{"name":"copy-image"}}"#),
    );
    assert_eq!(s, 400);
    assert!(msg(&b).contains("glance-direct"), "{b}");
    // Over the size cap: refused, the image stays queued, nothing is left.
    assert_eq!(v.stage(&id, &vec![1u8; 2 << 20]), 413);
    assert_eq!(v.image(&id)["status"], "queued");
    assert!(v.files().0.is_empty());
    // The size glanceclient announces with a chunked upload is checked first.
    let (s, _, _) = v.raw(
        "PUT",
        &format!("/v2/images/{id}/stage"),
        &[
            ("X-Auth-Token", common::TOKEN),
            ("x-openstack-image-size", "2097152"),
        ],
        Some(&[1u8; 100]),
    );
    assert_eq!(s, 413);
    assert_eq!(v.image(&id)["status"], "queued");
    assert_eq!(v.stage(&id, &[1u8; 4096]), 204);
    assert_eq!(v.stage(&id, &[1u8; 4096]), 409, "stage twice");
    assert_eq!(v.call("GET", "/v2/images/nope", None).0, 404);
    assert_eq!(v.call("GET", "/v2/tasks/nope", None).0, 404);
    assert_eq!(v.call("GET", "/v1/images", None).0, 404);
}

#[test]
fn hostile_upload_fails_its_task_and_returns_to_queued() {
    let Some(q) = vconvert_testkit::qemu() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let v = Vimport::start(dir.path(), &[]);
    // A qcow2 whose backing file is a host file, declared as raw.
    let img = dir.path().join("evil.qcow2");
    q.img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        img.to_str().unwrap(),
        "1M",
    ]);
    let id = v.create("evil", "raw");
    assert_eq!(v.stage(&id, &std::fs::read(&img).unwrap()), 204);
    assert_eq!(v.import(&id).0, 202);
    let task = v.wait_import(&id, Duration::from_secs(60));
    assert_eq!(task["status"], "failure");
    let m = task["message"].as_str().unwrap();
    assert!(
        m.contains("refused") && m.contains("declared format raw") && m.contains("qcow2"),
        "{m}"
    );
    assert_eq!(v.image(&id)["status"], "queued");
    let (ws, store) = v.files();
    assert!(ws.is_empty() && store.is_empty(), "{ws:?} {store:?}");
}

// The same tests on a PostgreSQL catalogue (issue 20): skipped without a test
// server, failing in CI (`VIMPORT_REQUIRE_POSTGRES=1`).

#[test]
fn requests_without_the_token_get_401_on_postgres() {
    common::on_postgres(requests_without_the_token_get_401);
}

#[test]
fn raw_upload_is_stored_with_its_hashes_on_postgres() {
    common::on_postgres(raw_upload_is_stored_with_its_hashes);
}

#[test]
fn wrong_requests_get_clear_4xx_on_postgres() {
    common::on_postgres(wrong_requests_get_clear_4xx);
}

#[test]
fn hostile_upload_fails_its_task_and_returns_to_queued_on_postgres() {
    common::on_postgres(hostile_upload_fails_its_task_and_returns_to_queued);
}
