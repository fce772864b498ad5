//! The text descriptor (spec "The Descriptor File"): header keys (`version`, `CID`,
//! `parentCID`, `createType`, `parentFileNameHint`), extent lines and the disk database
//! (`ddb.*`). It is a file of its own or embedded in a monolithic sparse extent.
//!
//! Parsing accepts `\n` and `\r\n` line ends, `#` comments, blank lines, quoted values
//! and quoted file names with spaces, and stops at the first NUL (embedded descriptors
//! are padded with zeros). Lines that are none of these are kept as findings, not
//! errors, as VMware and qemu ignore them.

use std::fmt::Write as _;

/// The `parentCID` (and `CID`) meaning "no parent".
pub const CID_NONE: u32 = 0xffff_ffff;
/// The first line of a descriptor file, also what format probes look for.
pub const SIGNATURE: &str = "# Disk DescriptorFile";

/// An extent's access mode (spec "Extent Descriptions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `RW`.
    ReadWrite,
    /// `RDONLY`.
    ReadOnly,
    /// `NOACCESS`.
    NoAccess,
}

impl Access {
    /// The keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "RW" => Some(Access::ReadWrite),
            "RDONLY" => Some(Access::ReadOnly),
            "NOACCESS" => Some(Access::NoAccess),
            _ => None,
        }
    }
}

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size of the extent in sectors.
    pub sectors: u64,
    /// Extent type as written (`SPARSE`, `FLAT`, `ZERO`, `VMFS`, `VMFSSPARSE`, ...).
    pub kind: String,
    /// File name, relative to the descriptor's directory unless absolute.
    pub file: Option<String>,
    /// Offset in sectors inside a flat extent file.
    pub offset: u64,
}

impl ExtentLine {
    /// The line as written in a descriptor.
    pub fn to_line(&self) -> String {
        let mut s = format!("{} {} {}", self.access.keyword(), self.sectors, self.kind);
        if let Some(f) = &self.file {
            let _ = write!(s, " \"{f}\"");
            if self.kind == "FLAT" || self.kind == "VMFS" || self.offset != 0 {
                let _ = write!(s, " {}", self.offset);
            }
        }
        s
    }
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `CID`, the content id.
    pub cid: Option<u32>,
    /// `parentCID` ([`CID_NONE`] or absent: no parent).
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: Option<String>,
    /// `parentFileNameHint`.
    pub parent_file_name_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// Every `key = value` line in order (quotes removed), `ddb.*` included.
    pub entries: Vec<(String, String)>,
    /// Lines that are neither comments, `key = value` nor extent lines, and values that
    /// could not be parsed (each a sentence).
    pub findings: Vec<String>,
}

/// Why a descriptor could not be parsed: the byte offset of the line and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset of the offending line inside the descriptor text.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Extent types whose line names a file.
fn needs_file(kind: &str) -> bool {
    kind != "ZERO"
}

fn parse_extent(line: &str, access: Access) -> Result<ExtentLine, String> {
    let rest = line.trim_start();
    let (_, rest) = rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len()));
    let rest = rest.trim_start();
    let (size, rest) = rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len()));
    let sectors: u64 = size
        .parse()
        .map_err(|_| format!("extent size '{size}' is not a number of sectors"))?;
    if sectors == 0 {
        return Err("extent of 0 sectors".into());
    }
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len()));
    if kind.is_empty() {
        return Err("extent line has no type".into());
    }
    let rest = rest.trim();
    let (file, rest) = if let Some(q) = rest.strip_prefix('"') {
        let end = q
            .find('"')
            .ok_or_else(|| "extent file name has no closing quote".to_string())?;
        (Some(q[..end].to_string()), q[end + 1..].trim())
    } else if rest.is_empty() {
        (None, "")
    } else {
        let (f, r) = rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len()));
        (Some(f.to_string()), r.trim())
    };
    let offset = if rest.is_empty() {
        0
    } else {
        rest.parse::<u64>()
            .map_err(|_| format!("extent offset '{rest}' is not a number of sectors"))?
    };
    if file.as_deref().is_some_and(str::is_empty) {
        return Err("extent file name is empty".into());
    }
    if needs_file(kind) && file.is_none() {
        return Err(format!("{kind} extent names no file"));
    }
    if !needs_file(kind) && file.is_some() {
        return Err(format!("{kind} extent must not name a file"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind: kind.to_string(),
        file,
        offset,
    })
}

fn parse_cid(v: &str) -> Option<u32> {
    u32::from_str_radix(v.trim(), 16).ok()
}

/// Parses descriptor text (up to its first NUL byte).
pub fn parse(text: &[u8]) -> Result<Descriptor, ParseError> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = String::from_utf8_lossy(&text[..end]);
    // Editors on Windows may add a byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut d = Descriptor::default();
    let mut pos = 0u64;
    for (n, raw) in text.split('\n').enumerate() {
        let line_offset = pos;
        pos += raw.len() as u64 + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some(access) = Access::parse(first) {
            let e = parse_extent(line, access).map_err(|reason| ParseError {
                offset: line_offset,
                reason: format!("line {}: {reason}", n + 1),
            })?;
            d.extents.push(e);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            d.findings.push(format!(
                "descriptor line {} is not a comment, key = value or extent line (VMDK descriptor syntax; qemu ignores such lines, vconvert refuses them when untrusted): '{}'",
                n + 1,
                line.chars().take(80).collect::<String>()
            ));
            continue;
        };
        let key = k.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            d.findings.push(format!(
                "descriptor line {} has an invalid key: '{}'",
                n + 1,
                line.chars().take(80).collect::<String>()
            ));
            continue;
        }
        let value = unquote(v).to_string();
        match key {
            "CID" => {
                d.cid = parse_cid(&value);
                if d.cid.is_none() {
                    d.findings
                        .push(format!("descriptor CID '{value}' is not hexadecimal"));
                }
            }
            "parentCID" => {
                d.parent_cid = parse_cid(&value);
                if d.parent_cid.is_none() {
                    d.findings
                        .push(format!("descriptor parentCID '{value}' is not hexadecimal"));
                }
            }
            "createType" => d.create_type = Some(value.clone()),
            "parentFileNameHint" => d.parent_file_name_hint = Some(value.clone()),
            _ => {}
        }
        d.entries.push((key.to_string(), value));
    }
    Ok(d)
}

impl Descriptor {
    /// The value of `key`, if present (the last one wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when the descriptor names a parent (`parentCID` other than ffffffff).
    pub fn has_parent(&self) -> bool {
        self.parent_cid.is_some_and(|c| c != CID_NONE)
    }
}

/// What a writer puts in a new descriptor.
#[derive(Clone, Debug)]
pub struct NewDescriptor<'a> {
    /// `CID`.
    pub cid: u32,
    /// `parentCID`.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: &'a str,
    /// `parentFileNameHint`, if any.
    pub parent_file_name_hint: Option<&'a str>,
    /// Extent lines.
    pub extents: &'a [ExtentLine],
    /// `ddb.*` keys and values, in order.
    pub ddb: &'a [(&'a str, String)],
}

impl NewDescriptor<'_> {
    /// The descriptor text, laid out as qemu and VMware write it.
    pub fn emit(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{SIGNATURE}");
        let _ = writeln!(s, "version=1");
        let _ = writeln!(s, "CID={:08x}", self.cid);
        let _ = writeln!(s, "parentCID={:08x}", self.parent_cid);
        let _ = writeln!(s, "createType=\"{}\"", self.create_type);
        if let Some(p) = self.parent_file_name_hint {
            let _ = writeln!(s, "parentFileNameHint=\"{p}\"");
        }
        let _ = writeln!(s, "\n# Extent description");
        for e in self.extents {
            let _ = writeln!(s, "{}", e.to_line());
        }
        let _ = writeln!(s, "\n# The Disk Data Base\n#DDB\n");
        for (k, v) in self.ddb {
            let _ = writeln!(s, "{k} = \"{v}\"");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_descriptor_and_edge_cases() {
        let text = b"# Disk DescriptorFile\r\nversion=1\r\nCID=e421f72e\r\nparentCID=ffffffff\r\n\
createType=\"twoGbMaxExtentFlat\"\r\n\r\n# Extent description\r\n\
RW 2048 FLAT \"my disk-f001.vmdk\" 0\r\n  RDONLY 1024 ZERO  \r\nNOACCESS 8 SPARSE plain.vmdk\r\n\
RW 16 FLAT \"x y.vmdk\" 34\r\n\r\n#DDB\r\nddb.adapterType = \"ide\"\r\nthis line is junk\r\n\0\0garbage";
        let d = parse(text).unwrap();
        assert_eq!(d.cid, Some(0xe421_f72e));
        assert!(!d.has_parent());
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.extents.len(), 4);
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-f001.vmdk"));
        assert_eq!(d.extents[1].kind, "ZERO");
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[2].file.as_deref(), Some("plain.vmdk"));
        assert_eq!(d.extents[3].offset, 34);
        assert_eq!(d.get("ddb.adapterType"), Some("ide"));
        assert_eq!(d.findings.len(), 1, "{:?}", d.findings);
        for bad in [
            &b"RW x FLAT \"a\" 0\n"[..],
            b"RW 0 FLAT \"a\" 0\n",
            b"RW 10 FLAT \"a 0\n",
            b"RW 10 FLAT\n",
            b"RW 10 ZERO \"a\"\n",
            b"RW 10 FLAT \"a\" zz\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let e = parse(b"version=1\nRW 0 FLAT \"a\" 0\n").unwrap_err();
        assert_eq!(e.offset, 10);
        let d = parse("\u{feff}# Disk DescriptorFile\nRW 8 ZERO\n".as_bytes()).unwrap();
        assert!(d.findings.is_empty() && d.extents.len() == 1);
    }

    #[test]
    fn emit_round_trips() {
        let extents = [
            ExtentLine {
                access: Access::ReadWrite,
                sectors: 20480,
                kind: "SPARSE".into(),
                file: Some("a b.vmdk".into()),
                offset: 0,
            },
            ExtentLine {
                access: Access::ReadWrite,
                sectors: 100,
                kind: "FLAT".into(),
                file: Some("f.vmdk".into()),
                offset: 0,
            },
        ];
        let ddb = [("ddb.adapterType", "ide".to_string())];
        let text = NewDescriptor {
            cid: 0x1234,
            parent_cid: CID_NONE,
            create_type: "monolithicSparse",
            parent_file_name_hint: None,
            extents: &extents,
            ddb: &ddb,
        }
        .emit();
        assert!(text.contains("CID=00001234\n") && text.contains("RW 100 FLAT \"f.vmdk\" 0\n"));
        let d = parse(text.as_bytes()).unwrap();
        assert_eq!(d.extents, extents);
        assert_eq!(d.cid, Some(0x1234));
        assert!(d.findings.is_empty());
    }
}
