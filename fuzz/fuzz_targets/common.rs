//! Shared body of the fuzz targets: open arbitrary bytes (an in-memory file, no other
//! file may be opened) as a format, then map, read and "convert to raw in memory".

use vconvert_core::{Format, ImageFile};
use vconvert_engine::{open_file, OpenOptions};

/// Largest virtual disk a run reads completely; bigger ones are only sampled, so a run
/// measures bugs, not out-of-memory.
const READ_ALL_LIMIT: u64 = 64 << 20;

/// Opens `data` as `format` (or probed) and exercises the reader.
pub fn exercise(data: &[u8], format: Option<Format>) {
    let file = ImageFile::from_bytes("fuzz.img", data.to_vec());
    let Ok(img) = open_file(file, format, &OpenOptions::default()) else {
        return;
    };
    let _ = img.info();
    let _ = img.safety_findings();
    let size = img.virtual_size();
    let Ok(map) = img.block_map(0..size.min(1 << 40)) else {
        return;
    };
    assert!(
        map.check_invariants().is_ok(),
        "block map invariants: {:?}",
        map.check_invariants()
    );
    if size <= READ_ALL_LIMIT {
        // The in-memory conversion to raw: every data extent read into one buffer.
        let mut disk = vec![0u8; size as usize];
        for e in map.extents().iter().filter(|e| e.kind.is_data()) {
            let r = e.start as usize..e.end() as usize;
            let _ = img.read_at(&mut disk[r], e.start);
        }
    } else {
        let mut buf = vec![0u8; 1 << 16];
        for e in map.extents().iter().filter(|e| e.kind.is_data()).take(64) {
            let n = e.len.min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], e.start);
        }
    }
}
