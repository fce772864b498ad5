-- Several vimport hosts over one catalogue (PostgreSQL); the same file runs on both
-- backends. A task is claimed by a host (`host`) and held while that host renews
-- `lease_until` (seconds since the epoch, the database's clock); a glance-direct task
-- is created already bound to the host holding the staged data, a web-download task
-- unbound (any host may claim it). `staged_on` names the host whose workspace holds an
-- image's staged upload. `hosts` holds each host's heartbeat: when it stops, another
-- host fails what the silent host held and returns its images to `queued`.
ALTER TABLE images ADD COLUMN staged_on TEXT;
ALTER TABLE tasks ADD COLUMN host TEXT;
ALTER TABLE tasks ADD COLUMN lease_until BIGINT;
CREATE TABLE hosts (
    name TEXT PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL,
    started_at BIGINT NOT NULL);
CREATE INDEX tasks_host ON tasks (host);
