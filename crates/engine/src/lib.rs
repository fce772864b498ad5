//! The vconvert engine: everything between "a path and a format" and "converted file".
//!
//! It owns the format registry ([`open`], [`probe`]), the parallel sparse copy
//! ([`convert`]) that streams only data extents from any reader to any writer, and
//! image creation ([`create`]) and comparison ([`compare`]).

mod compare;
mod convert;
mod registry;

pub use compare::{compare, CompareOptions, Comparison};
pub use convert::{convert, copy_image, CancelToken, ConvertOptions, Progress};
pub use registry::{create, open, open_file, probe, OpenOptions};
pub use vconvert_core::{Error, Format, ImageInfo, ImageReader, Options, Result};
