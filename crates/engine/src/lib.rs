//! The vconvert engine: everything between "a path and a format" and "converted file".
//!
//! It owns the format registry ([`open`], [`probe`]), the parallel sparse copy
//! ([`convert`]) that streams only data extents from any reader to any writer (or, as
//! raw, into a target that is not a local file: [`convert_to_block`]), and
//! image creation ([`create`], over a backing file: [`overlay_size`]), comparison
//! ([`compare`]), `qemu-img map` ([`map`]), the in-place image commands ([`resize`],
//! [`snapshot`], [`amend`], [`rebase`], [`commit`]) and [`dd`], and the safety
//! inspector ([`inspect`]) that decides whether an untrusted image may be converted.

mod amend;
mod backing;
mod block;
mod commit;
mod compare;
mod convert;
mod dd;
mod inspect;
mod map;
mod measure;
mod registry;
mod resize;
mod snapshot;

pub use amend::{amend, rebase};
pub use backing::{backing_of, backing_supported, overlay_size};
pub use block::{convert_to_block, BlockTarget, Observer};
pub use commit::commit;
pub use compare::{compare, CompareOptions, Comparison};
pub use convert::{
    convert, copy_image, CancelToken, ConvertOptions, Progress, RawBytes, RawObserver,
};
pub use dd::{dd, DdOptions};
pub use inspect::{
    inspect, inspect_as, inspect_file, inspect_file_as, DeclaredFormat, Policy, Report,
};
pub use map::{map, MapEntry};
pub use measure::{measure, Measure, Qcow2Geometry};
pub use registry::{create, open, open_file, probe, repair_leaks, OpenOptions, MAX_CHAIN_DEPTH};
pub use resize::{new_size, resize, ResizeOptions};
pub use snapshot::{snapshot, SnapshotOp};
pub use vconvert_core::{
    raise_open_file_limit, Error, Format, ImageInfo, ImageReader, Options, Result, ThreadBudget,
};
