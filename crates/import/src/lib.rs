//! vimport: the image import service built on the vconvert engine.
//!
//! It owns the import workflow of an image service like OpenStack Glance's
//! interoperable import: users create an image, stage its bytes in a workspace, and
//! start an import task that inspects the upload under the untrusted policy, converts it
//! to the operator's format, hashes it and moves it into a filesystem store. State lives
//! in SQLite; workers, the workspace quota and crash recovery are in [`service`]; the
//! HTTP API is in [`http`]; `vimport.toml` and `VIMPORT_*` are in [`config`].

pub mod config;
pub mod db;
pub mod failpoint;
pub mod http;
pub mod service;
pub mod workspace;

pub use config::Config;
pub use service::Service;
