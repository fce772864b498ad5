//! The import workflow of one upload: inspect → convert → inspect again → hash →
//! store. Blocking; it runs on a worker thread, and the conversion on threads borrowed
//! from the service's one budget ([`Job::threads`]). It knows the store only through [`Store`] and records nothing in the
//! database: the caller turns its result into task and image state.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vconvert_core::{Format, Options};
use vconvert_engine::{
    CancelToken, ConvertOptions, OpenOptions, Policy, RawBytes, RawObserver, ThreadBudget,
};

use crate::config::{disk_format_name, DiskFormat};
use crate::db::Stored;
pub use crate::digest::hex;
use crate::digest::Digests;
use crate::failpoint;
use crate::store::Store;
use crate::workspace::Workspace;

/// What one import needs.
pub struct Job<'a> {
    /// The image.
    pub image_id: &'a str,
    /// Its task (names the workspace hold and output file).
    pub task_id: &'a str,
    /// The format the user declared.
    pub declared: DiskFormat,
    /// The staged upload.
    pub staging: &'a Path,
    /// The format to store.
    pub target: Format,
    /// The inspection policy.
    pub policy: &'a Policy,
    /// Bytes per second the conversion may process.
    pub rate_limit: Option<u64>,
    /// The worker threads shared by every running conversion (the service's one
    /// budget): the conversion borrows from it instead of starting threads per core.
    pub threads: &'a ThreadBudget,
    /// Cancels the import.
    pub cancel: &'a CancelToken,
    /// Told what the import is doing (the task's message).
    pub progress: &'a (dyn Fn(&str) + Sync),
    /// Records what is about to be stored, before it is put in the store (the task's
    /// intent, which lets the startup recovery record a stored object whose import
    /// was interrupted before it was recorded). An error stops the import.
    pub record: &'a (dyn Fn(&Stored) -> Result<(), String> + Sync),
}

/// MD5 and SHA-512 (hex) of a file, and its length.
pub fn hashes(path: &Path) -> std::io::Result<(String, String, u64)> {
    hashes_of(&mut std::fs::File::open(path)?)
}

/// MD5 and SHA-512 (hex) of what `f` reads, and its length (the two on threads of
/// their own, see [`Digests`]).
pub fn hashes_of(f: &mut dyn Read) -> std::io::Result<(String, String, u64)> {
    Digests::of_reader(f)
}

/// The engine's format names in an engine message, as Glance's users know them (the
/// engine's `vpc` is Glance's `vhd`).
fn glance_names(msg: &str) -> String {
    msg.replace("declared format vpc", "declared format vhd")
        .replace("which is vpc", "which is vhd")
}

/// Runs the workflow; the stored file is in `store` under the image id when it
/// returns `Ok`. On error nothing of it is left in the workspace or the store (the
/// staged upload is the caller's).
pub fn run(job: &Job<'_>, workspace: &Workspace, store: &dyn Store) -> Result<Stored, String> {
    let output = workspace.output_path(job.task_id);
    // The user sees "the upload" and "the converted image", not workspace paths.
    let result = run_inner(job, workspace, store, &output).map_err(|e| {
        e.replace(&job.staging.display().to_string(), "the upload")
            .replace(&output.display().to_string(), "the converted image")
    });
    let _ = std::fs::remove_file(&output);
    workspace.release(&format!("convert:{}", job.task_id));
    result
}

fn run_inner(
    job: &Job<'_>,
    workspace: &Workspace,
    store: &dyn Store,
    output: &Path,
) -> Result<Stored, String> {
    (job.progress)("inspecting the upload");
    // The checksums, when the conversion computed them as it wrote.
    let mut hashed = None;
    let (stored_from, stored_format, virtual_size): (PathBuf, &str, u64) = match job.declared {
        DiskFormat::Iso => {
            // The engine's ISO rules: ISO 9660 / UDF content, no other format in
            // disguise (a polyglot), the partition-table checks.
            let report = vconvert_engine::inspect_as(
                job.staging,
                Some(vconvert_engine::DeclaredFormat::Iso),
                job.policy,
            )
            .map_err(|e| format!("cannot inspect the upload: {e}"))?;
            if !report.violations.is_empty() {
                return Err(format!("image refused: {}", report.violations.join("; ")));
            }
            (job.staging.to_path_buf(), "iso", report.actual_size)
        }
        DiskFormat::Engine(declared) => {
            let report = vconvert_engine::inspect(job.staging, Some(declared), job.policy)
                .map_err(|e| format!("cannot inspect the upload: {e}"))?;
            if !report.violations.is_empty() {
                return Err(glance_names(&format!(
                    "image refused: {}",
                    report.violations.join("; ")
                )));
            }
            let src = vconvert_engine::open(job.staging, Some(declared), &OpenOptions::default())
                .map_err(|e| {
                format!("cannot open the {} upload: {e}", disk_format_name(declared))
            })?;
            let virtual_size = src.virtual_size();
            let target = job.target;
            if target == Format::Raw && store.writes_raw_directly() {
                // Straight from the engine into the store: no workspace file.
                return store_raw_directly(job, store, src.as_ref(), declared, virtual_size);
            }
            if declared == target {
                (
                    job.staging.to_path_buf(),
                    disk_format_name(target),
                    virtual_size,
                )
            } else {
                hashed = convert(job, workspace, src.as_ref(), declared, output)?;
                (output.to_path_buf(), disk_format_name(target), virtual_size)
            }
        }
    };
    if job.cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    let (checksum, sha512, size) = match hashed {
        Some(h) => h,
        None => {
            (job.progress)("computing checksums");
            hashes(&stored_from)
                .map_err(|e| format!("cannot read {}: {e}", stored_from.display()))?
        }
    };
    failpoint::hit("hash.done");
    if job.cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    let stored = Stored {
        disk_format: stored_format.to_string(),
        size,
        virtual_size,
        checksum,
        sha512,
    };
    (job.progress)("storing the image");
    // The intent first: a crash after the put finds in the task what the stored object
    // must be, and recovery records it instead of leaving it orphaned (or removes it).
    (job.record)(&stored)?;
    failpoint::hit("store.intent");
    store
        .put(job.image_id, &stored_from)
        .map_err(|e| format!("cannot store the image: {e}"))?;
    failpoint::hit("store.moved");
    Ok(stored)
}

/// Converts the upload to `output`; a raw output is hashed as it is written (its
/// checksums returned), saving a second pass over it.
fn convert(
    job: &Job<'_>,
    workspace: &Workspace,
    src: &dyn vconvert_core::ImageReader,
    declared: Format,
    output: &Path,
) -> Result<Option<(String, String, u64)>, String> {
    let target = job.target;
    let need = vconvert_engine::measure(Some(src), 0, target, &Options::new())
        .map_err(|e| e.to_string())?;
    workspace.hold_wait(
        &format!("convert:{}", job.task_id),
        need.required,
        job.cancel,
        |used| {
            (job.progress)(&format!(
                "waiting for workspace: the conversion needs {} bytes; {used} of {} bytes in use",
                need.required,
                workspace.capacity()
            ))
        },
    )?;
    let digests = match target {
        Format::Raw => Some(Mutex::new(
            Digests::new().map_err(|e| format!("cannot start hashing: {e}"))?,
        )),
        _ => None,
    };
    let observe = |bytes: RawBytes<'_>| {
        if let Some(Ok(mut d)) = digests.as_ref().map(|d| d.lock()) {
            match bytes {
                RawBytes::Data(b) => d.data(b),
                RawBytes::Zeros(n) => d.zeros(n),
            }
        }
    };
    let observe_raw = digests.as_ref().map(|_| &observe as RawObserver<'_>);
    with_convert_options(job, declared, observe_raw, |opts| {
        vconvert_engine::convert(src, output, target, Options::new(), opts)
    })?;
    failpoint::hit("convert.done");
    let check =
        vconvert_engine::inspect(output, Some(target), job.policy).map_err(|e| e.to_string())?;
    if !check.violations.is_empty() {
        return Err(format!(
            "converted image refused: {}",
            check.violations.join("; ")
        ));
    }
    let Some(digests) = digests else {
        return Ok(None);
    };
    (job.progress)("computing checksums");
    let hashed = digests
        .into_inner()
        .map_err(|_| "hashing failed".to_string())?
        .finish()
        .map_err(|e| format!("cannot hash the converted image: {e}"))?;
    // What was hashed is the file that will be stored (a mismatch would be a bug).
    let len = std::fs::metadata(output).map_err(|e| e.to_string())?.len();
    if hashed.2 != len {
        return Err(format!(
            "the converted image holds {len} bytes but {} were hashed",
            hashed.2
        ));
    }
    Ok(Some(hashed))
}

/// Runs `f` with the job's conversion options (cancel, rate limit, progress reported
/// as the task's message, the raw output's observer); its error becomes the task's
/// message.
fn with_convert_options(
    job: &Job<'_>,
    declared: Format,
    observe_raw: Option<RawObserver<'_>>,
    f: impl FnOnce(&ConvertOptions<'_>) -> vconvert_core::Result<()>,
) -> Result<(), String> {
    let label = format!(
        "converting {} to {}",
        disk_format_name(declared),
        disk_format_name(job.target)
    );
    let last = Mutex::new(Instant::now() - Duration::from_secs(1));
    let progress = |done: u64, total: u64| {
        failpoint::hit("convert.progress");
        if let Ok(mut l) = last.lock() {
            if l.elapsed() >= Duration::from_millis(250) || done == total {
                *l = Instant::now();
                let pct = if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                };
                (job.progress)(&format!("{label}: {pct:.1}% ({done} of {total} bytes)"));
            }
        }
    };
    let opts = ConvertOptions {
        cancel: job.cancel.clone(),
        progress: Some(&progress),
        rate_limit: job.rate_limit,
        shared_threads: Some(job.threads.clone()),
        observe_raw,
        ..ConvertOptions::default()
    };
    f(&opts).map_err(|e| match e {
        vconvert_core::Error::Cancelled => "cancelled".to_string(),
        e => format!(
            "conversion of the {} upload failed: {e}",
            disk_format_name(declared)
        ),
    })
}

/// A raw target in a store that takes it straight from the engine (RBD): the
/// conversion writes the data into the store and hashes the image as it goes (no
/// read-back), then the stored image is recorded. Nothing of it stays in the store on
/// error. The workspace holds only the staged upload.
fn store_raw_directly(
    job: &Job<'_>,
    store: &dyn Store,
    src: &dyn vconvert_core::ImageReader,
    declared: Format,
    virtual_size: u64,
) -> Result<Stored, String> {
    let mut digests = Digests::new().map_err(|e| format!("cannot start hashing: {e}"))?;
    let mut observe = |b: &[u8]| digests.data(b);
    with_convert_options(job, declared, None, |opts| {
        store.put_raw(job.image_id, src, opts, &mut observe)
    })?;
    failpoint::hit("convert.done");
    let result = (|| {
        let (checksum, sha512, size) = digests
            .finish()
            .map_err(|e| format!("cannot hash the converted image: {e}"))?;
        if size != virtual_size {
            return Err(format!(
                "the conversion produced {size} bytes for a virtual size of {virtual_size}"
            ));
        }
        failpoint::hit("hash.done");
        if job.cancel.is_cancelled() {
            return Err("cancelled".to_string());
        }
        let stored = Stored {
            disk_format: disk_format_name(Format::Raw).to_string(),
            size,
            virtual_size,
            checksum,
            sha512,
        };
        (job.record)(&stored)?;
        failpoint::hit("store.intent");
        failpoint::hit("store.moved");
        Ok(stored)
    })();
    if result.is_err() {
        let _ = store.delete(job.image_id);
    }
    result
}

#[cfg(test)]
mod tests {
    use md5::Md5;
    use sha2::{Digest, Sha512};

    /// Reads at most 7777 bytes at a time (odd sizes, many calls).
    struct Dribble<'a>(&'a [u8]);

    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(7777);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn hashes_of_equals_one_shot_digests() {
        let data: Vec<u8> = (0..(5u32 << 20) / 2 + 5)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (md5, sha, n) = super::hashes_of(&mut Dribble(&data)).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(md5, super::hex(&Md5::digest(&data)));
        assert_eq!(sha, super::hex(&Sha512::digest(&data)));
        let (md5, _, n) = super::hashes_of(&mut Dribble(&[])).unwrap();
        assert_eq!((md5.as_str(), n), ("d41d8cd98f00b204e9800998ecf8427e", 0));
    }

    #[test]
    fn engine_names_become_glance_names() {
        assert_eq!(
            super::glance_names("declared format vpc does not match the content, which is qcow2"),
            "declared format vhd does not match the content, which is qcow2"
        );
        assert_eq!(
            super::glance_names("declared format raw does not match the content, which is vpc"),
            "declared format raw does not match the content, which is vhd"
        );
    }
}
