//! The vconvert engine: everything between "a path and a format" and "converted file".
//!
//! It owns the format registry ([`open`], [`probe`]), the parallel sparse copy
//! ([`convert`]) that streams only data extents from any reader to any writer, and
//! image creation ([`create`]), comparison ([`compare`]) and the safety inspector
//! ([`inspect`]) that decides whether an untrusted image may be converted.

mod compare;
mod convert;
mod inspect;
mod measure;
mod registry;

pub use compare::{compare, CompareOptions, Comparison};
pub use convert::{convert, copy_image, CancelToken, ConvertOptions, Progress};
pub use inspect::{
    inspect, inspect_as, inspect_file, inspect_file_as, DeclaredFormat, Policy, Report,
};
pub use measure::{measure, Measure, Qcow2Geometry};
pub use registry::{create, open, open_file, probe, repair_leaks, OpenOptions, MAX_CHAIN_DEPTH};
pub use vconvert_core::{
    raise_open_file_limit, Error, Format, ImageInfo, ImageReader, Options, Result,
};
