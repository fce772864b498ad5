//! Changing a qcow2 image's backing file (qemu-img `rebase`).
//!
//! Unsafe mode (`-u`) only rewrites the header's backing file name and format. Safe
//! mode first makes the image keep its content whatever the new backing file holds:
//! every cluster the image leaves to its backing file whose content differs between
//! the old and the new backing file is written into the image (the old content, as a
//! new data cluster, counted before the L2 entry names it; with extended L2 entries,
//! the subclusters that read from the backing file, written into the cluster's host
//! cluster before their allocation bits are set); only then does the header
//! switch (an L2 table shared with an internal snapshot is first copied for the active
//! state, see `Writer::copy_shared_l2`). Until the switch the guest sees the same bytes
//! as before, so a crash at any
//! point leaves the old state (with leaked clusters at worst) or the new one.

use std::fs::File;

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{fail_point, Error, ImageReader, LayerStatus, Result};

use crate::header::compatible;
use crate::l2::{COPIED, OFFSET_MASK};
use crate::reader::Qcow2Reader;
use crate::resize::Writer;

/// Rebases the image `r` (written through `file`) onto `backing` (name as stored and
/// format; `None` for no backing file). With `new`, the new backing image opened
/// (safe mode; `None` with a backing name means unsafe mode), clusters whose content
/// would change are copied into the image first.
pub fn rebase(
    r: &Qcow2Reader,
    file: &File,
    backing: Option<(String, Option<String>)>,
    new: Option<&dyn ImageReader>,
    safe: bool,
) -> Result<()> {
    let h = r.header();
    if h.incompatible_features
        & (crate::header::incompatible::DIRTY | crate::header::incompatible::CORRUPT)
        != 0
    {
        return Err(Error::Refused {
            file: r.file().name().to_string(),
            reason: "the image is marked dirty or corrupt: repair it first (check -r all)".into(),
        });
    }
    let w = Writer::new(r, file)?;
    if safe {
        copy_differences(&w, new)?;
        fail_point("qcow2-rebase-copied");
    }
    let lazy = h.compatible_features & compatible::LAZY_REFCOUNTS != 0;
    let header = crate::amend::encode_header(r, h.version, lazy, backing.as_ref())?;
    w.write(&header, 0, "qcow2 header")?;
    w.sync()
}

/// Copies into the image every cluster it leaves to its backing file whose content
/// differs between the old backing file and `new` (zeros where either has none).
fn copy_differences(w: &Writer<'_>, new: Option<&dyn ImageReader>) -> Result<()> {
    let r = w.r;
    let h = r.header();
    let cs = h.cluster_size();
    let size = h.size;
    let mut old_buf = vec![0u8; cs as usize];
    let mut new_buf = vec![0u8; cs as usize];
    let mut l1: Vec<u64> = r.l1_raw().to_vec();
    let mut done: Option<u64> = None;
    let mut pos = 0u64;
    while pos < size {
        let window = pos..size.min(pos + (64 << 20));
        let status: Vec<LayerStatus> = r.layer_status(window.clone())?;
        for s in status.iter().filter(|s| !s.allocated()) {
            let mut c = s.start / cs * cs;
            while c < s.end() {
                if done == Some(c) {
                    // Extended L2: an earlier unallocated range of this cluster already
                    // had all its unallocated subclusters written.
                    c += cs;
                    continue;
                }
                let len = cs.min(size - c);
                let (a, b) = (&mut old_buf[..len as usize], &mut new_buf[..len as usize]);
                r.read_at(a, c)?;
                match new {
                    Some(n) => vconvert_core::read_backing(n, b, c)?,
                    None => b.fill(0),
                }
                // Only the unallocated part of the cluster reads from a backing file.
                let (from, to) = (s.start.max(c) - c, s.end().min(c + len) - c);
                if a[from as usize..to as usize] != b[from as usize..to as usize] {
                    let mut data = vec![0u8; cs as usize];
                    data[..len as usize].copy_from_slice(a);
                    if h.extended_l2() {
                        write_subclusters(w, &mut l1, c / cs, &data)?;
                        done = Some(c);
                    } else {
                        write_cluster(w, &mut l1, c / cs, &data)?;
                    }
                }
                c += cs;
            }
        }
        pos = window.end;
    }
    Ok(())
}

/// Extended L2 entries (qcow2.txt "Extended L2 Entries"): makes the subclusters of
/// guest cluster `cluster` that read from the backing file hold `data` (the cluster's
/// current content). Without a host cluster, a new one holds all of `data`, every
/// subcluster allocated (see [`write_cluster`]); with one, the unallocated
/// subclusters' bytes are written into it and synced, then the entry's allocation
/// bits set (the entry and its bitmap in one 16-byte write).
fn write_subclusters(w: &Writer<'_>, l1: &mut [u64], cluster: u64, data: &[u8]) -> Result<()> {
    let r = w.r;
    let h = r.header();
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let i = (cluster / l2e) as usize;
    let mut l1e = l1.get(i).copied().unwrap_or(0);
    if l1e & OFFSET_MASK != 0 && l1e & COPIED == 0 {
        // Shared with an internal snapshot: the active state gets its own copy.
        l1e = w.copy_shared_l2(i as u64, l1e)?;
        l1[i] = l1e;
    }
    let l2 = l1e & OFFSET_MASK;
    let at = l2 + (cluster % l2e) * h.l2_entry_size();
    let mut pair = [0u8; 16];
    if l2 != 0 {
        w.read(&mut pair, at, "L2 table")?;
    }
    let entry = BigEndian::read_u64(&pair[..8]);
    let bitmap = BigEndian::read_u64(&pair[8..]);
    let host = entry & OFFSET_MASK;
    if host == 0 || entry & crate::l2::COMPRESSED != 0 {
        return write_cluster(w, l1, cluster, data);
    }
    if w.refcount(host / cs)? > 1 {
        // A snapshot reaches this host cluster too: its bytes stay as they are; the
        // active state gets a cluster of its own holding all it reads.
        write_cluster(w, l1, cluster, data)?;
        w.release(&[host / cs])?;
        return w.sync();
    }
    let sc = cs / 32;
    let mut set = 0u64;
    for k in 0..32u64 {
        if bitmap & (1 << k) == 0 && bitmap & (1 << (32 + k)) == 0 {
            let range = (k * sc) as usize..((k + 1) * sc) as usize;
            w.write(&data[range], host + k * sc, "data subcluster")?;
            set |= 1 << k;
        }
    }
    w.sync()?;
    BigEndian::write_u64(&mut pair[8..], bitmap | set);
    w.write(&pair, at, "L2 table")?;
    w.sync()
}

/// Stores `data` as guest cluster `cluster` (unallocated until now): a new data
/// cluster written and counted, a new L2 table if needed (written, counted, then named
/// in the L1 table), then the L2 entry (with extended L2 entries, every subcluster
/// allocated, the entry and its bitmap in one write).
pub(crate) fn write_cluster(
    w: &Writer<'_>,
    l1: &mut [u64],
    cluster: u64,
    data: &[u8],
) -> Result<()> {
    let r = w.r;
    let h = r.header();
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let i = (cluster / l2e) as usize;
    let Some(&entry) = l1.get(i) else {
        return Err(r.file().corrupt(
            "L1 table",
            h.l1_table_offset,
            format!("guest cluster {cluster} lies past the L1 table"),
        ));
    };
    let mut l2 = entry & OFFSET_MASK;
    if l2 != 0 && entry & COPIED == 0 {
        // Shared with an internal snapshot: the active state gets its own copy.
        l1[i] = w.copy_shared_l2(i as u64, entry)?;
        l2 = l1[i] & OFFSET_MASK;
    }
    let host = w.alloc_cluster()?;
    w.write(data, host, "data cluster")?;
    w.set_refcount(host / cs, 1)?;
    if l2 == 0 {
        l2 = w.alloc_cluster()?;
        w.write(&vec![0u8; cs as usize], l2, "new L2 table")?;
        w.set_refcount(l2 / cs, 1)?;
        w.sync()?;
        let e = l2 | COPIED;
        w.write(
            &e.to_be_bytes(),
            h.l1_table_offset + 8 * i as u64,
            "L1 table",
        )?;
        l1[i] = e;
    }
    w.sync()?;
    let mut e = [0u8; 16];
    BigEndian::write_u64(&mut e, host | COPIED);
    BigEndian::write_u64(&mut e[8..], u64::from(u32::MAX));
    let at = l2 + (cluster % l2e) * h.l2_entry_size();
    w.write(&e[..h.l2_entry_size() as usize], at, "L2 table")?;
    w.sync()
}
