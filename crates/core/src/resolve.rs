//! How a reader reaches files other than its own: backing images, parents, VMDK extent
//! files, external data files. The caller's [`Resolver`] decides whether that is allowed
//! (an import service must refuse it) and guards against loops and deep chains.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::{BlockMap, Error, ExtentKind, Format, ImageFile, ImageReader, Location, Result};

/// Opens the other files an image refers to, under the caller's policy.
pub trait Resolver: Send + Sync {
    /// Opens another image (backing file, parent) named `path` by the image `referrer`,
    /// as `format` or probed. Fails with [`Error::Refused`] when policy forbids it, and
    /// with a clear error on loops or chains deeper than the limit.
    fn open_image(
        &self,
        referrer: &ImageFile,
        path: &Path,
        format: Option<Format>,
    ) -> Result<Box<dyn ImageReader>>;

    /// Opens a plain file that is part of the image (VMDK extent, external data file)
    /// named `path` by `referrer`.
    fn open_file(&self, referrer: &ImageFile, path: &Path) -> Result<ImageFile>;
}

/// A resolver that refuses every reference: for fuzzing and in-memory images.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoReferences;

impl Resolver for NoReferences {
    fn open_image(
        &self,
        referrer: &ImageFile,
        path: &Path,
        _format: Option<Format>,
    ) -> Result<Box<dyn ImageReader>> {
        Err(Error::Refused {
            file: referrer.name().to_string(),
            reason: format!(
                "it refers to image '{}' and references are not allowed",
                path.display()
            ),
        })
    }

    fn open_file(&self, referrer: &ImageFile, path: &Path) -> Result<ImageFile> {
        Err(Error::Refused {
            file: referrer.name().to_string(),
            reason: format!(
                "it refers to file '{}' and references are not allowed",
                path.display()
            ),
        })
    }
}

/// Resolves `name` as stored in `referrer` the way qemu does: absolute names as they
/// are, relative ones against the directory of the referring file.
pub fn relative_to(referrer: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match referrer.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The block map of `range` for an image whose unallocated parts read from `backing`:
/// every `Unallocated` extent of `top` is replaced by the backing image's map of the same
/// range (backing data appears as `Data(Opaque)`; past the backing's end, `Unallocated`).
pub fn overlay_block_map(top: &BlockMap, backing: &dyn ImageReader) -> Result<BlockMap> {
    let mut out = BlockMap::new(top.start());
    let bsize = backing.virtual_size();
    for e in top.extents() {
        if e.kind != ExtentKind::Unallocated {
            out.push(e.len, e.kind);
            continue;
        }
        let r: Range<u64> = e.start..e.end();
        let inside = r.start.min(bsize)..r.end.min(bsize);
        if inside.start < inside.end {
            for b in backing.block_map(inside.clone())?.extents() {
                let kind = match b.kind {
                    ExtentKind::Data(_) => ExtentKind::Data(Location::Opaque),
                    k => k,
                };
                out.push(b.len, kind);
            }
        }
        out.push(r.end - inside.end.max(r.start), ExtentKind::Unallocated);
    }
    Ok(out)
}

/// Reads `buf` at `offset` from `backing`, zero-filling what lies past its end.
pub fn read_backing(backing: &dyn ImageReader, buf: &mut [u8], offset: u64) -> Result<()> {
    let bsize = backing.virtual_size();
    let n = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(n);
    if !head.is_empty() {
        backing.read_at(head, offset)?;
    }
    tail.fill(0);
    Ok(())
}
