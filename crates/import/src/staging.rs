//! Receiving an upload into its staging file (`PUT /v2/images/{id}/stage`, and
//! `PUT /v2/images/{id}/file` before its import): the body in page-aligned pieces of
//! [`WRITE_BATCH`] bytes, each written with `O_DIRECT` where the filesystem allows it,
//! then synced before the caller records the upload.
//!
//! Measured on the bench's loopback stage of its uploads (`cargo xtask bench --only
//! vimport`), staging ran at 38–65 % of `dd conv=fsync` into the same filesystem when
//! the body went through a `Read` bridge: each piece of the body (up to hyper's read
//! buffer, a few hundred KiB) was one hand-off between the runtime and the blocking
//! thread, copied and written on its own, and the whole upload reached the disk only
//! in the final sync, after its last byte. The HTTP layer now gathers the body into
//! large recycled buffers on the runtime, queued ahead of the writer ([`Pieces`]).
//! Through the page cache (with a flush every 16 MiB while the rest arrived) staging
//! then ran at 51–84 %, and swung 0.39–1.7 s for one 720 MiB upload: the buffers
//! started 16 bytes past a page (the kernel copies from those about five times slower,
//! see [`IoBuffer`]), and on this VM page cache allocated from memory the host had
//! taken back costs a host page fault per page. Aligned buffers written directly copy
//! nothing into the page cache; the upload is reserved on disk first when its length
//! is known, so the writes do not extend the file one by one.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use vconvert_core::{IoBuffer, TargetFile};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::workspace::Workspace;

/// Bytes of a piece (the last may be shorter): one write each.
pub const WRITE_BATCH: usize = 4 << 20;

/// How often what is written so far is flushed while the upload arrives, when it goes
/// through the page cache (a filesystem without `O_DIRECT`, such as tmpfs): the disk
/// writes during the upload instead of after it.
pub const WRITEBACK_INTERVAL: Duration = Duration::from_millis(250);

/// Bytes written between two flushes, at the latest (an upload of a few hundred MiB
/// arrives in well under [`WRITEBACK_INTERVAL`] on loopback).
pub const FLUSH_EVERY: u64 = 16 << 20;

/// An upload's bytes, in pieces, in order; blocking.
pub trait Pieces: Send {
    /// The next piece (never empty); `None` at the end of the upload.
    fn next_piece(&mut self) -> std::io::Result<Option<IoBuffer>>;

    /// Takes back a piece's buffer once it is written, to fill it again (fresh
    /// buffers cost a page fault per 4 KiB).
    fn recycle(&mut self, _buf: IoBuffer) {}
}

/// [`Pieces`] of a reader, read into buffers of [`WRITE_BATCH`] bytes.
pub struct ReadPieces<R> {
    reader: R,
    /// An error met after some bytes of a piece: returned by the next call.
    error: Option<std::io::Error>,
    /// The last piece's buffer, written.
    spare: IoBuffer,
}

impl<R: Read + Send> ReadPieces<R> {
    /// The pieces of `reader`.
    pub fn new(reader: R) -> Self {
        ReadPieces {
            reader,
            error: None,
            spare: IoBuffer::default(),
        }
    }
}

impl<R: Read + Send> Pieces for ReadPieces<R> {
    fn next_piece(&mut self) -> std::io::Result<Option<IoBuffer>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut buf = std::mem::take(&mut self.spare);
        buf.resize(WRITE_BATCH);
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if n > 0 => {
                    self.error = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        buf.truncate(n);
        Ok((n > 0).then_some(buf))
    }

    fn recycle(&mut self, buf: IoBuffer) {
        self.spare = buf;
    }
}

/// Reads and discards up to `max` bytes of what is left of `body`.
pub fn drain(body: &mut dyn Pieces, max: u64) {
    let mut seen = 0u64;
    while seen < max {
        match body.next_piece() {
            Ok(Some(p)) => seen += p.len() as u64,
            _ => return,
        }
    }
}

/// Streams `body` into a new file at `path`, synced when it returns `Ok`; holds
/// workspace space under `key` as it grows when the length is unknown; refuses more
/// than `cap` bytes. On error the file may remain (the caller removes it).
pub fn receive(
    workspace: &Workspace,
    path: &Path,
    body: &mut dyn Pieces,
    content_length: Option<u64>,
    key: &str,
    cap: u64,
) -> Result<()> {
    let f = File::create(path).map_err(Error::internal)?;
    let f = TargetFile::with_direct(f, path);
    if let Some(len) = content_length.filter(|&len| len <= cap) {
        f.reserve(0, len);
    }
    // Through the page cache, what is written so far is flushed while the rest
    // arrives; errors are left to the final sync, which reports them.
    let flusher = (!f.is_direct()).then(|| f.try_clone().ok()).flatten();
    // Asks for a flush; closed when the upload is received.
    let (flush, asked) = mpsc::sync_channel::<()>(1);
    std::thread::scope(|s| {
        if let Some(flusher) = flusher {
            let spawned = std::thread::Builder::new()
                .name("vimport-writeback".into())
                .spawn_scoped(s, move || {
                    while let Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) =
                        asked.recv_timeout(WRITEBACK_INTERVAL)
                    {
                        let _ = flusher.sync_data();
                    }
                });
            // Without the thread the final sync still writes everything.
            drop(spawned);
        }
        receive_into(workspace, &f, body, content_length, key, cap, flush)
    })?;
    f.sync_all().map_err(Error::internal)
}

fn receive_into(
    workspace: &Workspace,
    f: &TargetFile,
    body: &mut dyn Pieces,
    content_length: Option<u64>,
    key: &str,
    cap: u64,
    flush: mpsc::SyncSender<()>,
) -> Result<()> {
    let mut total = 0u64;
    let mut unflushed = 0u64;
    loop {
        let piece = body
            .next_piece()
            .map_err(|e| Error::BadRequest(format!("upload interrupted: {e}")))?;
        let Some(piece) = piece else { break };
        let n = piece.len() as u64;
        let at = total;
        total += n;
        if total > cap {
            return Err(Error::TooLarge(format!(
                "the upload exceeds image_size_cap ({cap} bytes)"
            )));
        }
        if let Some(len) = content_length {
            if total > len {
                return Err(Error::BadRequest(format!(
                    "upload longer than its Content-Length ({len} bytes)"
                )));
            }
        } else if !workspace.try_hold(key, n) {
            return Err(Error::TooLarge(
                "workspace full while receiving the upload; try again later".into(),
            ));
        }
        // Whole pages go directly (when the file allows it); a last piece's tail that
        // is not a whole page goes through the page cache, flushed by the final sync.
        f.write_all_at(&piece, at).map_err(Error::internal)?;
        body.recycle(piece);
        failpoint::hit("stage.receiving");
        unflushed += n;
        if unflushed >= FLUSH_EVERY {
            // A flush already asked for covers this too.
            let _ = flush.try_send(());
            unflushed = 0;
        }
    }
    if let Some(len) = content_length {
        if total != len {
            return Err(Error::BadRequest(format!(
                "upload ended after {total} of {len} bytes"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of odd sizes.
    struct Given(Vec<Vec<u8>>);

    impl Pieces for Given {
        fn next_piece(&mut self) -> std::io::Result<Option<IoBuffer>> {
            Ok((!self.0.is_empty()).then(|| IoBuffer::from(self.0.remove(0))))
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn pieces_are_written_in_order_whatever_their_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(dir.path(), 1 << 30).unwrap();
        let all = data(9 << 20);
        // Many tiny pieces, then large ones.
        let mut pieces = Vec::new();
        let mut at = 0;
        for (i, len) in std::iter::repeat_n(7usize, 1500)
            .chain(std::iter::repeat_n(1 << 20, 20))
            .enumerate()
        {
            let len = len + i % 3;
            let end = (at + len).min(all.len());
            if at == end {
                break;
            }
            pieces.push(all[at..end].to_vec());
            at = end;
        }
        assert_eq!(at, all.len());
        let path = dir.path().join("staged");
        receive(
            &ws,
            &path,
            &mut Given(pieces),
            Some(all.len() as u64),
            "k",
            1 << 40,
        )
        .unwrap();
        assert!(std::fs::read(&path).unwrap() == all);
        // A reader's pieces, the same bytes.
        let path = dir.path().join("read");
        let mut r = ReadPieces::new(&all[..]);
        receive(&ws, &path, &mut r, None, "r", 1 << 40).unwrap();
        assert!(std::fs::read(&path).unwrap() == all);
        assert_eq!(
            ws.used(),
            all.len() as u64,
            "an unknown length is held as it grows"
        );
    }

    #[test]
    fn lengths_and_caps_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(dir.path(), 1 << 30).unwrap();
        let path = dir.path().join("staged");
        let body = || Given(vec![data(1000), data(24)]);
        let e = receive(&ws, &path, &mut body(), Some(1000), "a", 1 << 20).unwrap_err();
        assert!(
            e.to_string().contains("longer than its Content-Length"),
            "{e}"
        );
        let e = receive(&ws, &path, &mut body(), Some(2000), "a", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("ended after 1024 of 2000"), "{e}");
        let e = receive(&ws, &path, &mut body(), None, "a", 1000).unwrap_err();
        assert!(e.to_string().contains("image_size_cap"), "{e}");
        let small = Workspace::new(&dir.path().join("small"), 1010).unwrap();
        let e = receive(&small, &path, &mut body(), None, "a", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("workspace full"), "{e}");
    }
}
