//! Where active images' bytes live, behind [`Store`] so the import workflow does not
//! know the backend; [`FsStore`] keeps one file per image in `store_dir`, and (with
//! the cargo feature `rbd`) [`crate::rbd_store::RbdStore`] one RBD image per image in
//! a Ceph pool.

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use vconvert_core::ImageReader;
use vconvert_engine::{ConvertOptions, Observer};

/// The stored bytes of an image, read from any offset (downloads honour `Range`).
pub trait StoredData: Read + Seek + Send {}

impl<T: Read + Seek + Send> StoredData for T {}

/// An image store. Calls block.
pub trait Store: Send + Sync + Debug {
    /// Takes the complete, synced file `from` as the data of image `id`, atomically
    /// (a reader sees the old data, none, or all of the new).
    fn put(&self, id: &str, from: &Path) -> io::Result<()>;
    /// Whether the store takes a raw image straight from the engine
    /// ([`Store::put_raw`]), with no local file in between.
    fn writes_raw_directly(&self) -> bool {
        false
    }
    /// Converts `src` as a raw image straight into the store as the data of image
    /// `id` (only its data is written), feeding `observe` the whole image in guest
    /// order (to hash it). On error or cancellation nothing of it is left in the
    /// store. Only for a store whose [`Store::writes_raw_directly`] is true.
    fn put_raw(
        &self,
        id: &str,
        src: &dyn ImageReader,
        opts: &ConvertOptions<'_>,
        observe: Observer<'_>,
    ) -> vconvert_core::Result<()> {
        let _ = (src, opts, observe);
        Err(vconvert_core::Error::invalid(format!(
            "this store cannot take image {id} straight from the engine"
        )))
    }
    /// The data of image `id` and its length.
    fn open(&self, id: &str) -> io::Result<(Box<dyn StoredData>, u64)>;
    /// Whether the data of image `id` may be deleted now: an error of kind
    /// [`io::ErrorKind::ResourceBusy`] says why not (an RBD snapshot with clones).
    fn check_deletable(&self, id: &str) -> io::Result<()> {
        let _ = id;
        Ok(())
    }
    /// Removes the data of image `id`, complete or half-made by a `put` that did not
    /// finish (a host that died copying it), or the object `id` that [`Store::ids`]
    /// named (no error when there is none).
    fn delete(&self, id: &str) -> io::Result<()>;
    /// Names of every object in the store, for reconciliation at start: image ids, and
    /// whatever a crash left half-made (a partial copy), which [`Store::delete`]
    /// removes too.
    fn ids(&self) -> io::Result<Vec<String>>;
}

/// A directory with one file per image, named by its id.
#[derive(Debug)]
pub struct FsStore {
    dir: PathBuf,
}

impl FsStore {
    /// A store in `dir` (created if missing).
    pub fn new(dir: &Path) -> io::Result<FsStore> {
        std::fs::create_dir_all(dir)?;
        Ok(FsStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Where [`Store::put`] copies image `id` before renaming it into place, when the
    /// file to store is on another filesystem (always, for a store shared by hosts).
    fn partial(&self, id: &str) -> PathBuf {
        self.dir.join(format!(".{id}.partial"))
    }

    /// Syncs the directory, so a rename into it survives a power loss too.
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Store for FsStore {
    fn put(&self, id: &str, from: &Path) -> io::Result<()> {
        let to = self.path(id);
        if std::fs::rename(from, &to).is_ok() {
            return self.sync_dir();
        }
        // Another filesystem: copy beside the target, sync, rename.
        let tmp = self.partial(id);
        let result = (|| {
            std::fs::copy(from, &tmp)?;
            File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &to)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        self.sync_dir()?;
        std::fs::remove_file(from)
    }

    fn open(&self, id: &str) -> io::Result<(Box<dyn StoredData>, u64)> {
        let f = File::open(self.path(id))?;
        let len = f.metadata()?.len();
        Ok((Box::new(f), len))
    }

    fn delete(&self, id: &str) -> io::Result<()> {
        for path in [self.partial(id), self.path(id)] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn ids(&self) -> io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            v.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_open_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::new(&dir.path().join("store")).unwrap();
        let src = dir.path().join("x");
        std::fs::write(&src, b"hello").unwrap();
        s.put("i1", &src).unwrap();
        assert!(!src.exists());
        assert_eq!(s.open("i1").unwrap().1, 5);
        assert_eq!(s.ids().unwrap(), vec!["i1"]);
        s.delete("i1").unwrap();
        s.delete("i1").unwrap();
        assert!(s.open("i1").is_err());
    }

    /// What a host killed while copying an image into the store left (a partial copy)
    /// goes with the image's data.
    #[test]
    fn delete_removes_a_partial_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::new(&dir.path().join("store")).unwrap();
        std::fs::write(dir.path().join("store/.i2.partial"), b"half").unwrap();
        std::fs::write(dir.path().join("store/.i3.partial"), b"other").unwrap();
        assert_eq!(s.ids().unwrap().len(), 2);
        s.delete("i2").unwrap();
        assert_eq!(s.ids().unwrap(), vec![".i3.partial"]);
        s.delete(".i3.partial").unwrap();
        assert!(s.ids().unwrap().is_empty());
    }
}
