//! `qemu-img commit`: writes what the layers above a base image store into the base
//! (the immediate backing file, or `-b BASE` further down), then empties the top image
//! unless `-d` (or `-b`, which implies it, as in qemu-img).
//!
//! The top image's view does not change while the base is written (the top still
//! holds every committed cluster), so a crash midway leaves the chain reading as
//! before, and each image consistent (leaks at worst); emptying comes last.

use std::path::{Path, PathBuf};

use vconvert_core::{Error, Format, ImageReader, Result};

use crate::OpenOptions;

/// Commits the image at `path` into `base` (a file name, as given on the command line;
/// `None`: its backing file). With `drop` (or a `base`), the top image is kept as it
/// is; otherwise it is emptied.
pub fn commit(path: &Path, format: Option<Format>, base: Option<&Path>, drop: bool) -> Result<()> {
    let opts = OpenOptions {
        allow_external_files: true,
        allow_corrupt: false,
        snapshot: None,
    };
    let top = crate::open(path, format, &opts)?;
    if top.format() != Format::Qcow2 {
        return Err(Error::invalid(format!(
            "{}: committing {} images is not supported (qcow2 only)",
            path.display(),
            top.format()
        )));
    }
    // The chain below the top: (path, format, reader) of each backing image.
    let mut layers: Vec<&dyn ImageReader> = vec![top.as_ref()];
    let mut chain: Vec<(PathBuf, Format)> = Vec::new();
    let mut cur: &dyn ImageReader = top.as_ref();
    while let Some(b) = cur.backing() {
        let info = cur.info()?;
        let p = info
            .full_backing_file
            .or(info.backing_file)
            .ok_or_else(|| Error::invalid("backing image without a name"))?;
        chain.push((PathBuf::from(p), b.format()));
        layers.push(b);
        cur = b;
    }
    if chain.is_empty() {
        return Err(Error::invalid(format!(
            "{}: Image does not have a backing file",
            path.display()
        )));
    }
    let depth = match base {
        None => 0,
        Some(b) => {
            let want = std::fs::canonicalize(b)
                .map_err(|e| Error::io(b.display().to_string(), "cannot find the base", e))?;
            chain
                .iter()
                .position(|(p, _)| std::fs::canonicalize(p).is_ok_and(|c| c == want))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "Did not find '{}' in the backing chain of '{}'",
                        b.display(),
                        path.display()
                    ))
                })?
        }
    };
    let (base_path, base_format) = chain[depth].clone();
    let size = top.virtual_size();
    // A base smaller than the top grows first, as qemu-img grows it.
    let grow_base = size > layers[depth + 1].virtual_size();
    // Ranges the layers above the base allocate.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for layer in &layers[..=depth] {
        let mut pos = 0;
        while pos < size.min(layer.virtual_size()) {
            let end = size.min(layer.virtual_size()).min(pos + (1 << 30));
            for s in layer.layer_status(pos..end)? {
                if s.allocated() {
                    ranges.push((s.start, s.end()));
                }
            }
            pos = end;
        }
    }
    ranges.sort_unstable();
    if grow_base {
        crate::resize(
            &base_path,
            Some(base_format),
            &size.to_string(),
            &crate::ResizeOptions::default(),
        )?;
    }
    let base_file = BaseWriter::open(&base_path, base_format)?;
    let grain = base_file.grain();
    let mut clusters = match &base_file {
        BaseWriter::Qcow2(r, f) => Some(vconvert_qcow2::ClusterWriter::new(r, f)?),
        BaseWriter::Raw(..) => None,
    };
    let mut buf = Vec::new();
    let mut last_done: Option<u64> = None;
    let mut written = 0u64;
    for (start, end) in ranges {
        let mut c = start / grain;
        while c * grain < end {
            if last_done.is_none_or(|d| c > d) {
                let off = c * grain;
                let len = grain.min(size - off);
                buf.resize(len as usize, 0);
                top.read_at(&mut buf, off)?;
                match &mut clusters {
                    Some(cw) => cw.write_cluster(c, &buf)?,
                    None => base_file.write_raw(off, &buf)?,
                }
                last_done = Some(c);
                written += 1;
                if written == 1 {
                    vconvert_core::fail_point("commit-copying");
                }
            }
            c += 1;
        }
    }
    std::mem::drop(clusters);
    base_file.finish()?;
    vconvert_core::fail_point("commit-copied");
    drop_top(path, base.is_some() || drop, top)
}

fn drop_top(path: &Path, keep: bool, top: Box<dyn ImageReader>) -> Result<()> {
    drop(top);
    if keep {
        return Ok(());
    }
    let (reader, rw) = crate::registry::open_qcow2_rw(path)?;
    vconvert_qcow2::make_empty(&reader, &rw)
}

/// Where committed clusters go.
enum BaseWriter {
    Raw(std::fs::File, String),
    Qcow2(Box<vconvert_qcow2::Qcow2Reader>, Box<std::fs::File>),
}

impl BaseWriter {
    fn open(path: &Path, format: Format) -> Result<Self> {
        match format {
            Format::Raw => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(path.display().to_string(), "cannot open", e))?;
                Ok(BaseWriter::Raw(f, path.display().to_string()))
            }
            Format::Qcow2 => {
                let (r, f) = crate::registry::open_qcow2_rw(path)?;
                Ok(BaseWriter::Qcow2(Box::new(r), Box::new(f)))
            }
            other => Err(Error::unsupported(
                path.display().to_string(),
                format!("committing into a {other} base"),
            )),
        }
    }

    /// Bytes written at a time: the base's cluster size (64 KiB for raw).
    fn grain(&self) -> u64 {
        match self {
            BaseWriter::Raw(..) => 64 << 10,
            BaseWriter::Qcow2(r, _) => r.header().cluster_size(),
        }
    }

    fn write_raw(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            BaseWriter::Raw(f, name) => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(data, offset).map_err(|e| {
                    Error::io(
                        name.as_str(),
                        format!("cannot write at offset {offset:#x}"),
                        e,
                    )
                })
            }
            BaseWriter::Qcow2(..) => Err(Error::invalid("a qcow2 base takes clusters")),
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            BaseWriter::Raw(f, name) => f.sync_all().map_err(|e| Error::io(name, "cannot sync", e)),
            BaseWriter::Qcow2(..) => Ok(()),
        }
    }
}
