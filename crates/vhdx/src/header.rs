//! The header section (MS-VHDX §2.2): the file type identifier at 0 and the two headers
//! at 64 KiB and 128 KiB. A reader takes the valid header (signature, CRC-32C, version)
//! with the higher sequence number (§2.2.2.1).

use vconvert_core::{ImageFile, Result};

use crate::{checksum, seal, u16_at, u32_at, u64_at, Guid, MIB};

/// File type identifier signature at offset 0 (§2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Size of the file type identifier structure (§2.2.1).
pub const FILE_IDENTIFIER_SIZE: usize = 64 << 10;
/// Offsets of header 1 and header 2 (§2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Header signature `head` (§2.2.2).
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Bytes of a header covered by its checksum (§2.2.2: the first 4 KiB).
pub const HEADER_SIZE: usize = 4096;
/// The only header version (§2.2.2 Version).
pub const VERSION: u16 = 1;
/// The only log version (§2.2.2 LogVersion).
pub const LOG_VERSION: u16 = 0;
/// The header section: identifier, two headers, two region tables, reserved (§2.2).
pub const HEADER_SECTION_SIZE: u64 = MIB;

const OFF_CHECKSUM: usize = 4;
const OFF_SEQUENCE: usize = 8;
const OFF_FILE_WRITE_GUID: usize = 16;
const OFF_DATA_WRITE_GUID: usize = 32;
const OFF_LOG_GUID: usize = 48;
const OFF_LOG_VERSION: usize = 64;
const OFF_VERSION: usize = 66;
const OFF_LOG_LENGTH: usize = 68;
const OFF_LOG_OFFSET: usize = 72;

/// One of the two headers (§2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Which copy is current: the higher valid one wins.
    pub sequence_number: u64,
    /// Changes whenever the file is first written after opening.
    pub file_write_guid: Guid,
    /// Changes whenever user-visible data is first written after opening.
    pub data_write_guid: Guid,
    /// Non-nil when the log may hold entries to replay (§2.3).
    pub log_guid: Guid,
    /// Log format version (0).
    pub log_version: u16,
    /// Header version (1).
    pub version: u16,
    /// Bytes of the log; a multiple of 1 MiB.
    pub log_length: u32,
    /// Byte offset of the log; a multiple of 1 MiB.
    pub log_offset: u64,
}

impl Header {
    /// Parses and validates a header copy read from `at`. The reason it is invalid is
    /// returned as text (the caller decides whether the other copy saves the file).
    pub fn parse(b: &[u8], at: u64) -> std::result::Result<Header, String> {
        if b.len() < HEADER_SIZE || &b[..4] != HEADER_SIGNATURE {
            return Err(format!("no 'head' signature at {at:#x}"));
        }
        let b = &b[..HEADER_SIZE];
        let stored = u32_at(b, OFF_CHECKSUM);
        let computed = checksum(b, OFF_CHECKSUM);
        if stored != computed {
            return Err(format!(
                "checksum at {:#x} is {stored:#010x}, the header's CRC-32C is {computed:#010x}",
                at + OFF_CHECKSUM as u64
            ));
        }
        let h = Header {
            sequence_number: u64_at(b, OFF_SEQUENCE),
            file_write_guid: Guid::read(b, OFF_FILE_WRITE_GUID),
            data_write_guid: Guid::read(b, OFF_DATA_WRITE_GUID),
            log_guid: Guid::read(b, OFF_LOG_GUID),
            log_version: u16_at(b, OFF_LOG_VERSION),
            version: u16_at(b, OFF_VERSION),
            log_length: u32_at(b, OFF_LOG_LENGTH),
            log_offset: u64_at(b, OFF_LOG_OFFSET),
        };
        if h.version != VERSION {
            return Err(format!(
                "version {} at {:#x} (only {VERSION} exists)",
                h.version,
                at + OFF_VERSION as u64
            ));
        }
        if h.log_version != LOG_VERSION {
            return Err(format!(
                "log version {} at {:#x} (only {LOG_VERSION} exists)",
                h.log_version,
                at + OFF_LOG_VERSION as u64
            ));
        }
        if u64::from(h.log_length) % MIB != 0 || h.log_offset % MIB != 0 {
            return Err(format!(
                "log at {:#x} of {} bytes at {:#x} is not aligned to 1 MiB",
                h.log_offset,
                h.log_length,
                at + OFF_LOG_LENGTH as u64
            ));
        }
        if h.log_length > 0 && h.log_offset < HEADER_SECTION_SIZE {
            return Err(format!(
                "log offset {:#x} at {:#x} lies inside the header section",
                h.log_offset,
                at + OFF_LOG_OFFSET as u64
            ));
        }
        if !h.log_guid.is_nil() && h.log_length == 0 {
            return Err(format!(
                "log GUID set at {:#x} but the log is empty",
                at + OFF_LOG_GUID as u64
            ));
        }
        Ok(h)
    }

    /// The 4 KiB of the header, checksummed.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(HEADER_SIGNATURE);
        b[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[OFF_FILE_WRITE_GUID..OFF_FILE_WRITE_GUID + 16].copy_from_slice(&self.file_write_guid.0);
        b[OFF_DATA_WRITE_GUID..OFF_DATA_WRITE_GUID + 16].copy_from_slice(&self.data_write_guid.0);
        b[OFF_LOG_GUID..OFF_LOG_GUID + 16].copy_from_slice(&self.log_guid.0);
        b[OFF_LOG_VERSION..OFF_LOG_VERSION + 2].copy_from_slice(&self.log_version.to_le_bytes());
        b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&self.version.to_le_bytes());
        b[OFF_LOG_LENGTH..OFF_LOG_LENGTH + 4].copy_from_slice(&self.log_length.to_le_bytes());
        b[OFF_LOG_OFFSET..OFF_LOG_OFFSET + 8].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, OFF_CHECKSUM);
        b
    }
}

/// The current header and what was wrong with the other copy, if anything.
#[derive(Clone, Debug)]
pub struct Headers {
    /// The header in force.
    pub current: Header,
    /// Its offset (64 KiB or 128 KiB).
    pub current_offset: u64,
    /// Why the other copy is invalid (`None` when both are valid).
    pub other_problem: Option<String>,
}

/// Checks the file type identifier and picks the current header (§2.2.2.1).
pub fn read_headers(file: &ImageFile) -> Result<Headers> {
    if file.len() < HEADER_SECTION_SIZE {
        return Err(file.corrupt(
            "VHDX header section",
            0,
            format!(
                "file is {} bytes, shorter than the 1 MiB header section",
                file.len()
            ),
        ));
    }
    let mut sig = [0u8; 8];
    file.read_exact_at(&mut sig, 0, "VHDX file type identifier")?;
    if &sig != FILE_SIGNATURE {
        return Err(file.corrupt("VHDX file type identifier", 0, "no 'vhdxfile' signature"));
    }
    let mut parsed = Vec::new();
    for at in HEADER_OFFSETS {
        let mut b = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut b, at, "VHDX header")?;
        parsed.push((at, Header::parse(&b, at)));
    }
    let (h1, h2) = (parsed.remove(0), parsed.remove(0));
    match (h1, h2) {
        ((a1, Ok(x)), (a2, Ok(y))) => {
            let (current, current_offset) = if y.sequence_number > x.sequence_number {
                (y, a2)
            } else {
                (x, a1)
            };
            Ok(Headers {
                current,
                current_offset,
                other_problem: None,
            })
        }
        ((at, Ok(h)), (_, Err(e))) | ((_, Err(e)), (at, Ok(h))) => Ok(Headers {
            current: h,
            current_offset: at,
            other_problem: Some(e),
        }),
        ((a1, Err(e1)), (_, Err(e2))) => Err(file.corrupt(
            "VHDX header",
            a1,
            format!("neither header is valid: header 1: {e1}; header 2: {e2}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            sequence_number: 7,
            file_write_guid: Guid([1; 16]),
            data_write_guid: Guid([2; 16]),
            log_guid: Guid::NIL,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    fn file_with(h1: &[u8], h2: &[u8]) -> ImageFile {
        let mut b = vec![0u8; MIB as usize];
        b[..8].copy_from_slice(FILE_SIGNATURE);
        b[64 << 10..(64 << 10) + h1.len()].copy_from_slice(h1);
        b[128 << 10..(128 << 10) + h2.len()].copy_from_slice(h2);
        ImageFile::from_bytes("t.vhdx", b)
    }

    #[test]
    fn round_trip() {
        let h = header();
        assert_eq!(Header::parse(&h.encode(), 0).unwrap(), h);
    }

    #[test]
    fn higher_valid_sequence_wins() {
        let a = header();
        let mut b = header();
        b.sequence_number = 8;
        let hs = read_headers(&file_with(&a.encode(), &b.encode())).unwrap();
        assert_eq!(hs.current.sequence_number, 8);
        assert_eq!(hs.current_offset, 128 << 10);
        // The higher one with a bad checksum loses to the lower valid one.
        let mut bad = b.encode();
        bad[100] ^= 1;
        let hs = read_headers(&file_with(&a.encode(), &bad)).unwrap();
        assert_eq!(hs.current.sequence_number, 7);
        assert!(hs.other_problem.unwrap().contains("checksum"));
    }

    #[test]
    fn each_rule_refuses() {
        let mut bad = header().encode();
        bad[OFF_CHECKSUM] ^= 1;
        assert!(Header::parse(&bad, 0).unwrap_err().contains("checksum"));
        let mut h = header();
        h.version = 2;
        assert!(Header::parse(&h.encode(), 0)
            .unwrap_err()
            .contains("version"));
        let mut h = header();
        h.log_version = 1;
        assert!(Header::parse(&h.encode(), 0)
            .unwrap_err()
            .contains("log version"));
        let mut h = header();
        h.log_offset = MIB + 4096;
        assert!(Header::parse(&h.encode(), 0).unwrap_err().contains("1 MiB"));
        let mut h = header();
        h.log_offset = 0;
        assert!(Header::parse(&h.encode(), 0)
            .unwrap_err()
            .contains("header section"));
        let mut h = header();
        h.log_guid = Guid([9; 16]);
        h.log_length = 0;
        assert!(Header::parse(&h.encode(), 0).unwrap_err().contains("empty"));
        let e = read_headers(&file_with(b"xxxx", b"yyyy"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("neither header is valid") && e.contains("0x10000"),
            "{e}"
        );
        let e = read_headers(&ImageFile::from_bytes("s", vec![0; 100]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("header section"), "{e}");
    }
}
