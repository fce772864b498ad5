//! Reading qcow2 images.

use byteorder::{BigEndian, ByteOrder};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use vconvert_core::{
    overlay_block_map, read_backing, relative_to, BlockMap, CheckReport, Error, ExtentKind, Format,
    ImageFile, ImageInfo, ImageReader, Location, Resolver, Result,
};

use crate::bitmap::Bitmap;
use crate::compressed::decompress;
use crate::header::{autoclear, compatible, incompatible, Qcow2Header};
use crate::l2::{decode, ClusterMapping, OFFSET_MASK, SUBCLUSTERS};
use crate::snapshot::Snapshot;

/// How many bytes of L2 tables a reader keeps in memory.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// How a qcow2 image is opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Qcow2OpenOptions {
    /// Read an image whose corrupt bit is set (qemu-img's `-U`-style override).
    pub allow_corrupt: bool,
    /// Read this internal snapshot (by id or name) instead of the current state.
    pub snapshot: Option<String>,
}

/// L2 tables recently read, keyed by host offset (oldest evicted first).
#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, Arc<Vec<u64>>>,
    order: VecDeque<u64>,
    bytes: u64,
}

/// The L1 table: host offsets of L2 tables (0: none), and the raw entries.
#[derive(Debug)]
pub struct L1Table {
    entries: Vec<u64>,
    raw: Vec<u64>,
}

/// A qcow2 image opened for reading.
pub struct Qcow2Reader {
    file: ImageFile,
    data_file: Option<ImageFile>,
    header: Qcow2Header,
    l1: L1Table,
    backing: Option<Box<dyn ImageReader>>,
    backing_full: Option<String>,
    snapshots: Vec<Snapshot>,
    bitmaps: Vec<Bitmap>,
    cache: Mutex<L2Cache>,
    /// QEMU's metadata-preallocation guess, made on first use (see `status`).
    preallocated: std::sync::OnceLock<bool>,
}

impl std::fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field("file", &self.file.name())
            .field("header", &self.header)
            .finish()
    }
}

impl Qcow2Reader {
    /// Opens `file`; backing images and the external data file go through `resolver`.
    pub fn open(file: ImageFile, resolver: &dyn Resolver, opts: Qcow2OpenOptions) -> Result<Self> {
        let mut header = Qcow2Header::read(&file)?;
        let snapshots = Snapshot::read_table(&file, &header)?;
        if let Some(want) = &opts.snapshot {
            let s = snapshots
                .iter()
                .find(|s| s.info.id == *want)
                .or_else(|| snapshots.iter().find(|s| s.info.name == *want))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "{}: no snapshot '{want}' (snapshots: {})",
                        file.name(),
                        snapshots
                            .iter()
                            .map(|s| format!("{} '{}'", s.info.id, s.info.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            let cs = header.cluster_size();
            let size = s.disk_size.unwrap_or(header.size);
            let needed = size.div_ceil(cs * header.l2_entries());
            if s.l1_table_offset % cs != 0
                || u64::from(s.l1_size) < needed
                || 8 * u64::from(s.l1_size) > crate::header::MAX_L1_BYTES
                || size > crate::header::MAX_VIRTUAL_SIZE
            {
                return Err(file.corrupt(
                    "qcow2 snapshot table",
                    s.l1_table_offset,
                    format!("snapshot '{want}' has an invalid L1 table or size"),
                ));
            }
            header.l1_table_offset = s.l1_table_offset;
            header.l1_size = s.l1_size;
            header.size = size;
        }
        if header.incompatible_features & incompatible::CORRUPT != 0 && !opts.allow_corrupt {
            return Err(Error::Refused {
                file: file.name().to_string(),
                reason: "the image's corrupt bit is set (qemu-img check -r all can repair it; \
                         pass -U to read it anyway)"
                    .into(),
            });
        }
        let cs = header.cluster_size();
        let raw = file.read_vec(
            header.l1_table_offset,
            8 * u64::from(header.l1_size),
            crate::header::MAX_L1_BYTES,
            "L1 table",
        )?;
        let mut entries = Vec::with_capacity(header.l1_size as usize);
        let mut raw_entries = Vec::with_capacity(header.l1_size as usize);
        for (i, w) in raw.chunks_exact(8).enumerate() {
            let e = BigEndian::read_u64(w);
            let off = e & OFFSET_MASK;
            let at = header.l1_table_offset + 8 * i as u64;
            if off != 0 {
                if off % cs != 0 || off < cs {
                    return Err(file.corrupt(
                        "L1 table",
                        at,
                        format!(
                            "entry {i}: L2 table offset {off:#x} is not a cluster after the header"
                        ),
                    ));
                }
                if off >= file.len() {
                    return Err(file.corrupt(
                        "L1 table",
                        at,
                        format!("entry {i}: L2 table at {off:#x} lies past the end of the file"),
                    ));
                }
            }
            entries.push(off);
            raw_entries.push(e);
        }
        // Two L1 entries sharing an L2 table is corruption (qemu's check reports the
        // refcount), and would let a tiny file map the same clusters without bound.
        let mut sorted: Vec<(u64, usize)> = entries
            .iter()
            .enumerate()
            .filter(|(_, &o)| o != 0)
            .map(|(i, &o)| (o, i))
            .collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(file.corrupt(
                "L1 table",
                header.l1_table_offset + 8 * w[1].1 as u64,
                format!(
                    "entries {} and {} both use the L2 table at {:#x}",
                    w[0].1, w[1].1, w[0].0
                ),
            ));
        }
        let data_file = if header.incompatible_features & incompatible::DATA_FILE != 0 {
            let name = header.data_file.clone().unwrap_or_default();
            Some(resolver.open_file(&file, &relative_to(file.path(), &name))?)
        } else {
            None
        };
        let bitmaps = Bitmap::read_directory(&file, &header)?;
        let mut reader = Qcow2Reader {
            file,
            data_file,
            header,
            l1: L1Table {
                entries,
                raw: raw_entries,
            },
            backing: None,
            backing_full: None,
            snapshots,
            bitmaps,
            cache: Mutex::new(L2Cache::default()),
            preallocated: std::sync::OnceLock::new(),
        };
        if let Some(name) = reader.header.backing_file.clone() {
            reader.open_backing(&name, resolver)?;
        }
        Ok(reader)
    }

    fn open_backing(&mut self, name: &str, resolver: &dyn Resolver) -> Result<()> {
        if name.starts_with("json:") {
            return Err(Error::unsupported(
                self.file.name(),
                format!("backing file names in json: syntax ('{name}')"),
            ));
        }
        let format = match self.header.backing_format.as_deref() {
            None => None,
            Some(f) => Some(f.parse::<Format>().map_err(|_| {
                Error::unsupported(self.file.name(), format!("backing format '{f}'"))
            })?),
        };
        let path = relative_to(self.file.path(), name);
        let backing = resolver.open_image(&self.file, &path, format)?;
        self.backing_full = Some(path.display().to_string());
        self.backing = Some(backing);
        Ok(())
    }

    /// Whether QEMU would take the image for metadata-preallocated (and so look for
    /// holes of the host file under data clusters); decided once.
    pub fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.preallocated.get() {
            return Ok(v);
        }
        let v = crate::status::detect_metadata_preallocation(self)?;
        Ok(*self.preallocated.get_or_init(|| v))
    }

    /// The parsed header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// The image file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    /// Internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Persistent bitmaps.
    pub fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }

    /// The L1 entries (host offsets of L2 tables).
    pub fn l1_entries(&self) -> &[u64] {
        &self.l1.entries
    }

    /// The L1 entries as stored (with flags).
    pub fn l1_raw(&self) -> &[u64] {
        &self.l1.raw
    }

    /// The external data file, if any.
    pub fn data_file(&self) -> Option<&ImageFile> {
        self.data_file.as_ref()
    }

    /// Reads the L2 table at `offset` (words: one per standard entry, two per extended).
    pub fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u64>>> {
        if let Ok(c) = self.cache.lock() {
            if let Some(t) = c.tables.get(&offset) {
                return Ok(t.clone());
            }
        }
        let cs = self.header.cluster_size();
        let n = cs.min(self.file.len().saturating_sub(offset));
        let mut raw = vec![0u8; cs as usize];
        self.file
            .read_exact_at(&mut raw[..n as usize], offset, "L2 table")?;
        let words: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        let table = Arc::new(words);
        if let Ok(mut c) = self.cache.lock() {
            while c.bytes + cs > L2_CACHE_BYTES {
                match c.order.pop_front() {
                    Some(old) => {
                        c.tables.remove(&old);
                        c.bytes -= cs;
                    }
                    None => break,
                }
            }
            if c.tables.insert(offset, table.clone()).is_none() {
                c.order.push_back(offset);
                c.bytes += cs;
            }
        }
        Ok(table)
    }

    /// The mapping of guest cluster `cluster` (with the L2 table already in hand).
    fn mapping(&self, table: &[u64], l1_index: u64, index: u64) -> Result<ClusterMapping> {
        let (entry, bitmap) = if self.header.extended_l2() {
            let i = 2 * index as usize;
            (
                table.get(i).copied().unwrap_or(0),
                Some(table.get(i + 1).copied().unwrap_or(0)),
            )
        } else {
            (table.get(index as usize).copied().unwrap_or(0), None)
        };
        let l2_off = self.l1.entries.get(l1_index as usize).copied().unwrap_or(0);
        let external = self.data_file.is_some();
        decode(
            entry,
            bitmap,
            self.header.cluster_bits,
            self.header.version,
            external,
        )
        .map_err(|e| {
            self.file.corrupt(
                "L2 table",
                l2_off + index * self.header.l2_entry_size(),
                format!("entry {index}: {}", e.0),
            )
        })
    }

    fn data_location(&self, host: u64) -> Location {
        Location::File {
            file: u32::from(self.data_file.is_some()),
            offset: host,
        }
    }

    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        vconvert_core::check_guest_range(self.file.name(), range, self.header.size)
    }

    /// The map of `range` in this image alone (unallocated where a backing image shows).
    pub(crate) fn own_map(&self, range: Range<u64>) -> Result<BlockMap> {
        let cs = self.header.cluster_size();
        let per_l2 = cs * self.header.l2_entries();
        let sc = cs / SUBCLUSTERS;
        let mut map = BlockMap::new(range.start);
        let mut pos = range.start;
        while pos < range.end {
            let l1_index = pos / per_l2;
            let l2_end = ((l1_index + 1) * per_l2).min(range.end);
            let l2_off = self.l1.entries.get(l1_index as usize).copied().unwrap_or(0);
            if l2_off == 0 {
                map.push(l2_end - pos, ExtentKind::Unallocated);
                pos = l2_end;
                continue;
            }
            let table = self.l2_table(l2_off)?;
            while pos < l2_end {
                let cluster_start = pos / cs * cs;
                let cluster_end = (cluster_start + cs).min(l2_end);
                let index = (pos % per_l2) / cs;
                match self.mapping(&table, l1_index, index)? {
                    ClusterMapping::Unallocated => {
                        map.push(cluster_end - pos, ExtentKind::Unallocated)
                    }
                    ClusterMapping::Zero => map.push(cluster_end - pos, ExtentKind::Zero),
                    ClusterMapping::Data { host } => {
                        self.check_host(host, l2_off, index)?;
                        map.push(
                            cluster_end - pos,
                            ExtentKind::Data(self.data_location(host + (pos - cluster_start))),
                        )
                    }
                    ClusterMapping::Compressed { host, .. } => {
                        if self.data_file.is_some() || host >= self.file.len() {
                            return Err(self.file.corrupt(
                                "L2 table",
                                l2_off + index * self.header.l2_entry_size(),
                                format!("compressed cluster at {host:#x} is invalid here"),
                            ));
                        }
                        map.push(
                            cluster_end - pos,
                            ExtentKind::Data(Location::Compressed {
                                file: 0,
                                offset: host,
                            }),
                        )
                    }
                    ClusterMapping::Subclusters { host, alloc, zero } => {
                        if host != 0 {
                            self.check_host(host, l2_off, index)?;
                        }
                        while pos < cluster_end {
                            let i = (pos - cluster_start) / sc;
                            let end = (cluster_start + (i + 1) * sc).min(cluster_end);
                            let kind = if alloc & (1 << i) != 0 {
                                ExtentKind::Data(self.data_location(host + (pos - cluster_start)))
                            } else if zero & (1 << i) != 0 {
                                ExtentKind::Zero
                            } else {
                                ExtentKind::Unallocated
                            };
                            map.push(end - pos, kind);
                            pos = end;
                        }
                    }
                }
                pos = cluster_end;
            }
        }
        Ok(map)
    }

    fn check_host(&self, host: u64, l2_off: u64, index: u64) -> Result<()> {
        let len = self.data_file.as_ref().unwrap_or(&self.file).len();
        if host >= len && self.data_file.is_none() {
            return Err(self.file.corrupt(
                "L2 table",
                l2_off + index * self.header.l2_entry_size(),
                format!("entry {index}: data cluster at {host:#x} lies past the end of the file"),
            ));
        }
        if self.data_file.is_none() && host < self.header.cluster_size() {
            return Err(self.file.corrupt(
                "L2 table",
                l2_off + index * self.header.l2_entry_size(),
                format!("entry {index}: data cluster at {host:#x} overlaps the header"),
            ));
        }
        Ok(())
    }

    /// Decompresses the cluster whose compressed stream starts at `host`.
    fn read_compressed(&self, guest_cluster: u64, host: u64, out: &mut [u8]) -> Result<()> {
        let cs = self.header.cluster_size();
        let per_l2 = cs * self.header.l2_entries();
        let l1_index = guest_cluster / per_l2;
        let l2_off = self.l1.entries.get(l1_index as usize).copied().unwrap_or(0);
        let table = self.l2_table(l2_off)?;
        let index = (guest_cluster % per_l2) / cs;
        let ClusterMapping::Compressed { len, .. } = self.mapping(&table, l1_index, index)? else {
            return Err(Error::invalid(
                "compressed cluster changed under the reader",
            ));
        };
        let avail = len.min(self.file.len().saturating_sub(host));
        let src = self
            .file
            .read_vec(host, avail, 2 * cs + 512, "compressed cluster")?;
        decompress(self.header.compression_type, &src, out)
            .map_err(|reason| self.file.corrupt("compressed cluster", host, reason))
    }

    /// Reads plain data at `host` of the image (or its data file), zero-filling what
    /// lies past the end of the file (qemu's files need not end on a cluster boundary).
    fn read_host(&self, file_index: u32, out: &mut [u8], host: u64) -> Result<()> {
        let f = match (file_index, &self.data_file) {
            (1, Some(d)) => d,
            _ => &self.file,
        };
        let n = f.len().saturating_sub(host).min(out.len() as u64) as usize;
        let (head, tail) = out.split_at_mut(n);
        f.read_exact_at(head, host, "data cluster")?;
        tail.fill(0);
        Ok(())
    }
}

impl ImageReader for Qcow2Reader {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.check_range(&range)?;
        let own = self.own_map(range)?;
        match &self.backing {
            Some(b) => overlay_block_map(&own, b.as_ref()),
            None => Ok(own),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("read range overflows"))?;
        self.check_range(&(offset..end))?;
        let cs = self.header.cluster_size();
        let map = self.own_map(offset..end)?;
        let mut cluster_buf: Vec<u8> = Vec::new();
        for e in map.extents() {
            let s = (e.start - offset) as usize;
            let out = &mut buf[s..s + e.len as usize];
            match e.kind {
                ExtentKind::Data(Location::File { file, offset: host }) => {
                    self.read_host(file, out, host)?
                }
                // A whole cluster inflates straight into the caller's buffer.
                ExtentKind::Data(Location::Compressed { offset: host, .. })
                    if e.start % cs == 0 && e.len == cs =>
                {
                    self.read_compressed(e.start, host, out)?
                }
                ExtentKind::Data(Location::Compressed { offset: host, .. }) => {
                    let cluster = e.start / cs * cs;
                    cluster_buf.resize(cs as usize, 0);
                    self.read_compressed(cluster, host, &mut cluster_buf)?;
                    let from = (e.start - cluster) as usize;
                    out.copy_from_slice(&cluster_buf[from..from + out.len()]);
                }
                ExtentKind::Unallocated => match &self.backing {
                    Some(b) => read_backing(b.as_ref(), out, e.start)?,
                    None => out.fill(0),
                },
                _ => out.fill(0),
            }
        }
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        let h = &self.header;
        let mut info = ImageInfo::new(Format::Qcow2, h.size);
        info.actual_size = self.file.allocated_bytes();
        info.cluster_size = Some(h.cluster_size());
        info.dirty = h.incompatible_features & incompatible::DIRTY != 0;
        info.backing_file = h.backing_file.clone();
        info.backing_format = h.backing_format.clone();
        info.full_backing_file = self.backing_full.clone().or_else(|| {
            h.backing_file
                .as_ref()
                .map(|b| relative_to(self.file.path(), b).display().to_string())
        });
        info.snapshots = self.snapshots.iter().map(|s| s.info.clone()).collect();
        let mut data = Map::new();
        if h.version == 2 {
            data.insert("compat".into(), json!("0.10"));
            data.insert("compression-type".into(), json!(h.compression_type.name()));
            data.insert("refcount-bits".into(), json!(h.refcount_bits()));
        } else {
            data.insert("compat".into(), json!("1.1"));
            data.insert("compression-type".into(), json!(h.compression_type.name()));
            data.insert(
                "lazy-refcounts".into(),
                json!(h.compatible_features & compatible::LAZY_REFCOUNTS != 0),
            );
            if !self.bitmaps.is_empty() {
                let list: Vec<Value> = self
                    .bitmaps
                    .iter()
                    .map(
                        |b| json!({"flags": b.flags, "name": b.name, "granularity": b.granularity}),
                    )
                    .collect();
                data.insert("bitmaps".into(), Value::Array(list));
            }
            data.insert("refcount-bits".into(), json!(h.refcount_bits()));
            if let Some(df) = &h.data_file {
                data.insert("data-file".into(), json!(df));
                data.insert(
                    "data-file-raw".into(),
                    json!(h.autoclear_features & autoclear::DATA_FILE_RAW != 0),
                );
            }
            data.insert(
                "corrupt".into(),
                json!(h.incompatible_features & incompatible::CORRUPT != 0),
            );
            data.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        info.format_specific = Some(json!({"type": "qcow2", "data": Value::Object(data)}));
        Ok(info)
    }

    fn safety_findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.header.incompatible_features & incompatible::CORRUPT != 0 {
            out.push("the qcow2 corrupt bit is set".to_string());
        }
        out
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        match (index, &self.data_file) {
            (0, _) => Some(&self.file),
            (1, Some(d)) => Some(d),
            _ => None,
        }
    }

    fn check(&self) -> Option<Result<CheckReport>> {
        Some(crate::check::check(self))
    }

    fn layer_status(&self, range: Range<u64>) -> Result<Vec<vconvert_core::LayerStatus>> {
        self.check_range(&range)?;
        crate::status::layer_status(self, range)
    }

    fn backing(&self) -> Option<&dyn ImageReader> {
        self.backing.as_deref()
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn check_metadata(&self) -> Option<Result<CheckReport>> {
        Some(crate::check::check_metadata(self))
    }
}
