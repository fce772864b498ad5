//! `vconvert check`: qemu-img's output and exit codes (0 clean, 2 corruptions, 3 leaks,
//! 63 not supported, 1 error).

use std::path::Path;

use serde_json::{json, Map, Value};
use vconvert_core::{CheckReport, Error, Format, Result};
use vconvert_engine::OpenOptions;

/// Exit status for "this format does not support checks".
pub const NOT_SUPPORTED: u8 = 63;

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0.00".into()
    } else {
        format!("{:.2}", part as f64 * 100.0 / whole as f64)
    }
}

/// The exit status qemu-img gives a report.
pub fn status(r: &CheckReport) -> u8 {
    if !r.corruptions.is_empty() || r.check_errors > 0 {
        2
    } else if r.leaked_clusters > 0 || !r.leaks.is_empty() {
        3
    } else {
        0
    }
}

fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    for c in &r.corruptions {
        s += &format!("ERROR {c}\n");
    }
    for l in &r.leaks {
        s += &format!("Leaked cluster {l}\n");
    }
    if !r.corruptions.is_empty() {
        s += &format!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
            r.corruptions.len()
        );
    }
    if r.leaked_clusters > 0 {
        s += &format!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
            r.leaked_clusters
        );
    }
    if r.corruptions.is_empty() && r.leaked_clusters == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters) {
        s += &format!(
            "{alloc}/{total} = {}% allocated, {}% fragmented, {}% compressed clusters\n",
            percent(alloc, total),
            percent(r.fragmented_clusters.unwrap_or(0), alloc),
            percent(r.compressed_clusters.unwrap_or(0), alloc)
        );
    }
    if let Some(end) = r.image_end_offset {
        s += &format!("Image end offset: {end}\n");
    }
    s
}

fn to_json(path: &Path, format: Format, r: &CheckReport) -> Value {
    let mut m = Map::new();
    if let Some(end) = r.image_end_offset {
        m.insert("image-end-offset".into(), json!(end));
    }
    if let Some(t) = r.total_clusters {
        m.insert("total-clusters".into(), json!(t));
    }
    m.insert("check-errors".into(), json!(r.check_errors));
    if !r.corruptions.is_empty() {
        m.insert("corruptions".into(), json!(r.corruptions.len()));
    }
    if r.leaked_clusters > 0 {
        m.insert("leaks".into(), json!(r.leaked_clusters));
    }
    for (k, v) in [
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if let Some(v) = v.filter(|v| *v > 0) {
            m.insert(k.into(), json!(v));
        }
    }
    m.insert("filename".into(), json!(path.display().to_string()));
    m.insert("format".into(), json!(format.name()));
    Value::Object(m)
}

/// Runs `check`; returns the exit status.
pub fn check(
    path: &Path,
    format: Option<Format>,
    output: &str,
    allow_external_files: bool,
    leaks_fixed: Option<u64>,
) -> Result<u8> {
    let img = vconvert_engine::open(
        path,
        format,
        &OpenOptions {
            allow_external_files,
            allow_corrupt: true,
            snapshot: None,
        },
    )?;
    let Some(report) = img.check() else {
        crate::out::eprintln("vconvert: This image format does not support checks");
        return Ok(NOT_SUPPORTED);
    };
    let report = report?;
    if output == "json" {
        let mut v = to_json(path, img.format(), &report);
        if let (Some(n), Value::Object(m)) = (leaks_fixed.filter(|n| *n > 0), &mut v) {
            m.insert("leaks-fixed".into(), json!(n));
        }
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| Error::invalid(format!("cannot format JSON: {e}")))?;
        crate::out::println(&text)?;
    } else {
        if let Some(n) = leaks_fixed.filter(|n| *n > 0) {
            crate::out::print(&format!(
                "The following inconsistencies were found and repaired:\n\n    {n} leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n"
            ))?;
        }
        crate::out::print(&human(&report))?;
    }
    Ok(status(&report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_qemu() {
        let mut r = CheckReport::default();
        assert_eq!(status(&r), 0);
        r.leaked_clusters = 2;
        assert_eq!(status(&r), 3);
        r.corruptions.push("bad".into());
        assert_eq!(status(&r), 2);
        assert!(human(&r).contains("1 errors were found"));
    }
}
