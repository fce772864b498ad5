//! How much space a conversion needs (qemu-img `measure`): the import service reserves
//! workspace with it before converting.

use vconvert_core::{Error, Format, ImageReader, Options, Result};

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

/// qcow2 creation parameters that change its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2Geometry {
    /// Cluster size in bytes (a power of two, 512 B – 2 MiB).
    pub cluster_size: u64,
    /// Refcount entry width in bits (1 – 64, a power of two).
    pub refcount_bits: u64,
    /// Extended L2 entries (16 bytes instead of 8).
    pub extended_l2: bool,
}

impl Default for Qcow2Geometry {
    fn default() -> Self {
        Qcow2Geometry {
            cluster_size: 64 << 10,
            refcount_bits: 16,
            extended_l2: false,
        }
    }
}

impl Qcow2Geometry {
    /// Reads `cluster_size`, `refcount_bits` and `extended_l2` from `-o` options (other
    /// keys are left for the writer).
    pub fn from_options(options: &Options) -> Result<Self> {
        let mut o = options.clone();
        let mut g = Qcow2Geometry::default();
        if let Some(c) = o.take_size("cluster_size")? {
            if !c.is_power_of_two() || !(512..=2 << 20).contains(&c) {
                return Err(Error::invalid(format!(
                    "cluster_size {c} must be a power of two between 512 and 2M"
                )));
            }
            g.cluster_size = c;
        }
        if let Some(r) = o.take("refcount_bits") {
            match r.parse::<u64>() {
                Ok(b) if b.is_power_of_two() && b <= 64 => g.refcount_bits = b,
                _ => {
                    return Err(Error::invalid(format!(
                        "refcount_bits {r} must be a power of two up to 64"
                    )))
                }
            }
        }
        if let Some(e) = o.take_bool("extended_l2")? {
            g.extended_l2 = e;
        }
        Ok(g)
    }

    /// Bytes of metadata (header, L1, L2, refcount table and blocks) of a qcow2 image
    /// of `size` bytes with every table laid out for the whole disk, as qemu-img
    /// measures it. Follows the layout of QEMU's docs/interop/qcow2.txt: one header
    /// cluster; an L2 entry per cluster (8 or 16 bytes) in whole L2 tables; an L1 entry
    /// per L2 table in whole clusters; then refcount blocks covering every cluster of
    /// the image, themselves included, and a refcount table pointing at them.
    pub fn metadata_bytes(&self, size: u64) -> u64 {
        let c = self.cluster_size;
        let l2e: u64 = if self.extended_l2 { 16 } else { 8 };
        let data_clusters = size.div_ceil(c);
        let l2_entries = round_up(data_clusters, c / l2e);
        let l2_bytes = l2_entries * l2e;
        let l1_entries = round_up(l2_bytes / c, c / 8);
        let mut meta = c + l2_bytes + l1_entries * 8;
        // Refcount blocks and table: iterate until they cover themselves.
        let clusters = (meta + data_clusters * c) / c;
        let refs_per_block = c * 8 / self.refcount_bits;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let nb = (clusters + blocks + table).div_ceil(refs_per_block);
            let nt = (nb * 8).div_ceil(c);
            if nb == blocks && nt == table {
                break;
            }
            blocks = nb;
            table = nt;
        }
        meta += (blocks + table) * c;
        meta
    }
}

/// Space needed to convert `src` (or, without a source, a new disk of `size` bytes) to
/// `format` with creation `options`. Raw and qcow2 are computed as qemu-img does (raw:
/// the virtual size; qcow2: the clusters holding data plus metadata for the whole
/// disk). For vdi, vmdk and vpc the figures are upper bounds: the data extents rounded
/// to 64 KiB, plus table space for the whole disk; for vhdx, the payload blocks holding
/// data (all of them for `subformat=fixed`) plus the header section, log, BAT and
/// metadata region of the layout its writer makes.
pub fn measure(
    src: Option<&dyn ImageReader>,
    size: u64,
    format: Format,
    options: &Options,
) -> Result<Measure> {
    let size = src.map_or(size, |s| s.virtual_size());
    if format == Format::Raw {
        return Ok(Measure {
            required: size,
            fully_allocated: size,
        });
    }
    if format == Format::Qcow2 {
        let g = Qcow2Geometry::from_options(options)?;
        let c = g.cluster_size;
        let meta = g.metadata_bytes(size);
        let data = match src {
            Some(src) => data_bytes_in_granules(src, size, c)?,
            None => 0,
        };
        return Ok(Measure {
            required: data + meta,
            fully_allocated: round_up(size, c) + meta,
        });
    }
    if format == Format::Vhdx {
        // Whole payload blocks after the header section, log, BAT and metadata.
        let layout = vconvert_vhdx::Layout::from_options(size, &mut options.clone())?;
        let bs = layout.block_size;
        let meta = layout.metadata_bytes();
        let full = round_up(layout.size, bs);
        let data = match src {
            Some(_) if layout.fixed => full,
            Some(src) => data_bytes_in_granules(src, size, bs)?,
            None if layout.fixed => full,
            None => 0,
        };
        return Ok(Measure {
            required: data.saturating_add(meta),
            fully_allocated: full.saturating_add(meta),
        });
    }
    let data = match src {
        Some(src) => data_bytes_in_granules(src, size, GRANULE)?,
        None => 0,
    };
    let meta = metadata(format, size);
    Ok(Measure {
        required: data.min(round_up(size, GRANULE)).saturating_add(meta),
        fully_allocated: round_up(size, GRANULE).saturating_add(meta),
    })
}

/// Bytes of the `granule`-sized, aligned pieces of `src` that hold any data. Walks the
/// map in windows so a huge sparse source costs bounded memory.
fn data_bytes_in_granules(src: &dyn ImageReader, size: u64, granule: u64) -> Result<u64> {
    // qemu's vhdx driver reports no block status, so qemu-img measures a VHDX source
    // as fully allocated; so does vconvert (an upper bound either way).
    if src.format() == Format::Vhdx {
        return Ok(round_up(size, granule));
    }
    let mut total = 0u64;
    let mut last_counted: Option<u64> = None;
    // A fixed VHD is the only VHD without a block size.
    let fixed_vhd = src.format() == Format::Vpc && src.info()?.cluster_size.is_none();
    let refine = matches!(src.format(), Format::Vdi | Format::Vmdk) || fixed_vhd;
    let mut pos = 0;
    while pos < size {
        let end = size.min(pos.saturating_add(1 << 30));
        let map = src.block_map(pos..end)?;
        // qemu refines VDI blocks, VMDK grains and extents and a fixed VHD by the host
        // file's holes (their block status asks the file layer); for other formats it
        // counts whole allocations.
        let map = if refine {
            vconvert_core::refine_host_holes(map, src)?
        } else {
            map
        };
        for e in map.extents() {
            if !e.kind.is_data() {
                continue;
            }
            let mut first = e.start / granule;
            let last = (e.end() - 1) / granule;
            if last_counted == Some(first) {
                first += 1;
            }
            if first <= last {
                total += (last - first + 1) * granule;
                last_counted = Some(last);
            }
        }
        pos = end;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_needs_its_virtual_size_and_others_bound_their_data() {
        let none = Options::new();
        let m = measure(None, 10 << 20, Format::Raw, &none).unwrap();
        assert_eq!(
            m,
            Measure {
                required: 10 << 20,
                fully_allocated: 10 << 20
            }
        );
        let v = measure(None, 10 << 30, Format::Vdi, &none).unwrap();
        assert!(v.required < 8 << 20, "{v:?}");
        assert!(v.fully_allocated > 10 << 30);
        // VHDX: 1 MiB header section, 1 MiB log, 1 MiB BAT, 1 MiB metadata; whole
        // 16 MiB blocks (qemu-img's default for 10 GiB).
        let x = measure(None, 10 << 30, Format::Vhdx, &none).unwrap();
        assert_eq!(
            x,
            Measure {
                required: 4 << 20,
                fully_allocated: (10 << 30) + (4 << 20)
            }
        );
        let f = Options::parse("subformat=fixed,log_size=8M").unwrap();
        let x = measure(None, 10 << 30, Format::Vhdx, &f).unwrap();
        assert_eq!(x.required, (10 << 30) + (11 << 20));
    }

    #[test]
    fn qcow2_metadata_matches_hand_computed_layouts() {
        // 10 MiB, 64 KiB clusters: header, one L2 table, one L1 cluster, one refcount
        // table cluster and one refcount block.
        assert_eq!(Qcow2Geometry::default().metadata_bytes(10 << 20), 5 << 16);
        // 10 GiB: 20 L2 tables, 1 L1 cluster, 1 header, 6 refcount blocks, 1 table.
        assert_eq!(Qcow2Geometry::default().metadata_bytes(10 << 30), 29 << 16);
        let m = measure(None, 10 << 30, Format::Qcow2, &Options::new()).unwrap();
        assert_eq!(m.required, 1_900_544);
        let bad = Options::parse("cluster_size=3000").unwrap();
        assert!(measure(None, 1 << 20, Format::Qcow2, &bad).is_err());
    }
}
