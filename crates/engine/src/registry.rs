//! Which crate reads and writes which format, and format probing.

use std::path::{Path, PathBuf};

use vconvert_core::{
    CreateParams, Error, Format, ImageFile, ImageReader, ImageWriter, Options, Output, Resolver,
    Result,
};
use vconvert_qcow2::{
    repair_leaks as qcow2_repair_leaks, Qcow2OpenOptions, Qcow2Reader, Qcow2Writer,
};
use vconvert_raw::{RawReader, RawWriter};
use vconvert_vdi::{VdiReader, VdiWriter};
use vconvert_vhdx::{VhdxReader, VhdxWriter};
use vconvert_vmdk::{VmdkReader, VmdkWriter};
use vconvert_vpc::{VpcReader, VpcWriter};

/// How deep a chain of backing images may be.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// How images are opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Allow the image to make us open other files (backing files, extent files, data
    /// files). The CLI allows it like qemu-img; an import service must not.
    pub allow_external_files: bool,
    /// Read images marked corrupt (a qcow2 corrupt bit), as qemu-img's `-U`-style
    /// override; refused by default.
    pub allow_corrupt: bool,
    /// Read this internal snapshot of the image (qcow2; qemu-img convert's `-l`).
    /// Backing images are always read in their current state.
    pub snapshot: Option<String>,
}

/// The engine's [`Resolver`]: applies [`OpenOptions`], limits chain depth to
/// [`MAX_CHAIN_DEPTH`] and refuses loops.
#[derive(Debug)]
struct ChainResolver {
    options: OpenOptions,
    /// Canonical paths of the images above (the referrers), outermost first.
    chain: Vec<PathBuf>,
}

impl ChainResolver {
    fn refuse(&self, referrer: &ImageFile, what: &str, path: &Path) -> Error {
        Error::Refused {
            file: referrer.name().to_string(),
            reason: format!(
                "it refers to {what} '{}'; opening other files is not allowed here",
                path.display()
            ),
        }
    }
}

impl Resolver for ChainResolver {
    fn open_image(
        &self,
        referrer: &ImageFile,
        path: &Path,
        format: Option<Format>,
    ) -> Result<Box<dyn ImageReader>> {
        if !self.options.allow_external_files {
            return Err(self.refuse(referrer, "backing image", path));
        }
        let canon = std::fs::canonicalize(path).map_err(|e| {
            Error::io(
                referrer.name(),
                format!("cannot open backing image '{}'", path.display()),
                e,
            )
        })?;
        if self.chain.contains(&canon) {
            return Err(Error::corrupt(
                referrer.name(),
                "backing chain",
                0,
                format!("loop: '{}' is already in the chain", path.display()),
            ));
        }
        if self.chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::corrupt(
                referrer.name(),
                "backing chain",
                0,
                format!("chain is deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        let mut chain = self.chain.clone();
        chain.push(canon);
        let inner = ChainResolver {
            options: OpenOptions {
                snapshot: None,
                ..self.options.clone()
            },
            chain,
        };
        open_with(ImageFile::open(path)?, format, &inner.options, &inner)
    }

    fn open_file(&self, referrer: &ImageFile, path: &Path) -> Result<ImageFile> {
        if !self.options.allow_external_files {
            return Err(self.refuse(referrer, "file", path));
        }
        ImageFile::open(path)
    }
}

/// Guesses the format of `file` from its magic numbers; anything unrecognised is raw.
pub fn probe(file: &ImageFile) -> Result<Format> {
    let mut head = vec![0u8; file.len().min(512) as usize];
    file.read_exact_at(&mut head, 0, "image header")?;
    if head.starts_with(b"QFI\xfb") {
        return Ok(Format::Qcow2);
    }
    if head.len() >= 0x44 && head[0x40..0x44] == 0xbeda_107fu32.to_le_bytes() {
        return Ok(Format::Vdi);
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"COWD") {
        return Ok(Format::Vmdk);
    }
    if head.starts_with(b"conectix") {
        return Ok(Format::Vpc);
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    // A fixed VHD has its footer only at the end (qemu's probe misses it; ours does not):
    // 512 bytes, or 511 from Virtual PC before 2004.
    for footer in [512u64, 511] {
        if file.len() >= 512 + footer && file.len() % 512 == footer % 512 {
            let mut foot = [0u8; 8];
            file.read_exact_at(&mut foot, file.len() - footer, "VHD footer")?;
            if &foot == b"conectix" {
                return Ok(Format::Vpc);
            }
        }
    }
    if is_vmdk_descriptor(file)? {
        return Ok(Format::Vmdk);
    }
    Ok(Format::Raw)
}

/// Bytes of a file searched for the start of a VMDK descriptor.
const DESCRIPTOR_PROBE_BYTES: u64 = 4096;

/// True when `file` starts like a VMDK descriptor file: comment and blank lines, then
/// either a `# Disk DescriptorFile` comment among them or a `version=` line first (as
/// qemu's probe takes it). Producers put comments before the signature line.
fn is_vmdk_descriptor(file: &ImageFile) -> Result<bool> {
    let n = file.len().min(DESCRIPTOR_PROBE_BYTES);
    let head = file.read_vec(0, n, DESCRIPTOR_PROBE_BYTES, "descriptor")?;
    let head = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&head);
    // Only whole lines count (the last one may be cut by the probe's window).
    let complete_lines = match head.iter().rposition(|&b| b == b'\n') {
        _ if n == file.len() => head,
        Some(i) => &head[..i],
        None => return Ok(false),
    };
    for line in complete_lines.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if line.starts_with(b"#") {
            let rest = line[1..].trim_ascii();
            if rest.eq_ignore_ascii_case(b"Disk DescriptorFile") {
                return Ok(true);
            }
            if !rest
                .iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
            {
                return Ok(false);
            }
            continue;
        }
        let Some(v) = line.strip_prefix(b"version") else {
            return Ok(false);
        };
        let v = v.trim_ascii_start();
        return Ok(
            v.starts_with(b"=") && matches!(v[1..].trim_ascii().first(), Some(b'1' | b'2' | b'3'))
        );
    }
    Ok(false)
}

/// Opens the image at `path` as `format`, or as what [`probe`] finds.
pub fn open(
    path: &Path,
    format: Option<Format>,
    options: &OpenOptions,
) -> Result<Box<dyn ImageReader>> {
    open_file(ImageFile::open(path)?, format, options)
}

/// Opens an already opened (or in-memory) image file.
pub fn open_file(
    file: ImageFile,
    format: Option<Format>,
    options: &OpenOptions,
) -> Result<Box<dyn ImageReader>> {
    let chain = std::fs::canonicalize(file.path()).into_iter().collect();
    let resolver = ChainResolver {
        options: options.clone(),
        chain,
    };
    open_with(file, format, options, &resolver)
}

/// Opens `file` with its format's reader; references go through `resolver`.
fn open_with(
    file: ImageFile,
    format: Option<Format>,
    options: &OpenOptions,
    resolver: &dyn Resolver,
) -> Result<Box<dyn ImageReader>> {
    let format = match format {
        Some(f) => f,
        None => probe(&file)?,
    };
    match format {
        Format::Raw => Ok(Box::new(RawReader::new(file))),
        Format::Qcow2 => Ok(Box::new(Qcow2Reader::open(
            file,
            resolver,
            Qcow2OpenOptions {
                allow_corrupt: options.allow_corrupt,
                snapshot: options.snapshot.clone(),
            },
        )?)),
        Format::Vdi => Ok(Box::new(VdiReader::open(file)?)),
        Format::Vpc => Ok(Box::new(VpcReader::open(file, resolver)?)),
        Format::Vmdk => Ok(Box::new(VmdkReader::open(file, resolver)?)),
        Format::Vhdx => Ok(Box::new(VhdxReader::open(file, resolver)?)),
    }
}

/// Repairs leaked clusters of the qcow2 image at `path` (qemu-img `check -r leaks`):
/// their refcounts are lowered to their references. Returns the number fixed.
pub fn repair_leaks(path: &Path, format: Option<Format>) -> Result<u64> {
    let file = ImageFile::open(path)?;
    let format = match format {
        Some(f) => f,
        None => probe(&file)?,
    };
    if format != Format::Qcow2 {
        return Err(Error::unsupported(
            file.name(),
            format!("repairing {format} images (only qcow2 leaks are repaired)"),
        ));
    }
    let options = OpenOptions {
        allow_external_files: true,
        allow_corrupt: true,
        snapshot: None,
    };
    let resolver = ChainResolver {
        options: options.clone(),
        chain: std::fs::canonicalize(path).into_iter().collect(),
    };
    let reader = Qcow2Reader::open(
        file,
        &resolver,
        Qcow2OpenOptions {
            allow_corrupt: true,
            snapshot: None,
        },
    )?;
    let rw = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path.display().to_string(), "cannot open for repair", e))?;
    qcow2_repair_leaks(&reader, &rw)
}

/// Opens the qcow2 image at `path` for an in-place update: its reader (backing images
/// opened like qemu-img's, corrupt images refused) and the file opened for writing.
pub(crate) fn open_qcow2_rw(path: &Path) -> Result<(Qcow2Reader, std::fs::File)> {
    let options = OpenOptions {
        allow_external_files: true,
        allow_corrupt: false,
        snapshot: None,
    };
    let resolver = ChainResolver {
        options,
        chain: std::fs::canonicalize(path).into_iter().collect(),
    };
    let reader = Qcow2Reader::open(
        ImageFile::open(path)?,
        &resolver,
        Qcow2OpenOptions::default(),
    )?;
    // Writes in place follow the image's tables and refcounts: they must be exact (an
    // L2 entry naming the header or a refcount too low would have us overwrite what
    // is in use). Images marked dirty or corrupt are refused by each command.
    let h = reader.header();
    if h.incompatible_features
        & (vconvert_qcow2::incompatible::DIRTY | vconvert_qcow2::incompatible::CORRUPT)
        == 0
    {
        let report = vconvert_qcow2::check(&reader)?;
        if let Some(first) = report.corruptions.first() {
            return Err(Error::Refused {
                file: path.display().to_string(),
                reason: format!(
                    "{} corruption(s) in its metadata ({first}): repair it first (check -r all)",
                    report.corruptions.len()
                ),
            });
        }
        if report.check_errors > 0 {
            return Err(Error::Refused {
                file: path.display().to_string(),
                reason:
                    "its metadata could not be checked completely: repair it first (check -r all)"
                        .into(),
            });
        }
    }
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path.display().to_string(), "cannot open for writing", e))?;
    Ok((reader, rw))
}

/// Something to do with a freshly created writer of any format.
pub(crate) trait WriterJob {
    fn run<W: ImageWriter>(self, writer: W) -> Result<()>;
}

/// Creates the writer for `format` in `output` and hands it to `job`.
pub(crate) fn with_writer<J: WriterJob>(
    format: Format,
    output: &mut Output,
    params: &CreateParams,
    options: Options,
    job: J,
) -> Result<()> {
    match format {
        Format::Raw => job.run(RawWriter::create(output, params, options)?),
        Format::Qcow2 => job.run(Qcow2Writer::create(output, params, options)?),
        Format::Vdi => job.run(VdiWriter::create(output, params, options)?),
        Format::Vpc => job.run(VpcWriter::create(output, params, options)?),
        Format::Vmdk => {
            let (options, parent) = crate::backing::vmdk_parent(output.target(), options)?;
            job.run(VmdkWriter::create_over(output, params, options, parent)?)
        }
        Format::Vhdx => job.run(VhdxWriter::create(output, params, options)?),
    }
}

struct FinishOnly;

impl WriterJob for FinishOnly {
    fn run<W: ImageWriter>(self, writer: W) -> Result<()> {
        writer.finish()
    }
}

/// Creates an empty image of `size` bytes at `path` (qemu-img `create`), with stored
/// identifiers from `identity_seed` (random when `None`).
pub fn create(
    path: &Path,
    format: Format,
    size: u64,
    options: Options,
    identity_seed: Option<u64>,
) -> Result<()> {
    let mut output = Output::new(path, false);
    let params = CreateParams {
        virtual_size: size,
        existing: false,
        target_is_zero: true,
        compress: false,
        identity_seed,
    };
    with_writer(format, &mut output, &params, options, FinishOnly)?;
    output.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_magic_numbers() {
        let mut q = b"QFI\xfb".to_vec();
        q.resize(1024, 0);
        let probe_bytes = |b: Vec<u8>| probe(&ImageFile::from_bytes("x", b)).unwrap();
        assert_eq!(probe_bytes(q), Format::Qcow2);
        let mut v = vec![0u8; 512];
        v[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe_bytes(v), Format::Vdi);
        assert_eq!(probe_bytes(b"KDMV\x01\0\0\0".to_vec()), Format::Vmdk);
        assert_eq!(
            probe_bytes(b"# Disk DescriptorFile\n".to_vec()),
            Format::Vmdk
        );
        let mut fixed = vec![0u8; 4096];
        fixed[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(probe_bytes(fixed), Format::Vpc);
        let mut x = b"vhdxfile".to_vec();
        x.resize(2048, 0);
        assert_eq!(probe_bytes(x), Format::Vhdx);
        let mut old = vec![0u8; 4096 + 511];
        old[4096..4104].copy_from_slice(b"conectix");
        assert_eq!(probe_bytes(old), Format::Vpc, "511-byte footer");
        assert_eq!(
            probe_bytes(b"# Written by a tool\n\n#\n# Disk DescriptorFile\nversion=1\n".to_vec()),
            Format::Vmdk
        );
        assert_eq!(
            probe_bytes(b"# a comment\r\n\r\nversion=1\r\nRW 8 ZERO\r\n".to_vec()),
            Format::Vmdk
        );
        assert_eq!(probe_bytes(b"# a comment\nhello\n".to_vec()), Format::Raw);
        assert_eq!(probe_bytes(b"version=9\n".to_vec()), Format::Raw);
        assert_eq!(probe_bytes(vec![0u8; 10]), Format::Raw);
        assert_eq!(probe_bytes(Vec::new()), Format::Raw);
    }
}
