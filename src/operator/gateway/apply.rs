//! The ApiGateway controller's Kubernetes writes: the Events of a pass and the status, written
//! with server-side apply. The children (Deployments, Services) are written by
//! `crate::platform::kube`; nothing else in the gateway controller writes to the API.

use std::time::Duration;

use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use super::rollout::GatewayEvent;
use crate::crd::gateway::{ApiGateway, ApiGatewayStatus};
use crate::platform::kube::apply_status;

/// Attempts at writing a pass's status (250 ms, then 1 s apart) before the pass fails.
const STATUS_WRITE_ATTEMPTS: u32 = 3;

/// Whether a failed API call may succeed if made again: a server error, a rate limit, a
/// conflict, a timeout, or no answer at all.
fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429 || s.code == 409,
        _ => true,
    }
}

/// Publishes a pass's Events on the gateway. A failed publication is logged, never fatal: the
/// status carries the same facts.
pub async fn publish_events(
    client: &Client,
    reporter: &Reporter,
    obj: &ApiGateway,
    events: Vec<GatewayEvent>,
) {
    let recorder = Recorder::new(client.clone(), reporter.clone());
    let reference = obj.object_ref(&());
    for e in events {
        let event = KubeEvent {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(e.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            tracing::warn!(gateway = %obj.name_any(), "cannot publish an Event: {err}");
        }
    }
}

/// Writes the whole status with server-side apply, retrying transient failures: a retry needs
/// no re-read to be right.
pub async fn write_status(
    client: &Client,
    obj: &ApiGateway,
    status: &ApiGatewayStatus,
) -> Result<(), kube::Error> {
    let mut attempt = 0;
    loop {
        let Err(source) = apply_status(client, obj, status).await else {
            return Ok(());
        };
        attempt += 1;
        if attempt == STATUS_WRITE_ATTEMPTS || !retryable(&source) {
            return Err(source);
        }
        tokio::time::sleep(Duration::from_millis(250 << (2 * (attempt - 1)))).await;
    }
}
