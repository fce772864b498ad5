//! The import workflow: create → stage → import (inspect, convert, hash, store) with
//! bounded workers, a workspace quota, and recovery after a crash.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use md5::Md5;
use serde_json::{json, Value};
use sha2::{Digest, Sha512};
use vconvert_core::{Identity, Options};
use vconvert_engine::{CancelToken, ConvertOptions, OpenOptions, Policy};

use crate::config::{disk_format_name, parse_disk_format, Config};
use crate::db::{now, Db, Image, Stored, Task};
use crate::failpoint;
use crate::workspace::Workspace;

/// An API error: HTTP status and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
}

/// Result of an API call: status and JSON body.
pub type ApiResult = Result<(u16, Value), ApiError>;

fn api(status: u16, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    api(500, e.to_string())
}

/// The running service.
#[derive(Debug)]
pub struct Service {
    /// Its configuration.
    pub config: Config,
    /// The bearer token clients must present.
    pub token: String,
    db: Db,
    workspace: Workspace,
    queue: Mutex<VecDeque<String>>,
    queued: Condvar,
    cancels: Mutex<HashMap<String, CancelToken>>,
    /// Serialises check-then-set state transitions of images.
    transitions: Mutex<()>,
}

fn image_json(i: &Image) -> Value {
    json!({
        "id": i.id,
        "name": i.name,
        "status": i.status,
        "disk_format": i.disk_format,
        "container_format": i.container_format,
        "size": i.size,
        "virtual_size": i.virtual_size,
        "checksum": i.checksum,
        "os_hash_algo": i.os_hash_value.as_ref().map(|_| "sha512"),
        "os_hash_value": i.os_hash_value,
        "os_glance_import_task": i.task_id,
        "created_at": i.created_at,
        "updated_at": i.updated_at,
        "self": format!("/v2/images/{}", i.id),
        "file": format!("/v2/images/{}/file", i.id),
        "schema": "/v2/schemas/image",
    })
}

fn task_json(t: &Task) -> Value {
    json!({
        "id": t.id,
        "type": "api_image_import",
        "status": t.status,
        "message": t.message,
        "input": {"image_id": t.image_id},
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "self": format!("/v2/tasks/{}", t.id),
    })
}

fn new_id() -> Result<String, ApiError> {
    let b = Identity::new(None).uuid_v4().map_err(internal)?;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| api(400, format!("request body is not valid JSON: {e}")))
}

/// Moves `from` to `to`, copying when they are on different filesystems, and syncs the
/// target's directory so the move survives a power loss too.
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    let sync_dir = || match to.parent() {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    };
    if std::fs::rename(from, to).is_ok() {
        return sync_dir();
    }
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to)?;
    sync_dir()?;
    std::fs::remove_file(from)
}

/// The message of a successful import task.
fn success_message(s: &Stored) -> String {
    format!("imported: stored as {} ({} bytes)", s.disk_format, s.size)
}

/// MD5 and SHA-512 (hex) of a file.
fn hashes(path: &Path) -> std::io::Result<(String, String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let (mut md5, mut sha) = (Md5::new(), Sha512::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
        n_total += n as u64;
        failpoint::hit("hash.reading");
    }
    failpoint::hit("hash.done");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok((hex(&md5.finalize()), hex(&sha.finalize()), n_total))
}

impl Service {
    /// Opens the database and workspace, recovers from a previous crash, and starts
    /// `max_workers` workers.
    pub fn start(config: Config) -> Result<Arc<Service>, String> {
        failpoint::init()?;
        for d in [&config.data_dir, &config.store_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        if let Some(parent) = config
            .database
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let token = match &config.token {
            Some(t) => t.clone(),
            None => Self::generated_token(&config.data_dir)?,
        };
        let db = Db::open(&config.database)?;
        let workspace =
            Workspace::new(&config.workspace_dir, config.workspace_bytes).map_err(|e| {
                format!(
                    "cannot create workspace {}: {e}",
                    config.workspace_dir.display()
                )
            })?;
        let service = Arc::new(Service {
            token,
            db,
            workspace,
            queue: Mutex::new(VecDeque::new()),
            queued: Condvar::new(),
            cancels: Mutex::new(HashMap::new()),
            transitions: Mutex::new(()),
            config,
        });
        service.recover()?;
        for i in 0..service.config.max_workers {
            let s = service.clone();
            std::thread::Builder::new()
                .name(format!("vimport-worker-{i}"))
                .spawn(move || s.worker_loop())
                .map_err(|e| format!("cannot start worker: {e}"))?;
        }
        Ok(service)
    }

    /// The token stored in `data_dir/token`, made on first start.
    fn generated_token(data_dir: &Path) -> Result<String, String> {
        let path = data_dir.join("token");
        if let Ok(t) = std::fs::read_to_string(&path) {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        let mut id = Identity::new(None);
        let t = format!(
            "{:016x}{:016x}",
            id.next_u64().map_err(|e| e.to_string())?,
            id.next_u64().map_err(|e| e.to_string())?
        );
        let mut f = std::fs::OpenOptions::new();
        f.write(true).create(true).truncate(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
        f.open(&path)
            .and_then(|mut f| f.write_all(t.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(t)
    }

    /// After a crash: fail interrupted tasks, return their images to `queued`, keep only
    /// complete staged uploads, and remove every other workspace file.
    fn recover(&self) -> Result<(), String> {
        for status in ["pending", "processing"] {
            for t in self.db.tasks_in(status)? {
                if self.finish_interrupted(&t)? {
                    continue;
                }
                self.db.fail_import(
                    &t.id,
                    &t.image_id,
                    "interrupted: vimport stopped during this import; stage the image again",
                )?;
            }
        }
        self.reconcile_store()?;
        let mut keep: Vec<PathBuf> = Vec::new();
        for mut img in self.db.images()? {
            let staging = self.workspace.staging_path(&img.id);
            let staged_ok = img.status == "uploading" && img.staged && staging.is_file();
            if staged_ok {
                let size = std::fs::metadata(&staging).map_or(0, |m| m.len());
                // Staged data survives a restart even if the quota shrank meanwhile.
                if !self.workspace.try_hold(&format!("stage:{}", img.id), size) {
                    self.workspace.release(&format!("stage:{}", img.id));
                }
                keep.push(staging);
            } else if img.status == "importing" || img.status == "uploading" {
                img.status = "queued".into();
                img.staged = false;
                self.db.update_image(&img)?;
            }
        }
        for f in self.workspace.files() {
            if !keep.contains(&f) {
                let _ = std::fs::remove_file(&f);
            }
        }
        Ok(())
    }

    /// An interrupted task whose stored object is complete (in the store, with the size
    /// and checksums it recorded before the move) is finished: the task succeeds and its
    /// image turns active. Returns whether it was.
    fn finish_interrupted(&self, t: &Task) -> Result<bool, String> {
        let Some(stored) = self.db.intent(&t.id)? else {
            return Ok(false);
        };
        let path = self.config.store_dir.join(&t.image_id);
        let Ok(meta) = std::fs::metadata(&path) else {
            return Ok(false);
        };
        if meta.len() != stored.size {
            return Ok(false);
        }
        let Ok((md5, sha512, _)) = hashes(&path) else {
            return Ok(false);
        };
        if md5 != stored.checksum || sha512 != stored.sha512 {
            eprintln!(
                "vimport: recovery: {} does not hold what task {} recorded; not recorded",
                path.display(),
                t.id
            );
            return Ok(false);
        }
        let done = self
            .db
            .finish_import(&t.id, &t.image_id, &stored, &success_message(&stored))?;
        if done {
            eprintln!(
                "vimport: recovery: import task {} of image {} had stored {} completely; recorded it",
                t.id,
                t.image_id,
                path.display()
            );
        }
        Ok(done)
    }

    /// Removes every store object that belongs to no active image, naming it.
    fn reconcile_store(&self) -> Result<(), String> {
        let active: std::collections::HashSet<String> = self
            .db
            .images()?
            .into_iter()
            .filter(|i| i.status == "active")
            .map(|i| i.id)
            .collect();
        let dir = &self.config.store_dir;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot list the store {}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if active.contains(&name) {
                continue;
            }
            let path = e.path();
            match std::fs::remove_file(&path) {
                Ok(()) => eprintln!(
                    "vimport: recovery: removed store object {} (no active image {name})",
                    path.display()
                ),
                Err(err) => eprintln!(
                    "vimport: recovery: cannot remove store object {} (no active image {name}): {err}",
                    path.display()
                ),
            }
        }
        Ok(())
    }

    /// The untrusted policy with the operator's VMDK types.
    fn policy(&self) -> Policy {
        Policy {
            vmdk_allowed_types: self.config.vmdk_allowed_types.clone(),
            ..Policy::untrusted()
        }
    }

    fn image_or_404(&self, id: &str) -> Result<Image, ApiError> {
        self.db
            .image(id)
            .map_err(internal)?
            .ok_or_else(|| api(404, format!("no image with id {id}")))
    }

    /// `GET /v2/info/import`.
    pub fn import_info(&self) -> ApiResult {
        Ok((
            200,
            json!({"import-methods": {"description": "Import methods available.", "type": "array", "value": ["glance-direct"]}}),
        ))
    }

    /// `POST /v2/images`.
    pub fn create_image(&self, body: &[u8]) -> ApiResult {
        let v = parse_json(body)?;
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let disk_format = v
            .get("disk_format")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                api(
                    400,
                    "disk_format is required (raw, qcow2, vdi, vmdk or vhd)",
                )
            })?;
        let format = parse_disk_format(disk_format).map_err(|e| api(400, e))?;
        let container = v
            .get("container_format")
            .and_then(Value::as_str)
            .unwrap_or("bare");
        if container != "bare" {
            return Err(api(
                400,
                format!("container_format '{container}' is not supported; use bare"),
            ));
        }
        let t = now();
        let img = Image {
            id: new_id()?,
            name,
            status: "queued".into(),
            disk_format: disk_format_name(format).into(),
            container_format: "bare".into(),
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_value: None,
            task_id: None,
            staged: false,
            created_at: t.clone(),
            updated_at: t,
        };
        self.db.insert_image(&img).map_err(internal)?;
        Ok((201, image_json(&img)))
    }

    /// `GET /v2/images/{id}`.
    pub fn get_image(&self, id: &str) -> ApiResult {
        Ok((200, image_json(&self.image_or_404(id)?)))
    }

    /// `GET /v2/images`.
    pub fn list_images(&self) -> ApiResult {
        let imgs = self.db.images().map_err(internal)?;
        Ok((
            200,
            json!({"images": imgs.iter().map(image_json).collect::<Vec<_>>(), "schema": "/v2/schemas/images"}),
        ))
    }

    /// `GET /v2/tasks/{id}`.
    pub fn get_task(&self, id: &str) -> ApiResult {
        let t = self
            .db
            .task(id)
            .map_err(internal)?
            .ok_or_else(|| api(404, format!("no task with id {id}")))?;
        Ok((200, task_json(&t)))
    }

    /// The stored file of an active image, for `GET /v2/images/{id}/file`.
    pub fn image_file(&self, id: &str) -> Result<Option<(std::fs::File, u64)>, ApiError> {
        let img = self.image_or_404(id)?;
        if img.status != "active" {
            return Ok(None);
        }
        let path = self.config.store_dir.join(&img.id);
        let f = std::fs::File::open(&path)
            .map_err(|e| internal(format!("stored file of image {id} is missing: {e}")))?;
        let len = f.metadata().map_err(internal)?.len();
        Ok(Some((f, len)))
    }

    /// `PUT /v2/images/{id}/stage`: streams `body` into the workspace.
    pub fn stage(&self, id: &str, body: &mut dyn Read, content_length: Option<u64>) -> ApiResult {
        let cap = self.config.image_size_cap;
        let key = format!("stage:{id}");
        let mut img = {
            let _t = self.transitions.lock().map_err(internal)?;
            let mut img = self.image_or_404(id)?;
            if img.status != "queued" {
                return Err(api(409, format!(
                    "image {id} is {}: data can be staged only while it is queued (once per import)",
                    img.status
                )));
            }
            if let Some(len) = content_length {
                if len > cap {
                    return Err(api(
                        413,
                        format!("the upload of {len} bytes exceeds image_size_cap ({cap} bytes)"),
                    ));
                }
                if !self.workspace.try_hold(&key, len) {
                    return Err(api(413, format!(
                        "workspace full: {len} bytes do not fit ({} of {} bytes in use); try again later",
                        self.workspace.used(),
                        self.workspace.capacity()
                    )));
                }
            }
            img.status = "uploading".into();
            img.staged = false;
            self.db.update_image(&img).map_err(internal)?;
            img
        };
        let path = self.workspace.staging_path(id);
        let result = self.receive(&path, body, content_length, &key, cap);
        match result {
            Ok(()) => {
                failpoint::hit("stage.received");
                let _t = self.transitions.lock().map_err(internal)?;
                let still = self.db.image(id).map_err(internal)?;
                if still.is_none_or(|i| i.status != "uploading") {
                    // Deleted while receiving: its upload must not stay in the workspace.
                    let _ = std::fs::remove_file(&path);
                    self.workspace.release(&key);
                    return Err(api(
                        404,
                        format!("image {id} was deleted during the upload"),
                    ));
                }
                img.staged = true;
                self.db.update_image(&img).map_err(internal)?;
                Ok((204, Value::Null))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                self.workspace.release(&key);
                img.status = "queued".into();
                img.staged = false;
                self.db.update_image(&img).map_err(internal)?;
                Err(e)
            }
        }
    }

    fn receive(
        &self,
        path: &Path,
        body: &mut dyn Read,
        content_length: Option<u64>,
        key: &str,
        cap: u64,
    ) -> Result<(), ApiError> {
        let mut f = std::fs::File::create(path).map_err(internal)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| api(400, format!("upload interrupted: {e}")))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > cap {
                return Err(api(
                    413,
                    format!("the upload exceeds image_size_cap ({cap} bytes)"),
                ));
            }
            if content_length.is_none() && !self.workspace.try_hold(key, n as u64) {
                return Err(api(
                    413,
                    "workspace full while receiving the upload; try again later",
                ));
            }
            f.write_all(&buf[..n]).map_err(internal)?;
            failpoint::hit("stage.receiving");
        }
        if let Some(len) = content_length {
            if total != len {
                return Err(api(
                    400,
                    format!("upload ended after {total} of {len} bytes"),
                ));
            }
        }
        f.sync_all().map_err(internal)
    }

    /// `POST /v2/images/{id}/import`.
    pub fn import(self: &Arc<Self>, id: &str, body: &[u8]) -> ApiResult {
        let v = parse_json(body)?;
        let method = v
            .pointer("/method/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if method != "glance-direct" {
            return Err(api(
                400,
                format!("import method '{method}' is not enabled; enabled methods: glance-direct"),
            ));
        }
        let _t = self.transitions.lock().map_err(internal)?;
        let mut img = self.image_or_404(id)?;
        if !(img.status == "uploading" && img.staged) {
            return Err(api(
                409,
                format!(
                    "image {id} is {}{}: stage its data first (PUT /v2/images/{id}/stage)",
                    img.status,
                    if img.status == "uploading" {
                        " (upload not complete)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let t = now();
        let task = Task {
            id: new_id()?,
            image_id: id.to_string(),
            status: "pending".into(),
            message: "waiting for a worker".into(),
            created_at: t.clone(),
            updated_at: t,
        };
        img.status = "importing".into();
        img.task_id = Some(task.id.clone());
        self.db.start_import(&task, &img).map_err(internal)?;
        self.cancels
            .lock()
            .map_err(internal)?
            .insert(id.to_string(), CancelToken::new());
        self.queue
            .lock()
            .map_err(internal)?
            .push_back(task.id.clone());
        self.queued.notify_one();
        failpoint::hit("import.accepted");
        Ok((202, json!({"task_id": task.id})))
    }

    /// `DELETE /v2/images/{id}`: cancels its import, removes its files.
    pub fn delete_image(&self, id: &str) -> ApiResult {
        let _t = self.transitions.lock().map_err(internal)?;
        let img = self.image_or_404(id)?;
        if let Some(c) = self.cancels.lock().map_err(internal)?.get(id) {
            c.cancel();
        }
        // The catalogue first: once the image is gone, any file of it is an orphan that
        // the import (when it ends) or the startup recovery removes.
        self.db.delete_image(id).map_err(internal)?;
        failpoint::hit("delete.recorded");
        if img.status != "importing" {
            let _ = std::fs::remove_file(self.workspace.staging_path(id));
            self.workspace.release(&format!("stage:{id}"));
        }
        failpoint::hit("delete.files");
        let _ = std::fs::remove_file(self.config.store_dir.join(id));
        Ok((204, Value::Null))
    }

    fn worker_loop(self: Arc<Self>) {
        loop {
            let task_id = {
                let Ok(mut q) = self.queue.lock() else { return };
                loop {
                    if let Some(t) = q.pop_front() {
                        break t;
                    }
                    q = match self.queued.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
            };
            self.run_task(&task_id);
        }
    }

    fn run_task(&self, task_id: &str) {
        let Ok(Some(task)) = self.db.task(task_id) else {
            return;
        };
        let image_id = task.image_id.clone();
        let cancel = self
            .cancels
            .lock()
            .ok()
            .and_then(|c| c.get(&image_id).cloned())
            .unwrap_or_default();
        let _ = self
            .db
            .set_task(task_id, "processing", "inspecting the upload");
        failpoint::hit("task.processing");
        let output = self.workspace.output_path(task_id);
        let staging = self.workspace.staging_path(&image_id);
        let result = self.import_one(task_id, &image_id, &staging, &output, &cancel);
        if result.is_ok() {
            failpoint::hit("store.recorded");
        }
        let _ = std::fs::remove_file(&staging);
        let _ = std::fs::remove_file(&output);
        self.workspace.release(&format!("stage:{image_id}"));
        self.workspace.release(&format!("convert:{task_id}"));
        if let Ok(mut c) = self.cancels.lock() {
            c.remove(&image_id);
        }
        let _t = self.transitions.lock();
        match result {
            // Already recorded, just before the image turned active.
            Ok(_) => {}
            Err(message) => {
                let message = if cancel.is_cancelled() {
                    "cancelled: the image was deleted during the import".to_string()
                } else {
                    message
                };
                let _ = self.db.fail_import(task_id, &image_id, &message);
            }
        }
    }

    /// Inspect, convert, hash and store one staged upload; returns the success message.
    fn import_one(
        &self,
        task_id: &str,
        image_id: &str,
        staging: &Path,
        output: &Path,
        cancel: &CancelToken,
    ) -> Result<String, String> {
        let img = self.db.image(image_id)?.ok_or("the image was deleted")?;
        let declared = parse_disk_format(&img.disk_format)?;
        let name = |p: &Path| p.display().to_string();
        let report = vconvert_engine::inspect(staging, Some(declared), &self.policy())
            .map_err(|e| format!("cannot inspect the upload: {e}"))?;
        if !report.violations.is_empty() {
            return Err(format!("image refused: {}", report.violations.join("; ")));
        }
        let target = self.config.output_format;
        let no_refs = OpenOptions::default();
        let src =
            vconvert_engine::open(staging, Some(declared), &no_refs).map_err(|e| e.to_string())?;
        let virtual_size = src.virtual_size();
        let stored_from: PathBuf = if declared == target {
            staging.to_path_buf()
        } else {
            let need = vconvert_engine::measure(Some(src.as_ref()), 0, target, &Options::new())
                .map_err(|e| e.to_string())?;
            let db = &self.db;
            self.workspace.hold_wait(&format!("convert:{task_id}"), need.required, cancel, |used| {
                let _ = db.set_task(task_id, "processing", &format!(
                    "waiting for workspace: the conversion needs {} bytes; {used} of {} bytes in use",
                    need.required,
                    self.workspace.capacity()
                ));
            })?;
            let label = format!(
                "converting {} to {}",
                disk_format_name(declared),
                disk_format_name(target)
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
                        let _ = db.set_task(
                            task_id,
                            "processing",
                            &format!("{label}: {pct:.1}% ({done} of {total} bytes)"),
                        );
                    }
                }
            };
            let opts = ConvertOptions {
                cancel: cancel.clone(),
                progress: Some(&progress),
                rate_limit: self.config.convert_rate_limit,
                ..ConvertOptions::default()
            };
            vconvert_engine::convert(src.as_ref(), output, target, Options::new(), &opts).map_err(
                |e| match e {
                    vconvert_core::Error::Cancelled => "cancelled".to_string(),
                    e => format!("conversion failed: {e}"),
                },
            )?;
            let check = vconvert_engine::inspect(output, Some(target), &self.policy())
                .map_err(|e| e.to_string())?;
            if !check.violations.is_empty() {
                return Err(format!(
                    "converted image refused: {}",
                    check.violations.join("; ")
                ));
            }
            failpoint::hit("convert.done");
            output.to_path_buf()
        };
        drop(src);
        if cancel.is_cancelled() {
            return Err("cancelled".into());
        }
        let _ = self
            .db
            .set_task(task_id, "processing", "computing checksums");
        let (md5, sha512, size) =
            hashes(&stored_from).map_err(|e| format!("cannot read {}: {e}", name(&stored_from)))?;
        let stored = Stored {
            disk_format: disk_format_name(target).into(),
            size,
            virtual_size,
            checksum: md5,
            sha512,
        };
        // Intent first: a crash after the move finds in the task what the stored object
        // is, and recovery records it (or removes it) instead of leaving it orphaned.
        self.db.record_intent(task_id, &stored)?;
        failpoint::hit("store.intent");
        let stored_path = self.config.store_dir.join(image_id);
        move_file(&stored_from, &stored_path).map_err(|e| {
            format!(
                "cannot store the image in {}: {e}",
                name(&self.config.store_dir)
            )
        })?;
        failpoint::hit("store.moved");
        let _t = self
            .transitions
            .lock()
            .map_err(|_| "lock poisoned".to_string())?;
        let message = success_message(&stored);
        // The task's success and the image's active state are one transaction.
        if !self
            .db
            .finish_import(task_id, image_id, &stored, &message)?
        {
            let _ = std::fs::remove_file(&stored_path);
            return Err("cancelled".into());
        }
        Ok(message)
    }
}
