//! `qemu-img amend`: changing an image's creation options in place (qcow2 `compat`
//! and `lazy_refcounts`).

use std::path::Path;

use vconvert_core::{Error, Format, ImageFile, Options, Result};

/// Applies `options` to the image at `path`.
pub fn amend(path: &Path, format: Option<Format>, options: Options) -> Result<()> {
    let format = match format {
        Some(f) => f,
        None => crate::probe(&ImageFile::open(path)?)?,
    };
    if format != Format::Qcow2 {
        return Err(Error::invalid(format!(
            "{}: Format driver '{format}' does not support option amendment",
            path.display()
        )));
    }
    let (reader, rw) = crate::registry::open_qcow2_rw(path)?;
    vconvert_qcow2::amend(&reader, &rw, options)
}

/// `qemu-img rebase`: makes `backing` (a name as qemu stores it, resolved against the
/// image's directory; empty for none) with format `backing_fmt` the backing file of
/// the qcow2 image at `path`. Safe mode (`unsafe_mode` false) first copies into the
/// image every cluster whose content would otherwise change.
pub fn rebase(
    path: &Path,
    format: Option<Format>,
    backing: &str,
    backing_fmt: Option<&str>,
    unsafe_mode: bool,
) -> Result<()> {
    let format = match format {
        Some(f) => f,
        None => crate::probe(&ImageFile::open(path)?)?,
    };
    if format != Format::Qcow2 {
        return Err(Error::invalid(format!(
            "{}: Could not change the backing file to '{backing}': {format} images have no \
             backing file here",
            path.display()
        )));
    }
    let stored = if backing.is_empty() {
        None
    } else {
        let Some(fmt) = backing_fmt else {
            return Err(Error::invalid(format!(
                "Could not change the backing file to '{backing}': backing format must be \
                 specified"
            )));
        };
        let _: Format = fmt.parse()?;
        Some((backing.to_string(), Some(fmt.to_string())))
    };
    let new = match (&stored, unsafe_mode) {
        (Some((name, fmt)), false) => {
            let resolved = vconvert_core::relative_to(path, name);
            let f: Option<Format> = fmt.as_deref().map(str::parse).transpose()?;
            Some(
                crate::open(
                    &resolved,
                    f,
                    &crate::OpenOptions {
                        allow_external_files: true,
                        allow_corrupt: false,
                        snapshot: None,
                    },
                )
                .map_err(|e| {
                    Error::invalid(format!("Could not open new backing file '{name}': {e}"))
                })?,
            )
        }
        _ => None,
    };
    let (reader, rw) = crate::registry::open_qcow2_rw(path)?;
    vconvert_qcow2::rebase(&reader, &rw, stored, new.as_deref(), !unsafe_mode)
}
