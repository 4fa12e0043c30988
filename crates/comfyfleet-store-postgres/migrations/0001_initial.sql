-- comfyfleet PostgreSQL store, schema version 1: jobs, attempts, events, leadership, fleet
-- state (backend slots, shared restrictions) and custom-node installs.
--
-- Applied by sqlx's migrator inside one transaction, in the schema named by `search_path`
-- (the store's schema). Times are milliseconds since the Unix epoch (BIGINT); TEXT columns
-- marked JSON hold serde_json text of the comfyfleet-core types named in the comments (text,
-- not jsonb: stored byte for byte as written, nothing queries inside them).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES
    ('application', 'comfyfleet-store-postgres'),
    ('created_schema_version', '1');

CREATE TABLE jobs (
    -- Submission order (claim tie-break).
    ord                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  UUID NOT NULL UNIQUE,            -- UUID v7: sorts by creation
    state               TEXT NOT NULL CHECK (state IN
                            ('pending', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    priority            INTEGER NOT NULL,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    run_at              BIGINT NOT NULL,
    deadline            BIGINT,
    claims              BIGINT NOT NULL DEFAULT 0,       -- the fencing token
    crash_requeues      BIGINT NOT NULL DEFAULT 0,
    lease_owner         TEXT,
    lease_expires_at    BIGINT,
    cancel_requested_at BIGINT,
    progress_at         BIGINT,
    phase_deadline      BIGINT,                          -- copy of phase.deadline, for the reaper
    wait_reason         TEXT,
    error_text          TEXT,                            -- lower-cased error.message
    finished_at         BIGINT,
    last_seq            BIGINT NOT NULL DEFAULT 0,
    idempotency_key     TEXT,
    last_backend        TEXT,                            -- backend of the latest attempt
    attempt_count       BIGINT NOT NULL DEFAULT 0,
    spec                TEXT NOT NULL,                   -- JSON JobSpec
    labels              TEXT NOT NULL DEFAULT '{}',      -- JSON spec.labels
    progress            TEXT,                            -- JSON Progress
    phase               TEXT,                            -- JSON PhaseDeadline
    error               TEXT,                            -- JSON ExecutionError
    artifacts           TEXT NOT NULL DEFAULT '[]'       -- JSON [Artifact]
);

-- Claim: the due job with the highest priority, then the oldest; only claimable rows.
CREATE INDEX jobs_ready ON jobs (priority DESC, ord, run_at)
    WHERE state IN ('pending', 'retry_wait');
-- Idempotency: a key matches any stored job until it is pruned.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_backend ON jobs (last_backend, id) WHERE last_backend IS NOT NULL;
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_errors ON jobs (id) WHERE error_text IS NOT NULL;
CREATE INDEX jobs_waiting_deadline ON jobs (deadline)
    WHERE state IN ('pending', 'retry_wait') AND deadline IS NOT NULL;
CREATE INDEX jobs_running ON jobs (id) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE job_labels (
    job_id UUID NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX job_labels_kv ON job_labels (key, value, job_id);

-- One row per attempt (execution); `number` is the claim that made it.
CREATE TABLE attempts (
    job_id        UUID NOT NULL,
    number        BIGINT NOT NULL,
    backend       TEXT NOT NULL,
    remote        TEXT,
    dispatched_at BIGINT NOT NULL,
    started_at    BIGINT,
    ended_at      BIGINT,
    outcome       TEXT CHECK (outcome IN
                      ('succeeded', 'failed', 'timed_out', 'cancelled', 'lease_expired', 'detached')),
    error         TEXT,                          -- JSON ExecutionError
    nodes         TEXT NOT NULL DEFAULT '[]',    -- JSON [NodeTiming]
    reattached    BOOLEAN NOT NULL DEFAULT FALSE,
    cancel_steps  TEXT NOT NULL DEFAULT '[]',    -- JSON [CancelStep]
    PRIMARY KEY (job_id, number)
);
-- Fleet capacity and `backend_load`: open attempts per backend.
CREATE INDEX attempts_open ON attempts (backend) WHERE ended_at IS NULL;

-- Append-only job events. `id` is the global event id, allocated from `event_counter` as the
-- last statement before commit, so ids become visible in id order; `seq` is per job.
CREATE TABLE events (
    id     BIGINT PRIMARY KEY,
    job_id UUID NOT NULL,
    seq    BIGINT NOT NULL,
    at     BIGINT NOT NULL,
    kind   TEXT NOT NULL                         -- JSON EventKind
);
CREATE UNIQUE INDEX events_job_seq ON events (job_id, seq);

-- The last event id handed out (one row; its row lock serialises event-writing commits).
CREATE TABLE event_counter (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    last BIGINT NOT NULL
);
INSERT INTO event_counter (one, last) VALUES (TRUE, 0);

-- Maintenance leadership: one lease row.
CREATE TABLE leader (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- One row per backend that ever had a capacity-checked attempt: `start_attempt` locks it
-- (`FOR UPDATE`) before counting open attempts, so concurrent starts on one backend queue up.
CREATE TABLE backend_slots (
    backend TEXT COLLATE "C" PRIMARY KEY
);

-- Restrictions shared between orchestrators (workflow blocks, open circuits).
-- Text compared byte-wise (COLLATE "C"), as Rust orders strings.
CREATE TABLE restrictions (
    backend   TEXT COLLATE "C" NOT NULL,
    kind      TEXT COLLATE "C" NOT NULL CHECK (kind IN ('blocked', 'circuit_open')),
    structure TEXT COLLATE "C" NOT NULL DEFAULT '',   -- workflow hash, '' for none
    until     BIGINT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (backend, kind, structure)
);

-- Custom-node installs (comfyfleet_core::install).
CREATE TABLE installs (
    id          UUID PRIMARY KEY,
    instance    TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN
                    ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    version     BIGINT NOT NULL,                 -- optimistic-concurrency version
    last_seq    BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT,
    record      TEXT NOT NULL                    -- JSON InstallRecord
);
-- At most one queued or running install per instance, under any race.
CREATE UNIQUE INDEX installs_one_active ON installs (instance)
    WHERE state IN ('queued', 'running');
CREATE INDEX installs_instance ON installs (instance, id);
CREATE INDEX installs_state ON installs (state, id);
CREATE INDEX installs_finished ON installs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE install_events (
    install_id UUID NOT NULL,
    seq        BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    kind       TEXT NOT NULL,                    -- JSON InstallEventKind
    PRIMARY KEY (install_id, seq)
);

-- Verified packs per instance; not pruned. Names sort byte-wise, as Rust orders strings.
CREATE TABLE instance_packs (
    instance     TEXT NOT NULL,
    name         TEXT COLLATE "C" NOT NULL,
    git          TEXT NOT NULL,
    commit_id    TEXT NOT NULL,
    classes      TEXT NOT NULL DEFAULT '[]',     -- JSON [String]
    install_id   UUID NOT NULL,
    installed_at BIGINT NOT NULL,
    PRIMARY KEY (instance, name)
);

-- Input files of jobs (LoadImage and friends), content-addressed: every process of the fleet
-- reads what any of them accepted. Deleted by nobody: a job may be retried much later.
CREATE TABLE inputs (
    sha256     TEXT PRIMARY KEY,                -- hex SHA-256 of `bytes`
    size       BIGINT NOT NULL,
    bytes      BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
