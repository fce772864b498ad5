//! The metadata region (MS-VHDX §2.6): a table of items, then the items. The system
//! items vconvert reads: file parameters (block size, leave-blocks-allocated,
//! has-parent), virtual disk size, page 83 data, logical and physical sector size and,
//! for differencing disks, the parent locator (§2.6.2.6).

use vconvert_core::{ImageFile, Result};

use crate::{u16_at, u32_at, u64_at, Guid, MIB};

/// Metadata table signature (§2.6.1.1).
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Size of the metadata table; items start at or after it (§2.6.1).
pub const TABLE_SIZE: usize = 64 << 10;
/// Most entries the table may hold (§2.6.1.1 EntryCount).
pub const MAX_ENTRIES: u16 = 2047;
/// Largest item (§2.6.1.2 Length: at most 1 MiB).
pub const MAX_ITEM: u32 = MIB as u32;
/// Smallest payload block (§2.6.2.1).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest payload block (§2.6.2.1).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest virtual disk (§2.6.2.2: 64 TB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Largest parent locator key/value count we read.
pub const MAX_LOCATOR_ENTRIES: u16 = 256;

/// File parameters item (§2.6.2.1).
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual disk size item (§2.6.2.2).
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Page 83 data item: the disk's SCSI identity GUID (§2.6.2.3).
pub const PAGE_83_DATA: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical sector size item (§2.6.2.4).
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical sector size item (§2.6.2.5).
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent locator item (§2.6.2.6).
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The VHDX parent locator type (§2.6.2.6.1).
pub const VHDX_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Entry flag: a user item (§2.6.1.2 IsUser).
pub const FLAG_IS_USER: u32 = 1;
/// Entry flag: a virtual disk item (§2.6.1.2 IsVirtualDisk).
pub const FLAG_IS_VIRTUAL_DISK: u32 = 2;
/// Entry flag: a reader must understand the item (§2.6.1.2 IsRequired).
pub const FLAG_IS_REQUIRED: u32 = 4;

const ENTRY_SIZE: usize = 32;

/// A parent locator's key/value pairs (§2.6.2.6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// Pairs in stored order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What the metadata region says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Bytes per payload block (1–256 MiB, a power of two).
    pub block_size: u32,
    /// Fixed disks: blocks stay allocated.
    pub leave_blocks_allocated: bool,
    /// A differencing disk.
    pub has_parent: bool,
    /// Guest-visible size.
    pub virtual_disk_size: u64,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// The page 83 GUID, if present.
    pub page83: Option<Guid>,
    /// The parent locator of a differencing disk.
    pub parent_locator: Option<ParentLocator>,
}

impl Metadata {
    /// Payload blocks per sector bitmap block (§2.5: 2^23 × logical sector / block).
    pub fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * u64::from(self.logical_sector_size) / u64::from(self.block_size)
    }
}

/// Reads `buf` at a file offset; the text names the structure in errors.
pub type ReadFn<'a> = dyn Fn(&mut [u8], u64, &'static str) -> Result<()> + 'a;

/// Reads the metadata region `[offset, offset + length)` through `read` (the file's
/// bytes with any replayed log laid over them).
pub fn read_metadata(
    file: &ImageFile,
    offset: u64,
    length: u64,
    read: &ReadFn<'_>,
) -> Result<Metadata> {
    const S: &str = "VHDX metadata table";
    if length < TABLE_SIZE as u64 {
        return Err(file.corrupt(S, offset, "metadata region is smaller than its table"));
    }
    let mut t = vec![0u8; TABLE_SIZE];
    read(&mut t, offset, S)?;
    if &t[..8] != METADATA_SIGNATURE {
        return Err(file.corrupt(S, offset, "no 'metadata' signature"));
    }
    let count = u16_at(&t, 10);
    if count > MAX_ENTRIES {
        return Err(file.corrupt(
            S,
            offset + 10,
            format!("{count} entries (at most {MAX_ENTRIES})"),
        ));
    }
    let mut seen: Vec<Guid> = Vec::new();
    let mut items: Vec<(Guid, u64, u32)> = Vec::new();
    for i in 0..count as usize {
        let e = 32 + i * ENTRY_SIZE;
        let at = offset + e as u64;
        let id = Guid::read(&t, e);
        let item_off = u32_at(&t, e + 16);
        let len = u32_at(&t, e + 20);
        let flags = u32_at(&t, e + 24);
        if seen.contains(&id) {
            return Err(file.corrupt(S, at, format!("item {id} appears twice")));
        }
        seen.push(id);
        if len > MAX_ITEM {
            return Err(file.corrupt(S, at, format!("item {id} is {len} bytes (at most 1 MiB)")));
        }
        if len > 0
            && (u64::from(item_off) < TABLE_SIZE as u64
                || u64::from(item_off) + u64::from(len) > length)
        {
            return Err(file.corrupt(
                S,
                at,
                format!(
                    "item {id} ({len} bytes at {item_off:#x}) lies outside the metadata region after the table"
                ),
            ));
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE_83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if !known.contains(&id) {
            if flags & FLAG_IS_REQUIRED != 0 {
                return Err(vconvert_core::Error::unsupported(
                    file.name(),
                    format!("required VHDX metadata item {id} (entry at {at:#x})"),
                ));
            }
            continue;
        }
        items.push((id, offset + u64::from(item_off), len));
    }
    let get = |id: Guid, need: u32, name: &'static str| -> Result<Option<(Vec<u8>, u64)>> {
        let Some(&(_, at, len)) = items.iter().find(|(g, _, _)| *g == id) else {
            return Ok(None);
        };
        if len < need {
            return Err(file.corrupt(
                "VHDX metadata item",
                at,
                format!("{name} is {len} bytes, needs {need}"),
            ));
        }
        let mut b = vec![0u8; len as usize];
        read(&mut b, at, "VHDX metadata item")?;
        Ok(Some((b, at)))
    };
    let missing =
        |name: &str| file.corrupt(S, offset, format!("the required {name} item is missing"));
    let (fp, fp_at) =
        get(FILE_PARAMETERS, 8, "file parameters")?.ok_or_else(|| missing("file parameters"))?;
    let block_size = u32_at(&fp, 0);
    let bits = u32_at(&fp, 4);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(file.corrupt(
            "VHDX file parameters",
            fp_at,
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    let (vds, vds_at) = get(VIRTUAL_DISK_SIZE, 8, "virtual disk size")?
        .ok_or_else(|| missing("virtual disk size"))?;
    let virtual_disk_size = u64_at(&vds, 0);
    if virtual_disk_size > MAX_DISK_SIZE {
        return Err(file.corrupt(
            "VHDX virtual disk size",
            vds_at,
            format!("{virtual_disk_size} bytes exceeds the VHDX limit of 64 TiB"),
        ));
    }
    let sector = |id, name: &'static str, default: Option<u32>| -> Result<u32> {
        match get(id, 4, name)? {
            Some((b, at)) => {
                let v = u32_at(&b, 0);
                if v != 512 && v != 4096 {
                    return Err(file.corrupt(
                        "VHDX metadata item",
                        at,
                        format!("{name} {v} is neither 512 nor 4096"),
                    ));
                }
                Ok(v)
            }
            None => default.ok_or_else(|| missing(name)),
        }
    };
    let logical_sector_size = sector(LOGICAL_SECTOR_SIZE, "logical sector size", None)?;
    let physical_sector_size = sector(PHYSICAL_SECTOR_SIZE, "physical sector size", Some(4096))?;
    let page83 = get(PAGE_83_DATA, 16, "page 83 data")?.map(|(b, _)| Guid::read(&b, 0));
    let has_parent = bits & 2 != 0;
    let parent_locator = if has_parent {
        let (b, at) =
            get(PARENT_LOCATOR, 20, "parent locator")?.ok_or_else(|| missing("parent locator"))?;
        Some(parse_locator(file, &b, at)?)
    } else {
        None
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: bits & 1 != 0,
        has_parent,
        virtual_disk_size,
        logical_sector_size,
        physical_sector_size,
        page83,
        parent_locator,
    })
}

/// Parses a parent locator item `b` read at `at` (§2.6.2.6).
pub fn parse_locator(file: &ImageFile, b: &[u8], at: u64) -> Result<ParentLocator> {
    const S: &str = "VHDX parent locator";
    let kind = Guid::read(b, 0);
    if kind != VHDX_LOCATOR_TYPE {
        return Err(vconvert_core::Error::unsupported(
            file.name(),
            format!("VHDX parent locator type {kind} (at {at:#x})"),
        ));
    }
    let count = u16_at(b, 18);
    if count > MAX_LOCATOR_ENTRIES || 20 + 12 * usize::from(count) > b.len() {
        return Err(file.corrupt(
            S,
            at + 18,
            format!(
                "{count} key/value entries do not fit in the {}-byte item",
                b.len()
            ),
        ));
    }
    let mut entries = Vec::new();
    for i in 0..usize::from(count) {
        let e = 20 + 12 * i;
        let text = |off: u32, len: u16| -> Result<String> {
            let (s, n) = (off as usize, usize::from(len));
            if n % 2 != 0 || s.checked_add(n).is_none_or(|end| end > b.len()) || n == 0 {
                return Err(file.corrupt(
                    S,
                    at + e as u64,
                    format!("entry {i}: {n} bytes at {s:#x} is not UTF-16 inside the item"),
                ));
            }
            let units: Vec<u16> = b[s..s + n]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| {
                file.corrupt(S, at + e as u64, format!("entry {i} is not valid UTF-16"))
            })
        };
        let key = text(u32_at(b, e), u16_at(b, e + 8))?;
        let value = text(u32_at(b, e + 4), u16_at(b, e + 10))?;
        entries.push((key, value));
    }
    Ok(ParentLocator { entries })
}

/// Encodes a parent locator item with `entries`.
pub fn encode_locator(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * entries.len()];
    b[..16].copy_from_slice(&VHDX_LOCATOR_TYPE.0);
    b[18..20].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, (k, v)) in entries.iter().enumerate() {
        let mut put = |s: &str| {
            let off = b.len() as u32;
            for u in s.encode_utf16() {
                b.extend_from_slice(&u.to_le_bytes());
            }
            (off, (b.len() as u32 - off) as u16)
        };
        let (ko, kl) = put(k);
        let (vo, vl) = put(v);
        let e = 20 + 12 * i;
        b[e..e + 4].copy_from_slice(&ko.to_le_bytes());
        b[e + 4..e + 8].copy_from_slice(&vo.to_le_bytes());
        b[e + 8..e + 10].copy_from_slice(&kl.to_le_bytes());
        b[e + 10..e + 12].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

/// Encodes a metadata region of `size` bytes holding `items` (id, flags, bytes), in
/// qemu-img's layout: the table, then the items from 64 KiB on.
pub fn encode_region(items: &[(Guid, u32, Vec<u8>)], size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[..8].copy_from_slice(METADATA_SIGNATURE);
    b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut at = TABLE_SIZE;
    for (i, (id, flags, data)) in items.iter().enumerate() {
        let e = 32 + i * ENTRY_SIZE;
        b[e..e + 16].copy_from_slice(&id.0);
        b[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
        b[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        b[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        b[at..at + data.len()].copy_from_slice(data);
        at += data.len();
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(bs: u32, bits: u32, size: u64, lss: u32) -> Vec<(Guid, u32, Vec<u8>)> {
        let mut fp = bs.to_le_bytes().to_vec();
        fp.extend_from_slice(&bits.to_le_bytes());
        vec![
            (FILE_PARAMETERS, FLAG_IS_REQUIRED, fp),
            (VIRTUAL_DISK_SIZE, 6, size.to_le_bytes().to_vec()),
            (PAGE_83_DATA, 6, vec![7; 16]),
            (LOGICAL_SECTOR_SIZE, 6, lss.to_le_bytes().to_vec()),
            (PHYSICAL_SECTOR_SIZE, 6, 4096u32.to_le_bytes().to_vec()),
        ]
    }

    fn parse(region: Vec<u8>) -> Result<Metadata> {
        let file = ImageFile::from_bytes("m.vhdx", region.clone());
        let len = region.len() as u64;
        read_metadata(&file, 0, len, &|buf, off, what| {
            file.read_exact_at(buf, off, what)
        })
    }

    #[test]
    fn reads_what_it_writes() {
        let m = parse(encode_region(
            &items(32 << 20, 0, 10 << 30, 4096),
            MIB as usize,
        ))
        .unwrap();
        assert_eq!(m.block_size, 32 << 20);
        assert_eq!(m.logical_sector_size, 4096);
        assert_eq!(m.virtual_disk_size, 10 << 30);
        assert_eq!(m.chunk_ratio(), 1024);
        assert_eq!(m.page83, Some(Guid([7; 16])));
        assert!(!m.has_parent);
        let m = parse(encode_region(&items(1 << 20, 0, 1, 512), MIB as usize)).unwrap();
        assert_eq!(m.chunk_ratio(), 4096);
    }

    #[test]
    fn each_rule_refuses() {
        let e = |r: Vec<u8>| parse(r).unwrap_err().to_string();
        assert!(e(encode_region(&items(3 << 20, 0, 1, 512), MIB as usize)).contains("power of two"));
        assert!(e(encode_region(&items(512 << 20, 0, 1, 512), MIB as usize)).contains("256 MiB"));
        assert!(e(encode_region(
            &items(1 << 20, 0, 65 << 40, 512),
            MIB as usize
        ))
        .contains("64 TiB"));
        assert!(e(encode_region(&items(1 << 20, 0, 1, 1024), MIB as usize)).contains("neither 512"));
        // A differencing disk without its locator.
        assert!(
            e(encode_region(&items(1 << 20, 2, 1, 512), MIB as usize)).contains("parent locator")
        );
        let mut it = items(1 << 20, 0, 1, 512);
        it.remove(1);
        assert!(e(encode_region(&it, MIB as usize)).contains("virtual disk size"));
        let mut it = items(1 << 20, 0, 1, 512);
        it.push((Guid([3; 16]), FLAG_IS_REQUIRED, vec![1]));
        assert!(e(encode_region(&it, MIB as usize)).contains("not supported"));
        let mut r = encode_region(&items(1 << 20, 0, 1, 512), MIB as usize);
        r[32 + 20..32 + 24].copy_from_slice(&(2 * MIB as u32).to_le_bytes());
        assert!(e(r).contains("1 MiB"));
        let mut r = encode_region(&items(1 << 20, 0, 1, 512), MIB as usize);
        r[32 + 16..32 + 20].copy_from_slice(&16u32.to_le_bytes());
        assert!(e(r).contains("outside the metadata region"));
    }

    #[test]
    fn locator_round_trip() {
        let mut it = items(1 << 20, 2, 1 << 20, 512);
        let loc = encode_locator(&[("parent_linkage", "{x}"), ("relative_path", ".\\p.vhdx")]);
        it.push((PARENT_LOCATOR, FLAG_IS_REQUIRED, loc));
        let m = parse(encode_region(&it, MIB as usize)).unwrap();
        let l = m.parent_locator.unwrap();
        assert_eq!(l.get("relative_path"), Some(".\\p.vhdx"));
        assert_eq!(l.get("parent_linkage"), Some("{x}"));
    }
}
