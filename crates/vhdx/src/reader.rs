//! Reading VHDX images: fixed, dynamic and differencing, with a dirty log replayed in
//! memory first (MS-VHDX §2.3.3) so the image reads as Hyper-V would see it.

use std::ops::Range;
use std::path::PathBuf;

use vconvert_core::{
    read_backing, relative_to, BlockMap, CheckReport, Error, ExtentKind, Format, ImageFile,
    ImageInfo, ImageReader, Location, Resolver, Result,
};

use crate::bat::{
    BatEntry, Geometry, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_UNMAPPED_V095, PAYLOAD_BLOCK_ZERO, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT,
    SECTOR_BITMAP_BLOCK,
};
use crate::header::{read_headers, Headers, HEADER_SECTION_SIZE};
use crate::log::{replay, LogArea, Replay};
use crate::metadata::{read_metadata, Metadata};
use crate::region::{read_regions, Regions, BAT_REGION, METADATA_REGION};

/// Findings and check messages listed one by one, at most (then one summary line).
const MAX_MESSAGES: usize = 1000;

/// Largest BAT we load (64 Mi entries, 512 MiB: a 64 TiB disk of 1 MiB blocks).
pub const MAX_BAT_ENTRIES: u64 = 64 << 20;

/// What a guest range is in this file alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    /// Bytes at this offset of the file (with the replayed log laid over them).
    Host(u64),
    /// Zeros.
    Zero,
    /// Not in this file: the parent's, or zeros without one.
    Absent,
}

/// A VHDX image opened for reading.
pub struct VhdxReader {
    file: ImageFile,
    headers: Headers,
    regions: Regions,
    meta: Metadata,
    geometry: Geometry,
    /// Raw BAT entries (after the log's updates).
    bat: Vec<u64>,
    /// The replayed log, when there was one to replay.
    replay: Option<Replay>,
    /// The file's length as the log leaves it (at least the real length).
    view_len: u64,
    /// Payload blocks whose entry points past the end of the file, ascending. Reading
    /// them fails; `check` reports them as qemu does.
    truncated: Vec<u64>,
    parent: Option<Box<dyn ImageReader>>,
    parent_name: Option<String>,
    parent_full: Option<String>,
}

impl std::fmt::Debug for VhdxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxReader")
            .field("file", &self.file.name())
            .field("meta", &self.meta)
            .field("log_replayed", &self.log_replayed())
            .finish()
    }
}

impl VhdxReader {
    /// Opens `file` as a VHDX; a differencing disk's parent is opened through
    /// `resolver` (refused where references are not allowed).
    pub fn open(file: ImageFile, resolver: &dyn Resolver) -> Result<Self> {
        let headers = read_headers(&file)?;
        let h = &headers.current;
        let log_area = LogArea {
            offset: h.log_offset,
            length: u64::from(h.log_length),
            guid: h.log_guid,
        };
        if log_area.length > 0 && log_area.offset.saturating_add(log_area.length) > file.len() {
            return Err(file.corrupt(
                "VHDX header",
                headers.current_offset + 68,
                format!(
                    "log of {} bytes at {:#x} lies past the end of the file ({} bytes)",
                    log_area.length,
                    log_area.offset,
                    file.len()
                ),
            ));
        }
        let regions = read_regions(&file)?;
        let replay = if h.log_guid.is_nil() {
            None
        } else {
            Some(replay(&file, &log_area)?).filter(|r| r.entries > 0)
        };
        let view_len = replay
            .as_ref()
            .map_or(0, |r| r.last_file_offset.max(r.overlay.end()))
            .max(file.len());
        let mut reader = VhdxReader {
            file,
            headers,
            regions,
            meta: Metadata {
                block_size: 1 << 20,
                leave_blocks_allocated: false,
                has_parent: false,
                virtual_disk_size: 0,
                logical_sector_size: 512,
                physical_sector_size: 512,
                page83: None,
                parent_locator: None,
            },
            geometry: Geometry::new(0, 1 << 20, 512, false),
            bat: Vec::new(),
            replay,
            view_len,
            truncated: Vec::new(),
            parent: None,
            parent_name: None,
            parent_full: None,
        };
        reader.check_regions(&log_area)?;
        let md = *reader.region(METADATA_REGION, "metadata")?;
        reader.meta = read_metadata(
            &reader.file,
            md.file_offset,
            u64::from(md.length),
            &|buf, off, what| reader.read_view(buf, off, what),
        )?;
        reader.geometry = Geometry::new(
            reader.meta.virtual_disk_size,
            u64::from(reader.meta.block_size),
            u64::from(reader.meta.logical_sector_size),
            reader.meta.has_parent,
        );
        reader.read_bat(&log_area)?;
        if reader.meta.has_parent {
            reader.open_parent(resolver)?;
        }
        Ok(reader)
    }

    fn region(&self, guid: crate::Guid, name: &str) -> Result<&crate::region::Region> {
        self.regions.table.find(guid).ok_or_else(|| {
            self.file.corrupt(
                "VHDX region table",
                crate::region::REGION_TABLE_OFFSETS[0],
                format!("there is no {name} region"),
            )
        })
    }

    /// Regions inside the file, clear of the log; unknown required regions refused.
    fn check_regions(&self, log: &LogArea) -> Result<()> {
        for r in &self.regions.table.entries {
            let known = r.guid == BAT_REGION || r.guid == METADATA_REGION;
            if !known && r.required {
                return Err(Error::unsupported(
                    self.file.name(),
                    format!("required VHDX region {}", r.guid),
                ));
            }
            if !known {
                continue;
            }
            if r.end() > self.view_len {
                return Err(self.file.corrupt(
                    "VHDX region table",
                    crate::region::REGION_TABLE_OFFSETS[0],
                    format!(
                        "region {} ({:#x}..{:#x}) lies past the end of the file ({} bytes)",
                        r.guid,
                        r.file_offset,
                        r.end(),
                        self.view_len
                    ),
                ));
            }
            if log.length > 0 && r.file_offset < log.offset + log.length && log.offset < r.end() {
                return Err(self.file.corrupt(
                    "VHDX region table",
                    crate::region::REGION_TABLE_OFFSETS[0],
                    format!(
                        "region {} ({:#x}..{:#x}) overlaps the log ({:#x}..{:#x})",
                        r.guid,
                        r.file_offset,
                        r.end(),
                        log.offset,
                        log.offset + log.length
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads the file's bytes as the replayed log leaves them.
    fn read_view(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.view_len) {
            return Err(self.file.corrupt(
                what,
                offset,
                format!(
                    "{} bytes lie past the end of the file ({} bytes)",
                    buf.len(),
                    self.view_len
                ),
            ));
        }
        let in_file = self.file.len().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(in_file);
        if !head.is_empty() {
            self.file.read_exact_at(head, offset, what)?;
        }
        tail.fill(0);
        if let Some(r) = &self.replay {
            r.overlay.apply(buf, offset);
        }
        Ok(())
    }

    fn read_bat(&mut self, log: &LogArea) -> Result<()> {
        const S: &str = "VHDX BAT";
        let region = *self.region(BAT_REGION, "BAT")?;
        let g = self.geometry;
        if g.total_entries > MAX_BAT_ENTRIES || g.total_entries * 8 > u64::from(region.length) {
            return Err(self.file.corrupt(
                S,
                region.file_offset,
                format!(
                    "{} entries needed for {} bytes in {}-byte blocks, but the BAT region holds {} (and at most {MAX_BAT_ENTRIES} are read)",
                    g.total_entries,
                    self.meta.virtual_disk_size,
                    g.block_size,
                    region.length / 8
                ),
            ));
        }
        let mut raw = vec![0u8; (g.total_entries * 8) as usize];
        self.read_view(&mut raw, region.file_offset, S)?;
        let bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        // Everything a block must not overlap.
        let mut fixed: Vec<(u64, u64, String)> =
            vec![(0, HEADER_SECTION_SIZE, "the header section".into())];
        if log.length > 0 {
            fixed.push((log.offset, log.offset + log.length, "the log".into()));
        }
        for r in &self.regions.table.entries {
            fixed.push((r.file_offset, r.end(), format!("region {}", r.guid)));
        }
        let mut used: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            let i = i as u64;
            let at = region.file_offset + 8 * i;
            let entry = BatEntry::decode(e);
            let (len, what) = if g.is_bitmap_index(i) {
                if !self.meta.has_parent {
                    continue;
                }
                match entry.state {
                    SB_BLOCK_NOT_PRESENT => continue,
                    SB_BLOCK_PRESENT => (SECTOR_BITMAP_BLOCK, format!("sector bitmap entry {i}")),
                    s => {
                        return Err(self.file.corrupt(
                            S,
                            at,
                            format!(
                                "sector bitmap entry {i} has state {s}, which is not valid here"
                            ),
                        ))
                    }
                }
            } else {
                let block = g.block_of_index(i);
                match entry.state {
                    PAYLOAD_BLOCK_NOT_PRESENT
                    | PAYLOAD_BLOCK_UNDEFINED
                    | PAYLOAD_BLOCK_ZERO
                    | PAYLOAD_BLOCK_UNMAPPED
                    | PAYLOAD_BLOCK_UNMAPPED_V095 => continue,
                    PAYLOAD_BLOCK_FULLY_PRESENT => {}
                    PAYLOAD_BLOCK_PARTIALLY_PRESENT if self.meta.has_parent => {}
                    s => {
                        return Err(self.file.corrupt(
                            S,
                            at,
                            format!("payload block {block} has state {s}, which is not valid here"),
                        ))
                    }
                }
                let start = block * g.block_size;
                let need = g.block_size.min(self.meta.virtual_disk_size - start);
                (need, format!("payload block {block}"))
            };
            if entry.offset < HEADER_SECTION_SIZE {
                return Err(self.file.corrupt(
                    S,
                    at,
                    format!("{what} at {:#x} lies in the header section", entry.offset),
                ));
            }
            let end = entry.offset.saturating_add(len);
            if end > self.view_len {
                if g.is_bitmap_index(i) {
                    return Err(self.file.corrupt(
                        S,
                        at,
                        format!(
                            "{what} at {:#x} lies past the end of the file",
                            entry.offset
                        ),
                    ));
                }
                self.truncated.push(g.block_of_index(i));
                continue;
            }
            if let Some((_, _, name)) = fixed.iter().find(|(s, e, _)| entry.offset < *e && *s < end)
            {
                return Err(self.file.corrupt(
                    S,
                    at,
                    format!("{what} at {:#x}..{end:#x} overlaps {name}", entry.offset),
                ));
            }
            used.push((entry.offset, end, i));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(self.file.corrupt(
                    S,
                    region.file_offset + 8 * w[1].2,
                    format!(
                        "entry {} at {:#x} overlaps entry {} at {:#x}..{:#x}",
                        w[1].2, w[1].0, w[0].2, w[0].0, w[0].1
                    ),
                ));
            }
        }
        self.bat = bat;
        Ok(())
    }

    /// MS-VHDX 2.6.2.6.3: the parent's `DataWriteGuid` must equal the locator's
    /// `parent_linkage` (or `parent_linkage2`, the GUID a parent written once more after
    /// the child was made may carry); a parent that differs was changed since the child
    /// was made, and reading through it would give a disk that never existed.
    fn check_linkage(&self, parent: &dyn ImageReader, name: &str) -> Result<()> {
        let Some(loc) = &self.meta.parent_locator else {
            return Ok(());
        };
        let (Some(linkage), Some(identity)) = (loc.get("parent_linkage"), parent.parent_identity())
        else {
            return Ok(());
        };
        let same = |l: &str| l.trim_matches(['{', '}']).eq_ignore_ascii_case(&identity);
        if same(linkage) || loc.get("parent_linkage2").is_some_and(same) {
            return Ok(());
        }
        Err(self.file.corrupt(
            "VHDX parent locator",
            self.region(METADATA_REGION, "metadata")?.file_offset,
            format!(
                "parent_linkage {linkage} does not match the DataWriteGuid {{{identity}}} of the parent {name}: the parent changed after this differencing disk was made"
            ),
        ))
    }

    /// Candidate parent paths from the locator, best first: `relative_path`, then
    /// `absolute_win32_path` (as it is, then its file name beside this file), then
    /// `volume_path`'s file name.
    fn parent_candidates(&self) -> Vec<String> {
        let Some(loc) = &self.meta.parent_locator else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(r) = loc.get("relative_path") {
            out.push(windows_path(r));
        }
        for key in ["absolute_win32_path", "volume_path"] {
            if let Some(a) = loc.get(key) {
                let p = windows_path(a);
                if key == "absolute_win32_path" && !p.contains(':') {
                    out.push(p.clone());
                }
                if let Some(name) = p.rsplit('/').next().filter(|n| !n.is_empty()) {
                    out.push(name.to_string());
                }
            }
        }
        out.dedup();
        out
    }

    fn open_parent(&mut self, resolver: &dyn Resolver) -> Result<()> {
        let candidates = self.parent_candidates();
        let Some(first) = candidates.first().cloned() else {
            return Err(self.file.corrupt(
                "VHDX parent locator",
                self.region(METADATA_REGION, "metadata")?.file_offset,
                "differencing disk whose locator has no relative_path, absolute_win32_path or volume_path",
            ));
        };
        let (name, path) = candidates
            .iter()
            .map(|c| (c.clone(), relative_to(self.file.path(), c)))
            .find(|(_, p)| p.exists())
            .unwrap_or_else(|| (first.clone(), relative_to(self.file.path(), &first)));
        let parent = resolver.open_image(&self.file, &path, Some(Format::Vhdx))?;
        self.check_linkage(parent.as_ref(), &name)?;
        self.parent_name = Some(name);
        self.parent_full = Some(path_string(path));
        self.parent = Some(parent);
        Ok(())
    }

    /// The segments of `range` in this file alone.
    fn segments(&self, range: Range<u64>) -> Result<Vec<(u64, u64, Seg)>> {
        let mut out: Vec<(u64, u64, Seg)> = Vec::new();
        let mut push = |start: u64, len: u64, seg: Seg| {
            if len == 0 {
                return;
            }
            if let Some(last) = out.last_mut() {
                let joins = match (last.2, seg) {
                    (Seg::Host(a), Seg::Host(b)) => a + last.1 == b,
                    (x, y) => x == y,
                };
                if joins && last.0 + last.1 == start {
                    last.1 += len;
                    return;
                }
            }
            out.push((start, len, seg));
        };
        let g = self.geometry;
        let bs = g.block_size;
        let lss = u64::from(self.meta.logical_sector_size);
        let bat_at = self.region(BAT_REGION, "BAT")?.file_offset;
        let mut pos = range.start;
        while pos < range.end {
            let block = pos / bs;
            let block_start = block * bs;
            let block_end = (block_start + bs).min(range.end);
            let index = g.payload_index(block);
            let entry = BatEntry::decode(self.bat[index as usize]);
            let absent_means_zero = !self.meta.has_parent;
            match entry.state {
                PAYLOAD_BLOCK_NOT_PRESENT => push(pos, block_end - pos, Seg::Absent),
                PAYLOAD_BLOCK_UNDEFINED | PAYLOAD_BLOCK_UNMAPPED | PAYLOAD_BLOCK_UNMAPPED_V095
                    if absent_means_zero =>
                {
                    push(pos, block_end - pos, Seg::Absent)
                }
                PAYLOAD_BLOCK_UNDEFINED
                | PAYLOAD_BLOCK_UNMAPPED
                | PAYLOAD_BLOCK_UNMAPPED_V095
                | PAYLOAD_BLOCK_ZERO => push(pos, block_end - pos, Seg::Zero),
                PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    if self.truncated.binary_search(&block).is_ok() {
                        return Err(self.file.corrupt(
                            "VHDX BAT",
                            bat_at + 8 * index,
                            format!(
                                "payload block {block} at {:#x} lies past the end of the file ({} bytes): the image has probably been truncated",
                                entry.offset,
                                self.file.len()
                            ),
                        ));
                    }
                    if entry.state == PAYLOAD_BLOCK_FULLY_PRESENT {
                        push(
                            pos,
                            block_end - pos,
                            Seg::Host(entry.offset + pos - block_start),
                        );
                    } else {
                        let sb = BatEntry::decode(self.bat[g.bitmap_index(block) as usize]);
                        if sb.state != SB_BLOCK_PRESENT {
                            return Err(self.file.corrupt(
                                "VHDX BAT",
                                bat_at + 8 * index,
                                format!(
                                    "payload block {block} is partially present but its chunk has no sector bitmap"
                                ),
                            ));
                        }
                        // Bits of this block's sectors in the chunk's bitmap.
                        let first_sector = (block % g.chunk_ratio) * (bs / lss);
                        let s0 = first_sector + (pos - block_start) / lss;
                        let s1 = first_sector + (block_end - block_start).div_ceil(lss);
                        let byte0 = s0 / 8;
                        let mut bits = vec![0u8; (s1.div_ceil(8) - byte0) as usize];
                        self.read_view(&mut bits, sb.offset + byte0, "VHDX sector bitmap")?;
                        let mut p = pos;
                        while p < block_end {
                            let s = first_sector + (p - block_start) / lss;
                            let bit = bits[(s / 8 - byte0) as usize] >> (s % 8) & 1;
                            let next = ((p / lss + 1) * lss).min(block_end);
                            let seg = if bit == 1 {
                                Seg::Host(entry.offset + p - block_start)
                            } else {
                                Seg::Absent
                            };
                            push(p, next - p, seg);
                            p = next;
                        }
                    }
                }
                s => {
                    return Err(self.file.corrupt(
                        "VHDX BAT",
                        bat_at + 8 * index,
                        format!("payload block {block} has state {s}"),
                    ))
                }
            }
            pos = block_end;
        }
        Ok(out)
    }

    /// The map of `range` in this file alone (unallocated where the parent shows).
    fn own_map(&self, range: Range<u64>) -> Result<BlockMap> {
        let mut map = BlockMap::new(range.start);
        for (_, len, seg) in self.segments(range)? {
            match seg {
                Seg::Zero => map.push(len, ExtentKind::Zero),
                Seg::Absent => map.push(len, ExtentKind::Unallocated),
                Seg::Host(off) => self.push_host(&mut map, off, len),
            }
        }
        Ok(map)
    }

    /// Data at host `off..off + len`: plain file data, except where the replayed log
    /// or the end of the file stands in (then only `read_at` knows the bytes).
    fn push_host(&self, map: &mut BlockMap, off: u64, len: u64) {
        let end = off + len;
        let file_end = self.file.len().clamp(off, end);
        let mut cuts = match &self.replay {
            Some(r) => r.overlay.ranges_in(off, file_end),
            None => Vec::new(),
        };
        if file_end < end {
            cuts.push((file_end, end));
        }
        let mut p = off;
        for (s, e) in cuts {
            map.push(
                s - p,
                ExtentKind::Data(Location::File { file: 0, offset: p }),
            );
            map.push(e - s, ExtentKind::Data(Location::Opaque));
            p = e;
        }
        map.push(
            end - p,
            ExtentKind::Data(Location::File { file: 0, offset: p }),
        );
    }

    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        vconvert_core::check_guest_range(self.file.name(), range, self.meta.virtual_disk_size)
    }

    /// (block, BAT entry file offset, block offset) of the blocks past the end.
    fn truncated_entries(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let bat_at = self
            .regions
            .table
            .find(BAT_REGION)
            .map_or(0, |r| r.file_offset);
        self.truncated.iter().map(move |&b| {
            let index = self.geometry.payload_index(b);
            let off = BatEntry::decode(self.bat[index as usize]).offset;
            (b, bat_at + 8 * index, off)
        })
    }

    /// True when a dirty log was replayed (in memory) to read the image.
    pub fn log_replayed(&self) -> bool {
        self.replay.is_some()
    }

    /// The metadata region's contents.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The header in force.
    pub fn header(&self) -> &crate::header::Header {
        &self.headers.current
    }
}

/// A Windows path with forward slashes and without a leading `.\`.
fn windows_path(s: &str) -> String {
    let s = s.replace('\\', "/");
    s.strip_prefix("./").map(str::to_string).unwrap_or(s)
}

fn path_string(p: PathBuf) -> String {
    p.display().to_string()
}

impl ImageReader for VhdxReader {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.meta.virtual_disk_size
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.check_range(&range)?;
        let own = self.own_map(range)?;
        match &self.parent {
            Some(p) => vconvert_core::overlay_block_map(&own, p.as_ref()),
            None => Ok(own),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("read range overflows"))?;
        self.check_range(&(offset..end))?;
        for (start, len, seg) in self.segments(offset..end)? {
            let s = (start - offset) as usize;
            let out = &mut buf[s..s + len as usize];
            match (seg, &self.parent) {
                (Seg::Host(host), _) => self.read_view(out, host, "VHDX payload block")?,
                (Seg::Absent, Some(p)) => read_backing(p.as_ref(), out, start)?,
                _ => out.fill(0),
            }
        }
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(Format::Vhdx, self.meta.virtual_disk_size);
        info.actual_size = self.file.allocated_bytes();
        info.cluster_size = Some(u64::from(self.meta.block_size));
        info.backing_file = self.parent_name.clone();
        info.full_backing_file = self.parent_full.clone();
        if let Some(p) = &self.parent {
            info.backing_format = Some(p.format().to_string());
        }
        // qemu-img shows no format-specific data for VHDX; vconvert adds it only to say
        // that a dirty log was replayed (qemu-img cannot open such a file read-only).
        // A log still to replay is what qemu's dirty flag means: not closed cleanly.
        info.dirty = self.replay.is_some();
        if let Some(r) = &self.replay {
            info.format_specific = Some(serde_json::json!({
                "type": "vhdx",
                "data": {
                    "log-replayed": true,
                    "log-entries": r.entries,
                    "log-sequence": r.head_sequence,
                }
            }));
        }
        Ok(info)
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        (index == 0).then_some(&self.file)
    }

    fn parent_identity(&self) -> Option<String> {
        Some(self.headers.current.data_write_guid.to_string())
    }

    fn safety_findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.headers.other_problem {
            out.push(format!("a VHDX header copy is invalid: {p}"));
        }
        if let Some(p) = &self.regions.other_problem {
            out.push(p.clone());
        }
        for (i, (block, at, off)) in self.truncated_entries().enumerate() {
            if i == MAX_MESSAGES {
                out.push(format!(
                    "{} more VHDX payload blocks lie past the end of the file",
                    self.truncated.len() - MAX_MESSAGES
                ));
                break;
            }
            out.push(format!(
                "VHDX BAT entry at {at:#x}: payload block {block} at {off:#x} lies past the end of the file"
            ));
        }
        out
    }

    fn check(&self) -> Option<Result<CheckReport>> {
        // qemu-img checks that no payload block lies past the end of the file or
        // overlaps another (overlaps are refused when opening).
        let mut r = CheckReport::default();
        for (i, (block, _, off)) in self.truncated_entries().enumerate() {
            if i == MAX_MESSAGES {
                r.corruptions.push(format!(
                    "{} more VHDX BAT entries point after end of file",
                    self.truncated.len() - MAX_MESSAGES
                ));
                break;
            }
            r.corruptions.push(format!(
                "VHDX BAT entry {block} offset {off:#x} points after end of file ({}). Image has probably been truncated.",
                self.file.len()
            ));
        }
        Some(Ok(r))
    }
}
