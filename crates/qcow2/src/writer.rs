//! Writing qcow2 images.
/// Writes a qcow2 image.
#[derive(Debug)]
pub struct Qcow2Writer;
