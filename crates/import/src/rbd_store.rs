//! The `rbd` store: one RBD image per image in a Ceph pool, laid out as Glance's rbd
//! driver (glance_store `_drivers/rbd.py`) lays them out, so that Nova and Cinder
//! clone them copy-on-write:
//!
//! - the RBD image is named by the image id, in pool `rbd_pool`, created with the
//!   image's size and objects of `rbd_chunk_size` bytes (order = log2 of it);
//! - once the data is written, the snapshot `snap` is created and protected
//!   (`rbd_snapshot`, on by default);
//! - deletion unprotects the snapshot (a snapshot with clones refuses: the image is
//!   in use), removes it, then removes the image.
//!
//! An RBD image is written under the name `ID.partial`, sealed (flushed, snapshot made
//! and protected), then renamed to the id: an RBD image named by an id is complete.
//!
//! A raw image goes straight from the engine into the RBD image
//! ([`Store::put_raw`]): only its data extents are written (a new RBD image reads as
//! zeros), in parallel through librbd's asynchronous writes, in batches bounded by the
//! engine's in-flight memory. Any other file (a non-raw output, an ISO) is streamed in
//! from the workspace ([`Store::put`]), its all-zero chunks skipped too. A failed or
//! cancelled write removes the partial RBD image.

use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use vconvert_core::ImageReader;
use vconvert_engine::{BlockTarget, ConvertOptions, Observer};
use vconvert_rbd::{Cluster, Image, Pool};

use crate::config::RbdConfig;
use crate::store::{Store, StoredData};

/// The snapshot every image gets (Glance's `DEFAULT_SNAPNAME`).
pub const SNAPSHOT: &str = "snap";

/// Appended to an image id to name its RBD image while it is written.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// `EEXIST`.
const EEXIST: i32 = 17;

/// An error of [`Store::put_raw`]: the engine's, or the store's own.
enum PublishError {
    Engine(vconvert_core::Error),
    Io(io::Error),
}

impl From<io::Error> for PublishError {
    fn from(e: io::Error) -> Self {
        PublishError::Io(e)
    }
}

impl From<vconvert_core::Error> for PublishError {
    fn from(e: vconvert_core::Error) -> Self {
        PublishError::Engine(e)
    }
}

/// Chunks of a file streamed into an image that are written at once.
const FILE_BATCH: usize = 8;

/// Images in a Ceph pool.
#[derive(Debug)]
pub struct RbdStore {
    pool: Pool,
    config: RbdConfig,
}

impl RbdStore {
    /// Connects to the cluster and opens the pool; fails with what to check.
    pub fn connect(config: &RbdConfig) -> Result<RbdStore, String> {
        let cluster = Cluster::connect(config.ceph_conf.as_deref(), config.user.as_deref())
            .map_err(|e| format!("rbd store: {e} (check ceph_conf and rbd_user)"))?;
        let pool = cluster.pool(&config.pool).map_err(|e| {
            format!(
                "rbd store: {e} (create it: `ceph osd pool create {0}` and `rbd pool init {0}`)",
                config.pool
            )
        })?;
        // Listing proves the user may read the pool.
        pool.list().map_err(|e| format!("rbd store: {e}"))?;
        Ok(RbdStore {
            pool,
            config: config.clone(),
        })
    }

    /// `rbd:pool/id`, for messages.
    fn spec(&self, id: &str) -> String {
        format!("rbd:{}/{id}", self.pool.name())
    }

    /// Creates image `id` of `size` bytes; an image of that name left by an earlier
    /// interrupted import (the catalogue never points at an image being imported) is
    /// removed first.
    fn create(&self, id: &str, size: u64) -> io::Result<Image> {
        let order = Some(self.config.order());
        if let Err(e) = self.pool.create(id, size, order) {
            if e.errno != EEXIST {
                return Err(e.into());
            }
            tracing::warn!(
                image = %id,
                "rbd store: removing the leftover RBD image {} before importing again",
                self.spec(id)
            );
            self.remove(id)?;
            self.pool.create(id, size, order)?;
        }
        Ok(self.pool.open(id)?)
    }

    /// Flushes `image` and creates and protects its snapshot (when configured).
    fn seal(&self, image: &Image) -> io::Result<()> {
        image.flush()?;
        if self.config.snapshot {
            image.snap_create(SNAPSHOT)?;
            image.snap_protect(SNAPSHOT)?;
        }
        Ok(())
    }

    /// Unprotects and removes the snapshot, then the image (no error when absent).
    fn remove(&self, id: &str) -> io::Result<()> {
        match self.pool.open(id) {
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(image) => match image.snap_unprotect(SNAPSHOT) {
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_busy() => return Err(self.in_use(id, Some(e.to_string()))),
                Err(e) => return Err(e.into()),
                Ok(()) => match image.snap_remove(SNAPSHOT) {
                    Err(e) if e.is_not_found() => {}
                    other => other?,
                },
            },
        }
        match self.pool.remove(id) {
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) if e.is_busy() => Err(self.in_use(id, Some(e.to_string()))),
            other => Ok(other?),
        }
    }

    fn in_use(&self, id: &str, detail: Option<String>) -> io::Error {
        io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "the data of image {id} ({}) is in use{}",
                self.spec(id),
                detail.map(|d| format!(": {d}")).unwrap_or_default()
            ),
        )
    }

    /// Streams `from` into `image`, [`FILE_BATCH`] chunks in flight at a time,
    /// skipping all-zero chunks.
    fn copy_file(&self, from: &Path, image: &Image, len: u64) -> io::Result<()> {
        let chunk = self.config.chunk_size;
        let mut f = std::fs::File::open(from)?;
        let mut bufs = vec![vec![0u8; chunk as usize]; FILE_BATCH];
        let mut pos = 0u64;
        while pos < len {
            // (offset, length) of each buffer read in this batch, or None when zero.
            let mut read: Vec<Option<(u64, usize)>> = Vec::with_capacity(FILE_BATCH);
            for buf in bufs.iter_mut() {
                if pos >= len {
                    break;
                }
                let n = (len - pos).min(chunk) as usize;
                f.read_exact(&mut buf[..n])?;
                read.push((!vconvert_core::is_zero(&buf[..n])).then_some((pos, n)));
                pos += n as u64;
            }
            let writes: Vec<(u64, &[u8])> = read
                .iter()
                .zip(&bufs)
                .filter_map(|(r, b)| r.map(|(off, n)| (off, &b[..n])))
                .collect();
            image.write_all_at_many(&writes)?;
        }
        Ok(())
    }
}

/// An RBD image as the engine's raw target.
struct RbdTarget<'a> {
    image: &'a Image,
    name: String,
    chunk_size: u64,
}

impl BlockTarget for RbdTarget<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        Ok(self.image.write_all_at_many(writes)?)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.image.flush()?)
    }
}

/// The name an image's RBD image has while it is written: renamed to the id once
/// complete, so an RBD image named by an id is always complete.
fn partial_name(id: &str) -> String {
    format!("{id}{PARTIAL_SUFFIX}")
}

impl RbdStore {
    /// Writes image `id` through `write` into a new RBD image of `size` bytes named
    /// [`partial_name`], seals it (flush, snapshot) and renames it to `id`. On any
    /// error the partial RBD image is removed.
    fn publish<E: From<io::Error>>(
        &self,
        id: &str,
        size: u64,
        write: impl FnOnce(&Image) -> Result<(), E>,
    ) -> Result<(), E> {
        let tmp = partial_name(id);
        let result = (|| {
            let image = self.create(&tmp, size)?;
            write(&image)?;
            self.seal(&image)?;
            drop(image);
            // An RBD image named by the id that no catalogue entry points to (left by
            // an import interrupted after its rename) is replaced.
            match self.pool.rename(&tmp, id) {
                Err(e) if e.errno == EEXIST => {
                    self.remove(id)?;
                    self.pool.rename(&tmp, id).map_err(io::Error::from)?;
                }
                other => other.map_err(io::Error::from)?,
            }
            Ok(())
        })();
        if result.is_err() {
            if let Err(e) = self.remove(&tmp) {
                tracing::error!(image = %id, error = %e, "rbd store: cannot remove the partial RBD image {}", self.spec(&tmp));
            }
        }
        result
    }
}

impl Store for RbdStore {
    fn put(&self, id: &str, from: &Path) -> io::Result<()> {
        let len = std::fs::metadata(from)?.len();
        self.publish(id, len, |image| self.copy_file(from, image, len))?;
        std::fs::remove_file(from)
    }

    fn writes_raw_directly(&self) -> bool {
        true
    }

    fn put_raw(
        &self,
        id: &str,
        src: &dyn ImageReader,
        opts: &ConvertOptions<'_>,
        observe: Observer<'_>,
    ) -> vconvert_core::Result<()> {
        let name = self.spec(&partial_name(id));
        self.publish(id, src.virtual_size(), |image| {
            let target = RbdTarget {
                image,
                name: name.clone(),
                chunk_size: self.config.chunk_size,
            };
            vconvert_engine::convert_to_block(src, &target, opts, Some(observe))
                .map_err(PublishError::Engine)
        })
        .map_err(|e| match e {
            PublishError::Engine(e) => e,
            PublishError::Io(e) => vconvert_core::Error::io(&name, "cannot store the RBD image", e),
        })
    }

    fn open(&self, id: &str) -> io::Result<(Box<dyn StoredData>, u64)> {
        let image = self.pool.open_read_only(id)?;
        let size = image.size()?;
        let reader = RbdReader {
            image,
            pos: 0,
            size,
        };
        let buffered = BufReader::with_capacity(self.config.chunk_size as usize, reader);
        Ok((Box::new(buffered), size))
    }

    fn check_deletable(&self, id: &str) -> io::Result<()> {
        let snap = match self.pool.open_snapshot(id, SNAPSHOT) {
            Err(e) if e.is_not_found() => return Ok(()),
            other => other?,
        };
        let children = snap.children()?;
        if children.is_empty() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "image {id} is in use: its RBD snapshot {}@{SNAPSHOT} has {} clone(s) ({}); \
                 delete or flatten them first",
                self.spec(id),
                children.len(),
                children.join(", ")
            ),
        ))
    }

    /// Removes image `id`'s RBD image and its partial one (an import interrupted
    /// while writing it), or the RBD image named `id` that [`Store::ids`] listed.
    fn delete(&self, id: &str) -> io::Result<()> {
        if !id.ends_with(PARTIAL_SUFFIX) {
            self.remove(&partial_name(id))?;
        }
        self.remove(id)
    }

    fn ids(&self) -> io::Result<Vec<String>> {
        Ok(self.pool.list()?)
    }
}

/// Reads an RBD image as a file.
struct RbdReader {
    image: Image,
    pos: u64,
    size: u64,
}

impl Read for RbdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (self.size - self.pos).min(buf.len() as u64) as usize;
        let got = self.image.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for RbdReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the image",
            )
        })?;
        Ok(self.pos)
    }
}
