//! Upcasters: pure functions that lift an old version of a stored event to
//! the current one. The log is never rewritten; old rows are read through
//! these. A name is never reused for a new meaning: a changed meaning gets a
//! new event type.
//!
//! Every reader that interprets a payload comes through [`upcast`] (via
//! [`crate::codec::decode`], the event store's aggregate load, the audit
//! trail), so code above this module only ever sees current versions. Readers
//! that show the log as it is (`GET /v1/events`, `dossier replay`, the hash
//! chain) do not upcast: they show what was stored.
//!
//! | event | from | to | change |
//! |---|---|---|---|
//! | `FileUploaded` | 1 | 2 | version 2 always states `contract_id` and `task_id` (null when absent); version 1, written before files could belong to a contract or a task, may lack them |

use serde_json::Value;

/// The event type whose version 1 is lifted by [`file_uploaded_v1_to_v2`].
const FILE_UPLOADED: &str = "FileUploaded";

/// The current version of `FileUploaded` (what `FileEvent::event_version` writes).
pub const FILE_UPLOADED_VERSION: &str = "2";

/// Lifts `payload` of `event_type` at `event_version` to the current version.
/// Anything without an upcaster (a current version, another event type, an
/// unknown version) passes through unchanged: decoding then decides.
pub fn upcast(event_type: &str, event_version: &str, payload: Value) -> Value {
    match upcaster(event_type, event_version) {
        Some(lift) => lift(payload),
        None => payload,
    }
}

/// The upcaster [`upcast`] applies to `event_type` at `event_version`, if any: the
/// one table of upcasters. `None` means the stored payload already is the current
/// shape, so a reader may decode it straight from its JSON text (a projection
/// rebuild does) instead of going through a [`Value`].
pub fn upcaster(event_type: &str, event_version: &str) -> Option<fn(Value) -> Value> {
    match (event_type, event_version) {
        (FILE_UPLOADED, "1") => Some(file_uploaded_v1_to_v2),
        _ => None,
    }
}

/// `FileUploaded` v1 → v2: adds `"contract_id": null` and `"task_id": null`
/// where they are missing; keeps every value that is there.
pub fn file_uploaded_v1_to_v2(payload: Value) -> Value {
    match payload {
        Value::Object(mut map) => {
            for key in ["contract_id", "task_id"] {
                map.entry(key).or_insert(Value::Null);
            }
            Value::Object(map)
        }
        // Not an object: nothing to lift; decoding reports it.
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::file::FileEvent;
    use cqrs_es::DomainEvent as _;
    use serde_json::json;

    /// A `FileUploaded` as an early build wrote it: version 1, no contract, no task.
    fn v1_upload() -> Value {
        json!({
            "tenant": "acme",
            "customer_id": "cust-1",
            "name": "Invoice November 2025",
            "file_name": "invoice_11.pdf",
            "content_type": "application/pdf",
            "size": 48213,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "blob_key": "acme/cust-1/0193c1b2-0000-7000-8000-000000000001",
            "visibility": "internal",
            "origin": "staff_upload",
            "uploaded_at": "2025-11-30T10:15:00Z"
        })
    }

    #[test]
    fn a_v1_upload_without_contract_and_task_gets_both_as_null() {
        let lifted = upcast("FileUploaded", "1", v1_upload());
        assert_eq!(lifted["contract_id"], Value::Null);
        assert_eq!(lifted["task_id"], Value::Null);
        assert!(lifted.as_object().unwrap().contains_key("contract_id"));
        let mut expected = v1_upload();
        expected["contract_id"] = Value::Null;
        expected["task_id"] = Value::Null;
        assert_eq!(lifted, expected, "nothing else changes");
    }

    #[test]
    fn a_v1_upload_that_has_a_contract_keeps_it() {
        let mut payload = v1_upload();
        payload["contract_id"] = json!("k-7");
        let lifted = upcast("FileUploaded", "1", payload);
        assert_eq!(lifted["contract_id"], "k-7");
        assert_eq!(lifted["task_id"], Value::Null);
    }

    #[test]
    fn current_versions_and_other_events_pass_through() {
        let v2 = upcast("FileUploaded", "2", v1_upload());
        assert_eq!(v2, v1_upload());
        let renamed = json!({"from": "a", "name": "b"});
        assert_eq!(upcast("FileRenamed", "1", renamed.clone()), renamed);
        assert_eq!(upcast("FileUploaded", "1", json!("odd")), json!("odd"));
    }

    #[test]
    fn only_versions_with_an_upcaster_are_changed() {
        assert!(upcaster("FileUploaded", "1").is_some());
        assert!(upcaster("FileUploaded", FILE_UPLOADED_VERSION).is_none());
        assert!(upcaster("FileRenamed", "1").is_none());
    }

    #[test]
    fn a_stored_v1_upload_decodes_like_the_same_upload_written_today() {
        let old: FileEvent = codec::decode("FileUploaded", "1", &v1_upload()).unwrap();
        let mut today = v1_upload();
        today["contract_id"] = Value::Null;
        today["task_id"] = Value::Null;
        let new: FileEvent = codec::decode("FileUploaded", "2", &today).unwrap();
        assert_eq!(old, new);
        assert!(matches!(
            old,
            FileEvent::FileUploaded {
                contract_id: None,
                task_id: None,
                ..
            }
        ));
    }

    #[test]
    fn uploads_are_written_at_the_version_the_upcaster_lifts_to() {
        let event: FileEvent = codec::decode("FileUploaded", "1", &v1_upload()).unwrap();
        assert_eq!(event.event_version(), FILE_UPLOADED_VERSION);
        // A v2 payload as written today carries both keys explicitly.
        let written = codec::unwrap_payload("FileUploaded", serde_json::to_value(&event).unwrap());
        assert!(written.as_object().unwrap().contains_key("contract_id"));
        assert!(written.as_object().unwrap().contains_key("task_id"));
        let renamed = FileEvent::FileRenamed {
            from: crate::DisplayName::parse("a").unwrap(),
            name: crate::DisplayName::parse("b").unwrap(),
        };
        assert_eq!(renamed.event_version(), "1");
    }
}
