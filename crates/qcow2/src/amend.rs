//! Changing a qcow2 image's options in place (qemu-img `amend -o compat=…,
//! lazy_refcounts=…`; qcow2.txt "Header").
//!
//! `lazy_refcounts` is one bit of the header, written alone. `compat` rewrites the
//! header (version 2 headers are 72 bytes, version 3 headers 112), its extensions
//! (the backing format) and the backing file name at the start of cluster 0, in one
//! write. Going down to 0.10 needs an image without version 3 features, as qemu-img
//! refuses them (refcount widths other than 16, extended L2 entries, an external data
//! file, zstd-compressed clusters; bitmaps too, which qemu-img drops with leaks); lazy
//! refcounts are turned off (unless asked for: refused) and zero clusters expanded
//! as QEMU's `qcow2_expand_zero_clusters` does: a zero cluster with no host cluster
//! becomes unallocated (an image without a backing file reads zeros there anyway) or,
//! over a backing file, a new cluster of zeros counted as often as its L2 table; one
//! with a host cluster keeps it, written with zeros (unless other L2 tables name it
//! too, where qemu would overwrite what a snapshot reads: it gets a new cluster of
//! zeros instead). Each L2 table is written once,
//! after the clusters it will name are written and counted, so a crash leaves a
//! version 3 image reading the same (leaks at worst).

use std::fs::File;

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{fail_point, Error, Options, Result};

use crate::header::{
    compatible, extension, incompatible, CompressionType, MAGIC, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use crate::l2::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
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
    // Down to 0.10, lazy refcounts are dropped unless asked for (as qemu-img does).
    let lazy =
        lazy.unwrap_or(version == 3 && h.compatible_features & compatible::LAZY_REFCOUNTS != 0);
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
        expand_zero_clusters(&w)?;
    }
    let backing = h
        .backing_file
        .clone()
        .map(|b| (b, h.backing_format.clone()));
    let header = encode_header(r, version, lazy, backing.as_ref())?;
    w.write(&header, 0, "qcow2 header")?;
    w.sync()
}

/// Refuses a downgrade to version 2 of an image that uses version 3 features that
/// cannot be undone, with qemu-img's words.
fn downgradable(w: &Writer<'_>) -> Result<()> {
    let r = w.r;
    let h = r.header();
    let name = r.file().name();
    let refuse = |what: String| Err(Error::invalid(format!("{name}: {what}")));
    if h.refcount_order != 4 {
        return refuse("compat=0.10 requires refcount_bits=16".into());
    }
    if r.data_file().is_some() {
        return refuse("Cannot downgrade an image with a data file".into());
    }
    let other = h.incompatible_features & !incompatible::COMPRESSION_TYPE;
    if other != 0 {
        return refuse(format!(
            "Cannot downgrade an image with incompatible features {other:#x} set"
        ));
    }
    if h.nb_bitmaps.unwrap_or(0) > 0 {
        return Err(Error::unsupported(
            name,
            "amending to compat=0.10 an image with persistent bitmaps (qemu-img leaves \
             them inconsistent and their clusters leaked)",
        ));
    }
    if h.compression_type != CompressionType::Zlib && has_compressed(r)? {
        return refuse(
            "Cannot downgrade an image with zstd compression type and existing compressed \
             clusters"
                .into(),
        );
    }
    Ok(())
}

/// Whether any L2 table names a compressed cluster.
fn has_compressed(r: &Qcow2Reader) -> Result<bool> {
    for l2 in l2_tables(r)? {
        let table = read_l2(r, l2)?;
        if table
            .chunks_exact(8)
            .any(|x| BigEndian::read_u64(x) & COMPRESSED != 0)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The offset of every L2 table the active L1 table and the snapshots' reach, once
/// each, in the order first reached.
fn l2_tables(r: &Qcow2Reader) -> Result<Vec<u64>> {
    let h = r.header();
    let mut l1s: Vec<(u64, u32)> = vec![(h.l1_table_offset, h.l1_size)];
    l1s.extend(r.snapshots().iter().map(|s| (s.l1_table_offset, s.l1_size)));
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (offset, size) in l1s {
        let l1 = r.file().read_vec(
            offset,
            u64::from(size) * 8,
            crate::header::MAX_L1_BYTES,
            "L1 table",
        )?;
        for e in l1.chunks_exact(8) {
            let l2 = BigEndian::read_u64(e) & OFFSET_MASK;
            if l2 != 0 && seen.insert(l2) {
                out.push(l2);
            }
        }
    }
    Ok(out)
}

/// The L2 table at `offset`.
fn read_l2(r: &Qcow2Reader, offset: u64) -> Result<Vec<u8>> {
    let cs = r.header().cluster_size();
    r.file().read_vec(offset, cs, cs, "L2 table")
}

/// Expands the zero clusters of every L2 table (see the module doc). A zero cluster
/// whose host cluster other L2 tables also reference (a snapshot may read data there)
/// gets a new cluster instead of having the shared one overwritten; the reference to
/// the shared one is dropped once the L2 table no longer names it.
fn expand_zero_clusters(w: &Writer<'_>) -> Result<()> {
    let r = w.r;
    let h = r.header();
    let cs = h.cluster_size();
    let backed = h.backing_file.is_some();
    let zeros = vec![0u8; cs as usize];
    for l2 in l2_tables(r)? {
        let mut table = read_l2(r, l2)?;
        let table_refs = w.refcount(l2 / cs)?;
        if table_refs == 0 {
            return Err(r.file().corrupt(
                "L2 table",
                l2,
                "the L2 table is referenced but its refcount is 0",
            ));
        }
        let mut changed = false;
        let mut zeroed = Vec::new();
        let mut dropped = Vec::new();
        for k in (0..table.len()).step_by(8) {
            let entry = BigEndian::read_u64(&table[k..]);
            if entry & COMPRESSED != 0 || entry & ZERO == 0 {
                continue;
            }
            changed = true;
            let host = entry & OFFSET_MASK;
            if host % cs != 0 {
                return Err(r.file().corrupt(
                    "L2 table",
                    l2 + k as u64,
                    format!("zero cluster at unaligned host offset {host:#x}"),
                ));
            }
            let rc = if host != 0 { w.refcount(host / cs)? } else { 0 };
            let new = if host != 0 && rc == table_refs {
                // Preallocated zeros only this table names: written with zeros.
                zeroed.push(host);
                host | if rc == 1 { COPIED } else { 0 }
            } else if host == 0 && !backed {
                // Reads zeros unallocated, there being no backing file.
                0
            } else {
                if host != 0 {
                    dropped.push(host);
                }
                let at = w.alloc_cluster()?;
                zeroed.push(at);
                w.set_refcount(at / cs, table_refs)?;
                at | if table_refs == 1 { COPIED } else { 0 }
            };
            BigEndian::write_u64(&mut table[k..], new);
        }
        if !changed {
            continue;
        }
        for at in zeroed {
            w.write(&zeros, at, "data cluster")?;
        }
        w.sync()?;
        fail_point("qcow2-amend-zeros-written");
        w.write(&table, l2, "L2 table")?;
        w.sync()?;
        fail_point("qcow2-amend-l2-written");
        for host in dropped {
            let rc = w.refcount(host / cs)?;
            w.set_refcount(host / cs, rc.saturating_sub(table_refs))?;
        }
        w.sync()?;
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
