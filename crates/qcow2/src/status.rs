//! Block status of a qcow2 layer, as QEMU's qcow2 driver reports it to `qemu-img map`
//! (qcow2.txt "Cluster mapping"; QEMU's `qcow2_co_block_status`).
//!
//! - Normal data clusters: data at their host offset (of the image or its external
//!   data file); compressed clusters: data, compressed, no offset.
//! - Zero clusters: zero; with their host offset when one is preallocated
//!   (`ZERO_ALLOC`). With extended L2 entries, per subcluster, and an unallocated
//!   subcluster of an allocated cluster keeps its host offset too.
//! - On images that look metadata-preallocated, data asks the host file for holes
//!   (`BDRV_BLOCK_RECURSE`). QEMU decides that once per image with a heuristic, which
//!   is reproduced exactly because `map` shows its effect: the image counts as
//!   preallocated when at least `max(real * 10 / 9, real + 2)` of the file's clusters
//!   have a non-zero refcount, `real` being the file's allocated bytes in clusters.

use std::ops::Range;

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{status_of_map, LayerStatus, Result};

use crate::l2::{COMPRESSED, OFFSET_MASK, SUBCLUSTERS, ZERO};
use crate::reader::Qcow2Reader;

/// Host offset bits of a refcount table entry (qcow2.txt "Refcount table").
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// The layer status of `range` (already checked to lie in the disk).
pub(crate) fn layer_status(r: &Qcow2Reader, range: Range<u64>) -> Result<Vec<LayerStatus>> {
    let recurse = r.metadata_preallocated()?;
    let map = r.own_map(range)?;
    let mut out = Vec::new();
    for s in status_of_map(&map) {
        if s.data {
            out.push(LayerStatus {
                recurse: recurse && s.offset.is_some(),
                ..s
            });
            continue;
        }
        let mut pos = s.start;
        while pos < s.end() {
            let (host, end) = host_of(r, pos, s.end())?;
            out.push(LayerStatus {
                start: pos,
                len: end - pos,
                offset: host.map(|h| (u32::from(r.data_file().is_some()), h)),
                ..s
            });
            pos = end;
        }
    }
    Ok(out)
}

/// The host offset of guest byte `pos` when its (sub)cluster has one although it
/// holds no data (a zero or unallocated subcluster of an allocated cluster, a
/// preallocated zero cluster), and where that answer ends (at most `end`).
fn host_of(r: &Qcow2Reader, pos: u64, end: u64) -> Result<(Option<u64>, u64)> {
    let h = r.header();
    let cs = h.cluster_size();
    let per_l2 = cs * h.l2_entries();
    let l1_index = pos / per_l2;
    let l2_off = r.l1_entries().get(l1_index as usize).copied().unwrap_or(0);
    if l2_off == 0 {
        return Ok((None, end.min((l1_index + 1) * per_l2)));
    }
    let table = r.l2_table(l2_off)?;
    let index = ((pos % per_l2) / cs) as usize;
    let cluster_start = pos / cs * cs;
    let cluster_end = end.min(cluster_start + cs);
    let (entry, step) = if h.extended_l2() {
        (table.get(2 * index).copied().unwrap_or(0), cs / SUBCLUSTERS)
    } else {
        (table.get(index).copied().unwrap_or(0), cs)
    };
    let host = entry & OFFSET_MASK;
    let preallocated = entry & COMPRESSED == 0
        && host != 0
        && (h.extended_l2() || (h.version >= 3 && entry & ZERO != 0));
    if !preallocated {
        return Ok((None, cluster_end));
    }
    let piece_end = end.min((pos / step + 1) * step);
    Ok((Some(host + (pos - cluster_start)), piece_end))
}

/// QEMU's `qcow2_detect_metadata_preallocation`: counts the file's clusters with a
/// non-zero refcount, stopping at the threshold.
pub(crate) fn detect_metadata_preallocation(r: &Qcow2Reader) -> Result<bool> {
    let h = r.header();
    let file = r.file();
    let cs = h.cluster_size();
    let real_clusters = file.allocated_bytes().unwrap_or(file.len()) / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file.len().div_ceil(cs);
    let table = file.read_vec(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        crate::header::MAX_REFTABLE_BYTES,
        "refcount table",
    )?;
    let bits = u64::from(h.refcount_bits());
    let per_block = cs * 8 / bits;
    let mut count = 0u64;
    let mut block = vec![0u8; cs as usize];
    for (i, w) in table.chunks_exact(8).enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count >= threshold {
            break;
        }
        let off = BigEndian::read_u64(w) & REFTABLE_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        file.read_exact_at(&mut block, off, "refcount block")?;
        let n = per_block.min(end_cluster - first);
        for j in 0..n {
            if count >= threshold {
                break;
            }
            let bit = j * bits;
            let byte = (bit / 8) as usize;
            let nonzero = match bits {
                1 | 2 | 4 => (block[byte] >> (bit % 8)) & ((1u8 << bits) - 1) != 0,
                _ => block[byte..byte + (bits / 8) as usize]
                    .iter()
                    .any(|&b| b != 0),
            };
            count += u64::from(nonzero);
        }
    }
    Ok(count >= threshold)
}
