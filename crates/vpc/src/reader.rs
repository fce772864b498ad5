//! Reading VHD images: fixed, dynamic and differencing.

use byteorder::{BigEndian, ByteOrder};
use std::ops::Range;
use std::path::PathBuf;

use vconvert_core::{
    read_backing, relative_to, BlockMap, Error, ExtentKind, Format, ImageFile, ImageInfo,
    ImageReader, Location, Resolver, Result,
};

use crate::dynamic::{utf16, DynamicHeader, BAT_UNUSED, MAX_LOCATOR_BYTES};
use crate::footer::{DiskType, Footer, FOOTER_SIZE, MAX_SECTORS, NO_DATA_OFFSET, OLD_FOOTER_SIZE};
use crate::SECTOR_SIZE;

/// The block allocation table of a dynamic or differencing disk.
#[derive(Debug)]
struct BlockAllocationTable {
    header: DynamicHeader,
    /// Sector offset of each block, or [`BAT_UNUSED`].
    entries: Vec<u32>,
}

impl BlockAllocationTable {
    fn block_offset(&self, block: u64) -> Option<u64> {
        match self.entries.get(block as usize) {
            Some(&e) if e != BAT_UNUSED => Some(u64::from(e) * SECTOR_SIZE),
            _ => None,
        }
    }
}

/// A VHD image opened for reading.
pub struct VpcReader {
    file: ImageFile,
    footer: Footer,
    virtual_size: u64,
    bat: Option<BlockAllocationTable>,
    parent: Option<Box<dyn ImageReader>>,
    parent_name: Option<String>,
    parent_full: Option<String>,
}

impl std::fmt::Debug for VpcReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpcReader")
            .field("file", &self.file.name())
            .field("footer", &self.footer)
            .field("virtual_size", &self.virtual_size)
            .finish()
    }
}

impl VpcReader {
    /// Opens `file` as a VHD; a differencing disk's parent is opened through `resolver`.
    pub fn open(file: ImageFile, resolver: &dyn Resolver) -> Result<Self> {
        if file.len() < FOOTER_SIZE as u64 {
            return Err(file.corrupt(
                "VHD footer",
                0,
                format!("file is too short ({} bytes) for a VHD footer", file.len()),
            ));
        }
        // Dynamic disks keep a copy of the footer at 0; fixed ones only at the end.
        let mut b = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut b, 0, "VHD footer")?;
        let mut at = 0;
        let mut footer_len = FOOTER_SIZE as u64;
        if !Footer::is_footer(&b) {
            at = file.len() - FOOTER_SIZE as u64;
            file.read_exact_at(&mut b, at, "VHD footer")?;
            let old_at = file.len() - OLD_FOOTER_SIZE as u64;
            let mut cookie = [0u8; 8];
            if !Footer::is_footer(&b) && file.len() % SECTOR_SIZE == OLD_FOOTER_SIZE as u64 {
                file.read_exact_at(&mut cookie, old_at, "VHD footer")?;
                if Footer::is_footer(&cookie) {
                    // The missing last byte is reserved (zero) and adds nothing to the
                    // checksum.
                    b = [0u8; FOOTER_SIZE];
                    file.read_exact_at(&mut b[..OLD_FOOTER_SIZE], old_at, "VHD footer")?;
                    at = old_at;
                    footer_len = OLD_FOOTER_SIZE as u64;
                }
            }
        }
        let footer = Footer::parse(&file, &b, at)?;
        let virtual_size = footer.virtual_size();
        if virtual_size / SECTOR_SIZE > MAX_SECTORS {
            return Err(file.corrupt(
                "VHD footer",
                at + 48,
                format!("disk size {virtual_size} exceeds the VHD limit of 2040 GiB"),
            ));
        }
        let mut reader = VpcReader {
            file,
            footer,
            virtual_size,
            bat: None,
            parent: None,
            parent_name: None,
            parent_full: None,
        };
        match reader.footer.disk_type {
            DiskType::Fixed => {
                let data_end = reader.file.len() - footer_len;
                if virtual_size > data_end {
                    return Err(reader.file.corrupt(
                        "VHD footer",
                        at,
                        format!(
                            "fixed disk of {virtual_size} bytes, but only {data_end} bytes of data precede the footer"
                        ),
                    ));
                }
            }
            DiskType::Dynamic | DiskType::Differencing => {
                reader.bat = Some(reader.read_bat()?);
                if reader.footer.disk_type == DiskType::Differencing {
                    reader.open_parent(resolver)?;
                }
            }
        }
        Ok(reader)
    }

    fn read_bat(&self) -> Result<BlockAllocationTable> {
        let file = &self.file;
        let off = self.footer.data_offset;
        if off == NO_DATA_OFFSET || off < FOOTER_SIZE as u64 {
            return Err(file.corrupt(
                "VHD footer",
                16,
                format!("dynamic disk with data offset {off:#x}"),
            ));
        }
        let header = DynamicHeader::read(file, off)?;
        let bs = u64::from(header.block_size);
        let capacity = u64::from(header.max_table_entries) * bs;
        if capacity < self.virtual_size {
            return Err(file.corrupt(
                "VHD dynamic header",
                off + 28,
                format!(
                    "{} BAT entries of {bs}-byte blocks cannot hold {} bytes",
                    header.max_table_entries, self.virtual_size
                ),
            ));
        }
        let table_len = 4 * u64::from(header.max_table_entries);
        let table_at = header.table_offset;
        let raw = file.read_vec(table_at, table_len, table_len, "VHD block allocation table")?;
        let meta = [
            (0u64, FOOTER_SIZE as u64),
            (off, crate::dynamic::DYNAMIC_HEADER_SIZE as u64),
            (table_at, table_len),
        ];
        if table_at < off + crate::dynamic::DYNAMIC_HEADER_SIZE as u64 && table_at + table_len > off
        {
            return Err(file.corrupt(
                "VHD block allocation table",
                table_at,
                "overlaps the dynamic header",
            ));
        }
        let block_span = header.bitmap_size() + bs;
        let mut entries = Vec::with_capacity(header.max_table_entries as usize);
        let mut starts = Vec::new();
        for (i, w) in raw.chunks_exact(4).enumerate() {
            let e = BigEndian::read_u32(w);
            let at = table_at + 4 * i as u64;
            if e != BAT_UNUSED {
                let start = u64::from(e) * SECTOR_SIZE;
                if start + header.bitmap_size() > file.len() {
                    return Err(file.corrupt(
                        "VHD block allocation table",
                        at,
                        format!("block {i} at {start:#x} lies past the end of the file"),
                    ));
                }
                for &(m, len) in &meta {
                    if start < m + len && start + block_span > m {
                        return Err(file.corrupt(
                            "VHD block allocation table",
                            at,
                            format!("block {i} at {start:#x} overlaps metadata at {m:#x}"),
                        ));
                    }
                }
                // Blocks past the disk's end are never read; only those inside count.
                if (i as u64) * bs < self.virtual_size {
                    starts.push((start, i));
                }
            }
            entries.push(e);
        }
        starts.sort_unstable();
        for pair in starts.windows(2) {
            if pair[1].0 < pair[0].0 + block_span {
                return Err(file.corrupt(
                    "VHD block allocation table",
                    table_at + 4 * pair[1].1 as u64,
                    format!(
                        "block {} at {:#x} overlaps block {} at {:#x}",
                        pair[1].1, pair[1].0, pair[0].1, pair[0].0
                    ),
                ));
            }
        }
        Ok(BlockAllocationTable { header, entries })
    }

    /// Candidate parent paths, best first: the relative Windows locator, the Mac OS X
    /// file URL, the absolute Windows locator's file name, the parent's unicode name.
    fn parent_candidates(&self, header: &DynamicHeader) -> Result<Vec<String>> {
        let mut by_kind: Vec<(u8, String)> = Vec::new();
        for loc in &header.locators {
            let rank = match &loc.platform {
                b"W2ru" => 0,
                b"MacX" => 1,
                b"W2ku" => 2,
                _ => continue,
            };
            let data = self.file.read_vec(
                loc.data_offset,
                loc.data_len.into(),
                MAX_LOCATOR_BYTES.into(),
                "VHD parent locator",
            )?;
            let text = if rank == 1 {
                let s = String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_string();
                s.strip_prefix("file://localhost")
                    .or_else(|| s.strip_prefix("file://"))
                    .unwrap_or(&s)
                    .to_string()
            } else {
                windows_path(&utf16(&data, false))
            };
            if !text.is_empty() {
                by_kind.push((rank, text));
            }
        }
        by_kind.sort_by_key(|(r, _)| *r);
        let mut out: Vec<String> = by_kind.into_iter().map(|(_, s)| s).collect();
        if !header.parent_name.is_empty() {
            out.push(windows_path(&header.parent_name));
        }
        Ok(out)
    }

    fn open_parent(&mut self, resolver: &dyn Resolver) -> Result<()> {
        let Some(bat) = &self.bat else { return Ok(()) };
        let candidates = self.parent_candidates(&bat.header)?;
        let Some(first) = candidates.first().cloned() else {
            return Err(self.file.corrupt(
                "VHD dynamic header",
                self.footer.data_offset + 64,
                "differencing disk without a parent locator or parent name",
            ));
        };
        let path = candidates
            .iter()
            .map(|c| relative_to(self.file.path(), c))
            .find(|p| p.exists())
            .unwrap_or_else(|| relative_to(self.file.path(), &first));
        let parent = resolver.open_image(&self.file, &path, None)?;
        self.parent_name = Some(
            candidates
                .iter()
                .find(|c| relative_to(self.file.path(), c) == path)
                .cloned()
                .unwrap_or(first),
        );
        self.parent_full = Some(path_string(path));
        self.parent = Some(parent);
        Ok(())
    }

    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        vconvert_core::check_guest_range(self.file.name(), range, self.virtual_size)
    }

    /// The map of `range` in this file alone (unallocated where the parent shows).
    fn own_map(&self, range: Range<u64>) -> Result<BlockMap> {
        let mut map = BlockMap::new(range.start);
        let Some(bat) = &self.bat else {
            map.push(
                range.end - range.start,
                ExtentKind::Data(Location::File {
                    file: 0,
                    offset: range.start,
                }),
            );
            return Ok(map);
        };
        let bs = u64::from(bat.header.block_size);
        let bitmap_size = bat.header.bitmap_size();
        let mut pos = range.start;
        while pos < range.end {
            let block = pos / bs;
            let block_end = ((block + 1) * bs).min(range.end);
            let Some(start) = bat.block_offset(block) else {
                map.push(block_end - pos, ExtentKind::Unallocated);
                pos = block_end;
                continue;
            };
            let bitmap =
                self.file
                    .read_vec(start, bitmap_size, bitmap_size, "VHD sector bitmap")?;
            let data = start + bitmap_size;
            while pos < block_end {
                let sector = (pos - block * bs) / SECTOR_SIZE;
                let byte = bitmap.get((sector / 8) as usize).copied().unwrap_or(0);
                let set = byte & (0x80 >> (sector % 8)) != 0;
                let next = ((pos / SECTOR_SIZE + 1) * SECTOR_SIZE).min(block_end);
                let kind = if set {
                    ExtentKind::Data(Location::File {
                        file: 0,
                        offset: data + (pos - block * bs),
                    })
                } else {
                    ExtentKind::Unallocated
                };
                map.push(next - pos, kind);
                pos = next;
            }
        }
        Ok(map)
    }

    /// Where the on-disk footer sits.
    pub fn footer(&self) -> &Footer {
        &self.footer
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

impl ImageReader for VpcReader {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
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
        let map = self.own_map(offset..end)?;
        for e in map.extents() {
            let s = (e.start - offset) as usize;
            let out = &mut buf[s..s + e.len as usize];
            match (e.kind, &self.parent) {
                (ExtentKind::Data(Location::File { offset: host, .. }), _) => {
                    self.file.read_exact_at(out, host, "VHD data")?
                }
                (ExtentKind::Unallocated, Some(p)) => read_backing(p.as_ref(), out, e.start)?,
                _ => out.fill(0),
            }
        }
        Ok(())
    }

    /// QEMU's vpc driver: a fixed disk is its file (data over holes reads as zeros);
    /// a dynamic disk's allocated blocks are data as a whole (the sector bitmaps are not
    /// consulted), its unallocated blocks read as zeros.
    fn layer_status(&self, range: Range<u64>) -> Result<Vec<vconvert_core::LayerStatus>> {
        use vconvert_core::LayerStatus;
        self.check_range(&range)?;
        let Some(bat) = &self.bat else {
            return Ok(vec![LayerStatus {
                start: range.start,
                len: range.end - range.start,
                data: true,
                offset: Some((0, range.start)),
                recurse: true,
                ..LayerStatus::default()
            }]);
        };
        let bs = u64::from(bat.header.block_size);
        let bitmap_size = bat.header.bitmap_size();
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let block = pos / bs;
            let end = ((block + 1) * bs).min(range.end);
            let mut s = LayerStatus {
                start: pos,
                len: end - pos,
                ..LayerStatus::default()
            };
            match bat.block_offset(block) {
                Some(start) => {
                    s.data = true;
                    s.offset = Some((0, start + bitmap_size + (pos - block * bs)));
                }
                None => s.zero = true,
            }
            out.push(s);
            pos = end;
        }
        Ok(out)
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(Format::Vpc, self.virtual_size);
        info.actual_size = self.file.allocated_bytes();
        info.cluster_size = self.bat.as_ref().map(|b| u64::from(b.header.block_size));
        info.backing_file = self.parent_name.clone();
        info.full_backing_file = self.parent_full.clone();
        if let Some(p) = &self.parent {
            info.backing_format = Some(p.format().to_string());
        }
        Ok(info)
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        (index == 0).then_some(&self.file)
    }

    fn safety_findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.footer.checksum_ok() {
            out.push(format!(
                "VHD footer checksum is {:#010x}, but the footer sums to {:#010x}",
                self.footer.checksum, self.footer.computed_checksum
            ));
        }
        if let Some(bat) = &self.bat {
            if !bat.header.checksum_ok() {
                out.push(format!(
                    "VHD dynamic header checksum is {:#010x}, but the header sums to {:#010x}",
                    bat.header.checksum, bat.header.computed_checksum
                ));
            }
        }
        out
    }
}
