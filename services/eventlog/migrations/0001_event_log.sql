-- 0001: the append-only event log and the checkpoints of its readers.
--
-- The log is the source of truth (DESIGN.md): every accepted command is one or more
-- rows here, each with a global position, a tenant, an actor and a JSON payload.
-- Rows are only ever inserted; a trigger refuses UPDATE, DELETE and TRUNCATE.
-- How readers follow this table without skipping late commits is explained in
-- docs/adr/0002-log-order-and-the-safe-watermark.md and in src/log.rs.

-- Global log order. CACHE 1 (the default) matters: log readers treat the sequence's
-- last_value as "every position up to here has been handed out", which a per-session
-- cache would break. Do not change it.
CREATE SEQUENCE events_position_seq AS BIGINT MINVALUE 1 START WITH 1 CACHE 1 NO CYCLE;

CREATE TABLE events (
    -- Assigned by the events_assign_position trigger below, never by the client.
    position       BIGINT      NOT NULL,
    -- The event id (UUID v7); downstream it is the AMQP message_id.
    id             UUID        NOT NULL,
    -- The appending transaction (pg_current_xact_id()); set by the trigger too.
    txid           XID8        NOT NULL,
    tenant         TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    sequence       BIGINT      NOT NULL,
    event_type     TEXT        NOT NULL,
    event_version  TEXT        NOT NULL,
    payload        JSONB       NOT NULL,
    -- The cqrs-es metadata map (tenant, actor, command_id, correlation_id, ...).
    metadata       JSONB       NOT NULL DEFAULT '{}'::jsonb,
    actor          TEXT        NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now(),

    CONSTRAINT events_pkey PRIMARY KEY (position),
    CONSTRAINT events_id_key UNIQUE (id),
    -- Optimistic concurrency: two commands that loaded the same version of an
    -- aggregate both try to write the next sequence number; one of them loses here.
    CONSTRAINT events_aggregate_sequence_key UNIQUE (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_tenant_not_empty CHECK (tenant <> ''),
    CONSTRAINT events_sequence_positive CHECK (sequence > 0),
    CONSTRAINT events_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object')
);

ALTER SEQUENCE events_position_seq OWNED BY events.position;

-- GET /v1/events and the per-tenant replay read "this tenant, after position N".
CREATE INDEX events_tenant_position_idx ON events (tenant, position);

-- Every row takes its transaction id BEFORE it draws its position. The safe
-- watermark of the log readers relies on exactly that order ("a transaction that
-- drew a position <= L has an xid older than any xid assigned after L was read"),
-- so it is enforced here, for every writer, instead of trusting each client to
-- call pg_current_xact_id() first (the Rust event store does that as well).
-- A BEFORE trigger runs before the row is written, that is before PostgreSQL would
-- assign the xid on its own; pg_current_xact_id() assigns it now, then nextval().
-- There is deliberately no column default for position: a default would be
-- evaluated before this trigger and draw a position too early.
CREATE FUNCTION events_assign_position() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.txid := pg_current_xact_id();
    NEW.position := nextval('events_position_seq');
    RETURN NEW;
END
$$;

CREATE TRIGGER events_assign_position
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_assign_position();

-- Append-only. A tamper-evidence test may disable this one trigger on purpose
-- (ALTER TABLE events DISABLE TRIGGER events_append_only); keep it separate from
-- events_assign_position so that inserts keep working when it is disabled.
CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'correct a mistake by appending a compensating event';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Where each log follower (a projector, the outbox relay, ...) has got to: the
-- position of the last event whose effect it has made durable. A follower updates
-- its row in the same transaction as its effect when it can.
CREATE TABLE checkpoints (
    name       TEXT        PRIMARY KEY,
    position   BIGINT      NOT NULL CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
