//! Writing VDI images in VirtualBox's layout: header at 0, block map at 0x200, data
//! blocks from the first 1 MiB boundary after the block map, 1 MiB blocks. (qemu-img
//! starts the data right after the map, rounded to a sector; aligned blocks can be
//! written around the page cache, see `vconvert_core::TargetFile`.)

use std::sync::Arc;

use vconvert_core::{
    Chunk, CreateParams, Error, Identity, ImageWriter, NonzeroBlocks, Options, Output, Result,
    TargetFile,
};

use crate::header::{
    uuid_to_disk, BlockEntry, ImageType, VdiHeader, DEFAULT_BLOCK_SIZE, HEADER_BYTES,
    HEADER_SIZE_V1_1, MAX_BLOCKS, SECTOR_SIZE,
};

/// Alignment of the first data block in the file: VirtualBox's `VDI_DATA_ALIGN`
/// (VDICore.h), 1 MiB.
const DATA_ALIGN: u64 = 1 << 20;

/// Blocks per chunk the writer asks the engine for.
const BLOCKS_PER_CHUNK: u64 = 4;

/// Writes a VDI image.
#[derive(Debug)]
pub struct VdiWriter {
    file: Arc<TargetFile>,
    name: String,
    header: VdiHeader,
    entries: Vec<BlockEntry>,
    /// Reserve the file's space (`preallocation=falloc|full`).
    preallocation: bool,
}

/// Legacy CHS geometry for `size` bytes, as VirtualBox computes it for IDE disks
/// (16 heads, 63 sectors per track, at most 16383 cylinders).
fn legacy_geometry(size: u64) -> (u32, u32, u32) {
    let cylinders = (size / 512 / (16 * 63)).clamp(1, 16383) as u32;
    (cylinders, 16, 63)
}

impl VdiWriter {
    /// The `-o` keys VDI accepts.
    pub const OPTIONS: &'static [&'static str] = &["static", "preallocation"];

    /// Creates the VDI target in `output` with `options`.
    pub fn create(
        output: &mut Output,
        params: &CreateParams,
        mut options: Options,
    ) -> Result<Self> {
        let is_static = options.take_bool("static")?.unwrap_or(false);
        let preallocation = options
            .take_choice("preallocation", &["off", "falloc", "full"])?
            .is_some_and(|p| p != "off");
        options.finish("vdi", Self::OPTIONS)?;
        let target = output.target().to_path_buf();
        let name = target.display().to_string();
        if params.compress {
            return Err(Error::unsupported(&name, "compression (-c) of VDI images"));
        }
        if params.existing {
            return Err(Error::unsupported(
                &name,
                "writing into an existing VDI image (-n); convert to a new file",
            ));
        }
        let disk_size = params.virtual_size.div_ceil(512) * 512;
        let bs = u64::from(DEFAULT_BLOCK_SIZE);
        let blocks = disk_size.div_ceil(bs);
        if blocks > u64::from(MAX_BLOCKS) {
            return Err(Error::invalid(format!(
                "{name}: {disk_size} bytes is too large for a VDI image"
            )));
        }
        let blocks = blocks as u32;
        let map_bytes = (4 * u64::from(blocks)).div_ceil(512) * 512;
        let mut id = Identity::new(params.identity_seed);
        let header = VdiHeader {
            header_size: HEADER_SIZE_V1_1,
            image_type: if is_static {
                ImageType::Static
            } else {
                ImageType::Dynamic
            },
            image_flags: 0,
            block_map_offset: HEADER_BYTES as u32,
            data_offset: (HEADER_BYTES as u64 + map_bytes).next_multiple_of(DATA_ALIGN) as u32,
            geometry: legacy_geometry(disk_size),
            sector_size: SECTOR_SIZE,
            disk_size,
            block_size: DEFAULT_BLOCK_SIZE,
            block_extra: 0,
            blocks,
            blocks_allocated: if is_static { blocks } else { 0 },
            uuid_image: uuid_to_disk(id.uuid_v4()?),
            uuid_last_snap: uuid_to_disk(id.uuid_v4()?),
            uuid_link: [0; 16],
            uuid_parent: [0; 16],
        };
        let entries = if is_static {
            (0..blocks).map(BlockEntry::Allocated).collect()
        } else {
            vec![BlockEntry::Free; blocks as usize]
        };
        let file = output.create_file(&target)?;
        let w = VdiWriter {
            file,
            name,
            header,
            entries,
            preallocation,
        };
        // The header and block map now, so an interrupted file is at least recognisable;
        // `finish` rewrites both.
        w.write_metadata()?;
        if is_static {
            let end = w.header.block_offset(blocks);
            w.file
                .set_len(end)
                .map_err(|e| Error::io(&w.name, format!("cannot set length to {end}"), e))?;
        }
        Ok(w)
    }

    fn write_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        vconvert_core::write_all_at(&self.file, &self.name, buf, offset, what)
    }

    fn write_metadata(&self) -> Result<()> {
        self.write_at(&self.header.encode(), 0, "VDI header")?;
        // The map in whole sectors; the rest up to the data is left a hole.
        let map_len = (4 * self.entries.len()).next_multiple_of(SECTOR_SIZE as usize);
        let mut map = vec![0u8; map_len];
        for (slot, e) in map.chunks_exact_mut(4).zip(&self.entries) {
            slot.copy_from_slice(&e.to_u32().to_le_bytes());
        }
        self.write_at(&map, self.header.block_map_offset.into(), "VDI block map")
    }
}

impl ImageWriter for VdiWriter {
    /// For each block of the chunk: does it hold non-zero bytes?
    type Encoder = NonzeroBlocks;

    fn chunk_size(&self) -> u64 {
        BLOCKS_PER_CHUNK * u64::from(self.header.block_size)
    }

    fn encoder(&self) -> NonzeroBlocks {
        NonzeroBlocks {
            block_size: self.header.block_size.into(),
        }
    }

    fn place(&mut self, chunk: &Chunk, nonzero: Vec<bool>) -> Result<()> {
        let bs = u64::from(self.header.block_size);
        for (k, &data) in nonzero.iter().enumerate() {
            if !data {
                continue;
            }
            let start = chunk.offset + k as u64 * bs;
            let len = bs.min(chunk.offset + chunk.len - start);
            let block = (start / bs) as usize;
            let index = match self.entries.get(block) {
                Some(BlockEntry::Allocated(i)) => *i,
                Some(_) => {
                    let i = self.header.blocks_allocated;
                    self.header.blocks_allocated += 1;
                    self.entries[block] = BlockEntry::Allocated(i);
                    i
                }
                None => {
                    return Err(Error::invalid(format!(
                        "{}: chunk at {start:#x} lies past the end of the disk",
                        self.name
                    )))
                }
            };
            let bytes = chunk.bytes(start, len).unwrap_or_default();
            let offset = self.header.block_offset(index);
            self.write_at(bytes, offset, "VDI data block")?;
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        self.write_metadata()?;
        // Every allocated block is whole in the file.
        let end = self.header.block_offset(self.header.blocks_allocated);
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.name, "cannot stat", e))?
            .len();
        if len < end {
            self.file
                .set_len(end)
                .map_err(|e| Error::io(&self.name, format!("cannot set length to {end}"), e))?;
        }
        if self.preallocation {
            // qemu-img's `preallocation` applies to the host file: reserve all of it.
            rustix::fs::fallocate(&*self.file, rustix::fs::FallocateFlags::empty(), 0, end)
                .map_err(|e| Error::io(&self.name, "cannot preallocate", e.into()))?;
        }
        Ok(())
    }
}
