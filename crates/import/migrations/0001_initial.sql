-- The schema vimport had before migrations were tracked (PRAGMA user_version 0).
-- IF NOT EXISTS: a database made by that version already has these tables.
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL,
    disk_format TEXT NOT NULL, container_format TEXT NOT NULL,
    size INTEGER, virtual_size INTEGER, checksum TEXT, os_hash_value TEXT,
    task_id TEXT, staged INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, image_id TEXT NOT NULL, status TEXT NOT NULL,
    message TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
