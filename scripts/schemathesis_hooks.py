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

Every form that takes a file also takes `size`, the file's length (ADR 0019):
a schema cannot say that it must equal the length of the file part beside
it, so a drawn size that is well-formed (a whole number) is set to the
length of the file actually sent, and the positive-data check sees the
upload accepted; a malformed one is left as drawn and must be refused. A
size that differs from its file is tested in tests/tests/staff_files.rs.
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
    _unique_idempotency_key(case)
    _size_of_the_file_sent(case)


def _unique_idempotency_key(case):
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key" and _well_formed(headers[name]):
            headers[name] = f"st-{uuid.uuid4()}"


def _length(file):
    # schemathesis wraps drawn bytes in `Binary`, a str subclass holding them
    # in `data`.
    data = getattr(file, "data", None)
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(file, (bytes, bytearray)):
        return len(file)
    if isinstance(file, str):
        return len(file.encode())
    return None


def _size_of_the_file_sent(case):
    body = case.body
    if not isinstance(body, dict) or "size" not in body or "file" not in body:
        return
    size = body["size"]
    length = _length(body["file"])
    if length is not None and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        body["size"] = length
