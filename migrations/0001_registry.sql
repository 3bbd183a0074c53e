-- The registry's schema. Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Times are milliseconds since the Unix epoch (BIGINT). Ids are random hex text.

CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    station TEXT,
    token_sha256 TEXT NOT NULL UNIQUE,
    enc_public_key TEXT,
    created_ms BIGINT NOT NULL
);

CREATE TABLE stations (
    name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_seen_ms BIGINT
);

-- Nonces of signed station requests inside the clock window: a second use is a replay.
CREATE TABLE nonces (
    key_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    created_s BIGINT NOT NULL,
    PRIMARY KEY (key_id, nonce)
);

CREATE TABLE trains (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    capabilities TEXT NOT NULL,
    signers TEXT NOT NULL,
    uploaded_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    bundle BYTEA NOT NULL
);

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    researcher TEXT NOT NULL,
    train TEXT NOT NULL REFERENCES trains (digest),
    params TEXT NOT NULL,
    recipient_key TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);

CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL REFERENCES tasks (id),
    station TEXT NOT NULL REFERENCES stations (name),
    state TEXT NOT NULL,
    reason TEXT,
    updated_ms BIGINT NOT NULL,
    UNIQUE (task, station)
);
CREATE INDEX runs_by_station_state ON runs (station, state);

-- Sealed outputs: ciphertext only; the registry has no key to open them.
CREATE TABLE results (
    run TEXT NOT NULL REFERENCES runs (id),
    name TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (run, name)
);

-- Stations' own signed audit lines, verified on upload (signature and chain).
CREATE TABLE station_audit (
    station TEXT NOT NULL REFERENCES stations (name),
    seq BIGINT NOT NULL,
    line TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (station, seq)
);
CREATE TABLE station_heads (
    station TEXT PRIMARY KEY REFERENCES stations (name),
    head TEXT NOT NULL
);

-- The registry's own append-only trail, hash-chained.
CREATE TABLE registry_audit (
    seq BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
