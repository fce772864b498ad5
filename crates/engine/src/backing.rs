//! Images created over a backing file (qemu-img `create -b`, `convert -B`): which
//! formats can have one, and the checks qemu-img makes before creating one (a backing
//! format is required, the backing image must open, relative names are resolved
//! against the new image's directory, the size defaults to the backing image's).

use std::path::Path;

use vconvert_core::{relative_to, Error, Format, Options, Result};

use crate::OpenOptions;

/// Whether vconvert writes `format` images with a backing file (qcow2).
pub fn backing_supported(format: Format) -> bool {
    matches!(format, Format::Qcow2)
}

/// The backing file and format named in creation `options` (`backing_file`,
/// `backing_fmt`).
pub fn backing_of(options: &Options) -> (Option<String>, Option<String>) {
    let mut o = options.clone();
    (o.take("backing_file"), o.take("backing_fmt"))
}

/// Checks the backing file of a new `format` image at `path` as qemu-img does, and
/// returns the virtual size to create: `size`, or the backing image's when `size` is
/// `None`. With `open_backing` false (qemu-img's `-u`), the backing image is not
/// opened and a size is required.
pub fn overlay_size(
    path: &Path,
    format: Format,
    size: Option<u64>,
    options: &Options,
    open_backing: bool,
) -> Result<u64> {
    let name = path.display().to_string();
    let needs_size = || Error::invalid(format!("{name}: Image creation needs a size parameter"));
    let (backing, backing_fmt) = backing_of(options);
    let Some(backing) = backing else {
        return size.ok_or_else(needs_size);
    };
    if !backing_supported(format) {
        return Err(Error::invalid(format!(
            "{name}: Backing file not supported for file format '{format}'"
        )));
    }
    let resolved = relative_to(path, &backing);
    let Some(backing_fmt) = backing_fmt else {
        let detected = crate::open(&resolved, None, &trusted())
            .map(|img| format!("\nDetected format of {}.", img.format()))
            .unwrap_or_default();
        return Err(Error::invalid(format!(
            "{name}: Backing file specified without backing format{detected}"
        )));
    };
    let backing_format: Format = backing_fmt.parse()?;
    if !open_backing {
        return size.ok_or_else(needs_size);
    }
    let img = crate::open(&resolved, Some(backing_format), &trusted()).map_err(|e| {
        Error::invalid(format!(
            "{name}: Could not open '{backing}': {e}\nCould not open backing image."
        ))
    })?;
    Ok(size.unwrap_or(img.virtual_size()))
}

fn trusted() -> OpenOptions {
    OpenOptions {
        allow_external_files: true,
        allow_corrupt: false,
        snapshot: None,
    }
}
