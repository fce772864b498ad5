//! Positional, thread-safe access to the bytes of an image file.
//!
//! [`Storage`] is the byte source (a real file, or memory for fuzzing and tests);
//! [`ImageFile`] adds the file's name and bounds-checked reads that turn every short
//! read or out-of-file offset into an [`Error`] naming the structure and offset.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Error, Result};

/// A byte source with positional reads and no shared seek state.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Bytes the storage occupies on its device (`actual-size`), if known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// The next offset at or after `offset` that may hold data, or `None` when only holes
    /// follow. The default treats everything as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }
    /// The next hole at or after `offset` (the length at the latest). The default has
    /// no holes.
    fn next_hole(&self, _offset: u64) -> io::Result<u64> {
        self.size()
    }
}

/// A file on the host, read with `pread`.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(pos) => Ok(Some(pos)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            // Filesystems without SEEK_DATA: everything is data.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(Some(offset)),
            Err(e) => Err(e.into()),
        }
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(offset)) {
            Ok(pos) => Ok(pos),
            Err(rustix::io::Errno::NXIO)
            | Err(rustix::io::Errno::INVAL)
            | Err(rustix::io::Errno::OPNOTSUPP) => self.size(),
            Err(e) => Err(e.into()),
        }
    }
}

/// Bytes in memory: the file abstraction fuzz targets and unit tests use.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    bytes: Arc<Vec<u8>>,
}

impl MemStorage {
    /// Storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: Arc::new(bytes),
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.bytes.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = offset as usize;
        let n = buf.len().min(self.bytes.len() - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
}

/// An image file: its name (for errors), its storage and its length at open time.
///
/// All reads are bounds-checked against that length: a structure that would extend past
/// the end of the file is an [`Error::Corrupt`] naming the structure and offset.
#[derive(Clone, Debug)]
pub struct ImageFile {
    name: String,
    path: PathBuf,
    storage: Arc<dyn Storage>,
    len: u64,
}

impl ImageFile {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(&name, "cannot open", e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(&name, "cannot stat", e))?;
        if meta.is_dir() {
            return Err(Error::io(
                &name,
                "cannot open",
                io::Error::other("is a directory"),
            ));
        }
        Self::from_storage(path, Arc::new(FileStorage::new(file)))
    }

    /// An image file over any storage, named `path` in errors.
    pub fn from_storage(path: &Path, storage: Arc<dyn Storage>) -> Result<Self> {
        let name = path.display().to_string();
        let len = storage
            .size()
            .map_err(|e| Error::io(&name, "cannot get length", e))?;
        Ok(ImageFile {
            name,
            path: path.to_path_buf(),
            storage,
            len,
        })
    }

    /// Bytes in memory named `name`.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Self {
        ImageFile {
            name: name.to_string(),
            path: PathBuf::from(name),
            len: bytes.len() as u64,
            storage: Arc::new(MemStorage::new(bytes)),
        }
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the file when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Bytes the file occupies on disk, if known.
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    /// An [`Error::Corrupt`] for this file.
    pub fn corrupt(
        &self,
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::corrupt(&self.name, structure, offset, reason)
    }

    /// Checks that `[offset, offset + len)` lies inside the file.
    pub fn check_range(&self, structure: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(self.corrupt(
                structure,
                offset,
                format!(
                    "{len} bytes at offset {offset:#x} extend past the end of the file ({} bytes)",
                    self.len
                ),
            )),
        }
    }

    /// Reads exactly `buf.len()` bytes of `structure` at `offset`, which must lie inside
    /// the file.
    pub fn read_exact_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        structure: &'static str,
    ) -> Result<()> {
        self.check_range(structure, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            match self.storage.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    return Err(self.corrupt(
                        structure,
                        pos,
                        "unexpected end of file (was the file truncated while being read?)",
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        &self.name,
                        format!(
                            "cannot read {} bytes of {structure} at offset {pos:#x}",
                            buf.len() - done
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Reads `len` bytes of `structure` at `offset` into a new vector, refusing lengths
    /// above `max` (so a hostile size field cannot make us allocate without bound).
    pub fn read_vec(
        &self,
        offset: u64,
        len: u64,
        max: u64,
        structure: &'static str,
    ) -> Result<Vec<u8>> {
        if len > max {
            return Err(self.corrupt(
                structure,
                offset,
                format!("size {len} exceeds the limit of {max} bytes"),
            ));
        }
        self.check_range(structure, offset, len)?;
        let mut v = vec![0u8; len as usize];
        self.read_exact_at(&mut v, offset, structure)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let f = ImageFile::from_bytes("mem.img", (0u8..100).collect());
        let mut b = [0u8; 10];
        f.read_exact_at(&mut b, 90, "header").unwrap();
        assert_eq!(b[0], 90);
        let err = f
            .read_exact_at(&mut b, 91, "L2 table")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mem.img") && err.contains("L2 table") && err.contains("0x5b"),
            "{err}"
        );
        assert!(f.read_exact_at(&mut b, u64::MAX - 2, "x").is_err());
        assert!(f.read_vec(0, 50, 40, "table").is_err());
        assert_eq!(f.read_vec(0, 50, 50, "table").unwrap().len(), 50);
    }

    #[test]
    fn file_storage_sees_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        drop(f);
        let s = FileStorage::new(File::open(&p).unwrap());
        let d = s.next_data(0).unwrap();
        // Filesystems without hole support report data everywhere; both are correct.
        if d != Some(0) {
            assert_eq!(d, Some(4 << 20));
            assert_eq!(s.next_hole(4 << 20).unwrap(), (4 << 20) + 4096);
            assert_eq!(s.next_data((4 << 20) + 4096).unwrap(), None);
        }
    }
}
