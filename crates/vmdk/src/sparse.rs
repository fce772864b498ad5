//! A hosted sparse extent file opened for reading: header (and stream footer), grain
//! directory, lazy grain table lookups and grain decompression.

use vconvert_core::{Error, ImageFile, Result};

use crate::grain::{self, Grain, ENTRY_SIZE, GTE_UNALLOCATED};
use crate::header::{
    SparseExtentHeader, COWD_MAGIC, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_REDUNDANT_GT,
    FLAG_ZEROED_GRAIN, GD_AT_END, HEADER_SIZE,
};
use crate::marker::{
    GrainMarker, MetadataMarker, GRAIN_MARKER_SIZE, MARKER_EOS, MARKER_FOOTER, METADATA_MARKER_SIZE,
};
use crate::{MAX_DESCRIPTOR_SIZE, SECTOR_SIZE};

/// Largest grain directory we load (16 Mi grain tables).
const MAX_GD_BYTES: u64 = 64 << 20;

/// Bytes from the end of a stream-optimized file to its footer marker: footer marker,
/// footer, end-of-stream marker, one sector each.
pub(crate) const FOOTER_TAIL: u64 = 3 * SECTOR_SIZE;

/// A sparse extent file ready for lookups.
#[derive(Debug)]
pub(crate) struct SparseExtent {
    /// The extent file.
    pub file: ImageFile,
    /// The header in force: the footer's copy for a stream with the GD at the end.
    pub header: SparseExtentHeader,
    /// The grain directory: sector of each grain table (0: none).
    pub gd: Vec<u32>,
    /// Embedded descriptor bytes (up to the first NUL) and their byte offset.
    pub descriptor: Option<(Vec<u8>, u64)>,
    /// Findings made while opening.
    pub findings: Vec<String>,
    /// Warnings made while opening (nothing unsafe: `uncleanShutdown`).
    pub warnings: Vec<String>,
}

impl SparseExtent {
    /// Opens the sparse extent in `file`, reading its embedded descriptor when
    /// `with_descriptor` (only a monolithic image's own descriptor matters).
    pub fn open(file: ImageFile, with_descriptor: bool) -> Result<Self> {
        let mut head = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut head, 0, "sparse extent header")?;
        if head[..4] == COWD_MAGIC {
            return Err(Error::unsupported(
                file.name(),
                "unsupported VMDK extent type: ESX Server sparse extent (COWD/VMFSSPARSE)",
            ));
        }
        let first = SparseExtentHeader::decode(&head)
            .ok_or_else(|| file.corrupt("sparse extent header", 0, "magic number is not 'KDMV'"))?;
        first.validate(&file, 0, "sparse extent header")?;
        let mut findings = Vec::new();
        let first_unclean = first.unclean_shutdown;
        let header = if first.gd_offset == GD_AT_END {
            read_footer(&file, &first, &mut findings)?
        } else {
            first
        };
        // VMware sets the flag while a disk is open, so a disk copied from a running or
        // crashed VM carries it; VMware and qemu read such disks.
        let mut warnings = Vec::new();
        if header.unclean_shutdown || first_unclean {
            warnings.push(format!(
                "{}: the sparse extent was not closed cleanly (uncleanShutdown is set); it is read as it is",
                file.name()
            ));
        }
        let descriptor = if with_descriptor {
            read_embedded_descriptor(&file, &header)?
        } else {
            None
        };
        let gd = load_gd(&file, &header, &mut findings)?;
        Ok(SparseExtent {
            file,
            header,
            gd,
            descriptor,
            findings,
            warnings,
        })
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.header.grain_bytes()
    }

    /// Guest bytes of the extent.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR_SIZE
    }

    /// True when grains are compressed.
    pub fn compressed(&self) -> bool {
        self.header.has(FLAG_COMPRESSED)
    }

    fn gtes_per_gt(&self) -> u64 {
        u64::from(self.header.num_gtes_per_gt)
    }

    /// Grain table entries per grain table.
    pub fn per_gt(&self) -> u64 {
        self.gtes_per_gt()
    }

    /// The grains `in_gt..in_gt + n` of grain table `gt`, or `None` when the grain
    /// directory has no table there (all unallocated). Reads only those entries.
    pub fn gt_slice(&self, gt: u64, in_gt: u64, n: u64) -> Result<Option<Vec<Grain>>> {
        let per_gt = self.gtes_per_gt();
        let gd_entry = usize::try_from(gt)
            .ok()
            .and_then(|i| self.gd.get(i).copied())
            .ok_or_else(|| {
                self.file.corrupt(
                    "grain directory",
                    self.header.gd_offset.saturating_mul(SECTOR_SIZE),
                    format!("grain table {gt} lies beyond the grain directory"),
                )
            })?;
        if gd_entry == GTE_UNALLOCATED {
            return Ok(None);
        }
        if in_gt + n > per_gt {
            return Err(Error::invalid("grain table slice out of bounds"));
        }
        let zeroed = self.header.has(FLAG_ZEROED_GRAIN);
        let compressed = self.compressed();
        let at = u64::from(gd_entry) * SECTOR_SIZE + in_gt * ENTRY_SIZE;
        let bytes = self
            .file
            .read_vec(at, n * ENTRY_SIZE, per_gt * ENTRY_SIZE, "grain table")?;
        Ok(Some(
            grain::decode_entries(&bytes)
                .into_iter()
                .map(|e| Grain::from_gte(e, zeroed, compressed))
                .collect(),
        ))
    }

    /// Reads the plain grain bytes at byte `offset` into `buf`; what lies past the end
    /// of the file reads as zeros (as qemu reads it).
    pub fn read_plain(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_clamped(&self.file, buf, offset, "grain")
    }

    /// Decompresses the grain at byte `offset` whose first guest byte is `grain_start`
    /// (extent-relative) into `out` (one grain of bytes).
    pub fn read_compressed(&self, offset: u64, grain_start: u64, out: &mut [u8]) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        // zlib never expands a grain by more than a small fraction; qemu reads at most
        // two grains of compressed bytes.
        let max = 2 * grain_bytes + 1024;
        let data = if self.header.has(FLAG_MARKERS) {
            let mut m = [0u8; GRAIN_MARKER_SIZE];
            self.file.read_exact_at(&mut m, offset, "grain marker")?;
            let marker = GrainMarker::decode(&m);
            if marker.size == 0 {
                return Err(self.file.corrupt(
                    "grain marker",
                    offset,
                    "a grain table entry points to a metadata marker, not a grain",
                ));
            }
            self.file.read_vec(
                offset + GRAIN_MARKER_SIZE as u64,
                u64::from(marker.size),
                max,
                "compressed grain",
            )?
        } else {
            let avail = self.file.len().saturating_sub(offset).min(max);
            self.file.read_vec(offset, avail, max, "compressed grain")?
        };
        let produced = grain::inflate(&data, out)
            .map_err(|e| self.file.corrupt("compressed grain", offset, e))?;
        let needed = self
            .capacity_bytes()
            .saturating_sub(grain_start)
            .min(grain_bytes) as usize;
        if produced < needed {
            return Err(self.file.corrupt(
                "compressed grain",
                offset,
                format!("grain inflates to {produced} bytes, expected {needed}"),
            ));
        }
        out.get_mut(produced..).unwrap_or_default().fill(0);
        Ok(())
    }
}

/// Reads `buf` at `offset` of `file`, zero-filling what lies past its end.
pub(crate) fn read_clamped(
    file: &ImageFile,
    buf: &mut [u8],
    offset: u64,
    structure: &'static str,
) -> Result<()> {
    let n = file.len().saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(n);
    if !head.is_empty() {
        file.read_exact_at(head, offset, structure)?;
    }
    tail.fill(0);
    Ok(())
}

/// Reads and checks the footer of a stream whose header says "GD at end": footer
/// marker, footer (a header copy with the real GD offset) and end-of-stream marker in
/// the last three sectors of the file.
fn read_footer(
    file: &ImageFile,
    first: &SparseExtentHeader,
    findings: &mut Vec<String>,
) -> Result<SparseExtentHeader> {
    let len = file.len();
    if len < FOOTER_TAIL + SECTOR_SIZE {
        return Err(file.corrupt(
            "stream footer",
            0,
            "the header puts the grain directory at the end, but the file is too short for a footer",
        ));
    }
    let at = len - FOOTER_TAIL;
    let mut tail = [0u8; FOOTER_TAIL as usize];
    file.read_exact_at(&mut tail, at, "stream footer")?;
    let (marker, rest) = tail.split_at(METADATA_MARKER_SIZE);
    let (footer, eos) = rest.split_at(HEADER_SIZE);
    let marker_bytes = marker;
    let marker = MetadataMarker::decode(marker);
    if !marker.is_some_and(|m| m.is(MARKER_FOOTER)) {
        return Err(file.corrupt(
            "stream footer marker",
            at,
            "the header puts the grain directory at the end, but there is no footer marker 1536 bytes before the end of the file",
        ));
    }
    if !MetadataMarker::decode(eos).is_some_and(|m| m.is(MARKER_EOS)) {
        return Err(file.corrupt(
            "end-of-stream marker",
            len - SECTOR_SIZE,
            "the last sector of the stream is not an end-of-stream marker",
        ));
    }
    // Spec "Stream-Optimized Compressed Sparse Extents": a metadata marker is padded to
    // a sector with zeros, and the end-of-stream marker is a sector of zeros.
    if let Some(i) = marker_bytes[16..].iter().position(|&b| b != 0) {
        findings.push(format!(
            "{}: the stream footer marker at {at:#x} has non-zero padding at byte {:#x} (rule: VMDK markers are zero-padded)",
            file.name(),
            at + 16 + i as u64
        ));
    }
    if let Some(i) = eos.iter().position(|&b| b != 0) {
        findings.push(format!(
            "{}: the end-of-stream marker at {:#x} is not all zeros (byte {:#x}; rule: VMDK markers are zero-padded)",
            file.name(),
            len - SECTOR_SIZE,
            len - SECTOR_SIZE + i as u64
        ));
    }
    let mut fb = [0u8; HEADER_SIZE];
    fb.copy_from_slice(footer);
    let foot_at = at + SECTOR_SIZE;
    let h = SparseExtentHeader::decode(&fb)
        .ok_or_else(|| file.corrupt("stream footer", foot_at, "magic number is not 'KDMV'"))?;
    h.validate(file, foot_at, "stream footer")?;
    if h.gd_offset == GD_AT_END {
        return Err(file.corrupt(
            "stream footer",
            foot_at,
            "the footer does not give the grain directory's offset",
        ));
    }
    let fields: [(&str, u64, u64); 7] = [
        ("version", first.version.into(), h.version.into()),
        ("capacity", first.capacity, h.capacity),
        ("grain size", first.grain_size, h.grain_size),
        (
            "descriptor offset",
            first.descriptor_offset,
            h.descriptor_offset,
        ),
        ("descriptor size", first.descriptor_size, h.descriptor_size),
        (
            "grain table entries per table",
            first.num_gtes_per_gt.into(),
            h.num_gtes_per_gt.into(),
        ),
        ("flags", first.flags.into(), h.flags.into()),
    ];
    for (name, a, b) in fields {
        if a != b {
            findings.push(format!(
                "{}: the stream footer's {name} ({b}) disagrees with the header's ({a}); the footer is used",
                file.name()
            ));
        }
    }
    Ok(h)
}

fn read_embedded_descriptor(
    file: &ImageFile,
    h: &SparseExtentHeader,
) -> Result<Option<(Vec<u8>, u64)>> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(None);
    }
    let at = h
        .descriptor_offset
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| file.corrupt("embedded descriptor", 28, "descriptor offset overflows"))?;
    let len = h
        .descriptor_size
        .checked_mul(SECTOR_SIZE)
        .filter(|l| *l <= MAX_DESCRIPTOR_SIZE)
        .ok_or_else(|| {
            file.corrupt(
                "embedded descriptor",
                at,
                format!(
                    "descriptor of {} sectors exceeds the limit of {MAX_DESCRIPTOR_SIZE} bytes (stricter than oslo.utils, which reads the first 1 MiB of it)",
                    h.descriptor_size
                ),
            )
        })?;
    let mut v = file.read_vec(at, len, MAX_DESCRIPTOR_SIZE, "embedded descriptor")?;
    if let Some(nul) = v.iter().position(|&b| b == 0) {
        v.truncate(nul);
    }
    Ok(Some((v, at)))
}

/// Loads the grain directory at sector `gd_sector`, checking that every grain table it
/// names lies inside the file.
fn read_gd(file: &ImageFile, h: &SparseExtentHeader, gd_sector: u64) -> Result<Vec<u32>> {
    let entries = h.gd_entries();
    let at = gd_sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| file.corrupt("grain directory", 56, "offset overflows"))?;
    if gd_sector == 0 {
        return Err(file.corrupt("grain directory", 56, "offset is 0"));
    }
    let bytes = file.read_vec(
        at,
        entries.saturating_mul(ENTRY_SIZE),
        MAX_GD_BYTES,
        "grain directory",
    )?;
    let gd = grain::decode_entries(&bytes);
    let gt_bytes = u64::from(h.num_gtes_per_gt) * ENTRY_SIZE;
    for (i, &e) in gd.iter().enumerate() {
        if e != GTE_UNALLOCATED {
            file.check_range("grain table", u64::from(e) * SECTOR_SIZE, gt_bytes)
                .map_err(|_| {
                    file.corrupt(
                        "grain directory",
                        at + i as u64 * ENTRY_SIZE,
                        format!(
                            "entry {i} puts a grain table at sector {e}, past the end of the file"
                        ),
                    )
                })?;
        }
    }
    // Two directory entries sharing a grain table would let a tiny file map the same
    // grains over and over; no writer produces that.
    let mut sorted: Vec<(u32, usize)> = gd
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != GTE_UNALLOCATED)
        .map(|(i, &e)| (e, i))
        .collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(file.corrupt(
            "grain directory",
            at + w[1].1 as u64 * ENTRY_SIZE,
            format!(
                "entries {} and {} both use the grain table at sector {}",
                w[0].1, w[1].1, w[0].0
            ),
        ));
    }
    Ok(gd)
}

/// The primary grain directory, or the redundant one when the primary is invalid.
fn load_gd(
    file: &ImageFile,
    h: &SparseExtentHeader,
    findings: &mut Vec<String>,
) -> Result<Vec<u32>> {
    match read_gd(file, h, h.gd_offset) {
        Ok(gd) => Ok(gd),
        Err(e) if h.has(FLAG_REDUNDANT_GT) && h.rgd_offset != 0 => {
            match read_gd(file, h, h.rgd_offset) {
                Ok(gd) => {
                    findings.push(format!(
                    "{}: the primary grain directory is invalid ({e}); the redundant one is used",
                    file.name()
                ));
                    Ok(gd)
                }
                Err(_) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// At most this many sentences of one kind go into a check report.
const MAX_REPORTED: usize = 100;

impl SparseExtent {
    /// Checks every grain table entry: inside the file, not inside the metadata before
    /// the first grain, compressed grain markers naming their own grain, and no grain
    /// used twice. Findings are added to `report`. Without `read_markers`, only metadata
    /// is read (grain markers sit in front of each grain's data and are not looked at).
    pub fn check(&self, report: &mut vconvert_core::CheckReport, read_markers: bool) -> Result<()> {
        let name = self.file.name();
        let mut corrupt = Vec::new();
        let per_gt = self.gtes_per_gt();
        let gb = self.grain_bytes();
        let grains = self.header.capacity.div_ceil(self.header.grain_size);
        let overhead = self.header.overhead.saturating_mul(SECTOR_SIZE);
        let mut used: Vec<u64> = Vec::new();
        for gt in 0..self.gd.len() as u64 {
            let g = gt * per_gt;
            if g >= grains {
                break;
            }
            let n = per_gt.min(grains - g);
            let list = match self.gt_slice(gt, 0, n) {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => {
                    corrupt.push(format!("{name}: grain table of grains {g}..{}: {e}", g + n));
                    report.check_errors += 1;
                    continue;
                }
            };
            for (k, grain) in list.into_iter().enumerate() {
                let idx = g + k as u64;
                match grain {
                    Grain::Unallocated | Grain::Zero => {}
                    Grain::Plain(o) => {
                        if o < overhead {
                            corrupt.push(format!(
                                "{name}: grain {idx} points into the metadata at offset {o:#x}"
                            ));
                        } else if o.checked_add(gb).is_none_or(|e| e > self.file.len()) {
                            corrupt.push(format!("{name}: grain {idx} at offset {o:#x} extends past the end of the file ({} bytes)", self.file.len()));
                        }
                        used.push(o);
                    }
                    Grain::Compressed(o) => {
                        if o < overhead {
                            corrupt.push(format!(
                                "{name}: grain {idx} points into the metadata at offset {o:#x}"
                            ));
                        } else if self.header.has(FLAG_MARKERS) && read_markers {
                            let mut m = [0u8; GRAIN_MARKER_SIZE];
                            match self.file.read_exact_at(&mut m, o, "grain marker") {
                                Err(_) => corrupt.push(format!("{name}: grain {idx} at offset {o:#x} lies past the end of the file")),
                                Ok(()) => {
                                    let marker = GrainMarker::decode(&m);
                                    let end = o + GRAIN_MARKER_SIZE as u64 + u64::from(marker.size);
                                    if marker.size == 0 {
                                        corrupt.push(format!("{name}: grain {idx} points to a metadata marker at offset {o:#x}"));
                                    } else if end > self.file.len() {
                                        corrupt.push(format!("{name}: compressed grain {idx} at offset {o:#x} extends past the end of the file"));
                                    } else if marker.lba != idx * self.header.grain_size {
                                        corrupt.push(format!("{name}: compressed grain {idx} at offset {o:#x} is marked as sector {} instead of {}", marker.lba, idx * self.header.grain_size));
                                    }
                                }
                            }
                        } else if o >= self.file.len() {
                            corrupt.push(format!("{name}: grain {idx} at offset {o:#x} lies past the end of the file"));
                        }
                        used.push(o);
                    }
                }
            }
        }
        used.sort_unstable();
        let mut i = 0;
        while i < used.len() {
            let mut j = i + 1;
            while used.get(j) == used.get(i) {
                j += 1;
            }
            if j - i > 1 {
                corrupt.push(format!(
                    "{name}: the grain at offset {:#x} is used by {} grain table entries",
                    used[i],
                    j - i
                ));
            }
            i = j;
        }
        let extra = corrupt.len().saturating_sub(MAX_REPORTED);
        corrupt.truncate(MAX_REPORTED);
        if extra > 0 {
            corrupt.push(format!("{name}: ... and {extra} more"));
        }
        report.corruptions.extend(corrupt);
        Ok(())
    }
}
