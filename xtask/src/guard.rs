//! Stopping the test services when `cargo xtask test` itself is killed.
//!
//! [`crate::ceph::Ceph`] and [`crate::postgres::Postgres`] stop their daemons by PID
//! when dropped, which covers every way the suite ends but one: `xtask` killed by a
//! signal (Ctrl-C, SIGTERM from a CI runner, SIGKILL), where no destructor runs and the
//! daemons, detached from the terminal, would keep their ports. A [`Guard`] is a small
//! `sh` beside the service with a trap on its own exit: it waits for `xtask` to go and
//! then runs the service's stop command. A normal end kills the guard first (SIGKILL:
//! its trap does not run) and lets the drop stop the service.

use std::ffi::OsStr;
use std::process::{Child, Command, Stdio};

/// The watcher of one service; dropping it disarms it.
pub struct Guard {
    child: Option<Child>,
}

impl Guard {
    /// Starts a watcher that runs the command `stop` (program and arguments, passed
    /// as the watcher's positional parameters: no quoting) once this process has
    /// exited, by any means. A watcher that cannot be started is reported and skipped:
    /// the drop still stops the service on every normal path.
    pub fn arm<S: AsRef<OsStr>>(what: &str, stop: &[S]) -> Guard {
        let owner = std::process::id();
        // `trap … EXIT` runs the stop command when the loop ends (xtask gone) and when
        // the watcher is asked to end by SIGTERM/SIGHUP/SIGINT (a CI runner tearing
        // the whole process group down).
        let script = format!(
            "trap '\"$@\" >/dev/null 2>&1' EXIT; trap 'exit 0' TERM HUP INT; \
             while kill -0 {owner} 2>/dev/null; do sleep 1; done"
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .arg("xtask-guard")
            .args(stop)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(c) => Guard { child: Some(c) },
            Err(e) => {
                eprintln!(
                    "cargo xtask test: no watcher for {what} ({e}); a killed run leaves it running"
                );
                Guard { child: None }
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL: the trap must not run, the owner's drop stops the service.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
