//! `cargo xtask test`: the project's one test command, from a fresh machine.
//!
//! 1. `qemu-img` (the test oracle) is installed with `apt-get install qemu-utils` when
//!    missing, and OpenSSL's headers (vimport hashes with libcrypto) with
//!    `apt-get install libssl-dev pkg-config` (as root; otherwise the command says what
//!    to install).
//! 2. A Python venv under `target/test-venv` gets the real OpenStack clients
//!    (`python-glanceclient`, `openstacksdk`) and a real Keystone (`keystone`, served
//!    by `gunicorn`; `crates/import/tests/keystone.rs` sets it up and stops it) from
//!    PyPI; it is reused while its marker file names the same packages. When `python3 -m venv` fails (Debian without
//!    `python3-venv`), `python3-venv` is installed and the venv made again.
//! 3. A throwaway single-node Ceph cluster starts on loopback ([`crate::ceph`]; its
//!    Debian packages are installed when missing, as root) for the `rbd` store's tests.
//!    Without root and without Ceph they are skipped, except in CI, where that fails.
//! 4. `cargo test --workspace --release` runs with `VIMPORT_TEST_VENV` (the venv),
//!    `VCONVERT_REQUIRE_QEMU=1`, with Ceph `--features vconvert-import/rbd` and
//!    `VIMPORT_TEST_CEPH_CONF`, and, when `CI` is set, `VIMPORT_REQUIRE_CLIENTS=1`,
//!    `VIMPORT_REQUIRE_KEYSTONE=1` and `VIMPORT_REQUIRE_CEPH=1` so the client, Keystone
//!    and RBD tests fail rather than skip.
//! 5. The Ceph cluster is stopped by the PIDs of its daemons and its files removed.
//!
//! 4. A throwaway PostgreSQL ([`crate::postgres`]; `apt-get install postgresql` when
//!    missing, as root) for the PostgreSQL catalogue and several-hosts tests, its URL in
//!    `VIMPORT_TEST_POSTGRES_URL`, with `VIMPORT_REQUIRE_POSTGRES=1` so those tests fail
//!    rather than skip; stopped by its PID when the suite ends, whatever its outcome.
//!    A server that cannot be installed or started fails the command.
//!
//! No step reads standard input; every failure names the step and exits non-zero.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Python packages the client tests drive vimport with, and the Keystone (with a
/// WSGI server) the Keystone tests run. Measured on 2 cores: ~15 s for the clients,
/// ~25 s more for keystone and gunicorn (wheels from PyPI).
const CLIENT_PACKAGES: [&str; 4] = [
    "python-glanceclient",
    "openstacksdk",
    "keystone",
    "gunicorn",
];

/// Written into the venv once every package is installed; its content is the package
/// list, so a venv made for another list (or half made) is rebuilt.
const READY_MARKER: &str = ".vconvert-test-venv";

/// The modules and programs a usable venv has.
const VENV_CHECK: &str = "import glanceclient, openstack, keystone.server.wsgi, gunicorn";

/// Runs `cmd` with no standard input; `Err` says what failed and how.
pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("$ {}", show(cmd));
    match cmd.stdin(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{what}: `{}` failed ({s})", show(cmd))),
        Err(e) => Err(format!("{what}: cannot run `{}`: {e}", show(cmd))),
    }
}

/// Whether `cmd` runs and exits 0, its output discarded.
pub(crate) fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"0")
}

/// Installs Debian packages; `apt-get update` runs once per xtask run.
pub(crate) struct Apt {
    updated: bool,
}

impl Apt {
    pub(crate) fn install(&mut self, packages: &[&str], why: &str) -> Result<(), String> {
        let list = packages.join(" ");
        if !is_root() || !quiet_ok(Command::new("apt-get").arg("--version")) {
            return Err(format!(
                "{why}; install it with `apt-get install {list}` (as root) and run again"
            ));
        }
        eprintln!("{why}: installing {list}");
        let apt = || {
            let mut c = Command::new("apt-get");
            c.env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        if !self.updated {
            run("apt-get update", apt().arg("update"))?;
            self.updated = true;
        }
        run(
            &format!("installing {list}"),
            apt()
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages),
        )
    }

    /// Installs `packages` unless `found` already holds, and checks it does after
    /// (`still_missing` when not).
    fn ensure(
        &mut self,
        found: impl Fn() -> bool,
        packages: &[&str],
        why: &str,
        still_missing: &str,
    ) -> Result<(), String> {
        if found() {
            return Ok(());
        }
        self.install(packages, why)?;
        if found() {
            Ok(())
        } else {
            Err(still_missing.into())
        }
    }
}

/// Makes sure `qemu-img` and `qemu-io` run.
fn ensure_qemu(apt: &mut Apt) -> Result<(), String> {
    let have = |p: &str| quiet_ok(Command::new(p).arg("--version"));
    apt.ensure(
        || have("qemu-img") && have("qemu-io"),
        &["qemu-utils"],
        "qemu-img (the test oracle) is missing",
        "qemu-utils is installed but qemu-img or qemu-io still does not run",
    )
}

/// Makes sure vimport's build finds OpenSSL (`openssl-sys` asks `pkg-config`).
fn ensure_openssl(apt: &mut Apt) -> Result<(), String> {
    apt.ensure(
        || quiet_ok(Command::new("pkg-config").args(["--exists", "openssl"])),
        &["libssl-dev", "pkg-config"],
        "OpenSSL's headers (vimport's hashing builds on libcrypto) are missing",
        "libssl-dev is installed but pkg-config still does not find openssl",
    )
}

/// The venv's Python.
fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin/python3")
}

fn venv_ready(venv: &Path) -> bool {
    let marker = std::fs::read_to_string(venv.join(READY_MARKER)).unwrap_or_default();
    marker.trim() == CLIENT_PACKAGES.join(" ")
        && venv.join("bin/glance").is_file()
        && venv.join("bin/keystone-manage").is_file()
        && venv.join("bin/gunicorn").is_file()
        && quiet_ok(Command::new(venv_python(venv)).args(["-c", VENV_CHECK]))
}

/// `python3 -m venv DIR` from scratch (a half-made venv is removed first).
fn make_venv(venv: &Path) -> Result<(), String> {
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .map_err(|e| format!("cannot remove the old venv {}: {e}", venv.display()))?;
    }
    run(
        "creating the test venv",
        Command::new("python3").args(["-m", "venv"]).arg(venv),
    )
}

/// Makes (or reuses) the venv with the OpenStack clients; returns its directory.
fn ensure_venv(root: &Path, apt: &mut Apt) -> Result<PathBuf, String> {
    let venv = root.join("target/test-venv");
    if venv_ready(&venv) {
        eprintln!("reusing the client venv {}", venv.display());
        return Ok(venv);
    }
    let start = Instant::now();
    if !quiet_ok(Command::new("python3").arg("--version")) {
        apt.install(&["python3", "python3-venv"], "python3 is missing")?;
    }
    if make_venv(&venv).is_err() {
        // Debian's python3 has no ensurepip without python3-venv.
        apt.install(&["python3-venv"], "`python3 -m venv` failed")?;
        make_venv(&venv)?;
    }
    run(
        "installing the OpenStack clients and Keystone into the test venv (PyPI must be \
         reachable)",
        Command::new(venv_python(&venv))
            .args(["-m", "pip", "install", "--quiet"])
            .args(CLIENT_PACKAGES)
            .env("PIP_NO_INPUT", "1")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )?;
    if !quiet_ok(Command::new(venv_python(&venv)).args(["-c", VENV_CHECK])) {
        return Err(format!(
            "the venv {} was made but `{VENV_CHECK}` fails in it",
            venv.display()
        ));
    }
    std::fs::write(venv.join(READY_MARKER), CLIENT_PACKAGES.join(" ") + "\n")
        .map_err(|e| format!("cannot write {}: {e}", venv.join(READY_MARKER).display()))?;
    eprintln!(
        "client venv ready in {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        venv.display()
    );
    Ok(venv)
}

/// Whether the `CI` variable is set to something true.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// `cargo xtask test [ARGS]`: ARGS are appended to `cargo test --workspace --release`
/// (e.g. `--test clients` or `-- --nocapture`).
pub fn test(root: &Path, args: &[String]) -> bool {
    let mut apt = Apt { updated: false };
    let setup = ensure_qemu(&mut apt)
        .and_then(|()| ensure_openssl(&mut apt))
        .and_then(|()| ensure_venv(root, &mut apt));
    let venv = match setup {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cargo xtask test: {e}");
            return false;
        }
    };
    // Stopped (by PID) when `ceph` is dropped, at the end of this function.
    let ceph = match crate::ceph::start(root, &mut apt, in_ci()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cargo xtask test: {e}");
            return false;
        }
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--workspace", "--release"]);
    if let Some(ceph) = &ceph {
        cmd.args(["--features", "vconvert-import/rbd"])
            .env("VIMPORT_TEST_CEPH_CONF", &ceph.conf)
            .env("CEPH_CONF", &ceph.conf);
    }
    cmd.args(args)
        .current_dir(root)
        .env("VIMPORT_TEST_VENV", &venv)
        .env("VCONVERT_REQUIRE_QEMU", "1");
    if in_ci() {
        cmd.env("VIMPORT_REQUIRE_CLIENTS", "1")
            .env("VIMPORT_REQUIRE_KEYSTONE", "1")
            .env("VIMPORT_REQUIRE_CEPH", "1");
    }
    // PostgreSQL is required like qemu-img: installed (as root) when missing, and its
    // tests fail rather than skip without it.
    let pg = match crate::postgres::Postgres::start(&mut |p, why| apt.install(p, why)) {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("cargo xtask test: PostgreSQL: {e}");
            return false;
        }
    };
    cmd.env(crate::postgres::URL_ENV, &pg.url)
        .env("VIMPORT_REQUIRE_POSTGRES", "1");
    match run("the test suite", &mut cmd) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("cargo xtask test: {e}");
            false
        }
    }
}
