//! L1 and L2 table entries (qcow2.txt, "Cluster mapping"), standard and extended.

/// Host offset bits of L1 and standard L2 entries (bits 9–55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Copied": the cluster's refcount is exactly 1 (bit 63).
pub const COPIED: u64 = 1 << 63;
/// The cluster is compressed (L2 bit 62).
pub const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (L2 bit 0, version 3).
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

/// What one guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not allocated here: reads from the backing image, or zeros.
    Unallocated,
    /// Reads as zeros (whether or not a host cluster is preallocated).
    Zero,
    /// Data at a host offset (of the image or its external data file).
    Data {
        /// Host byte offset of the cluster.
        host: u64,
    },
    /// A compressed cluster.
    Compressed {
        /// Host byte offset of the compressed stream (not aligned).
        host: u64,
        /// Bytes the descriptor covers (whole sectors, minus the offset into the first).
        len: u64,
    },
    /// Extended L2: per-subcluster allocation and zero bitmaps.
    Subclusters {
        /// Host byte offset of the cluster (0 if none).
        host: u64,
        /// Bit i: subcluster i is allocated at `host + i * subcluster size`.
        alloc: u32,
        /// Bit i: subcluster i reads as zeros.
        zero: u32,
    },
}

/// Why an L2 entry is invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadEntry(pub String);

/// Decodes an L2 entry. `bitmap` is the second word of an extended entry (None for
/// standard entries); `version` is the header version.
/// With an external data file (`external`), host offset 0 is valid when the entry's
/// COPIED bit is set.
pub fn decode(
    entry: u64,
    bitmap: Option<u64>,
    cluster_bits: u32,
    version: u32,
    external: bool,
) -> Result<ClusterMapping, BadEntry> {
    let cs = 1u64 << cluster_bits;
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        if host == 0 {
            return Err(BadEntry("compressed cluster at offset 0".into()));
        }
        return Ok(ClusterMapping::Compressed { host, len });
    }
    let host = entry & OFFSET_MASK;
    if host % cs != 0 {
        return Err(BadEntry(format!(
            "host offset {host:#x} is not cluster-aligned"
        )));
    }
    if let Some(bm) = bitmap {
        let alloc = bm as u32;
        let zero = (bm >> 32) as u32;
        if alloc & zero != 0 {
            return Err(BadEntry(format!(
                "subclusters {:#x} are both allocated and zero",
                alloc & zero
            )));
        }
        if host == 0 && alloc != 0 {
            return Err(BadEntry(
                "subclusters allocated in an unallocated cluster".into(),
            ));
        }
        return Ok(ClusterMapping::Subclusters { host, alloc, zero });
    }
    if version >= 3 && entry & ZERO != 0 {
        return Ok(ClusterMapping::Zero);
    }
    if host == 0 && !(external && entry & COPIED != 0) {
        return Ok(ClusterMapping::Unallocated);
    }
    Ok(ClusterMapping::Data { host })
}

/// Encodes the descriptor of a compressed cluster at `host` of `len` bytes.
pub fn compressed_entry(host: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let extra_sectors = (host + len - 1) / 512 - host / 512;
    COMPRESSED | (extra_sectors << x) | host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trips() {
        for cb in [9u32, 12, 16, 21] {
            let host = 0x12_3456 + 7;
            let len = 1000.min((1u64 << cb) - 1);
            let e = compressed_entry(host, len, cb);
            match decode(e, None, cb, 3, false).unwrap() {
                ClusterMapping::Compressed { host: h, len: l } => {
                    assert_eq!(h, host);
                    assert!(l >= len && l < len + 512, "{cb}: {l}");
                }
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(
            decode(ZERO, None, 16, 3, false).unwrap(),
            ClusterMapping::Zero
        );
        assert_eq!(
            decode(0x1_0000 | COPIED | ZERO, None, 16, 3, false).unwrap(),
            ClusterMapping::Zero
        );
        assert!(decode(0x1_0200, None, 16, 3, false).is_err());
        assert!(decode(0, Some(1), 16, 3, false).is_err());
        assert!(decode(0x1_0000, Some(1 | 1 << 32), 16, 3, false).is_err());
    }
}
