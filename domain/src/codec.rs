//! How events look in the log, and how they are read back.
//!
//! cqrs-es serializes an event enum externally tagged (`{"FileRenamed": {...}}`).
//! The log stores only the inner object as `payload`, because `event_type`
//! already names it: auditors and downstream consumers read
//! `{"event_type": "FileRenamed", "payload": {"from": …, "name": …}}`.
//! [`unwrap_payload`] and [`wrap_payload`] convert between the two, and
//! [`decode`] turns a stored event back into a domain event, upcasting old
//! versions first.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
#[error("cannot decode stored event {event_type} v{event_version}: {source}")]
pub struct DecodeError {
    pub event_type: String,
    pub event_version: String,
    #[source]
    pub source: serde_json::Error,
}

/// `{"T": inner}` → `inner` when `T` is `event_type`; anything else is kept as is.
pub fn unwrap_payload(event_type: &str, payload: Value) -> Value {
    match payload {
        Value::Object(mut map) if map.len() == 1 && map.contains_key(event_type) => {
            map.remove(event_type).unwrap_or(Value::Null)
        }
        // A unit variant serializes as the bare string "T".
        Value::String(s) if s == event_type => Value::Object(Map::new()),
        other => other,
    }
}

/// `inner` → `{"T": inner}`, the shape serde expects for an externally tagged enum.
pub fn wrap_payload(event_type: &str, inner: Value) -> Value {
    let mut map = Map::with_capacity(1);
    map.insert(event_type.to_owned(), inner);
    Value::Object(map)
}

/// Reads a stored event (as the log keeps it) back into a domain event,
/// upcasting older versions to the current one first.
pub fn decode<E: DeserializeOwned>(
    event_type: &str,
    event_version: &str,
    payload: &Value,
) -> Result<E, DecodeError> {
    let current = crate::upcast::upcast(event_type, event_version, payload.clone());
    serde_json::from_value(wrap_payload(event_type, current)).map_err(|source| DecodeError {
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_stored_without_their_type_tag_and_read_back_with_it() {
        let tagged = json!({"FileRenamed": {"from": "a", "name": "b"}});
        let stored = unwrap_payload("FileRenamed", tagged.clone());
        assert_eq!(stored, json!({"from": "a", "name": "b"}));
        assert_eq!(wrap_payload("FileRenamed", stored), tagged);
    }

    #[test]
    fn a_payload_of_another_shape_is_kept_as_it_is() {
        let odd = json!({"a": 1, "b": 2});
        assert_eq!(unwrap_payload("FileRenamed", odd.clone()), odd);
    }
}
