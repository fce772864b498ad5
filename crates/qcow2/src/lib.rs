//! qcow2 images (QEMU copy-on-write v2 and v3).
//!
//! This crate owns the qcow2 on-disk structures of QEMU's `docs/interop/qcow2.txt`: the
//! [`Qcow2Header`] and its extensions, L1/L2 table entries (standard and extended, in
//! [`l2`]), compressed cluster descriptors and their deflate/zstd streams, refcount
//! tables and blocks, the snapshot table; the [`Qcow2Reader`] (every variant qemu writes,
//! backing chains and external data files through the caller's resolver), `check`
//! (refcounts recomputed from the tables, as qemu-img counts them) and the
//! [`Qcow2Writer`] (v2/v3, qemu-img's create options, a backing file, clusters
//! compressed in parallel and placed in guest order), and the in-place updates of
//! qemu-img's image commands, each crash-safe up to leaked clusters: [`resize`],
//! internal snapshots ([`create_snapshot`], [`apply_snapshot`], [`delete_snapshot`]),
//! [`amend`], [`rebase`], [`ClusterWriter`] and [`make_empty`] for `commit`.

mod amend;
mod bitmap;
mod check;
pub use check::{check, repair_leaks};
mod commit;
pub use commit::{make_empty, ClusterWriter};
pub mod compressed;
mod header;
pub mod l2;
mod reader;
mod rebase;
mod resize;
mod snapshot;
mod snapshot_edit;
mod status;
mod writer;

pub use amend::{amend, AMEND_OPTIONS};
pub use bitmap::Bitmap;
pub use header::{
    autoclear, compatible, extension, incompatible, CompressionType, FeatureName, Qcow2Header,
};
pub use reader::{L1Table, Qcow2OpenOptions, Qcow2Reader};
pub use rebase::rebase;
pub use resize::{resize, Preallocation};
pub use snapshot::Snapshot;
pub use snapshot_edit::{apply_snapshot, create_snapshot, delete_snapshot};
pub use writer::Qcow2Writer;
