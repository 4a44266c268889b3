//! Given/when/then tests of the `Bundle` aggregate, without any IO.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use dossier_domain::types::*;
use dossier_domain::{Bundle, bundle::BundleStatus};
use dossier_domain::{
    BundleArchive, BundleCommand, BundleError, BundleEvent, BundleFile, BundlePolicy, RequestBundle,
};
use uuid::Uuid;

type BundleTest = TestFramework<Bundle>;

fn policy() -> BundlePolicy {
    BundlePolicy {
        max_files: 3,
        max_bytes: 1_000,
        ..BundlePolicy::default()
    }
}

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, minute, 0).unwrap()
}

fn acme() -> TenantId {
    TenantId::parse("acme").unwrap()
}

fn globex() -> TenantId {
    TenantId::parse("globex").unwrap()
}

fn file(n: u128, size: u64) -> BundleFile {
    BundleFile {
        file_id: FileId(Uuid::from_u128(n)),
        customer_id: CustomerId::parse("cust-42").unwrap(),
        size,
    }
}

fn request(files: Vec<BundleFile>) -> BundleCommand {
    BundleCommand::Request(RequestBundle {
        tenant: acme(),
        requested_by: Actor::new("alice"),
        files,
        at: at(0),
    })
}

fn requested(files: Vec<BundleFile>) -> BundleEvent {
    let total_size = files.iter().map(|f| f.size).sum();
    BundleEvent::BundleRequested {
        tenant: acme(),
        requested_by: Actor::new("alice"),
        files,
        total_size,
        requested_at: at(0),
    }
}

fn archive() -> BundleArchive {
    BundleArchive {
        blob_key: BlobKey::from_recorded("acme/_bundles/b.zip"),
        size: 512,
        sha256: Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
    }
}

fn ready() -> BundleEvent {
    let archive = archive();
    BundleEvent::BundleReady {
        blob_key: archive.blob_key,
        size: archive.size,
        sha256: archive.sha256,
        ready_at: at(5),
        expires_at: at(50),
    }
}

fn mark_ready(tenant: TenantId) -> BundleCommand {
    BundleCommand::MarkReady {
        tenant,
        archive: archive(),
        at: at(5),
        expires_at: at(50),
    }
}

fn mark_failed() -> BundleCommand {
    BundleCommand::MarkFailed {
        tenant: acme(),
        reason: "file x was deleted".into(),
        at: at(5),
        expires_at: at(50),
    }
}

#[test]
fn a_request_records_who_which_files_and_when() {
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(request(vec![file(1, 400), file(2, 600)]))
        .then_expect_events(vec![requested(vec![file(1, 400), file(2, 600)])]);
}

#[test]
fn the_limits_are_inclusive_and_named_when_exceeded() {
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(request(vec![
            file(1, 1),
            file(2, 1),
            file(3, 1),
            file(4, 1),
        ]))
        .then_expect_error(BundleError::TooManyFiles { limit: 3 });
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(request(vec![file(1, 500), file(2, 501)]))
        .then_expect_error(BundleError::TooLarge {
            limit: 1_000,
            total: 1_001,
        });
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(request(vec![file(1, 1), file(2, 1), file(3, 998)]))
        .then_expect_events(vec![requested(vec![file(1, 1), file(2, 1), file(3, 998)])]);
    let message = BundleError::TooLarge {
        limit: 1_000,
        total: 1_001,
    }
    .to_string();
    assert!(message.contains("1000"), "{message}");
}

#[test]
fn an_empty_or_repeating_request_is_refused() {
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(request(vec![]))
        .then_expect_error(BundleError::NoFiles);
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(request(vec![file(1, 1), file(1, 1)]))
        .then_expect_error(BundleError::DuplicateFile(FileId(Uuid::from_u128(1))));
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)])])
        .when(request(vec![file(1, 1)]))
        .then_expect_error(BundleError::AlreadyExists);
}

#[test]
fn progress_only_moves_forward_and_only_while_pending() {
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1), file(2, 1)])])
        .when(BundleCommand::RecordProgress {
            tenant: acme(),
            files_done: 1,
        })
        .then_expect_events(vec![BundleEvent::BundleProgress { files_done: 1 }]);
    BundleTest::with(policy())
        .given(vec![
            requested(vec![file(1, 1), file(2, 1)]),
            BundleEvent::BundleProgress { files_done: 2 },
        ])
        .when(BundleCommand::RecordProgress {
            tenant: acme(),
            files_done: 1,
        })
        .then_expect_events(vec![]);
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), ready()])
        .when(BundleCommand::RecordProgress {
            tenant: acme(),
            files_done: 1,
        })
        .then_expect_events(vec![]);
}

#[test]
fn ready_is_recorded_once_and_a_finished_bundle_stays_finished() {
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)])])
        .when(mark_ready(acme()))
        .then_expect_events(vec![ready()]);
    // A redelivered job repeats "ready": nothing new.
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), ready()])
        .when(mark_ready(acme()))
        .then_expect_events(vec![]);
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), ready()])
        .when(mark_failed())
        .then_expect_error(BundleError::Finished);
    let failed = BundleEvent::BundleFailed {
        reason: "gone".into(),
        failed_at: at(5),
        expires_at: at(50),
    };
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), failed.clone()])
        .when(mark_ready(acme()))
        .then_expect_error(BundleError::Finished);
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), failed])
        .when(mark_failed())
        .then_expect_events(vec![]);
}

#[test]
fn expiry_names_the_archive_and_happens_once() {
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), ready()])
        .when(BundleCommand::Expire {
            tenant: acme(),
            at: at(50),
        })
        .then_expect_events(vec![BundleEvent::BundleExpired {
            blob_key: Some(archive().blob_key),
            expired_at: at(50),
        }]);
    let expired = BundleEvent::BundleExpired {
        blob_key: None,
        expired_at: at(50),
    };
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), expired.clone()])
        .when(BundleCommand::Expire {
            tenant: acme(),
            at: at(51),
        })
        .then_expect_events(vec![]);
    // A job that was still queued when its bundle expired must not revive it.
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)]), expired])
        .when(mark_ready(acme()))
        .then_expect_error(BundleError::Expired);
}

#[test]
fn another_tenant_sees_no_bundle() {
    BundleTest::with(policy())
        .given(vec![requested(vec![file(1, 1)])])
        .when(mark_ready(globex()))
        .then_expect_error(BundleError::NotFound);
    BundleTest::with(policy())
        .given_no_previous_events()
        .when(BundleCommand::Expire {
            tenant: acme(),
            at: at(1),
        })
        .then_expect_error(BundleError::NotFound);
}

#[test]
fn the_state_follows_the_events() {
    use cqrs_es::Aggregate as _;
    let mut bundle = Bundle::default();
    assert!(bundle.record().is_none());
    bundle.apply(requested(vec![file(1, 1), file(2, 1)]));
    bundle.apply(BundleEvent::BundleProgress { files_done: 1 });
    let record = bundle.record().unwrap();
    assert_eq!(record.status, BundleStatus::Pending);
    assert_eq!(record.files_done, 1);
    bundle.apply(ready());
    let record = bundle.record().unwrap();
    assert_eq!(record.status, BundleStatus::Ready);
    assert_eq!(record.files_done, 2);
    assert_eq!(record.archive, Some(archive()));
}

#[test]
fn event_names_are_their_types_so_the_log_accepts_them() {
    use cqrs_es::DomainEvent as _;
    for event in [
        requested(vec![file(1, 1)]),
        BundleEvent::BundleProgress { files_done: 1 },
        ready(),
    ] {
        let tagged = serde_json::to_value(&event).unwrap();
        assert!(
            tagged.get(event.event_type()).is_some(),
            "{tagged} is tagged {}",
            event.event_type()
        );
    }
}
