//! Status conditions in the Kubernetes API convention.
//!
//! `lastTransitionTime` moves only when `status` really changes, so `kubectl wait` and humans can
//! trust it; reason, message and observedGeneration are refreshed on every write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The three values a condition's `status` may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// Inserts or updates the condition `type_` in `conditions`.
///
/// Returns true when the status changed (a real transition), which is when callers emit an Event.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let transitioned = existing.status != status;
            if transitioned {
                existing.last_transition_time = Time(now);
                existing.status = status.to_string();
            }
            existing.reason = reason.to_string();
            existing.message = message.to_string();
            existing.observed_generation = observed_generation;
            transitioned
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t0 = Timestamp::from_second(1_767_225_600).unwrap();
        let t1 = Timestamp::from_second(1_767_225_900).unwrap();
        let t2 = Timestamp::from_second(1_767_226_140).unwrap();
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            "Ready",
            ConditionStatus::False,
            "Gating",
            "2/5",
            Some(1),
            t0
        ));
        assert!(!set_condition(
            &mut conds,
            "Ready",
            ConditionStatus::False,
            "Gating",
            "4/5",
            Some(2),
            t1
        ));
        assert_eq!(conds[0].last_transition_time.0, t0);
        assert_eq!(conds[0].message, "4/5");
        assert_eq!(conds[0].observed_generation, Some(2));
        assert!(set_condition(
            &mut conds,
            "Ready",
            ConditionStatus::True,
            "Promoted",
            "5/5",
            Some(2),
            t2
        ));
        assert_eq!(conds[0].last_transition_time.0, t2);
        assert_eq!(conds.len(), 1);
    }
}
