//! The files a conversion writes.
//!
//! New files are created as temporaries beside their final names; [`Output::commit`]
//! syncs them, renames them into place and syncs the directory. Dropping an uncommitted
//! `Output` removes the temporaries, so a failed or cancelled conversion leaves nothing.
//!
//! A durable conversion writes its bulk data with `O_DIRECT` ([`TargetFile`]): the data
//! has to reach the disk before the commit anyway, and going around the page cache
//! spares the kernel a copy and a page allocation per 4 KiB, and the commit's sync a
//! backlog of dirty pages.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
#[cfg(target_os = "linux")]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
struct OutputFile {
    final_path: PathBuf,
    /// `None` when the file is written in place (an existing target).
    temp_path: Option<PathBuf>,
    file: Arc<TargetFile>,
}

/// Files of one output that get a direct descriptor; later ones (split VMDKs have
/// thousands of extents, all open until the commit) are written through the page cache
/// only, so that they do not need twice the file descriptors.
const MAX_DIRECT_FILES: usize = 256;

/// Raises this process's soft limit on open files to its hard limit, as a program that
/// writes split images should: a split VMDK keeps every extent file open until the
/// commit (a 3 TiB `twoGbMaxExtentSparse` target has 1,536). Best effort: the limit
/// stays as it was when it cannot be read or raised.
pub fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// The alignment of memory, offset and length that a write needs to go through the
/// direct descriptor: a page, which covers any device's logical block size up to 4 KiB.
pub const DIRECT_ALIGN: usize = 4096;

/// A file being written: an ordinary descriptor, plus, when the output writes directly,
/// a second descriptor of the same file opened with `O_DIRECT`.
///
/// [`TargetFile::write_all_at`] sends the whole pages of page-aligned writes (memory
/// and offset multiples of [`DIRECT_ALIGN`]) through the direct descriptor and
/// everything else, a shorter tail included, through the page cache. Linux keeps the
/// two coherent: a direct write first writes back and drops any cached page it covers.
/// Other uses (length, `fallocate`, reads) go to the ordinary descriptor, which the
/// type dereferences to.
#[derive(Debug)]
pub struct TargetFile {
    file: File,
    direct: Option<File>,
    /// Set when the filesystem refused an aligned direct write: all writes are buffered
    /// from then on.
    direct_refused: AtomicBool,
}

impl TargetFile {
    /// A target written through the page cache only.
    pub fn buffered(file: File) -> Self {
        TargetFile {
            file,
            direct: None,
            direct_refused: AtomicBool::new(false),
        }
    }

    /// `file` (open at `path`), with a direct descriptor when the filesystem allows one
    /// (tmpfs and some network filesystems refuse `O_DIRECT`: then buffered only).
    pub fn with_direct(file: File, path: &Path) -> Self {
        #[cfg(target_os = "linux")]
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        #[cfg(not(target_os = "linux"))]
        let direct = None;
        TargetFile {
            direct,
            ..TargetFile::buffered(file)
        }
    }

    /// Whether aligned writes go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && !self.direct_refused.load(Ordering::Relaxed)
    }

    /// Writes all of `buf` at `offset`: its whole pages directly when memory and offset
    /// are page-aligned and the file has a direct descriptor, the rest (a tail shorter
    /// than a page, or all of an unaligned write) through the page cache.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned =
            buf.as_ptr() as usize % DIRECT_ALIGN == 0 && offset % DIRECT_ALIGN as u64 == 0;
        let pages = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let direct = self
            .direct
            .as_ref()
            .filter(|_| aligned && pages > 0 && self.is_direct());
        let Some(direct) = direct else {
            return self.file.write_all_at(buf, offset);
        };
        let (head, tail) = buf.split_at(pages);
        match direct.write_all_at(head, offset) {
            // The device needs a larger alignment, or the filesystem does not do direct
            // writes after all: the page cache takes every write from now on.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.direct_refused.store(true, Ordering::Relaxed);
                self.file.write_all_at(buf, offset)
            }
            Err(e) => Err(e),
            Ok(()) => self.file.write_all_at(tail, offset + pages as u64),
        }
    }

    /// Allocates the blocks of `offset..offset + len`, which direct writes are about to
    /// fill entirely, so that those writes can run at once. Linux filesystems (ext4,
    /// XFS) hold a file's exclusive lock through a direct write that allocates blocks,
    /// which makes every allocating write wait for the one before it, while direct
    /// writes into allocated blocks (even ones that still read as zeros) share the
    /// lock. Measured on ext4: raw -> qcow2, 720 MiB of data written directly by two
    /// threads, 0.37-0.38 s of writing without this, 0.33-0.35 s with it. Nothing
    /// is allocated that the writes would not allocate; does nothing when writes go
    /// through the page cache (which allocates when it writes back) or when the
    /// filesystem cannot allocate ahead (the writes then allocate as before).
    pub fn reserve(&self, offset: u64, len: u64) {
        if len > 0 && self.is_direct() {
            // Only a hint: a refusal (EOPNOTSUPP, or ENOSPC that the write will report
            // with its own context) changes nothing.
            let _ =
                rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), offset, len);
        }
    }

    /// The threads that write a step's data to this file: the step's own when writes
    /// go directly (several writes in flight keep the disk busy), one when they go
    /// through the page cache. A buffered write holds the file's lock while it copies
    /// into the cache, and a second writer waits by spinning on it: on 2 cores,
    /// raw -> qcow2 `-t unsafe` spent 9-19 % of its time in `rwsem_spin_on_owner`
    /// with two writing threads.
    pub fn writers(&self, workers: &crate::Workers) -> crate::Workers {
        if self.is_direct() {
            workers.clone()
        } else {
            crate::Workers::new(1)
        }
    }
}

impl Deref for TargetFile {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

impl AsFd for TargetFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Writes all of `buf` at `offset` of `file` (named `name`); the error says what was
/// being written (`what`), how much and where.
pub fn write_all_at(
    file: &TargetFile,
    name: &str,
    buf: &[u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|e| {
        Error::io(
            name,
            format!(
                "cannot write {what} ({} bytes at offset {offset:#x})",
                buf.len()
            ),
            e,
        )
    })
}

/// The set of files one conversion writes (one, or several for multi-file formats).
#[derive(Debug)]
pub struct Output {
    target: PathBuf,
    existing: bool,
    files: Vec<OutputFile>,
    committed: bool,
    /// Whether new files get a direct descriptor (see [`Output::write_direct`]).
    direct: bool,
    /// The files the background writeback flushes (see [`Output::sync_in_background`]).
    flushed: Arc<Mutex<Vec<Arc<TargetFile>>>>,
    writeback: Option<Writeback>,
}

/// A thread that flushes the output files to stable storage at intervals while the
/// conversion writes them; it stops when its channel is dropped.
#[derive(Debug)]
struct Writeback {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Output {
    /// Output whose main file is `target`. With `existing`, files that already exist are
    /// opened and written in place (qemu-img's `-n`).
    pub fn new(target: &Path, existing: bool) -> Self {
        Output {
            target: target.to_path_buf(),
            existing,
            files: Vec::new(),
            committed: false,
            direct: false,
            flushed: Arc::default(),
            writeback: None,
        }
    }

    /// With `on`, files created from now on write their page-aligned data with
    /// `O_DIRECT` (see [`TargetFile`]). For conversions that sync before the commit.
    pub fn write_direct(&mut self, on: bool) {
        self.direct = on;
    }

    /// Starts flushing the files to stable storage every `every` while they are
    /// written, so that the flush at [`Output::commit`] has little left to do: the disk
    /// writes during the conversion instead of after it. Without this, the kernel keeps
    /// everything dirty in memory (up to its dirty limits) and the commit waits for all
    /// of it. Flush errors are left to the commit's own sync, which reports them.
    pub fn sync_in_background(&mut self, every: Duration) {
        if self.writeback.is_some() {
            return;
        }
        let (stop, wake) = mpsc::channel::<()>();
        let files = self.flushed.clone();
        let spawned = std::thread::Builder::new()
            .name("vconvert-writeback".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = wake.recv_timeout(every) {
                    let now: Vec<Arc<TargetFile>> = match files.lock() {
                        Ok(f) => f.clone(),
                        Err(_) => return,
                    };
                    for f in now {
                        let _ = f.sync_data();
                    }
                }
            });
        // Without a thread the commit still syncs everything; only the overlap is lost.
        if let Ok(thread) = spawned {
            self.writeback = Some(Writeback { stop, thread });
        }
    }

    /// Stops the background writeback; with `wait`, until its last flush has returned.
    fn stop_writeback(&mut self, wait: bool) {
        if let Some(w) = self.writeback.take() {
            drop(w.stop);
            if wait {
                let _ = w.thread.join();
            }
        }
    }

    /// The main target path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Whether the target is written in place.
    pub fn existing(&self) -> bool {
        self.existing
    }

    /// Creates (or, in place, opens) the file that will be `path` once committed.
    pub fn create_file(&mut self, path: &Path) -> Result<Arc<TargetFile>> {
        let name = path.display().to_string();
        if self.existing {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::io(&name, "cannot open existing target (-n)", e))?;
            let file = Arc::new(self.target_file(file, path));
            self.files.push(OutputFile {
                final_path: path.to_path_buf(),
                temp_path: None,
                file: file.clone(),
            });
            self.track(&file);
            return Ok(file);
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("'{name}' is not a file name")))?
            .to_string_lossy()
            .into_owned();
        let temp = dir.join(format!(
            ".{base}.vconvert-{}-{}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| {
                let hint = if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) {
                    format!(
                        " ({} files of this output are open; raise the open-file limit, \
                         `ulimit -n`, or choose a single-file format or subformat)",
                        self.files.len()
                    )
                } else {
                    String::new()
                };
                Error::io(
                    &name,
                    format!("cannot create temporary file in '{}'{hint}", dir.display()),
                    e,
                )
            })?;
        let file = Arc::new(self.target_file(file, &temp));
        self.files.push(OutputFile {
            final_path: path.to_path_buf(),
            temp_path: Some(temp),
            file: file.clone(),
        });
        self.track(&file);
        Ok(file)
    }

    fn target_file(&self, file: File, path: &Path) -> TargetFile {
        if self.direct && self.files.len() < MAX_DIRECT_FILES {
            TargetFile::with_direct(file, path)
        } else {
            TargetFile::buffered(file)
        }
    }

    fn track(&mut self, file: &Arc<TargetFile>) {
        if let Ok(mut f) = self.flushed.lock() {
            f.push(file.clone());
        }
    }

    /// Syncs every file, renames the temporaries to their final names and syncs their
    /// directories.
    pub fn commit(self) -> Result<()> {
        self.commit_with(true)
    }

    /// Like [`Output::commit`]; with `sync` false the files are renamed into place
    /// complete but not flushed to stable storage (qemu-img's `-t unsafe`, its default
    /// for `convert`): a crash soon after may leave them incomplete.
    pub fn commit_with(mut self, sync: bool) -> Result<()> {
        self.stop_writeback(true);
        for f in self.files.iter().filter(|_| sync) {
            f.file
                .sync_all()
                .map_err(|e| Error::io(f.final_path.display().to_string(), "cannot sync", e))?;
        }
        for f in &self.files {
            if let Some(temp) = &f.temp_path {
                std::fs::rename(temp, &f.final_path).map_err(|e| {
                    Error::io(
                        f.final_path.display().to_string(),
                        "cannot rename temporary file into place",
                        e,
                    )
                })?;
            }
        }
        for f in self.files.iter().filter(|_| sync) {
            if let Some(dir) = f.final_path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                // Best effort: some filesystems refuse fsync on directories.
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // A cancelled or failed conversion does not wait for a flush in progress.
        self.stop_writeback(false);
        if self.committed {
            return;
        }
        for f in &self.files {
            if let Some(temp) = &f.temp_path {
                let _ = std::fs::remove_file(temp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        {
            let mut out = Output::new(&target, false);
            let f = out.create_file(&target).unwrap();
            f.write_all_at(b"abc", 0).unwrap();
            assert!(!target.exists());
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "dropped output leaves nothing"
        );

        let mut out = Output::new(&target, false);
        let f = out.create_file(&target).unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"abc");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// With background writeback running (and flushing several times meanwhile), the
    /// commit still yields the complete file and a dropped output still leaves nothing.
    #[test]
    fn background_writeback_keeps_commit_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        for commit in [true, false] {
            let mut out = Output::new(&target, false);
            out.sync_in_background(Duration::from_millis(1));
            let a = out.create_file(&target).unwrap();
            for (i, piece) in data.chunks(1 << 20).enumerate() {
                a.write_all_at(piece, (i as u64) << 20).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            // A second file created after the writeback started.
            let side = dir.path().join("side.img");
            out.create_file(&side)
                .unwrap()
                .write_all_at(b"s", 0)
                .unwrap();
            if commit {
                out.commit().unwrap();
                assert_eq!(std::fs::read(&target).unwrap(), data);
                assert_eq!(std::fs::read(&side).unwrap(), b"s");
                std::fs::remove_file(&target).unwrap();
                std::fs::remove_file(&side).unwrap();
            } else {
                drop(out);
            }
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    /// Aligned writes (direct where the filesystem allows it) and unaligned ones
    /// (page cache) interleave on the same pages and file, in place and into a new file,
    /// and the file reads back exactly as if written by one descriptor.
    #[test]
    fn direct_and_buffered_writes_interleave_coherently() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        let page = DIRECT_ALIGN;
        let mut aligned = crate::IoBuffer::zeroed(4 * page);
        for (i, b) in aligned.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        for existing in [false, true] {
            if existing {
                std::fs::write(&target, vec![0xeeu8; 8 * page]).unwrap();
            }
            let mut expect = if existing {
                vec![0xeeu8; 8 * page]
            } else {
                Vec::new()
            };
            let mut put = |at: usize, bytes: &[u8]| {
                if expect.len() < at + bytes.len() {
                    expect.resize(at + bytes.len(), 0);
                }
                expect[at..at + bytes.len()].copy_from_slice(bytes);
            };
            let mut out = Output::new(&target, existing);
            out.write_direct(true);
            let f = out.create_file(&target).unwrap();
            // Buffered bytes inside a page a direct write then covers, and after it.
            f.write_all_at(b"header", 10).unwrap();
            put(10, b"header");
            f.write_all_at(&aligned, page as u64).unwrap();
            put(page, &aligned);
            f.write_all_at(b"tail", (2 * page + 7) as u64).unwrap();
            put(2 * page + 7, b"tail");
            // Aligned memory at an unaligned offset, and an unaligned length.
            f.write_all_at(&aligned[..page], 100).unwrap();
            put(100, &aligned[..page]);
            f.write_all_at(&aligned[..page + 1], (6 * page) as u64)
                .unwrap();
            put(6 * page, &aligned[..page + 1]);
            // Direct over a page the page cache holds dirty.
            f.write_all_at(&aligned[page..2 * page], 0).unwrap();
            put(0, &aligned[page..2 * page]);
            out.commit().unwrap();
            assert_eq!(
                std::fs::read(&target).unwrap(),
                expect,
                "existing {existing}"
            );
        }
    }

    /// A reservation allocates exactly its range, and only for a file written
    /// directly; writes into it read back as written; a file written through the page
    /// cache gets one writing thread, a direct one the step's.
    #[test]
    fn reservations_allocate_only_their_range_and_only_for_direct_writes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let workers = crate::Workers::new(3);
        let page = DIRECT_ALIGN as u64;
        for direct in [true, false] {
            let target = dir.path().join(format!("out-{direct}.img"));
            let mut out = Output::new(&target, false);
            out.write_direct(direct);
            let f = out.create_file(&target).unwrap();
            assert_eq!(
                f.writers(&workers).threads(),
                if f.is_direct() { 3 } else { 1 }
            );
            f.set_len(64 * page).unwrap();
            f.reserve(16 * page, 8 * page);
            let blocks = f.metadata().unwrap().blocks() * 512;
            if f.is_direct() {
                // The filesystem may allocate in larger units, never less.
                assert!(blocks >= 8 * page, "{blocks} bytes allocated");
                assert!(blocks <= 16 * page, "{blocks} bytes allocated");
            } else {
                assert_eq!(blocks, 0, "a buffered file reserved {blocks} bytes");
            }
            let mut data = crate::IoBuffer::zeroed(8 * page as usize);
            data.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 249) as u8 + 1);
            f.write_all_at(&data, 16 * page).unwrap();
            out.commit().unwrap();
            let back = std::fs::read(&target).unwrap();
            assert_eq!(back.len() as u64, 64 * page);
            assert_eq!(&back[16 * page as usize..24 * page as usize], &data[..]);
            assert!(back[..16 * page as usize].iter().all(|&b| b == 0));
            assert!(back[24 * page as usize..].iter().all(|&b| b == 0));
        }
    }

    /// Outputs of many files (split VMDKs) open direct descriptors for the first ones
    /// only: the rest must not double the descriptors the conversion holds.
    #[test]
    fn direct_descriptors_are_capped_per_output() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Output::new(&dir.path().join("x.img"), false);
        out.write_direct(true);
        let files: Vec<_> = (0..MAX_DIRECT_FILES + 3)
            .map(|i| out.create_file(&dir.path().join(format!("e{i}"))).unwrap())
            .collect();
        assert!(files[MAX_DIRECT_FILES..].iter().all(|f| !f.is_direct()));
        // Where the filesystem allows O_DIRECT, the first files have it.
        let fs_direct = files[0].is_direct();
        assert!(files[..MAX_DIRECT_FILES]
            .iter()
            .all(|f| f.is_direct() == fs_direct));
    }

    #[test]
    fn existing_target_is_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        assert!(Output::new(&target, true).create_file(&target).is_err());
        std::fs::write(&target, b"xxxxx").unwrap();
        let mut out = Output::new(&target, true);
        out.create_file(&target)
            .unwrap()
            .write_all_at(b"ab", 1)
            .unwrap();
        drop(out);
        assert_eq!(std::fs::read(&target).unwrap(), b"xabxx");
    }
}
