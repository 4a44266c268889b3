//! Which fields of which events are personal, whose key seals them, and which
//! events destroy keys (CONTRACT.md, "Data protection").
//!
//! | aggregate | event | sealed fields | under the key of |
//! |---|---|---|---|
//! | `file` | `FileUploaded` | `name`, `file_name`, `content_type`, `sha256` | the file |
//! | `file` | `FileRenamed` | `from`, `name` | the file |
//! | `task` | `TaskCreated` | `title` | the task's customer |
//! | `task` | `TaskMessagePosted` | `text` | the task's customer |
//!
//! Ids, times, sizes, visibility, origin and event types stay clear, so order,
//! counts and the audit trail's shape survive a destroyed key.
//!
//! | aggregate | event | destroys the key of |
//! |---|---|---|
//! | `file` | `FileDeleted` | the file |
//! | `customer` | `CustomerErased` | the customer (its files' keys went with their own `FileDeleted`) |
//!
//! The event store applies these rules as it writes (sealing, and destroying
//! keys in the append's own transaction) and as it reads (opening); this module
//! only says what they are, so it can be read and tested without IO.

/// Whose key seals an event's personal fields, or is destroyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOwner {
    /// The file the event belongs to (its aggregate id).
    File,
    /// The customer the event concerns: `customer_id` in the payload of a
    /// `TaskCreated` or `CustomerErased`, and for a `TaskMessagePosted` the
    /// customer of its task's `TaskCreated`.
    Customer,
}

/// The personal fields of one event type, and whose key seals them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonalFields {
    /// Whose key seals them.
    pub owner: KeyOwner,
    /// Top-level string fields of the payload (without cqrs-es's type tag).
    pub fields: &'static [&'static str],
}

/// The personal fields of `event_type` of `aggregate_type`, if it has any.
pub fn personal_fields(aggregate_type: &str, event_type: &str) -> Option<PersonalFields> {
    let (owner, fields): (KeyOwner, &'static [&'static str]) = match (aggregate_type, event_type) {
        ("file", "FileUploaded") => (
            KeyOwner::File,
            &["name", "file_name", "content_type", "sha256"],
        ),
        ("file", "FileRenamed") => (KeyOwner::File, &["from", "name"]),
        ("task", "TaskCreated") => (KeyOwner::Customer, &["title"]),
        ("task", "TaskMessagePosted") => (KeyOwner::Customer, &["text"]),
        _ => return None,
    };
    Some(PersonalFields { owner, fields })
}

/// Whose key an event destroys when it is appended, if any.
pub fn destroys_key(aggregate_type: &str, event_type: &str) -> Option<KeyOwner> {
    match (aggregate_type, event_type) {
        ("file", "FileDeleted") => Some(KeyOwner::File),
        ("customer", "CustomerErased") => Some(KeyOwner::Customer),
        _ => None,
    }
}

/// What an erased field reads as where a value is required (an aggregate
/// being rebuilt, a read model being rebuilt): the empty string. Such a value
/// never reaches an answer: a file whose key is destroyed is deleted, and an
/// erased customer's tasks leave every read model.
pub const ERASED_PLACEHOLDER: &str = "";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_hashes_are_sealed_under_the_file_and_ids_stay_clear() {
        let uploaded = personal_fields("file", "FileUploaded").unwrap();
        assert_eq!(uploaded.owner, KeyOwner::File);
        for clear in [
            "customer_id",
            "size",
            "visibility",
            "origin",
            "blob_key",
            "task_id",
        ] {
            assert!(!uploaded.fields.contains(&clear), "{clear}");
        }
        assert_eq!(
            personal_fields("file", "FileRenamed").unwrap().fields,
            &["from", "name"]
        );
        for clear in ["FileDeleted", "FileViewed", "FileSigned", "BlobPurged"] {
            assert_eq!(personal_fields("file", clear), None, "{clear}");
        }
    }

    #[test]
    fn task_texts_are_sealed_under_the_customer() {
        for event in ["TaskCreated", "TaskMessagePosted"] {
            assert_eq!(
                personal_fields("task", event).unwrap().owner,
                KeyOwner::Customer
            );
        }
        // An event type name alone is not enough: the aggregate must match.
        assert_eq!(personal_fields("bundle", "FileUploaded"), None);
    }

    #[test]
    fn a_delete_destroys_the_file_key_and_an_erasure_the_customer_key() {
        assert_eq!(destroys_key("file", "FileDeleted"), Some(KeyOwner::File));
        assert_eq!(
            destroys_key("customer", "CustomerErased"),
            Some(KeyOwner::Customer)
        );
        assert_eq!(destroys_key("file", "FileRenamed"), None);
        assert_eq!(destroys_key("task", "CustomerErased"), None);
    }
}
