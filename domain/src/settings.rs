//! The `Settings` aggregate: one per tenant (its id is the tenant id), holding
//! what the tenant decides for its portal. Today: whether customers may upload
//! files in the portal (on by default, as the seeds say).

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::types::TenantId;

#[derive(Debug, Clone, PartialEq)]
pub enum SettingsCommand {
    SetPortalUploads { tenant: TenantId, enabled: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SettingsEvent {
    PortalUploadsSet { tenant: TenantId, enabled: bool },
}

impl SettingsEvent {
    pub const PORTAL_UPLOADS_SET: &'static str = "PortalUploadsSet";
}

impl DomainEvent for SettingsEvent {
    fn event_type(&self) -> String {
        Self::PORTAL_UPLOADS_SET.to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The aggregate id is the tenant: a command for another tenant is a bug at the edge.
    #[error("settings belong to their own tenant")]
    WrongTenant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    tenant: Option<TenantId>,
    portal_uploads_enabled: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tenant: None,
            // The seeds: "it is on by default".
            portal_uploads_enabled: true,
        }
    }
}

impl Settings {
    pub fn portal_uploads_enabled(&self) -> bool {
        self.portal_uploads_enabled
    }
}

impl Aggregate for Settings {
    const TYPE: &'static str = "settings";
    type Command = SettingsCommand;
    type Event = SettingsEvent;
    type Error = SettingsError;
    type Services = ();

    async fn handle(
        &mut self,
        command: SettingsCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), SettingsError> {
        let SettingsCommand::SetPortalUploads { tenant, enabled } = command;
        if self.tenant.as_ref().is_some_and(|owner| owner != &tenant) {
            return Err(SettingsError::WrongTenant);
        }
        // Setting what is already set records nothing.
        if self.tenant.is_some() && self.portal_uploads_enabled == enabled {
            return Ok(());
        }
        sink.write(SettingsEvent::PortalUploadsSet { tenant, enabled }, self)
            .await;
        Ok(())
    }

    fn apply(&mut self, event: SettingsEvent) {
        let SettingsEvent::PortalUploadsSet { tenant, enabled } = event;
        self.tenant = Some(tenant);
        self.portal_uploads_enabled = enabled;
    }
}
