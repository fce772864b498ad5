//! Holder of the micro-benchmarks (`benches/kernels.rs`); run them with
//! `cargo bench -p vconvert-benches`. The side-by-side comparison with qemu-img is
//! `cargo xtask bench` (see README.md in this directory).
