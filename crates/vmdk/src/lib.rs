//! VMware virtual disks (VMDK) for vconvert.
//!
//! This crate owns the VMDK format as described by VMware's "Virtual Disk Format 5.0"
//! technical note ("the spec" below):
//! - [`header`]: the hosted sparse extent header (`KDMV`, spec "Hosted Sparse Extent
//!   Header");
//! - [`descriptor`]: the text descriptor (spec "The Descriptor File"), parsed and emitted;
//! - [`grain`]: grain directories, grain tables and compressed grains;
//! - [`marker`]: stream-optimized grain and metadata markers (spec "Stream-Optimized
//!   Compressed Sparse Extents");
//! - [`VmdkReader`]: monolithic and split sparse and flat disks, `ZERO` extents,
//!   streamOptimized images (VMware's footer layout and qemu's), parents;
//! - [`VmdkWriter`]: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//!   twoGbMaxExtentFlat and streamOptimized output.
//!
//! Every size and offset read from an image is validated before use, and every
//! allocation driven by the image is bounded.

pub mod descriptor;
pub mod grain;
pub mod header;
pub mod marker;
mod reader;
mod sparse;
mod writer;

pub use reader::VmdkReader;
pub use writer::{Parent, Subformat, VmdkWriter};

/// Bytes per sector: every VMDK offset and size field counts 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Largest descriptor we read (embedded or a descriptor file).
pub const MAX_DESCRIPTOR_SIZE: u64 = 1 << 20;

/// Most extents a descriptor may list (a 32 TiB twoGbMaxExtent disk has 16384).
pub const MAX_EXTENTS: usize = 16384;
