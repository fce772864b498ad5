//! Resizing a raw image in place (qemu-img `resize`): the file's length is set in one
//! call (atomic: a crash leaves the old or the new length); growing reserves or writes
//! the new space first with `preallocation=falloc|full`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vconvert_core::{Error, Result};

use crate::Preallocation;

/// Zeros written at a time for `preallocation=full`.
const ZERO_CHUNK: u64 = 1 << 20;

/// Sets the raw image `file` (named `name`) to `new_size` bytes; space added past the
/// old end is reserved (`Falloc`) or written with zeros (`Full`) before the new length
/// takes effect, so it never reads as anything but zeros.
pub fn resize(file: &File, name: &str, new_size: u64, prealloc: Preallocation) -> Result<()> {
    let io = |what: &str, e: std::io::Error| Error::io(name, what.to_string(), e);
    let old = file
        .metadata()
        .map_err(|e| io("cannot read the file length", e))?
        .len();
    if new_size > old {
        match prealloc {
            Preallocation::Off => {}
            Preallocation::Falloc => {
                rustix::fs::fallocate(
                    file,
                    rustix::fs::FallocateFlags::KEEP_SIZE,
                    old,
                    new_size - old,
                )
                .map_err(|e| io("cannot preallocate", e.into()))?;
            }
            Preallocation::Full => {
                let zeros = vec![0u8; ZERO_CHUNK as usize];
                let mut pos = old;
                while pos < new_size {
                    let n = ZERO_CHUNK.min(new_size - pos);
                    file.write_all_at(&zeros[..n as usize], pos)
                        .map_err(|e| io("cannot write zeros", e))?;
                    pos += n;
                }
            }
        }
    }
    file.set_len(new_size)
        .map_err(|e| io(&format!("cannot set the length to {new_size}"), e))?;
    file.sync_all().map_err(|e| io("cannot sync", e))
}
