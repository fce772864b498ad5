//! Raw disk images: the bytes of the disk, nothing else.
//!
//! This crate owns the raw [`RawReader`] (block map from `SEEK_DATA`/`SEEK_HOLE`,
//! falling back to all-data) and the raw [`RawWriter`] (sparse output: holes are never
//! written; `preallocation=off|falloc|full`), and [`resize`] in place.

mod reader;
mod resize;
mod writer;

pub use reader::RawReader;
pub use resize::resize;
pub use writer::{Preallocation, RawWriter};

/// qemu rounds a raw file's length up to whole 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;
