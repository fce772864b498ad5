-- PostgreSQL: the schema SQLite reaches after 0001_initial, 0002_glance_model and
-- 0003_task_constraints, created at once (a PostgreSQL catalogue never had the older
-- shapes, so 0002 and 0003 have nothing to do there). Booleans stay INTEGER 0/1 and
-- times RFC 3339 text, so every statement in src/db.rs is the same on both backends.
-- `seq` orders tasks created in the same second (SQLite orders by its rowid).
CREATE TABLE images (
    id TEXT PRIMARY KEY,
    name TEXT,
    status TEXT NOT NULL CHECK (status IN ('queued', 'saving', 'uploading', 'importing',
        'active', 'killed', 'deleted', 'pending_delete', 'deactivated')),
    visibility TEXT NOT NULL DEFAULT 'private'
        CHECK (visibility IN ('private', 'public', 'shared', 'community')),
    protected INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1)),
    os_hidden INTEGER NOT NULL DEFAULT 0 CHECK (os_hidden IN (0, 1)),
    owner TEXT,
    min_disk BIGINT NOT NULL DEFAULT 0 CHECK (min_disk >= 0),
    min_ram BIGINT NOT NULL DEFAULT 0 CHECK (min_ram >= 0),
    disk_format TEXT,
    container_format TEXT,
    size BIGINT CHECK (size IS NULL OR size >= 0),
    virtual_size BIGINT CHECK (virtual_size IS NULL OR virtual_size >= 0),
    checksum TEXT,
    os_hash_algo TEXT,
    os_hash_value TEXT,
    task_id TEXT,
    staged INTEGER NOT NULL DEFAULT 0 CHECK (staged IN (0, 1)),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL);
CREATE INDEX images_owner ON images (owner);

CREATE TABLE image_tags (
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (image_id, tag));

CREATE TABLE image_properties (
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (image_id, name));

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL DEFAULT 'api_image_import',
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    status TEXT NOT NULL CHECK (status IN ('pending', 'processing', 'success', 'failure')),
    message TEXT NOT NULL,
    input TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    owner TEXT,
    user_id TEXT,
    request_id TEXT,
    expires_at TEXT,
    stored TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    seq BIGSERIAL NOT NULL);
CREATE INDEX tasks_image ON tasks (image_id);
CREATE INDEX tasks_status ON tasks (status);
