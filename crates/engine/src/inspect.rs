//! The safety inspector: what an image is, what it refers to, and whether it is safe to
//! convert under a policy. An import service runs it on every upload before converting.
//!
//! It reads headers and tables only (through the format readers, with references
//! refused under the untrusted policy), never the guest data.
//!
//! Under [`Policy::untrusted`] it refuses every class OpenStack's format inspector
//! (oslo.utils `imageutils.format_inspector`), Glance's image conversion and Nova's
//! `images.py` refuse, each violation naming its rule: a declared format the content is
//! not (ISO 9660 / UDF content must be declared `iso`), content that matches two
//! formats, formats vconvert does not convert, references to other files, MBR and
//! protective-MBR tables that break oslo's rules, the format readers' findings (VMDK
//! descriptor location, footers and markers, checksums, corrupt bits) and corrupt
//! metadata found by the format's consistency check.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use vconvert_core::{Error, Format, ImageFile, Result};

use crate::registry::{open_file, probe, OpenOptions};

/// What is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The image may refer to other files (backing files, extents, data files).
    pub allow_external_files: bool,
    /// Largest virtual size accepted, in bytes.
    pub max_virtual_size: u64,
    /// VMDK `createType`s accepted (Glance's `vmdk_allowed_types`).
    pub vmdk_allowed_types: Vec<String>,
    /// Format-specific findings (corrupt bits, checksum mismatches, …) and MBR /
    /// protective-MBR rule breaks are violations.
    pub findings_are_violations: bool,
    /// Run the format's metadata consistency check (qcow2 refcounts and metadata
    /// overlaps, VMDK grain tables, VDI block map) and refuse corruption (leaks are
    /// fine). Reads metadata only.
    pub check_metadata: bool,
}

impl Policy {
    /// For images from strangers: no references, 64 TiB at most, streamOptimized and
    /// monolithicSparse VMDKs only, every finding a violation.
    pub fn untrusted() -> Self {
        Policy {
            allow_external_files: false,
            max_virtual_size: 64 << 40,
            vmdk_allowed_types: vec!["streamOptimized".into(), "monolithicSparse".into()],
            findings_are_violations: true,
            check_metadata: true,
        }
    }

    /// For the operator's own images: like qemu-img, references are followed.
    pub fn trusted() -> Self {
        Policy {
            allow_external_files: true,
            max_virtual_size: u64::MAX,
            vmdk_allowed_types: Vec::new(),
            findings_are_violations: false,
            check_metadata: false,
        }
    }
}

/// What the inspector found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The format the content probes as.
    pub format: Format,
    /// Every signature the content matches (ours and others', e.g. "iso", "gpt").
    pub signatures: Vec<&'static str>,
    /// Virtual size, when the image could be opened.
    pub virtual_size: Option<u64>,
    /// Bytes the file occupies.
    pub actual_size: u64,
    /// Names of other files the image refers to, as far as they are known.
    pub references: Vec<String>,
    /// Why the image must not be converted under the policy (empty: it may).
    pub violations: Vec<String>,
    /// Things worth a warning that do not make the image unsafe (e.g. a VMDK whose
    /// `uncleanShutdown` flag is set).
    pub warnings: Vec<String>,
}

/// What an uploader declares an image to be: a format vconvert reads, or an ISO 9660 /
/// UDF optical disc image (Glance's `disk_format: iso`), which is not converted: it is
/// kept as uploaded and boots as a CD-ROM. The inspector accepts `Iso` only for content
/// with an ISO 9660 or UDF volume descriptor that matches no other format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeclaredFormat {
    /// One of the formats vconvert converts.
    Image(Format),
    /// An ISO 9660 or UDF image, kept as it is.
    Iso,
}

impl From<Format> for DeclaredFormat {
    fn from(f: Format) -> Self {
        DeclaredFormat::Image(f)
    }
}

impl fmt::Display for DeclaredFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeclaredFormat::Image(format) => format.fmt(f),
            DeclaredFormat::Iso => f.write_str("iso"),
        }
    }
}

impl FromStr for DeclaredFormat {
    type Err = Error;

    /// qemu-img's format names, `iso`, and Glance's `vhd` for vpc.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "iso" => Ok(DeclaredFormat::Iso),
            "vhd" => Ok(DeclaredFormat::Image(Format::Vpc)),
            other => other.parse().map(DeclaredFormat::Image),
        }
    }
}

impl Report {
    /// An error listing the violations, or `Ok` when there are none.
    pub fn ensure_safe(&self, file: &str) -> Result<()> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(Error::Refused {
                file: file.to_string(),
                reason: self.violations.join("; "),
            })
        }
    }
}

/// Byte offsets of the volume descriptors at sectors 16, 17 and 18 of 2048 bytes (ECMA-119
/// section 6.2.1: the system area is the first 16 sectors; ECMA-167 2/8.3: the volume
/// recognition sequence starts there). The standard identifier is at byte 1 of each.
const ISO_DESCRIPTOR_OFFSETS: [u64; 3] = [0x8000, 0x8800, 0x9000];
/// Standard identifiers of an ISO 9660 volume descriptor (`CD001`) and a UDF (ECMA-167)
/// volume structure (`NSR02`, `NSR03`), as oslo's ISO inspector matches them.
const ISO_IDENTIFIERS: [&[u8; 5]; 3] = [b"CD001", b"NSR02", b"NSR03"];

/// Offset of the MBR boot signature `55 AA` (a two-byte little-endian 0xAA55).
const MBR_SIGNATURE_AT: usize = 510;
/// Offset of the first of the four 16-byte MBR partition table entries.
const MBR_PTE_START: usize = 446;
/// MBR partition type of a GPT protective partition (UEFI 2.10 section 5.2.3).
const MBR_TYPE_PROTECTIVE: u8 = 0xEE;
/// FAT boot sector (a filesystem without a partition table, not an MBR, as oslo tells
/// them apart): offset of the number of FATs, which is 2.
const FAT_NUM_FATS_AT: usize = 0x10;
/// FAT boot sector: offset of the media descriptor.
const FAT_MEDIA_AT: usize = 0x15;
/// FAT media descriptor of a fixed disk.
const FAT_MEDIA_FIXED_DISK: u8 = 0xF8;

/// True when `head` (the first 512 bytes or more) carries an MBR boot signature and is
/// not a FAT boot sector.
fn has_mbr(head: &[u8]) -> bool {
    let signed = head.get(MBR_SIGNATURE_AT..MBR_SIGNATURE_AT + 2) == Some(&[0x55, 0xaa]);
    let fat = head.get(FAT_NUM_FATS_AT) == Some(&2)
        && head.get(FAT_MEDIA_AT) == Some(&FAT_MEDIA_FIXED_DISK);
    signed && !fat
}

/// oslo's MBR / protective-MBR rules, fatal as Glance makes them: every entry's boot
/// flag is 0x00 or 0x80; at least one partition is defined; a protective (0xEE) entry
/// starts at CHS 0/0/2 and LBA 1 and is the only entry. A GPT header at LBA 1 needs
/// the protective MBR's boot signature (UEFI 2.10 section 5.2.3).
fn partition_violations(head: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if !has_mbr(head) {
        if head.get(512..520) == Some(b"EFI PART") {
            out.push(
                "a GPT header at LBA 1 but no MBR boot signature 0x55AA at byte 510 (rule: protective MBR shape)"
                    .to_string(),
            );
        }
        return out;
    }
    let mut defined = Vec::new();
    let mut protective = false;
    for i in 0..4 {
        let at = MBR_PTE_START + 16 * i;
        let Some(pte) = head.get(at..at + 16) else {
            break;
        };
        let boot = pte[0];
        if boot != 0x00 && boot != 0x80 {
            out.push(format!(
                "MBR partition entry {i} (byte {at}) has boot flag {boot:#04x}, not 0x00 or 0x80 (rule: MBR partition entries)"
            ));
        }
        let kind = pte[4];
        if kind != 0 {
            defined.push(i);
        }
        if kind == MBR_TYPE_PROTECTIVE {
            protective = true;
            if pte[1..4] != [0x00, 0x02, 0x00] {
                out.push(format!(
                    "protective MBR entry {i} starts at CHS bytes {:02x?}, not [00, 02, 00] (rule: protective MBR shape)",
                    &pte[1..4]
                ));
            }
            let lba = u32::from_le_bytes([pte[8], pte[9], pte[10], pte[11]]);
            if lba != 1 {
                out.push(format!(
                    "protective MBR entry {i} starts at LBA {lba}, not 1 (rule: protective MBR shape)"
                ));
            }
        }
    }
    if protective && defined != [0] {
        out.push(format!(
            "the protective MBR defines partition entries {defined:?}; only entry 0 may be defined (rule: protective MBR shape)"
        ));
    }
    if defined.is_empty() {
        out.push(
            "the MBR boot signature 0x55AA is set but no partition is defined (rule: MBR partition entries)"
                .to_string(),
        );
    }
    out
}

/// Signatures of formats vconvert does not convert but must recognise, so a file cannot
/// pass as raw (or as two formats at once).
fn foreign_signatures(file: &ImageFile, head: &[u8]) -> Result<Vec<&'static str>> {
    let mut found = Vec::new();
    if head.starts_with(b"LUKS\xba\xbe") {
        found.push("luks");
    }
    if head.starts_with(b"QED\0") {
        found.push("qed");
    }
    if head.starts_with(b"QFI\xfb") && head.get(4..8) == Some(&[0, 0, 0, 1]) {
        found.push("qcow");
    }
    // Formats qemu probes that no OpenStack inspector knows: content declared raw that
    // qemu would open as one of them is refused too.
    if head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt") {
        found.push("parallels");
    }
    if head.starts_with(b"Bochs Virtual HD Image") {
        found.push("bochs");
    }
    if head.starts_with(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop") {
        found.push("cloop");
    }
    if has_mbr(head) {
        found.push("mbr");
    }
    if head.get(512..520) == Some(b"EFI PART") {
        found.push("gpt");
    }
    for off in ISO_DESCRIPTOR_OFFSETS {
        if file.len() >= off + 6 {
            let mut b = [0u8; 5];
            file.read_exact_at(&mut b, off + 1, "ISO 9660 / UDF volume descriptor")?;
            if ISO_IDENTIFIERS.contains(&&b) {
                found.push("iso");
                break;
            }
        }
    }
    Ok(found)
}

/// Inspects `path`, declared by the uploader as `declared` (if at all), under `policy`.
///
/// Errors are only for files that cannot be read at all; everything wrong with the
/// content is a violation in the report.
pub fn inspect(path: &Path, declared: Option<Format>, policy: &Policy) -> Result<Report> {
    inspect_as(path, declared.map(DeclaredFormat::from), policy)
}

/// [`inspect`] with a declared format that may also be [`DeclaredFormat::Iso`].
pub fn inspect_as(
    path: &Path,
    declared: Option<DeclaredFormat>,
    policy: &Policy,
) -> Result<Report> {
    let file = ImageFile::open(path)?;
    inspect_file_as(file, declared, policy)
}

/// [`inspect`] of an already opened (or in-memory) file.
pub fn inspect_file(file: ImageFile, declared: Option<Format>, policy: &Policy) -> Result<Report> {
    inspect_file_as(file, declared.map(DeclaredFormat::from), policy)
}

/// How many corruption sentences of a metadata check go into a violation.
const MAX_CHECK_SENTENCES: usize = 5;

/// Names of the formats vconvert recognises but does not convert, and why, as the
/// refusal says it (where OpenStack accepts the format, vconvert is stricter).
fn foreign_refusal(name: &str) -> String {
    let why = match name {
        "luks" => "vconvert does not convert encrypted images (stricter than oslo.utils, which inspects LUKSv1)",
        "qed" => "vconvert does not convert (oslo.utils refuses QED too)",
        "qcow" => "vconvert does not convert (qcow version 1; oslo.utils refuses it too)",
        _ => "vconvert does not convert",
    };
    format!("the content is a {name} image, which {why}")
}

/// [`inspect_as`] of an already opened (or in-memory) file.
pub fn inspect_file_as(
    file: ImageFile,
    declared: Option<DeclaredFormat>,
    policy: &Policy,
) -> Result<Report> {
    let mut head = vec![0u8; file.len().min(4096) as usize];
    file.read_exact_at(&mut head, 0, "image header")?;
    let format = probe(&file)?;
    let foreign = foreign_signatures(&file, &head)?;
    let mut signatures: Vec<&'static str> = Vec::new();
    if format != Format::Raw {
        signatures.push(format.name());
    }
    signatures.extend(&foreign);
    let mut violations = Vec::new();
    let iso = foreign.contains(&"iso");

    match declared {
        Some(DeclaredFormat::Iso) if !iso => violations.push(format!(
            "declared format iso does not match the content, which is {format}: no ISO 9660 or UDF volume descriptor at sector 16, 17 or 18"
        )),
        Some(DeclaredFormat::Iso) => {}
        Some(DeclaredFormat::Image(Format::Raw)) if iso && format == Format::Raw => {
            violations.push(
                "declared format raw does not match the content, which is an ISO 9660 / UDF image: declare it as iso (rule: ISO content declared raw, as Glance and Nova refuse it)"
                    .to_string(),
            )
        }
        Some(DeclaredFormat::Image(d)) if d != format => violations.push(format!(
            "declared format {d} does not match the content, which is {format}"
        )),
        _ => {}
    }
    // A fixed VHD's guest disk starts at byte 0, so the guest's partition table is
    // there; every other format's first sector is its own header.
    let guest_at_start =
        format == Format::Raw || (format == Format::Vpc && !head.starts_with(b"conectix"));
    for f in &foreign {
        match *f {
            // A raw disk may hold a partition table or be an ISO (an isohybrid ISO also
            // has an MBR); another format may not.
            "gpt" | "mbr" | "iso" if format == Format::Raw => {}
            "gpt" | "mbr" if guest_at_start => {}
            "gpt" | "mbr" | "iso" => violations.push(format!(
                "the content is both {format} and {f}: a file that matches two formats is refused"
            )),
            other => violations.push(foreign_refusal(other)),
        }
    }
    // oslo's MBR rules apply to a disk taken as raw; an ISO's MBR (isohybrid) is only
    // boot code for USB sticks, and Nova takes iso + gpt as iso.
    if policy.findings_are_violations && format == Format::Raw && !iso {
        violations.extend(partition_violations(&head));
    }

    let options = OpenOptions {
        allow_external_files: policy.allow_external_files,
        // A corrupt bit is reported as a finding, not an open error.
        allow_corrupt: true,
        snapshot: None,
    };
    let actual_size = file.allocated_bytes().unwrap_or(0);
    let name = file.name().to_string();
    let mut references = Vec::new();
    let mut virtual_size = None;
    let mut warnings = Vec::new();
    let open_as = match declared {
        Some(DeclaredFormat::Image(f)) => f,
        // An ISO is read as the bytes it is.
        Some(DeclaredFormat::Iso) => Format::Raw,
        None => format,
    };
    match open_file(file, Some(open_as), &options) {
        Ok(img) => {
            let size = img.virtual_size();
            virtual_size = Some(size);
            if size > policy.max_virtual_size {
                violations.push(format!(
                    "virtual size {size} exceeds the limit of {} bytes",
                    policy.max_virtual_size
                ));
            }
            let info = img.info()?;
            if format == Format::Vmdk && !policy.vmdk_allowed_types.is_empty() {
                let create_type = info
                    .format_specific
                    .as_ref()
                    .and_then(|v| v.pointer("/data/create-type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown");
                if !policy.vmdk_allowed_types.iter().any(|t| t == create_type) {
                    violations.push(format!(
                        "VMDK createType '{create_type}' is not allowed (allowed: {})",
                        policy.vmdk_allowed_types.join(", ")
                    ));
                }
            }
            if let Some(b) = info.backing_file {
                references.push(b.clone());
                if !policy.allow_external_files {
                    violations.push(format!("it has a backing file '{b}'"));
                }
            }
            if policy.findings_are_violations {
                violations.extend(img.safety_findings());
            }
            warnings.extend(img.warnings());
            if policy.check_metadata {
                match img.check_metadata() {
                    Some(Ok(r)) if !r.corruptions.is_empty() || r.check_errors > 0 => {
                        let n = r.corruptions.len();
                        let mut first: Vec<String> =
                            r.corruptions.into_iter().take(MAX_CHECK_SENTENCES).collect();
                        if n > MAX_CHECK_SENTENCES {
                            first.push(format!("and {} more", n - MAX_CHECK_SENTENCES));
                        }
                        if r.check_errors > 0 {
                            first.push(format!("{} check errors", r.check_errors));
                        }
                        violations.push(format!(
                            "the {open_as} metadata check found corruption (rule: metadata consistency, as qemu-img check; leaks alone are accepted): {}",
                            first.join("; ")
                        ));
                    }
                    Some(Err(e)) => violations.push(format!(
                        "the {open_as} metadata check could not complete (rule: metadata consistency): {}",
                        format!("{e}").replacen(&format!("{name}: "), "", 1)
                    )),
                    _ => {}
                }
            }
        }
        Err(Error::Refused { reason, .. }) => violations.push(reason),
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => violations.push(format!("{e}").replacen(&format!("{name}: "), "", 1)),
    }
    Ok(Report {
        format,
        signatures,
        virtual_size,
        actual_size,
        references,
        violations,
        warnings,
    })
}
