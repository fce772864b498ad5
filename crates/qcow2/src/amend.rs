//! Changing a qcow2 image's options in place (qemu-img `amend -o compat=…,
//! lazy_refcounts=…`; qcow2.txt "Header").
//!
//! `lazy_refcounts` is one bit of the header, written alone. `compat` rewrites the
//! header (version 2 headers are 72 bytes, version 3 headers 112), its extensions
//! (the backing format) and the backing file name at the start of cluster 0, in one
//! write. Going down to 0.10 needs an image without version 3 features: no zero
//! clusters in any table, 16-bit refcounts, standard L2 entries, zlib, no bitmaps, no
//! external data file, no lazy refcounts.

use std::fs::File;

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{Error, Options, Result};

use crate::header::{
    compatible, extension, incompatible, CompressionType, MAGIC, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use crate::l2::{COMPRESSED, OFFSET_MASK, ZERO};
use crate::reader::Qcow2Reader;
use crate::resize::Writer;

/// Header offset of the compatible feature bits.
const COMPATIBLE_FIELD: u64 = 80;

/// The `-o` keys `amend` accepts.
pub const AMEND_OPTIONS: &[&str] = &["compat", "lazy_refcounts"];

/// Applies `options` (`compat`, `lazy_refcounts`) to the image `r`, written through
/// `file`.
pub fn amend(r: &Qcow2Reader, file: &File, mut options: Options) -> Result<()> {
    let compat = options.take_choice("compat", &["0.10", "v2", "1.1", "v3"])?;
    let lazy = options.take_bool("lazy_refcounts")?;
    options.finish("qcow2 amend", AMEND_OPTIONS)?;
    let h = r.header();
    let name = r.file().name().to_string();
    if h.incompatible_features & (incompatible::DIRTY | incompatible::CORRUPT) != 0 {
        return Err(Error::Refused {
            file: name,
            reason: "the image is marked dirty or corrupt: repair it first (check -r all)".into(),
        });
    }
    let version = match compat.as_deref() {
        Some("0.10" | "v2") => 2,
        Some(_) => 3,
        None => h.version,
    };
    let lazy = lazy.unwrap_or(h.compatible_features & compatible::LAZY_REFCOUNTS != 0);
    if version == 2 && lazy {
        return Err(Error::invalid(format!(
            "{name}: Lazy refcounts only supported with compatibility level 1.1 and above \
             (use compat=1.1 or greater)"
        )));
    }
    let w = Writer::new(r, file)?;
    if version == h.version {
        if version == 3 {
            let bits = if lazy {
                h.compatible_features | compatible::LAZY_REFCOUNTS
            } else {
                h.compatible_features & !compatible::LAZY_REFCOUNTS
            };
            w.write(&bits.to_be_bytes(), COMPATIBLE_FIELD, "qcow2 header")?;
            w.sync()?;
        }
        return Ok(());
    }
    if version == 2 {
        downgradable(&w)?;
    }
    let backing = h
        .backing_file
        .clone()
        .map(|b| (b, h.backing_format.clone()));
    let header = encode_header(r, version, lazy, backing.as_ref())?;
    w.write(&header, 0, "qcow2 header")?;
    w.sync()
}

/// Refuses a downgrade to version 2 of an image that uses version 3 features.
fn downgradable(w: &Writer<'_>) -> Result<()> {
    let r = w.r;
    let h = r.header();
    let refuse = |what: &str| {
        Err(Error::unsupported(
            r.file().name(),
            format!("amending to compat=0.10 an image with {what}"),
        ))
    };
    if h.refcount_order != 4 {
        return refuse("refcount_bits other than 16");
    }
    if h.extended_l2() {
        return refuse("extended L2 entries");
    }
    if h.compression_type != CompressionType::Zlib {
        return refuse("zstd compression");
    }
    if r.data_file().is_some() {
        return refuse("an external data file");
    }
    if h.nb_bitmaps.unwrap_or(0) > 0 {
        return refuse("persistent bitmaps");
    }
    if h.incompatible_features != 0
        || h.autoclear_features & !crate::header::autoclear::BITMAPS != 0
    {
        return refuse("version 3 feature bits set");
    }
    let cs = h.cluster_size();
    let mut l1s: Vec<(u64, u32)> = vec![(h.l1_table_offset, h.l1_size)];
    l1s.extend(r.snapshots().iter().map(|s| (s.l1_table_offset, s.l1_size)));
    let mut table = vec![0u8; cs as usize];
    for (offset, size) in l1s {
        let l1 = r.file().read_vec(
            offset,
            8 * u64::from(size),
            crate::header::MAX_L1_BYTES,
            "L1 table",
        )?;
        for e in l1.chunks_exact(8) {
            let l2 = BigEndian::read_u64(e) & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            w.read(&mut table, l2, "L2 table")?;
            let zero = table.chunks_exact(8).any(|x| {
                let v = BigEndian::read_u64(x);
                v & COMPRESSED == 0 && v & ZERO != 0
            });
            if zero {
                return refuse("zero clusters (convert it with -o compat=0.10 instead)");
            }
        }
    }
    Ok(())
}

/// The header, its backing format extension and the backing file name (`backing`:
/// name and format), as `version`.
pub(crate) fn encode_header(
    r: &Qcow2Reader,
    version: u32,
    lazy: bool,
    backing: Option<&(String, Option<String>)>,
) -> Result<Vec<u8>> {
    let h = r.header();
    let len = if version == 3 {
        V3_HEADER_LENGTH
    } else {
        V2_HEADER_LENGTH
    } as usize;
    let mut b = vec![0u8; len];
    BigEndian::write_u32(&mut b[0..], MAGIC);
    BigEndian::write_u32(&mut b[4..], version);
    BigEndian::write_u32(&mut b[20..], h.cluster_bits);
    BigEndian::write_u64(&mut b[24..], h.size);
    BigEndian::write_u32(&mut b[32..], h.crypt_method);
    BigEndian::write_u32(&mut b[36..], h.l1_size);
    BigEndian::write_u64(&mut b[40..], h.l1_table_offset);
    BigEndian::write_u64(&mut b[48..], h.refcount_table_offset);
    BigEndian::write_u32(&mut b[56..], h.refcount_table_clusters);
    BigEndian::write_u32(&mut b[60..], h.nb_snapshots);
    BigEndian::write_u64(&mut b[64..], h.snapshots_offset);
    if version == 3 {
        BigEndian::write_u64(&mut b[72..], h.incompatible_features);
        let compat = if lazy { compatible::LAZY_REFCOUNTS } else { 0 };
        BigEndian::write_u64(&mut b[80..], compat);
        BigEndian::write_u64(&mut b[88..], h.autoclear_features);
        BigEndian::write_u32(&mut b[96..], h.refcount_order);
        BigEndian::write_u32(&mut b[100..], len as u32);
        b[104] = match h.compression_type {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        };
    }
    if h.data_file.is_some() || h.bitmap_directory.is_some() {
        return Err(Error::unsupported(
            r.file().name(),
            "changing compat of an image with a data file or bitmaps",
        ));
    }
    if let Some(f) = backing.and_then(|(_, f)| f.as_ref()) {
        let mut ext = Vec::new();
        ext.extend_from_slice(&extension::BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&(f.len() as u32).to_be_bytes());
        ext.extend_from_slice(f.as_bytes());
        ext.resize(ext.len().next_multiple_of(8), 0);
        b.extend_from_slice(&ext);
    }
    b.extend_from_slice(&[0u8; 8]);
    if let Some((name, _)) = backing {
        let at = b.len() as u64;
        b.extend_from_slice(name.as_bytes());
        BigEndian::write_u64(&mut b[8..], at);
        BigEndian::write_u32(&mut b[16..], name.len() as u32);
    }
    if b.len() as u64 > h.cluster_size() {
        return Err(Error::invalid(format!(
            "{}: the new header does not fit in the first cluster",
            r.file().name()
        )));
    }
    Ok(b)
}
