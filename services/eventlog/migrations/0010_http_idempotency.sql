-- Idempotency keys of HTTP commands (the `Idempotency-Key` header, ADR 0016).
-- One row per (tenant, subject, key): claimed `in_flight` when a request with
-- the key starts, `done` with the answer once it answered. The command's
-- events carry the key too, so its receipt (command_receipts) is written in
-- the same transaction as the events: a process that died between recording
-- and answering leaves an `in_flight` row and a receipt, and the retry answers
-- from the receipt.
CREATE TABLE http_idempotency (
    tenant              TEXT        NOT NULL,
    -- The token's `sub`: keys are scoped to a user of a tenant.
    subject             TEXT        NOT NULL,
    idempotency_key     TEXT        NOT NULL,
    -- SHA-256 (hex) of method, path and query, and of the body of a request
    -- that is not a form.
    fingerprint         TEXT        NOT NULL,
    -- SHA-256 (hex) of a form's fields and its file's SHA-256: known only
    -- once the form was received.
    content_fingerprint TEXT,
    state               TEXT        NOT NULL CHECK (state IN ('in_flight', 'done')),
    -- The answer, once done.
    status              SMALLINT,
    headers             JSONB,
    body                BYTEA,
    -- The claim's holder (one request): only it renews, answers or releases.
    owner               UUID        NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- An in-flight claim whose process stopped renewing it past this may be
    -- taken over (if its command recorded nothing).
    lease_until         TIMESTAMPTZ NOT NULL,
    -- After this the key is new again; the retention sweep deletes the row.
    expires_at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant, subject, idempotency_key)
);
CREATE INDEX http_idempotency_expires_at ON http_idempotency (expires_at);

-- Receipts now expire too (the same retention sweep).
CREATE INDEX command_receipts_recorded_at ON command_receipts (recorded_at);
