//! The throwaway Ceph cluster of `cargo xtask test`, for vimport's `rbd` store tests
//! (crates/import/tests/rbd.rs).
//!
//! When Ceph's programs or librbd/librados are missing they are installed from Debian's
//! packages ([`PACKAGES`], as root); then `scripts/ceph-dev.sh start` brings up one
//! monitor and one OSD on a file-backed bluestore in `target/test-ceph`, on 127.0.0.1
//! and on two free ports (so it never meets another cluster of the machine), with one
//! manager. [`Ceph`]'s drop runs `scripts/ceph-dev.sh stop`, which ends the daemons by
//! the PIDs in their pid files, and removes the directory. When `xtask` is killed
//! (Ctrl-C, SIGTERM, SIGKILL) a [`Guard`]'s trap runs the same `stop`; a cluster left
//! anyway is stopped by the next `start` in the same directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::guard::Guard;
use crate::test::{run, Apt};

/// Debian's packages for a single-node cluster and for linking vimport's `rbd` store.
pub const PACKAGES: [&str; 6] = [
    "ceph-mon",
    "ceph-mgr",
    "ceph-osd",
    "ceph-common",
    "librbd-dev",
    "librados-dev",
];

/// The programs `scripts/ceph-dev.sh` and the tests run.
const PROGRAMS: [&str; 6] = [
    "ceph-mon",
    "ceph-osd",
    "ceph-authtool",
    "monmaptool",
    "ceph",
    "rbd",
];

/// The libraries vimport's `rbd` feature links (their unversioned names, from the
/// `-dev` packages).
const LIBRARIES: [&str; 2] = ["librbd.so", "librados.so"];

/// A running test cluster; stopped and removed when dropped.
pub struct Ceph {
    script: PathBuf,
    dir: PathBuf,
    /// Its configuration file (monitors, keyring): the tests' `VIMPORT_TEST_CEPH_CONF`.
    pub conf: PathBuf,
    /// Keep the directory (its logs) after stopping: the cluster did not come up.
    keep: bool,
    /// Stops the cluster if `xtask` is killed before this is dropped.
    _guard: Guard,
}

/// Whether every program runs and every library is known to the dynamic linker.
fn available() -> bool {
    let which = |p: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
    };
    let linked = Command::new("ldconfig")
        .arg("-p")
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    PROGRAMS.iter().all(|p| which(p))
        && LIBRARIES.iter().all(|l| {
            linked
                .lines()
                .any(|line| line.trim_start().starts_with(&format!("{l} ")))
        })
}

/// A port nobody listens on at 127.0.0.1 now.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// Starts the test cluster. `Ok(None)` when Ceph is missing and cannot be installed
/// (not root) and `required` is false: the `rbd` tests are then skipped. With
/// `required` (CI) that is an error.
pub fn start(root: &Path, apt: &mut Apt, required: bool) -> Result<Option<Ceph>, String> {
    if !available() {
        let why = "Ceph (for the rbd store's tests) is missing";
        match apt.install(&PACKAGES, why) {
            Ok(()) if available() => {}
            Ok(()) => {
                return Err(format!(
                    "{} are installed but {} or {} is still missing",
                    PACKAGES.join(" "),
                    PROGRAMS.join(", "),
                    LIBRARIES.join(", ")
                ))
            }
            Err(e) if required => return Err(format!("{e} (CI: the rbd tests are mandatory)")),
            Err(e) => {
                eprintln!("cargo xtask test: {e}; the rbd store's tests are skipped");
                return Ok(None);
            }
        }
    }
    let script = root.join("scripts/ceph-dev.sh");
    let dir = root.join("target/test-ceph");
    let (v2, v1) = (free_port()?, free_port()?);
    // Armed before the start: a run killed while the cluster comes up stops it too.
    let _guard = Guard::arm(
        "the test Ceph cluster",
        &[script.as_os_str(), "stop".as_ref(), dir.as_os_str()],
    );
    let started = Instant::now();
    let mut cmd = Command::new(&script);
    cmd.arg("start")
        .arg(&dir)
        .env("CEPH_DEV_PORT", v2.to_string())
        .env("CEPH_DEV_PORT_V1", v1.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    eprintln!("$ {} start {}", script.display(), dir.display());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    // From here the cluster (or what of it started) is stopped on every path.
    let conf = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .unwrap_or_default();
    let mut ceph = Ceph {
        script,
        dir,
        conf,
        keep: false,
        _guard,
    };
    if !out.status.success() || !ceph.conf.is_file() {
        ceph.keep = true;
        return Err(format!(
            "starting the test Ceph cluster failed ({}); its logs are in {}/log",
            out.status,
            ceph.dir.display()
        ));
    }
    eprintln!(
        "test Ceph cluster up in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        ceph.conf.display()
    );
    Ok(Some(ceph))
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let stopped = run(
            "stopping the test Ceph cluster",
            Command::new(&self.script).arg("stop").arg(&self.dir),
        );
        match stopped {
            // Its daemons are gone: the sparse OSD file and the rest can go too.
            Ok(()) if self.keep => {}
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                    eprintln!("cannot remove {}: {e}", self.dir.display());
                }
            }
            Err(e) => eprintln!("cargo xtask test: {e}"),
        }
    }
}
