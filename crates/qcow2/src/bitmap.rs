//! Persistent dirty bitmaps (qcow2.txt, "Bitmaps extension" and "Bitmap directory"):
//! listed by `info`; their directory, tables and data clusters are counted by `check`.

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{ImageFile, Result};

use crate::header::{autoclear, Qcow2Header};

/// Largest bitmap directory qemu accepts (64 MiB).
const MAX_DIRECTORY: u64 = 64 << 20;
/// Most bitmaps qemu allows.
const MAX_BITMAPS: u32 = 65535;

/// One persistent bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// "in-use", "auto".
    pub flags: Vec<&'static str>,
    /// Offset and entry count of its bitmap table.
    pub table: (u64, u32),
}

impl Bitmap {
    /// The bitmaps of `file`, when the bitmaps extension is present and consistent (its
    /// autoclear bit set, as qemu requires).
    pub fn read_directory(file: &ImageFile, h: &Qcow2Header) -> Result<Vec<Bitmap>> {
        let (Some(n), Some((size, offset))) = (h.nb_bitmaps, h.bitmap_directory) else {
            return Ok(Vec::new());
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(Vec::new());
        }
        if n > MAX_BITMAPS {
            return Err(file.corrupt("bitmap directory", offset, format!("{n} bitmaps")));
        }
        let dir = file.read_vec(offset, size, MAX_DIRECTORY, "bitmap directory")?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        for i in 0..n {
            let bad = || {
                file.corrupt(
                    "bitmap directory",
                    offset + pos as u64,
                    format!("entry {i} is truncated"),
                )
            };
            let fixed = dir.get(pos..pos + 24).ok_or_else(bad)?;
            let table_offset = BigEndian::read_u64(&fixed[0..]);
            let table_size = BigEndian::read_u32(&fixed[8..]);
            let flag_bits = BigEndian::read_u32(&fixed[12..]);
            let granularity_bits = u32::from(fixed[17]);
            let name_size = usize::from(BigEndian::read_u16(&fixed[18..]));
            let extra = BigEndian::read_u32(&fixed[20..]) as usize;
            let name_at = pos + 24 + extra;
            let name = dir.get(name_at..name_at + name_size).ok_or_else(bad)?;
            let mut flags = Vec::new();
            if flag_bits & 1 != 0 {
                flags.push("in-use");
            }
            if flag_bits & 2 != 0 {
                flags.push("auto");
            }
            out.push(Bitmap {
                name: String::from_utf8_lossy(name).into_owned(),
                granularity: 1u64 << granularity_bits.min(63),
                flags,
                table: (table_offset, table_size),
            });
            pos = (name_at + name_size).div_ceil(8) * 8;
        }
        Ok(out)
    }
}
