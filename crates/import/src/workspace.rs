//! The workspace: staged uploads and conversion outputs, within a byte quota.
//!
//! Space is held under a key (`stage:<image>` while an upload is staged,
//! `convert:<task>` while a conversion runs) and released as a whole. An upload that
//! does not fit fails at once; a conversion waits until enough space is released.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vconvert_engine::CancelToken;

/// The workspace directory and its quota.
#[derive(Debug)]
pub struct Workspace {
    dir: PathBuf,
    capacity: u64,
    held: Mutex<HashMap<String, u64>>,
    released: Condvar,
}

impl Workspace {
    /// A workspace in `dir` holding at most `capacity` bytes.
    pub fn new(dir: &Path, capacity: u64) -> std::io::Result<Workspace> {
        std::fs::create_dir_all(dir.join("staging"))?;
        std::fs::create_dir_all(dir.join("convert"))?;
        Ok(Workspace {
            dir: dir.to_path_buf(),
            capacity,
            held: Mutex::new(HashMap::new()),
            released: Condvar::new(),
        })
    }

    /// The quota in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Where the staged upload of `image` lives.
    pub fn staging_path(&self, image: &str) -> PathBuf {
        self.dir.join("staging").join(image)
    }

    /// Where the conversion of `task` writes.
    pub fn output_path(&self, task: &str) -> PathBuf {
        self.dir.join("convert").join(task)
    }

    /// Every file in the workspace.
    pub fn files(&self) -> Vec<PathBuf> {
        ["staging", "convert"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(self.dir.join(d))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|e| e.path())
            .collect()
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.held.lock().map_or(0, |h| h.values().sum())
    }

    /// Holds `bytes` more under `key` if they fit now.
    pub fn try_hold(&self, key: &str, bytes: u64) -> bool {
        let Ok(mut held) = self.held.lock() else {
            return false;
        };
        let used: u64 = held.values().sum();
        if used.saturating_add(bytes) > self.capacity {
            return false;
        }
        *held.entry(key.to_string()).or_insert(0) += bytes;
        true
    }

    /// Holds `bytes` under `key`, waiting while the workspace is full. Fails at once when
    /// `bytes` can never fit, and when `cancel` is cancelled. `waiting` is called once
    /// if it has to wait.
    pub fn hold_wait(
        &self,
        key: &str,
        bytes: u64,
        cancel: &CancelToken,
        mut waiting: impl FnMut(u64),
    ) -> Result<(), String> {
        if bytes > self.capacity {
            return Err(format!(
                "workspace full: the conversion needs {bytes} bytes but the workspace holds only {} (raise workspace_bytes)",
                self.capacity
            ));
        }
        let mut held = self
            .held
            .lock()
            .map_err(|_| "workspace lock poisoned".to_string())?;
        let mut told = false;
        loop {
            if cancel.is_cancelled() {
                return Err("cancelled".into());
            }
            let used: u64 = held.values().sum();
            if used + bytes <= self.capacity {
                *held.entry(key.to_string()).or_insert(0) += bytes;
                return Ok(());
            }
            if !told {
                waiting(used);
                told = true;
            }
            held = self
                .released
                .wait_timeout(held, Duration::from_millis(200))
                .map_err(|_| "workspace lock poisoned".to_string())?
                .0;
        }
    }

    /// Releases everything held under `key`.
    pub fn release(&self, key: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(key);
        }
        self.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn quota_is_enforced_and_waiters_wake() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Arc::new(Workspace::new(dir.path(), 100).unwrap());
        assert!(ws.try_hold("stage:a", 60));
        assert!(!ws.try_hold("stage:b", 50));
        assert!(ws.try_hold("stage:b", 40));
        assert_eq!(ws.used(), 100);
        let cancel = CancelToken::new();
        assert!(ws
            .hold_wait("convert:x", 101, &cancel, |_| {})
            .unwrap_err()
            .contains("workspace full"));
        let ws2 = ws.clone();
        let waiter = std::thread::spawn(move || {
            let mut waited = false;
            ws2.hold_wait("convert:t", 50, &CancelToken::new(), |_| waited = true)
                .unwrap();
            waited
        });
        std::thread::sleep(Duration::from_millis(50));
        ws.release("stage:a");
        assert!(waiter.join().unwrap(), "the conversion had to wait");
        assert_eq!(ws.used(), 90);
        cancel.cancel();
        assert_eq!(
            ws.hold_wait("convert:y", 20, &cancel, |_| {}).unwrap_err(),
            "cancelled"
        );
    }
}
