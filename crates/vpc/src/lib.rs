//! VHD images ("vpc" in qemu's vocabulary): Virtual PC, Hyper-V, Azure, disk2vhd.
//!
//! This crate owns the VHD on-disk structures of Microsoft's "Virtual Hard Disk Image
//! Format Specification" (October 2006): the [`Footer`] (hard disk footer, with the
//! CHS [`Geometry`] and the rules for which size a reader believes), the
//! [`DynamicHeader`] with its parent locators, and the block allocation table; the
//! [`VpcReader`] (fixed, dynamic and differencing disks, exact to the sector through
//! each block's sector bitmap) and the [`VpcWriter`] (fixed or dynamic, qemu-img's
//! layout and size rounding, `force_size`, an Azure-ready fixed variant).

mod dynamic;
mod footer;
mod reader;
mod writer;

pub use dynamic::{DynamicHeader, ParentLocator};
pub use footer::{checksum, DiskType, Footer, Geometry};
pub use reader::VpcReader;
pub use writer::VpcWriter;

/// Sector size of every VHD.
pub const SECTOR_SIZE: u64 = 512;
