//! Reads an RBD image sequentially and prints the throughput (a development probe):
//! `cargo run --release -p vconvert-rbd --example readback -- CONF POOL IMAGE [PIECE]`.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let c = vconvert_rbd::Cluster::connect(Some(std::path::Path::new(&a[1])), None).unwrap();
    let img = c.pool(&a[2]).unwrap().open_read_only(&a[3]).unwrap();
    let piece: usize = a.get(4).map_or(8 << 20, |p| p.parse().unwrap());
    let size = img.size().unwrap();
    let mut buf = vec![0u8; piece];
    let t = std::time::Instant::now();
    let mut pos = 0;
    while pos < size {
        pos += img.read_at(&mut buf, pos).unwrap() as u64;
    }
    println!("{size} bytes in {:.2} s", t.elapsed().as_secs_f64());
}
