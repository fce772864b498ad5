//! Images and tasks, kept in SQLite so they survive restarts.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

/// An image record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Id (a UUID).
    pub id: String,
    /// The user's name for it.
    pub name: String,
    /// queued, uploading, importing, active or killed.
    pub status: String,
    /// The format the user declared (Glance vocabulary), then the stored format.
    pub disk_format: String,
    /// Always "bare".
    pub container_format: String,
    /// Bytes of the stored file.
    pub size: Option<u64>,
    /// Virtual size of the stored image.
    pub virtual_size: Option<u64>,
    /// MD5 of the stored file.
    pub checksum: Option<String>,
    /// SHA-512 of the stored file.
    pub os_hash_value: Option<String>,
    /// The last import task.
    pub task_id: Option<String>,
    /// The staging upload completed.
    pub staged: bool,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// An import task record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Id (a UUID).
    pub id: String,
    /// The image it imports.
    pub image_id: String,
    /// pending, processing, success or failure.
    pub status: String,
    /// Progress or the reason of a failure.
    pub message: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// What a completed import stored, recorded in its task before the stored object is
/// moved into the store (so recovery can record an object whose import completed).
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

impl Stored {
    fn to_json(&self) -> String {
        serde_json::json!({
            "disk_format": self.disk_format,
            "size": self.size,
            "virtual_size": self.virtual_size,
            "checksum": self.checksum,
            "sha512": self.sha512,
        })
        .to_string()
    }

    fn from_json(text: &str) -> Option<Stored> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Stored {
            disk_format: v["disk_format"].as_str()?.to_string(),
            size: v["size"].as_u64()?,
            virtual_size: v["virtual_size"].as_u64()?,
            checksum: v["checksum"].as_str()?.to_string(),
            sha512: v["sha512"].as_str()?.to_string(),
        })
    }
}

/// The database.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

/// A database error, as text (it reaches users as a 500 with this message).
pub type DbResult<T> = Result<T, String>;

fn err(e: rusqlite::Error) -> String {
    format!("database error: {e}")
}

/// Now, as RFC 3339 in UTC (e.g. `2026-11-25T03:40:00Z`).
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d, h, mi, s) = vconvert_core::utc_fields(secs);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

fn image_from(row: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        id: row.get(0)?,
        name: row.get(1)?,
        status: row.get(2)?,
        disk_format: row.get(3)?,
        container_format: row.get(4)?,
        size: row.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        virtual_size: row.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        checksum: row.get(7)?,
        os_hash_value: row.get(8)?,
        task_id: row.get(9)?,
        staged: row.get(10)?,
        created_at: row.get(11)?,
        updated_at: row.get(12)?,
    })
}

fn task_from(row: &Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        id: row.get(0)?,
        image_id: row.get(1)?,
        status: row.get(2)?,
        message: row.get(3)?,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
    })
}

const IMAGE_COLS: &str = "id, name, status, disk_format, container_format, size, virtual_size, checksum, os_hash_value, task_id, staged, created_at, updated_at";
const TASK_COLS: &str = "id, image_id, status, message, created_at, updated_at";

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> DbResult<Db> {
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS images (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL,
                disk_format TEXT NOT NULL, container_format TEXT NOT NULL,
                size INTEGER, virtual_size INTEGER, checksum TEXT, os_hash_value TEXT,
                task_id TEXT, staged INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY, image_id TEXT NOT NULL, status TEXT NOT NULL,
                message TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);",
        )
        .map_err(err)?;
        let has_stored: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('tasks') WHERE name='stored'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(err)?
            > 0;
        if !has_stored {
            conn.execute_batch("ALTER TABLE tasks ADD COLUMN stored TEXT;")
                .map_err(err)?;
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> DbResult<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| "database lock poisoned".to_string())?;
        f(&conn).map_err(err)
    }

    /// Inserts a new image.
    pub fn insert_image(&self, i: &Image) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO images ({IMAGE_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"),
                params![
                    i.id, i.name, i.status, i.disk_format, i.container_format,
                    i.size.map(|v| v as i64), i.virtual_size.map(|v| v as i64),
                    i.checksum, i.os_hash_value, i.task_id, i.staged, i.created_at, i.updated_at
                ],
            )
            .map(|_| ())
        })
    }

    /// Writes every field of `i` (by id), stamping `updated_at`.
    pub fn update_image(&self, i: &Image) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE images SET name=?2, status=?3, disk_format=?4, container_format=?5, size=?6,
                 virtual_size=?7, checksum=?8, os_hash_value=?9, task_id=?10, staged=?11, updated_at=?12
                 WHERE id=?1",
                params![
                    i.id, i.name, i.status, i.disk_format, i.container_format,
                    i.size.map(|v| v as i64), i.virtual_size.map(|v| v as i64),
                    i.checksum, i.os_hash_value, i.task_id, i.staged, now()
                ],
            )
            .map(|_| ())
        })
    }

    /// The image `id`.
    pub fn image(&self, id: &str) -> DbResult<Option<Image>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {IMAGE_COLS} FROM images WHERE id=?1"),
                [id],
                image_from,
            )
            .optional()
        })
    }

    /// Every image, oldest first.
    pub fn images(&self) -> DbResult<Vec<Image>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {IMAGE_COLS} FROM images ORDER BY created_at, id"
            ))?;
            let rows = st.query_map([], image_from)?;
            rows.collect()
        })
    }

    /// Deletes the image `id` and its tasks, in one transaction.
    pub fn delete_image(&self, id: &str) -> DbResult<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute("DELETE FROM tasks WHERE image_id=?1", [id])?;
            tx.execute("DELETE FROM images WHERE id=?1", [id])?;
            tx.commit()
        })
    }

    /// In one transaction: inserts task `t` and writes image `i` (now importing by it).
    pub fn start_import(&self, t: &Task, i: &Image) -> DbResult<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                &format!("INSERT INTO tasks ({TASK_COLS}) VALUES (?1,?2,?3,?4,?5,?6)"),
                params![
                    t.id,
                    t.image_id,
                    t.status,
                    t.message,
                    t.created_at,
                    t.updated_at
                ],
            )?;
            tx.execute(
                "UPDATE images SET status=?2, task_id=?3, updated_at=?4 WHERE id=?1",
                params![i.id, i.status, i.task_id, now()],
            )?;
            tx.commit()
        })
    }

    /// Records in task `id` what its import is about to put in the store.
    pub fn record_intent(&self, id: &str, stored: &Stored) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET stored=?2, message=?3, updated_at=?4 WHERE id=?1",
                params![id, stored.to_json(), "storing the image", now()],
            )
            .map(|_| ())
        })
    }

    /// What task `id` recorded it was about to store, if anything.
    pub fn intent(&self, id: &str) -> DbResult<Option<Stored>> {
        self.with(|c| {
            c.query_row("SELECT stored FROM tasks WHERE id=?1", [id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()
        })
        .map(|v| v.flatten().as_deref().and_then(Stored::from_json))
    }

    /// In one transaction: task `task` succeeds with `message` and image `image` turns
    /// active with `stored`, if the image is still importing by this task. Returns
    /// whether it applied (false: the image was deleted or moved on).
    pub fn finish_import(
        &self,
        task: &str,
        image: &str,
        stored: &Stored,
        message: &str,
    ) -> DbResult<bool> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let t = now();
            let n = tx.execute(
                "UPDATE images SET status='active', disk_format=?3, size=?4, virtual_size=?5,
                 checksum=?6, os_hash_value=?7, staged=0, updated_at=?8
                 WHERE id=?1 AND status='importing' AND task_id=?2",
                params![
                    image,
                    task,
                    stored.disk_format,
                    stored.size as i64,
                    stored.virtual_size as i64,
                    stored.checksum,
                    stored.sha512,
                    t
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE tasks SET status='success', message=?2, updated_at=?3 WHERE id=?1",
                params![task, message, t],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// In one transaction: task `task` fails with `message` and image `image` returns to
    /// `queued` if it is importing by this task.
    pub fn fail_import(&self, task: &str, image: &str, message: &str) -> DbResult<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let t = now();
            tx.execute(
                "UPDATE tasks SET status='failure', message=?2, updated_at=?3 WHERE id=?1",
                params![task, message, t],
            )?;
            tx.execute(
                "UPDATE images SET status='queued', staged=0, updated_at=?3
                 WHERE id=?1 AND status='importing' AND task_id=?2",
                params![image, task, t],
            )?;
            tx.commit()
        })
    }

    /// Inserts a new task.
    pub fn insert_task(&self, t: &Task) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO tasks ({TASK_COLS}) VALUES (?1,?2,?3,?4,?5,?6)"),
                params![
                    t.id,
                    t.image_id,
                    t.status,
                    t.message,
                    t.created_at,
                    t.updated_at
                ],
            )
            .map(|_| ())
        })
    }

    /// Sets a task's status and message.
    pub fn set_task(&self, id: &str, status: &str, message: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET status=?2, message=?3, updated_at=?4 WHERE id=?1",
                params![id, status, message, now()],
            )
            .map(|_| ())
        })
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

    /// Tasks in `status`.
    pub fn tasks_in(&self, status: &str) -> DbResult<Vec<Task>> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {TASK_COLS} FROM tasks WHERE status=?1"))?;
            let rows = st.query_map([status], task_from)?;
            rows.collect()
        })
    }
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

    #[test]
    fn images_and_tasks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db")).unwrap();
        let mut img = Image {
            id: "i1".into(),
            name: "n".into(),
            status: "queued".into(),
            disk_format: "qcow2".into(),
            container_format: "bare".into(),
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_value: None,
            task_id: None,
            staged: false,
            created_at: now(),
            updated_at: now(),
        };
        db.insert_image(&img).unwrap();
        img.status = "active".into();
        img.size = Some(1 << 40);
        db.update_image(&img).unwrap();
        let back = db.image("i1").unwrap().unwrap();
        assert_eq!(back.status, "active");
        assert_eq!(back.size, Some(1 << 40));
        db.insert_task(&Task {
            id: "t1".into(),
            image_id: "i1".into(),
            status: "pending".into(),
            message: String::new(),
            created_at: now(),
            updated_at: now(),
        })
        .unwrap();
        db.set_task("t1", "processing", "50%").unwrap();
        assert_eq!(db.tasks_in("processing").unwrap().len(), 1);
        // Survives reopening.
        drop(db);
        let db = Db::open(&dir.path().join("x.db")).unwrap();
        assert_eq!(db.task("t1").unwrap().unwrap().message, "50%");
        // Deleting an image deletes its tasks.
        db.delete_image("i1").unwrap();
        assert!(db.image("i1").unwrap().is_none());
        assert!(db.task("t1").unwrap().is_none());
    }
}
