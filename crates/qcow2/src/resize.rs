//! Resizing a qcow2 image in place (qemu-img `resize`), crash-safe: every step leaves
//! an image that opens and reads consistently, at worst with leaked clusters (which
//! `check -r leaks` reclaims), never with a reference to a free cluster.
//!
//! - Growing within the L1 table's entries: one header write (size).
//! - Growing within the L1 table's clusters: the new entries are zeroed and synced,
//!   then one header write (size and L1 size).
//! - Growing past them: a new L1 table is written at the end of the file and synced,
//!   its clusters are counted, then one header write switches to it (size, L1 size,
//!   L1 offset, 24 bytes in one sector), then the old table's clusters are freed.
//! - Growing with preallocation (`metadata`, `falloc`, `full`): host clusters for
//!   every new guest cluster are allocated at the end of the file (a refcount block
//!   placed among them wherever their range has none), reserved or written with zeros
//!   and synced, then counted, then named by L2 entries past the current end (unseen
//!   until the header grows); then the L1 table and header as above.
//! - A file outgrowing its refcount table: a larger table is written at the end
//!   with the refcount blocks its own clusters need, counted, then one header write
//!   (offset and clusters) switches to it, then the old table is freed.
//! - Shrinking: the header's size is written first (the guest no longer sees the end);
//!   then each L2 table loses its entries past the end (or the L1 its tables wholly
//!   past it), synced, before the clusters they referenced are freed.
//!
//! - Internal snapshots (version 3 only; version 2 images with snapshots are refused
//!   with qemu's message) keep their L1 tables, their sizes and every cluster they
//!   reach: an L2 table the resize must edit while a snapshot shares it is copied
//!   first (copy written and counted, L1 entry switched, then the shared table's
//!   reference dropped); tables dropped by a shrink lose one reference each.
//!
//! Fail points (`VCONVERT_FAIL_POINT`, see [`vconvert_core::fail_point`]) sit between
//! the steps so that tests can stop the process there.

use std::fs::File;
use std::os::unix::fs::FileExt;

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{fail_point, Error, Result};

use crate::header::{incompatible, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_VIRTUAL_SIZE};
use crate::l2::{decode, ClusterMapping, OFFSET_MASK};
use crate::reader::Qcow2Reader;

/// Header offset of the virtual size; the crypt method, L1 size and L1 offset follow
/// it (qcow2.txt "Header": bytes 24-47).
const SIZE_FIELD: u64 = 24;
/// Header offset of the refcount table offset; its size in clusters follows
/// (qcow2.txt "Header": bytes 48-59).
const REFTABLE_FIELD: u64 = 48;
/// Host offset bits of a refcount table entry.
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Writes and syncs on the image file opened for writing.
pub(crate) struct Writer<'a> {
    pub(crate) r: &'a Qcow2Reader,
    pub(crate) file: &'a File,
    /// The refcount table, read once (resizing never moves it; entries for new
    /// refcount blocks are added).
    reftable: std::cell::RefCell<Vec<u8>>,
    /// Where the next cluster allocated at the end of the file goes (0: not yet known).
    next_free: std::cell::Cell<u64>,
    /// Where the refcount table is (moved by [`Writer::grow_reftable`]).
    reftable_offset: std::cell::Cell<u64>,
}

impl<'a> Writer<'a> {
    /// A writer for `r`, whose file is open for writing as `file`.
    pub(crate) fn new(r: &'a Qcow2Reader, file: &'a File) -> Result<Self> {
        let h = r.header();
        let reftable = r.file().read_vec(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * h.cluster_size(),
            MAX_REFTABLE_BYTES,
            "refcount table",
        )?;
        Ok(Writer {
            r,
            file,
            reftable: std::cell::RefCell::new(reftable),
            next_free: std::cell::Cell::new(0),
            reftable_offset: std::cell::Cell::new(h.refcount_table_offset),
        })
    }

    pub(crate) fn name(&self) -> &str {
        self.r.file().name()
    }

    pub(crate) fn write(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                self.name(),
                format!("cannot write the {what} at offset {offset:#x}"),
                e,
            )
        })
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(self.name(), "cannot sync", e))
    }

    pub(crate) fn read(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                self.name(),
                format!("cannot read the {what} at offset {offset:#x}"),
                e,
            )
        })
    }

    /// The header's size, crypt method, L1 size and L1 offset, in one write.
    fn write_header(&self, size: u64, l1_size: u64, l1_offset: u64) -> Result<()> {
        let mut b = [0u8; 24];
        BigEndian::write_u64(&mut b[0..8], size);
        BigEndian::write_u32(&mut b[8..12], self.r.header().crypt_method);
        BigEndian::write_u32(&mut b[12..16], l1_size as u32);
        BigEndian::write_u64(&mut b[16..24], l1_offset);
        self.write(&b, SIZE_FIELD, "qcow2 header")
    }

    fn per_block(&self) -> u64 {
        let h = self.r.header();
        h.cluster_size() * 8 / u64::from(h.refcount_bits())
    }

    /// The refcount block covering `cluster` (0: none yet).
    fn block_of(&self, cluster: u64) -> u64 {
        let i = (cluster / self.per_block()) as usize;
        self.reftable
            .borrow()
            .get(8 * i..8 * i + 8)
            .map_or(0, |w| BigEndian::read_u64(w) & REFTABLE_OFFSET_MASK)
    }

    /// Whether the refcount of `cluster` can be stored: its block exists, or the
    /// refcount table has the entry for a new one.
    fn countable(&self, cluster: u64) -> Result<()> {
        let i = cluster / self.per_block();
        if self.block_of(cluster) != 0 || 8 * (i + 1) <= self.reftable.borrow().len() as u64 {
            return Ok(());
        }
        Err(Error::unsupported(
            self.name(),
            format!(
                "growing the file past what its refcount table can count (host cluster \
                 {cluster}; `resize` grows the table: resize first, or convert to a new \
                 image)"
            ),
        ))
    }

    /// Makes the refcount block covering `cluster` exist: a new block at the end of
    /// the file (see [`Writer::place_block`]).
    fn ensure_block(&self, cluster: u64) -> Result<()> {
        if self.block_of(cluster) != 0 {
            return Ok(());
        }
        self.countable(cluster)?;
        let h = self.r.header();
        let cs = h.cluster_size();
        let at = self.end_cluster()?;
        if at / cs / self.per_block() != cluster / self.per_block() {
            return Err(Error::unsupported(
                self.name(),
                format!(
                    "a new refcount block outside the range it counts (host cluster {cluster})"
                ),
            ));
        }
        self.place_block(at)
    }

    /// A new refcount block at `at` (the end of the file, in the range it counts),
    /// counting itself, written and synced before the refcount table points at it
    /// (until then nothing refers to it).
    fn place_block(&self, at: u64) -> Result<()> {
        let h = self.r.header();
        let cs = h.cluster_size();
        let per_block = self.per_block();
        let i = at / cs / per_block;
        self.next_free.set(self.next_free.get().max(at + cs));
        let mut block = vec![0u8; cs as usize];
        let bits = u64::from(h.refcount_bits());
        let bit = (at / cs % per_block) * bits;
        if bits < 8 {
            block[(bit / 8) as usize] |= 1 << (bit % 8);
        } else {
            block[((bit + bits) / 8 - 1) as usize] = 1;
        }
        self.write(&block, at, "new refcount block")?;
        self.sync()?;
        fail_point("qcow2-refcount-block-written");
        self.write(
            &at.to_be_bytes(),
            self.reftable_offset.get() + 8 * i,
            "refcount table",
        )?;
        self.sync()?;
        self.reftable.borrow_mut()[(8 * i) as usize..(8 * i + 8) as usize]
            .copy_from_slice(&at.to_be_bytes());
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file, with entries
    /// for every cluster up to `upto` (and what this adds), as qemu grows it. The new
    /// table, and the refcount blocks its own clusters need, are written and counted
    /// first (unreferenced until the switch: leaks at worst); one header write (offset
    /// and clusters, 12 bytes in one sector) switches to it; then the old table's
    /// clusters are freed. Only `resize` may call this: other commands rewrite the
    /// header from what the reader read.
    pub(crate) fn grow_reftable(&self, upto: u64) -> Result<()> {
        let h = self.r.header();
        let cs = h.cluster_size();
        let pb = self.per_block();
        let old_len = self.reftable.borrow().len() as u64;
        let c0 = self.end_cluster()? / cs;
        // Clusters for the table: enough entries for `upto`, shifted by what this
        // adds (the table, at most one block per range it spans plus two), and half
        // again the current table.
        let mut clusters = 1u64;
        loop {
            let added = 2 * clusters + 2;
            let entries = ((upto.max(c0) + added).div_ceil(pb) + 1).max(old_len / 8 * 3 / 2);
            let need = (entries * 8).div_ceil(cs);
            if need <= clusters {
                break;
            }
            clusters = need;
        }
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                self.name(),
                "growing the file past what the largest refcount table can count",
            ));
        }
        // New refcount blocks, after the table, for every range its clusters and the
        // blocks themselves fall in that has none.
        let mut blocks: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut end = c0 + clusters;
        loop {
            let mut added = false;
            for i in c0 / pb..=(end - 1) / pb {
                let has = self
                    .reftable
                    .borrow()
                    .get((8 * i) as usize..(8 * i + 8) as usize)
                    .is_some_and(|e| BigEndian::read_u64(e) & REFTABLE_OFFSET_MASK != 0);
                if !has && !blocks.contains_key(&i) {
                    blocks.insert(i, end);
                    end += 1;
                    added = true;
                }
            }
            if !added {
                break;
            }
        }
        if 8 * ((end - 1) / pb + 1) > clusters * cs {
            return Err(Error::unsupported(
                self.name(),
                "a refcount table that cannot count itself",
            ));
        }
        // Count [c0, end) in the blocks of their ranges (existing or new).
        let bits = h.refcount_bits();
        for i in c0 / pb..=(end - 1) / pb {
            let (at, mut block) = match blocks.get(&i) {
                Some(&p) => (p * cs, vec![0u8; cs as usize]),
                None => self.block_bytes(i * pb)?,
            };
            for c in (i * pb).max(c0)..((i + 1) * pb).min(end) {
                set_refcount_in(&mut block, c % pb, bits, 1);
            }
            self.write(&block, at, "refcount block")?;
        }
        let mut table = vec![0u8; (clusters * cs) as usize];
        table[..old_len as usize].copy_from_slice(&self.reftable.borrow());
        for (&i, &p) in &blocks {
            BigEndian::write_u64(&mut table[(8 * i) as usize..], p * cs);
        }
        self.write(&table, c0 * cs, "new refcount table")?;
        self.sync()?;
        fail_point("qcow2-reftable-written");
        let mut field = [0u8; 12];
        BigEndian::write_u64(&mut field[..8], c0 * cs);
        BigEndian::write_u32(&mut field[8..], clusters as u32);
        self.write(&field, REFTABLE_FIELD, "qcow2 header")?;
        self.sync()?;
        fail_point("qcow2-reftable-switched");
        let old_offset = self.reftable_offset.get();
        *self.reftable.borrow_mut() = table;
        self.reftable_offset.set(c0 * cs);
        self.next_free.set(end * cs);
        let old: Vec<u64> = (old_offset / cs..old_offset / cs + old_len.div_ceil(cs)).collect();
        self.release(&old)?;
        self.sync()
    }

    /// The first cluster-aligned offset past the file and past what was allocated.
    pub(crate) fn end_cluster(&self) -> Result<u64> {
        let cs = self.r.header().cluster_size();
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(self.name(), "cannot read the file length", e))?
            .len();
        Ok(len.next_multiple_of(cs).max(self.next_free.get()))
    }

    /// Where the refcount of `cluster` lives: (byte offset, bit shift) in its block.
    fn refcount_at(&self, cluster: u64) -> Result<(u64, u64)> {
        let h = self.r.header();
        let bits = u64::from(h.refcount_bits());
        let per_block = h.cluster_size() * 8 / bits;
        let block = self.block_of(cluster);
        if block == 0 {
            return Err(Error::unsupported(
                self.name(),
                format!(
                    "host cluster {cluster} past the image's refcount blocks (convert to a \
                     new image instead)"
                ),
            ));
        }
        let bit = (cluster % per_block) * bits;
        Ok((block + bit / 8, bit % 8))
    }

    pub(crate) fn refcount(&self, cluster: u64) -> Result<u64> {
        if self.block_of(cluster) == 0 {
            return Ok(0);
        }
        let bits = u64::from(self.r.header().refcount_bits());
        let (at, shift) = self.refcount_at(cluster)?;
        if bits < 8 {
            let mut b = [0u8];
            self.read(&mut b, at, "refcount block")?;
            return Ok(u64::from((b[0] >> shift) & ((1u8 << bits) - 1)));
        }
        let mut b = [0u8; 8];
        let n = (bits / 8) as usize;
        self.read(&mut b[8 - n..], at, "refcount block")?;
        Ok(u64::from_be_bytes(b))
    }

    pub(crate) fn set_refcount(&self, cluster: u64, value: u64) -> Result<()> {
        self.ensure_block(cluster)?;
        let bits = u64::from(self.r.header().refcount_bits());
        let (at, shift) = self.refcount_at(cluster)?;
        if bits < 8 {
            let mut b = [0u8];
            self.read(&mut b, at, "refcount block")?;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b[0] = (b[0] & !mask) | (((value as u8) << shift) & mask);
            return self.write(&b, at, "refcount block");
        }
        let n = (bits / 8) as usize;
        self.write(&value.to_be_bytes()[8 - n..], at, "refcount block")
    }

    /// A free cluster at the end of the file (past everything written so far). Where
    /// its range has no refcount block yet, the block is made first, at that place.
    pub(crate) fn alloc_cluster(&self) -> Result<u64> {
        let cs = self.r.header().cluster_size();
        let mut at = self.end_cluster()?;
        while self.block_of(at / cs) == 0 {
            self.countable(at / cs)?;
            self.place_block(at)?;
            at = self.end_cluster()?;
        }
        if self.refcount(at / cs)? != 0 {
            return Err(self.r.file().corrupt(
                "refcount block",
                self.refcount_at(at / cs)?.0,
                format!(
                    "host cluster {}, past the end of the file, has a refcount",
                    at / cs
                ),
            ));
        }
        self.next_free.set(at + cs);
        Ok(at)
    }

    /// `n` free clusters at the end of the file, as runs (first host offset, clusters):
    /// refcount blocks are placed among them where their range has none; each run
    /// stays within one refcount block's range.
    pub(crate) fn alloc_runs(&self, n: u64) -> Result<Vec<(u64, u64)>> {
        let cs = self.r.header().cluster_size();
        let per_block = self.per_block();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        while left > 0 {
            let mut at = self.end_cluster()?;
            while self.block_of(at / cs) == 0 {
                self.countable(at / cs)?;
                self.place_block(at)?;
                at = self.end_cluster()?;
            }
            let c = at / cs;
            let take = left.min((c / per_block + 1) * per_block - c);
            let (offset, block) = self.block_bytes(c)?;
            for k in c..c + take {
                if refcount_in(&block, k % per_block, self.r.header().refcount_bits()) != 0 {
                    return Err(self.r.file().corrupt(
                        "refcount block",
                        offset,
                        format!("host cluster {k}, past the end of the file, has a refcount"),
                    ));
                }
            }
            self.next_free.set(at + take * cs);
            runs.push((at, take));
            left -= take;
        }
        Ok(runs)
    }

    /// The refcount block covering `cluster`: its offset and bytes.
    fn block_bytes(&self, cluster: u64) -> Result<(u64, Vec<u8>)> {
        let offset = self.block_of(cluster);
        let mut block = vec![0u8; self.r.header().cluster_size() as usize];
        self.read(&mut block, offset, "refcount block")?;
        Ok((offset, block))
    }

    /// Sets the refcount of the `n` clusters from `first` (within one refcount block's
    /// range, whose block exists) to `value`: one read and one write of the block.
    pub(crate) fn set_refcount_run(&self, first: u64, n: u64, value: u64) -> Result<()> {
        let per_block = self.per_block();
        let bits = self.r.header().refcount_bits();
        let (offset, mut block) = self.block_bytes(first)?;
        for k in first..first + n {
            set_refcount_in(&mut block, k % per_block, bits, value);
        }
        self.write(&block, offset, "refcount block")
    }

    /// Copies the L2 table that active L1 entry `i` (`entry`) names and shares with
    /// an internal snapshot, so that the active state can change it: the copy written
    /// and counted, the L1 entry switched to it (nothing read changes), then the
    /// shared table's reference dropped. The clusters it names keep their counts
    /// (each still reached once per L1 table). Returns the new L1 entry.
    pub(crate) fn copy_shared_l2(&self, i: u64, entry: u64) -> Result<u64> {
        let h = self.r.header();
        let cs = h.cluster_size();
        let old = entry & OFFSET_MASK;
        let mut table = vec![0u8; cs as usize];
        self.read(&mut table, old, "L2 table")?;
        let at = self.alloc_cluster()?;
        self.write(&table, at, "L2 table copy")?;
        self.sync()?;
        self.set_refcount(at / cs, 1)?;
        self.sync()?;
        fail_point("qcow2-l2-copied");
        let new = at | crate::l2::COPIED;
        self.write(&new.to_be_bytes(), h.l1_table_offset + 8 * i, "L1 table")?;
        self.sync()?;
        self.release(&[old / cs])?;
        self.sync()?;
        Ok(new)
    }

    /// Drops one reference from each of `clusters` (a cluster may appear many times).
    pub(crate) fn release(&self, clusters: &[u64]) -> Result<()> {
        for &c in clusters {
            let rc = self.refcount(c)?;
            if rc == 0 {
                return Err(self.r.file().corrupt(
                    "refcount block",
                    self.refcount_at(c)?.0,
                    format!("host cluster {c} is referenced but its refcount is 0"),
                ));
            }
            self.set_refcount(c, rc - 1)?;
        }
        Ok(())
    }
}

/// Entry `i` of a refcount block of `bits`-bit entries (qcow2.txt "Refcount table":
/// big-endian, narrow entries packed from the low bits of each byte).
fn refcount_in(block: &[u8], i: u64, bits: u32) -> u64 {
    let bits = u64::from(bits);
    let bit = i * bits;
    if bits < 8 {
        return u64::from((block[(bit / 8) as usize] >> (bit % 8)) & ((1u16 << bits) - 1) as u8);
    }
    let n = (bits / 8) as usize;
    let at = (bit / 8) as usize;
    block[at..at + n]
        .iter()
        .fold(0u64, |v, &b| (v << 8) | u64::from(b))
}

/// Sets entry `i` of a refcount block of `bits`-bit entries to `value`.
fn set_refcount_in(block: &mut [u8], i: u64, bits: u32, value: u64) {
    let bits = u64::from(bits);
    let bit = i * bits;
    if bits < 8 {
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        let b = &mut block[(bit / 8) as usize];
        *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        return;
    }
    let n = (bits / 8) as usize;
    let at = (bit / 8) as usize;
    block[at..at + n].copy_from_slice(&value.to_be_bytes()[8 - n..]);
}

/// How growing reserves the new guest space (qemu-img `resize --preallocation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing: the new space is unallocated (reads zeros).
    #[default]
    Off,
    /// L2 tables and host clusters for all of it, the file extended sparsely.
    Metadata,
    /// As `Metadata`, the host clusters reserved on the file system (fallocate).
    Falloc,
    /// As `Metadata`, the host clusters written with zeros.
    Full,
}

/// Resizes the image `r` describes, written through `file` (opened for reading and
/// writing), to `new_size` bytes, the new space preallocated as `prealloc` says
/// (growing only: shrinking with preallocation is refused, as qemu-img refuses it).
/// Shrinking deletes what lies past the new end; the caller decides whether it is
/// allowed.
pub fn resize(r: &Qcow2Reader, file: &File, new_size: u64, prealloc: Preallocation) -> Result<()> {
    let h = r.header();
    let name = r.file().name();
    if new_size % 512 != 0 {
        return Err(Error::invalid(format!(
            "{name}: The new size must be a multiple of 512"
        )));
    }
    if new_size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "{name}: {new_size} bytes is more than qcow2 allows ({MAX_VIRTUAL_SIZE})"
        )));
    }
    if h.incompatible_features & (incompatible::DIRTY | incompatible::CORRUPT) != 0 {
        return Err(Error::Refused {
            file: name.to_string(),
            reason: "the image is marked dirty or corrupt: repair it first (check -r all)".into(),
        });
    }
    if r.data_file().is_some() {
        return Err(Error::unsupported(
            name,
            "resizing a qcow2 image with an external data file",
        ));
    }
    if h.nb_snapshots > 0 && h.version < 3 {
        return Err(Error::invalid(format!(
            "{name}: Can't resize a v2 image which has snapshots"
        )));
    }
    if new_size < h.size && prealloc != Preallocation::Off {
        return Err(Error::invalid(format!(
            "{name}: Preallocation can't be used for shrinking an image"
        )));
    }
    let w = Writer::new(r, file)?;
    if new_size >= h.size {
        grow(&w, new_size, prealloc)
    } else {
        shrink(&w, new_size)
    }
}

fn grow(w: &Writer<'_>, new_size: u64, prealloc: Preallocation) -> Result<()> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let per_l2 = cs * h.l2_entries();
    let l1_size = u64::from(h.l1_size);
    let need = new_size.div_ceil(per_l2);
    if need * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "{}: {new_size} bytes needs an L1 table larger than {MAX_L1_BYTES} bytes",
            w.name()
        )));
    }
    // Every cluster this may allocate at the end of the file must be countable by
    // the refcount table: checked before anything is written.
    let hide_tables = vconvert_core::ImageReader::backing(w.r)
        .map_or(0, |b| new_size.min(b.virtual_size()).div_ceil(per_l2) + 1);
    let data = if prealloc == Preallocation::Off {
        0
    } else {
        new_size.div_ceil(cs) - h.size.div_ceil(cs)
    };
    let tables = if prealloc == Preallocation::Off {
        hide_tables
    } else {
        data.div_ceil(h.l2_entries()) + 1
    };
    let worst = data + tables + (need * 8).div_ceil(cs);
    let eof = w
        .file
        .metadata()
        .map_err(|e| Error::io(w.name(), "cannot read the file length", e))?
        .len()
        .div_ceil(cs);
    if need > l1_size || worst > 0 {
        // Each new refcount block takes a cluster too; and there may be a copy of
        // the last cluster and of an L2 table shared with a snapshot.
        let upto = eof + worst + worst / w.per_block() + 4;
        if w.countable(upto).is_err() {
            w.grow_reftable(upto)?;
        }
    }
    let tail = zero_tail(w, new_size)?;
    // L1 entries past the current table, for L2 tables made to hide a backing file or
    // to preallocate.
    let extra = if prealloc == Preallocation::Off {
        hide_backing(w, new_size, tail)?
    } else {
        preallocate(w, new_size, prealloc, tail)?
    };

    let entries_past = |from: u64, to: u64| -> Vec<u8> {
        let mut b = vec![0u8; ((to - from) * 8) as usize];
        for &(i, e) in &extra {
            if (from..to).contains(&i) {
                BigEndian::write_u64(&mut b[((i - from) * 8) as usize..][..8], e);
            }
        }
        b
    };
    if need <= l1_size {
        w.write_header(new_size, l1_size, h.l1_table_offset)?;
        return w.sync();
    }
    let room = (l1_size * 8).div_ceil(cs) * cs / 8;
    if l1_size > 0 && need <= room {
        w.write(
            &entries_past(l1_size, need),
            h.l1_table_offset + 8 * l1_size,
            "L1 table",
        )?;
        w.sync()?;
        fail_point("qcow2-grow-l1-zeroed");
        w.write_header(new_size, need, h.l1_table_offset)?;
        return w.sync();
    }
    // A new table at the end of the file.
    let clusters = (need * 8).div_ceil(cs);
    let at = w.end_cluster()?;
    w.next_free.set(at + clusters * cs);
    for c in at / cs..at / cs + clusters {
        if w.refcount(c)? != 0 {
            return Err(w.r.file().corrupt(
                "refcount block",
                w.refcount_at(c)?.0,
                format!("host cluster {c}, past the end of the file, has a refcount"),
            ));
        }
    }
    let mut table = vec![0u8; (clusters * cs) as usize];
    for (i, e) in w.r.l1_raw().iter().enumerate() {
        BigEndian::write_u64(&mut table[8 * i..8 * i + 8], *e);
    }
    for &(i, e) in &extra {
        BigEndian::write_u64(&mut table[(8 * i) as usize..(8 * i + 8) as usize], e);
    }
    w.write(&table, at, "new L1 table")?;
    w.sync()?;
    fail_point("qcow2-grow-l1-written");
    for c in at / cs..at / cs + clusters {
        w.set_refcount(c, 1)?;
    }
    w.sync()?;
    fail_point("qcow2-grow-l1-counted");
    w.write_header(new_size, need, at)?;
    w.sync()?;
    fail_point("qcow2-grow-header");
    if l1_size > 0 {
        let old = h.l1_table_offset / cs;
        let old_clusters: Vec<u64> = (old..old + (l1_size * 8).div_ceil(cs)).collect();
        w.release(&old_clusters)?;
        w.sync()?;
    }
    Ok(())
}

/// Before growing an image whose backing file is longer than it: the new guest range
/// the backing file covers must read as zeros (as qemu-img makes it), so its clusters
/// become zero clusters, in existing L2 tables or in new ones written (and counted)
/// at the end of the file. Returns the L1 entries of the new tables; those inside the
/// current L1 table are also written here, before the header grows (until then the
/// entries lie past the end of the disk, unseen).
fn hide_backing(w: &Writer<'_>, new_size: u64, tail: Option<Tail>) -> Result<Vec<(u64, u64)>> {
    let h = w.r.header();
    let Some(backing) = vconvert_core::ImageReader::backing(w.r) else {
        return with_tail(w, tail, 0, 0, |_| (0, 0));
    };
    let cs = h.cluster_size();
    let old = h.size;
    let end = new_size.min(backing.virtual_size());
    if end <= old {
        return with_tail(w, tail, 0, 0, |_| (0, 0));
    }
    let name = w.name().to_string();
    if h.version < 3 {
        return Err(Error::unsupported(
            name,
            "growing a compat=0.10 overlay over its longer backing file (no zero clusters)",
        ));
    }
    let zero = if h.extended_l2() {
        (0, u64::from(u32::MAX) << 32)
    } else {
        (crate::l2::ZERO, 0)
    };
    let cut = old / cs * cs;
    let mut tail = tail;
    if old % cs != 0 && tail.is_none() {
        let map = w.r.own_map(cut..old)?;
        if map.extents().iter().any(|e| !e.kind.is_data()) {
            // The last cluster reads partly from the backing file: as qemu does, it
            // gets a cluster of its own holding what it reads, zeros past the end.
            tail = Some(copy_last(w)?);
        }
    }
    with_tail(w, tail, old.div_ceil(cs), end.div_ceil(cs), |_| zero)
}

/// Sets the L2 entries of guest clusters `first..last` (all past the current end,
/// unseen until the header grows) to `entry(cluster)` (the entry and, for extended L2
/// entries, its subcluster bitmap), in the existing L2 tables or in new ones written
/// and counted at the end of the file (copies, where a table is shared with a
/// snapshot). Returns the L1 entries of the new tables; those inside the current L1
/// table are also written here.
fn set_entries(
    w: &Writer<'_>,
    first: u64,
    last: u64,
    entry: impl Fn(u64) -> (u64, u64),
) -> Result<Vec<(u64, u64)>> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let words: u64 = if h.extended_l2() { 2 } else { 1 };
    let mut out = Vec::new();
    let mut c = first;
    while c < last {
        let i = c / l2e;
        let upto = last.min((i + 1) * l2e);
        let existing = w.r.l1_entries().get(i as usize).copied().unwrap_or(0);
        let raw = w.r.l1_raw().get(i as usize).copied().unwrap_or(0);
        // A table shared with a snapshot is copied (its entries before the old end
        // unchanged, so switching the L1 entry to the copy changes nothing read).
        let shared =
            existing != 0 && (raw & crate::l2::COPIED == 0 || w.refcount(existing / cs)? > 1);
        let mut table: Vec<u64> = if existing != 0 {
            w.r.l2_table(existing)?.to_vec()
        } else {
            vec![0; (l2e * words) as usize]
        };
        for k in c..upto {
            let j = ((k % l2e) * words) as usize;
            let (e, bitmap) = entry(k);
            table[j] = e;
            if words == 2 {
                table[j + 1] = bitmap;
            }
        }
        let mut bytes = vec![0u8; cs as usize];
        for (n, x) in table.iter().enumerate() {
            BigEndian::write_u64(&mut bytes[8 * n..8 * n + 8], *x);
        }
        if existing != 0 && !shared {
            w.write(&bytes, existing, "L2 table")?;
            w.sync()?;
        } else {
            let at = w.alloc_cluster()?;
            w.write(&bytes, at, "new L2 table")?;
            w.sync()?;
            w.set_refcount(at / cs, 1)?;
            w.sync()?;
            fail_point("qcow2-grow-l2-counted");
            let entry = at | crate::l2::COPIED;
            if i < u64::from(h.l1_size) {
                w.write(&entry.to_be_bytes(), h.l1_table_offset + 8 * i, "L1 table")?;
                w.sync()?;
            }
            // Also for the entries inside the current table: a new L1 table copies
            // the one read at open.
            out.push((i, entry));
            if shared {
                w.release(&[existing / cs])?;
                w.sync()?;
            }
        }
        c = upto;
    }
    Ok(out)
}

/// Before growing with preallocation: host clusters for every new guest cluster, at
/// the end of the file (refcount blocks placed among them where their range has
/// none), reserved (`Falloc`) or written with zeros (`Full`) or left sparse
/// (`Metadata`), synced and counted, then named by L2 entries (see [`set_entries`]).
/// Until the header grows nothing the guest sees refers to them: a crash leaks them.
fn preallocate(
    w: &Writer<'_>,
    new_size: u64,
    prealloc: Preallocation,
    tail: Option<Tail>,
) -> Result<Vec<(u64, u64)>> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let old = h.size;
    let mut tail = tail;
    if old % cs != 0 && tail.is_none() {
        let map = w.r.own_map(old / cs * cs..old)?;
        if map.extents().iter().any(|e| !e.kind.is_data()) {
            // The partial last cluster gets a host cluster too.
            tail = Some(copy_last(w)?);
        }
    }
    let (first, last) = (old.div_ceil(cs), new_size.div_ceil(cs));
    // Runs of host clusters: (first host offset, clusters).
    let runs = w.alloc_runs(last - first)?;
    let io = |what: &str, e: std::io::Error| Error::io(w.name(), what.to_string(), e);
    for &(start, n) in &runs {
        match prealloc {
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc => {
                rustix::fs::fallocate(w.file, rustix::fs::FallocateFlags::empty(), start, n * cs)
                    .map_err(|e| io("cannot preallocate", e.into()))?;
            }
            Preallocation::Full => {
                let chunk = cs.max(1 << 20);
                let zeros = vec![0u8; chunk.min(n * cs) as usize];
                let mut pos = start;
                while pos < start + n * cs {
                    let len = chunk.min(start + n * cs - pos);
                    w.write(&zeros[..len as usize], pos, "preallocated clusters")?;
                    pos += len;
                }
            }
        }
    }
    if let Some(&(start, n)) = runs.last() {
        let end = start + n * cs;
        let len = w
            .file
            .metadata()
            .map_err(|e| io("cannot read the file length", e))?
            .len();
        if len < end {
            w.file
                .set_len(end)
                .map_err(|e| io(&format!("cannot extend the file to {end}"), e))?;
        }
    }
    w.sync()?;
    for &(start, n) in &runs {
        w.set_refcount_run(start / cs, n, 1)?;
    }
    w.sync()?;
    fail_point("qcow2-grow-preallocated");
    // Each run's first guest cluster, to find a guest cluster's host cluster.
    let mut firsts = Vec::with_capacity(runs.len());
    let mut g = first;
    for &(_, n) in &runs {
        firsts.push(g);
        g += n;
    }
    let host = |k: u64| {
        let r = firsts.partition_point(|&f| f <= k) - 1;
        runs[r].0 + (k - firsts[r]) * cs
    };
    // As qemu leaves them: over a backing file, `Metadata` makes zero clusters that
    // keep their host cluster (version 3), `Falloc` and `Full` plain data clusters;
    // without one, extended L2 entries reserve the host cluster and leave its
    // subclusters unallocated.
    let backed = h.backing_file.is_some();
    let (zero, flags) = match (h.extended_l2(), backed, prealloc) {
        (false, true, Preallocation::Metadata) if h.version >= 3 => (crate::l2::ZERO, 0),
        (false, _, _) | (true, false, _) => (0, 0),
        (true, true, Preallocation::Metadata) => (0, u64::from(u32::MAX) << 32),
        (true, true, _) => (0, u64::from(u32::MAX)),
    };
    with_tail(w, tail, first, last, |k| {
        (host(k) | crate::l2::COPIED | zero, flags)
    })
}

/// Before growing: the bytes of the last (partial) data cluster past the old end must
/// read as zeros in the grown image, whatever a former shrink left there.
fn zero_tail(w: &Writer<'_>, new_size: u64) -> Result<Option<Tail>> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let old = h.size;
    if old % cs == 0 || new_size <= old {
        return Ok(None);
    }
    let cluster_start = old / cs * cs;
    let map = w.r.own_map(cluster_start..old)?;
    let Some(vconvert_core::ExtentKind::Data(vconvert_core::Location::File { offset, .. })) =
        map.extents().last().map(|e| e.kind)
    else {
        return Ok(None);
    };
    // `offset` is the host byte of the last extent's first guest byte.
    let last = map.extents().last().map_or(cluster_start, |e| e.start);
    let host = offset + (old - last);
    if w.refcount(host / cs)? > 1 {
        // Shared with a snapshot: a copy (the caller's L2 update names it).
        return copy_last(w).map(Some);
    }
    let len = (cluster_start + cs).min(new_size) - old;
    w.write(&vec![0u8; len as usize], host, "data cluster")?;
    w.sync()?;
    Ok(None)
}

/// A copy of the last, partial cluster: what it reads (through the backing chain),
/// zeros past the old end, in a new host cluster written and counted (named by
/// nothing until the caller's L2 update: a leak at worst).
fn copy_last(w: &Writer<'_>) -> Result<Tail> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let old = h.size;
    let cut = old / cs * cs;
    let mut data = vec![0u8; cs as usize];
    vconvert_core::ImageReader::read_at(w.r, &mut data[..(old - cut) as usize], cut)?;
    let at = w.alloc_cluster()?;
    w.write(&data, at, "data cluster")?;
    w.sync()?;
    w.set_refcount(at / cs, 1)?;
    w.sync()?;
    let l2e = h.l2_entries();
    let words: u64 = if h.extended_l2() { 2 } else { 1 };
    let table = w.r.l1_entries().get((cut / cs / l2e) as usize).copied();
    let old_host = match table.filter(|&t| t != 0) {
        Some(t) => {
            let e = w.r.l2_table(t)?[((cut / cs % l2e) * words) as usize];
            if e & crate::l2::COMPRESSED == 0 {
                e & OFFSET_MASK
            } else {
                // Compressed: its host range is freed with the reference below only
                // for plain clusters; a compressed one stays counted (a leak).
                0
            }
        }
        None => 0,
    };
    let bits = if h.extended_l2() {
        u64::from(u32::MAX)
    } else {
        0
    };
    Ok(Tail {
        cluster: cut / cs,
        entry: (at | crate::l2::COPIED, bits),
        old_host,
    })
}

/// The last, partial cluster's replacement (see [`copy_last`]): its guest cluster,
/// the new L2 entry (and subcluster bitmap), the host cluster it no longer names
/// (0: none).
#[derive(Clone, Copy)]
struct Tail {
    cluster: u64,
    entry: (u64, u64),
    old_host: u64,
}

/// [`set_entries`] for `first..last`, and for the replaced last cluster if any (then
/// the reference to the cluster it replaced is dropped).
fn with_tail(
    w: &Writer<'_>,
    tail: Option<Tail>,
    first: u64,
    last: u64,
    entry: impl Fn(u64) -> (u64, u64),
) -> Result<Vec<(u64, u64)>> {
    match tail {
        Some(t) => {
            let out = set_entries(w, t.cluster, last.max(t.cluster + 1), |k| {
                if k == t.cluster {
                    t.entry
                } else {
                    entry(k)
                }
            })?;
            if t.old_host != 0 {
                // The cluster the last one was copied from: one reference less.
                let cs = w.r.header().cluster_size();
                w.release(&[t.old_host / cs])?;
                w.sync()?;
            }
            Ok(out)
        }
        None if first < last => set_entries(w, first, last, entry),
        None => Ok(Vec::new()),
    }
}

/// Shrinks: internal snapshots keep what they reference. An L2 table wholly past the
/// end loses the active L1's reference to it and to what it names (one reference
/// each, however many snapshots share them); a table the new end cuts, when shared
/// with a snapshot, is copied (copy written and counted, then the L1 entry switched
/// to it, then the references dropped), else edited in place.
fn shrink(w: &Writer<'_>, new_size: u64) -> Result<()> {
    let h = w.r.header();
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let l1_size = u64::from(h.l1_size);
    w.write_header(new_size, l1_size, h.l1_table_offset)?;
    w.sync()?;
    fail_point("qcow2-shrink-header");
    let first = new_size.div_ceil(cs);
    let entry_words: u64 = if h.extended_l2() { 2 } else { 1 };
    for i in first / l2e..l1_size {
        let l2_off = w.r.l1_entries().get(i as usize).copied().unwrap_or(0);
        if l2_off == 0 {
            continue;
        }
        let table = w.r.l2_table(l2_off)?;
        let from = if i == first / l2e { first % l2e } else { 0 };
        let mut words: Vec<u64> = table.to_vec();
        let mut freed = Vec::new();
        for j in from..l2e {
            let k = (j * entry_words) as usize;
            let entry = words.get(k).copied().unwrap_or(0);
            let bitmap = (entry_words == 2).then(|| words.get(k + 1).copied().unwrap_or(0));
            if entry == 0 && bitmap.unwrap_or(0) == 0 {
                continue;
            }
            match decode(entry, bitmap, h.cluster_bits, h.version, false) {
                Ok(ClusterMapping::Compressed { host, len }) => {
                    let start = host & !511;
                    let end = host + len;
                    freed.extend(start / cs..=(end - 1) / cs);
                }
                _ => {
                    let host = entry & OFFSET_MASK;
                    if host != 0 {
                        freed.push(host / cs);
                    }
                }
            }
            for x in words.iter_mut().skip(k).take(entry_words as usize) {
                *x = 0;
            }
        }
        if from == 0 {
            // The whole table lies past the end: unhook it, then free it too.
            w.write(&[0u8; 8], h.l1_table_offset + 8 * i, "L1 table")?;
            freed.push(l2_off / cs);
        } else {
            let mut bytes = vec![0u8; (cs) as usize];
            for (n, x) in words.iter().enumerate() {
                BigEndian::write_u64(&mut bytes[8 * n..8 * n + 8], *x);
            }
            let raw = w.r.l1_raw().get(i as usize).copied().unwrap_or(0);
            if raw & crate::l2::COPIED == 0 || w.refcount(l2_off / cs)? > 1 {
                // Shared with a snapshot: a copy for the active state.
                let at = w.alloc_cluster()?;
                w.write(&bytes, at, "L2 table copy")?;
                w.sync()?;
                w.set_refcount(at / cs, 1)?;
                w.sync()?;
                fail_point("qcow2-shrink-l2-copied");
                let entry = at | crate::l2::COPIED;
                w.write(&entry.to_be_bytes(), h.l1_table_offset + 8 * i, "L1 table")?;
                freed.push(l2_off / cs);
            } else {
                w.write(&bytes, l2_off, "L2 table")?;
            }
        }
        w.sync()?;
        fail_point("qcow2-shrink-unmapped");
        w.release(&freed)?;
        w.sync()?;
        fail_point("qcow2-shrink-released");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{refcount_in, set_refcount_in};

    #[test]
    fn refcount_entries_of_every_width_round_trip() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut block = vec![0u8; 64];
            let entries = 64 * 8 / u64::from(bits);
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for i in 0..entries {
                set_refcount_in(&mut block, i, bits, (i * 7 + 3) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    refcount_in(&block, i, bits),
                    (i * 7 + 3) & max,
                    "{bits} bits, {i}"
                );
            }
            // Entry 0's bits are the lowest of the first byte (narrow) or big-endian.
            let mut one = vec![0u8; 8];
            set_refcount_in(&mut one, 0, bits, 1);
            let want = if bits < 8 { 0 } else { bits as usize / 8 - 1 };
            assert_eq!(one.iter().position(|&b| b != 0), Some(want), "{bits} bits");
        }
    }
}
