//! `qemu-img dd`: a new image holding a byte range of another one, copied by the
//! parallel sparse conversion through a window onto the source.

use std::ops::Range;
use std::path::Path;

use vconvert_core::{BlockMap, Error, Format, ImageFile, ImageInfo, ImageReader, Options, Result};

use crate::{ConvertOptions, OpenOptions};

/// qemu-img dd's operands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DdOptions {
    /// Block size in bytes (`bs=`, default 512).
    pub block_size: u64,
    /// Blocks to copy (`count=`), counted from the start of the input as qemu-img does.
    pub count: Option<u64>,
    /// Input blocks to skip (`skip=`).
    pub skip: u64,
}

impl Default for DdOptions {
    fn default() -> Self {
        DdOptions {
            block_size: 512,
            count: None,
            skip: 0,
        }
    }
}

/// The guest range of `src` a window reader exposes as a whole disk.
struct Window<'a> {
    inner: &'a dyn ImageReader,
    range: Range<u64>,
}

impl ImageReader for Window<'_> {
    fn format(&self) -> Format {
        self.inner.format()
    }

    fn virtual_size(&self) -> u64 {
        self.range.end - self.range.start
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        vconvert_core::check_guest_range("dd input", &range, self.virtual_size())?;
        let at = self.range.start;
        let inner = self.inner.block_map(range.start + at..range.end + at)?;
        let mut out = BlockMap::new(range.start);
        for e in inner.extents() {
            out.push(e.len, e.kind);
        }
        Ok(out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset + self.range.start)
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo::new(self.format(), self.virtual_size()))
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        self.inner.host_file(index)
    }
}

/// Copies the range of the image at `input` that `dd` selects into a new `output`
/// image of format `output_format`. Returns the bytes copied.
pub fn dd(
    input: &Path,
    input_format: Option<Format>,
    output: &Path,
    output_format: Format,
    dd: &DdOptions,
) -> Result<u64> {
    if dd.block_size == 0 {
        return Err(Error::invalid(
            "invalid number for bs: it must be at least 1",
        ));
    }
    let src = crate::open(
        input,
        input_format,
        &OpenOptions {
            allow_external_files: true,
            allow_corrupt: false,
            snapshot: None,
        },
    )?;
    let size = src.virtual_size();
    let end = dd
        .count
        .and_then(|c| c.checked_mul(dd.block_size))
        .map_or(size, |n| n.min(size));
    let start = dd
        .skip
        .checked_mul(dd.block_size)
        .filter(|s| *s <= end)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: cannot skip to specified offset",
                input.display()
            ))
        })?;
    let window = Window {
        inner: src.as_ref(),
        range: start..end,
    };
    crate::convert(
        &window,
        output,
        output_format,
        Options::new(),
        &ConvertOptions::default(),
    )?;
    Ok(end - start)
}
