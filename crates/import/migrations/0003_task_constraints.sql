-- Tasks belong to images: a task's image_id references images(id) ON DELETE CASCADE
-- (foreign keys are on at every open), so deleting an image deletes its tasks in the
-- same statement. Tasks of images already deleted are dropped.
-- `stored` (JSON: disk_format, size, virtual_size, checksum, sha512) is what an import
-- recorded it was about to put in the store, written before the move: the startup
-- recovery records a stored object whose import completed but was not yet recorded.
CREATE TABLE tasks_new (
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
    updated_at TEXT NOT NULL);
INSERT INTO tasks_new (id, type, image_id, status, message, input, result, owner, user_id,
        request_id, expires_at, created_at, updated_at)
    SELECT id, type, image_id, status, message, input, result, owner, user_id,
        request_id, expires_at, created_at, updated_at
    FROM tasks WHERE image_id IN (SELECT id FROM images);
DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;
CREATE INDEX tasks_image ON tasks (image_id);
CREATE INDEX tasks_status ON tasks (status);
