//! `qemu-img resize`: the new size (absolute, or `+N`/`-N` relative to the current
//! one), qemu-img's rules and messages (shrinking needs `--shrink`; formats qemu
//! cannot resize are refused with its words), then the format's in-place resize.

use std::path::Path;

use vconvert_core::{parse_size, Error, Format, ImageFile, Result};

/// How to resize.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// Allow the image to shrink (qemu-img's `--shrink`).
    pub shrink: bool,
    /// qemu-img's `--preallocation`: `off` (default), `metadata` (qcow2), `falloc`
    /// or `full`.
    pub preallocation: Option<String>,
}

/// The new size `spec` (`N`, `+N` or `-N`, qemu sizes) gives an image of `current`
/// bytes.
pub fn new_size(spec: &str, current: u64) -> Result<u64> {
    let spec = spec.trim();
    let bad = || Error::invalid("New image size must be positive");
    let size = if let Some(d) = spec.strip_prefix('+') {
        current
            .checked_add(parse_size(d)?)
            .ok_or_else(|| Error::invalid(format!("the new size {current} + {d} overflows")))?
    } else if let Some(d) = spec.strip_prefix('-') {
        current.checked_sub(parse_size(d)?).ok_or_else(bad)?
    } else {
        parse_size(spec)?
    };
    if size == 0 {
        return Err(bad());
    }
    Ok(size)
}

/// Resizes the image at `path` to what `size` says (see [`new_size`]); returns the
/// new size.
pub fn resize(
    path: &Path,
    format: Option<Format>,
    size: &str,
    opts: &ResizeOptions,
) -> Result<u64> {
    let file = ImageFile::open(path)?;
    let format = match format {
        Some(f) => f,
        None => crate::probe(&file)?,
    };
    let name = file.name().to_string();
    let prealloc = opts.preallocation.as_deref().unwrap_or("off");
    if !["off", "metadata", "falloc", "full"].contains(&prealloc) {
        return Err(Error::invalid(format!(
            "Invalid preallocation mode '{prealloc}'"
        )));
    }
    match format {
        Format::Raw => {
            let current = file.len();
            let target = new_size(size, current)?;
            check_shrink(target, current, opts)?;
            let mode = match prealloc {
                "off" => vconvert_raw::Preallocation::Off,
                "falloc" => vconvert_raw::Preallocation::Falloc,
                "full" => vconvert_raw::Preallocation::Full,
                other => {
                    return Err(Error::invalid(format!(
                        "{name}: Unsupported preallocation mode: {other}"
                    )))
                }
            };
            drop(file);
            let rw = open_rw(path)?;
            vconvert_raw::resize(&rw, &name, target, mode)?;
            Ok(target)
        }
        Format::Qcow2 => {
            drop(file);
            let (reader, rw) = crate::registry::open_qcow2_rw(path)?;
            let current = vconvert_core::ImageReader::virtual_size(&reader);
            let target = new_size(size, current)?;
            check_shrink(target, current, opts)?;
            let mode = match prealloc {
                "metadata" => vconvert_qcow2::Preallocation::Metadata,
                "falloc" => vconvert_qcow2::Preallocation::Falloc,
                "full" => vconvert_qcow2::Preallocation::Full,
                _ => vconvert_qcow2::Preallocation::Off,
            };
            vconvert_qcow2::resize(&reader, &rw, target, mode)?;
            Ok(target)
        }
        _ => Err(Error::invalid(format!(
            "{name}: Image format driver does not support resize"
        ))),
    }
}

/// qemu-img's refusal to shrink without `--shrink`.
fn check_shrink(target: u64, current: u64, opts: &ResizeOptions) -> Result<()> {
    if target < current && opts.preallocation.as_deref().is_some_and(|p| p != "off") {
        return Err(Error::invalid(
            "Preallocation can only be used for growing images",
        ));
    }
    if target < current && !opts.shrink {
        return Err(Error::invalid(
            "Use the --shrink option to perform a shrink operation.\n\
             warning: Shrinking an image will delete all data beyond the shrunken image's \
             end. Before performing such an operation, make sure there is no important data \
             there.",
        ));
    }
    Ok(())
}

fn open_rw(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path.display().to_string(), "cannot open for writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_absolute_and_relative() {
        assert_eq!(new_size("10M", 1).unwrap(), 10 << 20);
        assert_eq!(new_size("+1M", 1 << 20).unwrap(), 2 << 20);
        assert_eq!(new_size("-1M", 3 << 20).unwrap(), 2 << 20);
        assert!(new_size("-1M", 1 << 20).is_err());
        assert!(new_size("-2M", 1 << 20).is_err());
        assert!(new_size("0", 1).is_err());
    }
}
