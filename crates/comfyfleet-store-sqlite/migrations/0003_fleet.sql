-- comfyfleet SQLite store, schema version 3: state shared by orchestrators on one store.

-- Fleet capacity: open attempts (not yet ended) per backend, counted by `start_attempt` with a
-- capacity and by `backend_load`.
CREATE INDEX attempts_open ON attempts (backend) WHERE ended_at IS NULL;

-- Restrictions shared between orchestrators (TaskStore::share_restrictions): one row per
-- backend, kind and workflow structure ('' for a circuit), until it lifts.
CREATE TABLE restrictions (
    backend   TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('blocked', 'circuit_open')),
    structure TEXT NOT NULL DEFAULT '',
    until     INTEGER NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (backend, kind, structure)
) WITHOUT ROWID;
