//! The service: images and tasks as Glance's API defines them, with tenancy, the
//! import queue and its workers, the workspace quota, graceful shutdown and recovery
//! after a crash. Every call blocks (the database, files, the engine): the HTTP layer
//! runs them off the async runtime. The import workflow itself is in
//! [`crate::workflow`].
//!
//! The queue is the catalogue's `pending` tasks: workers claim them
//! ([`Db::claim_task`]), so several hosts over one PostgreSQL catalogue share the
//! work, `max_workers` each. A staged upload stays in the workspace of the host that
//! received it and its import task is bound to that host, whichever host the import
//! request reached. A heartbeat thread renews this host's leases (stopping an import
//! whose task it no longer holds) and fails what a silent host held
//! ([`Db::reap`]); see README, "Several hosts".

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use subtle::ConstantTimeEq;
use vconvert_core::Identity;
use vconvert_engine::{CancelToken, Policy, ThreadBudget};

use crate::config::{
    parse_declared_format, Config, TokenEntry, ADMIN_PROJECT, GLANCE_CONTAINER_FORMATS,
};
use crate::db::{now, rfc3339, Backend, Db, Image, Location, Stored, Task};
use crate::error::{Error, Result};
use crate::keystone::{Keystone, Validation};
use crate::policy::{self, Rule, Target};
use crate::staging::{self, Pieces};
use crate::store::{FsStore, Store, StoredData};
use crate::workspace::Workspace;
use crate::{failpoint, web_download, workflow};

mod members;
pub use members::{MEMBER_QUOTA, MEMBER_STATUSES};

/// Who is calling: the project and roles of the token, and the request's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's project (owner of what it creates).
    pub project_id: String,
    /// The user recorded on tasks (Keystone's user id; a static token's project).
    pub user_id: String,
    /// Has the `admin` role: sees and edits everything (Glance's `context_is_admin`).
    pub admin: bool,
    /// Role names (Keystone's, implied roles included; a static token has `admin`,
    /// `member`, `reader` or `member`, `reader`), judged by [`crate::policy`].
    pub roles: Vec<String>,
    /// `req-<uuid>` of this request.
    pub request_id: String,
}

impl Caller {
    /// Whether the caller has role `name`.
    pub fn has_role(&self, name: &str) -> bool {
        self.roles.iter().any(|r| r == name)
    }
}

/// Attributes clients may not set (Glance's `_readonly_properties` and
/// `_disallowed_properties`).
pub const READ_ONLY: &[&str] = &[
    "created_at",
    "updated_at",
    "status",
    "checksum",
    "size",
    "virtual_size",
    "direct_url",
    "self",
    "file",
    "schema",
    "id",
    "os_hash_algo",
    "os_hash_value",
    "stores",
    "locations",
];

/// Attributes nobody may set (Glance's `_reserved_properties`), and the reserved
/// namespace `os_glance*`.
pub const RESERVED: &[&str] = &["location", "deleted", "deleted_at"];

/// A new image, as `POST /v2/images` describes it.
#[derive(Clone, Debug, Default)]
pub struct NewImage {
    /// Id chosen by the client.
    pub id: Option<String>,
    /// Name.
    pub name: Option<String>,
    /// Visibility (default private).
    pub visibility: Option<String>,
    /// Protected.
    pub protected: Option<bool>,
    /// Hidden from default lists.
    pub os_hidden: Option<bool>,
    /// Owner (only an admin may name another project).
    pub owner: Option<String>,
    /// Minimum disk (GiB).
    pub min_disk: Option<u64>,
    /// Minimum RAM (MiB).
    pub min_ram: Option<u64>,
    /// Declared disk format.
    pub disk_format: Option<String>,
    /// Container format.
    pub container_format: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Every other attribute: extra properties (must be strings).
    pub extra: BTreeMap<String, Value>,
}

/// One JSON-patch operation of `PATCH /v2/images/{id}`.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct PatchOp {
    /// add, replace or remove.
    pub op: String,
    /// JSON pointer to the attribute.
    pub path: String,
    /// The value (add, replace).
    pub value: Option<Value>,
}

/// The import method of `POST /v2/images/{id}/import`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportMethod {
    /// The data was staged with `PUT /v2/images/{id}/stage`.
    GlanceDirect,
    /// The service fetches `uri`.
    WebDownload {
        /// The URL.
        uri: String,
    },
}

/// A page of a listing.
#[derive(Clone, Debug)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The marker of the next page, when there is one.
    pub next_marker: Option<String>,
}

/// Task messages and results live this long after the task ends (Glance's
/// `task_time_to_live` default, 48 hours).
const TASK_TTL: Duration = Duration::from_secs(48 * 3600);

/// How often the removal of a busy orphan store object is retried after start.
const ORPHAN_RETRY: Duration = Duration::from_secs(5);
/// For how long (Ceph's default watch timeout of a dead client is 30 s).
const ORPHAN_RETRY_FOR: Duration = Duration::from_secs(120);
/// How often an idle worker looks for tasks queued through other hosts (a task
/// queued through this host wakes one at once).
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// Glance's `limit_param_default` and `api_limit_max`.
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 1000;

fn expires_at() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs + TASK_TTL.as_secs())
}

/// A new UUID (v4), formatted.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.hyphenated().to_string() == s.to_ascii_lowercase())
        && s.len() == 36
}

/// The store `config` names: `store_dir`, or (cargo feature `rbd`) a Ceph pool.
fn open_store(config: &Config) -> std::result::Result<Arc<dyn Store>, String> {
    match config.store {
        crate::config::StoreKind::Fs => {
            let store = FsStore::new(&config.store_dir)
                .map_err(|e| format!("cannot create {}: {e}", config.store_dir.display()))?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "rbd")]
        crate::config::StoreKind::Rbd => {
            Ok(Arc::new(crate::rbd_store::RbdStore::connect(&config.rbd)?))
        }
        #[cfg(not(feature = "rbd"))]
        crate::config::StoreKind::Rbd => Err("store = \"rbd\": this vimport was built \
            without RBD support; build it with the cargo feature `rbd` (`cargo build --release \
            -p vconvert-import --features rbd`, which needs librbd-dev and librados-dev)"
            .into()),
    }
}

/// An image's stored data (read from any offset), its length and its MD5.
pub type ImageData = (Box<dyn StoredData>, u64, Option<String>);

/// How an import waiting in a `PUT /file` learns its end.
type Waiter = mpsc::Sender<std::result::Result<(), String>>;

/// The running service.
#[derive(Debug)]
pub struct Service {
    /// Its configuration.
    pub config: Config,
    /// Every static token and what it stands for (none with Keystone).
    tokens: Vec<TokenEntry>,
    /// Validates tokens when `[keystone]` is set.
    keystone: Option<Keystone>,
    db: Db,
    workspace: Workspace,
    store: Arc<dyn Store>,
    /// Wakes idle workers when this host queues a task (they also look every
    /// [`CLAIM_POLL`], for tasks queued through other hosts).
    wake: Mutex<()>,
    queued: Condvar,
    /// Cancel tokens of running imports, by image.
    cancels: Mutex<HashMap<String, CancelToken>>,
    /// Tasks this host runs now, with their image: their leases are renewed.
    held: Mutex<HashMap<String, String>>,
    waiters: Mutex<HashMap<String, Waiter>>,
    /// Imports being worked on now.
    running: AtomicUsize,
    /// The worker threads every running conversion borrows from (`convert_threads`):
    /// two imports at once share the cores instead of starting a set each.
    threads: ThreadBudget,
    /// Set on SIGTERM/SIGINT: no new work starts.
    stopping: AtomicBool,
}

impl Service {
    /// Opens the database, workspace and store, recovers from a previous crash, and
    /// starts `max_workers` workers.
    pub fn start(config: Config) -> std::result::Result<Arc<Service>, String> {
        failpoint::init()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
        if let Some(parent) = match &config.database {
            Location::Sqlite(p) => p.parent().filter(|p| !p.as_os_str().is_empty()),
            Location::Postgres(_) => None,
        } {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut tokens = config.tokens.clone();
        if let Some(t) = &config.token {
            tokens.push(TokenEntry {
                token: t.clone(),
                project_id: ADMIN_PROJECT.into(),
                admin: true,
            });
        }
        let keystone = config.keystone.clone().map(Keystone::new);
        if tokens.is_empty() && keystone.is_none() {
            tokens.push(TokenEntry {
                token: Self::generated_token(&config.data_dir)?,
                project_id: ADMIN_PROJECT.into(),
                admin: true,
            });
        }
        let db = Db::connect(&config.database)?;
        db.host_started(&config.host_id)?;
        let workspace =
            Workspace::new(&config.workspace_dir, config.workspace_bytes).map_err(|e| {
                format!(
                    "cannot create workspace {}: {e}",
                    config.workspace_dir.display()
                )
            })?;
        let store = open_store(&config)?;
        let service = Arc::new(Service {
            tokens,
            keystone,
            db,
            workspace,
            store,
            wake: Mutex::new(()),
            queued: Condvar::new(),
            cancels: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            threads: ThreadBudget::new(config.convert_threads),
            stopping: AtomicBool::new(false),
            config,
        });
        service.recover(true)?;
        service.remove_orphans_later();
        let s = service.clone();
        std::thread::Builder::new()
            .name("vimport-heartbeat".into())
            .spawn(move || s.heartbeat_loop())
            .map_err(|e| format!("cannot start the heartbeat: {e}"))?;
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
    fn generated_token(data_dir: &Path) -> std::result::Result<String, String> {
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

    /// After a crash (`at_start`) or at the end of a shutdown: finish or undo every
    /// interrupted import, return images being received to `queued`, keep only complete
    /// staged uploads, and remove every other workspace file. At start also: an
    /// interrupted import whose stored object is complete (as its task recorded before
    /// the move) is recorded, and every store object that belongs to no active image is
    /// removed (see README, "Reliability").
    fn recover(&self, at_start: bool) -> std::result::Result<(), String> {
        for status in ["pending", "processing"] {
            for t in self.db.tasks_in(status)? {
                // Other hosts' tasks, and unbound ones any host may claim, are theirs.
                if !self.mine(t.host.as_deref()) {
                    continue;
                }
                // Only at start: at the end of a shutdown a worker may still be
                // finishing this very import.
                if at_start && self.finish_interrupted(&t)? {
                    continue;
                }
                self.db.fail_import(
                    &t.id,
                    &t.image_id,
                    "interrupted: vimport stopped during this import; stage the image again",
                    &expires_at(),
                )?;
            }
        }
        let mut keep = Vec::new();
        for img in self.db.images()? {
            let staging = self.workspace.staging_path(&img.id);
            let receiving = ["importing", "uploading", "saving"].contains(&img.status.as_str());
            if receiving
                && self.db.backend() == Backend::Postgres
                && (img.status == "importing" || !self.mine(self.db.staged_on(&img.id)?.as_deref()))
            {
                // Another host's upload, or an import whose task (failed above if
                // it was this host's) says where it runs.
                continue;
            }
            if img.status == "uploading" && img.staged && staging.is_file() {
                let size = std::fs::metadata(&staging).map_or(0, |m| m.len());
                // Staged data survives a restart even if the quota shrank meanwhile.
                let key = format!("stage:{}", img.id);
                self.workspace.release(&key);
                if !self.workspace.try_hold(&key, size) {
                    self.workspace.release(&key);
                }
                keep.push(staging);
            } else if receiving {
                self.db.transition(
                    &img.id,
                    &["importing", "uploading", "saving"],
                    "queued",
                    false,
                )?;
            }
        }
        for f in self.workspace.files() {
            if !keep.contains(&f) {
                let _ = std::fs::remove_file(&f);
            }
        }
        if at_start {
            self.reconcile_store()?;
        }
        Ok(())
    }

    /// Records an interrupted import whose stored object is complete: in the store,
    /// with the size and checksums its task recorded before the move (hashed again
    /// here). Returns whether it did; if not, the caller fails the task and the
    /// store reconciliation removes the object.
    fn finish_interrupted(&self, t: &Task) -> std::result::Result<bool, String> {
        let Some(stored) = self.db.intent(&t.id)? else {
            return Ok(false);
        };
        let Ok((mut f, len)) = self.store.open(&t.image_id) else {
            return Ok(false);
        };
        if len != stored.size {
            return Ok(false);
        }
        match workflow::hashes_of(&mut f) {
            Ok((md5, sha512, n))
                if n == stored.size && md5 == stored.checksum && sha512 == stored.sha512 => {}
            _ => {
                tracing::warn!(
                    task = %t.id,
                    image = %t.image_id,
                    "recovery: the stored object does not hold what the task recorded; not recorded"
                );
                return Ok(false);
            }
        }
        let message = success_message(&stored);
        let done = self
            .db
            .finish_import(&t.id, &t.image_id, &stored, &message, &expires_at())?;
        if done {
            tracing::info!(
                task = %t.id,
                image = %t.image_id,
                size = stored.size,
                "recovery: the interrupted import had stored its object completely; recorded it"
            );
        }
        Ok(done)
    }

    /// The store objects that belong to no image with data (active or deactivated:
    /// Glance keeps the data of a deactivated image too) nor to an import in progress
    /// (at start, this host's interrupted imports were already returned to `queued`;
    /// with a shared store, another host's import is `importing` or `saving` and may
    /// be storing its object now).
    fn orphans(&self) -> std::result::Result<Vec<String>, String> {
        let status: HashMap<String, String> = self
            .db
            .images()?
            .into_iter()
            .map(|i| (i.id, i.status))
            .collect();
        let names = self
            .store
            .ids()
            .map_err(|e| format!("cannot list the store: {e}"))?;
        // A partial copy (`.ID.partial` in a directory, `ID.partial` in a pool) is kept
        // only while its import runs; complete data while its image has data too.
        let keep = |n: &String| {
            let bare = n.strip_prefix('.').unwrap_or(n);
            let (id, partial) = match bare.strip_suffix(".partial") {
                Some(id) => (id, true),
                None => (bare, false),
            };
            let kept: &[&str] = if partial {
                &["importing", "saving"]
            } else {
                &["active", "deactivated", "importing", "saving"]
            };
            status.get(id).is_some_and(|s| kept.contains(&s.as_str()))
        };
        Ok(names.into_iter().filter(|n| !keep(n)).collect())
    }

    /// Removes every store object that belongs to no active image, naming it. An
    /// object that is busy (an RBD image still watched by the client of a vimport that
    /// was killed: Ceph drops the watch after `osd_client_watch_timeout`, 30 s) is
    /// removed later by [`Service::remove_orphans_later`].
    fn reconcile_store(&self) -> std::result::Result<(), String> {
        for name in self.orphans()? {
            match self.store.delete(&name) {
                Ok(()) => tracing::warn!(
                    object = %name,
                    "recovery: removed store object {name}: it belongs to no active image"
                ),
                Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => tracing::warn!(
                    object = %name,
                    error = %e,
                    "recovery: store object {name} belongs to no active image but is busy; \
                     retrying in the background"
                ),
                Err(e) => tracing::error!(
                    object = %name,
                    error = %e,
                    "recovery: cannot remove store object {name}, which belongs to no active image"
                ),
            }
        }
        Ok(())
    }

    /// After the start's reconciliation: if orphan store objects are left (busy), a
    /// thread retries their removal every [`ORPHAN_RETRY`] for [`ORPHAN_RETRY_FOR`],
    /// listing them again each time (an image imported meanwhile is no orphan).
    fn remove_orphans_later(self: &Arc<Self>) {
        if self.orphans().map_or(true, |o| o.is_empty()) {
            return;
        }
        let s = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vimport-orphans".into())
            .spawn(move || {
                let until = Instant::now() + ORPHAN_RETRY_FOR;
                while !s.stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(ORPHAN_RETRY);
                    let Ok(orphans) = s.orphans() else { continue };
                    let mut left = Vec::new();
                    for name in orphans {
                        match s.store.delete(&name) {
                            Ok(()) => tracing::warn!(
                                object = %name,
                                "recovery: removed store object {name}: it belongs to no active image"
                            ),
                            Err(e) => left.push((name, e)),
                        }
                    }
                    if left.is_empty() {
                        return;
                    }
                    if Instant::now() >= until {
                        for (name, e) in left {
                            tracing::error!(
                                object = %name,
                                error = %e,
                                "recovery: cannot remove store object {name}, which belongs \
                                 to no active image; remove it by hand"
                            );
                        }
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "recovery: cannot start the orphan removal thread");
        }
    }

    /// Whether tokens are validated by Keystone (a call that may block).
    pub fn uses_keystone(&self) -> bool {
        self.keystone.is_some()
    }

    /// The caller a token stands for: with `[keystone]`, Keystone's answer (blocks;
    /// 401 when invalid, 503 when Keystone cannot answer); otherwise the static token
    /// it equals, compared in constant time with every token.
    pub fn authenticate(&self, token: &str, request_id: &str) -> Result<Caller> {
        if let Some(k) = &self.keystone {
            let info = match k.validate(token)? {
                Validation::Valid(info) => info,
                Validation::Invalid => return Err(Error::Unauthorized),
            };
            let project_id = info.project_id.ok_or_else(|| {
                Error::Forbidden(
                    "The token is not scoped to a project: ask Keystone for a project-scoped \
                     token (OS_PROJECT_NAME and OS_PROJECT_DOMAIN_NAME)"
                        .into(),
                )
            })?;
            return Ok(Caller {
                admin: info.roles.iter().any(|r| r == policy::ADMIN),
                project_id,
                user_id: info.user_id,
                roles: info.roles,
                request_id: request_id.to_string(),
            });
        }
        let mut found: Option<&TokenEntry> = None;
        for t in &self.tokens {
            if bool::from(t.token.as_bytes().ct_eq(token.as_bytes())) && found.is_none() {
                found = Some(t);
            }
        }
        let t = found.ok_or(Error::Unauthorized)?;
        let roles: &[&str] = if t.admin {
            &[policy::ADMIN, policy::MEMBER, policy::READER]
        } else {
            &[policy::MEMBER, policy::READER]
        };
        Ok(Caller {
            project_id: t.project_id.clone(),
            user_id: t.project_id.clone(),
            admin: t.admin,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            request_id: request_id.to_string(),
        })
    }

    /// The untrusted policy with the operator's VMDK types.
    fn policy(&self) -> Policy {
        Policy {
            vmdk_allowed_types: self.config.vmdk_allowed_types.clone(),
            ..Policy::untrusted()
        }
    }

    /// Whether `caller` may see `img`; `member` is the caller's answer when `img`
    /// was shared with its project. A shared image is visible to its members
    /// whatever their answer, as Glance's `is_image_visible`.
    fn visible(caller: &Caller, img: &Image, member: Option<&str>) -> bool {
        caller.admin
            || img.owner.as_deref() == Some(caller.project_id.as_str())
            || img.visibility == "public"
            || img.visibility == "community"
            || (img.visibility == "shared" && member.is_some())
    }

    /// The image `id` if `caller` may see it (404 otherwise, as for a missing one).
    fn image_for(&self, caller: &Caller, id: &str) -> Result<Image> {
        let not_found = || Error::NotFound(format!("No image found with ID {id}"));
        let img = self
            .db
            .image(id)
            .map_err(Error::Internal)?
            .ok_or_else(not_found)?;
        let member = if img.visibility == "shared" && !Self::visible(caller, &img, None) {
            self.db
                .member(id, &caller.project_id)
                .map_err(Error::Internal)?
                .map(|m| m.status)
        } else {
            None
        };
        // Glance answers 404 when get_image fails: the image is not disclosed. (The
        // membership matters to get_image only for a private image, which only its
        // owner and admins see anyway.)
        if Self::visible(caller, &img, member.as_deref())
            && policy::allows(
                caller,
                Rule::GetImage,
                &Self::target(&img, member.is_some()),
            )
        {
            Ok(img)
        } else {
            Err(not_found())
        }
    }

    /// The policy target of `img`.
    fn target(img: &Image, caller_is_member: bool) -> Target<'_> {
        Target {
            owner: img.owner.as_deref(),
            visibility: &img.visibility,
            caller_is_member,
        }
    }

    /// The image `id` if `caller` passes `rule` on it (404 when invisible, 403 when
    /// only visible). Every such rule asks for the owner's project (or admin).
    fn image_to_modify(&self, caller: &Caller, id: &str, rule: Rule) -> Result<Image> {
        let img = self.image_for(caller, id)?;
        policy::enforce(caller, rule, &Self::target(&img, false))?;
        Ok(img)
    }

    /// A valid visibility that `caller` may give an image of `owner`
    /// (`publicize_image`, `communitize_image`).
    fn check_visibility(caller: &Caller, v: &str, owner: Option<&str>) -> Result<()> {
        if !["private", "public", "shared", "community"].contains(&v) {
            return Err(Error::BadRequest(format!(
                "Invalid visibility value: {v}; one of private, public, shared, community"
            )));
        }
        let target = Target {
            owner,
            visibility: v,
            caller_is_member: false,
        };
        match v {
            "public" => policy::enforce(caller, Rule::PublicizeImage, &target),
            "community" => policy::enforce(caller, Rule::CommunitizeImage, &target),
            _ => Ok(()),
        }
    }

    fn check_owner(caller: &Caller, owner: Option<&str>) -> Result<()> {
        match owner {
            Some(o) if !caller.admin && o != caller.project_id => Err(Error::Forbidden(format!(
                "You are not permitted to create or move images owned by '{o}'"
            ))),
            _ => Ok(()),
        }
    }

    fn check_disk_format(v: Option<&str>) -> Result<()> {
        if let Some(f) = v {
            parse_declared_format(f).map_err(Error::BadRequest)?;
        }
        Ok(())
    }

    fn check_container_format(v: Option<&str>) -> Result<()> {
        match v {
            None | Some("bare") => Ok(()),
            Some(other) if GLANCE_CONTAINER_FORMATS.contains(&other) => Err(Error::BadRequest(
                format!("container_format '{other}' is not supported: vimport stores disk images only; use bare"),
            )),
            Some(other) => Err(Error::BadRequest(format!(
                "container_format '{other}' is not a Glance container format; vimport accepts bare"
            ))),
        }
    }

    fn check_extra_key(key: &str) -> Result<()> {
        if READ_ONLY.contains(&key) {
            return Err(Error::Forbidden(format!("Attribute '{key}' is read-only.")));
        }
        if RESERVED.contains(&key) || key.starts_with("os_glance") {
            return Err(Error::Forbidden(format!("Attribute '{key}' is reserved.")));
        }
        if key.is_empty() || key.len() > 255 {
            return Err(Error::BadRequest(
                "Custom property names must have 1 to 255 characters.".into(),
            ));
        }
        Ok(())
    }

    fn extra_value(key: &str, v: &Value) -> Result<String> {
        match v {
            Value::String(s) if s.len() <= 65535 => Ok(s.clone()),
            Value::String(_) => Err(Error::BadRequest(format!(
                "Property '{key}' is longer than 65535 characters."
            ))),
            other => Err(Error::BadRequest(format!(
                "Provided object does not match schema 'image': {other} is not of type 'string' (additional property '{key}')"
            ))),
        }
    }

    fn check_tags(tags: &[String]) -> Result<()> {
        if let Some(t) = tags.iter().find(|t| t.len() > 255) {
            return Err(Error::BadRequest(format!(
                "Tag '{}…' is longer than 255 characters.",
                &t[..32]
            )));
        }
        Ok(())
    }

    /// `POST /v2/images`.
    pub fn create_image(&self, caller: &Caller, n: NewImage) -> Result<Image> {
        if let Some(id) = &n.id {
            if !is_uuid(id) {
                return Err(Error::BadRequest(format!(
                    "Provided object does not match schema 'image': id '{id}' is not a UUID"
                )));
            }
        }
        if let Some(name) = &n.name {
            if name.chars().count() > 255 {
                return Err(Error::BadRequest(
                    "name is longer than 255 characters".into(),
                ));
            }
        }
        let visibility = n.visibility.clone().unwrap_or_else(|| "private".into());
        let owner = n.owner.as_deref().unwrap_or(caller.project_id.as_str());
        let target = Target {
            owner: Some(owner),
            visibility: &visibility,
            caller_is_member: false,
        };
        if !policy::allows(caller, Rule::AddImage, &target) {
            // Glance's sentence when the owner is the reason.
            Self::check_owner(caller, n.owner.as_deref())?;
            return Err(policy::forbidden(Rule::AddImage));
        }
        Self::check_owner(caller, n.owner.as_deref())?;
        Self::check_visibility(caller, &visibility, Some(owner))?;
        Self::check_disk_format(n.disk_format.as_deref())?;
        Self::check_container_format(n.container_format.as_deref())?;
        Self::check_tags(&n.tags)?;
        let mut properties = BTreeMap::new();
        for (k, v) in &n.extra {
            Self::check_extra_key(k)?;
            properties.insert(k.clone(), Self::extra_value(k, v)?);
        }
        let t = now();
        let mut tags = n.tags.clone();
        tags.sort();
        tags.dedup();
        let img = Image {
            id: n
                .id
                .clone()
                .map_or_else(new_uuid, |s| s.to_ascii_lowercase()),
            name: n.name,
            status: "queued".into(),
            visibility,
            protected: n.protected.unwrap_or(false),
            os_hidden: n.os_hidden.unwrap_or(false),
            owner: Some(n.owner.unwrap_or_else(|| caller.project_id.clone())),
            min_disk: n.min_disk.unwrap_or(0),
            min_ram: n.min_ram.unwrap_or(0),
            disk_format: n
                .disk_format
                .map(|f| if f == "vpc" { "vhd".to_string() } else { f }),
            container_format: n.container_format,
            created_at: t.clone(),
            updated_at: t,
            tags,
            properties,
            ..Image::default()
        };
        if !self.db.insert_image(&img).map_err(Error::Internal)? {
            return Err(Error::Conflict(format!(
                "An image with identifier {} already exists",
                img.id
            )));
        }
        Ok(img)
    }

    /// `GET /v2/images/{id}`.
    pub fn get_image(&self, caller: &Caller, id: &str) -> Result<Image> {
        self.image_for(caller, id)
    }

    /// `GET /v2/images`: filters, sort and paging as Glance takes them in `params`.
    pub fn list_images(&self, caller: &Caller, params: &[(String, String)]) -> Result<Page<Image>> {
        policy::enforce(
            caller,
            Rule::GetImages,
            &Target {
                owner: Some(&caller.project_id),
                visibility: "private",
                caller_is_member: false,
            },
        )?;
        let mut sort_keys: Vec<String> = Vec::new();
        let mut sort_dirs: Vec<String> = Vec::new();
        let mut sort: Option<Vec<(String, bool)>> = None;
        let mut limit = DEFAULT_LIMIT;
        let mut marker = None;
        let mut filters: Vec<(&str, &str)> = Vec::new();
        // Shared images of other projects are listed when the caller's answer is
        // this (Glance's default: accepted).
        let mut member_status = "accepted";
        for (k, v) in params {
            match k.as_str() {
                "sort_key" => sort_keys.push(v.clone()),
                "sort_dir" => sort_dirs.push(v.clone()),
                "sort" => {
                    let mut keys = Vec::new();
                    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let (key, dir) = part.split_once(':').unwrap_or((part, "desc"));
                        keys.push((key.to_string(), parse_dir(dir)?));
                    }
                    sort = Some(keys);
                }
                "limit" => {
                    limit = v
                        .parse::<usize>()
                        .map_err(|_| {
                            Error::BadRequest(format!(
                                "limit param must be a non-negative integer, not '{v}'"
                            ))
                        })?
                        .min(MAX_LIMIT)
                }
                "marker" => marker = Some(v.as_str()),
                "member_status" => {
                    if v != "all" && !MEMBER_STATUSES.contains(&v.as_str()) {
                        return Err(Error::BadRequest(format!(
                            "Invalid member_status value: {v}; one of pending, accepted, rejected, all"
                        )));
                    }
                    member_status = v.as_str();
                }
                _ => filters.push((k.as_str(), v.as_str())),
            }
        }
        if sort.is_some() && !(sort_keys.is_empty() && sort_dirs.is_empty()) {
            return Err(Error::BadRequest(
                "The 'sort' parameter cannot be combined with 'sort_key' or 'sort_dir'".into(),
            ));
        }
        let mut order: Vec<(String, bool)> = match sort {
            Some(s) => s,
            None => {
                if sort_keys.is_empty() {
                    sort_keys.push("created_at".into());
                }
                if sort_dirs.len() > 1 && sort_dirs.len() != sort_keys.len() {
                    return Err(Error::BadRequest(
                        "sort_dir must be given once or once per sort_key".into(),
                    ));
                }
                let mut v = Vec::new();
                for (i, k) in sort_keys.iter().enumerate() {
                    let d = sort_dirs.get(i).or(sort_dirs.first()).map_or("desc", |s| s);
                    v.push((k.clone(), parse_dir(d)?));
                }
                v
            }
        };
        for (k, _) in &order {
            if !SORT_KEYS.contains(&k.as_str()) {
                return Err(Error::BadRequest(format!(
                    "Unsupported sort_key '{k}'; one of {}",
                    SORT_KEYS.join(", ")
                )));
            }
        }
        let desc = order.first().is_none_or(|o| o.1);
        if !order.iter().any(|(k, _)| k == "id") {
            order.push(("id".into(), desc));
        }
        let mut images = Vec::new();
        let visibility_filter = filters
            .iter()
            .find(|(k, _)| *k == "visibility")
            .map(|(_, v)| *v);
        let hidden_filter = filters
            .iter()
            .find(|(k, _)| *k == "os_hidden")
            .map(|(_, v)| *v);
        let memberships = self
            .db
            .memberships(&caller.project_id)
            .map_err(Error::Internal)?;
        for img in self.db.images().map_err(Error::Internal)? {
            let member = memberships.get(&img.id).map(String::as_str);
            if !Self::visible(caller, &img, member) {
                continue;
            }
            let own = img.owner.as_deref() == Some(caller.project_id.as_str());
            // Another project's shared image: listed as the caller answered.
            if !own
                && !caller.admin
                && img.visibility == "shared"
                && member_status != "all"
                && member != Some(member_status)
            {
                continue;
            }
            // Community images of others appear only when asked for.
            if visibility_filter.is_none() && img.visibility == "community" && !own {
                continue;
            }
            if hidden_filter.is_none() && img.os_hidden {
                continue;
            }
            let mut ok = true;
            for (k, v) in &filters {
                if !image_matches(&img, k, v)? {
                    ok = false;
                    break;
                }
            }
            if ok {
                images.push(img);
            }
        }
        images.sort_by(|a, b| {
            for (k, desc) in &order {
                let o = compare(a, b, k);
                let o = if *desc { o.reverse() } else { o };
                if o.is_ne() {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        });
        let start = match marker {
            None => 0,
            Some(m) => match images.iter().position(|i| i.id == m) {
                Some(p) => p + 1,
                None => {
                    return Err(Error::BadRequest(format!(
                        "Invalid marker. Image {m} could not be found."
                    )))
                }
            },
        };
        let rest = images.len().saturating_sub(start);
        let items: Vec<Image> = images.into_iter().skip(start).take(limit).collect();
        let next_marker = if rest > items.len() && !items.is_empty() {
            items.last().map(|i| i.id.clone())
        } else {
            None
        };
        Ok(Page { items, next_marker })
    }

    /// `PATCH /v2/images/{id}` with a JSON patch.
    pub fn patch_image(&self, caller: &Caller, id: &str, ops: &[PatchOp]) -> Result<Image> {
        let mut img = self.image_to_modify(caller, id, Rule::ModifyImage)?;
        let before_disk = img.disk_format.clone();
        let before_container = img.container_format.clone();
        for op in ops {
            apply_op(caller, &mut img, op)?;
        }
        if (img.disk_format != before_disk || img.container_format != before_container)
            && img.status != "queued"
        {
            return Err(Error::Forbidden(format!(
                "disk_format and container_format can be changed only while the image is queued (image {id} is {})",
                img.status
            )));
        }
        if !self.db.update_metadata(&img).map_err(Error::Internal)? {
            return Err(Error::NotFound(format!("No image found with ID {id}")));
        }
        self.image_for(caller, id)
    }

    /// `PUT /v2/images/{id}/tags/{tag}`.
    pub fn add_tag(&self, caller: &Caller, id: &str, tag: &str) -> Result<()> {
        self.image_to_modify(caller, id, Rule::ModifyImage)?;
        Self::check_tags(&[tag.to_string()])?;
        self.db.add_tag(id, tag).map_err(Error::Internal)?;
        Ok(())
    }

    /// `DELETE /v2/images/{id}/tags/{tag}`.
    pub fn remove_tag(&self, caller: &Caller, id: &str, tag: &str) -> Result<()> {
        self.image_to_modify(caller, id, Rule::ModifyImage)?;
        if !self.db.remove_tag(id, tag).map_err(Error::Internal)? {
            return Err(Error::NotFound(format!(
                "Tag {tag} not found on image {id}"
            )));
        }
        Ok(())
    }

    /// `DELETE /v2/images/{id}`: cancels its import, removes its files.
    pub fn delete_image(&self, caller: &Caller, id: &str) -> Result<()> {
        let img = self.image_to_modify(caller, id, Rule::DeleteImage)?;
        if img.protected {
            return Err(Error::Forbidden(format!(
                "Image {id} is protected and cannot be deleted."
            )));
        }
        // An import running on this host is cancelled, and removes the staged upload
        // when it ends; an import still waiting for a worker never starts once its
        // task is gone, so its staged upload goes now.
        let running_here = match self.cancels.lock().map_err(Error::internal)?.get(id) {
            Some(c) => {
                c.cancel();
                true
            }
            None => false,
        };
        // Data that cannot go now (an RBD snapshot with clones) keeps the image.
        self.store.check_deletable(id).map_err(|e| {
            if e.kind() == std::io::ErrorKind::ResourceBusy {
                Error::Conflict(e.to_string())
            } else {
                Error::Internal(format!("stored data of image {id}: {e}"))
            }
        })?;
        // The catalogue first (the image, its tags, properties and tasks, in one
        // statement): once it is gone, any file of it is an orphan that the import
        // (when it ends), the heartbeat's sweep or the startup recovery removes.
        self.db.delete_image(id).map_err(Error::Internal)?;
        failpoint::hit("delete.recorded");
        if !running_here || (img.status != "importing" && img.status != "saving") {
            let _ = std::fs::remove_file(self.workspace.staging_path(id));
            self.workspace.release(&format!("stage:{id}"));
        }
        failpoint::hit("delete.files");
        // An import in progress removes what it stored itself when it finds the image
        // gone (its RBD image is open until then, and cannot be removed under it).
        if img.status != "importing" {
            self.store.delete(id).map_err(Error::internal)?;
        }
        Ok(())
    }

    /// The stored data of an image `caller` may see: the file, its length and MD5.
    /// `Ok(None)`: the image has no data (204).
    pub fn image_data(&self, caller: &Caller, id: &str) -> Result<Option<ImageData>> {
        let img = self.image_for(caller, id)?;
        let member = !caller.admin
            && img.owner.as_deref() != Some(caller.project_id.as_str())
            && self
                .db
                .member(id, &caller.project_id)
                .map_err(Error::Internal)?
                .is_some();
        policy::enforce(caller, Rule::DownloadImage, &Self::target(&img, member))?;
        if img.status != "active" {
            return Ok(None);
        }
        let (f, len) = self
            .store
            .open(id)
            .map_err(|e| Error::Internal(format!("stored data of image {id}: {e}")))?;
        Ok(Some((f, len, img.checksum)))
    }

    /// Whether `caller` may upload data into image `id` now: the service is running, the
    /// caller may modify the image, and its declared `disk_format` is one vimport takes.
    fn may_receive_data(&self, caller: &Caller, id: &str) -> Result<()> {
        self.refuse_when_stopping()?;
        let img = self.image_to_modify(caller, id, Rule::UploadImage)?;
        let declared = img.disk_format.as_deref().ok_or_else(|| {
            Error::BadRequest(format!(
                "image {id} has no disk_format: set it (PATCH) before uploading data"
            ))
        })?;
        parse_declared_format(declared).map_err(Error::BadRequest)?;
        Ok(())
    }

    /// `PUT /v2/images/{id}/stage`: streams `body` into the workspace.
    pub fn stage(
        &self,
        caller: &Caller,
        id: &str,
        body: &mut dyn Pieces,
        content_length: Option<u64>,
    ) -> Result<()> {
        self.may_receive_data(caller, id)?;
        self.receive_into_staging(id, "uploading", body, content_length)
    }

    /// Takes image `id` from `queued` to `status` and streams `body` into its staging
    /// file; on failure the image returns to `queued` and nothing is left.
    fn receive_into_staging(
        &self,
        id: &str,
        status: &str,
        body: &mut dyn Pieces,
        content_length: Option<u64>,
    ) -> Result<()> {
        let cap = self.config.image_size_cap;
        let key = format!("stage:{id}");
        if let Some(len) = content_length {
            if len > cap {
                return Err(Error::TooLarge(format!(
                    "the upload of {len} bytes exceeds image_size_cap ({cap} bytes)"
                )));
            }
        }
        if !self
            .db
            .start_receiving(id, status, &self.config.host_id)
            .map_err(Error::Internal)?
        {
            let now = self.db.image(id).map_err(Error::Internal)?;
            return Err(Error::Conflict(format!(
                "image {id} is {}: data can be uploaded only while it is queued (once per import)",
                now.map_or("deleted".into(), |i| i.status)
            )));
        }
        if let Some(len) = content_length {
            if !self.workspace.try_hold(&key, len) {
                let _ = self.db.transition(id, &[status], "queued", false);
                return Err(Error::TooLarge(format!(
                    "workspace full: {len} bytes do not fit ({} of {} bytes in use); try again later",
                    self.workspace.used(),
                    self.workspace.capacity()
                )));
            }
        }
        let path = self.workspace.staging_path(id);
        match staging::receive(&self.workspace, &path, body, content_length, &key, cap) {
            Ok(()) => {
                failpoint::hit("stage.received");
                if status == "uploading"
                    && !self
                        .db
                        .transition(id, &["uploading"], "uploading", true)
                        .map_err(Error::Internal)?
                {
                    // Deleted meanwhile.
                    let _ = std::fs::remove_file(&path);
                    self.workspace.release(&key);
                    return Err(Error::NotFound(format!("No image found with ID {id}")));
                }
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                self.workspace.release(&key);
                let _ = self.db.transition(id, &[status], "queued", false);
                Err(e)
            }
        }
    }

    fn refuse_when_stopping(&self) -> Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            Err(Error::Unavailable(
                "vimport is shutting down; try again later".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn new_task(&self, caller: &Caller, image_id: &str, input: Value) -> Task {
        let t = now();
        Task {
            id: new_uuid(),
            kind: "api_image_import".into(),
            image_id: image_id.to_string(),
            status: "pending".into(),
            message: "waiting for a worker".into(),
            input: input.to_string(),
            result: None,
            owner: Some(caller.project_id.clone()),
            user_id: Some(caller.user_id.clone()),
            request_id: Some(caller.request_id.clone()),
            expires_at: None,
            created_at: t.clone(),
            updated_at: t,
            host: Some(self.config.host_id.clone()),
        }
    }

    /// Wakes an idle worker: a task was queued through this host.
    fn enqueue(&self) {
        let _guard = self.wake.lock();
        self.queued.notify_one();
    }

    /// `POST /v2/images/{id}/import`; returns the task id.
    pub fn import(
        &self,
        caller: &Caller,
        id: &str,
        method: ImportMethod,
        request: Value,
    ) -> Result<String> {
        self.refuse_when_stopping()?;
        let img = self.image_to_modify(caller, id, Rule::ModifyImage)?;
        if img.disk_format.is_none() {
            return Err(Error::BadRequest(format!(
                "image {id} has no disk_format: set it (PATCH) before importing"
            )));
        }
        let input = serde_json::json!({"image_id": id, "import_req": request});
        let task = self.new_task(caller, id, input);
        match &method {
            ImportMethod::GlanceDirect => {
                if !self
                    .db
                    .start_import(&task, false)
                    .map_err(Error::Internal)?
                {
                    let img = self.image_for(caller, id)?;
                    return Err(Error::Conflict(format!(
                        "image {id} is {}{}: stage its data first (PUT /v2/images/{id}/stage)",
                        img.status,
                        if img.status == "uploading" {
                            " (upload not complete)"
                        } else {
                            ""
                        }
                    )));
                }
            }
            ImportMethod::WebDownload { uri } => {
                web_download::check_uri(&self.config.web_download, uri)
                    .map_err(Error::BadRequest)?;
                if !self.db.start_import(&task, true).map_err(Error::Internal)? {
                    let img = self.image_for(caller, id)?;
                    return Err(Error::Conflict(format!(
                        "image {id} is {}: web-download imports only a queued image",
                        img.status
                    )));
                }
            }
        }
        self.enqueue();
        failpoint::hit("import.accepted");
        Ok(task.id)
    }

    /// `PUT /v2/images/{id}/file`: receives the data, then runs the import workflow and
    /// answers when the image is active (or why it is not: then it is `queued` again).
    pub fn upload(
        &self,
        caller: &Caller,
        id: &str,
        body: &mut dyn Pieces,
        content_length: Option<u64>,
    ) -> Result<()> {
        self.may_receive_data(caller, id)?;
        self.receive_into_staging(id, "saving", body, content_length)?;
        let task = self.new_task(
            caller,
            id,
            serde_json::json!({"image_id": id, "import_req": {"method": {"name": "upload"}}}),
        );
        let (tx, rx) = mpsc::channel();
        // The waiter first: a worker may claim the task as soon as it is recorded.
        let start = self
            .waiters
            .lock()
            .map_err(|_| "lock poisoned".to_string())
            .map(|mut w| {
                w.insert(task.id.clone(), tx);
            })
            .and_then(|_| self.db.insert_task(&task));
        if let Err(e) = start.map_err(Error::Internal) {
            if let Ok(mut w) = self.waiters.lock() {
                w.remove(&task.id);
            }
            let _ = self
                .db
                .fail_import(&task.id, id, "cannot queue the import", &expires_at());
            let _ = std::fs::remove_file(self.workspace.staging_path(id));
            self.workspace.release(&format!("stage:{id}"));
            return Err(e);
        }
        self.enqueue();
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) if self.stopping.load(Ordering::SeqCst) => {
                Err(Error::Unavailable(message))
            }
            Ok(Err(message)) => Err(Error::BadRequest(message)),
            Err(_) => Err(Error::Internal("the import worker vanished".into())),
        }
    }

    /// `GET /v2/tasks/{id}`.
    pub fn get_task(&self, caller: &Caller, id: &str) -> Result<Task> {
        match self.db.task(id).map_err(Error::Internal)? {
            Some(t) if caller.admin || t.owner.as_deref() == Some(caller.project_id.as_str()) => {
                Ok(t)
            }
            _ => Err(Error::NotFound(format!(
                "Task with the given ID {id} not found"
            ))),
        }
    }

    /// `GET /v2/images/{id}/tasks`, oldest first.
    pub fn image_tasks(&self, caller: &Caller, id: &str) -> Result<Vec<Task>> {
        self.image_for(caller, id)?;
        self.db.tasks_of(id).map_err(Error::Internal)
    }

    /// `GET /v2/tasks`: filters `type`, `status`; `sort_key`, `sort_dir`, `limit`,
    /// `marker`.
    pub fn list_tasks(&self, caller: &Caller, params: &[(String, String)]) -> Result<Page<Task>> {
        let mut sort_key = "created_at".to_string();
        let mut desc = true;
        let mut limit = DEFAULT_LIMIT;
        let mut marker = None;
        let mut filters = Vec::new();
        for (k, v) in params {
            match k.as_str() {
                "sort_key" => sort_key = v.clone(),
                "sort_dir" => desc = parse_dir(v)?,
                "limit" => {
                    limit = v
                        .parse::<usize>()
                        .map_err(|_| {
                            Error::BadRequest(format!(
                                "limit param must be a non-negative integer, not '{v}'"
                            ))
                        })?
                        .min(MAX_LIMIT)
                }
                "marker" => marker = Some(v.clone()),
                "type" | "status" => filters.push((k.clone(), v.clone())),
                other => {
                    return Err(Error::BadRequest(format!(
                        "Invalid filter '{other}'; tasks filter on type and status"
                    )))
                }
            }
        }
        if !["id", "type", "status", "created_at", "updated_at"].contains(&sort_key.as_str()) {
            return Err(Error::BadRequest(format!("Invalid sort_key '{sort_key}'")));
        }
        let mut tasks: Vec<Task> = self
            .db
            .tasks()
            .map_err(Error::Internal)?
            .into_iter()
            .filter(|t| caller.admin || t.owner.as_deref() == Some(caller.project_id.as_str()))
            .filter(|t| {
                filters.iter().all(|(k, v)| match k.as_str() {
                    "type" => &t.kind == v,
                    _ => &t.status == v,
                })
            })
            .collect();
        // A stable sort: ties keep the order of creation.
        tasks.sort_by_key(|t| match sort_key.as_str() {
            "id" => t.id.clone(),
            "type" => t.kind.clone(),
            "status" => t.status.clone(),
            "updated_at" => t.updated_at.clone(),
            _ => t.created_at.clone(),
        });
        if desc {
            tasks.reverse();
        }
        let start = match &marker {
            None => 0,
            Some(m) => tasks
                .iter()
                .position(|t| &t.id == m)
                .map(|p| p + 1)
                .ok_or_else(|| {
                    Error::BadRequest(format!("Invalid marker. Task {m} could not be found."))
                })?,
        };
        let rest = tasks.len().saturating_sub(start);
        let items: Vec<Task> = tasks.into_iter().skip(start).take(limit).collect();
        let next_marker = if rest > items.len() && !items.is_empty() {
            items.last().map(|t| t.id.clone())
        } else {
            None
        };
        Ok(Page { items, next_marker })
    }

    /// Whether a task or staged upload bound to `host` is this host's: on SQLite
    /// (one host) everything is.
    fn mine(&self, host: Option<&str>) -> bool {
        self.db.backend() == Backend::Sqlite || host == Some(self.config.host_id.as_str())
    }

    fn worker_loop(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            // Counted before the claim, so shutdown never sees a claimed task neither
            // pending nor running.
            self.running.fetch_add(1, Ordering::SeqCst);
            let claimed = if self.stopping.load(Ordering::SeqCst) {
                Ok(None)
            } else {
                self.db
                    .claim_task(&self.config.host_id, self.config.task_lease)
            };
            match claimed {
                Ok(Some(task)) => {
                    self.run_task(task);
                    self.running.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot claim a task"),
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            let Ok(guard) = self.wake.lock() else { return };
            if self.queued.wait_timeout(guard, CLAIM_POLL).is_err() {
                return;
            }
        }
    }

    /// Renews this host's heartbeat and leases every third of `task_lease`, cancels
    /// the imports of tasks it no longer holds, removes staged uploads of images that
    /// no longer exist (deleted through another host, or while waiting for a worker),
    /// and (PostgreSQL) fails what silent hosts held and removes their store objects.
    fn heartbeat_loop(self: Arc<Self>) {
        let period = Duration::from_secs(self.config.task_lease / 3).max(Duration::from_secs(1));
        let me = self.config.host_id.clone();
        loop {
            std::thread::sleep(period);
            let held: Vec<String> = self
                .held
                .lock()
                .map(|h| h.keys().cloned().collect())
                .unwrap_or_default();
            match self.db.heartbeat(&me, &held, self.config.task_lease) {
                Ok(lost) => {
                    for task in lost {
                        let image = self.held.lock().ok().and_then(|h| h.get(&task).cloned());
                        let token = image
                            .as_ref()
                            .and_then(|i| self.cancels.lock().ok().and_then(|c| c.get(i).cloned()));
                        if let Some(t) = token {
                            tracing::warn!(task = %task, "this host no longer holds the task (image deleted, or lease given up): stopping its import");
                            t.cancel();
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "heartbeat failed"),
            }
            self.sweep_staging();
            if self.db.backend() != Backend::Postgres {
                continue;
            }
            match self.db.reap(&me, self.config.task_lease) {
                Ok(gone) => {
                    for a in gone {
                        tracing::warn!(task = %a.task_id, image = %a.image_id, host = %a.host,
                            "host {} went silent holding this import: failed it, image queued again", a.host);
                        match self.store.delete(&a.image_id) {
                            Ok(()) => {}
                            // An RBD image the silent host may still watch (Ceph
                            // drops a dead client's watch after 30 s): retried.
                            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                                tracing::warn!(image = %a.image_id, error = %e, "the abandoned import's store object is busy; retrying in the background");
                                self.remove_orphans_later();
                            }
                            Err(e) => {
                                tracing::error!(image = %a.image_id, error = %e, "cannot remove the abandoned import's store object")
                            }
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot check other hosts' leases"),
            }
        }
    }

    /// Removes staged uploads of images that no longer exist (deleted through another
    /// host, which cannot reach this host's workspace, or while waiting for a worker).
    fn sweep_staging(&self) {
        let Ok(rd) = std::fs::read_dir(
            self.workspace
                .staging_path("x")
                .parent()
                .unwrap_or(Path::new(".")),
        ) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if matches!(self.db.image(&id), Ok(None)) {
                let _ = std::fs::remove_file(e.path());
                self.workspace.release(&format!("stage:{id}"));
                tracing::info!(image = %id, "removed the staged upload of a deleted image");
            }
        }
    }

    fn run_task(&self, task: Task) {
        let task_id = task.id.as_str();
        let image_id = task.image_id.clone();
        let cancel = CancelToken::new();
        if let Ok(mut c) = self.cancels.lock() {
            c.insert(image_id.clone(), cancel.clone());
        }
        if let Ok(mut h) = self.held.lock() {
            h.insert(task.id.clone(), image_id.clone());
        }
        failpoint::hit("task.processing");
        let staging = self.workspace.staging_path(&image_id);
        let result = self.import_one(&task, &staging, &cancel);
        let _ = std::fs::remove_file(&staging);
        self.workspace.release(&format!("stage:{image_id}"));
        if let Ok(mut c) = self.cancels.lock() {
            c.remove(&image_id);
        }
        let outcome = self.record_outcome(task_id, &image_id, result, &cancel);
        if let Ok(mut h) = self.held.lock() {
            h.remove(task_id);
        }
        if let Some(w) = self.waiters.lock().ok().and_then(|mut w| w.remove(task_id)) {
            let _ = w.send(outcome);
        }
    }

    /// Records the end of an import in the catalogue; what its waiter is told.
    fn record_outcome(
        &self,
        task_id: &str,
        image_id: &str,
        result: std::result::Result<Stored, String>,
        cancel: &CancelToken,
    ) -> std::result::Result<(), String> {
        let image_id = image_id.to_string();
        match result {
            Ok(stored) => {
                let message = success_message(&stored);
                // The task's success and the image's `active` are one transaction.
                match self
                    .db
                    .finish_import(task_id, &image_id, &stored, &message, &expires_at())
                {
                    Ok(true) => {
                        failpoint::hit("store.recorded");
                        Ok(())
                    }
                    Ok(false) => {
                        // Deleted during the import: its data must not stay.
                        let _ = self.store.delete(&image_id);
                        let m = "cancelled: the image was deleted during the import";
                        let _ = self.db.fail_import(task_id, &image_id, m, &expires_at());
                        Err(m.to_string())
                    }
                    Err(e) => {
                        let _ = self.store.delete(&image_id);
                        let _ = self.db.fail_import(
                            task_id,
                            &image_id,
                            "internal error",
                            &expires_at(),
                        );
                        Err(e)
                    }
                }
            }
            Err(message) => {
                let message = if cancel.is_cancelled() {
                    if self.stopping.load(Ordering::SeqCst) {
                        "cancelled: vimport shut down during this import; stage the image again"
                            .to_string()
                    } else {
                        "cancelled: the image was deleted during the import".to_string()
                    }
                } else {
                    message
                };
                let _ = self
                    .db
                    .fail_import(task_id, &image_id, &message, &expires_at());
                Err(message)
            }
        }
    }

    /// Fetches a web-download's data (if the task is one), then runs the workflow.
    fn import_one(
        &self,
        task: &Task,
        staging: &Path,
        cancel: &CancelToken,
    ) -> std::result::Result<crate::db::Stored, String> {
        let img = self
            .db
            .image(&task.image_id)?
            .ok_or("cancelled: the image was deleted")?;
        let declared = parse_declared_format(img.disk_format.as_deref().unwrap_or(""))?;
        let progress = |m: &str| {
            let _ = self.db.progress(&task.id, m);
        };
        let input: Value = serde_json::from_str(&task.input).unwrap_or(Value::Null);
        if input
            .pointer("/import_req/method/name")
            .and_then(Value::as_str)
            == Some("web-download")
        {
            let uri = input
                .pointer("/import_req/method/uri")
                .and_then(Value::as_str)
                .unwrap_or("");
            progress(&format!("downloading {uri}"));
            let key = format!("stage:{}", task.image_id);
            web_download::fetch(
                &self.config.web_download,
                uri,
                staging,
                self.config.image_size_cap,
                &|n| self.workspace.try_hold(&key, n),
                cancel,
            )?;
        }
        let policy = self.policy();
        let job = workflow::Job {
            image_id: &task.image_id,
            task_id: &task.id,
            declared,
            staging,
            target: self.config.output_format,
            policy: &policy,
            rate_limit: self.config.convert_rate_limit,
            threads: &self.threads,
            cancel,
            progress: &progress,
            record: &|stored: &Stored| self.db.record_intent(&task.id, stored),
        };
        workflow::run(&job, &self.workspace, self.store.as_ref())
    }

    /// Stops taking work: new uploads and imports get 503, queued imports are
    /// cancelled at once, running ones may finish within `grace`, then are cancelled;
    /// returns when every worker is idle, with their images `queued` again and the
    /// workspace cleaned.
    pub fn shutdown(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.queued.notify_all();
        // Pending tasks this host would run (on PostgreSQL, unbound ones stay for
        // the other hosts).
        let pending: Vec<Task> = self
            .db
            .tasks_in("pending")
            .unwrap_or_default()
            .into_iter()
            .filter(|t| self.mine(t.host.as_deref()))
            .collect();
        for t in pending {
            let m =
                "cancelled: vimport shut down before this import started; stage the image again";
            if self.db.fail_import(&t.id, &t.image_id, m, &expires_at()) == Ok(true) {
                let _ = std::fs::remove_file(self.workspace.staging_path(&t.image_id));
                self.workspace.release(&format!("stage:{}", t.image_id));
                if let Some(w) = self.waiters.lock().ok().and_then(|mut w| w.remove(&t.id)) {
                    let _ = w.send(Err(m.to_string()));
                }
            }
        }
        let deadline = Instant::now() + grace;
        while self.running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.running.load(Ordering::SeqCst) > 0 {
            tracing::warn!(
                running = self.running.load(Ordering::SeqCst),
                "shutdown grace period over: cancelling running imports"
            );
            if let Ok(c) = self.cancels.lock() {
                for t in c.values() {
                    t.cancel();
                }
            }
            let hard = Instant::now() + Duration::from_secs(30);
            while self.running.load(Ordering::SeqCst) > 0 && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Err(e) = self.recover(false) {
            tracing::error!(error = %e, "cleanup at shutdown failed");
        }
    }

    /// Imports running or waiting for this host now.
    pub fn busy(&self) -> usize {
        let waiting = self.db.tasks_in("pending").map_or(0, |v| {
            v.iter().filter(|t| self.mine(t.host.as_deref())).count()
        });
        self.held.lock().map_or(0, |h| h.len()) + waiting
    }
}

/// The message of a successful import task.
fn success_message(s: &Stored) -> String {
    format!("imported: stored as {} ({} bytes)", s.disk_format, s.size)
}

/// Glance's `_available_sort_keys`, and `min_disk`, `min_ram` (which Glance refuses).
const SORT_KEYS: &[&str] = &[
    "min_disk",
    "min_ram",
    "name",
    "status",
    "container_format",
    "disk_format",
    "size",
    "id",
    "created_at",
    "updated_at",
];

fn parse_dir(d: &str) -> Result<bool> {
    match d {
        "asc" => Ok(false),
        "desc" => Ok(true),
        other => Err(Error::BadRequest(format!(
            "Invalid sort direction: {other}; asc or desc"
        ))),
    }
}

fn compare(a: &Image, b: &Image, key: &str) -> std::cmp::Ordering {
    match key {
        "name" => a.name.cmp(&b.name),
        "status" => a.status.cmp(&b.status),
        "container_format" => a.container_format.cmp(&b.container_format),
        "disk_format" => a.disk_format.cmp(&b.disk_format),
        "size" => a.size.cmp(&b.size),
        "min_disk" => a.min_disk.cmp(&b.min_disk),
        "min_ram" => a.min_ram.cmp(&b.min_ram),
        "id" => a.id.cmp(&b.id),
        "updated_at" => a.updated_at.cmp(&b.updated_at),
        _ => a.created_at.cmp(&b.created_at),
    }
}

/// `value` against `filter`: `in:a,b,…` (any of), or equality.
fn matches_str(actual: Option<&str>, filter: &str) -> bool {
    match filter.strip_prefix("in:") {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().trim_matches('"'))
            .any(|s| Some(s) == actual),
        None => Some(filter) == actual,
    }
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(Error::BadRequest(format!(
            "{k} must be true or false, not '{v}'"
        ))),
    }
}

/// Whether `img` passes the list filter `k=v`.
fn image_matches(img: &Image, k: &str, v: &str) -> Result<bool> {
    let size = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| Error::BadRequest(format!("{k} must be a number of bytes, not '{v}'")))
    };
    Ok(match k {
        "name" => matches_str(img.name.as_deref(), v),
        "status" => matches_str(Some(&img.status), v),
        "visibility" => v == "all" || matches_str(Some(&img.visibility), v),
        "owner" => matches_str(img.owner.as_deref(), v),
        "disk_format" => matches_str(img.disk_format.as_deref(), v),
        "container_format" => matches_str(img.container_format.as_deref(), v),
        "id" => matches_str(Some(&img.id), v),
        "tag" => img.tags.iter().any(|t| t == v),
        "size_min" => {
            let m = size(v)?;
            img.size.is_some_and(|s| s >= m)
        }
        "size_max" => {
            let m = size(v)?;
            img.size.is_some_and(|s| s <= m)
        }
        "protected" => img.protected == parse_bool(k, v)?,
        "os_hidden" => img.os_hidden == parse_bool(k, v)?,
        "created_at" | "updated_at" => {
            let actual = if k == "created_at" {
                &img.created_at
            } else {
                &img.updated_at
            };
            let (op, when) = v.split_once(':').unwrap_or(("eq", v));
            let when = when.trim();
            match op {
                "eq" => actual.as_str() == when,
                "neq" => actual.as_str() != when,
                "gt" => actual.as_str() > when,
                "gte" => actual.as_str() >= when,
                "lt" => actual.as_str() < when,
                "lte" => actual.as_str() <= when,
                other => {
                    return Err(Error::BadRequest(format!(
                        "Invalid operator '{other}' for {k}; one of eq, neq, gt, gte, lt, lte"
                    )))
                }
            }
        }
        extra => matches_str(img.properties.get(extra).map(String::as_str), v),
    })
}

/// Splits and unescapes a JSON pointer (`/a~1b` → `["a/b"]`).
fn pointer(path: &str) -> Result<Vec<String>> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Error::BadRequest(format!(
            "Json path should start with a '/', not '{path}'"
        )));
    };
    if rest.is_empty() || rest.contains("//") || rest.ends_with('/') {
        return Err(Error::BadRequest(format!("Pointer `{path}` is not valid.")));
    }
    Ok(rest
        .split('/')
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn want_str(k: &str, v: &Value, nullable: bool) -> Result<Option<String>> {
    match v {
        Value::String(s) => Ok(Some(s.clone())),
        Value::Null if nullable => Ok(None),
        other => Err(Error::BadRequest(format!(
            "Invalid value for '{k}': {other} is not a string"
        ))),
    }
}

fn want_u64(k: &str, v: &Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| {
        Error::BadRequest(format!(
            "Invalid value for '{k}': {v} is not a non-negative integer"
        ))
    })
}

fn want_bool(k: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| Error::BadRequest(format!("Invalid value for '{k}': {v} is not a boolean")))
}

/// Applies one JSON-patch operation to `img` as Glance's v2.1 patch does.
fn apply_op(caller: &Caller, img: &mut Image, op: &PatchOp) -> Result<()> {
    let path = pointer(&op.path)?;
    let root = path[0].as_str();
    if !["add", "replace", "remove"].contains(&op.op.as_str()) {
        return Err(Error::BadRequest(format!(
            "Invalid operation: `{}`. It must be one of the following: add, remove, replace.",
            op.op
        )));
    }
    if READ_ONLY.contains(&root) {
        return Err(Error::Forbidden(format!(
            "Attribute '{root}' is read-only."
        )));
    }
    if RESERVED.contains(&root) || root.starts_with("os_glance") {
        return Err(Error::Forbidden(format!("Attribute '{root}' is reserved.")));
    }
    let value = if op.op == "remove" {
        Value::Null
    } else {
        op.value.clone().ok_or_else(|| {
            Error::BadRequest(format!(
                "Operation \"{}\" requires a member named \"value\".",
                op.op
            ))
        })?
    };
    const BASE: &[&str] = &[
        "name",
        "visibility",
        "protected",
        "os_hidden",
        "owner",
        "min_disk",
        "min_ram",
        "disk_format",
        "container_format",
        "tags",
    ];
    if root == "tags" && path.len() == 2 {
        // `/tags/-` adds one tag; `/tags/N` replaces or removes the Nth.
        let tag = if op.op == "remove" {
            None
        } else {
            Some(want_str("tags", &value, false)?.unwrap_or_default())
        };
        match (op.op.as_str(), path[1].as_str()) {
            ("add", "-") => img.tags.push(tag.unwrap_or_default()),
            (_, n) => {
                let i = n
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i < img.tags.len())
                    .ok_or_else(|| Error::Conflict(format!("No tag at /tags/{n}")))?;
                match tag {
                    Some(t) => img.tags[i] = t,
                    None => {
                        img.tags.remove(i);
                    }
                }
            }
        }
        Service::check_tags(&img.tags)?;
        img.tags.sort();
        img.tags.dedup();
        return Ok(());
    }
    if path.len() > 1 {
        return Err(Error::BadRequest(format!(
            "Invalid JSON pointer for this resource: '{}'",
            op.path
        )));
    }
    if BASE.contains(&root) {
        if op.op == "remove" {
            return Err(Error::Forbidden(format!(
                "Property {root} may not be removed."
            )));
        }
        match root {
            "name" => {
                img.name = want_str(root, &value, true)?;
                if img.name.as_ref().is_some_and(|n| n.chars().count() > 255) {
                    return Err(Error::BadRequest(
                        "name is longer than 255 characters".into(),
                    ));
                }
            }
            "visibility" => {
                let v = want_str(root, &value, false)?.unwrap_or_default();
                Service::check_visibility(caller, &v, img.owner.as_deref())?;
                img.visibility = v;
            }
            "protected" => img.protected = want_bool(root, &value)?,
            "os_hidden" => img.os_hidden = want_bool(root, &value)?,
            "owner" => {
                let o = want_str(root, &value, true)?;
                Service::check_owner(caller, Some(o.as_deref().unwrap_or("")))?;
                img.owner = o;
            }
            "min_disk" => img.min_disk = want_u64(root, &value)?,
            "min_ram" => img.min_ram = want_u64(root, &value)?,
            "disk_format" => {
                let f = want_str(root, &value, true)?;
                Service::check_disk_format(f.as_deref())?;
                img.disk_format = f.map(|f| if f == "vpc" { "vhd".into() } else { f });
            }
            "container_format" => {
                let f = want_str(root, &value, true)?;
                Service::check_container_format(f.as_deref())?;
                img.container_format = f;
            }
            _ => {
                let Value::Array(items) = &value else {
                    return Err(Error::BadRequest(format!(
                        "Invalid value for 'tags': {value} is not an array"
                    )));
                };
                let mut tags = Vec::new();
                for t in items {
                    tags.push(want_str("tags", t, false)?.unwrap_or_default());
                }
                Service::check_tags(&tags)?;
                tags.sort();
                tags.dedup();
                img.tags = tags;
            }
        }
        return Ok(());
    }
    Service::check_extra_key(root)?;
    match op.op.as_str() {
        "remove" => {
            if img.properties.remove(root).is_none() {
                return Err(Error::Conflict(format!("Property {root} does not exist.")));
            }
        }
        "replace" if !img.properties.contains_key(root) => {
            return Err(Error::Conflict(format!("Property {root} does not exist.")));
        }
        _ => {
            let v = Service::extra_value(root, &value)?;
            img.properties.insert(root.to_string(), v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(admin: bool) -> Caller {
        Caller {
            project_id: "p1".into(),
            user_id: "p1".into(),
            admin,
            roles: if admin {
                vec!["admin".into(), "member".into(), "reader".into()]
            } else {
                vec!["member".into(), "reader".into()]
            },
            request_id: "req-x".into(),
        }
    }

    fn op(op: &str, path: &str, value: Value) -> PatchOp {
        PatchOp {
            op: op.into(),
            path: path.into(),
            value: Some(value),
        }
    }

    #[test]
    fn patch_follows_glance() {
        let c = caller(false);
        let mut img = Image {
            status: "queued".into(),
            visibility: "private".into(),
            ..Image::default()
        };
        apply_op(&c, &mut img, &op("add", "/os_distro", "debian".into())).unwrap();
        apply_op(&c, &mut img, &op("add", "/os_distro", "ubuntu".into())).unwrap();
        assert_eq!(img.properties["os_distro"], "ubuntu", "add replaces");
        apply_op(&c, &mut img, &op("replace", "/name", "n".into())).unwrap();
        assert_eq!(img.name.as_deref(), Some("n"));
        apply_op(&c, &mut img, &op("add", "/tags/-", "t1".into())).unwrap();
        assert_eq!(img.tags, vec!["t1"]);
        let e = |o: PatchOp, img: &mut Image| apply_op(&c, img, &o).unwrap_err();
        assert!(
            matches!(e(op("replace", "/status", "active".into()), &mut img), Error::Forbidden(m) if m.contains("read-only"))
        );
        assert!(
            matches!(e(op("add", "/os_glance_x", "1".into()), &mut img), Error::Forbidden(m) if m.contains("reserved"))
        );
        assert!(matches!(
            e(op("replace", "/hw_x", "1".into()), &mut img),
            Error::Conflict(_)
        ));
        assert!(matches!(
            e(op("remove", "/hw_x", Value::Null), &mut img),
            Error::Conflict(_)
        ));
        assert!(matches!(
            e(op("remove", "/name", Value::Null), &mut img),
            Error::Forbidden(_)
        ));
        assert!(matches!(
            e(op("add", "/hw_x", 1.into()), &mut img),
            Error::BadRequest(_)
        ));
        assert!(matches!(
            e(op("replace", "/visibility", "public".into()), &mut img),
            Error::Forbidden(_)
        ));
        assert!(matches!(
            e(op("move", "/name", "x".into()), &mut img),
            Error::BadRequest(_)
        ));
        apply_op(&c, &mut img, &op("remove", "/os_distro", Value::Null)).unwrap();
        assert!(img.properties.is_empty());
        apply_op(
            &caller(true),
            &mut img,
            &op("replace", "/visibility", "public".into()),
        )
        .unwrap();
        assert_eq!(img.visibility, "public");
    }

    #[test]
    fn filters() {
        let img = Image {
            id: "a".into(),
            status: "active".into(),
            size: Some(10),
            tags: vec!["x".into()],
            properties: [("os_distro".to_string(), "debian".to_string())].into(),
            ..Image::default()
        };
        assert!(image_matches(&img, "size_min", "10").unwrap());
        assert!(!image_matches(&img, "size_min", "11").unwrap());
        assert!(image_matches(&img, "size_max", "10").unwrap());
        assert!(image_matches(&img, "status", "in:queued,active").unwrap());
        assert!(image_matches(&img, "os_distro", "debian").unwrap());
        assert!(!image_matches(&img, "os_distro", "ubuntu").unwrap());
        assert!(image_matches(&img, "tag", "x").unwrap());
        assert!(image_matches(&img, "size_min", "x").is_err());
    }
}
