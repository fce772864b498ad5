//! The files a conversion writes.
//!
//! New files are created as temporaries beside their final names; [`Output::commit`]
//! syncs them, renames them into place and syncs the directory. Dropping an uncommitted
//! `Output` removes the temporaries, so a failed or cancelled conversion leaves nothing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    file: Arc<File>,
}

/// Writes all of `buf` at `offset` of `file` (named `name`); the error says what was
/// being written (`what`), how much and where.
pub fn write_all_at(file: &File, name: &str, buf: &[u8], offset: u64, what: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
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
    /// The files the background writeback flushes (see [`Output::sync_in_background`]).
    flushed: Arc<Mutex<Vec<Arc<File>>>>,
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
            flushed: Arc::default(),
            writeback: None,
        }
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
                    let now: Vec<Arc<File>> = match files.lock() {
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
    pub fn create_file(&mut self, path: &Path) -> Result<Arc<File>> {
        let name = path.display().to_string();
        if self.existing {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::io(&name, "cannot open existing target (-n)", e))?;
            let file = Arc::new(file);
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
                Error::io(
                    &name,
                    format!("cannot create temporary file in '{}'", dir.display()),
                    e,
                )
            })?;
        let file = Arc::new(file);
        self.files.push(OutputFile {
            final_path: path.to_path_buf(),
            temp_path: Some(temp),
            file: file.clone(),
        });
        self.track(&file);
        Ok(file)
    }

    fn track(&mut self, file: &Arc<File>) {
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
    use std::os::unix::fs::FileExt;

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
