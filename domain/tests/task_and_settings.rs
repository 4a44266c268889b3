//! Given/when/then tests of the `Task` and `Settings` aggregates.

use chrono::{DateTime, Utc};
use cqrs_es::test::TestFramework;
use dossier_domain::types::*;
use dossier_domain::{
    MessageText, Settings, SettingsCommand, SettingsError, SettingsEvent, Task, TaskCommand,
    TaskError, TaskEvent, TaskTitle,
};
use uuid::Uuid;

fn acme() -> TenantId {
    TenantId::parse("acme").unwrap()
}

fn cust(id: &str) -> CustomerId {
    CustomerId::parse(id).unwrap()
}

fn created() -> TaskEvent {
    TaskEvent::TaskCreated {
        tenant: acme(),
        customer_id: cust("cust-1"),
        title: TaskTitle::parse("Send your bank statements").unwrap(),
        created_at: DateTime::<Utc>::UNIX_EPOCH,
    }
}

fn post(as_customer: Option<&str>, text: &str, file: Option<FileId>) -> TaskCommand {
    TaskCommand::PostMessage {
        tenant: acme(),
        as_customer: as_customer.map(cust),
        message_id: Uuid::from_u128(1),
        author: Actor::new("user-1"),
        text: MessageText::parse(text).unwrap(),
        file_id: file,
        at: DateTime::<Utc>::UNIX_EPOCH,
    }
}

#[test]
fn a_task_is_created_for_a_customer() {
    TestFramework::<Task>::with(())
        .given_no_previous_events()
        .when(TaskCommand::Create {
            tenant: acme(),
            customer_id: cust("cust-1"),
            title: TaskTitle::parse("  Send your bank statements ").unwrap(),
            at: DateTime::<Utc>::UNIX_EPOCH,
        })
        .then_expect_events(vec![created()]);
}

#[test]
fn the_tasks_customer_posts_a_message_with_a_file() {
    let file = FileId(Uuid::from_u128(7));
    TestFramework::<Task>::with(())
        .given(vec![created()])
        .when(post(Some("cust-1"), "Here it is", Some(file)))
        .then_expect_events(vec![TaskEvent::TaskMessagePosted {
            message_id: Uuid::from_u128(1),
            author: Actor::new("user-1"),
            text: MessageText::parse("Here it is").unwrap(),
            file_id: Some(file),
            at: DateTime::<Utc>::UNIX_EPOCH,
        }]);
}

#[test]
fn another_customer_cannot_post_to_the_task() {
    TestFramework::<Task>::with(())
        .given(vec![created()])
        .when(post(Some("cust-2"), "Hello", None))
        .then_expect_error(TaskError::NotFound);
}

#[test]
fn an_unknown_task_answers_not_found() {
    TestFramework::<Task>::with(())
        .given_no_previous_events()
        .when(post(None, "Hello", None))
        .then_expect_error(TaskError::NotFound);
}

#[test]
fn a_message_needs_text_or_a_file() {
    TestFramework::<Task>::with(())
        .given(vec![created()])
        .when(post(Some("cust-1"), "   ", None))
        .then_expect_error(TaskError::EmptyMessage);
}

#[test]
fn titles_and_texts_are_validated() {
    assert!(TaskTitle::parse("").is_err());
    assert!(TaskTitle::parse(&"x".repeat(201)).is_err());
    assert!(MessageText::parse("line one\nline two").is_ok());
    assert!(MessageText::parse("bell\u{7}").is_err());
}

#[test]
fn portal_uploads_are_on_by_default_and_switching_records_only_changes() {
    assert!(Settings::default().portal_uploads_enabled());
    let off = SettingsEvent::PortalUploadsSet {
        tenant: acme(),
        enabled: false,
    };
    TestFramework::<Settings>::with(())
        .given_no_previous_events()
        .when(SettingsCommand::SetPortalUploads {
            tenant: acme(),
            enabled: false,
        })
        .then_expect_events(vec![off.clone()]);
    TestFramework::<Settings>::with(())
        .given(vec![off.clone()])
        .when(SettingsCommand::SetPortalUploads {
            tenant: acme(),
            enabled: false,
        })
        .then_expect_events(vec![]);
    TestFramework::<Settings>::with(())
        .given(vec![off])
        .when(SettingsCommand::SetPortalUploads {
            tenant: TenantId::parse("globex").unwrap(),
            enabled: true,
        })
        .then_expect_error(SettingsError::WrongTenant);
}
