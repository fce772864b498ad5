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
