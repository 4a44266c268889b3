-- Receipts of commands that carry an idempotency key (AMQP message_id).
-- A receipt is written in the same transaction as the command's events, so a
-- re-delivered or re-sent message finds it and repeats the first answer
-- instead of acting twice. A refused command gets a receipt too (no events).
CREATE TABLE command_receipts (
    tenant          TEXT        NOT NULL,
    idempotency_key TEXT        NOT NULL,
    -- 'accepted' or 'rejected'
    status          TEXT        NOT NULL CHECK (status IN ('accepted', 'rejected')),
    aggregate_type  TEXT,
    aggregate_id    TEXT,
    -- The log position of the aggregate's last event after the command.
    position        BIGINT,
    -- For a refused command: {"code", "message"}.
    error           JSONB,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, idempotency_key)
);
