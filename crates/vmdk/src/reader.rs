//! Reading VMDK images: a monolithic sparse file (embedded descriptor) or a descriptor
//! file naming sparse, flat and zero extents, with an optional parent.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use vconvert_core::{
    overlay_block_map, read_backing, relative_to, BlockMap, CheckReport, Error, ExtentKind, Format,
    ImageFile, ImageInfo, ImageReader, Location, Resolver, Result,
};

use crate::descriptor::{self, Access, Descriptor, CID_NONE};
use crate::grain::Grain;
use crate::header::{COWD_MAGIC, FLAG_COMPRESSED, FLAG_MARKERS, MAGIC};
use crate::sparse::{read_clamped, SparseExtent};
use crate::{MAX_DESCRIPTOR_SIZE, MAX_EXTENTS, SECTOR_SIZE};

/// Bytes qemu reads at [`DESCRIPTOR_SECTOR`] of a sparse extent to find its parent
/// (`parentFileNameHint`), whatever the header's descriptor offset says: 20 sectors,
/// up to the first NUL.
const QEMU_PARENT_TEXT_BYTES: u64 = 20 * SECTOR_SIZE;

/// The sector where a monolithic sparse or streamOptimized file keeps its embedded
/// descriptor (VMware writes it there; qemu reads the parent hint only there).
const DESCRIPTOR_SECTOR: u64 = 1;

/// Findings about where the embedded descriptor of the monolithic sparse file `sparse`
/// is: anywhere but sector 1, or text at sector 1 other than the descriptor the header
/// points at, lets qemu read a different descriptor (and parent) than we do.
fn descriptor_location_findings(
    file: &ImageFile,
    sparse: &SparseExtent,
    descriptor: &Descriptor,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let h = &sparse.header;
    let at = DESCRIPTOR_SECTOR * SECTOR_SIZE;
    if h.descriptor_offset != DESCRIPTOR_SECTOR {
        out.push(format!(
            "{}: the embedded descriptor is at sector {} (header byte 28), not at sector 1 where VMware writes it and qemu reads it (rule: VMDK descriptor location)",
            file.name(),
            h.descriptor_offset
        ));
    }
    // What qemu reads as text at 0x200, up to the first NUL.
    let n = file.len().saturating_sub(at).min(QEMU_PARENT_TEXT_BYTES);
    let mut text = file.read_vec(at, n, QEMU_PARENT_TEXT_BYTES, "embedded descriptor")?;
    if let Some(nul) = text.iter().position(|&b| b == 0) {
        text.truncate(nul);
    }
    let ours = match &sparse.descriptor {
        Some((d, a)) if *a == at => d.len(),
        _ => 0,
    };
    let contains = |needle: &[u8]| {
        text.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if text.len() > ours
        && (contains(b"parentFileNameHint")
            || contains(b"createType")
            || contains(b"DescriptorFile")
            || contains(b"parentCID"))
    {
        out.push(format!(
            "{}: descriptor text at {at:#x} (to byte {:#x}) lies outside the descriptor the header gives ({} sectors at sector {}), where qemu reads a descriptor (rule: VMDK second descriptor)",
            file.name(),
            at + text.len() as u64,
            h.descriptor_size,
            h.descriptor_offset
        ));
    }
    out.extend(parent_hint_finding(file, at, &text, descriptor));
    Ok(out)
}

/// The finding for a `parentFileNameHint` in `text` (what qemu reads at byte `at` to
/// find a parent: 0x200 of a sparse extent, 0 of a descriptor file; qemu searches the
/// text, comments included) other than the parent `descriptor` declares.
fn parent_hint_finding(
    file: &ImageFile,
    at: u64,
    text: &[u8],
    descriptor: &Descriptor,
) -> Option<String> {
    let i = text
        .windows(18)
        .position(|w| w.eq_ignore_ascii_case(b"parentFileNameHint"))?;
    let rest = &text[i..];
    let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = String::from_utf8_lossy(&rest[..line_end.min(200)]).into_owned();
    let value = line[18..].trim_start_matches([' ', '\t', '=', '"']);
    let value = value.split('"').next().unwrap_or_default().trim();
    // A differencing disk's own parent is reported as its backing file.
    if descriptor.has_parent() && descriptor.parent_file_name_hint.as_deref() == Some(value) {
        return None;
    }
    Some(format!(
        "{}: the text at {:#x}, where qemu looks for the disk's parent, says '{}': qemu would open that file as the backing file (rule: VMDK parentFileNameHint)",
        file.name(),
        at + i as u64,
        line.trim()
    ))
}

/// Where an extent's bytes come from.
#[derive(Debug)]
enum Backend {
    /// A hosted sparse extent (also stream-optimized).
    Sparse(Box<SparseExtent>),
    /// Plain bytes at `offset` of `file` (`FLAT`, `VMFS`).
    Flat { file: ImageFile, offset: u64 },
    /// A `ZERO` extent: reads as zeros, stores nothing.
    Zero,
    /// A `NOACCESS` extent: its file is not opened; it reads as zeros.
    NoAccess,
}

/// One extent of the virtual disk.
#[derive(Debug)]
struct Extent {
    /// Guest byte offset of its first byte.
    start: u64,
    /// Guest bytes.
    len: u64,
    backend: Backend,
    /// The extent type as qemu reports it ("" for a monolithic sparse file itself).
    kind: String,
}

impl Extent {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A VMDK image opened for reading.
pub struct VmdkReader {
    file: ImageFile,
    extents: Vec<Extent>,
    virtual_size: u64,
    descriptor: Descriptor,
    create_type: String,
    backing: Option<Box<dyn ImageReader>>,
    findings: Vec<String>,
    warnings: Vec<String>,
}

impl fmt::Debug for VmdkReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmdkReader")
            .field("file", &self.file.name())
            .field("create_type", &self.create_type)
            .field("virtual_size", &self.virtual_size)
            .field("extents", &self.extents.len())
            .field("backing", &self.backing.is_some())
            .finish()
    }
}

impl VmdkReader {
    /// Opens `file`, a sparse extent with an embedded descriptor or a descriptor file.
    /// Extent files and the parent are opened through `resolver`.
    pub fn open(file: ImageFile, resolver: &dyn Resolver) -> Result<Self> {
        let mut magic = [0u8; 4];
        if file.len() >= 4 {
            file.read_exact_at(&mut magic, 0, "VMDK magic")?;
        }
        let mut reader = if magic == MAGIC {
            Self::open_monolithic(file)?
        } else if magic == COWD_MAGIC {
            return Err(Error::unsupported(
                file.name(),
                "unsupported VMDK extent type: ESX Server sparse extent (COWD/VMFSSPARSE)",
            ));
        } else {
            Self::open_descriptor_file(file, resolver)?
        };
        reader.open_parent(resolver)?;
        Ok(reader)
    }

    fn open_monolithic(file: ImageFile) -> Result<Self> {
        let sparse = SparseExtent::open(file.clone(), true)?;
        let mut findings = sparse.findings.clone();
        let warnings = sparse.warnings.clone();
        let descriptor = match &sparse.descriptor {
            Some((text, at)) => descriptor::parse(text)
                .map_err(|e| file.corrupt("embedded descriptor", at + e.offset, e.reason))?,
            None => Descriptor::default(),
        };
        findings.extend(
            descriptor
                .findings
                .iter()
                .map(|f| format!("{}: {f}", file.name())),
        );
        findings.extend(descriptor_location_findings(&file, &sparse, &descriptor)?);
        let capacity = sparse.header.capacity;
        match descriptor.extents.as_slice() {
            [] => findings.push(format!(
                "{}: the embedded descriptor has no extent lines (rule: a sparse extent's descriptor describes the extent)",
                file.name()
            )),
            [e] if e.kind == "SPARSE" => {
                if e.sectors != capacity {
                    findings.push(format!(
                        "{}: the embedded descriptor's extent has {} sectors but the header's capacity is {capacity}",
                        file.name(),
                        e.sectors
                    ));
                }
            }
            list => {
                findings.push(format!(
                "{}: the embedded descriptor lists {} extents ({}); only the file itself is read",
                file.name(),
                list.len(),
                list.iter().map(|e| e.to_line()).collect::<Vec<_>>().join("; ")
            ))
            }
        }
        let stream = sparse.header.has(FLAG_COMPRESSED) && sparse.header.has(FLAG_MARKERS);
        let create_type = descriptor.create_type.clone().unwrap_or_else(|| {
            if stream {
                "streamOptimized"
            } else {
                "monolithicSparse"
            }
            .to_string()
        });
        let expected = if stream {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        if create_type != expected {
            findings.push(format!(
                "{}: createType is '{create_type}' but the file is a single {} sparse extent ({expected})",
                file.name(),
                if stream { "compressed" } else { "hosted" }
            ));
        }
        let len = sparse.capacity_bytes();
        Ok(VmdkReader {
            file,
            extents: vec![Extent {
                start: 0,
                len,
                backend: Backend::Sparse(Box::new(sparse)),
                kind: String::new(),
            }],
            virtual_size: len,
            descriptor,
            create_type,
            backing: None,
            findings,
            warnings,
        })
    }

    fn open_descriptor_file(file: ImageFile, resolver: &dyn Resolver) -> Result<Self> {
        if file.len() > MAX_DESCRIPTOR_SIZE {
            return Err(file.corrupt(
                "descriptor",
                0,
                format!(
                    "not a VMDK sparse extent, and too large ({} bytes) for a descriptor file (limit {MAX_DESCRIPTOR_SIZE})",
                    file.len()
                ),
            ));
        }
        let text = file.read_vec(0, file.len(), MAX_DESCRIPTOR_SIZE, "descriptor")?;
        let descriptor =
            descriptor::parse(&text).map_err(|e| file.corrupt("descriptor", e.offset, e.reason))?;
        if descriptor.extents.is_empty() && !text.starts_with(descriptor::SIGNATURE.as_bytes()) {
            return Err(file.corrupt(
                "descriptor",
                0,
                "not a VMDK image: no sparse extent header and no extent lines in a descriptor",
            ));
        }
        if descriptor.extents.len() > MAX_EXTENTS {
            return Err(file.corrupt(
                "descriptor",
                0,
                format!(
                    "{} extents exceed the limit of {MAX_EXTENTS}",
                    descriptor.extents.len()
                ),
            ));
        }
        let mut findings: Vec<String> = descriptor
            .findings
            .iter()
            .map(|f| format!("{}: {f}", file.name()))
            .collect();
        // qemu reads a descriptor file's parent hint from its first 20 sectors.
        let qemu_text = &text[..text.len().min(QEMU_PARENT_TEXT_BYTES as usize)];
        let qemu_text = &qemu_text[..qemu_text
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(qemu_text.len())];
        findings.extend(parent_hint_finding(&file, 0, qemu_text, &descriptor));
        let create_type = match &descriptor.create_type {
            Some(t) => t.clone(),
            None => {
                findings.push(format!("{}: the descriptor has no createType", file.name()));
                String::new()
            }
        };
        let mut warnings = Vec::new();
        let mut extents = Vec::with_capacity(descriptor.extents.len());
        let mut opened: HashMap<PathBuf, ImageFile> = HashMap::new();
        let mut start = 0u64;
        for (i, line) in descriptor.extents.iter().enumerate() {
            let len = line
                .sectors
                .checked_mul(SECTOR_SIZE)
                .filter(|l| start.checked_add(*l).is_some_and(|e| e <= u64::MAX / 2))
                .ok_or_else(|| {
                    file.corrupt(
                        "descriptor",
                        0,
                        format!("extent {} makes the disk larger than 2^63 bytes", i + 1),
                    )
                })?;
            let name = line.file.clone().unwrap_or_default();
            if line.file.is_some() {
                let p = Path::new(&name);
                if p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
                    findings.push(format!(
                        "{}: extent {} names '{name}', outside the descriptor's directory",
                        file.name(),
                        i + 1
                    ));
                }
            }
            let backend = match (line.kind.as_str(), line.access) {
                ("ZERO", _) => Backend::Zero,
                (_, Access::NoAccess) => {
                    findings.push(format!(
                        "{}: extent {} ('{name}') is NOACCESS and reads as zeros",
                        file.name(),
                        i + 1
                    ));
                    Backend::NoAccess
                }
                ("FLAT" | "VMFS", _) => {
                    let f = open_once(&mut opened, resolver, &file, &name)?;
                    let offset = line
                        .offset
                        .checked_mul(SECTOR_SIZE)
                        .filter(|o| o.checked_add(len).is_some())
                        .ok_or_else(|| {
                            file.corrupt(
                                "descriptor",
                                0,
                                format!("extent {} offset overflows", i + 1),
                            )
                        })?;
                    if f.len() < offset + len {
                        findings.push(format!(
                            "{}: flat extent file is {} bytes, shorter than the {} bytes the descriptor gives it; the rest reads as zeros",
                            f.name(),
                            f.len(),
                            offset + len
                        ));
                    }
                    Backend::Flat { file: f, offset }
                }
                ("SPARSE", _) => {
                    let f = open_once(&mut opened, resolver, &file, &name)?;
                    let sparse = SparseExtent::open(f, false)?;
                    findings.extend(sparse.findings.iter().cloned());
                    warnings.extend(sparse.warnings.iter().cloned());
                    if sparse.header.capacity < line.sectors {
                        return Err(sparse.file.corrupt(
                            "sparse extent header",
                            12,
                            format!(
                                "capacity of {} sectors is smaller than the {} sectors the descriptor gives the extent",
                                sparse.header.capacity, line.sectors
                            ),
                        ));
                    }
                    if sparse.header.capacity > line.sectors {
                        findings.push(format!(
                            "{}: capacity of {} sectors exceeds the {} sectors the descriptor gives the extent",
                            sparse.file.name(),
                            sparse.header.capacity,
                            line.sectors
                        ));
                    }
                    Backend::Sparse(Box::new(sparse))
                }
                (other, _) => {
                    return Err(Error::unsupported(
                        file.name(),
                        format!("unsupported VMDK extent type '{other}' (extent {})", i + 1),
                    ))
                }
            };
            extents.push(Extent {
                start,
                len,
                backend,
                kind: line.kind.clone(),
            });
            start += len;
        }
        if let Some(f) = create_type_finding(&create_type, &descriptor) {
            findings.push(format!("{}: {f}", file.name()));
        }
        Ok(VmdkReader {
            file,
            extents,
            virtual_size: start,
            descriptor,
            create_type,
            backing: None,
            findings,
            warnings,
        })
    }

    /// The grain tables of every sparse extent (qemu-img `check`); `read_markers` also
    /// checks each compressed grain's marker.
    fn check_extents(&self, read_markers: bool) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        for e in &self.extents {
            if let Backend::Sparse(sp) = &e.backend {
                sp.check(&mut report, read_markers)?;
            }
        }
        Ok(report)
    }

    fn open_parent(&mut self, resolver: &dyn Resolver) -> Result<()> {
        if !self.descriptor.has_parent() {
            return Ok(());
        }
        let Some(hint) = self.descriptor.parent_file_name_hint.clone() else {
            self.findings.push(format!(
                "{}: parentCID is set but there is no parentFileNameHint; no parent is read",
                self.file.name()
            ));
            return Ok(());
        };
        let path = relative_to(self.file.path(), &hint);
        let parent = resolver.open_image(&self.file, &path, None)?;
        let parent_cid = parent
            .info()
            .ok()
            .and_then(|i| i.format_specific)
            .and_then(|v| v.pointer("/data/cid").and_then(|c| c.as_u64()));
        if let (Some(pc), Some(want)) = (parent_cid, self.descriptor.parent_cid) {
            if pc != u64::from(want) {
                self.findings.push(format!(
                    "{}: parentCID {want:08x} does not match the parent's CID {pc:08x}: the parent changed after the child was made",
                    self.file.name()
                ));
            }
        }
        self.backing = Some(parent);
        Ok(())
    }

    /// The image's `createType`.
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    /// The parsed descriptor (empty for a sparse extent without one).
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        vconvert_core::check_guest_range(self.file.name(), range, self.virtual_size)
    }

    /// The map of `range` from this image alone (no parent), data locations naming
    /// extent indexes.
    fn raw_map(&self, range: Range<u64>) -> Result<BlockMap> {
        let mut map = BlockMap::new(range.start);
        let mut i = self.extents.partition_point(|e| e.end() <= range.start);
        let mut pos = range.start;
        while pos < range.end {
            let Some(e) = self.extents.get(i) else {
                break;
            };
            let t = range.end.min(e.end());
            let (rs, rt) = (pos - e.start, t - e.start);
            match &e.backend {
                Backend::Zero | Backend::NoAccess => map.push(t - pos, ExtentKind::Zero),
                Backend::Flat { offset, .. } => map.push(
                    t - pos,
                    ExtentKind::Data(Location::File {
                        file: i as u32,
                        offset: offset + rs,
                    }),
                ),
                Backend::Sparse(sp) => sparse_map(&mut map, i as u32, sp, rs, rt)?,
            }
            pos = t;
            i += 1;
        }
        Ok(map)
    }
}

/// Opens extent file `name` of descriptor `file` through `resolver`, once per path
/// (a descriptor naming one file many times costs one open).
fn open_once(
    opened: &mut HashMap<PathBuf, ImageFile>,
    resolver: &dyn Resolver,
    file: &ImageFile,
    name: &str,
) -> Result<ImageFile> {
    let path = relative_to(file.path(), name);
    if let Some(f) = opened.get(&path) {
        return Ok(f.clone());
    }
    let f = resolver.open_file(file, &path)?;
    opened.insert(path, f.clone());
    Ok(f)
}

/// Whether a descriptor file's extents fit its `createType` (an import policy trusts
/// the createType: a "monolithicSparse" descriptor file naming flat extents elsewhere
/// is the classic way to smuggle host files through it).
fn create_type_finding(create_type: &str, d: &Descriptor) -> Option<String> {
    let allowed: &[&str] = match create_type {
        "monolithicSparse" | "streamOptimized" => {
            return Some(format!(
                "createType '{create_type}' is a single sparse file with an embedded descriptor, but this is a descriptor file naming {} extent(s)",
                d.extents.len()
            ))
        }
        "monolithicFlat" | "twoGbMaxExtentFlat" | "vmfs" | "vmfsPreallocated"
        | "vmfsEagerZeroedThick" | "fullDevice" | "partitionedDevice" => &["FLAT", "VMFS", "ZERO"],
        "twoGbMaxExtentSparse" => &["SPARSE", "ZERO"],
        "vmfsSparse" | "vmfsThin" => &["VMFSSPARSE", "SESPARSE", "ZERO"],
        "" => return None,
        other => return Some(format!("createType '{other}' is not a known VMDK type")),
    };
    let odd: Vec<&str> = d
        .extents
        .iter()
        .map(|e| e.kind.as_str())
        .filter(|k| !allowed.contains(k))
        .collect();
    (!odd.is_empty()).then(|| {
        format!(
            "createType '{create_type}' does not allow extents of type {}",
            odd.join(", ")
        )
    })
}

/// Appends the map of extent-relative bytes `rs..rt` of sparse extent number `index`,
/// one grain table at a time (a missing table is one unallocated run).
fn sparse_map(map: &mut BlockMap, index: u32, sp: &SparseExtent, rs: u64, rt: u64) -> Result<()> {
    let gb = sp.grain_bytes();
    let per_gt = sp.per_gt();
    let mut g = rs / gb;
    let last = (rt - 1) / gb;
    while g <= last {
        let gt = g / per_gt;
        let in_gt = g % per_gt;
        let n = (per_gt - in_gt).min(last - g + 1);
        match sp.gt_slice(gt, in_gt, n)? {
            None => {
                let a = rs.max(g * gb);
                let b = rt.min((g + n) * gb);
                map.push(b - a, ExtentKind::Unallocated);
            }
            Some(list) => {
                for (k, grain) in list.into_iter().enumerate() {
                    let gs = (g + k as u64) * gb;
                    let a = rs.max(gs);
                    let b = rt.min(gs + gb);
                    let kind = match grain {
                        Grain::Unallocated => ExtentKind::Unallocated,
                        Grain::Zero => ExtentKind::Zero,
                        Grain::Plain(o) => ExtentKind::Data(Location::File {
                            file: index,
                            offset: o + (a - gs),
                        }),
                        Grain::Compressed(o) => ExtentKind::Data(Location::Compressed {
                            file: index,
                            offset: o,
                        }),
                    };
                    map.push(b - a, kind);
                }
            }
        }
        g += n;
    }
    Ok(())
}

impl ImageReader for VmdkReader {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn block_map(&self, range: Range<u64>) -> Result<BlockMap> {
        self.check_range(&range)?;
        let map = self.raw_map(range)?;
        match &self.backing {
            Some(b) => overlay_block_map(&map, b.as_ref()),
            None => Ok(map),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("read range overflows"))?;
        self.check_range(&(offset..end))?;
        let map = self.raw_map(offset..end)?;
        let mut grain_buf: Vec<u8> = Vec::new();
        for e in map.extents() {
            let rel = (e.start - offset) as usize..(e.end() - offset) as usize;
            let Some(out) = buf.get_mut(rel) else {
                return Err(Error::invalid("block map outside the read range"));
            };
            match e.kind {
                ExtentKind::Zero => out.fill(0),
                ExtentKind::Unallocated => match &self.backing {
                    Some(b) => read_backing(b.as_ref(), out, e.start)?,
                    None => out.fill(0),
                },
                ExtentKind::Data(Location::File { file, offset: at }) => {
                    match self.extents.get(file as usize).map(|x| &x.backend) {
                        Some(Backend::Flat { file, .. }) => {
                            read_clamped(file, out, at, "flat extent")?
                        }
                        Some(Backend::Sparse(sp)) => sp.read_plain(out, at)?,
                        _ => return Err(Error::invalid("block map names a data-less extent")),
                    }
                }
                ExtentKind::Data(Location::Compressed { file, offset: at }) => {
                    let Some(x) = self.extents.get(file as usize) else {
                        return Err(Error::invalid("block map names a missing extent"));
                    };
                    let Backend::Sparse(sp) = &x.backend else {
                        return Err(Error::invalid("compressed data outside a sparse extent"));
                    };
                    let gb = sp.grain_bytes();
                    let rel = e.start - x.start;
                    let grain_start = rel / gb * gb;
                    grain_buf.resize(gb as usize, 0);
                    sp.read_compressed(at, grain_start, &mut grain_buf)?;
                    let s = (rel - grain_start) as usize;
                    let src = grain_buf
                        .get(s..s + out.len())
                        .ok_or_else(|| Error::invalid("compressed extent crosses a grain"))?;
                    out.copy_from_slice(src);
                }
                ExtentKind::Data(Location::Opaque) => {
                    return Err(Error::invalid("opaque data in a VMDK map"))
                }
            }
        }
        Ok(())
    }

    /// QEMU's vmdk driver: grains with data at their offset (flat extents' data over
    /// holes of their file reads as zeros), compressed grains without one, zero grains;
    /// unallocated grains show the parent.
    fn layer_status(&self, range: Range<u64>) -> Result<Vec<vconvert_core::LayerStatus>> {
        self.check_range(&range)?;
        let mut out = vconvert_core::status_of_map(&self.raw_map(range)?);
        for s in &mut out {
            if let Some((i, _)) = s.offset {
                s.recurse = matches!(
                    self.extents.get(i as usize).map(|e| &e.backend),
                    Some(Backend::Flat { .. })
                );
            }
        }
        Ok(out)
    }

    fn backing(&self) -> Option<&dyn ImageReader> {
        self.backing.as_deref()
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(Format::Vmdk, self.virtual_size);
        let mut actual = self.file.allocated_bytes();
        let mut extents = Vec::new();
        let mut grain_sizes = Vec::new();
        for e in &self.extents {
            let mut o = serde_json::Map::new();
            let filename = match &e.backend {
                Backend::Sparse(sp) => {
                    if sp.compressed() {
                        o.insert("compressed".into(), true.into());
                    }
                    grain_sizes.push(Some(sp.grain_bytes()));
                    Some(sp.file.name().to_string())
                }
                Backend::Flat { file, .. } => {
                    grain_sizes.push(None);
                    Some(file.name().to_string())
                }
                Backend::Zero | Backend::NoAccess => {
                    grain_sizes.push(None);
                    None
                }
            };
            let file = match &e.backend {
                Backend::Sparse(sp) => Some(&sp.file),
                Backend::Flat { file, .. } => Some(file),
                _ => None,
            };
            // Files other than the image file itself add to the actual size.
            if let Some(f) = file.filter(|f| f.path() != self.file.path()) {
                actual = match (actual, f.allocated_bytes()) {
                    (Some(a), Some(b)) => Some(a + b),
                    _ => None,
                };
            }
            o.insert("virtual-size".into(), e.len.into());
            if let Some(f) = filename {
                o.insert("filename".into(), f.into());
            }
            if let Backend::Sparse(sp) = &e.backend {
                o.insert("cluster-size".into(), sp.grain_bytes().into());
            }
            o.insert("format".into(), e.kind.clone().into());
            extents.push(serde_json::Value::Object(o));
        }
        info.actual_size = actual;
        info.cluster_size = match grain_sizes.first() {
            Some(Some(g)) if grain_sizes.iter().all(|s| *s == Some(*g)) => Some(*g),
            _ => None,
        };
        info.backing_file = self
            .descriptor
            .parent_file_name_hint
            .clone()
            .filter(|_| self.descriptor.has_parent());
        info.full_backing_file = info
            .backing_file
            .as_ref()
            .map(|b| relative_to(self.file.path(), b).display().to_string());
        info.format_specific = Some(serde_json::json!({
            "type": "vmdk",
            "data": {
                "cid": self.descriptor.cid.unwrap_or(0),
                "parent-cid": self.descriptor.parent_cid.unwrap_or(CID_NONE),
                "create-type": self.create_type,
                "extents": extents,
            }
        }));
        Ok(info)
    }

    fn host_file(&self, index: u32) -> Option<&ImageFile> {
        match self.extents.get(index as usize).map(|e| &e.backend) {
            Some(Backend::Flat { file, .. }) => Some(file),
            Some(Backend::Sparse(sp)) => Some(&sp.file),
            _ => None,
        }
    }

    fn safety_findings(&self) -> Vec<String> {
        self.findings.clone()
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn check(&self) -> Option<Result<CheckReport>> {
        Some(self.check_extents(true))
    }

    fn check_metadata(&self) -> Option<Result<CheckReport>> {
        Some(self.check_extents(false))
    }
}
