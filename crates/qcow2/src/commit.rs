//! Writing guest clusters into an existing qcow2 image, for qemu-img `commit` (the
//! base receives what the layers above it store), and emptying an image.
//!
//! A cluster is written where it is: in place when its host cluster is the entry's
//! own (COPIED), else into a new host cluster written and counted before the L2 entry
//! names it (the old one, compressed or preallocated zeros, freed after). A crash
//! leaves every cluster old or new and leaks at worst. Emptying clears the L1 table
//! first, then drops the references.

use std::fs::File;

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{Error, Result};

use crate::l2::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::reader::Qcow2Reader;
use crate::resize::Writer;

/// An image being written cluster by cluster.
pub struct ClusterWriter<'a> {
    w: Writer<'a>,
    l1: Vec<u64>,
}

impl<'a> ClusterWriter<'a> {
    /// Opens `r` (written through `file`) for cluster writes.
    pub fn new(r: &'a Qcow2Reader, file: &'a File) -> Result<Self> {
        let h = r.header();
        if h.incompatible_features
            & (crate::header::incompatible::DIRTY | crate::header::incompatible::CORRUPT)
            != 0
        {
            return Err(Error::Refused {
                file: r.file().name().to_string(),
                reason: "the image is marked dirty or corrupt: repair it first (check -r all)"
                    .into(),
            });
        }
        if h.extended_l2() || r.data_file().is_some() {
            return Err(Error::unsupported(
                r.file().name(),
                "writing into a qcow2 image with extended L2 entries or a data file",
            ));
        }
        Ok(ClusterWriter {
            w: Writer::new(r, file)?,
            l1: r.l1_raw().to_vec(),
        })
    }

    /// The image's cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.w.r.header().cluster_size()
    }

    /// Stores `data` (one cluster, shorter at the end of the disk) as guest cluster
    /// `cluster`.
    pub fn write_cluster(&mut self, cluster: u64, data: &[u8]) -> Result<()> {
        let r = self.w.r;
        let h = r.header();
        let cs = h.cluster_size();
        let l2e = h.l2_entries();
        let i = (cluster / l2e) as usize;
        let entry = self.l1.get(i).copied().ok_or_else(|| {
            r.file().corrupt(
                "L1 table",
                h.l1_table_offset,
                format!("guest cluster {cluster} lies past the L1 table"),
            )
        })?;
        let mut padded = data.to_vec();
        padded.resize(cs as usize, 0);
        let mut l2 = entry & OFFSET_MASK;
        if l2 == 0 {
            // No table yet: the new-table path.
            return crate::rebase::write_cluster(&self.w, &mut self.l1, cluster, &padded);
        }
        if entry & COPIED == 0 {
            // Shared with an internal snapshot: the active state gets its own copy.
            self.l1[i] = self.w.copy_shared_l2(i as u64, entry)?;
            l2 = self.l1[i] & OFFSET_MASK;
        }
        let at = l2 + (cluster % l2e) * 8;
        let mut e = [0u8; 8];
        self.w.read(&mut e, at, "L2 table")?;
        let old = BigEndian::read_u64(&e);
        let host = old & OFFSET_MASK;
        let plain = old & COMPRESSED == 0 && old & crate::l2::ZERO == 0;
        if plain && host != 0 && old & COPIED != 0 {
            self.w.write(&padded, host, "data cluster")?;
            return self.w.sync();
        }
        let new = self.w.alloc_cluster()?;
        self.w.write(&padded, new, "data cluster")?;
        self.w.set_refcount(new / cs, 1)?;
        self.w.sync()?;
        BigEndian::write_u64(&mut e, new | COPIED);
        self.w.write(&e, at, "L2 table")?;
        self.w.sync()?;
        // What the entry named before is no longer named here.
        let mut freed = Vec::new();
        if old & COMPRESSED != 0 {
            let x = 62 - (h.cluster_bits - 8);
            let start = (old & ((1u64 << x) - 1)) & !511;
            let sectors = ((old >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
            freed.extend(start / cs..=(start + sectors * 512 - 1) / cs);
        } else if host != 0 {
            freed.push(host / cs);
        }
        self.w.release(&freed)?;
        self.w.sync()
    }
}

/// Empties the image `r` (written through `file`): its L1 table is cleared, then every
/// cluster it reached loses that reference (qemu-img `commit` without `-d`).
pub fn make_empty(r: &Qcow2Reader, file: &File) -> Result<()> {
    let w = Writer::new(r, file)?;
    let h = r.header();
    let mut b = vec![0u8; 8 * h.l1_size as usize];
    w.read(&mut b, h.l1_table_offset, "L1 table")?;
    let l1: Vec<u64> = b.chunks_exact(8).map(BigEndian::read_u64).collect();
    w.write(&vec![0u8; b.len()], h.l1_table_offset, "L1 table")?;
    w.sync()?;
    vconvert_core::fail_point("qcow2-emptied");
    crate::snapshot_edit::update_tree(&w, &l1, -1, None)
}
