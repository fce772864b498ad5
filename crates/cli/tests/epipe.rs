//! Output to a closed pipe is not an error: every command ends quietly with its usual
//! status, as qemu-img does (`vconvert check disk.qcow2 | true`). The pipe is a FIFO
//! whose last reader is gone before `vconvert` starts, so every write fails with EPIPE
//! (no timing involved).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vconvert_testkit::tempdir;

/// A write end of a pipe that has no reader left.
fn closed_pipe(dir: &Path) -> std::fs::File {
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // Opening read-write never blocks on Linux; it keeps a reader while the write end
    // opens, then goes away.
    let reader = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let writer = OpenOptions::new().write(true).open(&fifo).unwrap();
    drop(reader);
    writer
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(name)
}

/// Runs `vconvert ARGS` with stdout on a closed pipe; returns (status, stderr).
fn run_into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempdir();
    let out = Command::new(env!("CARGO_BIN_EXE_vconvert"))
        .args(args)
        .current_dir(dir.path())
        .stdout(Stdio::from(closed_pipe(dir.path())))
        .stderr(Stdio::piped())
        .output()
        .expect("run vconvert");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_ends_quietly_on_a_closed_pipe() {
    let qcow2 = fixture("disk.qcow2");
    let raw = fixture("disk.raw");
    let q = qcow2.to_str().unwrap();
    let r = raw.to_str().unwrap();
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["check", q], 0),
        (vec!["check", "--output=json", q], 0),
        (vec!["info", q], 0),
        (vec!["info", "--output=json", "--backing-chain", q], 0),
        (vec!["compare", q, r], 0),
        (vec!["measure", "-O", "qcow2", q], 0),
        (vec!["measure", "--output=json", "--size", "1G"], 0),
        (vec!["create", "-f", "qcow2", "new.qcow2", "1M"], 0),
        (vec!["map", q], 1),
        (vec!["map", "--output=json", q], 0),
        (vec!["map", "-f", "raw", r], 0),
    ];
    for (args, status) in cases {
        let (code, stderr) = run_into_closed_pipe(&args);
        assert_eq!(code, Some(status), "vconvert {args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "vconvert {args:?}: {stderr}"
        );
    }
}

#[test]
fn a_closed_pipe_does_not_hide_the_result() {
    // `compare` of different images still exits 1, `check` of raw still 63.
    let qcow2 = fixture("disk.qcow2");
    let vdi = fixture("disk.raw");
    let dir = tempdir();
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![1u8; 4096]).unwrap();
    let (code, _) =
        run_into_closed_pipe(&["compare", qcow2.to_str().unwrap(), other.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    let (code, _) = run_into_closed_pipe(&["check", "-f", "raw", vdi.to_str().unwrap()]);
    assert_eq!(code, Some(63));
}
