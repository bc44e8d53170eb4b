//! The CredentialPolicy controller's Kubernetes writes: reminder and rotation Events, a rotated
//! key stored in the policy namespace's Secret, and the status (server-side apply). Nothing else
//! in the controller writes to the API.

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::Client;

use crate::crd::credential_policy::ROTATED_KEYS_SECRET;
use crate::crd::credential_policy::{CredentialPolicy, CredentialPolicyStatus};
use crate::platform::kube::apply_status;

/// Publishes Events on a policy, each note cut to what the API accepts. A failed publication is
/// logged, never fatal: the status and Slack carry the same facts.
pub async fn publish_events(
    client: &Client,
    reporter: &Reporter,
    policy: &ObjectReference,
    action: &str,
    events: Vec<(EventType, String, String)>,
) {
    let recorder = Recorder::new(client.clone(), reporter.clone());
    for (type_, reason, note) in events {
        let event = KubeEvent {
            type_,
            reason,
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, policy).await {
            let name = policy.name.as_deref().unwrap_or_default();
            tracing::warn!(policy = %name, "cannot publish an Event: {e}");
        }
    }
}

/// Stores a new key in the namespace's [`ROTATED_KEYS_SECRET`] under its prefix, with an
/// annotation saying what it replaces (a merge patch: the other keys stay).
pub async fn store_rotated_key(
    client: &Client,
    ns: &str,
    new_prefix: &str,
    secret: &[u8],
    annotation: String,
) -> Result<(), kube::Error> {
    use base64::Engine;
    let patch = serde_json::json!({
        "metadata": {"annotations": {format!("apitree.io/rotated.{new_prefix}"): annotation}},
        "data": {new_prefix: base64::engine::general_purpose::STANDARD.encode(secret)},
    });
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            ROTATED_KEYS_SECRET,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
}

/// Writes a policy's whole status with server-side apply.
pub async fn write_status(
    client: &Client,
    policy: &CredentialPolicy,
    status: &CredentialPolicyStatus,
) -> Result<(), kube::Error> {
    apply_status(client, policy, status).await
}
