-- An internet-facing registry: answers to creating requests sent with an Idempotency-Key (a
-- retried request gets the first answer instead of a second object; kept one day), and
-- tokens that expire and can be revoked. Same portability rules as 0001.

CREATE TABLE idempotency (
    actor TEXT NOT NULL,
    key TEXT NOT NULL,
    -- the route's action name and the SHA-256 of the request body: the same key with another
    -- request is refused
    action TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    -- 0 while the first request is being handled
    status BIGINT NOT NULL,
    response TEXT,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (actor, key)
);

ALTER TABLE users ADD COLUMN token_expires_ms BIGINT;
ALTER TABLE users ADD COLUMN revoked_ms BIGINT;
