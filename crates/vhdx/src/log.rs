//! The log (MS-VHDX §2.3): a circular buffer of entries, each a header, descriptors
//! (data: one 4 KiB sector; zero: a 4 KiB-aligned run of zeros) and data sectors, all
//! checksummed with CRC-32C. When the header's log GUID is not nil, the active sequence
//! (§2.3.3: the valid, contiguous run of entries from the head's tail to the head with
//! the highest sequence number) holds metadata and BAT updates that may not have
//! reached their place in the file yet. vconvert replays it into an in-memory
//! [`crate::overlay`], never into the file.
//!
//! Only entries that pass every check are replayed: signature, checksum, log GUID,
//! lengths, sequence numbers of descriptors and data sectors, descriptor targets outside
//! the header section and the log. Scanning is bounded (bytes checksummed and chain
//! steps) so a hostile log cannot make it quadratic.

use vconvert_core::{ImageFile, Result};

use crate::overlay::Overlay;
use crate::{checksum, u32_at, u64_at, Guid, MIB};

/// Log entry signature `loge` (§2.3.1.1).
pub const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// Zero descriptor signature `zero` (§2.3.1.2).
pub const ZERO_SIGNATURE: &[u8; 4] = b"zero";
/// Data descriptor signature `desc` (§2.3.1.3).
pub const DATA_SIGNATURE: &[u8; 4] = b"desc";
/// Data sector signature `data` (§2.3.1.4).
pub const SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// Log sector size: entries, descriptors areas and data sectors are multiples (§2.3).
pub const LOG_SECTOR: u64 = 4096;
/// Entry header size (§2.3.1.1).
pub const ENTRY_HEADER_SIZE: usize = 64;
/// Descriptor size (§2.3.1.2, §2.3.1.3).
pub const DESCRIPTOR_SIZE: usize = 32;
/// Largest log we replay: Hyper-V and qemu write 1 MiB; 1 GiB is absurd already.
pub const MAX_LOG_LENGTH: u64 = 1 << 30;
/// Bytes checksummed while scanning, at most, as a multiple of the log's length.
const SCAN_BUDGET_LOGS: u64 = 32;
/// Bytes checksummed while scanning, at most, whatever the log's length.
const MAX_SCAN_BYTES: u64 = 4 << 30;
/// Steps following chains of entries, at most.
const CHAIN_BUDGET: u64 = 1 << 20;

const OFF_CHECKSUM: usize = 4;
const OFF_LENGTH: usize = 8;
const OFF_TAIL: usize = 12;
const OFF_SEQUENCE: usize = 16;
const OFF_COUNT: usize = 24;
const OFF_LOG_GUID: usize = 32;
const OFF_FLUSHED: usize = 48;
const OFF_LAST: usize = 56;

/// One update of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// 4096 bytes at a file offset.
    Data {
        /// File byte offset.
        offset: u64,
        /// The sector: leading bytes, the data sector's 4084 bytes, trailing bytes.
        bytes: Vec<u8>,
    },
    /// Zeros over a range.
    Zero {
        /// File byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// A validated log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Offset inside the log.
    pub position: u64,
    /// Bytes (a multiple of 4 KiB).
    pub length: u64,
    /// Offset inside the log of the first entry of this entry's sequence.
    pub tail: u64,
    /// Sequence number.
    pub sequence: u64,
    /// The file must be at least this long for the log to apply.
    pub flushed_file_offset: u64,
    /// The file's size once the log is applied.
    pub last_file_offset: u64,
    /// Updates, in descriptor order.
    pub updates: Vec<Update>,
}

/// Where the log lies and what it may touch.
#[derive(Clone, Copy, Debug)]
pub struct LogArea {
    /// Byte offset of the log.
    pub offset: u64,
    /// Bytes of the log.
    pub length: u64,
    /// The header's log GUID; entries with another are stale.
    pub guid: Guid,
}

/// What replaying the log gave.
#[derive(Clone, Debug, Default)]
pub(crate) struct Replay {
    /// Entries replayed.
    pub(crate) entries: u64,
    /// Sequence number of the head entry.
    pub(crate) head_sequence: u64,
    /// The file size the log implies (0 when nothing replayed).
    pub(crate) last_file_offset: u64,
    /// The replayed bytes.
    pub(crate) overlay: Overlay,
}

/// Reads the log's bytes from `pos` (wrapping around its end).
fn read_wrapped(file: &ImageFile, area: &LogArea, pos: u64, buf: &mut [u8]) -> Result<()> {
    let first = ((area.length - pos) as usize).min(buf.len());
    let (a, b) = buf.split_at_mut(first);
    file.read_exact_at(a, area.offset + pos, "VHDX log entry")?;
    if !b.is_empty() {
        file.read_exact_at(b, area.offset, "VHDX log entry")?;
    }
    Ok(())
}

/// Parses the entry at `pos` of the log, or says why it is not a valid entry.
pub fn parse_entry(
    file: &ImageFile,
    area: &LogArea,
    pos: u64,
) -> Result<std::result::Result<Entry, String>> {
    let mut h = [0u8; ENTRY_HEADER_SIZE];
    read_wrapped(file, area, pos, &mut h)?;
    if &h[..4] != ENTRY_SIGNATURE {
        return Ok(Err("no 'loge' signature".into()));
    }
    let length = u64::from(u32_at(&h, OFF_LENGTH));
    if length == 0 || length % LOG_SECTOR != 0 || length > area.length {
        return Ok(Err(format!(
            "entry length {length} is not 4 KiB-aligned inside the log"
        )));
    }
    if Guid::read(&h, OFF_LOG_GUID) != area.guid {
        return Ok(Err("entry of another log GUID".into()));
    }
    let tail = u64::from(u32_at(&h, OFF_TAIL));
    if tail % LOG_SECTOR != 0 || tail >= area.length {
        return Ok(Err(format!("tail {tail:#x} is not a log sector")));
    }
    let count = u64::from(u32_at(&h, OFF_COUNT));
    let desc_area = (ENTRY_HEADER_SIZE as u64 + count * DESCRIPTOR_SIZE as u64)
        .div_ceil(LOG_SECTOR)
        * LOG_SECTOR;
    if desc_area > length {
        return Ok(Err(format!("{count} descriptors do not fit the entry")));
    }
    let mut b = vec![0u8; length as usize];
    read_wrapped(file, area, pos, &mut b)?;
    let stored = u32_at(&b, OFF_CHECKSUM);
    if stored != checksum(&b, OFF_CHECKSUM) {
        return Ok(Err("checksum mismatch".into()));
    }
    let sequence = u64_at(&b, OFF_SEQUENCE);
    let flushed_file_offset = u64_at(&b, OFF_FLUSHED);
    let last_file_offset = u64_at(&b, OFF_LAST);
    let log_end = area.offset + area.length;
    let mut updates = Vec::new();
    let mut next_sector = desc_area;
    for i in 0..count as usize {
        let d = &b[ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE..][..DESCRIPTOR_SIZE];
        let offset = u64_at(d, 16);
        if u64_at(d, 24) != sequence {
            return Ok(Err(format!("descriptor {i} has another sequence number")));
        }
        let len = match &d[..4] {
            s if s == ZERO_SIGNATURE => u64_at(d, 8),
            s if s == DATA_SIGNATURE => LOG_SECTOR,
            _ => return Ok(Err(format!("descriptor {i} has no known signature"))),
        };
        let Some(end) = offset.checked_add(len) else {
            return Ok(Err(format!("descriptor {i} overflows")));
        };
        if offset % LOG_SECTOR != 0 || len % LOG_SECTOR != 0 || len == 0 {
            return Ok(Err(format!("descriptor {i} is not 4 KiB-aligned")));
        }
        if offset < crate::header::HEADER_SECTION_SIZE
            || (offset < log_end && end > area.offset)
            || end > last_file_offset.max(flushed_file_offset)
        {
            return Ok(Err(format!(
                "descriptor {i} writes {offset:#x}..{end:#x}: the header section, the log or past the last file offset"
            )));
        }
        if &d[..4] == ZERO_SIGNATURE {
            updates.push(Update::Zero { offset, len });
            continue;
        }
        if next_sector + LOG_SECTOR > length {
            return Ok(Err(format!("data descriptor {i} has no data sector")));
        }
        let s = &b[next_sector as usize..(next_sector + LOG_SECTOR) as usize];
        next_sector += LOG_SECTOR;
        let seq = (u64::from(u32_at(s, 4)) << 32) | u64::from(u32_at(s, 4092));
        if &s[..4] != SECTOR_SIGNATURE || seq != sequence {
            return Ok(Err(format!(
                "data sector of descriptor {i} has no 'data' signature or another sequence number"
            )));
        }
        let mut bytes = Vec::with_capacity(LOG_SECTOR as usize);
        bytes.extend_from_slice(&d[8..16]);
        bytes.extend_from_slice(&s[8..4092]);
        bytes.extend_from_slice(&d[4..8]);
        updates.push(Update::Data { offset, bytes });
    }
    Ok(Ok(Entry {
        position: pos,
        length,
        tail,
        sequence,
        flushed_file_offset,
        last_file_offset,
        updates,
    }))
}

/// Finds the active sequence of the log and replays it into an overlay (§2.3.3).
pub(crate) fn replay(file: &ImageFile, area: &LogArea) -> Result<Replay> {
    const S: &str = "VHDX log";
    if area.length > MAX_LOG_LENGTH {
        return Err(file.corrupt(
            S,
            area.offset,
            format!(
                "log of {} bytes is larger than {MAX_LOG_LENGTH}",
                area.length
            ),
        ));
    }
    let log_end = area.offset.saturating_add(area.length);
    if log_end > file.len() {
        return Err(file.corrupt(
            S,
            area.offset,
            format!("log of {} bytes lies past the end of the file", area.length),
        ));
    }
    // Every valid entry, by position.
    let mut valid: std::collections::BTreeMap<u64, Entry> = Default::default();
    let mut budget = (SCAN_BUDGET_LOGS * area.length.max(MIB)).min(MAX_SCAN_BYTES);
    let mut pos = 0;
    while pos < area.length {
        match parse_entry(file, area, pos)? {
            Ok(mut e) => {
                budget = budget.saturating_sub(e.length);
                // Entries may overlap (only one chain is replayed): keep no data now,
                // parse the chain's entries again when replaying it.
                e.updates = Vec::new();
                valid.insert(pos, e);
            }
            Err(_) => budget = budget.saturating_sub(ENTRY_HEADER_SIZE as u64),
        }
        if budget == 0 {
            return Err(file.corrupt(S, area.offset, "too many overlapping log entries to scan"));
        }
        pos += LOG_SECTOR;
    }
    // Heads by descending sequence number: the first whose chain from its tail is
    // complete is the active sequence.
    let mut heads: Vec<&Entry> = valid.values().collect();
    heads.sort_by(|a, b| {
        b.sequence
            .cmp(&a.sequence)
            .then(a.position.cmp(&b.position))
    });
    let mut steps = 0u64;
    for head in heads {
        let mut chain = Vec::new();
        let mut at = head.tail;
        let mut prev: Option<u64> = None;
        let complete = loop {
            steps += 1;
            if steps > CHAIN_BUDGET {
                return Err(file.corrupt(S, area.offset, "log chains too long to follow"));
            }
            let Some(e) = valid.get(&at) else { break false };
            if prev.is_some_and(|p| p.checked_add(1) != Some(e.sequence)) {
                break false;
            }
            if e.sequence > head.sequence || chain.len() > valid.len() {
                break false;
            }
            chain.push(e);
            if e.position == head.position {
                break e.sequence == head.sequence;
            }
            prev = Some(e.sequence);
            at = (at + e.length) % area.length;
        };
        if !complete {
            continue;
        }
        if file.len() < head.flushed_file_offset {
            return Err(file.corrupt(
                S,
                area.offset + head.position + OFF_FLUSHED as u64,
                format!(
                    "the log needs the file to be at least {} bytes (it is {}): the file was truncated",
                    head.flushed_file_offset,
                    file.len()
                ),
            ));
        }
        let mut out = Replay {
            entries: chain.len() as u64,
            head_sequence: head.sequence,
            last_file_offset: head.last_file_offset,
            overlay: Overlay::default(),
        };
        for e in chain {
            let e = parse_entry(file, area, e.position)?.map_err(|why| {
                file.corrupt(
                    S,
                    area.offset + e.position,
                    format!("log entry changed: {why}"),
                )
            })?;
            for u in &e.updates {
                match u {
                    Update::Data { offset, bytes } => out.overlay.write(*offset, bytes.clone()),
                    Update::Zero { offset, len } => out.overlay.zero(*offset, *len),
                }
            }
        }
        return Ok(out);
    }
    Ok(Replay::default())
}

/// Encodes a log entry (for tests and tools that make dirty images): `updates` at
/// sequence `sequence`, with `tail` and the file offsets given.
pub fn encode_entry(
    guid: Guid,
    sequence: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    updates: &[Update],
) -> Vec<u8> {
    let count = updates.len();
    let desc_area = (ENTRY_HEADER_SIZE + count * DESCRIPTOR_SIZE).div_ceil(4096) * 4096;
    let data_count = updates
        .iter()
        .filter(|u| matches!(u, Update::Data { .. }))
        .count();
    let mut b = vec![0u8; desc_area + data_count * 4096];
    let len = b.len() as u32;
    b[..4].copy_from_slice(ENTRY_SIGNATURE);
    b[OFF_LENGTH..OFF_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
    b[OFF_TAIL..OFF_TAIL + 4].copy_from_slice(&(tail as u32).to_le_bytes());
    b[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&sequence.to_le_bytes());
    b[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&(count as u32).to_le_bytes());
    b[OFF_LOG_GUID..OFF_LOG_GUID + 16].copy_from_slice(&guid.0);
    b[OFF_FLUSHED..OFF_FLUSHED + 8].copy_from_slice(&flushed_file_offset.to_le_bytes());
    b[OFF_LAST..OFF_LAST + 8].copy_from_slice(&last_file_offset.to_le_bytes());
    let mut sector = desc_area;
    for (i, u) in updates.iter().enumerate() {
        let d = ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE;
        match u {
            Update::Zero { offset, len } => {
                b[d..d + 4].copy_from_slice(ZERO_SIGNATURE);
                b[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
                b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
            }
            Update::Data { offset, bytes } => {
                b[d..d + 4].copy_from_slice(DATA_SIGNATURE);
                b[d + 4..d + 8].copy_from_slice(&bytes[4092..4096]);
                b[d + 8..d + 16].copy_from_slice(&bytes[..8]);
                b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                let s = &mut b[sector..sector + 4096];
                s[..4].copy_from_slice(SECTOR_SIGNATURE);
                s[4..8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
                s[8..4092].copy_from_slice(&bytes[8..4092]);
                s[4092..].copy_from_slice(&(sequence as u32).to_le_bytes());
                sector += 4096;
            }
        }
        b[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
    }
    crate::seal(&mut b, OFF_CHECKSUM);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: Guid = Guid([5; 16]);

    fn log_file(entries: &[(u64, Vec<u8>)]) -> (ImageFile, LogArea) {
        let mut b = vec![0u8; 4 * MIB as usize];
        for (pos, e) in entries {
            let at = (MIB + pos) as usize;
            b[at..at + e.len()].copy_from_slice(e);
        }
        let area = LogArea {
            offset: MIB,
            length: MIB,
            guid: GUID,
        };
        (ImageFile::from_bytes("l.vhdx", b), area)
    }

    fn data(offset: u64, byte: u8) -> Update {
        let mut bytes = vec![byte; 4096];
        bytes[0] = byte.wrapping_add(1);
        bytes[4095] = byte.wrapping_add(2);
        Update::Data { offset, bytes }
    }

    #[test]
    fn replays_the_sequence_in_order() {
        let e1 = encode_entry(GUID, 10, 0, 0, 4 * MIB, &[data(2 * MIB, 1)]);
        let l1 = e1.len() as u64;
        let e2 = encode_entry(
            GUID,
            11,
            0,
            0,
            4 * MIB,
            &[
                data(2 * MIB, 2),
                Update::Zero {
                    offset: 3 * MIB,
                    len: 8192,
                },
            ],
        );
        let (file, area) = log_file(&[(0, e1), (l1, e2)]);
        let r = replay(&file, &area).unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 11));
        let mut b = vec![7u8; 4096];
        r.overlay.apply(&mut b, 2 * MIB);
        assert_eq!((b[0], b[1], b[4095]), (3, 2, 4));
        let mut z = vec![7u8; 8192];
        r.overlay.apply(&mut z, 3 * MIB);
        assert!(z.iter().all(|&x| x == 0));
    }

    #[test]
    fn invalid_entries_are_not_replayed() {
        // A damaged second entry: only the first is replayed, and it is its own head.
        let e1 = encode_entry(GUID, 10, 0, 0, 4 * MIB, &[data(2 * MIB, 1)]);
        let l1 = e1.len() as u64;
        let mut e2 = encode_entry(GUID, 11, 0, 0, 4 * MIB, &[data(2 * MIB, 2)]);
        e2[5000] ^= 1;
        let (file, area) = log_file(&[(0, e1.clone()), (l1, e2)]);
        let r = replay(&file, &area).unwrap();
        assert_eq!((r.entries, r.head_sequence), (1, 10));
        // Another log GUID: nothing.
        let other = encode_entry(Guid([6; 16]), 10, 0, 0, 4 * MIB, &[data(2 * MIB, 1)]);
        let (file, area) = log_file(&[(0, other)]);
        assert_eq!(replay(&file, &area).unwrap().entries, 0);
        // A head whose tail is missing: nothing.
        let orphan = encode_entry(GUID, 12, 8192 * 4, 0, 4 * MIB, &[data(2 * MIB, 1)]);
        let (file, area) = log_file(&[(0, orphan)]);
        assert_eq!(replay(&file, &area).unwrap().entries, 0);
        // A descriptor aimed at the header section: the entry is invalid.
        let bad = encode_entry(GUID, 10, 0, 0, 4 * MIB, &[data(0, 1)]);
        let (file, area) = log_file(&[(0, bad)]);
        assert_eq!(replay(&file, &area).unwrap().entries, 0);
        assert!(parse_entry(&file, &area, 0)
            .unwrap()
            .unwrap_err()
            .contains("header section"));
    }

    #[test]
    fn truncated_file_is_refused() {
        let e = encode_entry(GUID, 10, 0, 64 * MIB, 64 * MIB, &[data(2 * MIB, 1)]);
        let (file, area) = log_file(&[(0, e)]);
        let err = replay(&file, &area).unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("VHDX log"),
            "{err}"
        );
    }

    #[test]
    fn wrapped_entries_are_read() {
        let e1 = encode_entry(GUID, 3, MIB - 4096, 0, 4 * MIB, &[data(2 * MIB, 1)]);
        let e2 = encode_entry(GUID, 4, MIB - 4096, 0, 4 * MIB, &[data(2 * MIB + 4096, 9)]);
        // e1 (8 KiB) starts in the last sector and wraps to the first.
        let mut b = vec![0u8; 4 * MIB as usize];
        b[(2 * MIB - 4096) as usize..(2 * MIB) as usize].copy_from_slice(&e1[..4096]);
        b[MIB as usize..(MIB + 4096) as usize].copy_from_slice(&e1[4096..]);
        b[(MIB + 4096) as usize..(MIB + 4096) as usize + e2.len()].copy_from_slice(&e2);
        let file = ImageFile::from_bytes("w.vhdx", b);
        let area = LogArea {
            offset: MIB,
            length: MIB,
            guid: GUID,
        };
        let r = replay(&file, &area).unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 4));
    }
}
