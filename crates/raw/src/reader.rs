//! Reading raw images.

use std::ops::Range;

use vconvert_core::{
    BlockMap, Error, ExtentKind, Format, ImageFile, ImageInfo, ImageReader, Location, Result,
};

use crate::SECTOR_SIZE;

/// A raw image. Its virtual size is the file length rounded up to 512 bytes, as qemu
/// reports it; the bytes past the end of the file read as zeros.
#[derive(Debug)]
pub struct RawReader {
    file: ImageFile,
    virtual_size: u64,
}

impl RawReader {
    /// A raw view of `file`.
    pub fn new(file: ImageFile) -> Self {
        let virtual_size = file.len().div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        RawReader { file, virtual_size }
    }

    /// The underlying file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        vconvert_core::check_guest_range(self.file.name(), range, self.virtual_size)
    }
}

impl ImageReader for RawReader {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.check_range(&range)?;
        let mut map = BlockMap::new(range.start);
        let file_end = self.file.len().min(range.end);
        let storage = self.file.storage();
        let io_err = |e| Error::io(self.file.name(), "cannot find data and holes", e);
        let mut pos = range.start;
        while pos < file_end {
            let data = match storage.next_data(pos).map_err(io_err)? {
                Some(d) if d < file_end => d.max(pos),
                _ => break,
            };
            map.push(data - pos, ExtentKind::Zero);
            let hole = storage
                .next_hole(data)
                .map_err(io_err)?
                .clamp(data, file_end);
            // A hole at `data` itself would loop forever; treat the rest as data.
            let hole = if hole == data { file_end } else { hole };
            map.push(
                hole - data,
                ExtentKind::Data(Location::File {
                    file: 0,
                    offset: data,
                }),
            );
            pos = hole;
        }
        map.push(range.end - map.end(), ExtentKind::Zero);
        Ok(map)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("read range overflows"))?;
        self.check_range(&(offset..end))?;
        let in_file = self.file.len().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(in_file);
        self.file.read_exact_at(head, offset, "raw data")?;
        tail.fill(0);
        Ok(())
    }

    /// QEMU's file layer: data and holes of the file, each with its offset (holes read
    /// as zeros).
    fn layer_status(&self, range: Range<u64>) -> Result<Vec<vconvert_core::LayerStatus>> {
        let mut out = vconvert_core::status_of_map(&self.block_map(range)?);
        for s in &mut out {
            s.offset = Some((0, s.start));
        }
        Ok(out)
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        (index == 0).then_some(&self.file)
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(Format::Raw, self.virtual_size);
        info.actual_size = self.file.allocated_bytes();
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    #[test]
    fn size_rounds_up_and_tail_reads_zero() {
        let r = RawReader::new(ImageFile::from_bytes("t.raw", vec![7u8; 1000]));
        assert_eq!(r.virtual_size(), 1024);
        let mut buf = vec![1u8; 70];
        r.read_at(&mut buf, 950).unwrap();
        assert!(buf[..50].iter().all(|&b| b == 7) && buf[50..].iter().all(|&b| b == 0));
        assert!(r.read_at(&mut buf, 1000).is_err());
        assert!(r.read_at(&mut buf, 954).is_ok());
        let map = r.block_map(0..1024).unwrap();
        map.check_invariants().unwrap();
        assert_eq!(map.data_bytes(), 1000);
        assert_eq!(map.extents().last().unwrap().kind, ExtentKind::Zero);
    }

    #[test]
    fn block_map_follows_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.raw");
        let f = File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 8 << 20).unwrap();
        drop(f);
        let r = RawReader::new(ImageFile::open(&p).unwrap());
        let map = r.block_map(0..16 << 20).unwrap();
        map.check_invariants().unwrap();
        // Filesystems without hole reporting give all-data maps.
        assert!(
            map.data_bytes() == 8192 || map.data_bytes() == 16 << 20,
            "{map:?}"
        );
        let sub = r.block_map((8 << 20) + 4096..(8 << 20) + 12288).unwrap();
        sub.check_invariants().unwrap();
        assert_eq!(sub.start(), (8 << 20) + 4096);
        assert_eq!(sub.end(), (8 << 20) + 12288);
        if map.data_bytes() == 8192 {
            assert_eq!(sub.extents().len(), 2);
            assert_eq!(
                sub.extents()[0].kind,
                ExtentKind::Data(Location::File {
                    file: 0,
                    offset: (8 << 20) + 4096
                })
            );
        }
    }
}
