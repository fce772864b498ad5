//! Images and tasks, kept in SQLite so they survive restarts.
//!
//! The schema is `migrations/NNNN_name.sql`, applied at open and counted in
//! `PRAGMA user_version`. Every state change of an image or a task goes through a
//! method here: guarded `UPDATE … WHERE id = ? AND status IN (…)` statements that
//! report whether they applied, inside one transaction when a task and its image
//! change together. Calls block: the HTTP layer runs them off the async runtime.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

/// The migrations, in order; `user_version` counts those applied.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_initial",
        include_str!("../migrations/0001_initial.sql"),
    ),
    (
        "0002_glance_model",
        include_str!("../migrations/0002_glance_model.sql"),
    ),
    (
        "0003_task_constraints",
        include_str!("../migrations/0003_task_constraints.sql"),
    ),
];

/// The property that records the stores an import failed to reach (Glance's name).
pub const FAILED_IMPORT: &str = "os_glance_failed_import";

/// An image record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// Id (a UUID).
    pub id: String,
    /// The user's name for it.
    pub name: Option<String>,
    /// queued, saving, uploading, importing, active, killed, deactivated.
    pub status: String,
    /// private, public, shared or community.
    pub visibility: String,
    /// Cannot be deleted while set.
    pub protected: bool,
    /// Left out of default listings.
    pub os_hidden: bool,
    /// The project that owns it.
    pub owner: Option<String>,
    /// Disk space (GiB) needed to boot it.
    pub min_disk: u64,
    /// RAM (MiB) needed to boot it.
    pub min_ram: u64,
    /// The format the user declared (Glance vocabulary), then the stored format.
    pub disk_format: Option<String>,
    /// Always "bare" when set.
    pub container_format: Option<String>,
    /// Bytes of the stored file.
    pub size: Option<u64>,
    /// Virtual size of the stored image.
    pub virtual_size: Option<u64>,
    /// MD5 of the stored file.
    pub checksum: Option<String>,
    /// `sha512` once hashed.
    pub os_hash_algo: Option<String>,
    /// SHA-512 of the stored file.
    pub os_hash_value: Option<String>,
    /// The last import task (the import lock while `importing`).
    pub task_id: Option<String>,
    /// The staging upload completed.
    pub staged: bool,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Extra properties (`os_distro`, `hw_*`, anything else).
    pub properties: BTreeMap<String, String>,
}

/// An import task record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Task {
    /// Id (a UUID).
    pub id: String,
    /// `api_image_import`.
    pub kind: String,
    /// The image it imports.
    pub image_id: String,
    /// pending, processing, success or failure.
    pub status: String,
    /// Progress or the reason of a failure.
    pub message: String,
    /// The request's input (JSON text).
    pub input: String,
    /// The result (JSON text), once done.
    pub result: Option<String>,
    /// The project that started it.
    pub owner: Option<String>,
    /// The user that started it.
    pub user_id: Option<String>,
    /// The request id of the call that started it.
    pub request_id: Option<String>,
    /// When it may be forgotten.
    pub expires_at: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// What a completed import stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The stored format (Glance vocabulary).
    pub disk_format: String,
    /// Bytes of the stored file.
    pub size: u64,
    /// Virtual size.
    pub virtual_size: u64,
    /// MD5 (hex).
    pub checksum: String,
    /// SHA-512 (hex).
    pub sha512: String,
}

/// The database.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

/// A database error, as text (it reaches the log, never the client).
pub type DbResult<T> = Result<T, String>;

fn err(e: rusqlite::Error) -> String {
    format!("database error: {e}")
}

/// Now, as RFC 3339 in UTC (e.g. `2026-11-25T03:40:00Z`).
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// `secs` since the epoch as RFC 3339 in UTC.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d, h, mi, s) = vconvert_core::utc_fields(secs);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

const IMAGE_COLS: &str = "id, name, status, visibility, protected, os_hidden, owner, min_disk, min_ram, disk_format, container_format, size, virtual_size, checksum, os_hash_algo, os_hash_value, task_id, staged, created_at, updated_at";
const TASK_COLS: &str = "id, type, image_id, status, message, input, result, owner, user_id, request_id, expires_at, created_at, updated_at";

fn u64_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
}

fn image_from(row: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        id: row.get(0)?,
        name: row.get(1)?,
        status: row.get(2)?,
        visibility: row.get(3)?,
        protected: row.get(4)?,
        os_hidden: row.get(5)?,
        owner: row.get(6)?,
        min_disk: u64_col(row, 7)?.unwrap_or(0),
        min_ram: u64_col(row, 8)?.unwrap_or(0),
        disk_format: row.get(9)?,
        container_format: row.get(10)?,
        size: u64_col(row, 11)?,
        virtual_size: u64_col(row, 12)?,
        checksum: row.get(13)?,
        os_hash_algo: row.get(14)?,
        os_hash_value: row.get(15)?,
        task_id: row.get(16)?,
        staged: row.get(17)?,
        created_at: row.get(18)?,
        updated_at: row.get(19)?,
        tags: Vec::new(),
        properties: BTreeMap::new(),
    })
}

fn task_from(row: &Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        id: row.get(0)?,
        kind: row.get(1)?,
        image_id: row.get(2)?,
        status: row.get(3)?,
        message: row.get(4)?,
        input: row.get(5)?,
        result: row.get(6)?,
        owner: row.get(7)?,
        user_id: row.get(8)?,
        request_id: row.get(9)?,
        expires_at: row.get(10)?,
        created_at: row.get(11)?,
        updated_at: row.get(12)?,
    })
}

/// Loads the tags and properties of `img`.
fn fill(c: &Connection, img: &mut Image) -> rusqlite::Result<()> {
    let mut st = c.prepare_cached("SELECT tag FROM image_tags WHERE image_id=?1 ORDER BY tag")?;
    img.tags = st
        .query_map([&img.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut st = c.prepare_cached("SELECT name, value FROM image_properties WHERE image_id=?1")?;
    img.properties = st
        .query_map([&img.id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

/// Replaces the tags and properties of `img` in the database.
fn write_tags_and_properties(tx: &Transaction<'_>, img: &Image) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM image_tags WHERE image_id=?1", [&img.id])?;
    tx.execute("DELETE FROM image_properties WHERE image_id=?1", [&img.id])?;
    for t in &img.tags {
        tx.execute(
            "INSERT OR IGNORE INTO image_tags (image_id, tag) VALUES (?1, ?2)",
            params![img.id, t],
        )?;
    }
    for (k, v) in &img.properties {
        tx.execute(
            "INSERT INTO image_properties (image_id, name, value) VALUES (?1, ?2, ?3)",
            params![img.id, k, v],
        )?;
    }
    Ok(())
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v.min(i64::MAX as u64) as i64)
}

impl Db {
    /// Opens (creating if needed) the database at `path` and applies the migrations it
    /// has not run yet.
    pub fn open(path: &Path) -> DbResult<Db> {
        let mut conn = Connection::open(path).map_err(err)?;
        // Foreign keys are off while migrations rebuild tables (dropping `images` with
        // them on would cascade to its tasks); each migration must leave none broken.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;",
        )
        .map_err(err)?;
        let applied: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        for (n, (name, sql)) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(sql)
                .map_err(|e| format!("migration {name} failed: {e}"))?;
            let broken: i64 = tx
                .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                    r.get(0)
                })
                .map_err(err)?;
            if broken > 0 {
                return Err(format!(
                    "migration {name} failed: it leaves {broken} rows with a broken foreign key"
                ));
            }
            tx.execute_batch(&format!("PRAGMA user_version = {}", n + 1))
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        conn.execute_batch("PRAGMA foreign_keys=ON;").map_err(err)?;
        if applied as usize > MIGRATIONS.len() {
            return Err(format!(
                "database {} is at schema version {applied}, newer than this vimport ({})",
                path.display(),
                MIGRATIONS.len()
            ));
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> DbResult<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| "database lock poisoned".to_string())?;
        f(&mut conn).map_err(err)
    }

    /// Inserts a new image with its tags and properties. `Ok(false)`: the id is taken.
    pub fn insert_image(&self, i: &Image) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                &format!("INSERT OR IGNORE INTO images ({IMAGE_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)"),
                params![
                    i.id, i.name, i.status, i.visibility, i.protected, i.os_hidden, i.owner,
                    opt_i64(Some(i.min_disk)), opt_i64(Some(i.min_ram)), i.disk_format,
                    i.container_format, opt_i64(i.size), opt_i64(i.virtual_size), i.checksum,
                    i.os_hash_algo, i.os_hash_value, i.task_id, i.staged, i.created_at,
                    i.updated_at
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            write_tags_and_properties(&tx, i)?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Writes the user-editable fields of `i` (name, visibility, protected, os_hidden,
    /// owner, min_disk, min_ram, formats, tags, properties), stamping `updated_at`.
    /// The formats change only while the image is `queued`. `Ok(false)`: no such image.
    pub fn update_metadata(&self, i: &Image) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE images SET name=?2, visibility=?3, protected=?4, os_hidden=?5, owner=?6,
                 min_disk=?7, min_ram=?8,
                 disk_format=CASE WHEN status='queued' THEN ?9 ELSE disk_format END,
                 container_format=CASE WHEN status='queued' THEN ?10 ELSE container_format END,
                 updated_at=?11 WHERE id=?1",
                params![
                    i.id,
                    i.name,
                    i.visibility,
                    i.protected,
                    i.os_hidden,
                    i.owner,
                    opt_i64(Some(i.min_disk)),
                    opt_i64(Some(i.min_ram)),
                    i.disk_format,
                    i.container_format,
                    now()
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            write_tags_and_properties(&tx, i)?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Adds `tag` to image `id`; `Ok(false)`: no such image.
    pub fn add_tag(&self, id: &str, tag: &str) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE images SET updated_at=?2 WHERE id=?1",
                params![id, now()],
            )?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT OR IGNORE INTO image_tags (image_id, tag) VALUES (?1, ?2)",
                params![id, tag],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Removes `tag` from image `id`; `Ok(false)`: the image has no such tag.
    pub fn remove_tag(&self, id: &str, tag: &str) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "DELETE FROM image_tags WHERE image_id=?1 AND tag=?2",
                params![id, tag],
            )?;
            if n > 0 {
                tx.execute(
                    "UPDATE images SET updated_at=?2 WHERE id=?1",
                    params![id, now()],
                )?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    /// Moves image `id` from one of `from` to `to`, setting `staged`. `Ok(false)`: the
    /// image is missing or in another status.
    pub fn transition(&self, id: &str, from: &[&str], to: &str, staged: bool) -> DbResult<bool> {
        self.with(|c| {
            let list = from
                .iter()
                .map(|s| format!("'{}'", s.replace('\'', "")))
                .collect::<Vec<_>>()
                .join(",");
            let n = c.execute(
                &format!(
                    "UPDATE images SET status=?2, staged=?3, updated_at=?4 WHERE id=?1 AND status IN ({list})"
                ),
                params![id, to, staged, now()],
            )?;
            Ok(n == 1)
        })
    }

    /// Starts an import: the image turns `importing` with `task` as its import lock,
    /// and the task is recorded, together. The image must be staged (`uploading` and
    /// complete), or `queued` when the service fetches the data itself
    /// (`from_queued`, web-download). `Ok(false)`: the image is in another state.
    pub fn start_import(&self, task: &Task, from_queued: bool) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE images SET status='importing', task_id=?2, updated_at=?3
                 WHERE id=?1 AND ((?4 = 0 AND status='uploading' AND staged=1)
                                  OR (?4 = 1 AND status='queued'))",
                params![task.image_id, task.id, now(), from_queued],
            )?;
            if n == 0 {
                return Ok(false);
            }
            insert_task(&tx, task)?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Records a task that does not change its image's status (`PUT /file`).
    pub fn insert_task(&self, task: &Task) -> DbResult<()> {
        self.with(|c| insert_task(c, task))
    }

    /// Sets a task's status and message (progress).
    pub fn set_task(&self, id: &str, status: &str, message: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET status=?2, message=?3, updated_at=?4 WHERE id=?1",
                params![id, status, message, now()],
            )
            .map(|_| ())
        })
    }

    /// Completes an import: the task succeeds and the image turns `active` with what was
    /// stored, together (the task first, so a client that sees the image active never
    /// finds its task still processing). `Ok(false)`: the image is gone or no longer
    /// being imported (deleted meanwhile).
    pub fn finish_import(
        &self,
        task_id: &str,
        image_id: &str,
        stored: &Stored,
        message: &str,
        expires_at: &str,
    ) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let t = now();
            let n = tx.execute(
                "UPDATE images SET status='active', disk_format=?2, size=?3, virtual_size=?4,
                 checksum=?5, os_hash_algo='sha512', os_hash_value=?6, staged=0, updated_at=?7
                 WHERE id=?1 AND status IN ('importing', 'saving')",
                params![
                    image_id,
                    stored.disk_format,
                    opt_i64(Some(stored.size)),
                    opt_i64(Some(stored.virtual_size)),
                    stored.checksum,
                    stored.sha512,
                    t
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "DELETE FROM image_properties WHERE image_id=?1 AND name=?2",
                params![image_id, FAILED_IMPORT],
            )?;
            let result = serde_json::json!({"image_id": image_id}).to_string();
            tx.execute(
                "UPDATE tasks SET status='success', message=?2, result=?3, expires_at=?4,
                 updated_at=?5 WHERE id=?1",
                params![task_id, message, result, expires_at, t],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Fails an import: the task fails with `message` and the image (if still being
    /// imported or uploaded) returns to `queued` with its staged data forgotten, and
    /// records `os_glance_failed_import`, together.
    pub fn fail_import(
        &self,
        task_id: &str,
        image_id: &str,
        message: &str,
        expires_at: &str,
    ) -> DbResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            let t = now();
            tx.execute(
                "UPDATE tasks SET status='failure', message=?2, expires_at=?3, updated_at=?4
                 WHERE id=?1",
                params![task_id, message, expires_at, t],
            )?;
            let n = tx.execute(
                "UPDATE images SET status='queued', staged=0, updated_at=?2
                 WHERE id=?1 AND status IN ('importing', 'saving', 'uploading')",
                params![image_id, t],
            )?;
            if n > 0 {
                tx.execute(
                    "INSERT OR REPLACE INTO image_properties (image_id, name, value)
                     VALUES (?1, ?2, 'file')",
                    params![image_id, FAILED_IMPORT],
                )?;
            }
            tx.commit()
        })
    }

    /// The image `id`, with tags and properties.
    pub fn image(&self, id: &str) -> DbResult<Option<Image>> {
        self.with(|c| {
            let img = c
                .query_row(
                    &format!("SELECT {IMAGE_COLS} FROM images WHERE id=?1"),
                    [id],
                    image_from,
                )
                .optional()?;
            match img {
                Some(mut i) => {
                    fill(c, &mut i)?;
                    Ok(Some(i))
                }
                None => Ok(None),
            }
        })
    }

    /// Every image, with tags and properties, oldest first.
    pub fn images(&self) -> DbResult<Vec<Image>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {IMAGE_COLS} FROM images ORDER BY created_at, id"
            ))?;
            let mut v: Vec<Image> = st
                .query_map([], image_from)?
                .collect::<rusqlite::Result<_>>()?;
            // Tags and properties of all images in two queries, not two per image.
            let mut tags: std::collections::HashMap<String, Vec<String>> = Default::default();
            let mut st = c.prepare("SELECT image_id, tag FROM image_tags ORDER BY tag")?;
            for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))? {
                let (id, t) = r?;
                tags.entry(id).or_default().push(t);
            }
            let mut props: std::collections::HashMap<String, BTreeMap<String, String>> =
                Default::default();
            let mut st = c.prepare("SELECT image_id, name, value FROM image_properties")?;
            for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))? {
                let (id, k, val) = r?;
                props.entry(id).or_default().insert(k, val);
            }
            for i in &mut v {
                i.tags = tags.remove(&i.id).unwrap_or_default();
                i.properties = props.remove(&i.id).unwrap_or_default();
            }
            Ok(v)
        })
    }

    /// Deletes the image `id` (its tags and properties go with it).
    pub fn delete_image(&self, id: &str) -> DbResult<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM images WHERE id=?1", [id])? == 1))
    }

    /// The task `id`.
    pub fn task(&self, id: &str) -> DbResult<Option<Task>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE id=?1"),
                [id],
                task_from,
            )
            .optional()
        })
    }

    /// Every task, oldest first.
    pub fn tasks(&self) -> DbResult<Vec<Task>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks ORDER BY created_at, rowid"
            ))?;
            let rows = st.query_map([], task_from)?;
            rows.collect()
        })
    }

    /// Tasks of image `id`, oldest first.
    pub fn tasks_of(&self, image_id: &str) -> DbResult<Vec<Task>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE image_id=?1 ORDER BY created_at, rowid"
            ))?;
            let rows = st.query_map([image_id], task_from)?;
            rows.collect()
        })
    }

    /// Tasks in `status`.
    pub fn tasks_in(&self, status: &str) -> DbResult<Vec<Task>> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {TASK_COLS} FROM tasks WHERE status=?1"))?;
            let rows = st.query_map([status], task_from)?;
            rows.collect()
        })
    }

    /// Records in task `id` what its import is about to put in the store, before it
    /// does (the startup recovery records a stored object only if its task says what
    /// it is).
    pub fn record_intent(&self, id: &str, stored: &Stored) -> DbResult<()> {
        let json = serde_json::json!({
            "disk_format": stored.disk_format,
            "size": stored.size,
            "virtual_size": stored.virtual_size,
            "checksum": stored.checksum,
            "sha512": stored.sha512,
        })
        .to_string();
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET stored=?2, message=?3, updated_at=?4 WHERE id=?1",
                params![id, json, "storing the image", now()],
            )
            .map(|_| ())
        })
    }

    /// What task `id` recorded it was about to store, if anything.
    pub fn intent(&self, id: &str) -> DbResult<Option<Stored>> {
        let text: Option<String> = self.with(|c| {
            c.query_row("SELECT stored FROM tasks WHERE id=?1", [id], |r| r.get(0))
                .optional()
                .map(Option::flatten)
        })?;
        let Some(text) = text else { return Ok(None) };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("task {id}: stored intent is not JSON: {e}"))?;
        let field = |k: &str| v[k].as_str().map(str::to_string);
        let number = |k: &str| v[k].as_u64();
        match (
            field("disk_format"),
            number("size"),
            number("virtual_size"),
            field("checksum"),
            field("sha512"),
        ) {
            (Some(disk_format), Some(size), Some(virtual_size), Some(checksum), Some(sha512)) => {
                Ok(Some(Stored {
                    disk_format,
                    size,
                    virtual_size,
                    checksum,
                    sha512,
                }))
            }
            _ => Err(format!("task {id}: stored intent is incomplete: {text}")),
        }
    }
}

fn insert_task(c: &Connection, t: &Task) -> rusqlite::Result<()> {
    c.execute(
        &format!(
            "INSERT INTO tasks ({TASK_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"
        ),
        params![
            t.id,
            t.kind,
            t.image_id,
            t.status,
            t.message,
            t.input,
            t.result,
            t.owner,
            t.user_id,
            t.request_id,
            t.expires_at,
            t.created_at,
            t.updated_at
        ],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T");
    }

    fn image(id: &str) -> Image {
        Image {
            id: id.into(),
            name: Some("n".into()),
            status: "queued".into(),
            visibility: "private".into(),
            owner: Some("p1".into()),
            disk_format: Some("qcow2".into()),
            container_format: Some("bare".into()),
            created_at: now(),
            updated_at: now(),
            tags: vec!["a".into(), "b".into()],
            properties: [("os_distro".to_string(), "debian".to_string())].into(),
            ..Image::default()
        }
    }

    #[test]
    fn images_and_tasks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db")).unwrap();
        let img = image("i1");
        assert!(db.insert_image(&img).unwrap());
        assert!(!db.insert_image(&img).unwrap(), "the id is taken");
        assert_eq!(db.image("i1").unwrap().unwrap(), img);
        assert!(!db.transition("i1", &["active"], "uploading", true).unwrap());
        assert!(db.transition("i1", &["queued"], "uploading", true).unwrap());
        let task = Task {
            id: "t1".into(),
            kind: "api_image_import".into(),
            image_id: "i1".into(),
            status: "pending".into(),
            input: "{}".into(),
            created_at: now(),
            updated_at: now(),
            ..Task::default()
        };
        assert!(db.start_import(&task, false).unwrap());
        assert!(!db.start_import(&task, false).unwrap(), "already importing");
        assert!(!db.start_import(&task, true).unwrap(), "not queued");
        db.set_task("t1", "processing", "50%").unwrap();
        assert_eq!(db.tasks_in("processing").unwrap().len(), 1);
        db.fail_import("t1", "i1", "broken", &now()).unwrap();
        let back = db.image("i1").unwrap().unwrap();
        assert_eq!((back.status.as_str(), back.staged), ("queued", false));
        assert_eq!(back.properties[FAILED_IMPORT], "file");
        assert_eq!(db.task("t1").unwrap().unwrap().status, "failure");
        // Survives reopening.
        drop(db);
        let db = Db::open(&dir.path().join("x.db")).unwrap();
        assert_eq!(db.task("t1").unwrap().unwrap().message, "broken");
        // Tags, properties and tasks go with the image.
        assert!(db.delete_image("i1").unwrap());
        assert!(db.image("i1").unwrap().is_none());
        assert!(
            db.task("t1").unwrap().is_none(),
            "the task went with its image"
        );
        assert!(db.insert_image(&image("i1")).unwrap());
        assert_eq!(db.image("i1").unwrap().unwrap().tags, vec!["a", "b"]);
    }

    #[test]
    fn the_schema_holds_the_constraints_and_the_intent() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db")).unwrap();
        assert!(db.insert_image(&image("i1")).unwrap());
        let task = |id: &str, image: &str| Task {
            id: id.into(),
            kind: "api_image_import".into(),
            image_id: image.into(),
            status: "pending".into(),
            input: "{}".into(),
            created_at: now(),
            updated_at: now(),
            ..Task::default()
        };
        // A task of no image, and statuses outside the lists, are refused by SQLite.
        let e = db.insert_task(&task("t0", "nope")).unwrap_err();
        assert!(e.contains("FOREIGN KEY"), "{e}");
        let e = db.set_task("t0", "done", "").map(|_| ());
        assert!(e.is_ok(), "no such task: nothing to update");
        db.insert_task(&task("t1", "i1")).unwrap();
        let e = db.set_task("t1", "done", "").unwrap_err();
        assert!(e.contains("CHECK"), "{e}");
        let e = db
            .transition("i1", &["queued"], "imported", false)
            .unwrap_err();
        assert!(e.contains("CHECK"), "{e}");
        // The intent round-trips.
        assert_eq!(db.intent("t1").unwrap(), None);
        let stored = Stored {
            disk_format: "raw".into(),
            size: 1 << 40,
            virtual_size: 1 << 40,
            checksum: "m".into(),
            sha512: "s".into(),
        };
        db.record_intent("t1", &stored).unwrap();
        assert_eq!(db.intent("t1").unwrap(), Some(stored));
        assert_eq!(db.task("t1").unwrap().unwrap().message, "storing the image");
    }

    #[test]
    fn a_database_of_the_first_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(MIGRATIONS[0].1).unwrap();
        c.execute(
            "INSERT INTO images VALUES ('i', 'old', 'active', 'raw', 'bare', 5, 5, 'm', 's', NULL, 0, 't', 't')",
            [],
        )
        .unwrap();
        // A task of the image, and one left behind by a deleted image.
        c.execute_batch(
            "INSERT INTO tasks VALUES ('t', 'i', 'success', 'ok', 't', 't');
             INSERT INTO tasks VALUES ('gone', 'deleted-image', 'failure', 'x', 't', 't');",
        )
        .unwrap();
        drop(c);
        let db = Db::open(&path).unwrap();
        let i = db.image("i").unwrap().unwrap();
        assert_eq!(i.os_hash_algo.as_deref(), Some("sha512"));
        assert_eq!(i.visibility, "private");
        assert_eq!(i.size, Some(5));
        assert_eq!(db.task("t").unwrap().unwrap().image_id, "i");
        assert!(
            db.task("gone").unwrap().is_none(),
            "orphan tasks are dropped"
        );
        drop(db);
        // Opening again applies nothing more.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.images().unwrap().len(), 1);
    }
}
