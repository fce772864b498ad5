//! vimport in a cloud: a real Keystone (from the tests' venv, SQLite, fernet tokens,
//! served by gunicorn on a loopback port), vimport with `[keystone]`, and the real
//! clients configured only as a cloud user is: `OS_AUTH_URL`, `OS_USERNAME`,
//! `OS_PASSWORD`, `OS_PROJECT_NAME`, the domains and the region; vimport is found
//! through Keystone's catalogue (an `image` service with a public endpoint per test,
//! each test in its own region).
//!
//! One Keystone serves every test of this file: set up once (`keystone-manage
//! db_sync`, `fernet_setup`, `credential_setup`, `bootstrap`), it is stopped by its
//! PID when the test process ends (a shell holding its PID kills it when its
//! standard input, a pipe from this process, closes). Each test makes its own
//! projects (A, B, C) and users (members, a reader) with the Identity API.
//!
//! The venv comes from `VIMPORT_TEST_VENV` (set by `cargo xtask test`), else
//! `target/test-venv`; it needs `keystone`, `gunicorn`, `python-glanceclient` and
//! `openstacksdk`. Without them the tests are reported skipped, unless
//! `VIMPORT_REQUIRE_KEYSTONE=1` (CI), where they fail.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long an import of a few MiB may take on a loaded 2-core machine.
const IMPORT_LIMIT: Duration = Duration::from_secs(120);
/// How long Keystone may take to start answering.
const START_LIMIT: Duration = Duration::from_secs(90);
/// Keystone's admin password (`keystone-manage bootstrap`).
const ADMIN_PASSWORD: &str = "admin-secret";
/// vimport's service user (role `service` on project `service`).
const SERVICE_USER: &str = "glance";
const SERVICE_PASSWORD: &str = "glance-secret";
/// Every test user's password.
const USER_PASSWORD: &str = "user-secret";

// ---------------------------------------------------------------------------------
// The venv

fn venv() -> Option<PathBuf> {
    let candidate = match std::env::var_os("VIMPORT_TEST_VENV") {
        Some(v) => PathBuf::from(v),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv"),
    };
    let needed = ["keystone-manage", "gunicorn", "glance", "python3"];
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|b| !candidate.join("bin").join(b).is_file())
        .collect();
    if missing.is_empty() {
        return Some(candidate);
    }
    let why = format!(
        "the venv {} lacks {} (make it with `cargo xtask test`, or python3 -m venv DIR && \
         DIR/bin/pip install keystone gunicorn python-glanceclient openstacksdk, then \
         VIMPORT_TEST_VENV=DIR)",
        candidate.display(),
        missing.join(", ")
    );
    if std::env::var("VIMPORT_REQUIRE_KEYSTONE").as_deref() == Ok("1") {
        panic!("the Keystone tests are required (VIMPORT_REQUIRE_KEYSTONE=1): {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

/// A request; status, headers we look at, JSON body (or the text as a string).
fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let subject = resp
        .header("X-Subject-Token")
        .or_else(|| resp.header("WWW-Authenticate"))
        .map(str::to_string);
    let mut text = String::new();
    resp.into_reader()
        .read_to_string(&mut text)
        .expect("response body");
    (
        status,
        subject,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

// ---------------------------------------------------------------------------------
// Keystone

/// gunicorn serving Keystone, stopped (by the PID its shell holds) when `stdin`
/// closes: on [`Gunicorn::stop`], or when the test process ends.
struct Gunicorn {
    shell: Child,
    stdin: Option<ChildStdin>,
    url: String,
}

impl Gunicorn {
    /// Serves the Keystone of `dir` (its `keystone.conf`) on a free port; with
    /// `owns_dir`, `dir` is removed once gunicorn stopped.
    fn start(venv: &Path, dir: &Path, owns_dir: bool) -> Gunicorn {
        let port = free_port();
        let log = std::fs::File::create(dir.join(format!("gunicorn-{port}.log"))).unwrap();
        // The shell starts gunicorn, prints its PID, and kills it by that PID when
        // its standard input ends.
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(
                r#""$@" & pid=$!; echo "$pid"; while read -r _; do :; done; kill "$pid"; wait "$pid"; [ -z "$KS_REMOVE" ] || rm -rf "$KS_REMOVE""#,
            )
            .arg("sh")
            .arg(venv.join("bin/gunicorn"))
            // One thread: Keystone on SQLite (the tests' database) fails a request
            // with "database is locked" when another writes at the same moment, and
            // every login writes (the user's `last_active_at`).
            .args(["--no-control-socket", "--workers", "1", "--threads", "1"])
            .args(["--graceful-timeout", "2", "--timeout", "120"])
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(dir)
            .arg("ks_wsgi:application")
            .env("OS_KEYSTONE_CONFIG_FILES", dir.join("keystone.conf"))
            .env("KS_REMOVE", if owns_dir { dir.as_os_str() } else { "".as_ref() })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start gunicorn");
        let mut first = String::new();
        BufReader::new(shell.stdout.take().unwrap())
            .read_line(&mut first)
            .expect("gunicorn's PID");
        assert!(first.trim().parse::<u32>().is_ok(), "no PID: {first:?}");
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            if let Ok(r) = agent().get(&format!("{url}/v3")).call() {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "Keystone on {url} does not answer after {START_LIMIT:?}; log:\n{}",
                std::fs::read_to_string(dir.join(format!("gunicorn-{port}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Gunicorn {
            stdin: shell.stdin.take(),
            shell,
            url,
        }
    }

    /// Stops gunicorn and waits for it.
    fn stop(&mut self) {
        drop(self.stdin.take());
        let _ = self.shell.wait();
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Keystone every test uses, with its admin token and vimport's service user.
struct Keystone {
    venv: PathBuf,
    dir: PathBuf,
    server: Gunicorn,
    admin: String,
    /// Role ids by name.
    roles: std::collections::HashMap<String, String>,
    image_service: String,
}

/// Runs a setup command, which must succeed.
fn must(what: &str, cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `dir/keystone.conf` (a Keystone whose database and log are in `dir`, whose
/// token and credential keys are in `keys` and whose tokens live `token_seconds`) and
/// the WSGI entry point gunicorn serves; returns the configuration's path.
fn write_conf(dir: &Path, keys: &Path, token_seconds: u32) -> PathBuf {
    let conf = dir.join("keystone.conf");
    std::fs::write(
        &conf,
        format!(
            "[DEFAULT]\nlog_file = {log}\n\
             [database]\nconnection = sqlite:///{db}\n\
             [identity]\npassword_hash_rounds = 4\n\
             [token]\nprovider = fernet\nexpiration = {token_seconds}\n\
             [fernet_tokens]\nkey_repository = {fernet}\n\
             [credential]\nkey_repository = {cred}\n",
            log = dir.join("keystone.log").display(),
            db = dir.join("keystone.db").display(),
            fernet = keys.join("fernet-keys").display(),
            cred = keys.join("credential-keys").display(),
        ),
    )
    .unwrap();
    // Keystone's WSGI app parses sys.argv as its own options: hide gunicorn's.
    std::fs::write(
        dir.join("ks_wsgi.py"),
        "import sys\nsys.argv = sys.argv[:1]\n\
         from keystone.server import wsgi\n\
         application = wsgi.initialize_public_application()\n",
    )
    .unwrap();
    conf
}

impl Keystone {
    fn get() -> Option<&'static Keystone> {
        static KS: OnceLock<Option<Keystone>> = OnceLock::new();
        KS.get_or_init(|| venv().map(Keystone::setup)).as_ref()
    }

    fn setup(venv: PathBuf) -> Keystone {
        let started = Instant::now();
        // Removed by the gunicorn shell when the test process ends.
        let dir = vconvert_testkit::tempdir().keep();
        let conf = write_conf(&dir, &dir, 3600);
        let manage = |args: &[&str]| {
            let mut c = Command::new(venv.join("bin/keystone-manage"));
            c.arg("--config-file").arg(&conf).args(args);
            must(&format!("keystone-manage {}", args.join(" ")), &mut c);
        };
        manage(&["db_sync"]);
        let me = String::from_utf8(
            Command::new("id")
                .arg("-un")
                .output()
                .expect("id -un")
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        let group = String::from_utf8(
            Command::new("id")
                .arg("-gn")
                .output()
                .expect("id -gn")
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        let owner = ["--keystone-user", &me, "--keystone-group", &group];
        manage(&[&["fernet_setup"][..], &owner].concat());
        manage(&[&["credential_setup"][..], &owner].concat());
        manage(&[
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-region-id",
            "RegionOne",
        ]);
        let server = Gunicorn::start(&venv, &dir, true);
        let admin = password_token(&server.url, "admin", ADMIN_PASSWORD, "admin");
        let mut ks = Keystone {
            venv,
            dir,
            server,
            admin,
            roles: Default::default(),
            image_service: String::new(),
        };
        let (s, _, v) = ks.call("GET", "/v3/roles", None);
        assert_eq!(s, 200, "{v}");
        for r in v["roles"].as_array().unwrap() {
            ks.roles.insert(
                r["name"].as_str().unwrap().into(),
                r["id"].as_str().unwrap().into(),
            );
        }
        if !ks.roles.contains_key("service") {
            let (s, _, v) = ks.call(
                "POST",
                "/v3/roles",
                Some(json!({"role": {"name": "service"}})),
            );
            assert_eq!(s, 201, "{v}");
            ks.roles
                .insert("service".into(), v["role"]["id"].as_str().unwrap().into());
        }
        let service = ks.project("service");
        ks.user(SERVICE_USER, SERVICE_PASSWORD, &service, "service");
        // What the operator does with `openstack service create image`.
        let (s, _, v) = ks.call(
            "POST",
            "/v3/services",
            Some(json!({"service": {"type": "image", "name": "glance", "enabled": true}})),
        );
        assert_eq!(s, 201, "{v}");
        ks.image_service = v["service"]["id"].as_str().unwrap().into();
        eprintln!(
            "Keystone set up in {:.1} s at {}",
            started.elapsed().as_secs_f64(),
            ks.server.url
        );
        ks
    }

    /// An Identity API call with the admin token.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Option<String>, Value) {
        http(
            method,
            &format!("{}{path}", self.server.url),
            &[("X-Auth-Token", &self.admin)],
            body,
        )
    }

    /// A second Keystone, served on a port of its own: a snapshot of this one's database
    /// (SQLite's backup, consistent while this one writes) and the same keys, so that it
    /// validates this one's tokens for everything created so far without writing to its
    /// database. The tokens it issues live `token_seconds`; its directory goes with it.
    fn replica(&self, token_seconds: u32) -> Gunicorn {
        let dir = vconvert_testkit::tempdir().keep();
        write_conf(&dir, &self.dir, token_seconds);
        must(
            "snapshot Keystone's database",
            Command::new(self.venv.join("bin/python3"))
                .arg("-c")
                .arg("import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))")
                .arg(self.dir.join("keystone.db"))
                .arg(dir.join("keystone.db")),
        );
        Gunicorn::start(&self.venv, &dir, true)
    }

    /// A new project in the default domain; its id.
    fn project(&self, name: &str) -> String {
        let (s, _, v) = self.call(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": name, "domain_id": "default"}})),
        );
        assert_eq!(s, 201, "create project {name}: {v}");
        v["project"]["id"].as_str().unwrap().into()
    }

    /// A new user with `role` on `project`.
    fn user(&self, name: &str, password: &str, project: &str, role: &str) {
        let (s, _, v) = self.call(
            "POST",
            "/v3/users",
            Some(json!({"user": {"name": name, "password": password, "domain_id": "default"}})),
        );
        assert_eq!(s, 201, "create user {name}: {v}");
        let user = v["user"]["id"].as_str().unwrap();
        let role_id = &self.roles[role];
        let (s, _, v) = self.call(
            "PUT",
            &format!("/v3/projects/{project}/users/{user}/roles/{role_id}"),
            None,
        );
        assert_eq!(s, 204, "grant {role} to {name}: {v}");
    }

    /// What the operator does with `openstack endpoint create --region R image
    /// public|internal URL`.
    fn register(&self, region: &str, url: &str) {
        let (s, _, v) = self.call(
            "POST",
            "/v3/regions",
            Some(json!({"region": {"id": region}})),
        );
        assert_eq!(s, 201, "create region {region}: {v}");
        for interface in ["public", "internal"] {
            let (s, _, v) = self.call(
                "POST",
                "/v3/endpoints",
                Some(json!({"endpoint": {
                    "service_id": self.image_service,
                    "interface": interface,
                    "region_id": region,
                    "url": url,
                }})),
            );
            assert_eq!(s, 201, "create endpoint: {v}");
        }
    }
}

/// `[keystone]` lines for a service user with a password.
fn password_login(user: &str, project: &str) -> String {
    format!(
        "username = \"{user}\"\npassword = \"{SERVICE_PASSWORD}\"\nproject_name = \"{project}\"\n\
         user_domain_name = \"Default\"\nproject_domain_name = \"Default\""
    )
}

/// A project-scoped token for `user` (password `password`) on `project`.
fn password_token(keystone: &str, user: &str, password: &str, project: &str) -> String {
    let (s, token, v) = http(
        "POST",
        &format!("{keystone}/v3/auth/tokens"),
        &[],
        Some(json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }})),
    );
    assert_eq!(s, 201, "token for {user} on {project}: {v}");
    token.expect("X-Subject-Token")
}

/// One test's tenants: projects A, B, C (names prefixed by the test's tag) and
/// users `<tag>-a-member`, `<tag>-a-reader`, `<tag>-b-member`, `<tag>-c-member`.
struct Tenants {
    tag: String,
    a: String,
    b: String,
}

impl Tenants {
    fn new(ks: &Keystone, tag: &str) -> Tenants {
        let a = ks.project(&format!("{tag}-A"));
        let b = ks.project(&format!("{tag}-B"));
        let c = ks.project(&format!("{tag}-C"));
        ks.user(&format!("{tag}-a-member"), USER_PASSWORD, &a, "member");
        ks.user(&format!("{tag}-a-reader"), USER_PASSWORD, &a, "reader");
        ks.user(&format!("{tag}-b-member"), USER_PASSWORD, &b, "member");
        ks.user(&format!("{tag}-c-member"), USER_PASSWORD, &c, "member");
        Tenants {
            tag: tag.into(),
            a,
            b,
        }
    }

    /// `who` is `a-member`, `a-reader`, `b-member` or `c-member`: its user name and
    /// project name.
    fn login(&self, who: &str) -> (String, String) {
        let project = who[..1].to_ascii_uppercase();
        (
            format!("{}-{who}", self.tag),
            format!("{}-{project}", self.tag),
        )
    }

    /// A token for `who`, asked of Keystone directly.
    fn token(&self, ks_url: &str, who: &str) -> String {
        let (user, project) = self.login(who);
        password_token(ks_url, &user, USER_PASSWORD, &project)
    }
}

// ---------------------------------------------------------------------------------
// vimport

/// vimport with `[keystone]` (auth_url `keystone`), stopped on drop.
struct Vimport {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Vimport {
    /// `login` is vimport's own credentials, as `[keystone]` lines.
    fn start(dir: &Path, keystone: &str, cache_seconds: u64, login: &str) -> Vimport {
        let data = dir.join("vimport-data");
        let log = dir.join("vimport.log");
        let conf = dir.join("vimport.toml");
        // The file as an operator writes it.
        std::fs::write(
            &conf,
            format!(
                "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n\n[keystone]\n\
                 auth_url = \"{keystone}/v3\"\n{login}\n\
                 cache_seconds = {cache_seconds}\ncache_size = 1000\ntimeout = 30\n",
                data.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vimport"))
            .arg("--config")
            .arg(&conf)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start vimport");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("vimport's first line");
        let addr = line
            .trim()
            .strip_prefix("vimport listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "vimport's first line is {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Vimport {
            child,
            url: if addr.starts_with("http") {
                addr
            } else {
                format!("http://{addr}")
            },
            dir: dir.to_path_buf(),
        }
    }

    fn call(&self, method: &str, path: &str, token: &str) -> (u16, Option<String>, Value) {
        http(
            method,
            &format!("{}{path}", self.url),
            &[("X-Auth-Token", token)],
            None,
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vimport.log")).unwrap_or_default()
    }

    /// Polls image `id` (as `token`'s caller) until `active`.
    fn wait_active(&self, id: &str, token: &str) -> Value {
        let start = Instant::now();
        loop {
            let (s, _, img) = self.call("GET", &format!("/v2/images/{id}"), token);
            assert_eq!(s, 200, "{img}");
            match img["status"].as_str() {
                Some("active") => return img,
                Some("queued") if img.get("os_glance_import_task").is_none() => {
                    let (_, _, t) = self.call("GET", &format!("/v2/images/{id}/tasks"), token);
                    if t["tasks"].as_array().is_some_and(|t| {
                        !t.is_empty() && t.iter().all(|t| t["status"] == "failure")
                    }) {
                        panic!("import of {id} failed: {t}\nlog:\n{}", self.log());
                    }
                }
                _ => {}
            }
            assert!(
                start.elapsed() < IMPORT_LIMIT,
                "image {id} not active after {IMPORT_LIMIT:?}: {img}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vimport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// The clients, as a cloud user runs them

/// What one client run left.
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

/// A cloud user's environment: Keystone credentials and a region, nothing else.
struct Cloud<'a> {
    ks: &'a Keystone,
    tenants: &'a Tenants,
    /// The vimport the clients talk to (its log goes into a failure's message).
    vimport: &'a Vimport,
    region: String,
    home: PathBuf,
}

impl Cloud<'_> {
    /// `program ARGS` as `who`, standard input closed (glance reads a non-tty stdin
    /// as image data), a private `HOME`, and only the `OS_*` variables of a cloud user.
    fn run(&self, who: &str, program: &Path, args: &[&str]) -> Run {
        let (user, project) = self.tenants.login(who);
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" <&-"#)
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("OS_AUTH_URL", format!("{}/v3", self.ks.server.url))
            .env("OS_USERNAME", user)
            .env("OS_PASSWORD", USER_PASSWORD)
            .env("OS_PROJECT_NAME", project)
            .env("OS_USER_DOMAIN_NAME", "Default")
            .env("OS_PROJECT_DOMAIN_NAME", "Default")
            .env("OS_REGION_NAME", &self.region)
            .env("OS_IDENTITY_API_VERSION", "3")
            .output()
            .expect("run a client");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn glance(&self, who: &str, args: &[&str]) -> Run {
        self.run(who, &self.ks.venv.join("bin/glance"), args)
    }

    fn glance_ok(&self, who: &str, args: &[&str]) -> String {
        let r = self.glance(who, args);
        assert!(
            r.ok,
            "glance {} as {who}:\n{r}\nvimport's log:\n{}",
            args.join(" "),
            self.vimport.log()
        );
        r.stdout
    }

    /// `sdk_keystone.py OP ARGS` as `who`: `Ok(result)` or `Err(error)`.
    fn sdk(&self, who: &str, op: &str, args: Value) -> Result<Value, Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/sdk_keystone.py");
        let r = self.run(
            who,
            &self.ks.venv.join("bin/python3"),
            &[&script.display().to_string(), op, &args.to_string()],
        );
        let v: Value = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "openstacksdk {op} as {who}:\n{r}\nvimport's log:\n{}",
                self.vimport.log()
            )
        });
        match v.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => Err(v["error"].clone()),
        }
    }
}

/// Cells of a prettytable's `Property | Value` rows.
fn props(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.strip_prefix('|')?.strip_suffix('|'))
        .filter_map(|l| {
            let mut cells = l.split('|').map(str::trim);
            Some((cells.next()?.to_string(), cells.next()?.to_string()))
        })
        .collect()
}

/// The `ID` column of `glance image-list`.
fn list_ids(out: &str) -> Vec<String> {
    props(out)
        .into_keys()
        .filter(|k| k != "ID" && !k.is_empty())
        .collect()
}

/// Bytes that are not all zero (so a download that lost them shows).
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

// =================================================================================

/// The cloud workflow: a member of A imports with the glance CLI and shares the image
/// with B; B (openstacksdk) accepts and downloads the same bytes; a reader of A reads
/// but cannot create, upload or download; C sees nothing of A's; nobody but an admin
/// makes an image public; the owner is the token's project.
#[test]
fn cloud_users_import_share_and_are_held_to_glances_policy() {
    let Some(ks) = Keystone::get() else { return };
    let dir = vconvert_testkit::tempdir();
    let v = Vimport::start(
        dir.path(),
        &ks.server.url,
        300,
        &password_login(SERVICE_USER, "service"),
    );
    let tenants = Tenants::new(ks, "share");
    let cloud = Cloud {
        ks,
        tenants: &tenants,
        vimport: &v,
        region: "region-share".into(),
        home: dir.path().join("home"),
    };
    std::fs::create_dir_all(&cloud.home).unwrap();
    ks.register(&cloud.region, &v.url);

    let data = payload(3 << 20);
    let src = dir.path().join("golden.raw");
    std::fs::write(&src, &data).unwrap();
    let created = props(&cloud.glance_ok(
        "a-member",
        &[
            "image-create-via-import",
            "--name",
            "golden",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--visibility",
            "shared",
            "--file",
            &src.display().to_string(),
        ],
    ));
    let id = created["id"].clone();
    let a_token = tenants.token(&ks.server.url, "a-member");
    let img = v.wait_active(&id, &a_token);
    assert_eq!(
        img["owner"],
        tenants.a.as_str(),
        "owner from the token: {img}"
    );
    assert_eq!(img["size"], json!(data.len()));

    // A's reader reads, and nothing else.
    let shown = props(&cloud.glance_ok("a-reader", &["image-show", &id]));
    assert_eq!(shown["status"], "active");
    assert!(list_ids(&cloud.glance_ok("a-reader", &["image-list"])).contains(&id));
    let r = cloud.glance(
        "a-reader",
        &[
            "image-create",
            "--name",
            "nope",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a reader created an image:\n{r}"
    );
    assert!(r.stderr.contains("add_image"), "{r}");
    let got = dir.path().join("reader-got");
    let r = cloud.glance(
        "a-reader",
        &["image-download", "--file", &got.display().to_string(), &id],
    );
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a reader downloaded:\n{r}"
    );
    let r = cloud.glance("a-reader", &["image-update", "--name", "renamed", &id]);
    assert!(!r.ok && r.stderr.contains("403"), "a reader renamed:\n{r}");
    let r = cloud.glance("a-reader", &["member-create", &id, &tenants.b]);
    assert!(!r.ok && r.stderr.contains("403"), "a reader shared:\n{r}");
    // publicize_image is admin only; a member of A may not move the image to B.
    let r = cloud.glance("a-member", &["image-update", "--visibility", "public", &id]);
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a member publicized:\n{r}"
    );
    assert!(r.stderr.contains("publicize_image"), "{r}");
    let r = cloud.glance(
        "a-member",
        &[
            "image-create",
            "--name",
            "for-b",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--owner",
            &tenants.b,
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a member created for B:\n{r}"
    );

    // Before sharing, B and C see nothing.
    for who in ["b-member", "c-member"] {
        let r = cloud.glance(who, &["image-show", &id]);
        assert!(
            !r.ok && r.stderr.contains("404"),
            "{who} sees A's image:\n{r}"
        );
    }
    cloud.glance_ok("a-member", &["member-create", &id, &tenants.b]);
    // A's reader sees the members (get_members), cannot remove one.
    let members = cloud.glance_ok("a-reader", &["member-list", "--image-id", &id]);
    assert!(members.contains(&tenants.b), "{members}");
    let r = cloud.glance("a-reader", &["member-delete", &id, &tenants.b]);
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a reader removed a member:\n{r}"
    );
    // communitize_image: a member of the owner may, a reader may not.
    let community = props(&cloud.glance_ok(
        "a-member",
        &[
            "image-create",
            "--name",
            "community",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--visibility",
            "community",
        ],
    ));
    assert_eq!(community["visibility"], "community");
    let r = cloud.glance(
        "a-reader",
        &["image-update", "--visibility", "private", &community["id"]],
    );
    assert!(
        !r.ok && r.stderr.contains("403"),
        "a reader changed visibility:\n{r}"
    );

    // B (openstacksdk, endpoint from the catalogue) accepts and downloads it.
    let b_project = cloud.sdk("b-member", "project_id", json!({})).unwrap();
    assert_eq!(b_project, tenants.b.as_str());
    let listed = cloud.sdk("b-member", "list", json!({})).unwrap();
    assert!(
        !listed.as_array().unwrap().contains(&json!(id)),
        "listed before accepting"
    );
    let m = cloud
        .sdk(
            "b-member",
            "accept",
            json!({"image": id, "status": "accepted"}),
        )
        .unwrap();
    assert_eq!(m["status"], "accepted", "{m}");
    let listed = cloud.sdk("b-member", "list", json!({})).unwrap();
    assert!(listed.as_array().unwrap().contains(&json!(id)), "{listed}");
    let out = dir.path().join("b-got");
    cloud
        .sdk("b-member", "download", json!({"image": id, "output": out}))
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == data,
        "B downloaded other bytes"
    );
    // B may not change A's image.
    let r = cloud.glance("b-member", &["image-update", "--name", "mine", &id]);
    assert!(
        !r.ok && r.stderr.contains("403"),
        "B renamed A's image:\n{r}"
    );

    // C, not a member, still sees nothing of it (shown, listed, downloaded).
    let r = cloud.glance("c-member", &["image-show", &id]);
    assert!(!r.ok && r.stderr.contains("404"), "C sees A's image:\n{r}");
    for filter in [
        &[][..],
        &["--visibility", "shared", "--member-status", "all"][..],
    ] {
        let mut args = vec!["image-list"];
        args.extend_from_slice(filter);
        let ids = list_ids(&cloud.glance_ok("c-member", &args));
        assert!(!ids.contains(&id), "C lists A's image with {filter:?}");
    }
    let e = cloud
        .sdk(
            "c-member",
            "download",
            json!({"image": id, "output": dir.path().join("c")}),
        )
        .unwrap_err();
    assert_eq!(e["status"], 404, "{e}");
    // C's own images are its own: created with its project as owner.
    let c_image = cloud
        .sdk("c-member", "create", json!({"name": "c-own"}))
        .unwrap();
    let c_token = tenants.token(&ks.server.url, "c-member");
    let (s, _, img) = v.call(
        "GET",
        &format!("/v2/images/{}", c_image.as_str().unwrap()),
        &c_token,
    );
    assert_eq!(s, 200, "{img}");
    assert_ne!(img["owner"], tenants.a.as_str());
    let (s, _, _) = v.call(
        "GET",
        &format!("/v2/images/{}", c_image.as_str().unwrap()),
        &a_token,
    );
    assert_eq!(s, 404, "A sees C's private image");
}

/// A revoked token (`DELETE /v3/auth/tokens`) is refused once its cached answer
/// expires; a made-up token at once (401 with `WWW-Authenticate`).
#[test]
fn revoked_and_invalid_tokens_are_refused() {
    let Some(ks) = Keystone::get() else { return };
    let dir = vconvert_testkit::tempdir();
    let cache_seconds = 2;
    // vimport logs in with an application credential of its service user.
    let glance_token = password_token(&ks.server.url, SERVICE_USER, SERVICE_PASSWORD, "service");
    let (s, _, me) = http(
        "GET",
        &format!("{}/v3/auth/tokens", ks.server.url),
        &[
            ("X-Auth-Token", &glance_token),
            ("X-Subject-Token", &glance_token),
        ],
        None,
    );
    assert_eq!(s, 200, "{me}");
    let (s, _, ac) = http(
        "POST",
        &format!(
            "{}/v3/users/{}/application_credentials",
            ks.server.url,
            me["token"]["user"]["id"].as_str().unwrap()
        ),
        &[("X-Auth-Token", &glance_token)],
        Some(json!({"application_credential": {"name": "vimport-revoke"}})),
    );
    assert_eq!(s, 201, "{ac}");
    let login = format!(
        "application_credential_id = \"{}\"\napplication_credential_secret = \"{}\"",
        ac["application_credential"]["id"].as_str().unwrap(),
        ac["application_credential"]["secret"].as_str().unwrap()
    );
    let v = Vimport::start(dir.path(), &ks.server.url, cache_seconds, &login);
    let tenants = Tenants::new(ks, "revoke");
    let token = tenants.token(&ks.server.url, "a-member");
    let (s, _, body) = v.call("GET", "/v2/images", &token);
    assert_eq!(s, 200, "{body}\n{}", v.log());

    let (s, auth, body) = v.call("GET", "/v2/images", "gAAAAAmade-up-token");
    assert_eq!(s, 401, "{body}");
    assert_eq!(
        auth.as_deref(),
        Some(format!("Keystone uri=\"{}/v3\"", ks.server.url).as_str()),
        "WWW-Authenticate"
    );
    // A valid token scoped to no project: Glance has no owner for it.
    let (user, _) = tenants.login("a-member");
    let (s, unscoped, body) = http(
        "POST",
        &format!("{}/v3/auth/tokens", ks.server.url),
        &[],
        Some(
            json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": USER_PASSWORD}}}}}),
        ),
    );
    assert_eq!(s, 201, "{body}");
    assert!(body["token"].get("project").is_none(), "{body}");
    let (s, _, body) = v.call("GET", "/v2/images", &unscoped.unwrap());
    assert_eq!(s, 403, "{body}");
    assert!(
        body.to_string().contains("not scoped to a project"),
        "{body}"
    );

    // The user revokes its own token.
    let (s, _, body) = http(
        "DELETE",
        &format!("{}/v3/auth/tokens", ks.server.url),
        &[("X-Auth-Token", &token), ("X-Subject-Token", &token)],
        None,
    );
    assert_eq!(s, 204, "revoke: {body}");
    // Refused at the latest when the cached answer expires.
    let limit = Duration::from_secs(cache_seconds) + Duration::from_secs(60);
    let start = Instant::now();
    loop {
        let (s, _, body) = v.call("GET", "/v2/images", &token);
        if s == 401 {
            break;
        }
        assert_eq!(s, 200, "{body}");
        assert!(
            start.elapsed() < limit,
            "a revoked token still accepted after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // And stays refused (the refusal is cached too, Keystone is still asked after).
    let (s, _, _) = v.call("GET", "/v2/images", &token);
    assert_eq!(s, 401);
    // The same user's new token works.
    let fresh = tenants.token(&ks.server.url, "a-member");
    let (s, _, body) = v.call("GET", "/v2/images", &fresh);
    assert_eq!(s, 200, "{body}");
}

/// Keystone stopped: 503 naming Keystone, never a pass. (A second Keystone, a replica
/// of the first on another port, is the one stopped: the other tests' stays up.)
#[test]
fn keystone_stopped_answers_503() {
    let Some(ks) = Keystone::get() else { return };
    let dir = vconvert_testkit::tempdir();
    let tenants = Tenants::new(ks, "down");
    let token = tenants.token(&ks.server.url, "a-member");
    let mut second = ks.replica(3600);
    // No caching: every request asks Keystone.
    let v = Vimport::start(
        dir.path(),
        &second.url,
        0,
        &password_login(SERVICE_USER, "service"),
    );
    let (s, _, body) = v.call("GET", "/v2/images", &token);
    assert_eq!(s, 200, "{body}\n{}", v.log());
    second.stop();
    for t in [token.as_str(), "gAAAAAmade-up-token"] {
        let (s, _, body) = v.call("GET", "/v2/images", t);
        assert_eq!(s, 503, "{body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("Keystone") && msg.contains(&second.url),
            "{msg}"
        );
    }
}

/// An expired token is refused when it expires, even with its answer cached for
/// longer. (Its Keystone, a replica, issues tokens that live 20 s.)
#[test]
fn expired_tokens_are_refused_though_cached() {
    let Some(ks) = Keystone::get() else { return };
    let dir = vconvert_testkit::tempdir();
    let tenants = Tenants::new(ks, "expiry");
    let short = ks.replica(20);
    let v = Vimport::start(
        dir.path(),
        &short.url,
        3600,
        &password_login(SERVICE_USER, "service"),
    );
    let token = tenants.token(&short.url, "a-member");
    let issued = Instant::now();
    let (s, _, body) = v.call("GET", "/v2/images", &token);
    assert_eq!(s, 200, "{body}\n{}", v.log());
    assert!(
        issued.elapsed() < Duration::from_secs(19),
        "the first call took {:?}: too slow to see the token valid",
        issued.elapsed()
    );
    // Keystone's `expires_at` has a one-second grain.
    std::thread::sleep(Duration::from_secs(21).saturating_sub(issued.elapsed()));
    let (s, _, body) = v.call("GET", "/v2/images", &token);
    assert_eq!(s, 401, "an expired token passed: {body}\n{}", v.log());
}

/// Keystone refuses vimport's own token (revoked: its user was disabled and enabled
/// again): vimport logs in again and answers, rather than failing until its
/// token would have been renewed.
#[test]
fn service_token_is_renewed_when_keystone_refuses_it() {
    let Some(ks) = Keystone::get() else { return };
    let dir = vconvert_testkit::tempdir();
    let tenants = Tenants::new(ks, "renew");
    // A service user of its own, so that revoking its tokens touches no other test.
    let project = ks.project("renew-service");
    ks.user("renew-glance", SERVICE_PASSWORD, &project, "service");
    let v = Vimport::start(
        dir.path(),
        &ks.server.url,
        0,
        &password_login("renew-glance", "renew-service"),
    );
    let token = tenants.token(&ks.server.url, "a-member");
    let (s, _, body) = v.call("GET", "/v2/images", &token);
    assert_eq!(s, 200, "{body}\n{}", v.log());
    // Disabling a user revokes every token it holds; enabled again, it logs in anew.
    let (s, _, users) = ks.call("GET", "/v3/users?name=renew-glance", None);
    assert_eq!(s, 200, "{users}");
    let user = users["users"][0]["id"].as_str().unwrap().to_string();
    for enabled in [false, true] {
        let (s, _, body) = ks.call(
            "PATCH",
            &format!("/v3/users/{user}"),
            Some(json!({"user": {"enabled": enabled}})),
        );
        assert_eq!(s, 200, "{body}");
    }
    // Keystone's revocation events have a one-second grain: a token issued in the
    // second of the revocation is refused too, so vimport may answer 503 for that
    // second, and must then answer again.
    let limit = Duration::from_secs(60);
    let start = Instant::now();
    loop {
        let (s, _, body) = v.call("GET", "/v2/images", &token);
        if s == 200 {
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert!(
            start.elapsed() < limit,
            "vimport still refused after {limit:?}: {body}\n{}",
            v.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
