//! Writing VHDX images in qemu-img's layout: the header section (identifier, two
//! headers, two region tables) in the first MiB, an empty log (`log_size`, 1 MiB by
//! default), the BAT, the metadata region (1 MiB), then the payload blocks, each at a
//! 1 MiB-aligned offset. Dynamic images allocate only blocks holding non-zero bytes, in
//! guest order (so the output does not depend on the thread count); fixed images
//! (`subformat=fixed`) have every block allocated in place. No log entries are written
//! and the log GUID stays nil: the file is consistent at every rename.

use std::sync::Arc;

use vconvert_core::{
    Chunk, CreateParams, Error, Identity, ImageWriter, NonzeroBlocks, Options, Output, Result,
    RunKind, TargetFile,
};

use crate::bat::{
    BatEntry, Geometry, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_ZERO,
};
use crate::header::{Header, FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SECTION_SIZE};
use crate::metadata::{
    encode_region, Metadata, FILE_PARAMETERS, FLAG_IS_REQUIRED, FLAG_IS_VIRTUAL_DISK,
    LOGICAL_SECTOR_SIZE, MAX_BLOCK_SIZE, MAX_DISK_SIZE, MIN_BLOCK_SIZE, PAGE_83_DATA,
    PHYSICAL_SECTOR_SIZE, VIRTUAL_DISK_SIZE,
};
use crate::region::{Region, RegionTable, BAT_REGION, METADATA_REGION, REGION_TABLE_OFFSETS};
use crate::{Guid, MIB};

/// qemu-img's default log size (1 MiB).
pub const DEFAULT_LOG_SIZE: u64 = MIB;
/// Size of the metadata region written.
const METADATA_SIZE: u64 = MIB;
/// Logical (and physical) sector size written, as qemu-img does.
const SECTOR: u32 = 512;
/// Chunks the writer asks for hold at least this many bytes (whole blocks).
const MIN_CHUNK: u64 = 8 << 20;

/// qemu-img's automatic block size for a disk of `size` bytes.
pub fn default_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 << 20
    } else if size > 100 << 30 {
        32 << 20
    } else if size > 1 << 30 {
        16 << 20
    } else {
        8 << 20
    }
}

/// The shape of a new VHDX from its size and `-o` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Virtual size, rounded up to the 512-byte sector as qemu-img does.
    pub size: u64,
    /// Payload block size.
    pub block_size: u64,
    /// Log size.
    pub log_size: u64,
    /// `subformat=fixed`.
    pub fixed: bool,
    /// Empty blocks are `PAYLOAD_BLOCK_ZERO` (qemu-img's default) rather than
    /// `NOT_PRESENT`.
    pub block_state_zero: bool,
    /// Bytes of the BAT region.
    pub bat_len: u64,
}

impl Layout {
    /// Takes `subformat`, `block_size`, `log_size` and `block_state_zero` from `options`.
    pub fn from_options(virtual_size: u64, options: &mut Options) -> Result<Self> {
        let subformat = options.take_choice("subformat", &["dynamic", "fixed"])?;
        let block_size = options.take_size("block_size")?.unwrap_or(0);
        let log_size = options.take_size("log_size")?.unwrap_or(DEFAULT_LOG_SIZE);
        let block_state_zero = options.take_bool("block_state_zero")?.unwrap_or(true);
        let size = virtual_size.div_ceil(u64::from(SECTOR)) * u64::from(SECTOR);
        if size > MAX_DISK_SIZE {
            return Err(Error::invalid(format!(
                "vhdx: disk size {size} is too large: the limit is 64 TiB"
            )));
        }
        let block_size = if block_size == 0 {
            default_block_size(size)
        } else {
            block_size
        };
        if !block_size.is_power_of_two()
            || block_size < u64::from(MIN_BLOCK_SIZE)
            || block_size > u64::from(MAX_BLOCK_SIZE)
        {
            return Err(Error::invalid(format!(
                "vhdx: block_size {block_size} must be a power of two from 1M to 256M"
            )));
        }
        if log_size < MIB || log_size % MIB != 0 || log_size > u64::from(u32::MAX) {
            return Err(Error::invalid(format!(
                "vhdx: log_size {log_size} must be a multiple of 1M, at least 1M and below 4G"
            )));
        }
        let geometry = Geometry::new(size, block_size, u64::from(SECTOR), false);
        let bat_len = (geometry.total_entries * 8).div_ceil(MIB).max(1) * MIB;
        Ok(Layout {
            size,
            block_size,
            log_size,
            fixed: subformat.as_deref() == Some("fixed"),
            block_state_zero,
            bat_len,
        })
    }

    /// Bytes before the first payload block: header section, log, BAT, metadata.
    pub fn metadata_bytes(&self) -> u64 {
        HEADER_SECTION_SIZE + self.log_size + self.bat_len + METADATA_SIZE
    }
}

/// Writes a VHDX image.
#[derive(Debug)]
pub struct VhdxWriter {
    file: Arc<TargetFile>,
    name: String,
    geometry: Geometry,
    virtual_size: u64,
    fixed: bool,
    /// The state of blocks that hold no data.
    empty_state: u8,
    bat: Vec<u64>,
    bat_offset: u64,
    /// First payload byte.
    data_offset: u64,
    /// Where the next dynamic block goes.
    next_offset: u64,
}

impl VhdxWriter {
    /// The `-o` keys vhdx accepts (qemu-img's, less the host-file ones).
    pub const OPTIONS: &'static [&'static str] =
        &["subformat", "block_size", "log_size", "block_state_zero"];

    /// Creates the VHDX target in `output` with `options`.
    pub fn create(
        output: &mut Output,
        params: &CreateParams,
        mut options: Options,
    ) -> Result<Self> {
        let layout = Layout::from_options(params.virtual_size, &mut options)?;
        options.finish("vhdx", Self::OPTIONS)?;
        let target = output.target().to_path_buf();
        let name = target.display().to_string();
        if params.compress {
            return Err(Error::unsupported(&name, "compression (-c) of VHDX images"));
        }
        if params.existing {
            return Err(Error::unsupported(
                &name,
                "writing into an existing VHDX image (-n); convert to a new file",
            ));
        }
        let Layout {
            size,
            block_size,
            log_size,
            fixed,
            block_state_zero,
            bat_len,
        } = layout;
        let geometry = Geometry::new(size, block_size, u64::from(SECTOR), false);
        let bat_offset = HEADER_SECTION_SIZE + log_size;
        let meta_offset = bat_offset + bat_len;
        let data_offset = meta_offset + METADATA_SIZE;
        let empty_state = if block_state_zero {
            PAYLOAD_BLOCK_ZERO
        } else {
            PAYLOAD_BLOCK_NOT_PRESENT
        };
        let mut bat = vec![0u64; geometry.total_entries as usize];
        for block in 0..geometry.payload_blocks {
            let entry = if fixed {
                BatEntry {
                    state: PAYLOAD_BLOCK_FULLY_PRESENT,
                    offset: data_offset + block * block_size,
                }
            } else {
                BatEntry {
                    state: empty_state,
                    offset: 0,
                }
            };
            bat[geometry.payload_index(block) as usize] = entry.encode();
        }

        let mut id = Identity::new(params.identity_seed);
        let file_write_guid = Guid::random(&mut id)?;
        let data_write_guid = Guid::random(&mut id)?;
        let page83 = Guid::random(&mut id)?;
        let file = output.create_file(&target)?;
        let w = VhdxWriter {
            file,
            name,
            geometry,
            virtual_size: size,
            fixed,
            empty_state,
            bat,
            bat_offset,
            data_offset,
            next_offset: data_offset,
        };
        // The header section.
        let mut ident = vec![0u8; 8 + 512];
        ident[..8].copy_from_slice(FILE_SIGNATURE);
        for (i, u) in "vconvert".encode_utf16().enumerate() {
            ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        w.write_at(&ident, 0, "VHDX file type identifier")?;
        for (i, at) in HEADER_OFFSETS.into_iter().enumerate() {
            let h = Header {
                sequence_number: i as u64,
                file_write_guid,
                data_write_guid,
                log_guid: Guid::NIL,
                log_version: crate::header::LOG_VERSION,
                version: crate::header::VERSION,
                log_length: log_size as u32,
                log_offset: HEADER_SECTION_SIZE,
            };
            w.write_at(&h.encode(), at, "VHDX header")?;
        }
        let regions = RegionTable {
            entries: vec![
                Region {
                    guid: BAT_REGION,
                    file_offset: bat_offset,
                    length: bat_len as u32,
                    required: true,
                },
                Region {
                    guid: METADATA_REGION,
                    file_offset: meta_offset,
                    length: METADATA_SIZE as u32,
                    required: true,
                },
            ],
        }
        .encode();
        for at in REGION_TABLE_OFFSETS {
            w.write_at(&regions, at, "VHDX region table")?;
        }
        let meta = Metadata {
            block_size: block_size as u32,
            leave_blocks_allocated: fixed,
            has_parent: false,
            virtual_disk_size: size,
            logical_sector_size: SECTOR,
            physical_sector_size: SECTOR,
            page83: Some(page83),
            parent_locator: None,
        };
        let mut fp = meta.block_size.to_le_bytes().to_vec();
        fp.extend_from_slice(&u32::from(meta.leave_blocks_allocated).to_le_bytes());
        let vd = FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK;
        let region = encode_region(
            &[
                (FILE_PARAMETERS, FLAG_IS_REQUIRED, fp),
                (VIRTUAL_DISK_SIZE, vd, size.to_le_bytes().to_vec()),
                (PAGE_83_DATA, vd, page83.0.to_vec()),
                (LOGICAL_SECTOR_SIZE, vd, SECTOR.to_le_bytes().to_vec()),
                (PHYSICAL_SECTOR_SIZE, vd, SECTOR.to_le_bytes().to_vec()),
            ],
            METADATA_SIZE as usize,
        );
        w.write_at(&region, meta_offset, "VHDX metadata region")?;
        if fixed {
            w.set_len(data_offset + size.div_ceil(MIB) * MIB)?;
        }
        w.write_bat()?;
        Ok(w)
    }

    fn write_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        vconvert_core::write_all_at(&self.file, &self.name, buf, offset, what)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.name, "cannot set length", e))
    }

    fn write_bat(&self) -> Result<()> {
        let mut b = Vec::with_capacity(self.bat.len() * 8);
        for e in &self.bat {
            b.extend_from_slice(&e.to_le_bytes());
        }
        self.write_at(&b, self.bat_offset, "VHDX BAT")
    }
}

impl ImageWriter for VhdxWriter {
    /// For each block of the chunk (dynamic images): does it hold non-zero bytes?
    type Encoder = NonzeroBlocks;

    fn chunk_size(&self) -> u64 {
        let bs = self.geometry.block_size;
        bs * (MIN_CHUNK / bs).max(1)
    }

    fn encoder(&self) -> NonzeroBlocks {
        NonzeroBlocks {
            block_size: if self.fixed {
                0
            } else {
                self.geometry.block_size
            },
        }
    }

    fn place(&mut self, chunk: &Chunk, nonzero: Vec<bool>) -> Result<()> {
        if self.fixed {
            // Blocks are contiguous: guest offset o is at data_offset + o; zeros are
            // holes of the sparse file already.
            for run in &chunk.runs {
                if run.kind == RunKind::Data {
                    let bytes = chunk.bytes(run.start, run.len).unwrap_or_default();
                    self.write_at(bytes, self.data_offset + run.start, "VHDX payload block")?;
                }
            }
            return Ok(());
        }
        let bs = self.geometry.block_size;
        for (k, &data) in nonzero.iter().enumerate() {
            if !data {
                continue;
            }
            let start = chunk.offset + k as u64 * bs;
            let len = bs.min(chunk.offset + chunk.len - start);
            let block = start / bs;
            if block >= self.geometry.payload_blocks {
                return Err(Error::invalid(format!(
                    "{}: chunk at {start:#x} lies past the end of the disk",
                    self.name
                )));
            }
            let at = self.next_offset;
            // A short last block takes only the MiBs it needs.
            self.next_offset += len.div_ceil(MIB) * MIB;
            self.bat[self.geometry.payload_index(block) as usize] = BatEntry {
                state: PAYLOAD_BLOCK_FULLY_PRESENT,
                offset: at,
            }
            .encode();
            // The file is new: only data runs are written, zeros stay holes.
            for run in &chunk.runs {
                let s = run.start.max(start);
                let e = (run.start + run.len).min(start + len);
                if run.kind == RunKind::Data && s < e {
                    let bytes = chunk.bytes(s, e - s).unwrap_or_default();
                    self.write_at(bytes, at + (s - start), "VHDX payload block")?;
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        self.write_bat()?;
        if !self.fixed {
            self.set_len(self.next_offset)?;
        }
        let _ = (self.virtual_size, self.empty_state);
        Ok(())
    }
}
