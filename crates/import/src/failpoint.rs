//! Test-only fail points: crash the process at a named step of the import workflow.
//!
//! Always compiled in and inert unless the environment variable `VIMPORT_FAILPOINTS`
//! names steps when the service starts, as `step=action[,step=action...]`:
//!
//! - `abort`: abort the process (no destructor, no flush, no answer) the first time the
//!   step is reached;
//! - `abort@N`: abort the N-th time (1-based) the step is reached.
//!
//! The crash tests (`tests/soak.rs`) use them to kill the service at each step of
//! [`STEPS`] deterministically and check that startup recovery finishes or undoes what
//! was interrupted. An unknown step name is refused at start, so a typo cannot make a
//! test pass without crashing anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the fail points.
pub const ENV: &str = "VIMPORT_FAILPOINTS";

/// Every fail point, in the order an import (then a delete) reaches them.
pub const STEPS: &[&str] = &[
    // Staging: after the first batch of the upload is written (not yet synced), then after the upload is
    // complete and synced but before the catalogue records it staged.
    "stage.receiving",
    "stage.received",
    // The import request: task created and image importing, before the answer.
    "import.accepted",
    // The worker: task processing, before inspecting.
    "task.processing",
    // During the conversion (from its progress callback), then after it.
    "convert.progress",
    "convert.done",
    // During hashing (after the first block), then after it.
    "hash.reading",
    "hash.done",
    // The stored location and checksums are in the task; the file is not moved yet.
    "store.intent",
    // The file is in the store; the catalogue does not say so yet.
    "store.moved",
    // Task success and image active are committed; the workspace is not cleaned yet.
    "store.recorded",
    // Delete: the image is gone from the catalogue; its files are not removed yet.
    "delete.recorded",
    // Delete: some of its files are removed, the store object not yet.
    "delete.files",
];

#[derive(Debug)]
struct Point {
    /// The hit that aborts (1-based).
    at: u64,
    hits: AtomicU64,
}

static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();

/// Parses `spec` (`step=abort[@N],...`).
fn parse(spec: &str) -> Result<HashMap<String, Point>, String> {
    let mut points = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (step, action) = item
            .split_once('=')
            .ok_or_else(|| format!("{ENV}: '{item}' is not step=action"))?;
        if !STEPS.contains(&step) {
            return Err(format!(
                "{ENV}: unknown step '{step}'; steps: {}",
                STEPS.join(", ")
            ));
        }
        let at = match action.split_once('@') {
            None if action == "abort" => 1,
            Some(("abort", n)) => match n.parse::<u64>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("{ENV}: '{item}': N in abort@N must be 1 or more")),
            },
            _ => return Err(format!("{ENV}: '{item}': the action is abort or abort@N")),
        };
        points.insert(
            step.to_string(),
            Point {
                at,
                hits: AtomicU64::new(0),
            },
        );
    }
    Ok(points)
}

/// Reads [`ENV`] once; later calls (and a second service in the same process) keep the
/// first reading. Errors name the bad entry.
pub fn init() -> Result<(), String> {
    let spec = std::env::var(ENV).unwrap_or_default();
    let points = parse(&spec)?;
    if !points.is_empty() {
        let mut names: Vec<&String> = points.keys().collect();
        names.sort();
        eprintln!("vimport: fail points armed ({ENV}): {names:?}");
    }
    let _ = POINTS.set(points);
    Ok(())
}

/// Marks that `step` is reached; aborts the process if a fail point there says so.
pub fn hit(step: &str) {
    debug_assert!(STEPS.contains(&step), "unknown fail point {step}");
    let Some(p) = POINTS.get().and_then(|m| m.get(step)) else {
        return;
    };
    if p.hits.fetch_add(1, Ordering::SeqCst) + 1 == p.at {
        eprintln!("vimport: fail point {step}: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_typos_are_refused() {
        let p = parse("store.moved=abort, hash.reading=abort@3").unwrap();
        assert_eq!(p["store.moved"].at, 1);
        assert_eq!(p["hash.reading"].at, 3);
        assert!(parse("").unwrap().is_empty());
        let e = parse("store.move=abort").unwrap_err();
        assert!(e.contains("unknown step 'store.move'"), "{e}");
        assert!(parse("store.moved=panic").unwrap_err().contains("abort"));
        assert!(parse("store.moved=abort@0").is_err());
        assert!(parse("store.moved").is_err());
    }
}
