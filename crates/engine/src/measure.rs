//! How much space a conversion needs (qemu-img `measure`): the import service reserves
//! workspace with it before converting.

use vconvert_core::{Format, ImageReader, Result};

/// Bytes a target image needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// Bytes needed for the source's data (an upper bound for compressed targets).
    pub required: u64,
    /// Bytes needed if every cluster were allocated.
    pub fully_allocated: u64,
}

/// Granule in which formats allocate data (qcow2's default cluster; VDI, VHD and VMDK
/// allocate in blocks or grains no larger than their metadata makes up for here).
const GRANULE: u64 = 64 << 10;
/// Fixed metadata allowance: headers, footers, descriptors, first tables.
const FIXED_METADATA: u64 = 2 << 20;

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to).saturating_mul(to)
}

/// Upper bound of the metadata of `format` for a disk of `size` bytes: one 8-byte
/// entry per granule for the mapping tables, as much again for reference counts or
/// redundant copies, plus a fixed allowance.
fn metadata(format: Format, size: u64) -> u64 {
    match format {
        Format::Raw => 0,
        _ => FIXED_METADATA + round_up(size.div_ceil(GRANULE).saturating_mul(16), GRANULE),
    }
}

/// Space needed to convert `src` (or, without a source, a new disk of `size` bytes) to
/// `format`. Raw is exact, as qemu-img computes it (the virtual size). For the other
/// formats the figures are upper bounds: the data extents rounded to 64 KiB, plus table
/// space for the whole disk.
pub fn measure(src: Option<&dyn ImageReader>, size: u64, format: Format) -> Result<Measure> {
    let size = src.map_or(size, |s| s.virtual_size());
    if format == Format::Raw {
        return Ok(Measure {
            required: size,
            fully_allocated: size,
        });
    }
    let mut data = 0u64;
    if let Some(src) = src {
        // Walk the map in windows so a huge sparse source costs bounded memory.
        let mut pos = 0;
        while pos < size {
            let end = size.min(pos.saturating_add(1 << 30));
            for e in src.block_map(pos..end)?.extents() {
                if e.kind.is_data() {
                    let first = e.start / GRANULE * GRANULE;
                    data = data.saturating_add(round_up(e.end(), GRANULE) - first);
                }
            }
            pos = end;
        }
    }
    let meta = metadata(format, size);
    Ok(Measure {
        required: data.min(round_up(size, GRANULE)).saturating_add(meta),
        fully_allocated: round_up(size, GRANULE).saturating_add(meta),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_needs_its_virtual_size_and_others_bound_their_data() {
        let m = measure(None, 10 << 20, Format::Raw).unwrap();
        assert_eq!(
            m,
            Measure {
                required: 10 << 20,
                fully_allocated: 10 << 20
            }
        );
        let q = measure(None, 10 << 30, Format::Qcow2).unwrap();
        assert!(q.required < 8 << 20, "{q:?}");
        assert!(q.fully_allocated > 10 << 30);
    }
}
