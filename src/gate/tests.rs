//! The gate without I/O: a tiny simulated world answers the machine's actions.

use super::*;
use crate::crd::duration::KubeDuration;

const A: &str = "rev-a";
const B: &str = "rev-b";

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// A simulated platform and prober that obey the machine's actions.
struct World {
    status: ApiGatewayStatus,
    spec: GateSpec,
    obs: Observations,
    /// What each probe answers.
    probe_answer: fn(GateCheck) -> CheckPhase,
    /// Traffic the analysis window reports for green (blue always serves 1000 clean requests).
    green_traffic: Traffic,
    instances: u32,
    /// Replicas a deploy makes ready (all of them unless set).
    deploy_ready: Option<i32>,
    /// Agent pools' traffic the analysis window reports.
    pools: Vec<PoolTraffic>,
    log: Vec<Action>,
}

impl World {
    fn new(auto_promote: bool) -> Self {
        Self {
            status: ApiGatewayStatus::default(),
            spec: GateSpec {
                auto_promote,
                observation_window: KubeDuration::from_secs(60),
                rollout_deadline: KubeDuration::from_secs(120),
                rollback_window: KubeDuration::from_secs(600),
                min_samples: 100,
                ..GateSpec::default()
            },
            obs: Observations {
                desired: A.into(),
                replicas: 2,
                ..Observations::default()
            },
            probe_answer: |c| {
                if c == GateCheck::Schema {
                    CheckPhase::Skipped
                } else {
                    CheckPhase::Passed
                }
            },
            green_traffic: Traffic {
                requests: 500,
                errors: 1,
                p99_ms: Some(10.0),
            },
            instances: 0,
            deploy_ready: None,
            pools: Vec::new(),
            log: Vec::new(),
        }
    }

    fn slot(&mut self, c: Color) -> &mut Option<ColorObservation> {
        match c {
            Color::Blue => &mut self.obs.blue,
            Color::Green => &mut self.obs.green,
        }
    }

    /// One controller pass: step, perform actions (deploys become ready at once), step again
    /// while probes were answered.
    fn tick(&mut self, now: Timestamp) -> Vec<Action> {
        let mut all = Vec::new();
        for _ in 0..10 {
            let (status, actions) = step(&self.status, &self.spec, &self.obs, now);
            self.status = status;
            let mut again = false;
            self.obs.probe = None;
            for a in &actions {
                match a {
                    Action::Deploy { color, revision } => {
                        self.instances += 1;
                        let replicas = self.obs.replicas;
                        let ready = self.deploy_ready.unwrap_or(replicas);
                        let instance = format!("i{}", self.instances);
                        *self.slot(*color) = Some(ColorObservation {
                            revision: revision.clone(),
                            ready,
                            replicas,
                            instance,
                        });
                        again = true;
                    }
                    Action::ScaleDown { color } => *self.slot(*color) = None,
                    Action::Probe(check) => {
                        self.obs.probe = Some(ProbeResult {
                            check: *check,
                            revision: self.obs.desired.clone(),
                            phase: (self.probe_answer)(*check),
                            observed: Some("observed".into()),
                            threshold: None,
                            samples: None,
                            reason: format!("{} said so", check.as_str()),
                        });
                        again = true;
                    }
                    Action::StartAnalysis => {
                        self.obs.analysis = Some(AnalysisWindow {
                            revision: self.obs.desired.clone(),
                            active: Traffic {
                                requests: 1000,
                                errors: 2,
                                p99_ms: Some(10.0),
                            },
                            preview: self.green_traffic.clone(),
                            pools: self.pools.clone(),
                        })
                    }
                    Action::Switch { .. } | Action::Notify(_) => {}
                }
            }
            all.extend(actions);
            if !again {
                break;
            }
        }
        self.log.extend(all.clone());
        all
    }

    fn phase(&self) -> GatewayPhase {
        self.status.phase.unwrap()
    }

    fn checks(&self) -> Vec<(String, CheckPhase)> {
        self.status
            .gate
            .as_ref()
            .map(|g| g.checks.iter().map(|c| (c.name.clone(), c.phase)).collect())
            .unwrap_or_default()
    }

    /// A world with revision A serving on blue.
    fn serving_a(auto_promote: bool) -> Self {
        let mut w = Self::new(auto_promote);
        w.tick(t(0));
        w.tick(t(1));
        assert_eq!(w.phase(), GatewayPhase::Stable);
        w
    }
}

fn switches(actions: &[Action]) -> Vec<Color> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Switch { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

fn notices(actions: &[Action]) -> Vec<NoticeKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.kind),
            _ => None,
        })
        .collect()
}

#[test]
fn first_deploy_serves_blue_once_ready() {
    let mut w = World::new(true);
    w.deploy_ready = Some(1);
    let first = w.tick(t(0));
    assert!(first.contains(&Action::Deploy {
        color: Color::Blue,
        revision: A.into()
    }));
    assert!(switches(&first).is_empty(), "1/2 ready must not serve");
    assert_eq!(w.phase(), GatewayPhase::Progressing);
    w.obs.blue.as_mut().unwrap().ready = 2;
    let second = w.tick(t(1));
    assert_eq!(switches(&second), vec![Color::Blue]);
    assert_eq!(notices(&second), vec![NoticeKind::Deployed]);
    assert_eq!(w.status.active_revision.as_deref(), Some(A));
    assert_eq!(w.phase(), GatewayPhase::Stable);
    // Nothing more to do.
    assert!(w.tick(t(2)).is_empty());
}

#[test]
fn a_good_revision_passes_five_checks_switches_and_settles() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    let started = w.tick(t(10));
    assert!(started.contains(&Action::Deploy {
        color: Color::Green,
        revision: B.into()
    }));
    assert_eq!(w.phase(), GatewayPhase::Gating);
    assert_eq!(w.status.preview_revision.as_deref(), Some(B));
    // Rollout, health, schema (skipped: no database), smoke done; analysis observing.
    let gate = w.status.gate.clone().unwrap();
    assert_eq!(gate.progress, "4/5");
    assert_eq!(gate.checks[4].phase, CheckPhase::Running);
    assert_eq!(gate.revision, B);
    // Half the window: still observing, no switch.
    assert!(switches(&w.tick(t(40))).is_empty());
    let done = w.tick(t(71));
    assert_eq!(switches(&done), vec![Color::Green]);
    assert_eq!(w.phase(), GatewayPhase::Promoting);
    assert_eq!(w.status.gate.as_ref().unwrap().progress, "5/5");
    assert_eq!(w.status.active_color, Some(Color::Green));
    assert_eq!(w.status.previous_revision.as_deref(), Some(A));
    let analysis = &w.status.gate.as_ref().unwrap().checks[4];
    assert_eq!(analysis.samples, Some(500));
    assert!(analysis.p_value.is_some());
    assert!(analysis.observed.as_ref().unwrap().contains("green 0.20%"));
    // Blue stays warm through the rollback window, then goes.
    assert!(w.tick(t(300)).is_empty());
    assert!(w.obs.blue.is_some());
    let settled = w.tick(t(71 + 600));
    assert!(settled.contains(&Action::ScaleDown { color: Color::Blue }));
    assert_eq!(w.phase(), GatewayPhase::Stable);
    assert!(w.obs.blue.is_none());
    assert_eq!(w.status.previous_revision, None);
}

#[test]
fn a_failing_smoke_check_refuses_the_revision_until_the_spec_changes() {
    let mut w = World::serving_a(true);
    w.probe_answer = |c| match c {
        GateCheck::Smoke => CheckPhase::Failed,
        _ => CheckPhase::Passed,
    };
    w.obs.desired = B.into();
    let actions = w.tick(t(10));
    assert!(switches(&actions).is_empty());
    assert!(actions.contains(&Action::ScaleDown {
        color: Color::Green
    }));
    assert_eq!(w.phase(), GatewayPhase::Rejected);
    let rejected = w.status.rejected_revision.clone().unwrap();
    assert_eq!(rejected.revision, B);
    assert_eq!(rejected.reason, "smoke check failed: smoke said so");
    assert_eq!(w.status.active_revision.as_deref(), Some(A));
    assert_eq!(w.checks()[3], ("smoke".into(), CheckPhase::Failed));
    assert_eq!(w.checks()[4], ("analysis".into(), CheckPhase::Pending));
    // Not retried while the spec still asks for B.
    assert!(w.tick(t(20)).is_empty());
    // A new spec gates again.
    w.obs.desired = "rev-c".into();
    w.probe_answer = |_| CheckPhase::Passed;
    let again = w.tick(t(30));
    assert!(again.contains(&Action::Deploy {
        color: Color::Green,
        revision: "rev-c".into()
    }));
}

#[test]
fn too_little_traffic_is_inconclusive_and_waits_for_a_human_even_with_auto_promote() {
    let mut w = World::serving_a(true);
    w.green_traffic = Traffic {
        requests: 12,
        errors: 0,
        p99_ms: Some(9.0),
    };
    w.obs.desired = B.into();
    w.tick(t(10));
    let actions = w.tick(t(71));
    assert!(
        switches(&actions).is_empty(),
        "inconclusive must never switch"
    );
    assert_eq!(w.phase(), GatewayPhase::AwaitingApproval);
    assert_eq!(w.checks()[4].1, CheckPhase::Inconclusive);
    assert_eq!(notices(&actions), vec![NoticeKind::AwaitingApproval]);
    assert_eq!(w.status.gate.as_ref().unwrap().progress, "4/5");
    // Waiting does not repeat the notice.
    assert!(w.tick(t(100)).is_empty());
    // An approval for another revision is ignored; one for B switches.
    w.obs.promote = Some(Request {
        revision: "rev-other".into(),
        by: "annotation".into(),
    });
    assert!(switches(&w.tick(t(110))).is_empty());
    w.obs.promote = Some(Request {
        revision: B.into(),
        by: "slack:alice".into(),
    });
    let promoted = w.tick(t(120));
    assert_eq!(switches(&promoted), vec![Color::Green]);
    let Action::Notify(n) = promoted.last().unwrap() else {
        panic!()
    };
    assert!(
        n.reason.starts_with("promoted by slack:alice"),
        "{}",
        n.reason
    );
}

#[test]
fn without_auto_promote_five_passes_wait_for_the_annotation() {
    let mut w = World::serving_a(false);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.tick(t(71));
    assert_eq!(w.phase(), GatewayPhase::AwaitingApproval);
    assert_eq!(w.status.gate.as_ref().unwrap().progress, "5/5");
    w.obs.promote = Some(Request {
        revision: B.into(),
        by: "annotation".into(),
    });
    assert_eq!(switches(&w.tick(t(80))), vec![Color::Green]);
}

#[test]
fn a_rejection_from_slack_while_waiting_refuses_the_revision() {
    let mut w = World::serving_a(false);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.tick(t(71));
    w.obs.rollback = Some(Request {
        revision: B.into(),
        by: "slack:bob".into(),
    });
    let actions = w.tick(t(80));
    assert!(switches(&actions).is_empty());
    assert_eq!(w.phase(), GatewayPhase::Rejected);
    assert_eq!(
        w.status.rejected_revision.as_ref().unwrap().reason,
        "rejected by slack:bob"
    );
}

#[test]
fn approval_after_a_rollout_timeout_does_not_switch() {
    let mut w = World::serving_a(true);
    // Green never becomes fully ready.
    w.deploy_ready = Some(1);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.tick(t(60));
    assert_eq!(w.phase(), GatewayPhase::Gating);
    assert_eq!(w.checks()[0].1, CheckPhase::Running);
    let timed_out = w.tick(t(131));
    assert_eq!(w.phase(), GatewayPhase::Rejected);
    assert_eq!(notices(&timed_out), vec![NoticeKind::Rejected]);
    assert!(w
        .status
        .rejected_revision
        .as_ref()
        .unwrap()
        .reason
        .contains("only 1/2 replicas ready after 2m"));
    w.obs.promote = Some(Request {
        revision: B.into(),
        by: "annotation".into(),
    });
    assert!(switches(&w.tick(t(200))).is_empty());
    assert_eq!(w.status.active_revision.as_deref(), Some(A));
}

#[test]
fn a_green_restart_mid_gate_restarts_the_checks() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.tick(t(10));
    assert_eq!(w.status.gate.as_ref().unwrap().progress, "4/5");
    w.obs.green.as_mut().unwrap().instance = "restarted".into();
    let actions = w.tick(t(30));
    assert!(switches(&actions).is_empty());
    let gate = w.status.gate.clone().unwrap();
    assert!(gate.checks[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("green restarted"));
    // Next pass re-checks everything against the new instance; the window starts over.
    w.obs.analysis = None;
    w.tick(t(31));
    assert_eq!(
        w.status.gate.as_ref().unwrap().instance.as_deref(),
        Some("restarted")
    );
    assert!(
        switches(&w.tick(t(80))).is_empty(),
        "window restarted at 31s"
    );
    assert_eq!(switches(&w.tick(t(92))), vec![Color::Green]);
}

#[test]
fn an_operator_restart_mid_gate_resumes_from_status_without_a_double_switch() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.tick(t(10));
    // The operator dies; a new one reads the status back from the API server. Its analysis
    // counters are gone, so the window starts over rather than passing on a partial one.
    let stored = serde_json::to_string(&w.status).unwrap();
    w.status = serde_json::from_str(&stored).unwrap();
    w.obs.analysis = None;
    let resumed = w.tick(t(40));
    assert!(!resumed
        .iter()
        .any(|a| matches!(a, Action::Deploy { .. } | Action::Probe(_))));
    assert_eq!(resumed, vec![Action::StartAnalysis]);
    assert_eq!(switches(&w.tick(t(101))), vec![Color::Green]);
    // Killed right after the switch: the restarted operator sees Promoting and does not switch
    // again.
    let stored = serde_json::to_string(&w.status).unwrap();
    w.status = serde_json::from_str(&stored).unwrap();
    assert!(switches(&w.tick(t(102))).is_empty());
    assert_eq!(w.status.active_color, Some(Color::Green));
}

#[test]
fn a_critical_incident_inside_the_rollback_window_switches_back() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.tick(t(71));
    w.obs.critical_incident = Some("error ratio on route weather at 12.0x baseline".into());
    let actions = w.tick(t(200));
    assert_eq!(switches(&actions), vec![Color::Blue]);
    assert!(actions.contains(&Action::ScaleDown {
        color: Color::Green
    }));
    assert_eq!(notices(&actions), vec![NoticeKind::RolledBack]);
    assert_eq!(w.phase(), GatewayPhase::RolledBack);
    assert_eq!(w.status.active_revision.as_deref(), Some(A));
    assert!(w
        .status
        .rejected_revision
        .as_ref()
        .unwrap()
        .reason
        .contains("critical incident inside the rollback window"));
    // The spec still says B: not retried.
    assert!(switches(&w.tick(t(300))).is_empty());
}

#[test]
fn no_automatic_rollback_after_the_window() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.tick(t(71));
    w.obs.critical_incident = Some("error ratio at 12x".into());
    let actions = w.tick(t(71 + 601));
    assert!(switches(&actions).is_empty());
    assert_eq!(notices(&actions), vec![NoticeKind::Settled]);
    assert_eq!(w.phase(), GatewayPhase::Stable);
    assert_eq!(w.status.active_revision.as_deref(), Some(B));
}

#[test]
fn the_rollback_annotation_switches_back_inside_the_window() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.tick(t(71));
    w.obs.rollback = Some(Request {
        revision: B.into(),
        by: "annotation".into(),
    });
    assert_eq!(switches(&w.tick(t(90))), vec![Color::Blue]);
    assert_eq!(
        w.status.rejected_revision.as_ref().unwrap().reason,
        "rolled back by annotation"
    );
}

#[test]
fn a_spec_change_mid_gate_cancels_the_checks_and_gates_the_new_revision() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.tick(t(10));
    w.obs.desired = "rev-c".into();
    w.obs.analysis = None;
    let actions = w.tick(t(20));
    assert_eq!(notices(&actions)[0], NoticeKind::Cancelled);
    assert!(actions.contains(&Action::Deploy {
        color: Color::Green,
        revision: "rev-c".into()
    }));
    assert_eq!(w.status.gate.as_ref().unwrap().revision, "rev-c");
    // Reverting the spec to the active revision cancels the gate and scales green down.
    w.obs.desired = A.into();
    let reverted = w.tick(t(30));
    assert!(reverted.contains(&Action::ScaleDown {
        color: Color::Green
    }));
    assert_eq!(w.phase(), GatewayPhase::Stable);
    let gate = w.status.gate.as_ref().unwrap();
    assert!(gate
        .checks
        .iter()
        .all(|c| c.phase != CheckPhase::Running && c.phase != CheckPhase::Pending));
    assert!(gate.checks[4]
        .reason
        .as_deref()
        .unwrap()
        .starts_with("cancelled"));
    assert_eq!(gate.checks[4].phase, CheckPhase::Cancelled);
}

fn agent(name: &str, state: CandidateState) -> AgentCandidate {
    AgentCandidate {
        name: name.into(),
        state,
    }
}

fn running(ready: bool, smoke: &[(&str, bool)]) -> CandidateState {
    CandidateState::Running {
        ready,
        not_ready: (!ready).then(|| "degraded (rate-limit store degraded)".into()),
        smoke: smoke
            .iter()
            .map(|(name, passed)| AgentSmoke {
                name: name.to_string(),
                passed: *passed,
                detail: if *passed {
                    "got 401, expected 401"
                } else {
                    "got 200, expected 401"
                }
                .into(),
            })
            .collect(),
    }
}

/// Every way an agent can answer a candidate, and the check it decides: agents that
/// run it, ready, with passing probes let the gate promote; a refusal fails rollout, an
/// unready candidate health, a failed probe smoke, and an agent that never answers fails the
/// check it is awaited in once `rolloutDeadline` has passed — never a pass.
#[test]
fn the_agents_candidates_decide_rollout_health_and_smoke() {
    let good = || running(true, &[("no-key-is-refused", true), ("balance", true)]);
    type Case = (
        &'static str,
        Vec<CandidateState>,
        Option<(&'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        ("all good", vec![good(), good()], None),
        (
            "one refuses",
            vec![
                good(),
                CandidateState::Refused("routes[1] (cards): no upstream".into()),
            ],
            Some((
                "rollout",
                "agent bank-a-2 refused the candidate configuration: routes[1] (cards)",
            )),
        ),
        (
            "one never answers",
            vec![good(), CandidateState::Waiting],
            Some((
                "rollout",
                "1/2 agent(s) awaited (running the candidate): bank-a-2",
            )),
        ),
        (
            "one is not ready",
            vec![running(false, &[("no-key-is-refused", true)]), good()],
            Some((
                "health",
                "agent bank-a-1's candidate is not ready: degraded",
            )),
        ),
        (
            "a probe fails",
            vec![good(), running(true, &[("no-key-is-refused", false)])],
            Some((
                "smoke",
                "agent bank-a-2's probe no-key-is-refused: got 200, expected 401",
            )),
        ),
        (
            "probes never reported",
            vec![good(), running(true, &[])],
            Some(("smoke", "(their smoke probes): bank-a-2")),
        ),
    ];
    for (what, states, fails) in cases {
        let mut w = World::serving_a(true);
        w.obs.desired = B.into();
        w.obs.agents = states
            .into_iter()
            .enumerate()
            .map(|(i, s)| agent(&format!("bank-a-{}", i + 1), s))
            .collect();
        let before = w.log.len();
        for at in [10, 100, 200, 400] {
            w.tick(t(at));
        }
        let switched = switches(&w.log[before..]);
        let gate = w.status.gate.clone().unwrap();
        match fails {
            None => {
                assert_eq!(switched, vec![Color::Green], "{what}");
                assert!(
                    gate.checks[0]
                        .observed
                        .as_deref()
                        .unwrap()
                        .contains("2/2 agent(s) run the candidate"),
                    "{what}: {:?}",
                    gate.checks[0]
                );
                assert!(gate.checks[3]
                    .observed
                    .as_deref()
                    .unwrap()
                    .contains("2/2 agent(s)' smoke probes passed"));
            }
            Some((check, reason)) => {
                assert_eq!(w.phase(), GatewayPhase::Rejected, "{what}");
                assert_eq!(switched, vec![], "{what}");
                let c = gate.checks.iter().find(|c| c.name == check).unwrap();
                assert_eq!(c.phase, CheckPhase::Failed, "{what}: {:?}", gate.checks);
                let why = c.reason.as_deref().unwrap();
                assert!(why.contains(reason), "{what}: {why}");
            }
        }
    }
}

/// An agent that is still starting the candidate holds the check back, and once it runs it
/// the gate goes on; agents never count for a revision that does not change their pool (the
/// controller lists none).
#[test]
fn a_slow_agent_holds_the_gate_until_it_answers() {
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.obs.agents = vec![agent("bank-a-1", CandidateState::Waiting)];
    w.tick(t(10));
    w.tick(t(60));
    let gate = w.status.gate.clone().unwrap();
    assert_eq!(gate.checks[0].phase, CheckPhase::Running);
    assert!(gate.checks[0]
        .observed
        .as_deref()
        .unwrap()
        .contains("awaited"));
    w.obs.agents = vec![agent("bank-a-1", running(true, &[]))];
    w.tick(t(70));
    let gate = w.status.gate.clone().unwrap();
    assert_eq!(gate.checks[0].phase, CheckPhase::Passed);
    assert_eq!(
        gate.checks[3].phase,
        CheckPhase::Running,
        "smoke awaits the agent's probes"
    );
    w.obs.agents = vec![agent(
        "bank-a-1",
        running(true, &[("no-key-is-refused", true)]),
    )];
    w.tick(t(80));
    w.tick(t(150));
    assert_eq!(w.phase(), GatewayPhase::Promoting);
}

fn traffic(requests: u64, errors: u64) -> Traffic {
    Traffic {
        requests,
        errors,
        p99_ms: Some(10.0),
    }
}

/// Each pool's agent traffic is judged on its own, never summed into the cluster's: a pool
/// whose candidate fails more than it serves fails the analysis, a pool reporting an ocean of
/// clean candidate requests cannot rescue a failing green (nor dilute it), and a pool without
/// candidate traffic is noted without holding the gate.
#[test]
fn agent_pools_are_judged_on_their_own_in_the_analysis() {
    let pool = |name: &str, active: Traffic, preview: Traffic| PoolTraffic {
        pool: name.into(),
        active,
        preview,
    };
    type Case = (
        &'static str,
        Traffic,
        Vec<PoolTraffic>,
        CheckPhase,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "a pool's candidate regresses",
            traffic(500, 1),
            vec![pool("bank-a", traffic(1000, 2), traffic(400, 120))],
            CheckPhase::Failed,
            "pool bank-a's agents",
        ),
        (
            "a pool's flood of clean requests next to a failing green",
            traffic(500, 250),
            vec![pool("bank-a", traffic(10, 0), traffic(200_000_000_000, 0))],
            CheckPhase::Failed,
            "",
        ),
        (
            "a pool's flood of served errors next to a failing green",
            traffic(500, 250),
            vec![pool(
                "bank-a",
                traffic(200_000_000_000, 200_000_000_000),
                traffic(10, 0),
            )],
            CheckPhase::Failed,
            "",
        ),
        (
            "a pool without candidate traffic",
            traffic(500, 1),
            vec![pool("bank-a", traffic(1000, 2), traffic(0, 0))],
            CheckPhase::Passed,
            "pool bank-a: too little candidate traffic to judge",
        ),
        (
            "a pool whose candidate fails but which served nothing to compare with",
            traffic(500, 1),
            vec![pool("bank-a", traffic(0, 0), traffic(400, 400))],
            CheckPhase::Inconclusive,
            "pool bank-a's agents",
        ),
        (
            "a pool whose candidate does as well",
            traffic(500, 1),
            vec![pool("bank-a", traffic(1000, 2), traffic(500, 1))],
            CheckPhase::Passed,
            "pool bank-a: ",
        ),
    ];
    for (what, green, pools, want, says) in cases {
        let mut w = World::serving_a(true);
        w.green_traffic = green;
        w.pools = pools;
        w.obs.desired = B.into();
        for at in [10, 40, 71] {
            w.tick(t(at));
        }
        let gate = w.status.gate.clone().unwrap();
        let analysis = &gate.checks[4];
        assert_eq!(analysis.phase, want, "{what}: {analysis:?}");
        let text = format!(
            "{} {}",
            analysis.observed.as_deref().unwrap_or(""),
            analysis.reason.as_deref().unwrap_or("")
        );
        assert!(text.contains(says), "{what}: {text}");
        if what.contains("failing green") {
            assert!(
                text.contains("green"),
                "{what}: the cluster's own verdict: {text}"
            );
        }
    }
}

/// However many agents fail however many probes, the reason names a few and counts the rest:
/// it goes into Events, conditions and Slack.
#[test]
fn a_fleets_failures_make_a_bounded_reason() {
    let probes: Vec<(&str, bool)> = (0..31).map(|_| ("p", false)).collect();
    let mut w = World::serving_a(true);
    w.obs.desired = B.into();
    w.obs.agents = (0..40)
        .map(|i| agent(&format!("bank-a-{i}"), running(true, &probes)))
        .collect();
    for at in [10, 20] {
        w.tick(t(at));
    }
    assert_eq!(w.phase(), GatewayPhase::Rejected);
    let reason = &w.status.rejected_revision.as_ref().unwrap().reason;
    assert!(reason.contains("and 1235 more"), "{reason}");
    assert!(reason.len() < 1000, "{}", reason.len());
}
