//! Writing to standard output and standard error without panicking.
//!
//! `println!` panics when stdout is a closed pipe (`vconvert check disk.qcow2 | true`,
//! or `| head -1`). qemu-img ignores SIGPIPE and ends quietly with its usual status, so
//! every line the CLI prints goes through here: a broken pipe ends the output silently
//! (nothing more is printed, the command's result is kept), other write errors on stdout
//! are errors naming the stream, and errors writing to stderr are ignored (there is
//! nowhere left to report them).

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use vconvert_core::{Error, Result};

/// Set once stdout has been found closed: later output is dropped without trying.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout and flushes it. A closed pipe is not an error.
pub fn print(text: &str) -> Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut lock = std::io::stdout().lock();
    match lock.write_all(text.as_bytes()).and_then(|()| lock.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(Error::io("standard output", "cannot write", e)),
    }
}

/// Writes `text` and a newline to stdout (see [`print`]).
pub fn println(text: &str) -> Result<()> {
    print(&format!("{text}\n"))
}

/// Writes `text` and a newline to stderr; failures are ignored.
pub fn eprintln(text: &str) {
    let mut lock = std::io::stderr().lock();
    let _ = lock.write_all(format!("{text}\n").as_bytes());
    let _ = lock.flush();
}
