//! Shared abstractions of vconvert.
//!
//! This crate owns what every format crate and the engine agree on:
//! - [`BlockMap`]: the sparse map of a guest range (data, zero, unallocated extents);
//! - [`ImageReader`] and [`ImageWriter`] (with its parallel half, [`ChunkEncoder`]): the
//!   contract a format implements;
//! - [`ImageFile`] and [`Storage`]: bounds-checked positional reads of an image file
//!   (a real file or bytes in memory, for fuzzing);
//! - [`Resolver`]: how a reader opens backing and extent files under the caller's policy;
//! - [`Output`]: the temporary files a conversion writes and renames into place, each a
//!   [`TargetFile`] that sends page-aligned writes around the page cache when asked;
//! - [`IoBuffer`]: page-aligned buffers for bulk reads and writes;
//! - [`Workers`]: the parallel steps of a conversion, on threads that block when idle,
//!   optionally borrowed from a [`ThreadBudget`] shared by conversions running at once;
//! - [`Error`]: the one error type, naming file, structure and offset;
//! - [`Options`]: `-o key=value` creation options and qemu-style sizes;
//! - [`LayerStatus`]: qemu's block status of one image layer, for `map`.

mod blockmap;
mod buffer;
mod error;
mod format;
mod identity;
mod image;
mod options;
mod output;
mod parallel;
mod resolve;
mod status;
mod storage;
mod time;
mod zero;

pub use blockmap::{BlockMap, Extent, ExtentKind, Location};
pub use buffer::{IoBuffer, IO_ALIGN};
pub use error::{Error, Result};
pub use format::Format;
pub use identity::Identity;
pub use image::{check_guest_range, refine_host_holes};
pub use image::{
    CheckReport, Chunk, ChunkEncoder, CreateParams, Encoded, ImageInfo, ImageReader, ImageWriter,
    NonzeroBlocks, PlainChunks, Run, RunKind, SnapshotInfo,
};
pub use options::{parse_size, Options};
pub use output::{raise_open_file_limit, write_all_at, Output, TargetFile, DIRECT_ALIGN};
pub use parallel::{ThreadBudget, Workers};
pub use resolve::{overlay_block_map, read_backing, relative_to, NoReferences, Resolver};
pub use status::{status_of_map, LayerStatus};
pub use storage::{FileStorage, ImageFile, MemStorage, Storage};
pub use time::utc_fields;
pub use zero::{is_zero, zero_runs};

/// A test-only crash point: when the environment variable `VCONVERT_FAIL_POINT` names
/// `point`, the process aborts there at once, as a `kill -9` would stop it (tests use
/// it to prove that an in-place update leaves a consistent image at every step).
pub fn fail_point(point: &str) {
    if std::env::var_os("VCONVERT_FAIL_POINT").is_some_and(|v| v == point) {
        std::process::abort();
    }
}
