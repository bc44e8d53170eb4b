//! The 5-check Blue/Green gate: a pure state machine `(status, observations, now) → (status,
//! actions)`.
//!
//! All state lives in the `ApiGateway` status (phase, colors, revisions, the recorded checks,
//! `switchedAt`), so an operator that restarts mid-gate resumes from status: a switch that
//! already happened is seen as done and never repeated. The machine does no I/O; the controller
//! turns its actions into platform calls and probes and feeds their results back as observations.
//!
//! Checks run in order (rollout, health, schema, smoke, analysis). A failed check refuses the
//! revision: blue keeps serving, green is scaled down and the revision is recorded as rejected
//! until the spec changes. An inconclusive analysis never promotes on its own: the gateway waits
//! for a human even with `autoPromote`. After a switch blue stays warm for `rollbackWindow`; a
//! critical incident on green or a rollback request inside it switches back.
//!
//! A revision that changes what Connector Agents serve is checked on them too: each agent of
//! such a pool (every one the agents file lists and does not revoke) runs the revision's
//! candidate configuration beside its served one and reports on it ([`AgentCandidate`]).
//! Rollout waits for every one to run it (one refusing it fails the check; a silent one is
//! awaited until `rolloutDeadline`, never passed), health for their candidates' readiness,
//! smoke for the probes they send through it, and the analysis judges each pool's candidate
//! traffic against its served traffic on its own: a pool's regression fails the check, too
//! little candidate traffic is noted and does not hold the gate (its agents passed smoke),
//! anything else it cannot judge waits for a human.

pub mod analysis;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::gateway::{
    ApiGatewayStatus, CheckPhase, Color, GateCheckStatus, GateSpec, GateStatus, GatewayPhase,
    RejectedRevision,
};
pub use analysis::Traffic;

/// The five checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateCheck {
    /// Every green replica is ready within `rolloutDeadline`.
    Rollout,
    /// Green's deep health endpoint is good.
    Health,
    /// The database is at the schema green expects.
    Schema,
    /// Smoke probes through the preview endpoint pass.
    Smoke,
    /// Green's errors and latency compare well with blue's.
    Analysis,
}

pub const CHECKS: [GateCheck; 5] = [
    GateCheck::Rollout,
    GateCheck::Health,
    GateCheck::Schema,
    GateCheck::Smoke,
    GateCheck::Analysis,
];

impl GateCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rollout => "rollout",
            Self::Health => "health",
            Self::Schema => "schema",
            Self::Smoke => "smoke",
            Self::Analysis => "analysis",
        }
    }
}

/// What the platform reports about one color.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColorObservation {
    pub revision: String,
    pub ready: i32,
    pub replicas: i32,
    /// Changes whenever the instances behind the color restart or are replaced.
    pub instance: String,
}

/// The result of a probe the machine asked for with [`Action::Probe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub check: GateCheck,
    /// The revision the probe ran against; a result for another revision is ignored.
    pub revision: String,
    /// Passed, Failed, or Skipped (the check does not apply, e.g. no database).
    pub phase: CheckPhase,
    pub observed: Option<String>,
    pub threshold: Option<String>,
    pub samples: Option<u64>,
    pub reason: String,
}

/// Traffic of both colors since the analysis window started ([`Action::StartAnalysis`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisWindow {
    pub revision: String,
    pub active: Traffic,
    pub preview: Traffic,
    /// Per pool the revision changes: its agents' candidate and served traffic, judged on
    /// their own (an agent's counts never enter the cluster's ratios, which they could
    /// drown).
    pub pools: Vec<PoolTraffic>,
}

/// One agent pool's traffic in the analysis window.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolTraffic {
    pub pool: String,
    /// Through the configuration its agents serve.
    pub active: Traffic,
    /// Through their candidates (`previewListen`).
    pub preview: Traffic,
}

/// A human's request from kubectl (annotation) or Slack (button).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub revision: String,
    /// Who asked, for the record: `annotation`, `slack:alice`.
    pub by: String,
}

/// Everything the machine needs to know about the world for one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// Revision the spec asks for now.
    pub desired: String,
    /// Green's replicas must all be ready; also used for the first deploy.
    pub replicas: i32,
    pub blue: Option<ColorObservation>,
    pub green: Option<ColorObservation>,
    pub probe: Option<ProbeResult>,
    /// None while no window is being counted (or the counters were lost in a restart).
    pub analysis: Option<AnalysisWindow>,
    pub promote: Option<Request>,
    pub rollback: Option<Request>,
    /// A critical incident on the active color since the switch, in words.
    pub critical_incident: Option<String>,
    /// The agents of the pools whose configuration the desired revision changes (and pools
    /// whose agents could not be offered a candidate, as `Waiting`).
    pub agents: Vec<AgentCandidate>,
}

/// What one Connector Agent made of the desired revision's candidate configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentCandidate {
    pub name: String,
    pub state: CandidateState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CandidateState {
    /// It has not reported on this candidate yet.
    Waiting,
    /// It could not build or start it (the reason names paths, not the partner's values).
    Refused(String),
    /// It runs it beside the served configuration.
    Running {
        ready: bool,
        not_ready: Option<String>,
        /// Empty until its probes have run.
        smoke: Vec<AgentSmoke>,
    },
}

/// One smoke probe an agent sent through a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSmoke {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// What the agents say about one check.
#[derive(Debug, Clone, PartialEq)]
enum AgentVerdict {
    /// Passed, in words for `observed` (empty without agents).
    Pass(String),
    /// Not yet: who is awaited.
    Wait(String),
    Fail(String),
}

/// The agents' verdict on `check` (rollout, health or smoke; the others do not ask agents).
fn agents_verdict(check: GateCheck, agents: &[AgentCandidate]) -> AgentVerdict {
    if agents.is_empty() {
        return AgentVerdict::Pass(String::new());
    }
    let mut waiting = Vec::new();
    let mut failed = Vec::new();
    for a in agents {
        match &a.state {
            CandidateState::Waiting => waiting.push(a.name.clone()),
            CandidateState::Refused(why) => failed.push(format!(
                "agent {} refused the candidate configuration: {why}",
                a.name
            )),
            CandidateState::Running {
                ready,
                not_ready,
                smoke,
            } => match check {
                GateCheck::Health if !ready => failed.push(format!(
                    "agent {}'s candidate is not ready: {}",
                    a.name,
                    not_ready.as_deref().unwrap_or("no reason given")
                )),
                GateCheck::Smoke if smoke.is_empty() => waiting.push(a.name.clone()),
                GateCheck::Smoke => failed.extend(
                    smoke
                        .iter()
                        .filter(|p| !p.passed)
                        .map(|p| format!("agent {}'s probe {}: {}", a.name, p.name, p.detail)),
                ),
                _ => {}
            },
        }
    }
    let n = agents.len();
    if !failed.is_empty() {
        AgentVerdict::Fail(listed(&failed, "; "))
    } else if !waiting.is_empty() {
        let what = match check {
            GateCheck::Smoke => "their smoke probes",
            _ => "running the candidate",
        };
        AgentVerdict::Wait(format!(
            "{}/{n} agent(s) awaited ({what}): {}",
            waiting.len(),
            listed(&waiting, ", ")
        ))
    } else {
        AgentVerdict::Pass(match check {
            GateCheck::Rollout => format!("{n}/{n} agent(s) run the candidate"),
            GateCheck::Health => format!("{n}/{n} agent(s)' candidates ready"),
            _ => format!("{n}/{n} agent(s)' smoke probes passed"),
        })
    }
}

/// The first few of `items` joined, and how many more there are: a reason stays short enough
/// for an Event, a condition and a Slack message whatever a fleet of agents says.
fn listed(items: &[String], sep: &str) -> String {
    const SHOWN: usize = 5;
    let mut out = items[..items.len().min(SHOWN)].join(sep);
    if items.len() > SHOWN {
        out.push_str(&format!("{sep}and {} more", items.len() - SHOWN));
    }
    out
}

/// `observed` with the agents' part added.
fn with_agents(observed: Option<String>, agents: &str) -> Option<String> {
    match (observed, agents.is_empty()) {
        (o, true) => o,
        (Some(o), false) => Some(format!("{o}; {agents}")),
        (None, false) => Some(agents.to_string()),
    }
}

impl Observations {
    fn color(&self, c: Color) -> Option<&ColorObservation> {
        match c {
            Color::Blue => self.blue.as_ref(),
            Color::Green => self.green.as_ref(),
        }
    }
}

/// What the machine asks the controller to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Make `color` run `revision` (create or update; idempotent).
    Deploy { color: Color, revision: String },
    /// Run the probe of this check against the preview and step again with its result.
    Probe(GateCheck),
    /// Start counting both colors' traffic for the analysis window.
    StartAnalysis,
    /// Send all traffic to `to` in one step (Service selector or local front listener).
    Switch { to: Color, revision: String },
    /// Stop `color` (scale to zero).
    ScaleDown { color: Color },
    /// Tell people (Event, console or Slack).
    Notify(GateNotice),
}

/// Something people should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateNotice {
    pub kind: NoticeKind,
    pub revision: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// The first revision is serving.
    Deployed,
    /// A gate started for a new revision.
    GateStarted,
    /// A gate was abandoned because the spec moved on.
    Cancelled,
    /// 5/5 passed (or analysis was inconclusive); a human must promote.
    AwaitingApproval,
    /// Traffic switched to the new revision.
    Promoted,
    /// The rollback window ended; the previous color was scaled down.
    Settled,
    /// The gate refused the revision.
    Rejected,
    /// Traffic switched back after a promotion.
    RolledBack,
}

impl NoticeKind {
    /// Event reason (also the JSON outcome of `apitree demo`).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Deployed => "Deployed",
            Self::GateStarted => "GateStarted",
            Self::Cancelled => "GateCancelled",
            Self::AwaitingApproval => "AwaitingApproval",
            Self::Promoted => "Promoted",
            Self::Settled => "RolloutSettled",
            Self::Rejected => "Rejected",
            Self::RolledBack => "RolledBack",
        }
    }
}

impl NoticeKind {
    /// How a gate run ended, for the notices that end one.
    pub fn outcome(self) -> Option<GateOutcome> {
        match self {
            Self::Promoted => Some(GateOutcome::Promoted),
            Self::Rejected => Some(GateOutcome::Rejected),
            Self::RolledBack => Some(GateOutcome::RolledBack),
            _ => None,
        }
    }
}

/// How a gate run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Promoted,
    Rejected,
    RolledBack,
}

impl GateOutcome {
    /// The metric label and the status page's and demo summary's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Promoted => "promoted",
            Self::Rejected => "rejected",
            Self::RolledBack => "rolled_back",
        }
    }
}

impl std::fmt::Display for GateOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A finished gate run, for the status page and the demo summary.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GateRun {
    pub revision: String,
    pub outcome: GateOutcome,
    pub reason: String,
    pub checks: Vec<GateCheckStatus>,
}

fn parse_time(t: &Option<String>) -> Option<Timestamp> {
    t.as_deref().and_then(|t| t.parse().ok())
}

fn elapsed(since: &Option<String>, now: Timestamp) -> SignedDuration {
    parse_time(since)
        .map(|t| now.duration_since(t))
        .unwrap_or(SignedDuration::ZERO)
}

fn new_checks() -> Vec<GateCheckStatus> {
    CHECKS
        .iter()
        .map(|c| GateCheckStatus {
            name: c.as_str().into(),
            phase: CheckPhase::Pending,
            observed: None,
            threshold: None,
            samples: None,
            p_value: None,
            reason: None,
            started_at: None,
            finished_at: None,
        })
        .collect()
}

fn progress(gate: &GateStatus) -> String {
    let done = gate
        .checks
        .iter()
        .filter(|c| matches!(c.phase, CheckPhase::Passed | CheckPhase::Skipped))
        .count();
    format!("{done}/{}", CHECKS.len())
}

/// One step of the gate.
pub fn step(
    status: &ApiGatewayStatus,
    spec: &GateSpec,
    obs: &Observations,
    now: Timestamp,
) -> (ApiGatewayStatus, Vec<Action>) {
    let mut m = Machine {
        s: status.clone(),
        spec,
        obs,
        now,
        actions: Vec::new(),
    };
    m.run();
    if let Some(g) = m.s.gate.as_mut() {
        g.progress = progress(g);
    }
    (m.s, m.actions)
}

struct Machine<'a> {
    s: ApiGatewayStatus,
    spec: &'a GateSpec,
    obs: &'a Observations,
    now: Timestamp,
    actions: Vec<Action>,
}

impl Machine<'_> {
    fn notify(&mut self, kind: NoticeKind, revision: &str, reason: impl Into<String>) {
        self.actions.push(Action::Notify(GateNotice {
            kind,
            revision: revision.to_string(),
            reason: reason.into(),
        }));
    }

    fn run(&mut self) {
        let (Some(active), Some(active_rev)) =
            (self.s.active_color, self.s.active_revision.clone())
        else {
            return self.first_deploy();
        };
        if self.s.phase == Some(GatewayPhase::Promoting) {
            return self.watch_promoted(active, &active_rev);
        }
        let desired = self.obs.desired.clone();
        if desired == active_rev {
            if let Some(preview) = self.s.preview_revision.take() {
                self.cancel_gate(&preview, "the spec is back at the active revision");
                self.actions.push(Action::ScaleDown {
                    color: active.other(),
                });
            } else {
                self.scale_down_leftover(active);
            }
            self.s.phase = Some(GatewayPhase::Stable);
            return;
        }
        if self
            .s
            .rejected_revision
            .as_ref()
            .is_some_and(|r| r.revision == desired)
        {
            // Refused (or rolled back) before: not retried until the spec changes.
            if self.s.phase != Some(GatewayPhase::RolledBack) {
                self.s.phase = Some(GatewayPhase::Rejected);
            }
            if self.s.preview_revision.is_none() {
                self.scale_down_leftover(active);
            }
            return;
        }
        if self.s.preview_revision.as_deref() != Some(desired.as_str()) {
            if let Some(old) = self.s.preview_revision.clone() {
                self.cancel_gate(&old, &format!("superseded by revision {desired}"));
            }
            return self.start_gate(active.other(), &desired);
        }
        self.continue_gate(active, &desired);
    }

    /// No gate runs, yet the other color still has replicas: a scale-down that did not happen
    /// (the API refused it) is asked for again.
    fn scale_down_leftover(&mut self, active: Color) {
        if self.obs.color(active.other()).is_some() {
            self.actions.push(Action::ScaleDown {
                color: active.other(),
            });
        }
    }

    fn first_deploy(&mut self) {
        let desired = self.obs.desired.clone();
        let color = Color::Blue;
        match self.obs.color(color) {
            Some(o) if o.revision == desired && o.ready >= self.obs.replicas.max(1) => {
                self.s.active_color = Some(color);
                self.s.active_revision = Some(desired.clone());
                self.s.switched_at = Some(self.now.to_string());
                self.s.phase = Some(GatewayPhase::Stable);
                self.actions.push(Action::Switch {
                    to: color,
                    revision: desired.clone(),
                });
                self.notify(
                    NoticeKind::Deployed,
                    &desired,
                    format!("first revision serving on {}", color.as_str()),
                );
            }
            Some(o) if o.revision == desired => {
                self.s.phase = Some(GatewayPhase::Progressing);
            }
            _ => {
                self.s.phase = Some(GatewayPhase::Progressing);
                self.actions.push(Action::Deploy {
                    color,
                    revision: desired,
                });
            }
        }
    }

    fn start_gate(&mut self, color: Color, revision: &str) {
        let mut checks = new_checks();
        checks[0].phase = CheckPhase::Running;
        checks[0].started_at = Some(self.now.to_string());
        self.s.gate = Some(GateStatus {
            revision: revision.to_string(),
            progress: String::new(),
            started_at: Some(self.now.to_string()),
            instance: None,
            checks,
        });
        self.s.preview_revision = Some(revision.to_string());
        self.s.phase = Some(GatewayPhase::Gating);
        self.actions.push(Action::Deploy {
            color,
            revision: revision.to_string(),
        });
        self.notify(
            NoticeKind::GateStarted,
            revision,
            format!("deploying to {} and checking", color.as_str()),
        );
    }

    /// Marks every unfinished check of the current gate as cancelled (never Passed).
    fn cancel_gate(&mut self, revision: &str, why: &str) {
        let now = self.now.to_string();
        if let Some(g) = self.s.gate.as_mut() {
            for c in g.checks.iter_mut() {
                if matches!(c.phase, CheckPhase::Pending | CheckPhase::Running) {
                    c.phase = CheckPhase::Cancelled;
                    c.reason = Some(format!("cancelled: {why}"));
                    c.finished_at = Some(now.clone());
                }
            }
        }
        self.notify(NoticeKind::Cancelled, revision, why);
    }

    fn restart_checks(&mut self, why: String) {
        let now = self.now.to_string();
        if let Some(g) = self.s.gate.as_mut() {
            g.checks = new_checks();
            g.checks[0].phase = CheckPhase::Running;
            g.checks[0].started_at = Some(now);
            g.checks[0].reason = Some(format!("checks restarted: {why}"));
            g.instance = None;
        }
        self.s.phase = Some(GatewayPhase::Gating);
    }

    fn continue_gate(&mut self, active: Color, desired: &str) {
        let preview = active.other();
        let green = self.obs.color(preview).cloned();
        // Green restarted or was changed under the gate: what was checked is gone.
        let recorded = self.s.gate.as_ref().and_then(|g| g.instance.clone());
        if let Some(recorded) = recorded {
            let why = match &green {
                None => Some(format!("{} disappeared", preview.as_str())),
                Some(g) if g.revision != desired => Some(format!(
                    "{} now runs revision {} instead of {desired}",
                    preview.as_str(),
                    g.revision
                )),
                Some(g) if g.instance != recorded => Some(format!(
                    "{} restarted (instance {recorded} → {})",
                    preview.as_str(),
                    g.instance
                )),
                _ => None,
            };
            if let Some(why) = why {
                self.restart_checks(why);
                if green.as_ref().is_none_or(|g| g.revision != desired) {
                    self.actions.push(Action::Deploy {
                        color: preview,
                        revision: desired.to_string(),
                    });
                }
                return;
            }
        }
        if self.s.phase == Some(GatewayPhase::AwaitingApproval) {
            return self.await_approval(active, desired);
        }
        for check in CHECKS {
            let phase = self.check(check).phase;
            if matches!(phase, CheckPhase::Passed | CheckPhase::Skipped) {
                continue;
            }
            match self.run_check(check, green.as_ref(), desired) {
                CheckPhase::Passed | CheckPhase::Skipped => continue,
                CheckPhase::Failed => {
                    let c = self.check(check);
                    let reason = format!(
                        "{} check failed: {}",
                        check.as_str(),
                        c.reason.clone().unwrap_or_default()
                    );
                    return self.reject(active, desired, reason);
                }
                CheckPhase::Inconclusive => {
                    let reason = format!(
                        "{} check inconclusive: {}; promote by hand (annotation apitree.io/promote={desired} or Slack) or roll out again",
                        check.as_str(),
                        self.check(check).reason.clone().unwrap_or_default()
                    );
                    self.s.phase = Some(GatewayPhase::AwaitingApproval);
                    self.notify(NoticeKind::AwaitingApproval, desired, reason);
                    return;
                }
                CheckPhase::Pending | CheckPhase::Running | CheckPhase::Cancelled => return,
            }
        }
        if self.spec.auto_promote {
            self.promote(active, desired, "5/5 checks passed".into());
        } else {
            self.s.phase = Some(GatewayPhase::AwaitingApproval);
            self.notify(
                NoticeKind::AwaitingApproval,
                desired,
                format!("5/5 checks passed; promote with annotation apitree.io/promote={desired} or the Slack Promote button"),
            );
            self.await_approval(active, desired);
        }
    }

    fn await_approval(&mut self, active: Color, desired: &str) {
        if let Some(r) = self.obs.rollback.as_ref().filter(|r| r.revision == desired) {
            return self.reject(active, desired, format!("rejected by {}", r.by));
        }
        if let Some(r) = self.obs.promote.as_ref().filter(|r| r.revision == desired) {
            self.promote(active, desired, format!("promoted by {}", r.by));
        }
    }

    fn check(&mut self, check: GateCheck) -> &mut GateCheckStatus {
        let gate = self.s.gate.get_or_insert_with(GateStatus::default);
        if gate.checks.len() != CHECKS.len() {
            gate.checks = new_checks();
        }
        let i = CHECKS.iter().position(|c| *c == check).unwrap_or(0);
        &mut gate.checks[i]
    }

    fn finish(&mut self, check: GateCheck, phase: CheckPhase, reason: String) -> CheckPhase {
        let now = self.now.to_string();
        let c = self.check(check);
        c.phase = phase;
        c.reason = Some(reason);
        c.finished_at = Some(now);
        phase
    }

    /// Advances one check; returns its phase afterwards.
    fn run_check(
        &mut self,
        check: GateCheck,
        green: Option<&ColorObservation>,
        desired: &str,
    ) -> CheckPhase {
        let (now, spec) = (self.now, self.spec);
        let revision = desired.to_string();
        {
            let c = self.check(check);
            // A cancelled check never counts: should its gate go on, it runs again.
            if matches!(c.phase, CheckPhase::Pending | CheckPhase::Cancelled) {
                c.phase = CheckPhase::Running;
                c.started_at = Some(now.to_string());
            }
        }
        match check {
            GateCheck::Rollout => {
                let want = self.obs.replicas.max(1);
                let ready = green
                    .filter(|g| g.revision == desired)
                    .map(|g| g.ready)
                    .unwrap_or(0);
                let deadline = spec.rollout_deadline.as_std();
                let agents = agents_verdict(check, &self.obs.agents);
                let c = self.check(check);
                let (summary, threshold) = match &agents {
                    AgentVerdict::Pass(s) | AgentVerdict::Wait(s) if !s.is_empty() => {
                        (s.clone(), ", every agent of the pool running the candidate")
                    }
                    _ => (String::new(), ""),
                };
                c.observed = with_agents(Some(format!("{ready}/{want} ready")), &summary);
                c.threshold = Some(format!(
                    "{want}/{want} within {}{threshold}",
                    spec.rollout_deadline
                ));
                c.samples = Some(want as u64);
                if let AgentVerdict::Fail(why) = agents {
                    return self.finish(check, CheckPhase::Failed, why);
                }
                if ready >= want && matches!(agents, AgentVerdict::Pass(_)) {
                    let instance = green.map(|g| g.instance.clone());
                    if let Some(g) = self.s.gate.as_mut() {
                        g.instance = instance;
                    }
                    let why = if summary.is_empty() {
                        "every replica is ready".to_string()
                    } else {
                        "every replica is ready and every agent of the pool runs the candidate"
                            .to_string()
                    };
                    return self.finish(check, CheckPhase::Passed, why);
                }
                let started = self.check(check).started_at.clone();
                if elapsed(&started, now).unsigned_abs() > deadline {
                    let mut why = format!(
                        "only {ready}/{want} replicas ready after {}",
                        spec.rollout_deadline
                    );
                    if let AgentVerdict::Wait(w) = agents {
                        why = format!("{why}; {w}");
                    }
                    return self.finish(check, CheckPhase::Failed, why);
                }
                CheckPhase::Running
            }
            GateCheck::Health | GateCheck::Schema | GateCheck::Smoke => {
                let result = self
                    .obs
                    .probe
                    .as_ref()
                    .filter(|p| p.check == check && p.revision == revision);
                let Some(p) = result.cloned() else {
                    self.actions.push(Action::Probe(check));
                    return CheckPhase::Running;
                };
                let agents = match check {
                    GateCheck::Health | GateCheck::Smoke => agents_verdict(check, &self.obs.agents),
                    _ => AgentVerdict::Pass(String::new()),
                };
                let started = self.check(check).started_at.clone();
                let c = self.check(check);
                c.threshold = p.threshold;
                c.samples = p.samples;
                // A probe can only pass, fail or not apply; anything else is not a pass.
                let phase = match p.phase {
                    CheckPhase::Passed | CheckPhase::Failed | CheckPhase::Skipped => p.phase,
                    _ => CheckPhase::Failed,
                };
                if phase != CheckPhase::Passed {
                    c.observed = p.observed;
                    return self.finish(check, phase, p.reason);
                }
                match agents {
                    AgentVerdict::Pass(s) => {
                        c.observed = with_agents(p.observed, &s);
                        self.finish(check, phase, p.reason)
                    }
                    AgentVerdict::Fail(why) => {
                        c.observed = p.observed;
                        self.finish(check, CheckPhase::Failed, why)
                    }
                    AgentVerdict::Wait(w) => {
                        c.observed = with_agents(p.observed, &w);
                        // Bounded like the rollout: an agent that never reports fails the check.
                        if elapsed(&started, now).unsigned_abs() > spec.rollout_deadline.as_std() {
                            return self.finish(
                                check,
                                CheckPhase::Failed,
                                format!("after {}: {w}", spec.rollout_deadline),
                            );
                        }
                        c.reason = Some(format!("{}; waiting: {w}", p.reason));
                        CheckPhase::Running
                    }
                }
            }
            GateCheck::Analysis => {
                let window = self
                    .obs
                    .analysis
                    .as_ref()
                    .filter(|w| w.revision == revision);
                let Some(w) = window.cloned() else {
                    // Not counting yet, or the counters were lost (operator restart): the window
                    // starts now, so the verdict always rests on a full window.
                    let c = self.check(check);
                    c.started_at = Some(now.to_string());
                    c.reason =
                        Some("observing the new revision's color and the serving one".into());
                    self.actions.push(Action::StartAnalysis);
                    return CheckPhase::Running;
                };
                let started = self.check(check).started_at.clone();
                let window_len = spec.observation_window.as_std();
                // The new revision runs on the color that does not serve.
                let preview = self.s.active_color.map_or(Color::Green, Color::other);
                let j = analysis::judge(&w.active, &w.preview, spec, preview);
                let c = self.check(check);
                c.observed = Some(j.observed);
                c.threshold = Some(j.threshold);
                c.samples = Some(j.samples);
                c.p_value = j.p_value;
                if elapsed(&started, now).unsigned_abs() < window_len {
                    c.reason = Some(format!(
                        "observing for {} ({} requests to the new revision so far)",
                        spec.observation_window, j.samples
                    ));
                    return CheckPhase::Running;
                }
                // Each pool on its own: a regression fails; too few candidate requests is a
                // note (the partner runs no monitors; its agents passed smoke); anything else
                // that cannot be judged (candidate traffic but nothing served to compare
                // with) waits for a human, like the cluster's own.
                let mut notes = Vec::new();
                let mut failed = None;
                let mut undecided = None;
                for p in &w.pools {
                    let pj = analysis::judge(&p.active, &p.preview, spec, preview);
                    notes.push(format!("pool {}: {}", p.pool, pj.observed));
                    let why = format!(
                        "pool {}'s agents, candidate ({}) against served ({}): {}",
                        p.pool,
                        preview.as_str(),
                        preview.other().as_str(),
                        pj.reason
                    );
                    match pj.phase {
                        CheckPhase::Failed => failed = failed.or(Some(why)),
                        CheckPhase::Passed => {}
                        _ if p.preview.requests < spec.min_samples => {
                            notes.pop();
                            notes.push(format!(
                                "pool {}: too little candidate traffic to judge ({} of {} requests; its agents passed smoke)",
                                p.pool, p.preview.requests, spec.min_samples
                            ));
                        }
                        _ => undecided = undecided.or(Some(why)),
                    }
                }
                let c = self.check(check);
                c.observed = with_agents(c.observed.take(), &notes.join("; "));
                let (phase, reason) = match (j.phase, failed, undecided) {
                    (CheckPhase::Failed, _, _) => (j.phase, j.reason),
                    (_, Some(why), _) => (CheckPhase::Failed, why),
                    (CheckPhase::Inconclusive, _, _) => (j.phase, j.reason),
                    (_, _, Some(why)) => (CheckPhase::Inconclusive, why),
                    _ => (j.phase, j.reason),
                };
                self.finish(check, phase, reason)
            }
        }
    }

    fn promote(&mut self, active: Color, desired: &str, why: String) {
        let to = active.other();
        self.s.previous_revision = self.s.active_revision.take();
        self.s.active_color = Some(to);
        self.s.active_revision = Some(desired.to_string());
        self.s.preview_revision = None;
        self.s.switched_at = Some(self.now.to_string());
        self.s.phase = Some(GatewayPhase::Promoting);
        self.actions.push(Action::Switch {
            to,
            revision: desired.to_string(),
        });
        self.notify(
            NoticeKind::Promoted,
            desired,
            format!(
                "{why}; traffic switched to {}, {} stays warm for {}",
                to.as_str(),
                active.as_str(),
                self.spec.rollback_window
            ),
        );
    }

    fn reject(&mut self, active: Color, desired: &str, reason: String) {
        self.s.rejected_revision = Some(RejectedRevision {
            revision: desired.to_string(),
            reason: reason.clone(),
            at: self.now.to_string(),
        });
        self.s.preview_revision = None;
        self.s.phase = Some(GatewayPhase::Rejected);
        self.actions.push(Action::ScaleDown {
            color: active.other(),
        });
        self.notify(NoticeKind::Rejected, desired, reason);
    }

    fn watch_promoted(&mut self, active: Color, active_rev: &str) {
        let previous = self.s.previous_revision.clone();
        let trigger = self
            .obs
            .rollback
            .as_ref()
            .filter(|r| r.revision == active_rev)
            .map(|r| format!("rolled back by {}", r.by))
            .or_else(|| {
                self.obs
                    .critical_incident
                    .as_ref()
                    .map(|i| format!("critical incident inside the rollback window: {i}"))
            });
        let in_window = elapsed(&self.s.switched_at, self.now).unsigned_abs()
            < self.spec.rollback_window.as_std();
        match (trigger, previous) {
            (Some(reason), Some(previous)) if in_window => {
                let back = active.other();
                self.s.active_color = Some(back);
                self.s.active_revision = Some(previous.clone());
                self.s.previous_revision = None;
                self.s.switched_at = Some(self.now.to_string());
                self.s.rejected_revision = Some(RejectedRevision {
                    revision: active_rev.to_string(),
                    reason: reason.clone(),
                    at: self.now.to_string(),
                });
                self.s.phase = Some(GatewayPhase::RolledBack);
                self.actions.push(Action::Switch {
                    to: back,
                    revision: previous,
                });
                self.actions.push(Action::ScaleDown { color: active });
                self.notify(NoticeKind::RolledBack, active_rev, reason);
            }
            _ if in_window => {}
            _ => {
                self.s.previous_revision = None;
                self.s.phase = Some(GatewayPhase::Stable);
                self.actions.push(Action::ScaleDown {
                    color: active.other(),
                });
                self.notify(
                    NoticeKind::Settled,
                    active_rev,
                    format!(
                        "rollback window of {} ended; {} scaled down",
                        self.spec.rollback_window,
                        active.other().as_str()
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
