//! Creating, applying and deleting internal snapshots in place (qemu-img `snapshot
//! -c/-a/-d`; qcow2.txt "Snapshots").
//!
//! Reference counting follows qcow2's rule, as QEMU's `update_snapshot_refcount` and
//! `check` apply it: every L1 table (the active one and each snapshot's) counts once
//! for each L2 table it names, and for each cluster those L2 tables name. The active
//! tables' COPIED flags are then set exactly where the refcount is 1.
//!
//! Orders: a new snapshot's L1 copy and references come first, then a new snapshot
//! table and one header write that switches to it, then the old table is freed;
//! deleting switches the table first and drops the references after; applying takes
//! the snapshot's references before the active L1 table is overwritten and drops the
//! old state's after. A crash between steps leaves clusters counted too often
//! (leaks), never one counted too rarely.

use std::time::{SystemTime, UNIX_EPOCH};

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{Error, Result};

use crate::header::incompatible;
use crate::l2::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::reader::Qcow2Reader;
use crate::resize::Writer;
use crate::snapshot::Snapshot;

/// Header offset of the snapshot count, followed by the snapshot table offset
/// (qcow2.txt "Header": bytes 60-71).
const NB_SNAPSHOTS_FIELD: u64 = 60;
/// Bytes of extra data written per snapshot: VM state size (64 bits), disk size,
/// instruction count (qcow2.txt "Snapshot table entry", extra data).
const EXTRA_DATA: usize = 24;
/// Most snapshots an image may have (QEMU's `QCOW_MAX_SNAPSHOTS`).
const MAX_SNAPSHOTS: usize = 65536;

fn refuse_unsafe(r: &Qcow2Reader) -> Result<()> {
    let h = r.header();
    if h.incompatible_features & (incompatible::DIRTY | incompatible::CORRUPT) != 0 {
        return Err(Error::Refused {
            file: r.file().name().to_string(),
            reason: "the image is marked dirty or corrupt: repair it first (check -r all)".into(),
        });
    }
    if r.data_file().is_some() {
        return Err(Error::unsupported(
            r.file().name(),
            "internal snapshots of an image with an external data file",
        ));
    }
    if h.refcount_bits() == 1 {
        return Err(Error::invalid(format!(
            "{}: with refcount_bits=1 no cluster can be shared with a snapshot",
            r.file().name()
        )));
    }
    Ok(())
}

/// Adds `addend` to the refcount of every cluster the L1 table `l1` reaches (its L2
/// tables and what they name); with `copied_at`, the offset of the active L1 table,
/// also sets the COPIED flags of those tables (and of `l1`, written there) to the
/// refcounts.
pub(crate) fn update_tree(
    w: &Writer<'_>,
    l1: &[u64],
    addend: i64,
    copied_at: Option<u64>,
) -> Result<()> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let words = if h.extended_l2() { 2 } else { 1 };
    let adjust = |c: u64| -> Result<()> {
        if addend == 0 {
            return Ok(());
        }
        let rc = w.refcount(c)?;
        let max = if h.refcount_bits() == 64 {
            u64::MAX
        } else {
            (1u64 << h.refcount_bits()) - 1
        };
        let new = i128::from(rc) + i128::from(addend);
        if new < 0 || new > i128::from(max) {
            return Err(w.r.file().corrupt(
                "refcount block",
                c * cs,
                format!("the refcount of host cluster {c} would go from {rc} to {new}"),
            ));
        }
        w.set_refcount(c, new as u64)
    };
    let mut new_l1 = l1.to_vec();
    let mut l1_changed = false;
    let mut bytes = vec![0u8; cs as usize];
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        w.read(&mut bytes, l2, "L2 table")?;
        let mut changed = false;
        for k in (0..bytes.len()).step_by(8 * words) {
            let entry = BigEndian::read_u64(&bytes[k..]);
            if entry & COMPRESSED != 0 {
                let x = 62 - (h.cluster_bits - 8);
                let host = entry & ((1u64 << x) - 1);
                let sectors = ((entry >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
                let start = host & !511;
                for c in start / cs..=(start + sectors * 512 - 1) / cs {
                    adjust(c)?;
                }
                continue;
            }
            let host = entry & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            adjust(host / cs)?;
            if copied_at.is_some() {
                let want = if w.refcount(host / cs)? == 1 {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    BigEndian::write_u64(&mut bytes[k..], want);
                    changed = true;
                }
            }
        }
        if changed {
            w.write(&bytes, l2, "L2 table")?;
        }
        adjust(l2 / cs)?;
        if copied_at.is_some() {
            let want = if w.refcount(l2 / cs)? == 1 {
                e | COPIED
            } else {
                e & !COPIED
            };
            l1_changed |= want != e;
            new_l1[i] = want;
        }
    }
    if let (Some(at), true) = (copied_at, l1_changed) {
        let mut b = vec![0u8; 8 * new_l1.len()];
        for (i, e) in new_l1.iter().enumerate() {
            BigEndian::write_u64(&mut b[8 * i..], *e);
        }
        w.write(&b, at, "L1 table")?;
    }
    w.sync()
}

/// The active L1 table as stored (re-read: earlier steps may have changed its flags).
fn active_l1(w: &Writer<'_>) -> Result<Vec<u64>> {
    let h = w.r.header();
    read_l1(w, h.l1_table_offset, h.l1_size)
}

fn read_l1(w: &Writer<'_>, offset: u64, size: u32) -> Result<Vec<u64>> {
    let mut b = vec![0u8; 8 * size as usize];
    w.read(&mut b, offset, "L1 table")?;
    Ok(b.chunks_exact(8).map(BigEndian::read_u64).collect())
}

/// Writes `bytes` into new clusters at the end of the file, counted; returns where.
fn write_new(w: &Writer<'_>, bytes: &[u8], what: &str) -> Result<u64> {
    let cs = w.r.header().cluster_size();
    let n = (bytes.len() as u64).div_ceil(cs).max(1);
    let at = w.alloc_cluster()?;
    for k in 1..n {
        let next = w.alloc_cluster()?;
        if next != at + k * cs {
            return Err(Error::invalid(
                "clusters at the end of the file are not contiguous",
            ));
        }
    }
    let mut padded = bytes.to_vec();
    padded.resize((n * cs) as usize, 0);
    w.write(&padded, at, what)?;
    for c in at / cs..at / cs + n {
        w.set_refcount(c, 1)?;
    }
    w.sync()?;
    Ok(at)
}

/// One snapshot table entry.
fn encode_entry(s: &Snapshot) -> Vec<u8> {
    let id = s.info.id.as_bytes();
    let name = s.info.name.as_bytes();
    let mut b = vec![0u8; 40];
    BigEndian::write_u64(&mut b[0..], s.l1_table_offset);
    BigEndian::write_u32(&mut b[8..], s.l1_size);
    BigEndian::write_u16(&mut b[12..], id.len() as u16);
    BigEndian::write_u16(&mut b[14..], name.len() as u16);
    BigEndian::write_u32(&mut b[16..], s.info.date_sec as u32);
    BigEndian::write_u32(&mut b[20..], s.info.date_nsec as u32);
    BigEndian::write_u64(&mut b[24..], s.info.vm_clock_nsec);
    BigEndian::write_u32(
        &mut b[32..],
        s.info.vm_state_size.min(u64::from(u32::MAX)) as u32,
    );
    BigEndian::write_u32(&mut b[36..], EXTRA_DATA as u32);
    let mut extra = [0u8; EXTRA_DATA];
    BigEndian::write_u64(&mut extra[0..], s.info.vm_state_size);
    BigEndian::write_u64(&mut extra[8..], s.disk_size.unwrap_or(0));
    BigEndian::write_u64(&mut extra[16..], s.info.icount.unwrap_or(0));
    b.extend_from_slice(&extra);
    b.extend_from_slice(id);
    b.extend_from_slice(name);
    b.resize(b.len().next_multiple_of(8), 0);
    b
}

/// Writes `snapshots` as a new table, switches the header to it, frees the old one.
fn replace_table(w: &Writer<'_>, snapshots: &[Snapshot]) -> Result<()> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let table: Vec<u8> = snapshots.iter().flat_map(encode_entry).collect();
    let at = if snapshots.is_empty() {
        0
    } else {
        write_new(w, &table, "snapshot table")?
    };
    let mut field = [0u8; 12];
    BigEndian::write_u32(&mut field[0..], snapshots.len() as u32);
    BigEndian::write_u64(&mut field[4..], at);
    w.write(&field, NB_SNAPSHOTS_FIELD, "qcow2 header")?;
    w.sync()?;
    vconvert_core::fail_point("qcow2-snapshot-table-switched");
    let old_len: u64 = w.r.snapshots().iter().map(|s| s.entry_len).sum();
    if h.nb_snapshots > 0 && old_len > 0 {
        let first = h.snapshots_offset / cs;
        let last = (h.snapshots_offset + old_len - 1) / cs;
        w.release(&(first..=last).collect::<Vec<_>>())?;
        w.sync()?;
    }
    Ok(())
}

/// Finds a snapshot by id, then by name (as QEMU does).
fn find<'a>(r: &'a Qcow2Reader, key: &str) -> Option<(usize, &'a Snapshot)> {
    let s = r.snapshots();
    s.iter()
        .position(|x| x.info.id == key)
        .or_else(|| s.iter().position(|x| x.info.name == key))
        .map(|i| (i, &s[i]))
}

/// Creates internal snapshot `name` of the current state.
pub fn create_snapshot(r: &Qcow2Reader, file: &std::fs::File, name: &str) -> Result<()> {
    refuse_unsafe(r)?;
    let h = r.header();
    if r.snapshots().len() >= MAX_SNAPSHOTS {
        return Err(Error::invalid(format!(
            "{}: the image already has {MAX_SNAPSHOTS} snapshots",
            r.file().name()
        )));
    }
    if name.len() > usize::from(u16::MAX) {
        return Err(Error::invalid("snapshot name too long"));
    }
    let w = Writer::new(r, file)?;
    let l1 = active_l1(&w)?;
    // The copy keeps the entries as they are; only the active table's flags matter.
    let mut copy = vec![0u8; 8 * l1.len()];
    for (i, e) in l1.iter().enumerate() {
        BigEndian::write_u64(&mut copy[8 * i..], *e);
    }
    let l1_at = if l1.is_empty() {
        0
    } else {
        write_new(&w, &copy, "snapshot L1 table")?
    };
    update_tree(&w, &l1, 1, Some(h.l1_table_offset))?;
    vconvert_core::fail_point("qcow2-snapshot-counted");
    let id = r
        .snapshots()
        .iter()
        .filter_map(|s| s.info.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut all = r.snapshots().to_vec();
    all.push(Snapshot {
        l1_table_offset: l1_at,
        l1_size: h.l1_size,
        info: vconvert_core::SnapshotInfo {
            id: id.to_string(),
            name: name.to_string(),
            vm_state_size: 0,
            date_sec: now.as_secs(),
            date_nsec: u64::from(now.subsec_nanos()),
            vm_clock_nsec: 0,
            icount: Some(0),
        },
        disk_size: Some(h.size),
        entry_len: 0,
    });
    replace_table(&w, &all)
}

/// Deletes the internal snapshot named `key`.
pub fn delete_snapshot(r: &Qcow2Reader, file: &std::fs::File, key: &str) -> Result<()> {
    refuse_unsafe(r)?;
    // By name only, as qemu-img deletes.
    let Some((index, sn)) = r
        .snapshots()
        .iter()
        .enumerate()
        .find(|(_, s)| s.info.name == key)
    else {
        return Err(Error::invalid(format!(
            "Could not delete snapshot '{key}': snapshot not found"
        )));
    };
    let w = Writer::new(r, file)?;
    let mut rest = r.snapshots().to_vec();
    rest.remove(index);
    replace_table(&w, &rest)?;
    let l1 = read_l1(&w, sn.l1_table_offset, sn.l1_size)?;
    update_tree(&w, &l1, -1, None)?;
    if sn.l1_size > 0 {
        let cs = r.header().cluster_size();
        let first = sn.l1_table_offset / cs;
        let n = (8 * u64::from(sn.l1_size)).div_ceil(cs);
        w.release(&(first..first + n).collect::<Vec<_>>())?;
    }
    // Clusters now referenced once get their COPIED flags back.
    update_tree(&w, &active_l1(&w)?, 0, Some(r.header().l1_table_offset))
}

/// Reverts the current state to internal snapshot `key` (an id or a name).
pub fn apply_snapshot(r: &Qcow2Reader, file: &std::fs::File, key: &str) -> Result<()> {
    refuse_unsafe(r)?;
    let h = r.header();
    let Some((_, sn)) = find(r, key) else {
        return Err(Error::invalid(format!(
            "Could not apply snapshot '{key}': snapshot not found"
        )));
    };
    if sn.disk_size.is_some_and(|s| s != h.size) || sn.l1_size > h.l1_size {
        return Err(Error::unsupported(
            r.file().name(),
            "applying a snapshot taken at another disk size",
        ));
    }
    let w = Writer::new(r, file)?;
    let new = read_l1(&w, sn.l1_table_offset, sn.l1_size)?;
    let old = active_l1(&w)?;
    update_tree(&w, &new, 1, None)?;
    let mut b = vec![0u8; 8 * old.len()];
    for (i, e) in new.iter().enumerate() {
        BigEndian::write_u64(&mut b[8 * i..], *e & !COPIED);
    }
    w.write(&b, h.l1_table_offset, "L1 table")?;
    w.sync()?;
    vconvert_core::fail_point("qcow2-snapshot-applied");
    update_tree(&w, &old, -1, None)?;
    update_tree(&w, &active_l1(&w)?, 0, Some(h.l1_table_offset))
}
