//! A throwaway PostgreSQL server for the test suite, from Debian's `postgresql`
//! package: `initdb` in a fresh directory under the system temp dir, the server on
//! 127.0.0.1 at a free port (its socket in that directory too, nothing system-wide),
//! trust authentication for the superuser `vimport`, durability off (fsync,
//! synchronous_commit: a test database need not survive a power loss). It is stopped
//! by its PID (from `postmaster.pid`) and its directory removed when the [`Postgres`]
//! is dropped, whatever the suite's outcome, and by a [`Guard`]'s trap when `xtask` is
//! killed before that.
//!
//! `initdb` and `postgres` refuse to run as root: as root they run as the `postgres`
//! user the package creates (through `runuser`), and the directory is given to it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guard::Guard;

/// The Debian packages that provide the server.
pub const PACKAGES: [&str; 1] = ["postgresql"];

/// The environment variable the tests read the server's URL from.
pub const URL_ENV: &str = "VIMPORT_TEST_POSTGRES_URL";

/// Installs Debian packages (`packages`, `why` they are needed) or says why it cannot.
pub type Installer<'a> = dyn FnMut(&[&str], &str) -> Result<(), String> + 'a;

/// A running server; stopped and removed on drop.
pub struct Postgres {
    dir: PathBuf,
    pid: Option<u32>,
    /// `postgres://vimport@127.0.0.1:PORT/postgres`.
    pub url: String,
    /// Stops the server if `xtask` is killed before this is dropped.
    _guard: Option<Guard>,
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` (Debian keeps the
/// server programs there, off the PATH).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"0")
}

/// `program args…`, as the `postgres` user when we are root.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

impl Postgres {
    /// Starts a server, installing `postgresql` through `install` when its programs
    /// are missing.
    pub fn start(install: &mut Installer<'_>) -> Result<Postgres, String> {
        let bin = match bin_dir() {
            Some(b) => b,
            None => {
                install(
                    &PACKAGES,
                    "PostgreSQL (for the several-hosts tests) is missing",
                )?;
                bin_dir()
                    .ok_or("postgresql is installed but no /usr/lib/postgresql/*/bin/initdb")?
            }
        };
        let root = is_root();
        let dir = std::env::temp_dir().join(format!("vimport-test-pg-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot remove the old {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut pg = Postgres {
            dir: dir.clone(),
            pid: None,
            url: String::new(),
            _guard: None,
        };
        if root {
            run(
                "giving the test database directory to the postgres user",
                Command::new("chown").args(["-R", "postgres:"]).arg(&dir),
            )?;
        }
        let data = dir.join("data");
        run(
            "initdb",
            as_server_user(&bin.join("initdb"), root)
                .args([
                    "-U",
                    "vimport",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    // The C locale: the machine's may not be generated.
                    "--no-locale",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
        )?;
        let port = free_port()?;
        let options = format!(
            "-h 127.0.0.1 -p {port} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            dir.display()
        );
        let start = Instant::now();
        run(
            "starting PostgreSQL",
            as_server_user(&bin.join("pg_ctl"), root)
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-o", &options]),
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })?;
        let pid_file = data.join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .ok_or_else(|| format!("PostgreSQL started but {} names no PID", pid_file.display()))?;
        pg.pid = Some(pid);
        pg._guard = Some(Guard::arm(
            "the test PostgreSQL",
            &["kill", "-INT", &pid.to_string()],
        ));
        pg.url = format!("postgres://vimport@127.0.0.1:{port}/postgres");
        eprintln!(
            "PostgreSQL (pid {pid}) on 127.0.0.1:{port} in {:.1} s, data in {}",
            start.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(pg)
    }
}

impl Drop for Postgres {
    /// Fast shutdown (SIGINT) by PID, then SIGKILL if it lingers; removes the directory.
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            // Gone, or a zombie its parent (init) has not reaped yet.
            let alive = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
                })
            };
            let _ = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .stdin(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdin(Stdio::null())
                    .status();
            }
            eprintln!("PostgreSQL (pid {pid}) stopped");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
