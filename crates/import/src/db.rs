//! Images and tasks, kept in SQLite (one host, the embedded default) or PostgreSQL
//! (several hosts over one catalogue) so they survive restarts.
//!
//! Both backends run the same statements: SQL is written once with `$N` parameters
//! (SQLite reads them as `?N`), booleans are INTEGER 0/1 and times RFC 3339 text on
//! both, and the few dialect differences (the database clock, row locks, task order)
//! are [`Backend`] methods. The schema is `migrations/NNNN_name.sql`, applied at open:
//! counted in `PRAGMA user_version` on SQLite and in `vimport_schema` on PostgreSQL
//! (there under an advisory lock, so hosts starting together migrate once); the
//! PostgreSQL schema starts at SQLite's third version (`migrations/postgres/`).
//!
//! Every state change of an image or a task goes through a method here: guarded
//! `UPDATE … WHERE id = $1 AND status IN (…)` statements that report whether they
//! applied, each method one transaction (on PostgreSQL too), rows locked image first,
//! then task. Calls block: the HTTP layer runs them off the async runtime.
//!
//! The driver crates are `rusqlite` and the synchronous `postgres` (rust-postgres);
//! [`Sql`] is the small interface both answer, so the methods below are written once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A migration: its name and its SQL for each backend (the same text where the SQL
/// is portable; empty where the step does not apply).
struct Migration {
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// The migrations, in order; the schema version counts those applied.
const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_initial",
        sqlite: include_str!("../migrations/0001_initial.sql"),
        postgres: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        name: "0002_glance_model",
        sqlite: include_str!("../migrations/0002_glance_model.sql"),
        postgres: "",
    },
    Migration {
        name: "0003_task_constraints",
        sqlite: include_str!("../migrations/0003_task_constraints.sql"),
        postgres: "",
    },
    Migration {
        name: "0004_hosts",
        sqlite: include_str!("../migrations/0004_hosts.sql"),
        postgres: include_str!("../migrations/0004_hosts.sql"),
    },
    Migration {
        name: "0005_image_members",
        sqlite: include_str!("../migrations/0005_image_members.sql"),
        postgres: include_str!("../migrations/0005_image_members.sql"),
    },
];

/// The key of the PostgreSQL advisory lock held while migrating ("vimport" in ASCII).
const MIGRATION_LOCK: i64 = 0x76_69_6d_70_6f_72_74;

/// The property that records the stores an import failed to reach (Glance's name).
pub const FAILED_IMPORT: &str = "os_glance_failed_import";

/// Where the catalogue lives (`database` in the configuration).
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (one host).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user:password@host:port/db`), shared by hosts.
    Postgres(String),
}

impl Location {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; anything else a SQLite path.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_string())
        } else {
            Location::Sqlite(PathBuf::from(s))
        }
    }
}

/// Shows a PostgreSQL URL without its password.
impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// `url` with the password replaced by `***`.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The database engine behind a [`Db`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one host.
    Sqlite,
    /// PostgreSQL: several hosts may share it.
    Postgres,
}

impl Backend {
    /// The database's clock, in whole seconds since the epoch (leases are measured
    /// on it, so hosts' clocks need not agree).
    fn now_epoch(self) -> &'static str {
        match self {
            Backend::Sqlite => "CAST(strftime('%s', 'now') AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS BIGINT)",
        }
    }

    /// Locks the rows a `SELECT` reads until the transaction ends (SQLite has one
    /// writer, and one connection per process: nothing to lock).
    fn for_update(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// As [`Backend::for_update`], skipping rows another transaction holds.
    fn skip_locked(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Tasks in the order they were created.
    fn task_order(self) -> &'static str {
        match self {
            Backend::Sqlite => "created_at, rowid",
            Backend::Postgres => "created_at, seq",
        }
    }
}

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
    /// The host that runs it (or must: the one holding its staged data); `None`: any
    /// host may claim it.
    pub host: Option<String>,
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

/// A project an image is shared with (Glance's image member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The shared image.
    pub image_id: String,
    /// The member project.
    pub member: String,
    /// pending, accepted or rejected: the member's answer.
    pub status: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// What [`Db::add_member`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberAdded {
    /// The member was added.
    Added,
    /// The image has this member already.
    Duplicate,
    /// The image has as many members as allowed.
    Limit,
    /// No such image.
    NoImage,
}

const MEMBER_COLS: &str = "image_id, member, status, created_at, updated_at";

fn member_from(r: &Row) -> Member {
    Member {
        image_id: r.text(0),
        member: r.text(1),
        status: r.text(2),
        created_at: r.text(3),
        updated_at: r.text(4),
    }
}

/// A task given up because the host holding it went silent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abandoned {
    /// The task (now `failure`).
    pub task_id: String,
    /// Its image (now `queued`).
    pub image_id: String,
    /// The silent host.
    pub host: String,
}

/// A connection of either backend.
enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres {
        client: Box<postgres::Client>,
        url: String,
    },
}

/// The database.
pub struct Db {
    conn: Mutex<Conn>,
    backend: Backend,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .finish()
    }
}

/// A database error, as text (it reaches the log, never the client).
pub type DbResult<T> = Result<T, String>;

fn err(e: rusqlite::Error) -> String {
    format!("database error: {e}")
}

fn pg_err(e: postgres::Error) -> String {
    // The server's message (`ERROR: … violates check constraint …`) is the source.
    match e.as_db_error() {
        Some(d) => format!("database error: {d}"),
        None => format!("database error: {e}"),
    }
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

/// One SQL value, as both backends store it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum V {
    Null,
    Int(i64),
    Text(String),
}

impl From<&str> for V {
    fn from(s: &str) -> V {
        V::Text(s.to_string())
    }
}
impl From<&String> for V {
    fn from(s: &String) -> V {
        V::Text(s.clone())
    }
}
impl From<String> for V {
    fn from(s: String) -> V {
        V::Text(s)
    }
}
impl From<&Option<String>> for V {
    fn from(s: &Option<String>) -> V {
        s.as_ref().map_or(V::Null, V::from)
    }
}
impl From<Option<&str>> for V {
    fn from(s: Option<&str>) -> V {
        s.map_or(V::Null, V::from)
    }
}
impl From<bool> for V {
    fn from(b: bool) -> V {
        V::Int(i64::from(b))
    }
}
impl From<i64> for V {
    fn from(n: i64) -> V {
        V::Int(n)
    }
}
impl From<u64> for V {
    fn from(n: u64) -> V {
        V::Int(n.min(i64::MAX as u64) as i64)
    }
}
impl From<Option<u64>> for V {
    fn from(n: Option<u64>) -> V {
        n.map_or(V::Null, V::from)
    }
}

/// `[V::from(a), V::from(b), …]`.
macro_rules! vals {
    ($($x:expr),* $(,)?) => { [$(V::from($x)),*] };
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            V::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            V::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            V::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl postgres::types::ToSql for V {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            V::Null => Ok(IsNull::Yes),
            V::Int(n) => match *ty {
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            V::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        use postgres::types::Type;
        [
            Type::INT8,
            Type::INT4,
            Type::INT2,
            Type::BOOL,
            Type::TEXT,
            Type::VARCHAR,
        ]
        .contains(ty)
    }

    postgres::types::to_sql_checked!();
}

/// A result row.
struct Row(Vec<V>);

impl Row {
    fn opt(&self, i: usize) -> Option<String> {
        match &self.0[i] {
            V::Text(s) => Some(s.clone()),
            V::Int(n) => Some(n.to_string()),
            V::Null => None,
        }
    }
    fn text(&self, i: usize) -> String {
        self.opt(i).unwrap_or_default()
    }
    fn int(&self, i: usize) -> Option<i64> {
        match &self.0[i] {
            V::Int(n) => Some(*n),
            V::Text(s) => s.parse().ok(),
            V::Null => None,
        }
    }
    fn u64(&self, i: usize) -> Option<u64> {
        self.int(i).map(|v| v.max(0) as u64)
    }
    fn flag(&self, i: usize) -> bool {
        self.int(i).unwrap_or(0) != 0
    }
}

/// What both backends answer, inside one transaction.
trait Sql {
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, p: &[V]) -> DbResult<u64>;
    /// Runs a query; its rows.
    fn rows(&mut self, sql: &str, p: &[V]) -> DbResult<Vec<Row>>;
    /// The backend, for its dialect.
    fn backend(&self) -> Backend;
    /// The first row of a query, if any.
    fn row(&mut self, sql: &str, p: &[V]) -> DbResult<Option<Row>> {
        Ok(self.rows(sql, p)?.into_iter().next())
    }
}

/// `$N` parameters as SQLite's `?N`.
fn lite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

struct Lite<'a>(&'a rusqlite::Connection);

impl Sql for Lite<'_> {
    fn exec(&mut self, sql: &str, p: &[V]) -> DbResult<u64> {
        let mut st = self.0.prepare_cached(&lite_sql(sql)).map_err(err)?;
        st.execute(rusqlite::params_from_iter(p.iter()))
            .map(|n| n as u64)
            .map_err(err)
    }

    fn rows(&mut self, sql: &str, p: &[V]) -> DbResult<Vec<Row>> {
        use rusqlite::types::ValueRef;
        let mut st = self.0.prepare_cached(&lite_sql(sql)).map_err(err)?;
        let n = st.column_count();
        let rows = st
            .query_map(rusqlite::params_from_iter(p.iter()), |r| {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(match r.get_ref(i)? {
                        ValueRef::Null => V::Null,
                        ValueRef::Integer(n) => V::Int(n),
                        ValueRef::Real(f) => V::Int(f as i64),
                        ValueRef::Text(t) | ValueRef::Blob(t) => {
                            V::Text(String::from_utf8_lossy(t).into_owned())
                        }
                    });
                }
                Ok(Row(v))
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(err)
    }

    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
}

struct Pg<'a, 'b>(&'a mut postgres::Transaction<'b>);

fn pg_params(p: &[V]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

impl Sql for Pg<'_, '_> {
    fn exec(&mut self, sql: &str, p: &[V]) -> DbResult<u64> {
        self.0.execute(sql, &pg_params(p)).map_err(pg_err)
    }

    fn rows(&mut self, sql: &str, p: &[V]) -> DbResult<Vec<Row>> {
        use postgres::types::Type;
        let rows = self.0.query(sql, &pg_params(p)).map_err(pg_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut v = Vec::with_capacity(r.len());
            for (i, c) in r.columns().iter().enumerate() {
                let ty = c.type_();
                let get = |e: postgres::Error| pg_err(e);
                v.push(
                    if *ty == Type::INT8 {
                        r.try_get::<_, Option<i64>>(i).map_err(get)?.map(V::Int)
                    } else if *ty == Type::INT4 {
                        r.try_get::<_, Option<i32>>(i)
                            .map_err(get)?
                            .map(|n| V::Int(n.into()))
                    } else if *ty == Type::INT2 {
                        r.try_get::<_, Option<i16>>(i)
                            .map_err(get)?
                            .map(|n| V::Int(n.into()))
                    } else if *ty == Type::BOOL {
                        r.try_get::<_, Option<bool>>(i)
                            .map_err(get)?
                            .map(|b| V::Int(b.into()))
                    } else {
                        r.try_get::<_, Option<String>>(i).map_err(get)?.map(V::Text)
                    }
                    .unwrap_or(V::Null),
                );
            }
            out.push(Row(v));
        }
        Ok(out)
    }

    fn backend(&self) -> Backend {
        Backend::Postgres
    }
}

const IMAGE_COLS: &str = "id, name, status, visibility, protected, os_hidden, owner, min_disk, min_ram, disk_format, container_format, size, virtual_size, checksum, os_hash_algo, os_hash_value, task_id, staged, created_at, updated_at";
const TASK_COLS: &str = "id, type, image_id, status, message, input, result, owner, user_id, request_id, expires_at, created_at, updated_at, host";

fn image_from(r: &Row) -> Image {
    Image {
        id: r.text(0),
        name: r.opt(1),
        status: r.text(2),
        visibility: r.text(3),
        protected: r.flag(4),
        os_hidden: r.flag(5),
        owner: r.opt(6),
        min_disk: r.u64(7).unwrap_or(0),
        min_ram: r.u64(8).unwrap_or(0),
        disk_format: r.opt(9),
        container_format: r.opt(10),
        size: r.u64(11),
        virtual_size: r.u64(12),
        checksum: r.opt(13),
        os_hash_algo: r.opt(14),
        os_hash_value: r.opt(15),
        task_id: r.opt(16),
        staged: r.flag(17),
        created_at: r.text(18),
        updated_at: r.text(19),
        tags: Vec::new(),
        properties: BTreeMap::new(),
    }
}

fn task_from(r: &Row) -> Task {
    Task {
        id: r.text(0),
        kind: r.text(1),
        image_id: r.text(2),
        status: r.text(3),
        message: r.text(4),
        input: r.text(5),
        result: r.opt(6),
        owner: r.opt(7),
        user_id: r.opt(8),
        request_id: r.opt(9),
        expires_at: r.opt(10),
        created_at: r.text(11),
        updated_at: r.text(12),
        host: r.opt(13),
    }
}

/// Loads the tags and properties of `img`.
fn fill(c: &mut dyn Sql, img: &mut Image) -> DbResult<()> {
    img.tags = c
        .rows(
            "SELECT tag FROM image_tags WHERE image_id=$1 ORDER BY tag",
            &vals![&img.id],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect();
    img.properties = c
        .rows(
            "SELECT name, value FROM image_properties WHERE image_id=$1",
            &vals![&img.id],
        )?
        .iter()
        .map(|r| (r.text(0), r.text(1)))
        .collect();
    Ok(())
}

/// Replaces the tags and properties of `img` in the database.
fn write_tags_and_properties(c: &mut dyn Sql, img: &Image) -> DbResult<()> {
    c.exec("DELETE FROM image_tags WHERE image_id=$1", &vals![&img.id])?;
    c.exec(
        "DELETE FROM image_properties WHERE image_id=$1",
        &vals![&img.id],
    )?;
    for t in &img.tags {
        c.exec(
            "INSERT INTO image_tags (image_id, tag) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &vals![&img.id, t],
        )?;
    }
    for (k, v) in &img.properties {
        c.exec(
            "INSERT INTO image_properties (image_id, name, value) VALUES ($1, $2, $3)",
            &vals![&img.id, k, v],
        )?;
    }
    Ok(())
}

fn insert_task(c: &mut dyn Sql, t: &Task) -> DbResult<()> {
    c.exec(
        &format!(
            "INSERT INTO tasks ({TASK_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"
        ),
        &vals![
            &t.id,
            &t.kind,
            &t.image_id,
            &t.status,
            &t.message,
            &t.input,
            &t.result,
            &t.owner,
            &t.user_id,
            &t.request_id,
            &t.expires_at,
            &t.created_at,
            &t.updated_at,
            &t.host
        ],
    )
    .map(|_| ())
}

/// Locks image `id`'s row (PostgreSQL) so that transactions touching an image and its
/// task always lock them in that order.
fn lock_image(c: &mut dyn Sql, id: &str) -> DbResult<()> {
    let sql = format!(
        "SELECT id FROM images WHERE id=$1{}",
        c.backend().for_update()
    );
    c.rows(&sql, &vals![id]).map(|_| ())
}

/// [`Db::fail_import`] inside a transaction.
fn fail_import_in(
    c: &mut dyn Sql,
    task_id: &str,
    image_id: &str,
    message: &str,
    expires_at: &str,
) -> DbResult<bool> {
    lock_image(c, image_id)?;
    let t = now();
    let n = c.exec(
        "UPDATE tasks SET status='failure', message=$2, expires_at=$3, updated_at=$4
         WHERE id=$1 AND status IN ('pending', 'processing')",
        &vals![task_id, message, expires_at, &t],
    )?;
    if n == 0 {
        return Ok(false);
    }
    let n = c.exec(
        "UPDATE images SET status='queued', staged=0, staged_on=NULL, updated_at=$2
         WHERE id=$1 AND status IN ('importing', 'saving', 'uploading')",
        &vals![image_id, &t],
    )?;
    if n > 0 {
        c.exec(
            "INSERT INTO image_properties (image_id, name, value) VALUES ($1, $2, 'file')
             ON CONFLICT (image_id, name) DO UPDATE SET value = excluded.value",
            &vals![image_id, FAILED_IMPORT],
        )?;
    }
    Ok(true)
}

impl Db {
    /// Opens (creating if needed) the SQLite database at `path` and applies the
    /// migrations it has not run yet.
    pub fn open(path: &Path) -> DbResult<Db> {
        let mut conn = rusqlite::Connection::open(path).map_err(err)?;
        // Foreign keys are off while migrations rebuild tables (dropping `images` with
        // them on would cascade to its tasks); each migration must leave none broken.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;",
        )
        .map_err(err)?;
        let applied: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        for (n, m) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(m.sqlite)
                .map_err(|e| format!("migration {} failed: {e}", m.name))?;
            let broken: i64 = tx
                .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                    r.get(0)
                })
                .map_err(err)?;
            if broken > 0 {
                return Err(format!(
                    "migration {} failed: it leaves {broken} rows with a broken foreign key",
                    m.name
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
            conn: Mutex::new(Conn::Sqlite(conn)),
            backend: Backend::Sqlite,
        })
    }

    /// Connects to the PostgreSQL database at `url` and applies the migrations it has
    /// not run yet (one host at a time: the others wait on an advisory lock).
    pub fn open_postgres(url: &str) -> DbResult<Db> {
        let mut client = Self::pg_connect(url)?;
        let mut tx = client.transaction().map_err(pg_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(pg_err)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS vimport_schema (version INTEGER NOT NULL)")
            .map_err(pg_err)?;
        let applied: i32 = match tx
            .query_opt("SELECT version FROM vimport_schema", &[])
            .map_err(pg_err)?
        {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO vimport_schema (version) VALUES (0)", &[])
                    .map_err(pg_err)?;
                0
            }
        };
        if applied as usize > MIGRATIONS.len() {
            return Err(format!(
                "database {} is at schema version {applied}, newer than this vimport ({})",
                redact(url),
                MIGRATIONS.len()
            ));
        }
        for m in MIGRATIONS.iter().skip(applied.max(0) as usize) {
            if !m.postgres.is_empty() {
                tx.batch_execute(m.postgres)
                    .map_err(|e| format!("migration {} failed: {}", m.name, pg_err(e)))?;
            }
        }
        tx.execute(
            "UPDATE vimport_schema SET version=$1",
            &[&(MIGRATIONS.len() as i32)],
        )
        .map_err(pg_err)?;
        tx.commit().map_err(pg_err)?;
        Ok(Db {
            conn: Mutex::new(Conn::Postgres {
                client: Box::new(client),
                url: url.to_string(),
            }),
            backend: Backend::Postgres,
        })
    }

    fn pg_connect(url: &str) -> DbResult<postgres::Client> {
        postgres::Client::connect(url, postgres::NoTls)
            .map_err(|e| format!("cannot connect to the database {}: {e}", redact(url)))
    }

    /// Opens the catalogue at `location`.
    pub fn connect(location: &Location) -> DbResult<Db> {
        match location {
            Location::Sqlite(p) => Self::open(p),
            Location::Postgres(url) => Self::open_postgres(url),
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `f` in one transaction, committed when `keep` says so of its result and
    /// rolled back otherwise (and on error). A PostgreSQL connection found closed
    /// (the server restarted) is opened again first.
    fn run<T>(
        &self,
        f: impl FnOnce(&mut dyn Sql) -> DbResult<T>,
        keep: impl FnOnce(&T) -> bool,
    ) -> DbResult<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| "database lock poisoned".to_string())?;
        match &mut *conn {
            Conn::Sqlite(c) => {
                let tx = c.transaction().map_err(err)?;
                let v = f(&mut Lite(&tx))?;
                if keep(&v) {
                    tx.commit().map_err(err)?;
                }
                Ok(v)
            }
            Conn::Postgres { client, url } => {
                if client.is_closed() {
                    **client = Self::pg_connect(url)?;
                }
                let mut tx = client.transaction().map_err(pg_err)?;
                let v = f(&mut Pg(&mut tx))?;
                if keep(&v) {
                    tx.commit().map_err(pg_err)?;
                } else {
                    tx.rollback().map_err(pg_err)?;
                }
                Ok(v)
            }
        }
    }

    /// Runs `f` in one transaction, committed if it succeeds.
    fn tx<T>(&self, f: impl FnOnce(&mut dyn Sql) -> DbResult<T>) -> DbResult<T> {
        self.run(f, |_| true)
    }

    /// Runs `f` in one transaction, committed if it answers `true`.
    fn guarded(&self, f: impl FnOnce(&mut dyn Sql) -> DbResult<bool>) -> DbResult<bool> {
        self.run(f, |applied| *applied)
    }

    /// Inserts a new image with its tags and properties. `Ok(false)`: the id is taken.
    pub fn insert_image(&self, i: &Image) -> DbResult<bool> {
        self.guarded(|c| {
            let n = c.exec(
                &format!("INSERT INTO images ({IMAGE_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20) ON CONFLICT DO NOTHING"),
                &vals![
                    &i.id, &i.name, &i.status, &i.visibility, i.protected, i.os_hidden, &i.owner,
                    i.min_disk, i.min_ram, &i.disk_format, &i.container_format, i.size,
                    i.virtual_size, &i.checksum, &i.os_hash_algo, &i.os_hash_value, &i.task_id,
                    i.staged, &i.created_at, &i.updated_at
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            write_tags_and_properties(c, i)?;
            Ok(true)
        })
    }

    /// Writes the user-editable fields of `i` (name, visibility, protected, os_hidden,
    /// owner, min_disk, min_ram, formats, tags, properties), stamping `updated_at`.
    /// The formats change only while the image is `queued`. `Ok(false)`: no such image.
    pub fn update_metadata(&self, i: &Image) -> DbResult<bool> {
        self.guarded(|c| {
            let n = c.exec(
                "UPDATE images SET name=$2, visibility=$3, protected=$4, os_hidden=$5, owner=$6,
                 min_disk=$7, min_ram=$8,
                 disk_format=CASE WHEN status='queued' THEN $9 ELSE disk_format END,
                 container_format=CASE WHEN status='queued' THEN $10 ELSE container_format END,
                 updated_at=$11 WHERE id=$1",
                &vals![
                    &i.id,
                    &i.name,
                    &i.visibility,
                    i.protected,
                    i.os_hidden,
                    &i.owner,
                    i.min_disk,
                    i.min_ram,
                    &i.disk_format,
                    &i.container_format,
                    now()
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            write_tags_and_properties(c, i)?;
            Ok(true)
        })
    }

    /// Adds `tag` to image `id`; `Ok(false)`: no such image.
    pub fn add_tag(&self, id: &str, tag: &str) -> DbResult<bool> {
        self.guarded(|c| {
            let n = c.exec(
                "UPDATE images SET updated_at=$2 WHERE id=$1",
                &vals![id, now()],
            )?;
            if n == 0 {
                return Ok(false);
            }
            c.exec(
                "INSERT INTO image_tags (image_id, tag) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &vals![id, tag],
            )?;
            Ok(true)
        })
    }

    /// Removes `tag` from image `id`; `Ok(false)`: the image has no such tag.
    pub fn remove_tag(&self, id: &str, tag: &str) -> DbResult<bool> {
        self.tx(|c| {
            let n = c.exec(
                "DELETE FROM image_tags WHERE image_id=$1 AND tag=$2",
                &vals![id, tag],
            )?;
            if n > 0 {
                c.exec(
                    "UPDATE images SET updated_at=$2 WHERE id=$1",
                    &vals![id, now()],
                )?;
            }
            Ok(n > 0)
        })
    }

    /// Moves image `id` from one of `from` to `to`, setting `staged`. `Ok(false)`: the
    /// image is missing or in another status.
    pub fn transition(&self, id: &str, from: &[&str], to: &str, staged: bool) -> DbResult<bool> {
        let list = from
            .iter()
            .map(|s| format!("'{}'", s.replace('\'', "")))
            .collect::<Vec<_>>()
            .join(",");
        self.tx(|c| {
            let n = c.exec(
                &format!(
                    "UPDATE images SET status=$2, staged=$3, updated_at=$4 WHERE id=$1 AND status IN ({list})"
                ),
                &vals![id, to, staged, now()],
            )?;
            Ok(n == 1)
        })
    }

    /// Takes image `id` from `queued` to `status` (`uploading` or `saving`) as `host`
    /// starts receiving its data into its workspace. `Ok(false)`: the image is
    /// missing or not `queued`.
    pub fn start_receiving(&self, id: &str, status: &str, host: &str) -> DbResult<bool> {
        self.tx(|c| {
            let n = c.exec(
                "UPDATE images SET status=$2, staged=0, staged_on=$3, updated_at=$4
                 WHERE id=$1 AND status='queued'",
                &vals![id, status, host, now()],
            )?;
            Ok(n == 1)
        })
    }

    /// The host whose workspace holds image `id`'s staged data, if any.
    pub fn staged_on(&self, id: &str) -> DbResult<Option<String>> {
        self.tx(|c| {
            Ok(
                c.row("SELECT staged_on FROM images WHERE id=$1", &vals![id])?
                    .and_then(|r| r.opt(0)),
            )
        })
    }

    /// Starts an import: the image turns `importing` with `task` as its import lock,
    /// and the task is recorded, together. The image must be staged (`uploading` and
    /// complete), or `queued` when the service fetches the data itself
    /// (`from_queued`, web-download). A staged import's task is bound to the host that
    /// holds the staged data (whatever `task.host` says); a web-download's task is
    /// unbound. `Ok(false)`: the image is in another state.
    pub fn start_import(&self, task: &Task, from_queued: bool) -> DbResult<bool> {
        self.guarded(|c| {
            let n = c.exec(
                "UPDATE images SET status='importing', task_id=$2, updated_at=$3
                 WHERE id=$1 AND (($4 = 0 AND status='uploading' AND staged=1)
                                  OR ($4 = 1 AND status='queued'))",
                &vals![&task.image_id, &task.id, now(), from_queued],
            )?;
            if n == 0 {
                return Ok(false);
            }
            let mut task = task.clone();
            task.host = if from_queued {
                None
            } else {
                c.row(
                    "SELECT staged_on FROM images WHERE id=$1",
                    &vals![&task.image_id],
                )?
                .and_then(|r| r.opt(0))
            };
            insert_task(c, &task)?;
            Ok(true)
        })
    }

    /// Records a task that does not change its image's status (`PUT /file`).
    pub fn insert_task(&self, task: &Task) -> DbResult<()> {
        self.tx(|c| insert_task(c, task))
    }

    /// Sets a task's status and message (progress).
    pub fn set_task(&self, id: &str, status: &str, message: &str) -> DbResult<()> {
        self.tx(|c| {
            c.exec(
                "UPDATE tasks SET status=$2, message=$3, updated_at=$4 WHERE id=$1",
                &vals![id, status, message, now()],
            )
            .map(|_| ())
        })
    }

    /// Records the progress of a running task (nothing if it no longer runs).
    pub fn progress(&self, id: &str, message: &str) -> DbResult<()> {
        self.tx(|c| {
            c.exec(
                "UPDATE tasks SET message=$2, updated_at=$3 WHERE id=$1 AND status='processing'",
                &vals![id, message, now()],
            )
            .map(|_| ())
        })
    }

    /// Claims for `host` the oldest `pending` task it may run (bound to it, or to no
    /// host): the task turns `processing`, bound to `host`, leased for `lease_secs`
    /// seconds of the database's clock. On PostgreSQL the candidate row is read
    /// `FOR UPDATE SKIP LOCKED`, so hosts claiming together take different tasks and
    /// never wait on each other; the guarded update makes a claim apply once.
    pub fn claim_task(&self, host: &str, lease_secs: u64) -> DbResult<Option<Task>> {
        self.tx(|c| {
            let b = c.backend();
            let sql = format!(
                "SELECT {TASK_COLS} FROM tasks WHERE status='pending'
                 AND (host IS NULL OR host=$1) ORDER BY {} LIMIT 1{}",
                b.task_order(),
                b.skip_locked()
            );
            let Some(row) = c.row(&sql, &vals![host])? else {
                return Ok(None);
            };
            let mut task = task_from(&row);
            let t = now();
            let n = c.exec(
                &format!(
                    "UPDATE tasks SET status='processing', message='starting', host=$2,
                     lease_until={} + $3, updated_at=$4 WHERE id=$1 AND status='pending'",
                    b.now_epoch()
                ),
                &vals![&task.id, host, lease_secs, &t],
            )?;
            if n == 0 {
                return Ok(None);
            }
            task.status = "processing".into();
            task.message = "starting".into();
            task.host = Some(host.to_string());
            task.updated_at = t;
            Ok(Some(task))
        })
    }

    /// Records that `host` is alive now (its heartbeat), and extends by `lease_secs`
    /// the lease of each task of `tasks` it still holds. Returns the tasks of `tasks`
    /// it no longer holds (failed by another host after its lease expired, or gone
    /// with their image): their imports must stop.
    pub fn heartbeat(
        &self,
        host: &str,
        tasks: &[String],
        lease_secs: u64,
    ) -> DbResult<Vec<String>> {
        self.tx(|c| {
            let now_epoch = c.backend().now_epoch();
            c.exec(
                &format!(
                    "INSERT INTO hosts (name, heartbeat_at, started_at) VALUES ($1, {now_epoch}, {now_epoch})
                     ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
                ),
                &vals![host],
            )?;
            let mut lost = Vec::new();
            for id in tasks {
                let n = c.exec(
                    &format!(
                        "UPDATE tasks SET lease_until={now_epoch} + $3
                         WHERE id=$1 AND host=$2 AND status='processing'"
                    ),
                    &vals![id, host, lease_secs],
                )?;
                if n == 0 {
                    lost.push(id.clone());
                }
            }
            Ok(lost)
        })
    }

    /// Records that `host` starts (its first heartbeat since it started).
    pub fn host_started(&self, host: &str) -> DbResult<()> {
        self.tx(|c| {
            let now_epoch = c.backend().now_epoch();
            c.exec(
                &format!(
                    "INSERT INTO hosts (name, heartbeat_at, started_at) VALUES ($1, {now_epoch}, {now_epoch})
                     ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,
                     started_at = excluded.started_at"
                ),
                &vals![host],
            )
            .map(|_| ())
        })
    }

    /// Gives up what hosts other than `me` hold but no longer renew: a `processing`
    /// task whose lease expired, and a `pending` task bound to (or an upload staged
    /// on) a host whose heartbeat is older than `lease_secs`. Each task fails with a
    /// message naming the silent host and its image returns to `queued`; uploads
    /// staged on a silent host return to `queued`. Returns the abandoned tasks.
    pub fn reap(&self, me: &str, lease_secs: u64) -> DbResult<Vec<Abandoned>> {
        let b = self.backend;
        let candidates = self.tx(|c| {
            let now_epoch = b.now_epoch();
            c.rows(
                &format!(
                    "SELECT t.id, t.image_id, t.host, t.status FROM tasks t
                     LEFT JOIN hosts h ON h.name = t.host
                     WHERE t.host IS NOT NULL AND t.host <> $1 AND (
                       (t.status='processing' AND COALESCE(t.lease_until, 0) <= {now_epoch})
                       OR (t.status='pending'
                           AND COALESCE(h.heartbeat_at, 0) <= {now_epoch} - $2))"
                ),
                &vals![me, lease_secs],
            )
        })?;
        let mut abandoned = Vec::new();
        for r in candidates {
            let (task_id, image_id, host, status) = (r.text(0), r.text(1), r.text(2), r.text(3));
            let message = if status == "processing" {
                format!(
                    "host {host} stopped renewing its lease on this import (it died or lost the database); the import was abandoned: stage the image again"
                )
            } else {
                format!(
                    "host {host}, which holds this image's staged data, stopped answering (no heartbeat for over {lease_secs} s); the import was abandoned: stage the image again"
                )
            };
            // Guarded by the task's status and lease: a host that renewed meanwhile
            // keeps its task, and of two hosts reaping together one applies.
            let applied = self.guarded(|c| {
                lock_image(c, &image_id)?;
                let still = c.row(
                    &format!(
                        "SELECT t.id FROM tasks t LEFT JOIN hosts h ON h.name = t.host
                         WHERE t.id=$1 AND t.host=$2 AND (
                           (t.status='processing' AND COALESCE(t.lease_until, 0) <= {now})
                           OR (t.status='pending' AND COALESCE(h.heartbeat_at, 0) <= {now} - $3)){lock}",
                        now = b.now_epoch(),
                        lock = if b == Backend::Postgres { " FOR UPDATE OF t" } else { "" }
                    ),
                    &vals![&task_id, &host, lease_secs],
                )?;
                if still.is_none() {
                    return Ok(false);
                }
                fail_import_in(c, &task_id, &image_id, &message, &expires_in_48h())
            })?;
            if applied {
                abandoned.push(Abandoned {
                    task_id,
                    image_id,
                    host,
                });
            }
        }
        // Uploads staged on (or being received by) a silent host.
        self.tx(|c| {
            c.exec(
                &format!(
                    "UPDATE images SET status='queued', staged=0, staged_on=NULL, updated_at=$3
                     WHERE status IN ('uploading', 'saving') AND staged_on IS NOT NULL
                     AND staged_on <> $1 AND COALESCE((SELECT heartbeat_at FROM hosts
                         WHERE name = images.staged_on), 0) <= {} - $2",
                    b.now_epoch()
                ),
                &vals![me, lease_secs, now()],
            )
            .map(|_| ())
        })?;
        Ok(abandoned)
    }

    /// Completes an import: the task succeeds and the image turns `active` with what was
    /// stored, together. `Ok(false)`, nothing changed: the image is gone or no longer
    /// being imported (deleted meanwhile), or the task is no longer running (another
    /// host gave it up when its lease expired).
    pub fn finish_import(
        &self,
        task_id: &str,
        image_id: &str,
        stored: &Stored,
        message: &str,
        expires_at: &str,
    ) -> DbResult<bool> {
        self.guarded(|c| {
            let t = now();
            let n = c.exec(
                "UPDATE images SET status='active', disk_format=$2, size=$3, virtual_size=$4,
                 checksum=$5, os_hash_algo='sha512', os_hash_value=$6, staged=0,
                 staged_on=NULL, updated_at=$7
                 WHERE id=$1 AND status IN ('importing', 'saving')",
                &vals![
                    image_id,
                    &stored.disk_format,
                    stored.size,
                    stored.virtual_size,
                    &stored.checksum,
                    &stored.sha512,
                    &t
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            c.exec(
                "DELETE FROM image_properties WHERE image_id=$1 AND name=$2",
                &vals![image_id, FAILED_IMPORT],
            )?;
            let result = serde_json::json!({"image_id": image_id}).to_string();
            let n = c.exec(
                "UPDATE tasks SET status='success', message=$2, result=$3, expires_at=$4,
                 updated_at=$5 WHERE id=$1 AND status IN ('pending', 'processing')",
                &vals![task_id, message, result, expires_at, &t],
            )?;
            Ok(n == 1)
        })
    }

    /// Fails an import: the task fails with `message` and the image (if still being
    /// imported or uploaded) returns to `queued` with its staged data forgotten, and
    /// records `os_glance_failed_import`, together. Nothing changes when the task has
    /// already ended (another host gave it up); `Ok(false)` then.
    pub fn fail_import(
        &self,
        task_id: &str,
        image_id: &str,
        message: &str,
        expires_at: &str,
    ) -> DbResult<bool> {
        self.tx(|c| fail_import_in(c, task_id, image_id, message, expires_at))
    }

    /// The image `id`, with tags and properties.
    pub fn image(&self, id: &str) -> DbResult<Option<Image>> {
        self.tx(|c| {
            let row = c.row(
                &format!("SELECT {IMAGE_COLS} FROM images WHERE id=$1"),
                &vals![id],
            )?;
            match row {
                Some(r) => {
                    let mut i = image_from(&r);
                    fill(c, &mut i)?;
                    Ok(Some(i))
                }
                None => Ok(None),
            }
        })
    }

    /// Every image, with tags and properties, oldest first.
    pub fn images(&self) -> DbResult<Vec<Image>> {
        self.tx(|c| {
            let mut v: Vec<Image> = c
                .rows(
                    &format!("SELECT {IMAGE_COLS} FROM images ORDER BY created_at, id"),
                    &[],
                )?
                .iter()
                .map(image_from)
                .collect();
            // Tags and properties of all images in two queries, not two per image.
            let mut tags: std::collections::HashMap<String, Vec<String>> = Default::default();
            for r in c.rows("SELECT image_id, tag FROM image_tags ORDER BY tag", &[])? {
                tags.entry(r.text(0)).or_default().push(r.text(1));
            }
            let mut props: std::collections::HashMap<String, BTreeMap<String, String>> =
                Default::default();
            for r in c.rows("SELECT image_id, name, value FROM image_properties", &[])? {
                props
                    .entry(r.text(0))
                    .or_default()
                    .insert(r.text(1), r.text(2));
            }
            for i in &mut v {
                i.tags = tags.remove(&i.id).unwrap_or_default();
                i.properties = props.remove(&i.id).unwrap_or_default();
            }
            Ok(v)
        })
    }

    /// Deletes the image `id` (its tags, properties and tasks go with it).
    pub fn delete_image(&self, id: &str) -> DbResult<bool> {
        self.tx(|c| Ok(c.exec("DELETE FROM images WHERE id=$1", &vals![id])? == 1))
    }

    /// Adds `m` to its image's members, unless the image is gone, has it already or
    /// has `limit` members.
    pub fn add_member(&self, m: &Member, limit: u64) -> DbResult<MemberAdded> {
        self.run(
            |c| {
                let sql = format!(
                    "SELECT id FROM images WHERE id=$1{}",
                    c.backend().for_update()
                );
                if c.row(&sql, &vals![&m.image_id])?.is_none() {
                    return Ok(MemberAdded::NoImage);
                }
                let n = c
                    .row(
                        "SELECT COUNT(*) FROM image_members WHERE image_id=$1",
                        &vals![&m.image_id],
                    )?
                    .and_then(|r| r.u64(0))
                    .unwrap_or(0);
                if n >= limit {
                    return Ok(MemberAdded::Limit);
                }
                let added = c.exec(
                    &format!("INSERT INTO image_members ({MEMBER_COLS}) VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING"),
                    &vals![&m.image_id, &m.member, &m.status, &m.created_at, &m.updated_at],
                )? == 1;
                Ok(if added {
                    MemberAdded::Added
                } else {
                    MemberAdded::Duplicate
                })
            },
            |r| *r == MemberAdded::Added,
        )
    }

    /// The members of image `image_id`, oldest first.
    pub fn members(&self, image_id: &str) -> DbResult<Vec<Member>> {
        self.tx(|c| {
            Ok(c.rows(
                &format!("SELECT {MEMBER_COLS} FROM image_members WHERE image_id=$1 ORDER BY created_at, member"),
                &vals![image_id],
            )?
            .iter()
            .map(member_from)
            .collect())
        })
    }

    /// The membership of `member` in image `image_id`.
    pub fn member(&self, image_id: &str, member: &str) -> DbResult<Option<Member>> {
        self.tx(|c| {
            Ok(c.row(
                &format!("SELECT {MEMBER_COLS} FROM image_members WHERE image_id=$1 AND member=$2"),
                &vals![image_id, member],
            )?
            .map(|r| member_from(&r)))
        })
    }

    /// The images `member` is a member of, with its answer for each.
    pub fn memberships(&self, member: &str) -> DbResult<BTreeMap<String, String>> {
        self.tx(|c| {
            Ok(c.rows(
                "SELECT image_id, status FROM image_members WHERE member=$1",
                &vals![member],
            )?
            .iter()
            .map(|r| (r.text(0), r.text(1)))
            .collect())
        })
    }

    /// Sets the answer of `member` for image `image_id`; `Ok(false)`: no such member.
    pub fn set_member_status(&self, image_id: &str, member: &str, status: &str) -> DbResult<bool> {
        self.guarded(|c| {
            Ok(c.exec(
                "UPDATE image_members SET status=$3, updated_at=$4 WHERE image_id=$1 AND member=$2",
                &vals![image_id, member, status, now()],
            )? == 1)
        })
    }

    /// Removes `member` from image `image_id`; `Ok(false)`: no such member.
    pub fn remove_member(&self, image_id: &str, member: &str) -> DbResult<bool> {
        self.guarded(|c| {
            Ok(c.exec(
                "DELETE FROM image_members WHERE image_id=$1 AND member=$2",
                &vals![image_id, member],
            )? == 1)
        })
    }

    /// The task `id`.
    pub fn task(&self, id: &str) -> DbResult<Option<Task>> {
        self.tx(|c| {
            Ok(c.row(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE id=$1"),
                &vals![id],
            )?
            .map(|r| task_from(&r)))
        })
    }

    /// Every task, oldest first.
    pub fn tasks(&self) -> DbResult<Vec<Task>> {
        self.tx(|c| {
            let sql = format!(
                "SELECT {TASK_COLS} FROM tasks ORDER BY {}",
                c.backend().task_order()
            );
            Ok(c.rows(&sql, &[])?.iter().map(task_from).collect())
        })
    }

    /// Tasks of image `id`, oldest first.
    pub fn tasks_of(&self, image_id: &str) -> DbResult<Vec<Task>> {
        self.tx(|c| {
            let sql = format!(
                "SELECT {TASK_COLS} FROM tasks WHERE image_id=$1 ORDER BY {}",
                c.backend().task_order()
            );
            Ok(c.rows(&sql, &vals![image_id])?
                .iter()
                .map(task_from)
                .collect())
        })
    }

    /// Tasks in `status`.
    pub fn tasks_in(&self, status: &str) -> DbResult<Vec<Task>> {
        self.tx(|c| {
            Ok(c.rows(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE status=$1"),
                &vals![status],
            )?
            .iter()
            .map(task_from)
            .collect())
        })
    }

    /// Records in task `id` what its import is about to put in the store, before it
    /// does (the startup recovery records a stored object only if its task says what
    /// it is). Refused when the task no longer runs, so its import stops short of the
    /// store.
    pub fn record_intent(&self, id: &str, stored: &Stored) -> DbResult<()> {
        let json = serde_json::json!({
            "disk_format": stored.disk_format,
            "size": stored.size,
            "virtual_size": stored.virtual_size,
            "checksum": stored.checksum,
            "sha512": stored.sha512,
        })
        .to_string();
        let n = self.tx(|c| {
            c.exec(
                "UPDATE tasks SET stored=$2, message=$3, updated_at=$4
                 WHERE id=$1 AND status IN ('pending', 'processing')",
                &vals![id, json, "storing the image", now()],
            )
        })?;
        if n == 0 {
            return Err(format!(
                "task {id} is no longer running (its image was deleted, or another host gave it up): not storing"
            ));
        }
        Ok(())
    }

    /// What task `id` recorded it was about to store, if anything.
    pub fn intent(&self, id: &str) -> DbResult<Option<Stored>> {
        let text: Option<String> = self.tx(|c| {
            Ok(c.row("SELECT stored FROM tasks WHERE id=$1", &vals![id])?
                .and_then(|r| r.opt(0)))
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

/// Task expiry for tasks failed by [`Db::reap`] (Glance's 48-hour
/// `task_time_to_live`).
fn expires_in_48h() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs + 48 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh catalogue of one backend, opened again on demand.
    enum Fixture {
        Sqlite(tempfile::TempDir),
        Postgres(String),
    }

    impl Fixture {
        fn sqlite() -> Fixture {
            Fixture::Sqlite(tempfile::tempdir().unwrap())
        }

        /// A new database on the test server (`VIMPORT_TEST_POSTGRES_URL`, set by
        /// `cargo xtask test`); `None` (skipped, said on stderr) without one, unless
        /// PostgreSQL is required (`VIMPORT_REQUIRE_POSTGRES=1`, or `CI`).
        fn postgres() -> Option<Fixture> {
            let Ok(url) = std::env::var("VIMPORT_TEST_POSTGRES_URL") else {
                let required = std::env::var("VIMPORT_REQUIRE_POSTGRES").as_deref() == Ok("1")
                    || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
                assert!(
                    !required,
                    "PostgreSQL is required (VIMPORT_REQUIRE_POSTGRES=1 or CI) but VIMPORT_TEST_POSTGRES_URL is not set: run `cargo xtask test`, which starts one"
                );
                eprintln!(
                    "SKIPPED: no VIMPORT_TEST_POSTGRES_URL (`cargo xtask test` starts PostgreSQL)"
                );
                return None;
            };
            let name = format!("vimport_unit_{}", uuid::Uuid::new_v4().simple());
            let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap();
            let mut u = url::Url::parse(&url).unwrap();
            u.set_path(&name);
            Some(Fixture::Postgres(u.to_string()))
        }

        fn open(&self) -> Db {
            match self {
                Fixture::Sqlite(d) => Db::open(&d.path().join("x.db")).unwrap(),
                Fixture::Postgres(url) => Db::open_postgres(url).unwrap(),
            }
        }
    }

    /// Runs `f` on SQLite, then on PostgreSQL when there is a test server.
    fn on_both(f: impl Fn(&Fixture)) {
        f(&Fixture::sqlite());
        if let Some(pg) = Fixture::postgres() {
            f(&pg);
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T");
    }

    #[test]
    fn locations_and_redaction() {
        assert_eq!(
            Location::parse("/x/vimport.db"),
            Location::Sqlite("/x/vimport.db".into())
        );
        let pg = Location::parse("postgres://u:secret@db:5432/vimport");
        assert!(matches!(pg, Location::Postgres(_)));
        assert_eq!(pg.to_string(), "postgres://u:***@db:5432/vimport");
        assert_eq!(
            lite_sql("a=$1 AND b=$12 AND c='$'"),
            "a=?1 AND b=?12 AND c='$'"
        );
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

    fn task(id: &str, image: &str) -> Task {
        Task {
            id: id.into(),
            kind: "api_image_import".into(),
            image_id: image.into(),
            status: "pending".into(),
            input: "{}".into(),
            created_at: now(),
            updated_at: now(),
            ..Task::default()
        }
    }

    #[test]
    fn images_and_tasks_round_trip() {
        on_both(|fx| {
            let db = fx.open();
            let img = image("i1");
            assert!(db.insert_image(&img).unwrap());
            assert!(!db.insert_image(&img).unwrap(), "the id is taken");
            assert_eq!(db.image("i1").unwrap().unwrap(), img);
            assert!(!db.transition("i1", &["active"], "uploading", true).unwrap());
            assert!(db.start_receiving("i1", "uploading", "host-a").unwrap());
            assert!(!db.start_receiving("i1", "uploading", "host-a").unwrap());
            assert!(db
                .transition("i1", &["uploading"], "uploading", true)
                .unwrap());
            assert_eq!(db.staged_on("i1").unwrap().as_deref(), Some("host-a"));
            let t = task("t1", "i1");
            assert!(db.start_import(&t, false).unwrap());
            assert!(!db.start_import(&t, false).unwrap(), "already importing");
            assert!(!db.start_import(&t, true).unwrap(), "not queued");
            assert_eq!(
                db.task("t1").unwrap().unwrap().host.as_deref(),
                Some("host-a"),
                "a staged import is bound to the host holding the data"
            );
            assert_eq!(db.claim_task("host-b", 30).unwrap(), None, "not B's task");
            let claimed = db.claim_task("host-a", 30).unwrap().unwrap();
            assert_eq!(
                (claimed.id.as_str(), claimed.status.as_str()),
                ("t1", "processing")
            );
            assert_eq!(db.claim_task("host-a", 30).unwrap(), None, "claimed once");
            db.set_task("t1", "processing", "50%").unwrap();
            assert_eq!(db.tasks_in("processing").unwrap().len(), 1);
            assert!(db.fail_import("t1", "i1", "broken", &now()).unwrap());
            assert!(
                !db.fail_import("t1", "i1", "again", &now()).unwrap(),
                "an ended task stays as it ended"
            );
            let back = db.image("i1").unwrap().unwrap();
            assert_eq!((back.status.as_str(), back.staged), ("queued", false));
            assert_eq!(back.properties[FAILED_IMPORT], "file");
            assert_eq!(db.staged_on("i1").unwrap(), None);
            assert_eq!(db.task("t1").unwrap().unwrap().status, "failure");
            // Survives reopening.
            drop(db);
            let db = fx.open();
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
        });
    }

    #[test]
    fn finish_import_is_one_guarded_transaction() {
        on_both(|fx| {
            let db = fx.open();
            assert!(db.insert_image(&image("i1")).unwrap());
            assert!(db.start_import(&task("t1", "i1"), true).unwrap());
            assert_eq!(
                db.task("t1").unwrap().unwrap().host,
                None,
                "web-download: any host"
            );
            let stored = Stored {
                disk_format: "raw".into(),
                size: 5,
                virtual_size: 5,
                checksum: "m".into(),
                sha512: "s".into(),
            };
            // Another host gave the task up: the image must not turn active.
            db.set_task("t1", "failure", "abandoned").unwrap();
            assert!(!db.finish_import("t1", "i1", &stored, "ok", &now()).unwrap());
            assert_eq!(
                db.image("i1").unwrap().unwrap().status,
                "importing",
                "rolled back"
            );
            db.set_task("t1", "processing", "x").unwrap();
            assert!(db.finish_import("t1", "i1", &stored, "ok", &now()).unwrap());
            let i = db.image("i1").unwrap().unwrap();
            assert_eq!((i.status.as_str(), i.size), ("active", Some(5)));
            assert_eq!(db.task("t1").unwrap().unwrap().status, "success");
        });
    }

    #[test]
    fn a_silent_hosts_tasks_are_failed_by_another_naming_it() {
        on_both(|fx| {
            let db = fx.open();
            db.host_started("a").unwrap();
            db.host_started("b").unwrap();
            for i in ["i1", "i2", "i3"] {
                assert!(db.insert_image(&image(i)).unwrap());
            }
            // i1: claimed by A (processing); i2: staged on A, bound to A (pending);
            // i3: staged on A, not imported yet.
            assert!(db.start_import(&task("t1", "i1"), true).unwrap());
            assert_eq!(db.claim_task("a", 0).unwrap().unwrap().id, "t1");
            for i in ["i2", "i3"] {
                assert!(db.start_receiving(i, "uploading", "a").unwrap());
                assert!(db.transition(i, &["uploading"], "uploading", true).unwrap());
            }
            assert!(db.start_import(&task("t2", "i2"), false).unwrap());
            // A's lease (0 s) is over, but its heartbeat is recent: only t1 goes.
            let gone = db.reap("b", 3600).unwrap();
            assert_eq!(
                gone,
                vec![Abandoned {
                    task_id: "t1".into(),
                    image_id: "i1".into(),
                    host: "a".into()
                }]
            );
            let t1 = db.task("t1").unwrap().unwrap();
            assert_eq!(t1.status, "failure");
            assert!(t1.message.contains("host a "), "{}", t1.message);
            assert_eq!(db.image("i1").unwrap().unwrap().status, "queued");
            // A, still running, learns it lost t1 at its next heartbeat.
            assert_eq!(
                db.heartbeat("a", &["t1".to_string()], 30).unwrap(),
                vec!["t1".to_string()]
            );
            // A host never reaps itself; with a lease of 0 s every other host is silent.
            assert!(db.reap("a", 0).unwrap().is_empty());
            let gone = db.reap("b", 0).unwrap();
            assert_eq!(gone.len(), 1, "{gone:?}");
            assert_eq!(gone[0].task_id, "t2");
            assert!(db.task("t2").unwrap().unwrap().message.contains("host a,"));
            for i in ["i2", "i3"] {
                let img = db.image(i).unwrap().unwrap();
                assert_eq!((img.status.as_str(), img.staged), ("queued", false), "{i}");
            }
            assert!(db.reap("b", 0).unwrap().is_empty(), "reaped once");
        });
    }

    #[test]
    fn the_schema_holds_the_constraints_and_the_intent() {
        on_both(|fx| {
            let db = fx.open();
            assert!(db.insert_image(&image("i1")).unwrap());
            // A task of no image, and statuses outside the lists, are refused.
            let e = db.insert_task(&task("t0", "nope")).unwrap_err();
            assert!(e.to_lowercase().contains("foreign key"), "{e}");
            let e = db.set_task("t0", "done", "").map(|_| ());
            assert!(e.is_ok(), "no such task: nothing to update");
            db.insert_task(&task("t1", "i1")).unwrap();
            let e = db.set_task("t1", "done", "").unwrap_err();
            assert!(e.to_lowercase().contains("check"), "{e}");
            let e = db
                .transition("i1", &["queued"], "imported", false)
                .unwrap_err();
            assert!(e.to_lowercase().contains("check"), "{e}");
            // The intent round-trips, 64-bit sizes included.
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
            // Opening again applies nothing more.
            drop(db);
            assert_eq!(fx.open().images().unwrap().len(), 1);
        });
    }

    #[test]
    fn a_database_of_the_first_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(MIGRATIONS[0].sqlite).unwrap();
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

    #[test]
    fn hosts_migrating_together_migrate_once() {
        let Some(Fixture::Postgres(url)) = Fixture::postgres() else {
            return;
        };
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || Db::open_postgres(&url).map(|_| ()))
            })
            .collect();
        for h in opened {
            h.join().unwrap().unwrap();
        }
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let v: i32 = c
            .query_one("SELECT version FROM vimport_schema", &[])
            .unwrap()
            .get(0);
        assert_eq!(v as usize, MIGRATIONS.len());
    }
}
