//! The safety inspector: what an image is, what it refers to, and whether it is safe to
//! convert under a policy. An import service runs it on every upload before converting.
//!
//! It reads headers and tables only (through the format readers, with references
//! refused under the untrusted policy), never the guest data.

use std::path::Path;

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
    /// Format-specific findings (corrupt bits, checksum mismatches, …) are violations.
    pub findings_are_violations: bool,
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
        }
    }

    /// For the operator's own images: like qemu-img, references are followed.
    pub fn trusted() -> Self {
        Policy {
            allow_external_files: true,
            max_virtual_size: u64::MAX,
            vmdk_allowed_types: Vec::new(),
            findings_are_violations: false,
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
    if head.get(512..520) == Some(b"EFI PART") {
        found.push("gpt");
    }
    // ISO 9660 primary volume descriptor "CD001" at sector 16 (and 17, 18 for others).
    for off in [0x8001u64, 0x8801, 0x9001] {
        if file.len() >= off + 5 {
            let mut b = [0u8; 5];
            file.read_exact_at(&mut b, off, "ISO 9660 volume descriptor")?;
            if &b == b"CD001" {
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
    let file = ImageFile::open(path)?;
    inspect_file(file, declared, policy)
}

/// [`inspect`] of an already opened (or in-memory) file.
pub fn inspect_file(file: ImageFile, declared: Option<Format>, policy: &Policy) -> Result<Report> {
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

    if let Some(d) = declared {
        if d != format {
            violations.push(format!(
                "declared format {d} does not match the content, which is {format}"
            ));
        }
    }
    for f in &foreign {
        match *f {
            // A raw disk may hold a partition table or be an ISO; another format may not.
            "gpt" | "iso" if format == Format::Raw => {}
            "gpt" | "iso" => violations.push(format!(
                "the content is both {format} and {f}: a file that matches two formats is refused"
            )),
            other => violations.push(format!(
                "the content is a {other} image, which vconvert does not convert"
            )),
        }
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
    match open_file(file, Some(declared.unwrap_or(format)), &options) {
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
    })
}
