//! The snapshot table (qcow2.txt, "Snapshots"): listed by `info`; their L1 tables are
//! followed by `check`.

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{ImageFile, Result, SnapshotInfo};

use crate::header::Qcow2Header;

/// Largest extra data qemu writes per snapshot.
const MAX_EXTRA_DATA: u32 = 1024;

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// What `info` shows.
    pub info: SnapshotInfo,
    /// The guest disk size at the snapshot, when recorded.
    pub disk_size: Option<u64>,
    /// Bytes the entry takes in the table (padded to 8).
    pub entry_len: u64,
}

impl Snapshot {
    /// Reads the snapshot table of `file`.
    pub fn read_table(file: &ImageFile, h: &Qcow2Header) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        let mut pos = h.snapshots_offset;
        for i in 0..h.nb_snapshots {
            let mut fixed = [0u8; 40];
            file.read_exact_at(&mut fixed, pos, "qcow2 snapshot table")?;
            let id_len = u64::from(BigEndian::read_u16(&fixed[12..]));
            let name_len = u64::from(BigEndian::read_u16(&fixed[14..]));
            let extra_len = BigEndian::read_u32(&fixed[36..]);
            if extra_len > MAX_EXTRA_DATA {
                return Err(file.corrupt(
                    "qcow2 snapshot table",
                    pos + 36,
                    format!(
                        "snapshot {i}: {extra_len} bytes of extra data (at most {MAX_EXTRA_DATA})"
                    ),
                ));
            }
            let rest_len = u64::from(extra_len) + id_len + name_len;
            let rest = file.read_vec(pos + 40, rest_len, 1 << 20, "qcow2 snapshot table")?;
            let extra = &rest[..extra_len as usize];
            let id = String::from_utf8_lossy(&rest[extra_len as usize..][..id_len as usize]);
            let name = String::from_utf8_lossy(&rest[(extra_len as u64 + id_len) as usize..]);
            let l1_size = BigEndian::read_u32(&fixed[8..]);
            let l1_table_offset = BigEndian::read_u64(&fixed[0..]);
            let vm_state_size = if extra.len() >= 8 {
                BigEndian::read_u64(&extra[0..])
            } else {
                u64::from(BigEndian::read_u32(&fixed[32..]))
            };
            let icount = if extra.len() >= 24 {
                Some(BigEndian::read_u64(&extra[16..])).filter(|&c| c != u64::MAX)
            } else {
                None
            };
            let entry_len = (40 + rest_len).div_ceil(8) * 8;
            out.push(Snapshot {
                l1_table_offset,
                l1_size,
                info: SnapshotInfo {
                    id: id.into_owned(),
                    name: name.into_owned(),
                    vm_state_size,
                    date_sec: BigEndian::read_u32(&fixed[16..]).into(),
                    date_nsec: BigEndian::read_u32(&fixed[20..]).into(),
                    vm_clock_nsec: BigEndian::read_u64(&fixed[24..]),
                    icount,
                },
                entry_len,
                disk_size: (extra.len() >= 16).then(|| BigEndian::read_u64(&extra[8..])),
            });
            pos += entry_len;
        }
        Ok(out)
    }
}
