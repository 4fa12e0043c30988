-- comfyfleet SQLite store, schema version 2: custom-node installs (comfyfleet_core::install).
--
-- Times are milliseconds since the Unix epoch; JSON columns hold serde_json text of the
-- comfyfleet-core types named in the comments.

-- One row per install. The scalar columns copy what is queried (and what the constraints
-- need) out of `record`, which holds the whole InstallRecord.
CREATE TABLE installs (
    id          BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),   -- UUID (v7), big-endian
    instance    TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN
                    ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    version     INTEGER NOT NULL,           -- optimistic-concurrency version
    last_seq    INTEGER NOT NULL,           -- seq of the install's newest event
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    finished_at INTEGER,                    -- set once terminal (record.finished_at, else updated_at)
    record      TEXT NOT NULL               -- InstallRecord
) WITHOUT ROWID;

-- At most one queued or running install per instance. The store checks first to name the
-- active install; this index makes the refusal hold under any race.
CREATE UNIQUE INDEX installs_one_active ON installs (instance)
    WHERE state IN ('queued', 'running');
-- `list_installs` (newest first = id descending) by instance and by state.
CREATE INDEX installs_instance ON installs (instance, id);
CREATE INDEX installs_state ON installs (state, id);
-- `prune`: finished installs by age.
CREATE INDEX installs_finished ON installs (finished_at) WHERE finished_at IS NOT NULL;

-- Append-only install events; `seq` counts from 1 within one install.
CREATE TABLE install_events (
    install_id BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    kind       TEXT NOT NULL,               -- InstallEventKind
    PRIMARY KEY (install_id, seq)
) WITHOUT ROWID;

-- What each instance has: verified packs, one row per (instance, pack folder). Not pruned.
CREATE TABLE instance_packs (
    instance     TEXT NOT NULL,
    name         TEXT NOT NULL,
    git          TEXT NOT NULL,
    commit_id    TEXT NOT NULL,
    classes      TEXT NOT NULL DEFAULT '[]',  -- [String]
    install_id   BLOB NOT NULL,
    installed_at INTEGER NOT NULL,
    PRIMARY KEY (instance, name)
) WITHOUT ROWID;
