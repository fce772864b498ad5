//! `qemu-img snapshot`: listing, creating, applying and deleting internal snapshots
//! (qcow2; other formats have none, as in qemu).

use std::path::Path;

use vconvert_core::{Error, Format, ImageFile, Result, SnapshotInfo};

/// What to do with the snapshots of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotOp {
    /// `-l`: list them.
    List,
    /// `-c NAME`: snapshot the current state as NAME.
    Create(String),
    /// `-a ID|NAME`: revert the current state to a snapshot.
    Apply(String),
    /// `-d ID|NAME`: delete a snapshot.
    Delete(String),
}

/// Runs `op` on the image at `path`; returns the snapshots for [`SnapshotOp::List`]
/// (empty otherwise).
pub fn snapshot(path: &Path, format: Option<Format>, op: &SnapshotOp) -> Result<Vec<SnapshotInfo>> {
    let format = match format {
        Some(f) => f,
        None => crate::probe(&ImageFile::open(path)?)?,
    };
    if *op == SnapshotOp::List {
        let img = crate::open(
            path,
            Some(format),
            &crate::OpenOptions {
                allow_external_files: true,
                allow_corrupt: true,
                snapshot: None,
            },
        )?;
        return Ok(img.info()?.snapshots);
    }
    if format != Format::Qcow2 {
        let (verb, name) = match op {
            SnapshotOp::Create(n) => ("create", n),
            SnapshotOp::Apply(n) => ("apply", n),
            SnapshotOp::Delete(n) => ("delete", n),
            SnapshotOp::List => ("list", &String::new()),
        };
        return Err(Error::invalid(format!(
            "Could not {verb} snapshot '{name}': {}: {format} images have no internal snapshots",
            path.display()
        )));
    }
    let (reader, rw) = crate::registry::open_qcow2_rw(path)?;
    match op {
        SnapshotOp::Create(n) => vconvert_qcow2::create_snapshot(&reader, &rw, n)?,
        SnapshotOp::Apply(n) => {
            // A snapshot taken at another disk size: the image is resized to it first
            // (as qemu does), keeping every snapshot's clusters.
            let current = vconvert_core::ImageReader::virtual_size(&reader);
            let size = reader
                .snapshots()
                .iter()
                .find(|s| s.info.id == *n)
                .or_else(|| reader.snapshots().iter().find(|s| s.info.name == *n))
                .and_then(|s| s.disk_size);
            match size {
                Some(size) if size != current => {
                    vconvert_qcow2::resize(&reader, &rw, size, vconvert_qcow2::Preallocation::Off)?;
                    drop((reader, rw));
                    let (reader, rw) = crate::registry::open_qcow2_rw(path)?;
                    vconvert_qcow2::apply_snapshot(&reader, &rw, n)?
                }
                _ => vconvert_qcow2::apply_snapshot(&reader, &rw, n)?,
            }
        }
        SnapshotOp::Delete(n) => vconvert_qcow2::delete_snapshot(&reader, &rw, n)?,
        SnapshotOp::List => {}
    }
    Ok(Vec::new())
}
