//! `qemu-img map`: the allocation of every guest range through the backing chain, as
//! qemu-img reports it (`start`, `length`, `depth`, `present`, `zero`, `data`,
//! `compressed`, `offset`).
//!
//! Each format's reader gives its own layer's status ([`ImageReader::layer_status`],
//! what a qemu block driver answers); this module adds what qemu's generic block layer
//! and qemu-img add: unallocated ranges go down the backing chain (`depth` counts the
//! images skipped), ranges no image of the chain allocates read as zeros when the
//! format has backing files, data whose layer asks for it is refined by the holes of
//! its host file (holes read as zeros), and neighbouring entries that agree are merged
//! exactly as qemu-img merges them. The guest disk is walked a window at a time, so the
//! memory used does not grow with the disk.

use std::ops::Range;

use vconvert_core::{ImageReader, LayerStatus, Result};

/// Guest bytes asked of the readers at a time.
const WINDOW: u64 = 1 << 30;

/// One line of `qemu-img map`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest byte offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// How many images down the backing chain the status comes from (0: the image).
    pub depth: u32,
    /// Allocated in the image at `depth` (as data or as zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored as data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the first byte, when the data lies plainly in a file.
    pub offset: Option<u64>,
    /// The file `offset` refers to (set exactly when `offset` is).
    pub filename: Option<String>,
}

impl MapEntry {
    /// qemu-img's `entry_mergeable`: `next` continues `self` with the same status.
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.length > 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}

/// Calls `emit` with the merged entries of guest `range` of `img`, in order. A range
/// that is empty (or starts past the end) yields qemu-img's single empty entry.
pub fn map(
    img: &dyn ImageReader,
    range: Range<u64>,
    emit: &mut dyn FnMut(&MapEntry) -> Result<()>,
) -> Result<()> {
    let end = range.end.min(img.virtual_size());
    let mut cur = MapEntry {
        start: range.start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        filename: None,
    };
    let mut pos = range.start;
    while pos < end {
        let window = pos..end.min(pos.saturating_add(WINDOW));
        let mut pieces = Vec::new();
        resolve(img, window.clone(), 0, &mut pieces)?;
        for next in pieces {
            if cur.mergeable(&next) {
                cur.length += next.length;
            } else {
                if cur.length > 0 {
                    emit(&cur)?;
                }
                cur = next;
            }
        }
        pos = window.end;
    }
    emit(&cur)
}

fn entry(s: &LayerStatus, depth: u32, present: bool, img: &dyn ImageReader) -> MapEntry {
    MapEntry {
        start: s.start,
        length: s.len,
        depth,
        present,
        zero: s.zero,
        data: s.data,
        compressed: s.compressed,
        offset: s.offset.map(|(_, o)| o),
        filename: s
            .offset
            .and_then(|(f, _)| img.host_file(f))
            .map(|f| f.name().to_string()),
    }
}

/// The entries of `range` of `layer`, `depth` images down the chain.
fn resolve(
    layer: &dyn ImageReader,
    range: Range<u64>,
    depth: u32,
    out: &mut Vec<MapEntry>,
) -> Result<()> {
    for s in layer.layer_status(range)? {
        if s.allocated() {
            if s.recurse && s.data && !s.zero {
                refine(layer, &s, depth, out)?;
            } else {
                out.push(entry(&s, depth, true, layer));
            }
            continue;
        }
        if !layer.supports_backing() {
            out.push(entry(&s, depth, false, layer));
            continue;
        }
        // Past the end of the backing image (or with none), the layer reads as zeros.
        let covered = layer
            .backing()
            .map_or(s.start, |b| b.virtual_size().clamp(s.start, s.end()));
        if let Some(b) = layer.backing().filter(|_| covered > s.start) {
            resolve(b, s.start..covered, depth + 1, out)?;
        }
        if covered < s.end() {
            let rest = LayerStatus {
                start: covered,
                len: s.end() - covered,
                zero: true,
                offset: s.offset.map(|(f, o)| (f, o + (covered - s.start))),
                ..s
            };
            out.push(entry(&rest, depth, false, layer));
        }
    }
    Ok(())
}

/// Data that asks its host file: where the host range lies over a hole of the file (or
/// past its end), the data reads as zeros.
fn refine(
    layer: &dyn ImageReader,
    s: &LayerStatus,
    depth: u32,
    out: &mut Vec<MapEntry>,
) -> Result<()> {
    let (Some((file, off)), Some(host)) =
        (s.offset, s.offset.and_then(|(f, _)| layer.host_file(f)))
    else {
        out.push(entry(s, depth, true, layer));
        return Ok(());
    };
    let storage = host.storage();
    let io = |e| vconvert_core::Error::io(host.name(), "cannot find data and holes", e);
    let end = off + s.len;
    let flen = host.len();
    let mut pos = off;
    let mut push = |from: u64, to: u64, zero: bool| {
        if to > from {
            let piece = LayerStatus {
                start: s.start + (from - off),
                len: to - from,
                zero,
                offset: Some((file, from)),
                ..*s
            };
            out.push(entry(&piece, depth, true, layer));
        }
    };
    while pos < end {
        let lim = end.min(flen);
        if pos >= lim {
            push(pos, end, true);
            break;
        }
        let data = match storage.next_data(pos).map_err(io)? {
            Some(d) => d.clamp(pos, lim),
            None => lim,
        };
        push(pos, data, true);
        if data >= lim {
            pos = lim;
            continue;
        }
        let hole = storage.next_hole(data).map_err(io)?.clamp(data, lim);
        let hole = if hole == data { lim } else { hole };
        push(data, hole, false);
        pos = hole;
    }
    Ok(())
}
