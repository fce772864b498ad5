//! Reading VDI images.

use std::ops::Range;

use serde_json::json;
use vconvert_core::{
    BlockMap, CheckReport, Error, ExtentKind, Format, ImageFile, ImageInfo, ImageReader, Location,
    Result,
};

use crate::header::{uuid_string, BlockEntry, VdiHeader};

/// A VDI image opened for reading.
#[derive(Debug)]
pub struct VdiReader {
    file: ImageFile,
    header: VdiHeader,
    entries: Vec<BlockEntry>,
    virtual_size: u64,
}

impl VdiReader {
    /// Opens `file` as a VDI image, checking the header and every block map entry.
    pub fn open(file: ImageFile) -> Result<Self> {
        let header = VdiHeader::read(&file)?;
        let raw = file.read_vec(
            header.block_map_offset.into(),
            4 * u64::from(header.blocks),
            4 * u64::from(crate::header::MAX_BLOCKS),
            "VDI block map",
        )?;
        let mut entries = Vec::with_capacity(header.blocks as usize);
        let mut seen = vec![false; header.blocks_allocated as usize];
        for (i, w) in raw.chunks_exact(4).enumerate() {
            let e = BlockEntry::from_u32(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            let at = u64::from(header.block_map_offset) + 4 * i as u64;
            if let BlockEntry::Allocated(idx) = e {
                let Some(slot) = seen.get_mut(idx as usize) else {
                    return Err(file.corrupt(
                        "VDI block map",
                        at,
                        format!(
                            "block {i} points at data block {idx}, but only {} are allocated",
                            header.blocks_allocated
                        ),
                    ));
                };
                if *slot {
                    return Err(file.corrupt(
                        "VDI block map",
                        at,
                        format!("block {i} points at data block {idx}, as another block does"),
                    ));
                }
                *slot = true;
                let off = header.block_offset(idx);
                if off >= file.len() {
                    return Err(file.corrupt(
                        "VDI block map",
                        at,
                        format!(
                            "data block {idx} of block {i} at {off:#x} lies past the end of the file"
                        ),
                    ));
                }
            }
            entries.push(e);
        }
        let virtual_size = header.virtual_size();
        Ok(VdiReader {
            file,
            header,
            entries,
            virtual_size,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &VdiHeader {
        &self.header
    }

    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        vconvert_core::check_guest_range(self.file.name(), range, self.virtual_size)
    }

    fn entry(&self, block: u64) -> BlockEntry {
        self.entries
            .get(block as usize)
            .copied()
            .unwrap_or(BlockEntry::Free)
    }
}

impl ImageReader for VdiReader {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.check_range(&range)?;
        let bs = u64::from(self.header.block_size);
        let mut map = BlockMap::new(range.start);
        let mut pos = range.start;
        while pos < range.end {
            let block = pos / bs;
            let within = pos % bs;
            let len = (bs - within).min(range.end - pos);
            let kind = match self.entry(block) {
                BlockEntry::Free => ExtentKind::Unallocated,
                BlockEntry::Zero => ExtentKind::Zero,
                BlockEntry::Allocated(i) => ExtentKind::Data(Location::File {
                    file: 0,
                    offset: self.header.block_offset(i) + within,
                }),
            };
            map.push(len, kind);
            pos += len;
        }
        Ok(map)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("read range overflows"))?;
        self.check_range(&(offset..end))?;
        let bs = u64::from(self.header.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.entry(pos / bs) {
                BlockEntry::Allocated(i) => {
                    let host = self.header.block_offset(i) + within;
                    // The last block of a file may be cut short; what is missing reads
                    // as zeros only if it lies past the end of the virtual disk, which
                    // check_range already excluded, so a short file is corrupt here.
                    self.file.read_exact_at(out, host, "VDI data block")?;
                }
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// QEMU's vdi driver: blocks with data at their offset (a static image's data over
    /// holes of the file reads as zeros); free and zero blocks read as zeros.
    fn layer_status(&self, range: Range<u64>) -> Result<Vec<vconvert_core::LayerStatus>> {
        let recurse = self.header.image_type == crate::ImageType::Static;
        let mut out = vconvert_core::status_of_map(&self.block_map(range)?);
        for s in &mut out {
            if s.data {
                s.recurse = recurse;
            } else {
                s.zero = true;
            }
        }
        Ok(out)
    }

    fn info(&self) -> Result<ImageInfo> {
        let h = &self.header;
        let mut info = ImageInfo::new(Format::Vdi, self.virtual_size);
        info.actual_size = self.file.allocated_bytes();
        info.cluster_size = Some(h.block_size.into());
        info.format_specific = Some(json!({
            "type": "vdi",
            "data": {
                "image-type": h.image_type.name(),
                "uuid": uuid_string(&h.uuid_image),
                "last-snapshot-uuid": uuid_string(&h.uuid_last_snap),
                "link-uuid": uuid_string(&h.uuid_link),
                "parent-uuid": uuid_string(&h.uuid_parent),
                "blocks-allocated": h.blocks_allocated,
            }
        }));
        Ok(info)
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        (index == 0).then_some(&self.file)
    }

    fn check(&self) -> Option<Result<CheckReport>> {
        // `open` refuses out-of-range and duplicate entries; what is left to find is a
        // wrong allocation count and blocks cut off by the end of the file.
        let mut report = CheckReport::default();
        let allocated = self
            .entries
            .iter()
            .filter(|e| matches!(e, BlockEntry::Allocated(_)))
            .count() as u64;
        if allocated != u64::from(self.header.blocks_allocated) {
            report.corruptions.push(format!(
                "allocated blocks mismatch: the header says {}, the block map has {allocated}",
                self.header.blocks_allocated
            ));
        }
        let bs = u64::from(self.header.block_size);
        for (i, e) in self.entries.iter().enumerate() {
            if let BlockEntry::Allocated(idx) = e {
                let off = self.header.block_offset(*idx);
                let need = bs.min(self.virtual_size.saturating_sub(i as u64 * bs));
                if off.saturating_add(need) > self.file.len() {
                    report.corruptions.push(format!(
                        "block {i}: data block {idx} at {off:#x} is cut off by the end of the file"
                    ));
                }
            }
        }
        Some(Ok(report))
    }
}
