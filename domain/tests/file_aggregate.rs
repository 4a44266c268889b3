//! Given/when/then tests of the `File` aggregate, without any IO.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use dossier_domain::types::*;
use dossier_domain::{File, FileCommand, FileError, FileEvent, FilePolicy, UploadFile};

type FileTest = TestFramework<File>;

fn policy() -> FilePolicy {
    FilePolicy {
        max_file_bytes: MaxFileBytes(1_000),
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

fn cust() -> CustomerId {
    CustomerId::parse("cust-42").unwrap()
}

fn name(raw: &str) -> DisplayName {
    DisplayName::parse(raw).unwrap()
}

fn upload(size: u64, origin: Origin) -> UploadFile {
    let file_id = FileId::new();
    UploadFile {
        tenant: acme(),
        file_id,
        customer_id: cust(),
        name: name("Contract 2025"),
        file_name: FileName::parse("contract_2025.pdf").unwrap(),
        content_type: ContentType::parse(Some("application/pdf")).unwrap(),
        size,
        sha256: Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
        blob_key: BlobKey::for_file(&acme(), &cust(), file_id),
        visibility: Visibility::Internal,
        origin,
        contract_id: None,
        task_id: None,
        at: at(0),
    }
}

fn uploaded(command: &UploadFile) -> FileEvent {
    FileEvent::FileUploaded {
        tenant: command.tenant.clone(),
        customer_id: command.customer_id.clone(),
        name: command.name.clone(),
        file_name: command.file_name.clone(),
        content_type: command.content_type.clone(),
        size: command.size,
        sha256: command.sha256.clone(),
        blob_key: command.blob_key.clone(),
        visibility: command.visibility,
        origin: command.origin,
        contract_id: command.contract_id.clone(),
        task_id: command.task_id,
        uploaded_at: command.at,
    }
}

fn deleted(command: &UploadFile) -> FileEvent {
    FileEvent::FileDeleted {
        customer_id: command.customer_id.clone(),
        blob_key: command.blob_key.clone(),
        deleted_at: at(5),
    }
}

fn published() -> FileEvent {
    FileEvent::FileVisibilityChanged {
        from: Visibility::Internal,
        visibility: Visibility::Portal,
    }
}

#[test]
fn a_file_of_exactly_the_limit_is_recorded() {
    let command = upload(1_000, Origin::StaffUpload);
    FileTest::with(policy())
        .given_no_previous_events()
        .when(FileCommand::Upload(Box::new(command.clone())))
        .then_expect_events(vec![uploaded(&command)]);
}

#[test]
fn one_byte_over_the_limit_is_refused_and_records_nothing() {
    FileTest::with(policy())
        .given_no_previous_events()
        .when(FileCommand::Upload(Box::new(upload(
            1_001,
            Origin::StaffUpload,
        ))))
        .then_expect_error(FileError::TooLarge { limit: 1_000 });
}

#[test]
fn an_empty_file_is_recorded() {
    let command = upload(0, Origin::StaffUpload);
    FileTest::with(policy())
        .given_no_previous_events()
        .when(FileCommand::Upload(Box::new(command.clone())))
        .then_expect_events(vec![uploaded(&command)]);
}

#[test]
fn uploading_twice_under_one_id_is_refused() {
    let command = upload(10, Origin::StaffUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::Upload(Box::new(command)))
        .then_expect_error(FileError::AlreadyExists);
}

#[test]
fn renaming_records_the_old_and_the_new_name() {
    let command = upload(10, Origin::StaffUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::Rename {
            tenant: acme(),
            name: name("Invoice November 2025"),
        })
        .then_expect_events(vec![FileEvent::FileRenamed {
            from: name("Contract 2025"),
            name: name("Invoice November 2025"),
        }]);
}

#[test]
fn renaming_to_the_same_name_records_nothing() {
    let command = upload(10, Origin::StaffUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::Rename {
            tenant: acme(),
            name: name("Contract 2025"),
        })
        .then_expect_events(vec![]);
}

#[test]
fn an_edit_renames_and_publishes_in_one_step() {
    let command = upload(10, Origin::StaffUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::Edit {
            tenant: acme(),
            name: Some(name("Renamed")),
            visibility: Some(Visibility::Portal),
        })
        .then_expect_events(vec![
            FileEvent::FileRenamed {
                from: name("Contract 2025"),
                name: name("Renamed"),
            },
            published(),
        ]);
}

#[test]
fn another_tenants_file_answers_not_found_to_every_command() {
    let command = upload(10, Origin::StaffUpload);
    let commands = [
        FileCommand::Rename {
            tenant: globex(),
            name: name("x"),
        },
        FileCommand::ChangeVisibility {
            tenant: globex(),
            visibility: Visibility::Portal,
        },
        FileCommand::MarkSigned {
            tenant: globex(),
            signed_at: at(1),
        },
        FileCommand::Delete {
            tenant: globex(),
            confirmed: true,
            at: at(1),
        },
        FileCommand::RecordBlobPurged { tenant: globex() },
    ];
    for foreign in commands {
        FileTest::with(policy())
            .given(vec![uploaded(&command)])
            .when(foreign)
            .then_expect_error(FileError::NotFound);
    }
}

#[test]
fn an_unknown_file_answers_not_found() {
    FileTest::with(policy())
        .given_no_previous_events()
        .when(FileCommand::Rename {
            tenant: acme(),
            name: name("x"),
        })
        .then_expect_error(FileError::NotFound);
}

#[test]
fn deleting_needs_confirmation() {
    let command = upload(10, Origin::StaffUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::Delete {
            tenant: acme(),
            confirmed: false,
            at: at(5),
        })
        .then_expect_error(FileError::ConfirmationRequired);
}

#[test]
fn a_confirmed_delete_records_the_blob_to_purge() {
    let command = upload(10, Origin::CustomerUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::Delete {
            tenant: acme(),
            confirmed: true,
            at: at(5),
        })
        .then_expect_events(vec![deleted(&command)]);
}

#[test]
fn system_and_product_files_can_never_be_deleted() {
    for origin in [Origin::System, Origin::Product] {
        let command = upload(10, origin);
        FileTest::with(policy())
            .given(vec![uploaded(&command)])
            .when(FileCommand::Delete {
                tenant: acme(),
                confirmed: true,
                at: at(5),
            })
            .then_expect_error(FileError::Protected);
    }
}

#[test]
fn nothing_happens_to_a_deleted_file() {
    let command = upload(10, Origin::StaffUpload);
    let after_delete = [
        FileCommand::Rename {
            tenant: acme(),
            name: name("x"),
        },
        FileCommand::Delete {
            tenant: acme(),
            confirmed: true,
            at: at(6),
        },
        FileCommand::MarkViewed {
            tenant: acme(),
            viewer: cust(),
            at: at(6),
        },
    ];
    for later in after_delete {
        FileTest::with(policy())
            .given(vec![uploaded(&command), deleted(&command)])
            .when(later)
            .then_expect_error(FileError::NotFound);
    }
}

#[test]
fn viewed_at_is_set_once_by_the_files_own_customer() {
    let command = upload(10, Origin::StaffUpload);
    let viewed = FileEvent::FileViewed {
        viewer: cust(),
        viewed_at: at(2),
    };
    FileTest::with(policy())
        .given(vec![uploaded(&command), published()])
        .when(FileCommand::MarkViewed {
            tenant: acme(),
            viewer: cust(),
            at: at(2),
        })
        .then_expect_events(vec![viewed.clone()]);
    FileTest::with(policy())
        .given(vec![uploaded(&command), published(), viewed])
        .when(FileCommand::MarkViewed {
            tenant: acme(),
            viewer: cust(),
            at: at(3),
        })
        .then_expect_events(vec![]);
}

#[test]
fn a_customer_cannot_view_an_internal_file_or_another_customers_file() {
    let command = upload(10, Origin::StaffUpload);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::MarkViewed {
            tenant: acme(),
            viewer: cust(),
            at: at(2),
        })
        .then_expect_error(FileError::NotFound);
    FileTest::with(policy())
        .given(vec![uploaded(&command), published()])
        .when(FileCommand::MarkViewed {
            tenant: acme(),
            viewer: CustomerId::parse("cust-7").unwrap(),
            at: at(2),
        })
        .then_expect_error(FileError::NotFound);
}

#[test]
fn signing_records_the_signature_time() {
    let command = upload(10, Origin::Contract);
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::MarkSigned {
            tenant: acme(),
            signed_at: at(9),
        })
        .then_expect_events(vec![FileEvent::FileSigned { signed_at: at(9) }]);
}

#[test]
fn a_blob_is_purged_once_and_only_after_delete() {
    let command = upload(10, Origin::StaffUpload);
    let purged = FileEvent::BlobPurged {
        blob_key: command.blob_key.clone(),
    };
    FileTest::with(policy())
        .given(vec![uploaded(&command)])
        .when(FileCommand::RecordBlobPurged { tenant: acme() })
        .then_expect_error(FileError::NotDeleted);
    FileTest::with(policy())
        .given(vec![uploaded(&command), deleted(&command)])
        .when(FileCommand::RecordBlobPurged { tenant: acme() })
        .then_expect_events(vec![purged.clone()]);
    FileTest::with(policy())
        .given(vec![uploaded(&command), deleted(&command), purged])
        .when(FileCommand::RecordBlobPurged { tenant: acme() })
        .then_expect_events(vec![]);
}
