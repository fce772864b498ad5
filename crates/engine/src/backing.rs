//! Images created over a backing file (qemu-img `create -b`, `convert -B`): which
//! formats can have one, and the checks qemu-img makes before creating one (a backing
//! format is required, the backing image must open, relative names are resolved
//! against the new image's directory, the size defaults to the backing image's).

use std::path::Path;

use vconvert_core::{relative_to, Error, Format, Options, Result};

use crate::OpenOptions;

/// Whether vconvert writes `format` images with a backing file (qcow2, and vmdk
/// differencing disks over a vmdk parent).
pub fn backing_supported(format: Format) -> bool {
    matches!(format, Format::Qcow2 | Format::Vmdk)
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
    // qemu's vmdk driver takes only a vmdk parent.
    if format == Format::Vmdk && backing_format != Format::Vmdk {
        return Err(vmdk_parent_not_vmdk(&name));
    }
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

fn vmdk_parent_not_vmdk(name: &str) -> Error {
    Error::invalid(format!("{name}: backing_file must be a vmdk image"))
}

/// Takes `backing_file` and `backing_fmt` out of the creation `options` of a new vmdk
/// image at `path` and opens that parent (always, even under qemu-img's `-u`: its
/// content ID goes into the new descriptor, as qemu does), for
/// [`vconvert_vmdk::VmdkWriter::create_over`].
pub(crate) fn vmdk_parent(
    path: &Path,
    mut options: Options,
) -> Result<(Options, Option<vconvert_vmdk::Parent>)> {
    let name = path.display().to_string();
    let (Some(backing), fmt) = (options.take("backing_file"), options.take("backing_fmt")) else {
        return Ok((options, None));
    };
    if fmt.is_some_and(|f| f != "vmdk") {
        return Err(vmdk_parent_not_vmdk(&name));
    }
    let resolved = relative_to(path, &backing);
    let img = crate::open(&resolved, Some(Format::Vmdk), &trusted()).map_err(|e| {
        Error::invalid(format!(
            "{name}: Could not open '{backing}': {e}\nCould not open backing image."
        ))
    })?;
    let cid = img
        .info()?
        .format_specific
        .and_then(|v| v.pointer("/data/cid").and_then(|c| c.as_u64()))
        .and_then(|c| u32::try_from(c).ok())
        .ok_or_else(|| {
            Error::invalid(format!(
                "{name}: the parent '{backing}' has no content ID (CID) to record"
            ))
        })?;
    Ok((options, Some(vconvert_vmdk::Parent { hint: backing, cid })))
}

fn trusted() -> OpenOptions {
    OpenOptions {
        allow_external_files: true,
        allow_corrupt: false,
        snapshot: None,
    }
}
