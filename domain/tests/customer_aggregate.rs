//! Given/when/then tests of the `Customer` aggregate (erasure), without any IO.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use dossier_domain::types::*;
use dossier_domain::{
    Customer, CustomerCommand, CustomerError, CustomerEvent, EraseCustomer, erasure_confirmed,
};
use uuid::Uuid;

type CustomerTest = TestFramework<Customer>;

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, minute, 0).unwrap()
}

fn acme() -> TenantId {
    TenantId::parse("acme").unwrap()
}

fn cust(id: &str) -> CustomerId {
    CustomerId::parse(id).unwrap()
}

fn file(n: u128) -> FileId {
    FileId(Uuid::from_u128(n))
}

fn erase(confirmed: bool, erased: Vec<FileId>, kept: u64, minute: u32) -> CustomerCommand {
    CustomerCommand::Erase(EraseCustomer {
        tenant: acme(),
        customer_id: cust("cust-1"),
        confirmed,
        erased_files: erased,
        kept_protected_files: kept,
        at: at(minute),
    })
}

fn erased(erased: Vec<FileId>, kept: u64, minute: u32) -> CustomerEvent {
    CustomerEvent::CustomerErased {
        tenant: acme(),
        customer_id: cust("cust-1"),
        erased_files: erased,
        kept_protected_files: kept,
        erased_at: at(minute),
    }
}

#[test]
fn a_confirmed_erasure_records_the_erased_files_and_the_kept_count() {
    CustomerTest::with(())
        .given_no_previous_events()
        .when(erase(true, vec![file(1), file(2)], 1, 0))
        .then_expect_events(vec![erased(vec![file(1), file(2)], 1, 0)]);
}

#[test]
fn an_unconfirmed_erasure_is_refused_with_the_delete_confirmation_error() {
    CustomerTest::with(())
        .given_no_previous_events()
        .when(erase(false, vec![], 0, 0))
        .then_expect_error(CustomerError::ConfirmationRequired);
    assert_eq!(
        erasure_confirmed(false),
        Err(CustomerError::ConfirmationRequired)
    );
    assert_eq!(erasure_confirmed(true), Ok(()));
}

#[test]
fn a_second_erasure_is_recorded_too_with_what_is_new_since_the_first() {
    CustomerTest::with(())
        .given(vec![erased(vec![file(1)], 0, 0)])
        .when(erase(true, vec![file(3)], 0, 5))
        .then_expect_events(vec![erased(vec![file(3)], 0, 5)]);
}

#[test]
fn an_erasure_of_a_customer_with_nothing_left_is_still_recorded() {
    CustomerTest::with(())
        .given(vec![erased(vec![file(1)], 2, 0)])
        .when(erase(true, vec![], 2, 1))
        .then_expect_events(vec![erased(vec![], 2, 1)]);
}

#[test]
fn a_command_for_another_customer_than_the_aggregates_is_refused() {
    let other = CustomerCommand::Erase(EraseCustomer {
        tenant: TenantId::parse("globex").unwrap(),
        customer_id: cust("cust-1"),
        confirmed: true,
        erased_files: vec![],
        kept_protected_files: 0,
        at: at(1),
    });
    CustomerTest::with(())
        .given(vec![erased(vec![], 0, 0)])
        .when(other)
        .then_expect_error(CustomerError::WrongCustomer);
}

#[test]
fn the_aggregate_id_keeps_tenants_apart_and_the_event_its_contract_name() {
    assert_eq!(
        Customer::aggregate_id(&acme(), &cust("cust-1")),
        "acme/cust-1"
    );
    assert_ne!(
        Customer::aggregate_id(&acme(), &cust("cust-1")),
        Customer::aggregate_id(&TenantId::parse("globex").unwrap(), &cust("cust-1"))
    );
    assert_eq!(<Customer as cqrs_es::Aggregate>::TYPE, "customer");
    use cqrs_es::DomainEvent as _;
    assert_eq!(erased(vec![], 0, 0).event_type(), "CustomerErased");
    let json = serde_json::to_value(erased(vec![file(1)], 1, 0)).unwrap();
    assert_eq!(
        json["CustomerErased"]["erased_files"][0],
        Uuid::from_u128(1).to_string()
    );
    assert_eq!(json["CustomerErased"]["kept_protected_files"], 1);
}

#[test]
fn erasures_are_counted_as_they_are_applied() {
    use cqrs_es::Aggregate as _;
    let mut customer = Customer::default();
    assert_eq!(customer.erasures(), 0);
    customer.apply(erased(vec![], 0, 0));
    customer.apply(erased(vec![], 0, 1));
    assert_eq!(customer.erasures(), 2);
}
