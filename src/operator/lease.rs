//! Leader election with a coordination.k8s.io Lease: one operator replica reconciles, the others
//! stand by. The decision is a pure function of the Lease and this replica's own monotonic clock
//! (when it saw the Lease last change; never another node's clock); the I/O is one get and one
//! optimistic-concurrency replace (or create) per attempt.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Why the lease could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {verb} the leader Lease {name}: {source}")]
pub struct LeaseError {
    verb: &'static str,
    name: String,
    #[source]
    source: kube::Error,
}

/// What this replica has seen of the Lease: the record and when (on this replica's own
/// monotonic clock) it first saw it as it is. Expiry is judged on that clock only, as
/// client-go does: a holder's renewals are told apart by their change, never by comparing the
/// `renewTime` another node's clock wrote with ours, so clock skew between nodes cannot make
/// two leaders.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    seen: Option<(Record, std::time::Instant)>,
}

/// The parts of a Lease a renewal or a takeover changes.
type Record = (
    Option<String>,
    Option<MicroTime>,
    Option<MicroTime>,
    Option<i32>,
);

impl LeaseWatch {
    /// Notes the lease as read at `at`; returns when this replica first saw it unchanged.
    pub fn observe(
        &mut self,
        lease: Option<&LeaseSpec>,
        at: std::time::Instant,
    ) -> std::time::Instant {
        let record: Record = lease.map_or((None, None, None, None), |l| {
            (
                l.holder_identity.clone(),
                l.renew_time.clone(),
                l.acquire_time.clone(),
                l.lease_transitions,
            )
        });
        match &self.seen {
            Some((r, since)) if *r == record => *since,
            _ => {
                self.seen = Some((record, at));
                at
            }
        }
    }
}

/// Whether `me` may take or keep the lease: it is free, ours, or its holder has not renewed it
/// for longer than its duration since this replica saw it last change (`unchanged_since`, on
/// this replica's clock, up to `now`).
pub fn may_lead(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged_since: std::time::Instant,
    now: std::time::Instant,
) -> bool {
    let Some(spec) = lease else {
        return true;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == me => true,
        Some(_) => {
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(0) as u64);
            now.saturating_duration_since(unchanged_since) > duration
        }
    }
}

/// The lease as `me` holds it at `now`.
fn held(previous: Option<&LeaseSpec>, me: &str, now: Timestamp, duration: Duration) -> LeaseSpec {
    let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(me);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: if ours {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..LeaseSpec::default()
    }
}

/// Takes or renews the lease; Ok(false) when another replica holds it (or won a race). `now`
/// is written as the renewal time (for people reading the Lease); expiry is judged by `watch`.
pub async fn try_lead(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
    now: Timestamp,
    watch: &mut LeaseWatch,
) -> Result<bool, LeaseError> {
    let err = |verb, source| LeaseError {
        verb,
        name: name.to_string(),
        source,
    };
    let current = api.get_opt(name).await.map_err(|e| err("read", e))?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let read_at = std::time::Instant::now();
    let since = watch.observe(spec, read_at);
    if !may_lead(spec, me, since, read_at) {
        return Ok(false);
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            resource_version: current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(held(spec, me, now, duration)),
    };
    let written = match current {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => api.replace(name, &PostParams::default(), &lease).await,
    };
    match written {
        Ok(_) => Ok(true),
        // Someone else wrote it first: they lead this round.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(err("write", e)),
    }
}

/// The label the leading replica carries on its pod; the operator's Service selects it, so the
/// status page, `/api/gateways` and Slack's button presses reach the replica that reconciles
/// (a standby holds no gateways: a press it took would wait there for nobody).
pub const ROLE_LABEL: &str = "apitree.io/role";

/// Marks this replica's pod as the leader (`leader`) or clears the mark (a process that starts,
/// in a pod an earlier leading process may have marked, stands by first).
pub async fn mark_pod(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    pod: &str,
    leader: bool,
) -> Result<(), kube::Error> {
    let value = if leader {
        serde_json::Value::from("leader")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {ROLE_LABEL: value}}});
    pods.patch(
        pod,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + s).unwrap()
    }

    fn lease(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(renewed))),
            ..LeaseSpec::default()
        }
    }

    /// Seconds after a fixed instant of this replica's monotonic clock.
    fn local(base: std::time::Instant, s: u64) -> std::time::Instant {
        base + Duration::from_secs(s)
    }

    #[test]
    fn a_free_or_own_lease_may_be_taken_a_live_foreign_one_may_not() {
        let base = std::time::Instant::now();
        let mut watch = LeaseWatch::default();
        let b = lease("b", 0);
        let since = watch.observe(Some(&b), local(base, 0));
        assert!(may_lead(None, "a", since, local(base, 0)));
        assert!(may_lead(Some(&lease("a", 0)), "a", since, local(base, 5)));
        assert!(!may_lead(Some(&b), "a", since, local(base, 10)));
        assert!(!may_lead(Some(&b), "a", since, local(base, 15)));
        assert!(may_lead(Some(&b), "a", since, local(base, 16)));
    }

    /// Expiry counts from when this replica saw the lease change, whatever time the holder's
    /// clock wrote: a holder whose clock runs an hour behind (or ahead) keeps its lease while
    /// it renews, and loses it 15 s after its renewals stop, as seen here.
    #[test]
    fn clock_skew_between_nodes_never_makes_two_leaders() {
        let base = std::time::Instant::now();
        for skew in [-3600, -20, 0, 20, 3600] {
            let mut watch = LeaseWatch::default();
            // The holder renews every 5 s of our clock, writing its own (skewed) time.
            for tick in 0..10u64 {
                let renewed = lease("b", tick as i64 * 5 + skew);
                let now = local(base, tick * 5 + 1);
                let since = watch.observe(Some(&renewed), now);
                assert!(
                    !may_lead(Some(&renewed), "a", since, now),
                    "skew {skew}s: taken from a live holder at tick {tick}"
                );
            }
            // It stops renewing: the last record stays as it was.
            let last = lease("b", 45 + skew);
            let since = watch.observe(Some(&last), local(base, 46));
            assert!(!may_lead(Some(&last), "a", since, local(base, 46 + 15)));
            assert!(
                may_lead(Some(&last), "a", since, local(base, 46 + 16)),
                "skew {skew}s"
            );
        }
    }

    #[test]
    fn taking_over_counts_a_transition_renewing_does_not() {
        let taken = held(Some(&lease("b", 0)), "a", t(20), Duration::from_secs(15));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(MicroTime(t(20))));
        let renewed = held(Some(&taken), "a", t(25), Duration::from_secs(15));
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, Some(MicroTime(t(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(t(25))));
    }

    /// The leader's mark is one merge patch of its own pod's labels; clearing it sets the label
    /// to null (removed), touching nothing else of the pod.
    #[tokio::test]
    async fn the_leader_marks_its_pod_and_a_starting_process_clears_the_mark() {
        use http_body_util::BodyExt;
        let (svc, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(kube::Client::new(svc, "ops"), "ops");
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (req, send) = handle.next_request().await.expect("a call");
                let what = (
                    req.method().to_string(),
                    req.uri().path().to_string(),
                    req.headers()["content-type"].to_str().unwrap().to_string(),
                );
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                seen.push((what, body));
                let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "apitree-0"}});
                send.send_response(
                    http::Response::builder()
                        .body(kube::client::Body::from(serde_json::to_vec(&pod).unwrap()))
                        .unwrap(),
                );
            }
            seen
        });
        mark_pod(&pods, "apitree-0", true).await.unwrap();
        mark_pod(&pods, "apitree-0", false).await.unwrap();
        let seen = server.await.unwrap();
        let call = (
            "PATCH".to_string(),
            "/api/v1/namespaces/ops/pods/apitree-0".to_string(),
            "application/merge-patch+json".to_string(),
        );
        assert_eq!(
            seen,
            [
                (
                    call.clone(),
                    serde_json::json!({"metadata": {"labels": {"apitree.io/role": "leader"}}})
                ),
                (
                    call,
                    serde_json::json!({"metadata": {"labels": {"apitree.io/role": null}}})
                ),
            ]
        );
    }
}
