//! `check`: the refcounts every cluster should have (from the header, L1/L2 tables,
//! refcount structures and snapshots) against the refcounts stored, as qemu-img check
//! counts them: stored below referenced is a corruption, above is a leak.
//!
//! It also finds metadata overlaps directly (qemu's overlap checks,
//! `docs/interop/qcow2.txt` "Host cluster management"): a guest cluster or compressed
//! cluster mapped onto the header, an L1, L2 or refcount table, a refcount block, the
//! snapshot table or a bitmap table, or two kinds of metadata in one cluster. That is
//! corruption even where the stored refcounts were forged to match, or are stale (dirty
//! bit). Only metadata is read.

use byteorder::{BigEndian, ByteOrder};
use std::collections::HashMap;

use vconvert_core::{CheckReport, Result};

use crate::header::incompatible;
use crate::l2::{decode, ClusterMapping, COPIED, OFFSET_MASK};
use crate::reader::Qcow2Reader;

/// Most host clusters we count (a larger file is refused by `check`).
const MAX_CLUSTERS: u64 = 1 << 26;

/// Kinds of metadata cluster, for the overlap check (0: none).
const META_NAMES: [&str; 10] = [
    "",
    "the image header",
    "the active L1 table",
    "the refcount table",
    "a refcount block",
    "an L2 table",
    "the snapshot table",
    "a snapshot's L1 table",
    "the bitmap directory",
    "a bitmap table",
];
const META_HEADER: u8 = 1;
const META_L1: u8 = 2;
const META_REFTABLE: u8 = 3;
const META_REFBLOCK: u8 = 4;
const META_L2: u8 = 5;
const META_SNAPSHOTS: u8 = 6;
const META_SNAPSHOT_L1: u8 = 7;
const META_BITMAP_DIR: u8 = 8;
const META_BITMAP_TABLE: u8 = 9;

struct Counter {
    cluster_bits: u32,
    refs: Vec<u16>,
    /// The kind of metadata each host cluster holds (`META_*`, 0: none).
    meta: Vec<u8>,
    report: CheckReport,
}

/// Most corruptions one structure lying past the end of the file adds to the report.
const MAX_PAST_END_REPORTS: u64 = 1024;

impl Counter {
    /// Counts one reference to every cluster that `[offset, offset + len)` touches.
    fn inc(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let (first, last) = self.span(offset, len);
        let end = (self.refs.len() as u64).min(last.saturating_add(1));
        for c in first..end {
            let r = &mut self.refs[c as usize];
            *r = r.saturating_add(1);
        }
        // One corruption per cluster past the end, as qemu counts them, up to a bound
        // (a hostile length must not make the report unbounded).
        let past = last.saturating_add(1) - first.max(end);
        for _ in 0..past.min(MAX_PAST_END_REPORTS) {
            self.report.corruptions.push(format!(
                "{what} at {offset:#x} lies past the end of the file"
            ));
        }
    }

    /// The first and last host cluster `[offset, offset + len)` touches (`len` > 0);
    /// values read from disk may make `offset + len` overflow, so it saturates.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let last_byte = offset.saturating_add(len - 1);
        (offset >> self.cluster_bits, last_byte >> self.cluster_bits)
    }

    /// Records `[offset, offset + len)` as metadata of `kind`; a cluster that already
    /// holds another kind of metadata is an overlap. Clusters past the end are left to
    /// [`Counter::inc`] to report.
    fn mark(&mut self, offset: u64, len: u64, kind: u8) {
        if len == 0 {
            return;
        }
        let (first, last) = self.span(offset, len);
        let end = (self.meta.len() as u64).min(last.saturating_add(1));
        for c in first..end {
            let m = &mut self.meta[c as usize];
            if *m != 0 && *m != kind {
                let had = META_NAMES[*m as usize];
                self.report.corruptions.push(format!(
                    "{} at {offset:#x} overlaps {had} in host cluster {c} (rule: metadata overlap)",
                    META_NAMES[kind as usize]
                ));
            } else {
                *m = kind;
            }
        }
    }

    /// The metadata kind `[offset, offset + len)` overlaps, if any.
    fn overlap(&self, offset: u64, len: u64) -> Option<(u64, &'static str)> {
        if len == 0 {
            return None;
        }
        let (first, last) = self.span(offset, len);
        let end = (self.meta.len() as u64).min(last.saturating_add(1));
        (first..end).find_map(|c| match self.meta.get(c as usize) {
            Some(&m) if m != 0 => Some((c, META_NAMES[m as usize])),
            _ => None,
        })
    }
}

/// Checks `r`'s metadata.
pub fn check(r: &Qcow2Reader) -> Result<CheckReport> {
    check_collecting(r, &mut Vec::new(), true)
}

/// Checks `r`'s metadata for what makes it unsafe to read: like [`check`], except that
/// the stored refcounts of an image whose dirty bit is set (lazy refcounts, a VM that
/// did not shut down) are known to be stale, so refcounts below the references are not
/// corruption there; metadata overlaps and invalid tables still are.
pub fn check_metadata(r: &Qcow2Reader) -> Result<CheckReport> {
    check_collecting(r, &mut Vec::new(), false)
}

/// Lowers the stored refcount of every leaked cluster of the image `r` reads to its
/// number of references (qemu-img `check -r leaks`), writing through `file` (the same
/// image opened for writing). Returns the number of clusters fixed.
pub fn repair_leaks(r: &Qcow2Reader, file: &std::fs::File) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut leaks = Vec::new();
    check_collecting(r, &mut leaks, true)?;
    let h = r.header();
    let cs = h.cluster_size();
    let bits = u64::from(h.refcount_bits());
    let per_block = cs * 8 / bits;
    let img = r.file();
    let rt = img.read_vec(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        crate::header::MAX_REFTABLE_BYTES,
        "refcount table",
    )?;
    let name = img.name().to_string();
    let io = |e| vconvert_core::Error::io(&name, "cannot write a refcount block", e);
    for &(cluster, refs) in &leaks {
        let i = (cluster / per_block) as usize;
        let Some(w) = rt.get(8 * i..8 * i + 8) else {
            continue;
        };
        let block = BigEndian::read_u64(w) & !511;
        let bit = (cluster % per_block) * bits;
        if bits < 8 {
            let at = block + bit / 8;
            let mut byte = [0u8];
            img.read_exact_at(&mut byte, at, "refcount block")?;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            byte[0] = (byte[0] & !mask) | (((refs as u8) << (bit % 8)) & mask);
            file.write_all_at(&byte, at).map_err(io)?;
        } else {
            let n = (bits / 8) as usize;
            let be = refs.to_be_bytes();
            file.write_all_at(&be[8 - n..], block + bit / 8)
                .map_err(io)?;
        }
    }
    file.sync_all().map_err(io)?;
    Ok(leaks.len() as u64)
}

/// Checks `r`, collecting `(cluster, references)` of every leaked cluster.
/// With `stale_refcounts_count`, a dirty image's refcounts below its references are
/// corruption as qemu-img check reports them.
fn check_collecting(
    r: &Qcow2Reader,
    leaks: &mut Vec<(u64, u64)>,
    stale_refcounts_count: bool,
) -> Result<CheckReport> {
    let h = r.header();
    let file = r.file();
    let cs = h.cluster_size();
    let nclusters = file.len().div_ceil(cs);
    if nclusters > MAX_CLUSTERS {
        return Err(vconvert_core::Error::unsupported(
            file.name(),
            format!("checking images of more than {MAX_CLUSTERS} clusters"),
        ));
    }
    let mut c = Counter {
        cluster_bits: h.cluster_bits,
        refs: vec![0; nclusters as usize],
        meta: vec![0; nclusters as usize],
        report: CheckReport::default(),
    };
    c.inc(0, cs, "header");
    c.mark(0, cs, META_HEADER);
    c.inc(h.l1_table_offset, 8 * u64::from(h.l1_size), "L1 table");
    c.mark(h.l1_table_offset, 8 * u64::from(h.l1_size), META_L1);
    c.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        "refcount table",
    );
    c.mark(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        META_REFTABLE,
    );
    let snapshots_len: u64 = r.snapshots().iter().map(|s| s.entry_len).sum();
    c.inc(h.snapshots_offset, snapshots_len, "snapshot table");
    c.mark(h.snapshots_offset, snapshots_len, META_SNAPSHOTS);
    if !r.bitmaps().is_empty() {
        if let Some((size, offset)) = h.bitmap_directory {
            c.inc(offset, size, "bitmap directory");
            c.mark(offset, size, META_BITMAP_DIR);
        }
        for b in r.bitmaps() {
            let (offset, entries) = b.table;
            let raw = file.read_vec(offset, 8 * u64::from(entries), 64 << 20, "bitmap table")?;
            c.inc(offset, raw.len() as u64, "bitmap table");
            c.mark(offset, raw.len() as u64, META_BITMAP_TABLE);
            for w in raw.chunks_exact(8) {
                let e = BigEndian::read_u64(w);
                let data = e & OFFSET_MASK;
                if data != 0 {
                    c.inc(data, cs, "bitmap data");
                }
            }
        }
    }

    let mut total = 0u64;
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    let mut compressed = 0u64;
    let mut next_contiguous;
    let guest_clusters = h.size.div_ceil(cs);
    let own_data = r.data_file().is_none();

    // Active L1 (with fragmentation statistics), then every snapshot's.
    let mut l1s: Vec<(Vec<u64>, bool)> = vec![(r.l1_raw().to_vec(), true)];
    for s in r.snapshots() {
        let raw = file.read_vec(
            s.l1_table_offset,
            8 * u64::from(s.l1_size),
            crate::header::MAX_L1_BYTES,
            "snapshot L1 table",
        )?;
        c.inc(s.l1_table_offset, raw.len() as u64, "snapshot L1 table");
        c.mark(s.l1_table_offset, raw.len() as u64, META_SNAPSHOT_L1);
        let words = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        l1s.push((words, false));
    }
    // Refcount blocks and L2 tables are marked before any data cluster is looked at,
    // so a data cluster over a table that comes later is found too.
    let rt_bytes = file.read_vec(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        crate::header::MAX_REFTABLE_BYTES,
        "refcount table",
    )?;
    for w in rt_bytes.chunks_exact(8) {
        let off = BigEndian::read_u64(w) & !511;
        if off != 0 && off % cs == 0 && off.checked_add(cs).is_some_and(|e| e <= file.len()) {
            c.mark(off, cs, META_REFBLOCK);
        }
    }
    for (l1, _) in &l1s {
        for &e in l1 {
            let l2_off = e & OFFSET_MASK;
            if l2_off != 0 && l2_off % cs == 0 && l2_off < file.len() {
                c.mark(l2_off, cs, META_L2);
            }
        }
    }
    let mut copied_checks: Vec<(u64, bool, String)> = Vec::new();
    for (l1, active) in &l1s {
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off % cs != 0 || l2_off >= file.len() {
                c.report.corruptions.push(format!(
                    "L1 entry {i}: L2 table offset {l2_off:#x} is invalid"
                ));
                continue;
            }
            c.inc(l2_off, cs, "L2 table");
            if *active {
                copied_checks.push((l2_off, e & COPIED != 0, format!("L2 table at {l2_off:#x}")));
            }
            let table = r.l2_table(l2_off)?;
            // qemu counts fragmentation within each L2 table.
            next_contiguous = 0;
            let step = if h.extended_l2() { 2 } else { 1 };
            for (j, w) in table.chunks(step).enumerate() {
                // Entries past the virtual size count too, as in qemu: a crash in a
                // shrink leaves them, and `-r leaks` must not free what they name.
                let guest = (i as u64 * h.l2_entries() + j as u64) * cs;
                let bitmap = if h.extended_l2() {
                    w.get(1).copied()
                } else {
                    None
                };
                let entry = w.first().copied().unwrap_or(0);
                let m = match decode(entry, bitmap, h.cluster_bits, h.version, !own_data) {
                    Ok(m) => m,
                    Err(e) => {
                        c.report
                            .corruptions
                            .push(format!("L2 table at {l2_off:#x}, entry {j}: {}", e.0));
                        continue;
                    }
                };
                let host = match m {
                    ClusterMapping::Compressed { host, len } => {
                        if let Some((hc, what)) = c.overlap(host, len) {
                            c.report.corruptions.push(format!(
                                "L2 table at {l2_off:#x}, entry {j}: compressed guest cluster at {guest:#x} is read from host {host:#x}, which overlaps {what} in host cluster {hc} (rule: metadata overlap)"
                            ));
                        }
                        c.inc(host, len, "compressed cluster");
                        if *active {
                            allocated += 1;
                            compressed += 1;
                            fragmented += 1;
                        }
                        continue;
                    }
                    ClusterMapping::Data { host } => host,
                    ClusterMapping::Zero | ClusterMapping::Subclusters { .. }
                        if entry & OFFSET_MASK != 0 =>
                    {
                        entry & OFFSET_MASK
                    }
                    _ => continue,
                };
                if own_data {
                    if let Some((_, what)) = c.overlap(host, cs) {
                        c.report.corruptions.push(format!(
                            "L2 table at {l2_off:#x}, entry {j}: guest cluster at {guest:#x} is mapped to host cluster {host:#x}, which is {what} (rule: metadata overlap)"
                        ));
                    }
                    c.inc(host, cs, "data cluster");
                }
                if *active {
                    allocated += 1;
                    // qemu's rule: a cluster not right after the previous one of the
                    // same L2 table is fragmented.
                    if next_contiguous != 0 && host != next_contiguous {
                        fragmented += 1;
                    }
                    next_contiguous = host + cs;
                    if own_data {
                        copied_checks.push((
                            host,
                            entry & COPIED != 0,
                            format!("data cluster at {host:#x} (guest {guest:#x})"),
                        ));
                    }
                }
            }
        }
        if *active {
            total = guest_clusters;
        }
    }

    // The refcount structures themselves, and the refcounts they store.
    let rt: Vec<u64> = rt_bytes.chunks_exact(8).map(BigEndian::read_u64).collect();
    let bits = u64::from(h.refcount_bits());
    let per_block = cs * 8 / bits;
    let mut blocks: HashMap<u64, Vec<u8>> = HashMap::new();
    for (i, &e) in rt.iter().enumerate() {
        let off = e & !511;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off.checked_add(cs).is_none_or(|e| e > file.len()) {
            c.report.corruptions.push(format!(
                "refcount block {i} at {off:#x} is outside the image"
            ));
            continue;
        }
        c.inc(off, cs, "refcount block");
        blocks.insert(i as u64, file.read_vec(off, cs, cs, "refcount block")?);
    }
    let stored = |cluster: u64| -> u64 {
        let Some(b) = blocks.get(&(cluster / per_block)) else {
            return 0;
        };
        let idx = cluster % per_block;
        let bit = idx * bits;
        if bits < 8 {
            let byte = b.get((bit / 8) as usize).copied().unwrap_or(0);
            u64::from(byte >> (bit % 8)) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let s = (bit / 8) as usize;
            b.get(s..s + n)
                .map(|x| x.iter().fold(0u64, |acc, &v| (acc << 8) | u64::from(v)))
                .unwrap_or(0)
        }
    };
    let dirty = h.incompatible_features & incompatible::DIRTY != 0;
    let mut highest = 0u64;
    let mut leaked = 0u64;
    for (i, &refs) in c.refs.iter().enumerate() {
        let i = i as u64;
        let refs = u64::from(refs);
        let have = stored(i);
        if refs > 0 || have > 0 {
            highest = i + 1;
        }
        if have < refs && (stale_refcounts_count || !dirty) {
            c.report.corruptions.push(format!(
                "cluster {i}: refcount {have} but {refs} references"
            ));
        } else if have > refs {
            leaked += 1;
            leaks.push((i, refs));
            c.report.leaks.push(format!(
                "cluster {i}: refcount {have} but {refs} references (leaked)"
            ));
        }
    }
    if !dirty {
        for (host, copied, what) in copied_checks {
            let rc = stored(host / cs);
            if (rc == 1) != copied {
                c.report.corruptions.push(format!(
                    "{what}: COPIED flag is {} but the refcount is {rc}",
                    if copied { "set" } else { "clear" }
                ));
            }
        }
    }
    let mut report = c.report;
    report.leaked_clusters = leaked;
    report.image_end_offset = Some(highest * cs);
    report.total_clusters = Some(total.max(guest_clusters));
    report.allocated_clusters = Some(allocated);
    report.fragmented_clusters = Some(fragmented);
    report.compressed_clusters = Some(compressed);
    Ok(report)
}
