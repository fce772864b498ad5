//! The VDI reader on hand-built images: zero blocks (which VirtualBox writes after
//! compaction and qemu-img never does), static images, and invalid block maps.

use vconvert_core::{ExtentKind, ImageFile, ImageReader, Location};
use vconvert_testkit::{check_reader_consistency, read_all};
use vconvert_vdi::{BlockEntry, ImageType, VdiHeader, VdiReader};

const BS: u32 = 1 << 20;

fn header(blocks: u32, allocated: u32) -> VdiHeader {
    VdiHeader {
        header_size: 0x180,
        image_type: ImageType::Dynamic,
        image_flags: 0,
        block_map_offset: 0x200,
        data_offset: 0x400,
        geometry: (0, 0, 0),
        sector_size: 512,
        disk_size: u64::from(blocks) * u64::from(BS),
        block_size: BS,
        block_extra: 0,
        blocks,
        blocks_allocated: allocated,
        uuid_image: [1; 16],
        uuid_last_snap: [2; 16],
        uuid_link: [0; 16],
        uuid_parent: [0; 16],
    }
}

/// An image with `entries`; data block `i` is filled with byte `i + 1`.
fn image(h: &VdiHeader, entries: &[u32]) -> Vec<u8> {
    let mut b = h.encode().to_vec();
    b.resize(h.data_offset as usize, 0);
    for (i, e) in entries.iter().enumerate() {
        let at = h.block_map_offset as usize + 4 * i;
        b[at..at + 4].copy_from_slice(&e.to_le_bytes());
    }
    for i in 0..h.blocks_allocated {
        b.extend(std::iter::repeat_n(i as u8 + 1, BS as usize));
    }
    b
}

fn open(bytes: Vec<u8>) -> vconvert_core::Result<VdiReader> {
    VdiReader::open(ImageFile::from_bytes("hand.vdi", bytes))
}

#[test]
fn zero_free_and_allocated_blocks() {
    let h = header(4, 2);
    let img = open(image(&h, &[1, 0xffff_fffe, 0xffff_ffff, 0])).unwrap();
    let map = img.block_map(0..4 * u64::from(BS)).unwrap();
    let kinds: Vec<_> = map.extents().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            ExtentKind::Data(Location::File {
                file: 0,
                offset: 0x400 + u64::from(BS)
            }),
            ExtentKind::Zero,
            ExtentKind::Unallocated,
            ExtentKind::Data(Location::File {
                file: 0,
                offset: 0x400
            }),
        ]
    );
    check_reader_consistency(&img).unwrap();
    let all = read_all(&img).unwrap();
    let bs = BS as usize;
    assert!(all[..bs].iter().all(|&b| b == 2));
    assert!(all[bs..3 * bs].iter().all(|&b| b == 0));
    assert!(all[3 * bs..].iter().all(|&b| b == 1));
    let report = img.check().unwrap().unwrap();
    assert!(report.corruptions.is_empty(), "{report:?}");
    assert_eq!(BlockEntry::from_u32(0xffff_fffe), BlockEntry::Zero);
}

#[test]
fn invalid_block_maps_are_refused_with_offsets() {
    let h = header(3, 2);
    // Duplicate data block.
    let e = open(image(&h, &[0, 0, 1])).unwrap_err().to_string();
    assert!(
        e.contains("hand.vdi") && e.contains("block map") && e.contains("0x204"),
        "{e}"
    );
    // Entry beyond blocks allocated.
    let e = open(image(&h, &[0, 2, 0xffff_ffff]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only 2 are allocated"), "{e}");
    // Disk size larger than the blocks.
    let mut big = header(3, 0);
    big.disk_size = 4 * u64::from(BS);
    let e = open(image(&big, &[0xffff_ffff; 3]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit"), "{e}");
    // Block map past the end of the file.
    let mut far = header(3, 0);
    far.block_map_offset = 0x10_0000;
    far.data_offset = 0x20_0000;
    let e = open(far.encode().to_vec()).unwrap_err().to_string();
    assert!(e.contains("block map"), "{e}");
    // Differencing images name the reason.
    let mut diff = header(3, 0);
    diff.uuid_parent = [9; 16];
    let e = open(image(&diff, &[0xffff_ffff; 3]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("differencing") && e.contains("media registry"),
        "{e}"
    );
    // Data block missing from a truncated file.
    let mut bytes = image(&h, &[0, 1, 0xffff_ffff]);
    bytes.truncate(0x400 + BS as usize);
    let e = open(bytes).unwrap_err().to_string();
    assert!(e.contains("past the end of the file"), "{e}");
}

#[test]
fn wrong_allocation_count_is_a_check_corruption() {
    // The header says two blocks are allocated; the map uses one.
    let h = header(3, 2);
    let bytes = image(&h, &[0, 0xffff_ffff, 0xffff_ffff]);
    let img = open(bytes).unwrap();
    let report = img.check().unwrap().unwrap();
    assert_eq!(report.corruptions.len(), 1, "{report:?}");
}

#[test]
fn older_header_versions_read_like_1_1() {
    // Version 1.0: the 1.1 layout.
    let h = header(2, 1);
    let mut bytes = image(&h, &[0, 0xffff_ffff]);
    bytes[0x44..0x48].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    let img = open(bytes).unwrap();
    let all = read_all(&img).unwrap();
    assert!(all[..BS as usize].iter().all(|&b| b == 1));
    assert!(all[BS as usize..].iter().all(|&b| b == 0));

    // Version 0.x (VDIHEADER0): the block map right after the header at 0x1a4, data
    // right after the map.
    let mut b = vec![0u8; 0x1a4];
    b[..8].copy_from_slice(b"<<< Inno");
    b[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
    b[0x44..0x48].copy_from_slice(&0x0000_0001u32.to_le_bytes());
    b[0x48..0x4c].copy_from_slice(&1u32.to_le_bytes()); // dynamic
    b[0x160..0x168].copy_from_slice(&(3 * u64::from(BS)).to_le_bytes());
    b[0x168..0x16c].copy_from_slice(&BS.to_le_bytes());
    b[0x16c..0x170].copy_from_slice(&3u32.to_le_bytes());
    b[0x170..0x174].copy_from_slice(&1u32.to_le_bytes());
    for e in [0xffff_ffffu32, 0, 0xffff_fffe] {
        b.extend_from_slice(&e.to_le_bytes());
    }
    b.extend(std::iter::repeat_n(0x5a, BS as usize));
    let img = open(b).unwrap();
    check_reader_consistency(&img).unwrap();
    let all = read_all(&img).unwrap();
    let bs = BS as usize;
    assert_eq!(all.len(), 3 * bs);
    assert!(all[..bs].iter().all(|&x| x == 0));
    assert!(all[bs..2 * bs].iter().all(|&x| x == 0x5a));
    assert!(all[2 * bs..].iter().all(|&x| x == 0));
    // Unknown majors are refused by name.
    let mut bytes = image(&h, &[0, 0xffff_ffff]);
    bytes[0x44..0x48].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    let e = open(bytes).unwrap_err().to_string();
    assert!(e.contains("version 2.0"), "{e}");
}
