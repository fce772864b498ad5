//! The stored image's checksums, as Glance computes them: `checksum` is the MD5 and
//! `os_hash_value` the SHA-512 (Glance's default `hashing_algorithm`) of the stored
//! bytes, both lower-case hex, with `size` their count.
//!
//! [`Digests`] takes the bytes in pieces and runs each hash on a thread of its own
//! (one after the other they were most of an import's time). The workflow feeds it the
//! conversion's output as it is placed, so hashing overlaps the conversion instead of
//! reading the stored file a second time; a stored file that is not a conversion's raw
//! output is read once and fed the same way.
//!
//! Both hashes of a raw image cover every byte, zeros included (3 GiB for the bench's
//! corpus), so their speed bounds an import's: OpenSSL's implementations (libcrypto,
//! the system's) ran at 895 MB/s (MD5) and 1,228 MB/s (SHA-512) on one core here,
//! RustCrypto's `md-5` and `sha2` at 688–731 and 825–923 MB/s.

use std::io::Read;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use openssl::error::ErrorStack;
use openssl::hash::{Hasher, MessageDigest};

use crate::failpoint;

/// Pieces queued for each hash: bounds the bytes held while a hash is behind (a
/// conversion's pieces are up to a few MiB each).
const QUEUE: usize = 16;
/// Bytes read at a time when hashing a file.
const READ_SIZE: usize = 4 << 20;

/// A piece of the stream: bytes (shared by both hashes) or a run of zeros.
#[derive(Clone)]
enum Piece {
    Data(Arc<Vec<u8>>),
    Zeros(u64),
}

/// One hash's thread: where its pieces go, and its digest once they end.
type HashThread = (SyncSender<Piece>, JoinHandle<Result<Vec<u8>, ErrorStack>>);

/// MD5 and SHA-512 of a stream of bytes, each on its own thread.
pub struct Digests {
    md5: HashThread,
    sha512: HashThread,
    len: u64,
}

/// Feeds `rx` into a fresh hash of `kind` until the sender is gone; its digest.
fn hash_pieces(kind: MessageDigest, rx: Receiver<Piece>) -> Result<Vec<u8>, ErrorStack> {
    let mut h = Hasher::new(kind)?;
    let zeros = vec![0u8; 1 << 20];
    for piece in rx {
        match piece {
            Piece::Data(b) => h.update(&b[..])?,
            Piece::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(zeros.len() as u64) as usize;
                    h.update(&zeros[..k])?;
                    n -= k as u64;
                }
            }
        }
    }
    Ok(h.finish()?.to_vec())
}

fn start(name: &str, kind: MessageDigest) -> std::io::Result<HashThread> {
    let (tx, rx) = sync_channel(QUEUE);
    let h = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || hash_pieces(kind, rx))?;
    Ok((tx, h))
}

impl Digests {
    /// Starts the two hashing threads.
    pub fn new() -> std::io::Result<Digests> {
        Ok(Digests {
            md5: start("vimport-md5", MessageDigest::md5())?,
            sha512: start("vimport-sha512", MessageDigest::sha512())?,
            len: 0,
        })
    }

    fn send(&mut self, piece: Piece, len: u64) {
        // A send fails only if a hashing thread is gone (it panicked): `finish` reports it.
        let _ = self.md5.0.send(piece.clone());
        let _ = self.sha512.0.send(piece);
        self.len += len;
        failpoint::hit("hash.reading");
    }

    /// The next bytes (copied: the caller's buffer is reused).
    pub fn data(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.send(Piece::Data(Arc::new(bytes.to_vec())), bytes.len() as u64);
        }
    }

    /// The next bytes, taken.
    fn owned(&mut self, bytes: Vec<u8>) {
        let n = bytes.len() as u64;
        if n > 0 {
            self.send(Piece::Data(Arc::new(bytes)), n);
        }
    }

    /// `n` zero bytes next.
    pub fn zeros(&mut self, n: u64) {
        if n > 0 {
            self.send(Piece::Zeros(n), n);
        }
    }

    /// The bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// MD5 and SHA-512 (hex) of everything fed, and its length.
    pub fn finish(self) -> std::io::Result<(String, String, u64)> {
        let Digests {
            md5: (md5_tx, md5),
            sha512: (sha512_tx, sha512),
            len,
        } = self;
        drop((md5_tx, sha512_tx));
        let digest = |t: JoinHandle<Result<Vec<u8>, ErrorStack>>| {
            t.join()
                .map_err(|_| std::io::Error::other("a hashing thread failed"))?
                .map_err(std::io::Error::other)
        };
        let md5 = digest(md5)?;
        let sha512 = digest(sha512)?;
        Ok((hex(&md5), hex(&sha512), len))
    }

    /// MD5 and SHA-512 (hex) of what `f` reads, and its length.
    pub fn of_reader(f: &mut dyn Read) -> std::io::Result<(String, String, u64)> {
        let mut d = Digests::new()?;
        loop {
            let mut buf = vec![0u8; READ_SIZE];
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            d.owned(buf);
        }
        d.finish()
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::Md5;
    use sha2::{Digest, Sha512};

    /// Pieces of data and zeros hash as the same bytes in one piece would, with
    /// RFC 1321's and FIPS 180-2's published digests as the anchor, and RustCrypto's
    /// implementations as an independent one.
    #[test]
    fn pieces_hash_as_the_whole_stream() {
        let mut d = Digests::new().unwrap();
        d.data(b"ab");
        d.data(b"c");
        assert_eq!(
            d.finish().unwrap(),
            (
                "900150983cd24fb0d6963f7d28e17f72".to_string(),
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                 2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
                    .to_string(),
                3
            )
        );
        let mut whole: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        whole[1_000_000..3_500_000].fill(0);
        let mut d = Digests::new().unwrap();
        d.data(&whole[..1_000_000]);
        d.zeros(2_500_000);
        d.data(&whole[3_500_000..]);
        d.zeros(0);
        let expect = (
            hex(&Md5::digest(&whole)),
            hex(&Sha512::digest(&whole)),
            whole.len() as u64,
        );
        assert_eq!(d.finish().unwrap(), expect);
        assert_eq!(Digests::of_reader(&mut &whole[..]).unwrap(), expect);
    }
}
