//! Downloads as facts in the log: every time bytes leave the system, by
//! anyone, one `FileDownloaded` event says who took which file, through which
//! door (CONTRACT.md rule 9: every download is in the audit trail).
//!
//! A download is its own aggregate (one per request, a fresh id), so recording
//! it never races with commands on the file itself.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types::{CustomerId, FileId, TenantId};

/// Through which door the bytes left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadChannel {
    /// `GET /v1/files/{id}/content` (staff).
    Staff,
    /// `GET /v1/portal/files/{id}/content` (the customer).
    Portal,
    /// One file of a ZIP bundle.
    Bundle,
}

/// One file of a download request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownloadedFile {
    pub file_id: FileId,
    pub customer_id: CustomerId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecordDownload {
    pub tenant: TenantId,
    pub channel: DownloadChannel,
    pub bundle_id: Option<Uuid>,
    pub files: Vec<DownloadedFile>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DownloadEvent {
    FileDownloaded {
        tenant: TenantId,
        file_id: FileId,
        customer_id: CustomerId,
        channel: DownloadChannel,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bundle_id: Option<Uuid>,
        at: DateTime<Utc>,
    },
}

impl DownloadEvent {
    pub const FILE_DOWNLOADED: &'static str = "FileDownloaded";
}

impl DomainEvent for DownloadEvent {
    fn event_type(&self) -> String {
        Self::FILE_DOWNLOADED.to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownloadError {
    #[error("this download was already recorded")]
    AlreadyRecorded,
    #[error("a download names at least one file")]
    NoFiles,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Download {
    recorded: bool,
}

impl Aggregate for Download {
    const TYPE: &'static str = "download";
    type Command = RecordDownload;
    type Event = DownloadEvent;
    type Error = DownloadError;
    type Services = ();

    async fn handle(
        &mut self,
        command: RecordDownload,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), DownloadError> {
        if self.recorded {
            return Err(DownloadError::AlreadyRecorded);
        }
        if command.files.is_empty() {
            return Err(DownloadError::NoFiles);
        }
        for file in command.files {
            let event = DownloadEvent::FileDownloaded {
                tenant: command.tenant.clone(),
                file_id: file.file_id,
                customer_id: file.customer_id,
                channel: command.channel,
                bundle_id: command.bundle_id,
                at: command.at,
            };
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: DownloadEvent) {
        match event {
            DownloadEvent::FileDownloaded { .. } => self.recorded = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn file(n: u128) -> DownloadedFile {
        DownloadedFile {
            file_id: FileId(Uuid::from_u128(n)),
            customer_id: CustomerId::parse("cust-1").unwrap(),
        }
    }

    fn command(files: Vec<DownloadedFile>) -> RecordDownload {
        RecordDownload {
            tenant: TenantId::parse("acme").unwrap(),
            channel: DownloadChannel::Bundle,
            bundle_id: Some(Uuid::from_u128(9)),
            files,
            at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_bundle_download_records_one_event_per_file() {
        let result = TestFramework::<Download>::with(())
            .given_no_previous_events()
            .when(command(vec![file(1), file(2)]))
            .inspect_result()
            .unwrap();
        assert_eq!(result.len(), 2);
    }

    #[test]
    fn a_download_is_recorded_once() {
        let first = TestFramework::<Download>::with(())
            .given_no_previous_events()
            .when(command(vec![file(1)]))
            .inspect_result()
            .unwrap();
        TestFramework::<Download>::with(())
            .given(first)
            .when(command(vec![file(1)]))
            .then_expect_error(DownloadError::AlreadyRecorded);
    }
}
