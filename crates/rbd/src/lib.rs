//! A small safe API over librbd and librados: what vimport's RBD store needs to keep
//! images in a Ceph pool the way Glance's rbd driver does (one RBD image per image,
//! a protected snapshot for copy-on-write clones).
//!
//! This crate owns the only `unsafe` code of the project besides one memory map: the
//! C declarations ([`ffi`]) and, here, one safe wrapper per call, each `unsafe` block
//! with the reason it is sound. [`Cluster`] is a connection ([`Cluster::connect`]),
//! [`Pool`] an I/O context on one pool (create, open, list, remove images), [`Image`]
//! an open image (size, read, parallel asynchronous writes, flush, snapshots, clones).
//! Every handle keeps its parent alive (an `Arc`), so a pool never outlives its
//! connection nor an image its pool.
//!
//! librbd and librados are linked by name (Debian's `librbd-dev`/`librados-dev` ship
//! no pkg-config files).

#![warn(missing_docs)]

mod ffi;

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::io;
use std::path::Path;
use std::ptr;
use std::sync::Arc;

/// A failed librados/librbd call: what was being done and the (positive) errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What failed, e.g. `cannot open RBD image images/abc`.
    pub what: String,
    /// The errno the library returned (positive).
    pub errno: i32,
}

impl Error {
    fn new(what: impl Into<String>, ret: i64) -> Error {
        Error {
            what: what.into(),
            errno: ret.unsigned_abs().min(i32::MAX as u64) as i32,
        }
    }

    /// Whether the object does not exist (`ENOENT`).
    pub fn is_not_found(&self) -> bool {
        self.errno == libc_errno::ENOENT
    }

    /// Whether the object is in use (`EBUSY`): a snapshot with clones, an open image.
    pub fn is_busy(&self) -> bool {
        self.errno == libc_errno::EBUSY
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.what,
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = io::Error::from_raw_os_error(e.errno).kind();
        io::Error::new(kind, e.to_string())
    }
}

/// The errno values this crate tests for (Linux).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EINVAL: i32 = 22;
    pub const EBUSY: i32 = 16;
    pub const ERANGE: i32 = 34;
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// `ret` (0 or a negative errno) as a result.
fn check(ret: c_int, what: impl FnOnce() -> String) -> Result<()> {
    if ret < 0 {
        Err(Error::new(what(), ret as i64))
    } else {
        Ok(())
    }
}

/// `s` as a C string; an interior NUL is `EINVAL`.
fn cstr(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(format!("{what}: '{s}' contains a NUL byte"), 22))
}

/// The connection handle; shut down when the last user is dropped.
struct ClusterHandle(ffi::Rados);

// SAFETY: a connected `rados_t` may be used from any thread and by several threads at
// once (librados is thread-safe; its handles carry their own locks).
unsafe impl Send for ClusterHandle {}
// SAFETY: as above: every call through a shared `rados_t` is thread-safe.
unsafe impl Sync for ClusterHandle {}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rados_create` and is shut down once, here, after
        // every pool and image using it (they hold an `Arc` of it) is gone.
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// A connection to a Ceph cluster.
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<ClusterHandle>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cluster")
    }
}

impl Cluster {
    /// Connects as Ceph user `user` (the name after `client.`, e.g. `glance`; `None`:
    /// `admin`) with the configuration file `conf` (`None`: librados' default search,
    /// `$CEPH_CONF` then `/etc/ceph/ceph.conf`). The keyring is found through the
    /// configuration file.
    pub fn connect(conf: Option<&Path>, user: Option<&str>) -> Result<Cluster> {
        let user_c = user.map(|u| cstr(u, "Ceph user")).transpose()?;
        let mut h: ffi::Rados = ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer; the id is NULL or a NUL-terminated string
        // that outlives the call (librados copies it).
        let ret = unsafe {
            ffi::rados_create(&mut h, user_c.as_ref().map_or(ptr::null(), |u| u.as_ptr()))
        };
        check(ret, || "cannot create a Ceph client handle".into())?;
        // From here the handle is shut down on every path.
        let handle = ClusterHandle(h);
        let conf_c = conf
            .map(|p| cstr(&p.to_string_lossy(), "Ceph configuration path"))
            .transpose()?;
        // SAFETY: `handle.0` is a fresh, not yet connected handle; the path is NULL or
        // NUL-terminated and outlives the call.
        let ret = unsafe {
            ffi::rados_conf_read_file(
                handle.0,
                conf_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        check(ret, || match conf {
            Some(p) => format!("cannot read the Ceph configuration {}", p.display()),
            None => "cannot find a Ceph configuration ($CEPH_CONF or /etc/ceph/ceph.conf)".into(),
        })?;
        // A client that cannot reach the monitors fails within this time instead of
        // hanging (librados' default is 300 s).
        for (k, v) in [
            ("client_mount_timeout", "30"),
            ("rados_mon_op_timeout", "30"),
        ] {
            let (k, v) = (cstr(k, "option")?, cstr(v, "value")?);
            // SAFETY: not yet connected handle, NUL-terminated strings outliving the call.
            let ret = unsafe { ffi::rados_conf_set(handle.0, k.as_ptr(), v.as_ptr()) };
            check(ret, || "cannot set a Ceph client option".into())?;
        }
        // SAFETY: configured handle, connected once.
        let ret = unsafe { ffi::rados_connect(handle.0) };
        check(ret, || {
            format!(
                "cannot connect to the Ceph cluster as client.{}{}",
                user.unwrap_or("admin"),
                conf.map(|p| format!(" with {}", p.display()))
                    .unwrap_or_default()
            )
        })?;
        Ok(Cluster {
            handle: Arc::new(handle),
        })
    }

    /// An I/O context on pool `name`.
    pub fn pool(&self, name: &str) -> Result<Pool> {
        let name_c = cstr(name, "pool name")?;
        let mut io: ffi::IoCtx = ptr::null_mut();
        // SAFETY: connected handle (kept alive by `self`), valid out-pointer,
        // NUL-terminated name outliving the call.
        let ret = unsafe { ffi::rados_ioctx_create(self.handle.0, name_c.as_ptr(), &mut io) };
        check(ret, || format!("cannot open Ceph pool {name}"))?;
        Ok(Pool {
            inner: Arc::new(PoolHandle {
                io,
                name: name.to_string(),
                _cluster: self.handle.clone(),
            }),
        })
    }
}

struct PoolHandle {
    io: ffi::IoCtx,
    name: String,
    _cluster: Arc<ClusterHandle>,
}

// SAFETY: a `rados_ioctx_t` may be shared between threads (librados documents I/O
// contexts as thread-safe for concurrent operations that do not change the context's
// own settings, and this crate never changes them).
unsafe impl Send for PoolHandle {}
// SAFETY: as above.
unsafe impl Sync for PoolHandle {}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        // SAFETY: created by `rados_ioctx_create`, destroyed once, after every image
        // opened through it (they hold an `Arc` of it) and before the connection (held
        // by `_cluster`, dropped after this).
        unsafe { ffi::rados_ioctx_destroy(self.io) }
    }
}

/// An I/O context on one pool: RBD images are created, opened, listed and removed
/// through it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolHandle>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pool({})", self.inner.name)
    }
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.inner.name)
    }

    /// Creates image `name` of `size` bytes with objects of `2^order` bytes (`None`:
    /// the cluster's default, 4 MiB), in the cluster's default format and features
    /// (`rbd default features`; layering, needed for clones, is among Ceph's
    /// defaults). A new image reads as zeros. `EEXIST` when it exists.
    pub fn create(&self, name: &str, size: u64, order: Option<u8>) -> Result<()> {
        let name_c = cstr(name, "image name")?;
        let mut order: c_int = order.map_or(0, c_int::from);
        // SAFETY: open I/O context, NUL-terminated name and a valid `order` in-out
        // pointer, all outliving the call.
        let ret = unsafe { ffi::rbd_create(self.inner.io, name_c.as_ptr(), size, &mut order) };
        check(ret, || {
            format!("cannot create RBD image {} ({size} bytes)", self.spec(name))
        })
    }

    /// Opens image `name` for reading and writing.
    pub fn open(&self, name: &str) -> Result<Image> {
        self.open_with(name, None, false)
    }

    /// Opens image `name` read-only (no watch, no lock: for readers).
    pub fn open_read_only(&self, name: &str) -> Result<Image> {
        self.open_with(name, None, true)
    }

    /// Opens snapshot `snap` of image `name`, read-only.
    pub fn open_snapshot(&self, name: &str, snap: &str) -> Result<Image> {
        self.open_with(name, Some(snap), true)
    }

    fn open_with(&self, name: &str, snap: Option<&str>, read_only: bool) -> Result<Image> {
        let name_c = cstr(name, "image name")?;
        let snap_c = snap.map(|s| cstr(s, "snapshot name")).transpose()?;
        let snap_p = snap_c.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: ffi::Image = ptr::null_mut();
        // SAFETY: open I/O context, valid out-pointer, NUL-terminated name and
        // snapshot name (or NULL) outliving the call.
        let ret = unsafe {
            if read_only {
                ffi::rbd_open_read_only(self.inner.io, name_c.as_ptr(), &mut image, snap_p)
            } else {
                ffi::rbd_open(self.inner.io, name_c.as_ptr(), &mut image, snap_p)
            }
        };
        let spec = match snap {
            Some(s) => format!("{}@{s}", self.spec(name)),
            None => self.spec(name),
        };
        check(ret, || format!("cannot open RBD image {spec}"))?;
        Ok(Image {
            image,
            spec,
            _pool: self.inner.clone(),
        })
    }

    /// Removes image `name` (it must have no snapshots). `ENOENT` when there is none.
    pub fn remove(&self, name: &str) -> Result<()> {
        let name_c = cstr(name, "image name")?;
        // SAFETY: open I/O context, NUL-terminated name outliving the call.
        let ret = unsafe { ffi::rbd_remove(self.inner.io, name_c.as_ptr()) };
        check(ret, || {
            format!("cannot remove RBD image {}", self.spec(name))
        })
    }

    /// Renames image `from` to `to` in this pool (its snapshots go with it). `EEXIST`
    /// when `to` exists.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (from_c, to_c) = (cstr(from, "image name")?, cstr(to, "image name")?);
        // SAFETY: open I/O context, two NUL-terminated names outliving the call.
        let ret = unsafe { ffi::rbd_rename(self.inner.io, from_c.as_ptr(), to_c.as_ptr()) };
        check(ret, || {
            format!("cannot rename RBD image {} to {to}", self.spec(from))
        })
    }

    /// The names of every image in the pool.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut max: usize = 0;
        loop {
            let mut specs: Vec<ffi::ImageSpec> = Vec::with_capacity(max);
            let mut n = max;
            // SAFETY: `specs` has room for `n` records (the library fills at most `n`
            // and sets `n` to how many it filled, or to the count it needs with
            // `-ERANGE`, filling none).
            let ret = unsafe { ffi::rbd_list2(self.inner.io, specs.as_mut_ptr(), &mut n) };
            if ret == -libc_errno::ERANGE && n > max {
                max = n;
                continue;
            }
            check(ret, || {
                format!("cannot list the RBD images of pool {}", self.name())
            })?;
            let n = n.min(max);
            // SAFETY: on success the first `n` records are initialised.
            unsafe { specs.set_len(n) };
            let names = specs
                .iter()
                // SAFETY: each filled record's `name` is a NUL-terminated string the
                // library allocated (freed below by the cleanup call).
                .map(|s| {
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the strings of the `n` records the library filled, once.
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }
}

/// An open RBD image (or a snapshot of one, read-only); closed when dropped.
pub struct Image {
    image: ffi::Image,
    spec: String,
    _pool: Arc<PoolHandle>,
}

// SAFETY: an `rbd_image_t` may be used from several threads at once: librbd serialises
// what must be serialised inside the image context (its C API documents concurrent
// I/O on one handle as supported), and this type is closed only by `Drop`.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Image({})", self.spec)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by `rbd_open*`, closed once; every asynchronous write it
        // issued has completed (`write_all_at_many` waits for all of them).
        unsafe { ffi::rbd_close(self.image) };
    }
}

/// One asynchronous write in flight; its completion is released when dropped (after
/// it was waited for).
struct Pending(ffi::Completion);

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: the completion was waited for before this drop (see
        // `write_all_at_many`), so librbd no longer uses it; released once.
        unsafe { ffi::rbd_aio_release(self.0) }
    }
}

impl Image {
    /// `pool/image` or `pool/image@snap`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The image's size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let ret = unsafe { ffi::rbd_get_size(self.image, &mut size) };
        check(ret, || {
            format!("cannot get the size of RBD image {}", self.spec)
        })?;
        Ok(size)
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the image's end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        // SAFETY: open image; `buf` is valid for writes of `buf.len()` bytes for the
        // whole (synchronous) call.
        let ret = unsafe {
            ffi::rbd_read(
                self.image,
                offset,
                buf.len(),
                buf.as_mut_ptr().cast::<c_char>(),
            )
        };
        if ret < 0 {
            return Err(Error::new(
                format!(
                    "cannot read {} bytes at offset {offset:#x} of RBD image {}",
                    buf.len(),
                    self.spec
                ),
                ret as i64,
            ));
        }
        Ok(ret as usize)
    }

    /// Writes every `(offset, bytes)` of `writes` with librbd's asynchronous I/O, all
    /// in flight at once, and returns when every one has completed: the first error,
    /// if any. The buffers are borrowed for exactly that long, so the caller bounds
    /// the memory in flight by what it passes.
    pub fn write_all_at_many(&self, writes: &[(u64, &[u8])]) -> Result<()> {
        let mut pending: Vec<(Pending, u64, usize)> = Vec::with_capacity(writes.len());
        let mut first_err: Option<Error> = None;
        for &(offset, buf) in writes {
            let mut c: ffi::Completion = ptr::null_mut();
            // SAFETY: valid out-pointer; no callback, no argument.
            let ret = unsafe { ffi::rbd_aio_create_completion(ptr::null_mut(), None, &mut c) };
            if ret < 0 {
                first_err = Some(Error::new("cannot create an RBD completion", ret as i64));
                break;
            }
            let p = Pending(c);
            // SAFETY: open image; `buf` stays borrowed (and so valid and unchanged)
            // until this function returns, which is after the completion is waited
            // for below, on every path.
            let ret = unsafe {
                ffi::rbd_aio_write(self.image, offset, buf.len(), buf.as_ptr().cast(), p.0)
            };
            if ret < 0 {
                first_err = Some(Error::new(
                    format!(
                        "cannot write {} bytes at offset {offset:#x} of RBD image {}",
                        buf.len(),
                        self.spec
                    ),
                    ret as i64,
                ));
                // Not submitted: nothing to wait for; released by the drop of `p`.
                break;
            }
            pending.push((p, offset, buf.len()));
        }
        for (p, offset, len) in &pending {
            // SAFETY: a completion of a submitted write, waited for once.
            unsafe { ffi::rbd_aio_wait_for_complete(p.0) };
            // SAFETY: the completion is complete; reading its result is allowed.
            let ret = unsafe { ffi::rbd_aio_get_return_value(p.0) };
            if ret < 0 && first_err.is_none() {
                first_err = Some(Error::new(
                    format!(
                        "cannot write {len} bytes at offset {offset:#x} of RBD image {}",
                        self.spec
                    ),
                    ret as i64,
                ));
            }
        }
        drop(pending);
        first_err.map_or(Ok(()), Err)
    }

    /// Flushes written data to the cluster (librbd's cache, if any).
    pub fn flush(&self) -> Result<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_flush(self.image) };
        check(ret, || format!("cannot flush RBD image {}", self.spec))
    }

    fn snap_call(
        &self,
        snap: &str,
        f: unsafe extern "C" fn(ffi::Image, *const c_char) -> c_int,
        what: &str,
    ) -> Result<()> {
        let snap_c = cstr(snap, "snapshot name")?;
        // SAFETY: `f` is one of librbd's snapshot calls taking an open image and a
        // NUL-terminated snapshot name, both valid for the call.
        let ret = unsafe { f(self.image, snap_c.as_ptr()) };
        check(ret, || {
            format!("cannot {what} snapshot {}@{snap}", self.spec)
        })
    }

    /// Creates snapshot `snap`.
    pub fn snap_create(&self, snap: &str) -> Result<()> {
        self.snap_call(snap, ffi::rbd_snap_create, "create")
    }

    /// Protects snapshot `snap` (clones may then be made of it).
    pub fn snap_protect(&self, snap: &str) -> Result<()> {
        self.snap_call(snap, ffi::rbd_snap_protect, "protect")
    }

    /// Unprotects snapshot `snap`; `EBUSY` while it has clones. A snapshot that is not
    /// protected is left as it is (no error).
    pub fn snap_unprotect(&self, snap: &str) -> Result<()> {
        match self.snap_call(snap, ffi::rbd_snap_unprotect, "unprotect") {
            Err(e) if e.errno == libc_errno::EINVAL => Ok(()),
            other => other,
        }
    }

    /// Removes snapshot `snap` (it must not be protected).
    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        self.snap_call(snap, ffi::rbd_snap_remove, "remove")
    }

    /// Whether snapshot `snap` is protected.
    pub fn snap_is_protected(&self, snap: &str) -> Result<bool> {
        let snap_c = cstr(snap, "snapshot name")?;
        let mut out: c_int = 0;
        // SAFETY: open image, NUL-terminated name and valid out-pointer for the call.
        let ret = unsafe { ffi::rbd_snap_is_protected(self.image, snap_c.as_ptr(), &mut out) };
        check(ret, || {
            format!("cannot query snapshot {}@{snap}", self.spec)
        })?;
        Ok(out != 0)
    }

    /// The clones (`pool/image`) of the snapshot this image was opened at
    /// ([`Pool::open_snapshot`]).
    pub fn children(&self) -> Result<Vec<String>> {
        let mut max: usize = 0;
        loop {
            let mut specs: Vec<ffi::LinkedImageSpec> = Vec::with_capacity(max);
            let mut n = max;
            // SAFETY: `specs` has room for `n` records; the library fills at most `n`
            // and sets `n` to how many it filled (or to the count it needs with
            // `-ERANGE`, filling none).
            let ret = unsafe { ffi::rbd_list_children3(self.image, specs.as_mut_ptr(), &mut n) };
            if ret == -libc_errno::ERANGE && n > max {
                max = n;
                continue;
            }
            check(ret, || format!("cannot list the clones of {}", self.spec))?;
            let n = n.min(max);
            // SAFETY: on success the first `n` records are initialised.
            unsafe { specs.set_len(n) };
            let text = |p: *mut c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: a non-NULL string of a filled record is NUL-terminated
                    // and allocated by the library (freed below).
                    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                }
            };
            let names = specs
                .iter()
                .filter(|s| !s.trash)
                .map(|s| format!("{}/{}", text(s.pool_name), text(s.image_name)))
                .collect();
            // SAFETY: frees the strings of the `n` records the library filled, once.
            unsafe { ffi::rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }
}
