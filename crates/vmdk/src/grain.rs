//! Grain directories, grain tables and grains (spec "Grain Directory and Grain Table",
//! "Stream-Optimized Compressed Sparse Extents").
//!
//! A sparse extent maps guest grains through a two-level table: the grain directory
//! (GD) holds the sector of each grain table (GT); a GT holds `numGTEsPerGT` grain table
//! entries (GTEs), each the sector of a grain, 0 for an unallocated grain, or 1 for a
//! zeroed grain when the header has [`crate::header::FLAG_ZEROED_GRAIN`].

use flate2::{Decompress, FlushDecompress, Status};

/// Bytes of one GD or GT entry (a little-endian u32 sector number).
pub const ENTRY_SIZE: u64 = 4;
/// GTE (and GD entry) of an unallocated grain (or grain table).
pub const GTE_UNALLOCATED: u32 = 0;
/// GTE of a zeroed grain (spec 5.0, sparse extent version 2 and later).
pub const GTE_ZEROED: u32 = 1;

/// What a grain table entry says of its grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated: zeros, or the parent's data.
    Unallocated,
    /// A zeroed grain.
    Zero,
    /// Plain grain bytes at this byte offset of the extent file.
    Plain(u64),
    /// A compressed grain (marker, if any, then a zlib stream) at this byte offset.
    Compressed(u64),
}

impl Grain {
    /// Interprets a GTE of an extent with or without zeroed-grain GTEs and compression.
    pub fn from_gte(gte: u32, zeroed_grain: bool, compressed: bool) -> Self {
        match gte {
            GTE_UNALLOCATED => Grain::Unallocated,
            GTE_ZEROED if zeroed_grain => Grain::Zero,
            s if compressed => Grain::Compressed(u64::from(s) * crate::SECTOR_SIZE),
            s => Grain::Plain(u64::from(s) * crate::SECTOR_SIZE),
        }
    }
}

/// Decodes little-endian u32 entries (a GD or a GT).
pub fn decode_entries(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(ENTRY_SIZE as usize)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Encodes entries as little-endian u32s.
pub fn encode_entries(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

thread_local! {
    /// Each reading thread's whole-buffer inflater (libdeflate), reused for every grain.
    static DECOMPRESSOR: std::cell::RefCell<Option<libdeflater::Decompressor>> =
        const { std::cell::RefCell::new(None) };
}

/// Inflates the zlib stream (RFC 1950, with header) at the start of `input` into `out`.
/// Returns the bytes produced. Fails when the stream is invalid, truncated, or would
/// produce more than `out.len()` bytes; bytes after the end of the stream are ignored.
///
/// A grain is at most `out.len()` bytes, so it is inflated in one call by libdeflate's
/// whole-buffer decoder (about twice as fast as a streaming inflater; its output is
/// bounded by `out`). A stream it refuses goes through zlib-rs's streaming decoder,
/// which gives the reason.
pub fn inflate(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let whole = DECOMPRESSOR.with(|cell| {
        cell.borrow_mut()
            .get_or_insert_with(libdeflater::Decompressor::new)
            .zlib_decompress(input, out)
    });
    match whole {
        Ok(n) => Ok(n),
        Err(_) => inflate_streaming(input, out),
    }
}

/// [`inflate`] by zlib-rs's streaming decoder, which explains what is wrong.
fn inflate_streaming(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let mut d = Decompress::new(true);
    // One spare byte tells "exactly full" from "more to come".
    let mut spare = [0u8; 1];
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("invalid zlib stream: {e}"))?;
    let produced = d.total_out() as usize;
    match status {
        Status::StreamEnd => Ok(produced),
        _ if produced < out.len() => Err("zlib stream is truncated".into()),
        _ => {
            let consumed = d.total_in() as usize;
            let rest = input.get(consumed..).unwrap_or_default();
            match d.decompress(rest, &mut spare, FlushDecompress::Finish) {
                Ok(Status::StreamEnd) if d.total_out() as usize == produced => Ok(produced),
                Ok(_) if d.total_out() as usize > produced => {
                    Err(format!("grain inflates to more than {} bytes", out.len()))
                }
                Ok(_) => Err("zlib stream is truncated".into()),
                Err(e) => Err(format!("invalid zlib stream: {e}")),
            }
        }
    }
}

/// The deflate level for grains (libdeflate's levels; 6 is its default, as 6 is zlib's
/// and qemu's). Measured on 173 MB of the benchmark corpus (an ext4 image of /usr/lib)
/// in 64 KiB grains, one core: qemu's zlib 6 gives 58.08 MB at ~26 MB/s; libdeflate 6
/// gives 57.36 MB (0.988×) at 70–84 MB/s; zlib-rs needs level 9 (57.70 MB, 20 MB/s) to
/// be no larger.
pub const GRAIN_DEFLATE_LEVEL: i32 = 6;

thread_local! {
    /// Each writing thread's compressor (libdeflate's state is worth reusing).
    static COMPRESSOR: std::cell::RefCell<Option<libdeflater::Compressor>> =
        const { std::cell::RefCell::new(None) };
}

/// Deflates `data` as one zlib stream (with header), as VMware and qemu write grains.
pub fn deflate(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = slot.get_or_insert_with(|| {
            libdeflater::Compressor::new(
                libdeflater::CompressionLvl::new(GRAIN_DEFLATE_LEVEL).unwrap_or_default(),
            )
        });
        let mut out = vec![0u8; c.zlib_compress_bound(data.len())];
        let n = c
            .zlib_compress(data, &mut out)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        out.truncate(n);
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gte_meanings() {
        assert_eq!(Grain::from_gte(0, true, false), Grain::Unallocated);
        assert_eq!(Grain::from_gte(1, true, false), Grain::Zero);
        assert_eq!(Grain::from_gte(1, false, false), Grain::Plain(512));
        assert_eq!(Grain::from_gte(128, false, true), Grain::Compressed(65536));
        assert_eq!(
            decode_entries(&encode_entries(&[1, 2, 0xffff_ffff])),
            [1, 2, 0xffff_ffff]
        );
    }

    #[test]
    fn inflate_is_bounded() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let z = deflate(&data).unwrap();
        // A zlib header (deflate, 32 KiB window; the level bits say "default").
        assert_eq!(z[0], 0x78);
        assert_eq!((u16::from(z[0]) * 256 + u16::from(z[1])) % 31, 0);
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&z, &mut out).unwrap(), 65536);
        assert_eq!(out, data);
        // Trailing padding is ignored.
        let mut padded = z.clone();
        padded.extend_from_slice(&[0u8; 300]);
        assert_eq!(inflate(&padded, &mut out).unwrap(), 65536);
        let mut small = vec![0u8; 65535];
        assert!(inflate(&z, &mut small).unwrap_err().contains("more than"));
        assert!(inflate(&z[..z.len() / 2], &mut out).is_err());
        assert!(inflate(b"garbage!", &mut out).is_err());
        let short = deflate(&data[..1000]).unwrap();
        assert_eq!(inflate(&short, &mut out).unwrap(), 1000);
    }
}
