//! `vconvert map`: qemu-img's human and JSON output of the engine's map entries.

use std::path::Path;

use vconvert_core::{parse_size, Error, Format, Result};
use vconvert_engine::{MapEntry, OpenOptions};

/// Output is flushed in pieces of about this many bytes.
const FLUSH_BYTES: usize = 64 << 10;

/// One JSON entry, byte for byte as qemu-img prints it.
fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s += &format!(", \"offset\": {o}");
    }
    s.push('}');
    s
}

/// printf's `%#-16x`: `0` alone, else `0x…`, left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let h = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{h:<16}")
}

/// One human line (only plain data is listed), or the error qemu-img stops with.
fn human_entry(e: &MapEntry) -> Result<Option<String>> {
    if e.data && e.offset.is_none() {
        return Err(Error::invalid(
            "File contains external, encrypted or compressed clusters.",
        ));
    }
    if e.data && !e.zero {
        return Ok(Some(format!(
            "{}{}{}{}\n",
            hex16(e.start),
            hex16(e.length),
            hex16(e.offset.unwrap_or(0)),
            e.filename.as_deref().unwrap_or("")
        )));
    }
    Ok(None)
}

/// Runs `map` on `path` from `start_offset` for at most `max_length` bytes.
pub fn map(
    path: &Path,
    format: Option<Format>,
    output: &str,
    start_offset: Option<&str>,
    max_length: Option<&str>,
    allow_corrupt: bool,
) -> Result<()> {
    let start = start_offset.map(parse_size).transpose()?.unwrap_or(0);
    let max = max_length.map(parse_size).transpose()?;
    let img = vconvert_engine::open(
        path,
        format,
        &OpenOptions {
            allow_external_files: true,
            allow_corrupt,
            snapshot: None,
        },
    )?;
    let size = img.virtual_size();
    let end = max.map_or(size, |m| start.saturating_add(m).min(size));
    let json = output == "json";
    let mut buf = String::from(if json {
        "["
    } else {
        "Offset          Length          Mapped to       File\n"
    });
    let mut first = true;
    let result = vconvert_engine::map(img.as_ref(), start..end, &mut |e| {
        if json {
            if !first {
                buf += ",\n";
            }
            buf += &json_entry(e);
        } else if let Some(line) = human_entry(e)? {
            buf += &line;
        }
        first = false;
        if buf.len() >= FLUSH_BYTES {
            crate::out::print(&buf)?;
            buf.clear();
        }
        Ok(())
    });
    if json && result.is_ok() {
        buf += "]\n";
    }
    // What was found before an error is printed, as qemu-img does.
    crate::out::print(&buf)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(data: bool, zero: bool, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start: 0x20_0000,
            length: 0x1000,
            depth: 0,
            present: true,
            zero,
            data,
            compressed: false,
            offset,
            filename: offset.map(|_| "d.qcow2".to_string()),
        }
    }

    #[test]
    fn lines_print_like_qemu_img() {
        assert_eq!(
            json_entry(&entry(true, false, Some(0))),
            "{ \"start\": 2097152, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}"
        );
        assert_eq!(
            human_entry(&entry(true, false, Some(0))).unwrap().unwrap(),
            "0x200000        0x1000          0               d.qcow2\n"
        );
        assert_eq!(human_entry(&entry(false, true, Some(9))).unwrap(), None);
        assert!(human_entry(&entry(true, false, None)).is_err());
    }
}
