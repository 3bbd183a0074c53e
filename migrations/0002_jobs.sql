-- Federated jobs: a train, its plan and its stations; one task per round; a checkpoint after
-- every round (round 0 is the initial weights). Same portability rules as 0001.

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    researcher TEXT NOT NULL,
    train TEXT NOT NULL REFERENCES trains (digest),
    params TEXT NOT NULL,
    plan TEXT NOT NULL,
    stations TEXT NOT NULL,
    recipient_key TEXT NOT NULL,
    -- running | done | failed
    state TEXT NOT NULL,
    -- The round in progress (1-based); the last round when done.
    round BIGINT NOT NULL,
    reason TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE job_rounds (
    job TEXT NOT NULL REFERENCES jobs (id),
    round BIGINT NOT NULL,
    task TEXT NOT NULL UNIQUE REFERENCES tasks (id),
    PRIMARY KEY (job, round)
);

-- Global weights after each round, the server optimizer's state, and what the round used.
CREATE TABLE checkpoints (
    job TEXT NOT NULL REFERENCES jobs (id),
    round BIGINT NOT NULL,
    weights BYTEA NOT NULL,
    server_state BYTEA NOT NULL,
    summary TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (job, round)
);

-- Updates of a round's runs (already clipped, noised and encoded by the station).
CREATE TABLE updates (
    run TEXT PRIMARY KEY REFERENCES runs (id),
    payload BYTEA NOT NULL
);
