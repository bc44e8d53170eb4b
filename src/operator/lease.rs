//! Leader election with a coordination.k8s.io Lease: one operator replica reconciles, the others
//! stand by. The decision is a pure function of the Lease and the clock; the I/O is one get and
//! one optimistic-concurrency replace (or create) per attempt.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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

/// Whether `me` may take or keep the lease at `now`: it is free, ours, or its holder stopped
/// renewing it for longer than its duration.
pub fn may_lead(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = lease else {
        return true;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == me => true,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64);
            match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
                Some(MicroTime(renewed)) => now.duration_since(*renewed) > duration,
                None => true,
            }
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

/// Takes or renews the lease; Ok(false) when another replica holds it (or won a race).
pub async fn try_lead(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
    now: Timestamp,
) -> Result<bool, LeaseError> {
    let err = |verb, source| LeaseError {
        verb,
        name: name.to_string(),
        source,
    };
    let current = api.get_opt(name).await.map_err(|e| err("read", e))?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    if !may_lead(spec, me, now) {
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

    #[test]
    fn a_free_or_own_lease_may_be_taken_a_live_foreign_one_may_not() {
        assert!(may_lead(None, "a", t(0)));
        assert!(may_lead(Some(&lease("a", 0)), "a", t(5)));
        assert!(!may_lead(Some(&lease("b", 0)), "a", t(10)));
        assert!(!may_lead(Some(&lease("b", 0)), "a", t(15)));
    }

    #[test]
    fn a_lease_its_holder_stopped_renewing_expires() {
        assert!(may_lead(Some(&lease("b", 0)), "a", t(16)));
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
}
