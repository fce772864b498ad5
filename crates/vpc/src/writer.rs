//! Writing VHD images in qemu-img's layout. Dynamic: footer copy at 0, dynamic header
//! at 512, BAT at 1536, then blocks (a sector bitmap, then 2 MiB of data), then the
//! footer. Fixed: the data, then the footer.

use std::sync::Arc;

use vconvert_core::{
    Chunk, CreateParams, Error, Identity, ImageWriter, NonzeroBlocks, Options, Output, Result,
    RunKind, TargetFile,
};

use crate::dynamic::{DynamicHeader, BAT_UNUSED, DEFAULT_BLOCK_SIZE, DYNAMIC_HEADER_SIZE};
use crate::footer::{
    DiskType, Footer, Geometry, FOOTER_SIZE, MAX_GEOMETRY, MAX_SECTORS, NO_DATA_OFFSET, VHD_EPOCH,
};
use crate::SECTOR_SIZE;

/// Where qemu puts the BAT: after the footer copy and the dynamic header.
const TABLE_OFFSET: u64 = 1536;
/// Blocks per chunk the writer asks the engine for (dynamic disks).
const BLOCKS_PER_CHUNK: u64 = 2;
/// Chunk size for fixed disks.
const FIXED_CHUNK: u64 = 4 << 20;

/// Writes a VHD image.
#[derive(Debug)]
pub struct VpcWriter {
    file: Arc<TargetFile>,
    name: String,
    footer: Footer,
    /// Dynamic header and BAT; `None` for fixed disks.
    dynamic: Option<(DynamicHeader, Vec<u32>)>,
    /// Sector where the next block goes.
    next_sector: u64,
    target_is_zero: bool,
}

/// The size and geometry a new VHD gets: qemu-img rounds the size up to a CHS geometry
/// unless `force_size` keeps it exact (then the geometry is the maximum, so readers
/// believe `current_size`).
fn size_and_geometry(size: u64, force_size: bool) -> Result<(u64, Geometry)> {
    let sectors = size.div_ceil(SECTOR_SIZE);
    let (total, geometry) = if force_size {
        (sectors, MAX_GEOMETRY)
    } else {
        let g = Geometry::covering(sectors);
        if g == MAX_GEOMETRY {
            (sectors, g)
        } else {
            (g.total_sectors(), g)
        }
    };
    if total > MAX_SECTORS {
        return Err(Error::invalid(format!(
            "disk size {size} is too large for a VHD: the limit is 2040 GiB"
        )));
    }
    Ok((total * SECTOR_SIZE, geometry))
}

impl VpcWriter {
    /// The `-o` keys vpc accepts.
    pub const OPTIONS: &'static [&'static str] = &["subformat", "force_size", "azure"];

    /// Creates the VHD target in `output` with `options`.
    pub fn create(
        output: &mut Output,
        params: &CreateParams,
        mut options: Options,
    ) -> Result<Self> {
        let subformat = options.take_choice("subformat", &["dynamic", "fixed"])?;
        let force_size = options.take_bool("force_size")?;
        let azure = options.take_bool("azure")?.unwrap_or(false);
        options.finish("vpc", Self::OPTIONS)?;
        let target = output.target().to_path_buf();
        let name = target.display().to_string();
        if params.compress {
            return Err(Error::unsupported(&name, "compression (-c) of VHD images"));
        }
        if params.existing {
            return Err(Error::unsupported(
                &name,
                "writing into an existing VHD image (-n); convert to a new file",
            ));
        }
        let fixed = match (subformat.as_deref(), azure) {
            (Some("dynamic"), true) => {
                return Err(Error::invalid(
                    "vpc: azure=on makes a fixed VHD (Azure accepts only fixed disks); \
                     drop subformat=dynamic",
                ))
            }
            (Some("fixed"), _) | (None, true) => true,
            _ => false,
        };
        let mut size = params.virtual_size;
        if azure {
            if force_size == Some(false) {
                return Err(Error::invalid(
                    "vpc: azure=on keeps the exact size (force_size=on); drop force_size=off",
                ));
            }
            size = size.div_ceil(1 << 20) << 20;
        }
        let (size, geometry) = size_and_geometry(size, force_size.unwrap_or(azure))?;
        let mut id = Identity::new(params.identity_seed);
        let timestamp = if id.is_seeded() {
            0
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
                .unwrap_or(0)
        };
        let footer = Footer {
            data_offset: if fixed {
                NO_DATA_OFFSET
            } else {
                FOOTER_SIZE as u64
            },
            timestamp,
            creator_app: if force_size.unwrap_or(azure) {
                *b"qem2"
            } else {
                *b"qemu"
            },
            creator_version: 0x0005_0003,
            creator_os: *b"Wi2k",
            original_size: size,
            current_size: size,
            geometry,
            disk_type: if fixed {
                DiskType::Fixed
            } else {
                DiskType::Dynamic
            },
            checksum: 0,
            computed_checksum: 0,
            unique_id: id.uuid_v4()?,
            saved_state: 0,
        };
        let file = output.create_file(&target)?;
        let (dynamic, next_sector) = if fixed {
            file.set_len(size + FOOTER_SIZE as u64)
                .map_err(|e| Error::io(&name, "cannot set length", e))?;
            (None, 0)
        } else {
            let entries = size.div_ceil(u64::from(DEFAULT_BLOCK_SIZE)) as u32;
            let header = DynamicHeader {
                table_offset: TABLE_OFFSET,
                max_table_entries: entries,
                block_size: DEFAULT_BLOCK_SIZE,
                checksum: 0,
                computed_checksum: 0,
                parent_id: [0; 16],
                parent_timestamp: 0,
                parent_name: String::new(),
                locators: Vec::new(),
            };
            let table_bytes = (4 * u64::from(entries)).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
            let first = (TABLE_OFFSET + table_bytes) / SECTOR_SIZE;
            (Some((header, vec![BAT_UNUSED; entries as usize])), first)
        };
        let w = VpcWriter {
            file,
            name,
            footer,
            dynamic,
            next_sector,
            target_is_zero: params.target_is_zero,
        };
        w.write_metadata()?;
        Ok(w)
    }

    fn write_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        vconvert_core::write_all_at(&self.file, &self.name, buf, offset, what)
    }

    /// Footer(s), dynamic header and BAT.
    fn write_metadata(&self) -> Result<()> {
        let footer = self.footer.encode();
        match &self.dynamic {
            None => self.write_at(&footer, self.footer.current_size, "VHD footer"),
            Some((header, bat)) => {
                self.write_at(&footer, 0, "VHD footer copy")?;
                self.write_at(&header.encode(), FOOTER_SIZE as u64, "VHD dynamic header")?;
                let table_end = self.next_table_end();
                let mut table = vec![0u8; (table_end - TABLE_OFFSET) as usize];
                table.fill(0xff);
                for (slot, e) in table.chunks_exact_mut(4).zip(bat) {
                    slot.copy_from_slice(&e.to_be_bytes());
                }
                self.write_at(&table, TABLE_OFFSET, "VHD block allocation table")?;
                let _ = DYNAMIC_HEADER_SIZE;
                self.write_at(&footer, self.next_sector * SECTOR_SIZE, "VHD footer")
            }
        }
    }

    fn next_table_end(&self) -> u64 {
        match &self.dynamic {
            Some((_, bat)) => {
                TABLE_OFFSET + (4 * bat.len() as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
            }
            None => 0,
        }
    }
}

impl ImageWriter for VpcWriter {
    /// For each block of the chunk (dynamic disks): does it hold non-zero bytes?
    type Encoder = NonzeroBlocks;

    fn chunk_size(&self) -> u64 {
        match &self.dynamic {
            Some((h, _)) => BLOCKS_PER_CHUNK * u64::from(h.block_size),
            None => FIXED_CHUNK,
        }
    }

    fn encoder(&self) -> NonzeroBlocks {
        NonzeroBlocks {
            // A fixed disk has no blocks to allocate.
            block_size: self
                .dynamic
                .as_ref()
                .map_or(0, |(h, _)| h.block_size.into()),
        }
    }

    fn place(&mut self, chunk: &Chunk, nonzero: Vec<bool>) -> Result<()> {
        let Some((h, _)) = &self.dynamic else {
            // Fixed: the data where it is; zeros are holes of the sparse file already.
            for run in &chunk.runs {
                if run.kind == RunKind::Data {
                    let bytes = chunk.bytes(run.start, run.len).unwrap_or_default();
                    self.write_at(bytes, run.start, "VHD data")?;
                } else if !self.target_is_zero {
                    self.write_at(&vec![0u8; run.len as usize], run.start, "VHD zeros")?;
                }
            }
            return Ok(());
        };
        let bs = u64::from(h.block_size);
        let bitmap_size = h.bitmap_size();
        for (k, &data) in nonzero.iter().enumerate() {
            if !data {
                continue;
            }
            let start = chunk.offset + k as u64 * bs;
            let len = bs.min(chunk.offset + chunk.len - start);
            let block = (start / bs) as usize;
            let sector = self.next_sector;
            let Some((_, bat)) = &mut self.dynamic else {
                break;
            };
            let Some(slot) = bat.get_mut(block) else {
                return Err(Error::invalid(format!(
                    "{}: chunk at {start:#x} lies past the end of the disk",
                    self.name
                )));
            };
            *slot = u32::try_from(sector).map_err(|_| {
                Error::invalid(format!("{}: VHD grew past 2 TiB of blocks", self.name))
            })?;
            self.next_sector += (bitmap_size + bs) / SECTOR_SIZE;
            // Every sector of the block is present (qemu marks them all too).
            let bitmap = vec![0xffu8; bitmap_size as usize];
            let at = sector * SECTOR_SIZE;
            self.write_at(&bitmap, at, "VHD sector bitmap")?;
            let bytes = chunk.bytes(start, len).unwrap_or_default();
            self.write_at(bytes, at + bitmap_size, "VHD data block")?;
            if len < bs {
                // A short last block is still whole in the file.
                self.write_at(
                    &vec![0u8; (bs - len) as usize],
                    at + bitmap_size + len,
                    "VHD block padding",
                )?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        self.write_metadata()?;
        if self.dynamic.is_some() {
            let end = self.next_sector * SECTOR_SIZE + FOOTER_SIZE as u64;
            self.file
                .set_len(end)
                .map_err(|e| Error::io(&self.name, "cannot set length", e))?;
        }
        Ok(())
    }
}
