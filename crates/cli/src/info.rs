//! `vconvert info`: qemu-img's human and JSON output.

use std::path::Path;

use serde_json::{json, Map, Value};
use vconvert_core::{Error, Format, ImageInfo, Result};
use vconvert_engine::OpenOptions;

/// qemu's `size_to_str`: three significant digits and a binary unit, switching to the
/// next unit when the integer part reaches 1000.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: x = m * 2^e with m in [0.5, 1).
    let e = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let v = val as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(v), SUFFIXES[i])
}

/// printf's `%0.3g` for values below 10^4.
fn g3(v: f64) -> String {
    let magnitude = if v > 0.0 { v.log10().floor() as i32 } else { 0 };
    let decimals = (2 - magnitude).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The `children` node qemu shows for the protocol layer (the plain file).
fn file_node(path: &Path) -> Value {
    let meta = std::fs::metadata(path).ok();
    let len = meta.as_ref().map_or(0, |m| m.len());
    let actual = meta.as_ref().map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    json!({
        "children": [],
        "virtual-size": len.div_ceil(512) * 512,
        "filename": path.display().to_string(),
        "format": "file",
        "actual-size": actual,
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false,
    })
}

/// The child nodes qemu shows: extent files other than the image file itself (VMDK),
/// last extent first, then the image file.
fn children(path: &Path, info: &ImageInfo) -> Vec<(String, String)> {
    let me = path.display().to_string();
    let mut out = Vec::new();
    if let Some(Value::Array(extents)) = info
        .format_specific
        .as_ref()
        .and_then(|fs| fs.get("data"))
        .and_then(|d| d.get("extents"))
    {
        for (i, e) in extents.iter().enumerate().rev() {
            if let Some(name) = e.get("filename").and_then(Value::as_str) {
                if name != me {
                    out.push((format!("extents.{i}"), name.to_string()));
                }
            }
        }
    }
    out.push(("file".to_string(), me));
    out
}

/// `info --output=json` of one image, keys as qemu-img prints them.
pub fn info_json(path: &Path, info: &ImageInfo) -> Value {
    let mut m = Map::new();
    let kids: Vec<Value> = children(path, info)
        .into_iter()
        .map(|(name, file)| json!({"name": name, "info": file_node(Path::new(&file))}))
        .collect();
    m.insert("children".into(), Value::Array(kids));
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("filename".into(), json!(path.display().to_string()));
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(info.format.name()));
    m.insert("actual-size".into(), json!(info.actual_size.unwrap_or(0)));
    if let Some(b) = &info.backing_file {
        m.insert("backing-filename".into(), json!(b));
        if let Some(full) = &info.full_backing_file {
            m.insert("full-backing-filename".into(), json!(full));
        }
        if let Some(f) = &info.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    if !info.snapshots.is_empty() {
        let list: Vec<Value> = info
            .snapshots
            .iter()
            .map(|sn| {
                let mut o = Map::new();
                if let Some(c) = sn.icount {
                    o.insert("icount".into(), json!(c));
                }
                o.insert(
                    "vm-clock-nsec".into(),
                    json!(sn.vm_clock_nsec % 1_000_000_000),
                );
                o.insert("name".into(), json!(sn.name));
                o.insert("date-sec".into(), json!(sn.date_sec));
                o.insert("date-nsec".into(), json!(sn.date_nsec));
                o.insert(
                    "vm-clock-sec".into(),
                    json!(sn.vm_clock_nsec / 1_000_000_000),
                );
                o.insert("id".into(), json!(sn.id));
                o.insert("vm-state-size".into(), json!(sn.vm_state_size));
                Value::Object(o)
            })
            .collect();
        m.insert("snapshots".into(), Value::Array(list));
    }
    if let Some(fs) = &info.format_specific {
        m.insert("format-specific".into(), fs.clone());
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Value::Object(m)
}

/// qemu-img's human-readable info.
pub fn info_human(path: &Path, info: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        path.display(),
        info.format,
        size_to_str(info.virtual_size),
        info.virtual_size,
        size_to_str(info.actual_size.unwrap_or(0))
    );
    if let Some(c) = info.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if let Some(b) = &info.backing_file {
        s += &format!("backing file: {b}");
        if let Some(full) = info.full_backing_file.as_ref().filter(|f| *f != b) {
            s += &format!(" (actual path: {full})");
        }
        s += "\n";
        if let Some(f) = &info.backing_format {
            s += &format!("backing file format: {f}\n");
        }
    }
    if !info.snapshots.is_empty() {
        s += &snapshot_table(&info.snapshots);
    }
    if let Some(Value::Object(fs)) = &info.format_specific {
        if let Some(Value::Object(data)) = fs.get("data") {
            if !data.is_empty() {
                s += "Format specific information:\n";
                for (k, v) in data {
                    s += &human_value(k, v, 1);
                }
            }
        }
    }
    for (name, f) in children(path, info) {
        let file = file_node(Path::new(&f));
        s += &format!(
            "Child node '/{name}':\n    filename: {f}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
            size_to_str(file["virtual-size"].as_u64().unwrap_or(0)),
            file["virtual-size"].as_u64().unwrap_or(0),
            size_to_str(file["actual-size"].as_u64().unwrap_or(0)),
        );
    }
    s
}

/// qemu-img's snapshot table (`info` and `snapshot -l`), with its heading.
pub fn snapshot_table(snapshots: &[vconvert_core::SnapshotInfo]) -> String {
    let mut s = String::new();
    s += "Snapshot list:\n";
    s += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snapshots {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            utc_date(sn.date_sec),
            format!(
                "{:04}:{:02}:{:02}.{:03}",
                secs / 3600,
                (secs / 60) % 60,
                secs % 60,
                (sn.vm_clock_nsec / 1_000_000) % 1000
            ),
            sn.icount.map(|c| c.to_string()).unwrap_or_default()
        );
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time, in UTC (qemu prints local time; servers and
/// CI run in UTC).
fn utc_date(secs: u64) -> String {
    let (y, m, d, h, mi, s) = vconvert_core::utc_fields(secs);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

fn human_value(key: &str, v: &Value, depth: usize) -> String {
    let pad = "    ".repeat(depth);
    match v {
        Value::Object(m) => {
            let mut s = format!("{pad}{}:\n", key.replace('-', " "));
            for (k, v) in m {
                s += &human_value(k, v, depth + 1);
            }
            s
        }
        Value::Array(a) => {
            let mut s = format!("{pad}{}:\n", key.replace('-', " "));
            for (i, v) in a.iter().enumerate() {
                s += &human_value(&format!("[{i}]"), v, depth + 1);
            }
            s
        }
        Value::String(t) => format!("{pad}{}: {t}\n", key.replace('-', " ")),
        other => format!("{pad}{}: {other}\n", key.replace('-', " ")),
    }
}

/// Runs `info` on `path` (and, with `backing_chain`, on every image below it).
pub fn info(
    path: &Path,
    format: Option<Format>,
    output: &str,
    allow_external_files: bool,
    backing_chain: bool,
) -> Result<()> {
    let options = OpenOptions {
        allow_external_files,
        allow_corrupt: true,
        snapshot: None,
    };
    let mut chain: Vec<(std::path::PathBuf, ImageInfo)> = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((p, f)) = next.take() {
        if chain.len() > vconvert_engine::MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{}: backing chain deeper than {} images",
                path.display(),
                vconvert_engine::MAX_CHAIN_DEPTH
            )));
        }
        let img = vconvert_engine::open(&p, f, &options)?;
        // What `--untrusted` would refuse (checksum mismatches and the like) is a
        // warning here, on stderr so JSON on stdout stays parseable.
        for finding in img.safety_findings().into_iter().chain(img.warnings()) {
            crate::out::eprintln(&format!("vconvert: warning: {}: {finding}", p.display()));
        }
        let info = img.info()?;
        if backing_chain {
            if let Some(full) = info.full_backing_file.clone().or(info.backing_file.clone()) {
                let bf = info.backing_format.as_deref().map(str::parse).transpose()?;
                next = Some((std::path::PathBuf::from(full), bf));
            }
        }
        chain.push((p, info));
    }
    if output == "json" {
        let values: Vec<Value> = chain.iter().map(|(p, i)| info_json(p, i)).collect();
        let v = if backing_chain {
            Value::Array(values)
        } else {
            values.into_iter().next().unwrap_or(Value::Null)
        };
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| Error::invalid(format!("cannot format JSON: {e}")))?;
        crate::out::println(&text)?;
    } else {
        let texts: Vec<String> = chain.iter().map(|(p, i)| info_human(p, i)).collect();
        crate::out::print(&texts.join("\n"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(12288), "12 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(10_514_432), "10 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
    }
}
