-- comfyfleet SQLite store, schema version 1.
--
-- Applied by rusqlite_migration inside one transaction; `user_version` becomes 1 when it commits.
-- Times are milliseconds since the Unix epoch (INTEGER); JSON columns hold serde_json text of
-- the comfyfleet-core types named in the comments.

-- Marks the file as ours: `PRAGMA application_id` (0x43464C54, "CFLT") in the header, and the
-- `meta` rows below.
PRAGMA application_id = 1128680532;

CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;

INSERT INTO meta (key, value) VALUES
    ('application', 'comfyfleet-store-sqlite'),
    ('created_schema_version', '1');

CREATE TABLE jobs (
    -- Submission order (claim tie-break). The rowid: a later job always gets a larger one.
    ord                 INTEGER PRIMARY KEY,
    id                  BLOB NOT NULL UNIQUE CHECK (length(id) = 16),   -- UUID (v7), big-endian
    state               TEXT NOT NULL CHECK (state IN
                            ('pending', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    priority            INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    run_at              INTEGER NOT NULL,
    deadline            INTEGER,
    claims              INTEGER NOT NULL DEFAULT 0,   -- the fencing token
    crash_requeues      INTEGER NOT NULL DEFAULT 0,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    cancel_requested_at INTEGER,
    progress_at         INTEGER,
    phase_deadline      INTEGER,          -- copy of phase.deadline, for the reaper
    wait_reason         TEXT,
    error_text          TEXT,             -- lower-cased error.message, for `error_contains`
    finished_at         INTEGER,
    last_seq            INTEGER NOT NULL DEFAULT 0,
    idempotency_key     TEXT,
    last_backend        TEXT,             -- backend of the latest attempt, for the `backend` filter
    attempt_count       INTEGER NOT NULL DEFAULT 0,
    spec                TEXT NOT NULL,    -- JobSpec
    labels              TEXT NOT NULL DEFAULT '{}',  -- spec.labels (for list summaries)
    progress            TEXT,             -- Progress
    phase               TEXT,             -- PhaseDeadline
    error               TEXT,             -- ExecutionError
    artifacts           TEXT NOT NULL DEFAULT '[]'   -- [Artifact]
);

-- Claim: the due job with the highest priority, then the oldest. Covers the whole claim
-- sub-select, and only holds jobs that can be claimed.
CREATE INDEX jobs_ready ON jobs (priority DESC, ord, run_at)
    WHERE state IN ('pending', 'retry_wait');

-- Idempotency: a key matches any stored job until it is pruned.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- `list` (newest first = id descending) by state; counts; the reaper's running jobs.
CREATE INDEX jobs_state ON jobs (state, id);
-- `list` by backend of the latest attempt.
CREATE INDEX jobs_backend ON jobs (last_backend, id) WHERE last_backend IS NOT NULL;
-- `list` by submission time.
CREATE INDEX jobs_created ON jobs (created_at);
-- `list` by error text: only failed and cancelled jobs have one.
CREATE INDEX jobs_errors ON jobs (id) WHERE error_text IS NOT NULL;
-- The reaper: waiting jobs past their deadline.
CREATE INDEX jobs_waiting_deadline ON jobs (deadline)
    WHERE state IN ('pending', 'retry_wait') AND deadline IS NOT NULL;
-- `prune`: finished jobs by age.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Labels, one row per (job, key), for the `label` filter.
CREATE TABLE job_labels (
    job_id BLOB NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
) WITHOUT ROWID;
CREATE INDEX job_labels_kv ON job_labels (key, value, job_id);

-- One row per attempt (execution); `number` is the claim that made it.
CREATE TABLE attempts (
    job_id        BLOB NOT NULL,
    number        INTEGER NOT NULL,
    backend       TEXT NOT NULL,
    remote        TEXT,
    dispatched_at INTEGER NOT NULL,
    started_at    INTEGER,
    ended_at      INTEGER,
    outcome       TEXT CHECK (outcome IN
                      ('succeeded', 'failed', 'timed_out', 'cancelled', 'lease_expired', 'detached')),
    error         TEXT,                    -- ExecutionError
    nodes         TEXT NOT NULL DEFAULT '[]',  -- [NodeTiming]
    reattached    INTEGER NOT NULL DEFAULT 0,
    cancel_steps  TEXT NOT NULL DEFAULT '[]',  -- [CancelStep]
    PRIMARY KEY (job_id, number)
) WITHOUT ROWID;

-- Append-only job events. `id` is the global event id (AUTOINCREMENT: never reused, even
-- after pruning); `seq` the per-job sequence number.
CREATE TABLE events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id BLOB NOT NULL,
    seq    INTEGER NOT NULL,
    at     INTEGER NOT NULL,
    kind   TEXT NOT NULL                   -- EventKind
);
CREATE UNIQUE INDEX events_job_seq ON events (job_id, seq);

-- Maintenance leadership: one lease row.
CREATE TABLE leader (
    name       TEXT PRIMARY KEY NOT NULL,
    owner      TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
