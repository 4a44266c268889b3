-- 0007: tamper evidence for the event log (services/eventlog/src/chain.rs).
--
-- Each tenant's events form a hash chain: the sealer follows the log in position
-- order and gives every event the SHA-256 of the previous event's hash and the
-- event's canonical bytes. Appends are never serialized for this: the sealer runs
-- behind the log, like a projection. Periodically the head of every chain is
-- signed (HMAC-SHA256 with DOSSIER_CHECKPOINT_KEY, not the JWT secret), so that a
-- cut-off tail can be proven. `dossier verify --tenant T` recomputes all of it.
-- What this proves and what it does not: README.md, "Auditing".

-- One row per sealed event.
CREATE TABLE event_hashes (
    position  BIGINT NOT NULL,
    tenant    TEXT   NOT NULL,
    -- The event's number in its tenant's chain, from 1, without gaps.
    seq       BIGINT NOT NULL,
    -- SHA-256(prev_hash || canonical bytes), and the previous event's hash
    -- (32 zero bytes for the first event of a tenant).
    hash      BYTEA  NOT NULL,
    prev_hash BYTEA  NOT NULL,

    CONSTRAINT event_hashes_pkey PRIMARY KEY (position),
    CONSTRAINT event_hashes_tenant_seq_key UNIQUE (tenant, seq),
    CONSTRAINT event_hashes_seq_positive CHECK (seq > 0),
    CONSTRAINT event_hashes_hash_length CHECK (octet_length(hash) = 32 AND octet_length(prev_hash) = 32)
);

-- The head of every tenant's chain: where the next sealed event continues.
CREATE TABLE chain_heads (
    tenant     TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    position   BIGINT      NOT NULL,
    hash       BYTEA       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),

    CONSTRAINT chain_heads_pkey PRIMARY KEY (tenant)
);

-- Signed heads. A checkpoint says "on `at`, the chain of `tenant` had `seq`
-- events and ended at `position` with `hash`"; `signature` is the HMAC of exactly
-- that (chain::Checkpoint::message). Keep copies outside this database too.
CREATE TABLE chain_checkpoints (
    id        BIGSERIAL   NOT NULL,
    tenant    TEXT        NOT NULL,
    seq       BIGINT      NOT NULL,
    position  BIGINT      NOT NULL,
    hash      BYTEA       NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    signature BYTEA       NOT NULL,

    CONSTRAINT chain_checkpoints_pkey PRIMARY KEY (id)
);

CREATE INDEX chain_checkpoints_tenant_position ON chain_checkpoints (tenant, position DESC);
