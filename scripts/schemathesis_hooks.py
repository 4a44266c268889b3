"""Hooks of scripts/schemathesis.sh.

Every HTTP command takes an Idempotency-Key (CONTRACT.md, "Idempotent
requests"), and the same key on a different request is refused with 422
idempotency_key_reused, as it must be. schemathesis draws header values from
a small space, so two different requests of one run often carry the same
key, and its positive-data check would count that right refusal as a valid
request rejected. A well-formed key is therefore made unique per request just
before it is sent; a malformed one is left as drawn, so that its refusal
(422 validation_failed) is still checked. The key's own rules are tested in
tests/tests/idempotency.rs.
"""

import uuid

import schemathesis


def _well_formed(value):
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 255
        and all(33 <= ord(c) <= 126 for c in value)
    )


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key" and _well_formed(headers[name]):
            headers[name] = f"st-{uuid.uuid4()}"
