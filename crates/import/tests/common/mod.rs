//! Runs the real `vimport` binary on loopback for tests, and talks to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TOKEN: &str = "test-token";

thread_local! {
    /// The PostgreSQL catalogue of the test running on this thread, if it runs on
    /// PostgreSQL ([`on_postgres`]); every [`Vimport`] it starts uses it.
    static DATABASE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Whether the PostgreSQL tests must run: `VIMPORT_REQUIRE_POSTGRES=1` (`cargo xtask
/// test` sets it) or `CI` set to something true.
fn postgres_required() -> bool {
    std::env::var("VIMPORT_REQUIRE_POSTGRES").as_deref() == Ok("1")
        || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A new, empty database on the test server (`VIMPORT_TEST_POSTGRES_URL`, which
/// `cargo xtask test` sets); `None` (the test skips, saying so) without one, unless
/// PostgreSQL is required ([`postgres_required`]), where its absence fails the test.
pub fn postgres_database() -> Option<String> {
    let Ok(url) = std::env::var("VIMPORT_TEST_POSTGRES_URL") else {
        assert!(
            !postgres_required(),
            "PostgreSQL is required (VIMPORT_REQUIRE_POSTGRES=1 or CI) but VIMPORT_TEST_POSTGRES_URL is not set: run `cargo xtask test`, which starts one"
        );
        eprintln!("SKIPPED: no VIMPORT_TEST_POSTGRES_URL (`cargo xtask test` starts PostgreSQL)");
        return None;
    };
    let name = format!("vimport_it_{}", uuid::Uuid::new_v4().simple());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL {url}: {e}"));
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create the test database");
    let mut u = url::Url::parse(&url).expect("VIMPORT_TEST_POSTGRES_URL is a URL");
    u.set_path(&name);
    Some(u.to_string())
}

/// Runs `test` with every vimport it starts on a new PostgreSQL catalogue (skipped
/// as [`postgres_database`] says).
pub fn on_postgres(test: impl FnOnce()) {
    let Some(url) = postgres_database() else {
        return;
    };
    DATABASE.with(|d| *d.borrow_mut() = Some(url));
    test();
    DATABASE.with(|d| *d.borrow_mut() = None);
}

/// A running vimport.
pub struct Vimport {
    pub child: Child,
    pub base: String,
    pub data: PathBuf,
    agent: ureq::Agent,
}

impl Vimport {
    /// Starts vimport with its data in `data` and extra `VIMPORT_*` settings.
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Vimport {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vimport"));
        cmd.env_clear()
            .env("VIMPORT_DATA_DIR", data)
            .env("VIMPORT_LISTEN", "127.0.0.1:0")
            .env("VIMPORT_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = DATABASE.with(|d| d.borrow().clone()) {
            cmd.env("VIMPORT_DATABASE", url);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start vimport");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        let base = line
            .trim()
            .strip_prefix("vimport listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Vimport {
            child,
            base,
            data: data.to_path_buf(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }

    /// A request with the token; returns status and body.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        self.call_with(method, path, body, Some(TOKEN))
    }

    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> (u16, Vec<u8>) {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let mut out = Vec::new();
        resp.into_reader().read_to_end(&mut out).expect("body");
        (status, out)
    }

    /// Any request: `headers` as given (no token unless among them); returns status,
    /// response headers (lower-case names) and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> (u16, std::collections::BTreeMap<String, String>, Vec<u8>) {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let res = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let hs = resp
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                resp.header(&n)
                    .map(|v| (n.to_ascii_lowercase(), v.to_string()))
            })
            .collect();
        let mut out = Vec::new();
        resp.into_reader().read_to_end(&mut out).expect("body");
        (status, hs, out)
    }

    /// A JSON request with token `token` sent as `X-Auth-Token` (Glance's clients).
    pub fn as_user(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut headers = vec![("X-Auth-Token", token)];
        if method == "PATCH" {
            headers.push((
                "Content-Type",
                "application/openstack-images-v2.1-json-patch",
            ));
        } else if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let (s, _, b) = self.raw(method, path, &headers, body.map(str::as_bytes));
        (
            s,
            if b.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into()))
            },
        )
    }

    pub fn json(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (s, b) = self.call(method, path, body.map(str::as_bytes));
        (
            s,
            if b.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&b).expect("JSON body")
            },
        )
    }

    /// Creates an image declared as `disk_format`; returns its id.
    pub fn create(&self, name: &str, disk_format: &str) -> String {
        let (s, v) = self.json(
            "POST",
            "/v2/images",
            Some(&format!(
                r#"{{"name":"{name}","disk_format":"{disk_format}","container_format":"bare"}}"#
            )),
        );
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["status"], "queued");
        v["id"].as_str().expect("id").to_string()
    }

    pub fn stage(&self, id: &str, bytes: &[u8]) -> u16 {
        self.call("PUT", &format!("/v2/images/{id}/stage"), Some(bytes))
            .0
    }

    pub fn import(&self, id: &str) -> (u16, Value) {
        self.json(
            "POST",
            &format!("/v2/images/{id}/import"),
            Some(r#"{"method":{"name":"glance-direct"}}"#),
        )
    }

    pub fn image(&self, id: &str) -> Value {
        self.json("GET", &format!("/v2/images/{id}"), None).1
    }

    pub fn task(&self, id: &str) -> Value {
        self.json("GET", &format!("/v2/tasks/{id}"), None).1
    }

    /// The image's last task (`GET /v2/images/{id}/tasks`).
    pub fn last_task(&self, id: &str) -> Value {
        let (s, v) = self.json("GET", &format!("/v2/images/{id}/tasks"), None);
        assert_eq!(s, 200, "{v}");
        v["tasks"]
            .as_array()
            .and_then(|t| t.last())
            .cloned()
            .expect("the image has a task")
    }

    /// Polls the image until its status is not `importing`; returns its last task.
    pub fn wait_import(&self, id: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let img = self.image(id);
            if img["status"] != "importing" {
                assert!(
                    img.get("os_glance_import_task").is_none(),
                    "the import lock stays after the import: {img}"
                );
                return self.last_task(id);
            }
            assert!(
                start.elapsed() < limit,
                "import of {id} still running after {limit:?}: {img}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Files under the workspace and store.
    pub fn files(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let list = |d: PathBuf| -> Vec<PathBuf> {
            let mut v = Vec::new();
            for sub in ["", "staging", "convert"] {
                if let Ok(rd) = std::fs::read_dir(d.join(sub)) {
                    v.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
                }
            }
            v
        };
        (
            list(self.data.join("workspace")),
            list(self.data.join("store")),
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vimport {
    fn drop(&mut self) {
        self.kill();
    }
}
