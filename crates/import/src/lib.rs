//! vimport: the image import service built on the vconvert engine, speaking
//! OpenStack Glance's Image API v2.
//!
//! It owns the import workflow of an image service like Glance's interoperable
//! import: users create an image, stage its bytes (or have the service fetch them, or
//! upload them in one call), and an import task inspects the data under the untrusted
//! policy, converts it to the operator's format, hashes it and stores it. Modules:
//! [`http`] (axum routers, one per resource), [`service`] (images, tasks, tenancy,
//! workers, shutdown), [`staging`] (an upload received and synced into the workspace),
//! [`workflow`] (inspect → convert → hash → store, behind
//! [`store::Store`]; [`digest`] hashes as the conversion writes), [`web_download`],
//! [`db`] (SQLite or PostgreSQL, `migrations/`), `rbd_store` (Ceph RBD, cargo feature
//! `rbd`), [`workspace`] (the staging quota), [`config`] (`vimport.toml` and `VIMPORT_*`),
//! [`error`], [`keystone`] (token validation with Keystone), [`policy`] (Glance's
//! default policy).

#![warn(missing_docs)]

pub mod config;
pub mod db;
pub mod digest;
pub mod error;
pub mod failpoint;
pub mod http;
pub mod keystone;
pub mod policy;
#[cfg(feature = "rbd")]
pub mod rbd_store;
pub mod service;
pub mod staging;
pub mod store;
pub mod web_download;
pub mod workflow;
pub mod workspace;

pub use config::Config;
pub use service::Service;
