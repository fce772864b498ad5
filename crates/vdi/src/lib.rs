//! VirtualBox Disk Images (VDI).
//!
//! This crate owns the VDI on-disk structures ([`VdiHeader`], [`BlockMap`] entries as
//! [`BlockEntry`]), the [`VdiReader`] (dynamic and static images, header version 1.1,
//! allocated, unallocated and zero blocks) and the [`VdiWriter`] (dynamic or static,
//! 1 MiB blocks, all-zero blocks left unallocated), laid out as qemu-img lays them out.
//!
//! Layout (VirtualBox `VDICore.h`; offsets from the start of the file): a 64-byte text
//! pre-header, the signature `0xbeda107f` at 0x40, the version at 0x44, the header
//! proper from 0x48, the block map (one little-endian u32 per block) and the data area.
//!
//! [`BlockMap`]: BlockEntry

mod header;
mod reader;
mod writer;

pub use header::{BlockEntry, ImageType, VdiHeader};
pub use reader::VdiReader;
pub use writer::VdiWriter;
