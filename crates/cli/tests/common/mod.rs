//! Running the `vconvert` binary from the CLI tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `vconvert ARGS`.
pub fn vconvert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vconvert"))
        .args(args)
        .output()
        .expect("run vconvert")
}

/// Runs `vconvert ARGS`, which must succeed.
pub fn ok(args: &[&str]) -> Output {
    let out = vconvert(args);
    assert!(
        out.status.success(),
        "vconvert {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `vconvert ARGS`, which must fail with status 1; returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = vconvert(args);
    assert_eq!(out.status.code(), Some(1), "vconvert {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Stdout parsed as JSON.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON")
}
