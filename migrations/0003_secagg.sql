-- Secure aggregation of a federated round (the round's task): where the protocol stands and
-- what each station sent. The registry stores only public keys, ciphertext it cannot open
-- (shares sealed station to station), masked updates (in `updates`) and, after training,
-- the revealed shares that unmask the sum. Same portability rules as 0001.

CREATE TABLE secagg_rounds (
    task TEXT PRIMARY KEY REFERENCES tasks (id),
    -- keys | shares | masked | reveal | ended
    phase TEXT NOT NULL,
    -- JSON: participants, sharers, survivors and dropped, each fixed when its phase began
    sets TEXT NOT NULL,
    phase_ms BIGINT NOT NULL
);

CREATE TABLE secagg_messages (
    task TEXT NOT NULL REFERENCES tasks (id),
    station TEXT NOT NULL,
    -- keys | shares | reveal
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (task, station, kind)
);
