-- Glance's image model: owner, visibility, protected, os_hidden, min_disk, min_ram,
-- os_hash_algo, nullable name/disk_format/container_format, tags and extra
-- properties; tasks gain Glance's task fields. Tables are rebuilt to add CHECKs.
CREATE TABLE images_new (
    id TEXT PRIMARY KEY,
    name TEXT,
    status TEXT NOT NULL CHECK (status IN ('queued', 'saving', 'uploading', 'importing',
        'active', 'killed', 'deleted', 'pending_delete', 'deactivated')),
    visibility TEXT NOT NULL DEFAULT 'private'
        CHECK (visibility IN ('private', 'public', 'shared', 'community')),
    protected INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1)),
    os_hidden INTEGER NOT NULL DEFAULT 0 CHECK (os_hidden IN (0, 1)),
    owner TEXT,
    min_disk INTEGER NOT NULL DEFAULT 0 CHECK (min_disk >= 0),
    min_ram INTEGER NOT NULL DEFAULT 0 CHECK (min_ram >= 0),
    disk_format TEXT,
    container_format TEXT,
    size INTEGER CHECK (size IS NULL OR size >= 0),
    virtual_size INTEGER CHECK (virtual_size IS NULL OR virtual_size >= 0),
    checksum TEXT,
    os_hash_algo TEXT,
    os_hash_value TEXT,
    task_id TEXT,
    staged INTEGER NOT NULL DEFAULT 0 CHECK (staged IN (0, 1)),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL);
INSERT INTO images_new (id, name, status, owner, disk_format, container_format, size,
        virtual_size, checksum, os_hash_algo, os_hash_value, task_id, staged, created_at,
        updated_at)
    SELECT id, NULLIF(name, ''), status, 'admin', disk_format, container_format, size,
        virtual_size, checksum, CASE WHEN os_hash_value IS NULL THEN NULL ELSE 'sha512' END,
        os_hash_value, task_id, staged, created_at, updated_at
    FROM images;
DROP TABLE images;
ALTER TABLE images_new RENAME TO images;
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

CREATE TABLE tasks_new (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL DEFAULT 'api_image_import',
    image_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'processing', 'success', 'failure')),
    message TEXT NOT NULL,
    input TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    owner TEXT,
    user_id TEXT,
    request_id TEXT,
    expires_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL);
INSERT INTO tasks_new (id, image_id, status, message, input, owner, created_at, updated_at)
    SELECT id, image_id, status, message, json_object('image_id', image_id), 'admin',
        created_at, updated_at
    FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;
CREATE INDEX tasks_image ON tasks (image_id);
CREATE INDEX tasks_status ON tasks (status);
