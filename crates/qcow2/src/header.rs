//! The qcow2 header and its extensions (QEMU `docs/interop/qcow2.txt`, "Header" and
//! "Header extensions").

use byteorder::{BigEndian, ByteOrder};
use vconvert_core::{Error, ImageFile, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Length of a version 3 header without the compression type byte.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Length of the version 3 header qemu writes (with `compression_type`, padded).
pub const V3_HEADER_LENGTH: u32 = 112;
/// Smallest and largest cluster sizes (log2).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table qemu accepts, in bytes (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table qemu accepts, in bytes (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size we accept (qemu's limit: 2^61 - 1 bytes, as L2 offsets use 56 bits).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// Most snapshots qemu allows.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name qemu accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits (header byte 72).
pub mod incompatible {
    /// Refcounts may be stale (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is meaningful.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries carry subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit vconvert understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits (header byte 80).
pub mod compatible {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (header byte 88).
pub mod autoclear {
    /// Persistent bitmaps are consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image (guest offset = host offset).
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types.
pub mod extension {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE_NAME: u32 = 0x4441_5441;
}

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header); qemu writes it with a 4 KiB window, we with 32 KiB.
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

impl CompressionType {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A feature name table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes.
    pub header_length: u32,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format (extension).
    pub backing_format: Option<String>,
    /// External data file name (extension).
    pub data_file: Option<String>,
    /// Feature name table (extension).
    pub feature_names: Vec<FeatureName>,
    /// Number of persistent bitmaps (extension), if the extension is present.
    pub nb_bitmaps: Option<u32>,
    /// Bitmap directory: byte size and offset (extension).
    pub bitmap_directory: Option<(u64, u64)>,
    /// The image carries a full disk encryption header extension.
    pub has_encryption_header: bool,
}

impl Qcow2Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are 16 bytes with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// The name of an incompatible feature bit, from the feature name table.
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| format!("'{}' (bit {bit})", f.name))
            .unwrap_or_else(|| format!("bit {bit}"))
    }

    /// Reads and checks the header of `file` (structure only; table contents are checked
    /// by their readers).
    pub fn read(file: &ImageFile) -> Result<Self> {
        let corrupt = |off: usize, r: String| file.corrupt("qcow2 header", off as u64, r);
        if file.len() < u64::from(V2_HEADER_LENGTH) {
            return Err(corrupt(
                0,
                format!(
                    "file is too short ({} bytes) for a qcow2 header",
                    file.len()
                ),
            ));
        }
        let mut b = [0u8; V3_HEADER_LENGTH as usize];
        let n = file.len().min(b.len() as u64) as usize;
        file.read_exact_at(&mut b[..n], 0, "qcow2 header")?;
        if BigEndian::read_u32(&b[0..]) != MAGIC {
            return Err(corrupt(0, "magic 'QFI\\xfb' not found".into()));
        }
        let version = BigEndian::read_u32(&b[4..]);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                file.name(),
                format!("qcow2 version {version} (only 2 and 3 exist)"),
            ));
        }
        let cluster_bits = BigEndian::read_u32(&b[20..]);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(
                20,
                format!("cluster bits {cluster_bits} outside 9..=21 (512 B to 2 MiB clusters)"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Qcow2Header {
            version,
            backing_file_offset: BigEndian::read_u64(&b[8..]),
            backing_file_size: BigEndian::read_u32(&b[16..]),
            cluster_bits,
            size: BigEndian::read_u64(&b[24..]),
            crypt_method: BigEndian::read_u32(&b[32..]),
            l1_size: BigEndian::read_u32(&b[36..]),
            l1_table_offset: BigEndian::read_u64(&b[40..]),
            refcount_table_offset: BigEndian::read_u64(&b[48..]),
            refcount_table_clusters: BigEndian::read_u32(&b[56..]),
            nb_snapshots: BigEndian::read_u32(&b[60..]),
            snapshots_offset: BigEndian::read_u64(&b[64..]),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            nb_bitmaps: None,
            bitmap_directory: None,
            has_encryption_header: false,
        };
        if version == 3 {
            if n < V3_MIN_HEADER_LENGTH as usize {
                return Err(corrupt(
                    0,
                    "file is too short for a version 3 header".into(),
                ));
            }
            h.incompatible_features = BigEndian::read_u64(&b[72..]);
            h.compatible_features = BigEndian::read_u64(&b[80..]);
            h.autoclear_features = BigEndian::read_u64(&b[88..]);
            h.refcount_order = BigEndian::read_u32(&b[96..]);
            h.header_length = BigEndian::read_u32(&b[100..]);
            if h.header_length < V3_MIN_HEADER_LENGTH
                || u64::from(h.header_length) > cs
                || h.header_length % 8 != 0
            {
                return Err(corrupt(
                    100,
                    format!(
                        "header length {} is not a multiple of 8 from 104 to the cluster size",
                        h.header_length
                    ),
                ));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(
                    96,
                    format!(
                        "refcount order {} (refcounts wider than 64 bits)",
                        h.refcount_order
                    ),
                ));
            }
            if h.header_length > V3_MIN_HEADER_LENGTH {
                h.compression_type = match b[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(Error::unsupported(
                            file.name(),
                            format!("qcow2 compression type {t}"),
                        ))
                    }
                };
            }
            if h.compression_type != CompressionType::Zlib
                && h.incompatible_features & incompatible::COMPRESSION_TYPE == 0
            {
                return Err(corrupt(
                    104,
                    "compression type set without the compression type feature bit".into(),
                ));
            }
        }
        h.read_extensions(file)?;
        h.validate(file)?;
        Ok(h)
    }

    fn read_extensions(&mut self, file: &ImageFile) -> Result<()> {
        let cs = self.cluster_size();
        // Extensions run from the end of the header to the backing file name, or to the
        // end of the first cluster.
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset.min(cs)
        } else {
            cs
        }
        .min(file.len());
        let mut pos = u64::from(self.header_length);
        let area = if end > pos {
            file.read_vec(pos, end - pos, cs, "qcow2 header extension")?
        } else {
            Vec::new()
        };
        let base = pos;
        while pos + 8 <= end {
            let rel = (pos - base) as usize;
            let ty = BigEndian::read_u32(&area[rel..]);
            let len = u64::from(BigEndian::read_u32(&area[rel + 4..]));
            if ty == extension::END {
                break;
            }
            let data_at = pos + 8;
            if data_at + len > end {
                return Err(file.corrupt(
                    "qcow2 header extension",
                    pos,
                    format!("extension {ty:#010x} of {len} bytes runs past the header area"),
                ));
            }
            let d = &area[rel + 8..rel + 8 + len as usize];
            let text = || {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            };
            match ty {
                extension::BACKING_FORMAT => {
                    self.backing_format = Some(text());
                }
                extension::DATA_FILE_NAME => self.data_file = Some(text()),
                extension::FULL_DISK_ENCRYPTION => self.has_encryption_header = true,
                extension::BITMAPS if d.len() >= 24 => {
                    self.nb_bitmaps = Some(BigEndian::read_u32(&d[0..]));
                    self.bitmap_directory =
                        Some((BigEndian::read_u64(&d[8..]), BigEndian::read_u64(&d[16..])));
                }
                extension::FEATURE_NAMES => {
                    for e in d.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..])
                            .trim_end_matches('\0')
                            .to_string();
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name,
                        });
                    }
                }
                _ => {}
            }
            pos = data_at + len.div_ceil(8) * 8;
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_NAME {
                return Err(file.corrupt(
                    "qcow2 header",
                    16,
                    format!(
                        "backing file name of {} bytes (at most {MAX_BACKING_NAME})",
                        self.backing_file_size
                    ),
                ));
            }
            if self.backing_file_offset + u64::from(self.backing_file_size) > cs {
                return Err(file.corrupt(
                    "qcow2 header",
                    8,
                    "backing file name does not lie in the first cluster",
                ));
            }
            let name = file.read_vec(
                self.backing_file_offset,
                self.backing_file_size.into(),
                MAX_BACKING_NAME.into(),
                "qcow2 backing file name",
            )?;
            self.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
        }
        Ok(())
    }

    fn validate(&self, file: &ImageFile) -> Result<()> {
        let cs = self.cluster_size();
        let corrupt = |off: u64, r: String| Err(file.corrupt("qcow2 header", off, r));
        if self.crypt_method != 0 || self.has_encryption_header {
            return Err(Error::unsupported(
                file.name(),
                format!(
                    "reading encrypted images ({} encryption)",
                    match self.crypt_method {
                        1 => "AES",
                        2 => "LUKS",
                        _ => "full disk",
                    }
                ),
            ));
        }
        let unknown = self.incompatible_features & !incompatible::KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros() as u8;
            return Err(Error::unsupported(
                file.name(),
                format!("qcow2 incompatible feature {}", self.feature_name(0, bit)),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return corrupt(
                72,
                "extended L2 entries need clusters of at least 16 KiB".into(),
            );
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return corrupt(24, format!("virtual size {} is too large", self.size));
        }
        // The L1 table must map the whole disk and lie inside the file, after the header.
        let per_l1 = cs * self.l2_entries();
        let needed = self.size.div_ceil(per_l1);
        if u64::from(self.l1_size) < needed {
            return corrupt(
                36,
                format!(
                    "L1 table of {} entries cannot map {} bytes ({needed} needed)",
                    self.l1_size, self.size
                ),
            );
        }
        let l1_bytes = 8 * u64::from(self.l1_size);
        if l1_bytes > MAX_L1_BYTES {
            return corrupt(
                36,
                format!("L1 table of {} entries is too large", self.l1_size),
            );
        }
        self.check_table(file, "L1 table", self.l1_table_offset, l1_bytes, 40)?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return corrupt(
                56,
                format!(
                    "refcount table of {} clusters is too large",
                    self.refcount_table_clusters
                ),
            );
        }
        self.check_table(
            file,
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            48,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt(60, format!("{} snapshots is too many", self.nb_snapshots));
        }
        if self.nb_snapshots > 0 {
            self.check_table(file, "snapshot table", self.snapshots_offset, 40, 64)?;
        }
        if self.incompatible_features & incompatible::DATA_FILE != 0 && self.data_file.is_none() {
            return Err(Error::unsupported(
                file.name(),
                "qcow2 image with an external data file whose name is not in the image \
                 (qemu needs -o data_file=...)",
            ));
        }
        Ok(())
    }

    /// Checks that a table of `len` bytes at `offset` is cluster-aligned, inside the
    /// file and not over the header.
    fn check_table(
        &self,
        file: &ImageFile,
        what: &'static str,
        offset: u64,
        len: u64,
        field: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        if len == 0 {
            return Ok(());
        }
        if offset % cs != 0 {
            return Err(file.corrupt(
                what,
                offset,
                format!("offset {offset:#x} (header byte {field}) is not cluster-aligned"),
            ));
        }
        if offset < cs {
            return Err(file.corrupt(
                what,
                offset,
                format!("offset {offset:#x} (header byte {field}) overlaps the header"),
            ));
        }
        file.check_range(what, offset, len)
    }
}
