//! The Connector Agents' side of a pass: the gateway database's orgs and keys read once per
//! pass, each pool's candidate offered to its agents and their answers turned into the gate's
//! observations, the served configuration published, `status.connectors`, and the agents'
//! counters for the analysis and the detector.

use super::*;

/// One pool's agents' counters when the analysis window started.
pub(super) struct PoolCounters {
    pub(super) pool: String,
    pub(super) routes: Vec<String>,
    pub(super) active_start: Snapshot,
    pub(super) preview_start: Snapshot,
}

impl PoolCounters {
    /// Snapshots of what the pool's agents reported: the served configuration's and the
    /// candidate's.
    pub(super) fn snapshots(
        hub: &crate::agent::hub::Hub,
        pool: &str,
    ) -> Result<(Snapshot, Snapshot), String> {
        let active = Snapshot::from_texts(hub.pool_metrics(&[pool])).map_err(|e| e.to_string())?;
        let preview =
            Snapshot::from_texts(hub.preview_metrics(&[pool])).map_err(|e| e.to_string())?;
        Ok((active, preview))
    }

    /// The pool's agents' traffic since the start, on its own routes only: served, candidate.
    pub(super) fn windows(
        &self,
        hub: &crate::agent::hub::Hub,
    ) -> Result<(GatewayWindow, GatewayWindow), String> {
        let (active, preview) = Self::snapshots(hub, &self.pool)?;
        let own = |mut w: GatewayWindow| {
            w.routes.retain(|route, _| self.routes.contains(route));
            w
        };
        Ok((
            own(window_between(&self.active_start, &active)),
            own(window_between(&self.preview_start, &preview)),
        ))
    }
}

/// The orgs and keys the pools receive this pass, from the gateway database: `Some(None)`
/// without one, `None` when it cannot be read (then nothing is published: a configuration
/// without the keys would refuse every caller). Read once a pass, for the configurations
/// and the gate's candidates alike.
pub(super) async fn pass_entities<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    now: Timestamp,
) -> Option<Option<crate::db::keys::DbEntities>> {
    if ctx.agents.is_none() || m.spec.connectors.is_empty() {
        return Some(None);
    }
    let Some(url) = m.database_url.clone() else {
        return Some(None);
    };
    match agent_entities(&mut m.runtime.agent_db, &url).await {
        Ok(e) => Some(Some(e)),
        Err(e) => {
            m.warn_once(
                "ConnectorsStale",
                &format!("cannot read the gateway database's orgs and keys for the agents ({e}); they keep the configuration they have"),
                now,
            );
            None
        }
    }
}

/// `cfg` with the gateway database's orgs and keys added (a key's tier the pool does not
/// have falls back to the pool's default).
pub(super) fn with_entities(
    mut cfg: crate::agent::bundle::AgentConfig,
    entities: &Option<crate::db::keys::DbEntities>,
) -> crate::agent::bundle::AgentConfig {
    if let Some(e) = entities {
        let tiers: Vec<String> = cfg.tiers.iter().map(|t| t.name.clone()).collect();
        cfg.orgs.extend(e.orgs.iter().cloned());
        cfg.keys.extend(e.keys.iter().cloned().map(|mut k| {
            if k.tier.as_ref().is_some_and(|t| !tiers.contains(t)) {
                k.tier = None;
            }
            k
        }));
    }
    cfg
}

/// The agents' part of the gate. While the desired revision waits to take traffic (not
/// active, not refused), each pool whose configuration it changes is offered it as a
/// candidate, and the reports on it of every agent the agents file gives that pool are what
/// the gate observes; every other pool of this gateway has its candidate withdrawn.
pub(super) fn candidates<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    desired: &str,
    configs: &BTreeMap<String, crate::agent::bundle::AgentConfig>,
    entities: &Option<Option<crate::db::keys::DbEntities>>,
) -> Vec<gate::AgentCandidate> {
    use gate::{AgentCandidate, AgentSmoke, CandidateState};
    let Some(hub) = &ctx.agents else {
        return Vec::new();
    };
    let gating = m.status.active_revision.is_some()
        && m.status.active_revision.as_deref() != Some(desired)
        && m.status
            .rejected_revision
            .as_ref()
            .is_none_or(|r| r.revision != desired);
    let active = m
        .status
        .active_revision
        .as_ref()
        .and_then(|a| m.runtime.agent_configs.get(a));
    let mut offered = Vec::new();
    let mut unasked = Vec::new();
    for c in &m.spec.connectors {
        let changed = configs
            .get(&c.pool)
            .is_some_and(|cfg| active.and_then(|a| a.get(&c.pool)) != Some(cfg));
        match (gating && changed, configs.get(&c.pool), entities) {
            (true, Some(cfg), Some(e)) => {
                match hub.publish_preview(&m.name, &c.pool, desired, with_entities(cfg.clone(), e))
                {
                    Ok(_) => offered.push(c),
                    // A pool the agents file does not bind to this gateway: its agents cannot
                    // be asked, so they are awaited (`ConnectorsUnbound` says why).
                    Err(e) => unasked.push(AgentCandidate {
                        name: format!("pool {} (no candidate offered: {e})", c.pool),
                        state: CandidateState::Waiting,
                    }),
                }
            }
            // The database cannot be read: the candidate offered stays (its keys are a pass
            // old), and the agents' reports on it still count. None offered yet: the pool's
            // agents are awaited all the same, so the gate never passes agents it could not
            // ask (it fails at the rollout deadline if the database stays away).
            (true, Some(_), None) => {
                if hub
                    .preview_of(&m.name, &c.pool)
                    .is_some_and(|(r, _)| r == desired)
                {
                    offered.push(c);
                } else {
                    unasked.push(AgentCandidate {
                        name: format!("pool {} (no candidate offered: the gateway database's keys cannot be read)", c.pool),
                        state: CandidateState::Waiting,
                    });
                }
            }
            _ => {}
        }
    }
    // Every other candidate this gateway offered goes: pools the revision does not change,
    // and pools no longer in the spec.
    let keep: Vec<&str> = offered.iter().map(|c| c.pool.as_str()).collect();
    hub.retain_previews(&m.name, &keep);
    let mut out = unasked;
    for c in offered {
        let Some((_, generation)) = hub.preview_of(&m.name, &c.pool) else {
            continue;
        };
        // Every agent the agents file gives the pool is asked, heard from or not: an agent
        // that is silent (lost, or not heard from since this control plane started) is
        // awaited, never passed; one that is gone for good is revoked in the agents file.
        for (name, seen) in hub.pool_agents(&c.pool) {
            let Some(a) = seen else {
                out.push(AgentCandidate {
                    name: format!("{name} (not heard from since this control plane started)"),
                    state: CandidateState::Waiting,
                });
                continue;
            };
            let silent = silent_for(&a);
            let lost = silent > c.lost_after.as_std();
            let state = match a.preview {
                Some(p) if p.answers(generation) => match p.refused {
                    Some(why) => CandidateState::Refused(why),
                    None => CandidateState::Running {
                        ready: p.ready,
                        not_ready: p.not_ready,
                        smoke: p
                            .smoke
                            .into_iter()
                            .map(|s| AgentSmoke {
                                name: s.name,
                                passed: s.passed,
                                detail: s.detail,
                            })
                            .collect(),
                    },
                },
                _ => CandidateState::Waiting,
            };
            let name = match (&state, lost) {
                (CandidateState::Waiting, true) => format!(
                    "{name} (lost: silent for {}s; revoke it in the agents file if it is gone)",
                    silent.as_secs()
                ),
                _ => name,
            };
            out.push(AgentCandidate { name, state });
        }
    }
    out
}

/// The gateway's agent pools: each receives the configuration of the revision that takes
/// traffic (so the gate, with the candidates of [`candidates`], stands between a spec change
/// and the agents, and a rollback rolls them back); `status.connectors` lists their agents;
/// an agent silent for longer than its pool's `lostAfter` is an `agent lost` incident;
/// `ConnectorsInSync` says whether every connected agent serves what its pool is given.
pub(super) async fn connectors<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    desired: &str,
    configs: BTreeMap<String, crate::agent::bundle::AgentConfig>,
    entities: Option<Option<crate::db::keys::DbEntities>>,
    now: Timestamp,
) {
    let Some(hub) = &ctx.agents else {
        if !m.spec.connectors.is_empty() {
            m.warn_once(
                "ConnectorsUnserved",
                "spec.connectors is set but this control plane serves no agent endpoint (start it with --agent-listen); no agent receives a configuration",
                now,
            );
        }
        return;
    };
    m.runtime.agent_configs.insert(desired.to_string(), configs);
    let keep = [
        Some(desired),
        m.status.active_revision.as_deref(),
        m.status.previous_revision.as_deref(),
        m.status.preview_revision.as_deref(),
    ];
    m.runtime
        .agent_configs
        .retain(|rev, _| keep.contains(&Some(rev.as_str())));
    // Only a revision this process rendered is published: after a restart, until the active
    // revision is rendered again, the agents keep what they run.
    let active = m
        .status
        .active_revision
        .as_ref()
        .and_then(|a| m.runtime.agent_configs.get(a))
        .cloned();
    let mut unbound = Vec::new();
    if let (Some(configs), Some(entities)) = (active, entities) {
        for (pool, cfg) in configs {
            if let Err(e) = hub.publish(&m.name, &pool, with_entities(cfg, &entities)) {
                unbound.push(e.to_string());
            }
        }
    }
    if !unbound.is_empty() {
        m.warn_once("ConnectorsUnbound", &unbound.join("; "), now);
    }
    connector_status(m, hub, &unbound, now).await;
}

/// How long `agent` has not called the control plane.
pub(super) fn silent_for(agent: &crate::agent::hub::AgentStatus) -> std::time::Duration {
    chrono::Utc::now()
        .signed_duration_since(agent.last_seen)
        .to_std()
        .unwrap_or_default()
}

/// One agent's answer to its pool's candidate generation `generation`, in words.
pub(super) fn candidate_summary(
    generation: u64,
    report: Option<&crate::agent::report::PreviewReport>,
) -> String {
    let Some(p) = report.filter(|p| p.answers(generation)) else {
        return format!("generation {generation}: not reported on yet");
    };
    if let Some(why) = &p.refused {
        return format!("generation {generation}: refused: {why}");
    }
    let ready = match (&p.ready, &p.not_ready) {
        (true, _) => "ready".to_string(),
        (false, why) => format!("not ready ({})", why.as_deref().unwrap_or("?")),
    };
    let smoke = if p.smoke.is_empty() {
        "smoke probes not run yet".to_string()
    } else {
        let passed = p.smoke.iter().filter(|s| s.passed).count();
        format!("smoke {passed}/{} passed", p.smoke.len())
    };
    format!("generation {generation}: running, {ready}, {smoke}")
}

/// `status.connectors`, `agent lost` incidents and `ConnectorsInSync` from what the hub knows:
/// each pass, an invalid spec's too (an agent that disappears pages whatever the spec says).
pub(super) async fn connector_status(
    m: &mut Managed,
    hub: &crate::agent::hub::Hub,
    unbound: &[String],
    now: Timestamp,
) {
    use crate::crd::gateway::ConnectorStatus;
    let generation = Some(m.generation);
    let own = |pool: &str| hub.gateway_of(pool).as_deref() == Some(m.name.as_str());
    let published: BTreeMap<String, u64> = m
        .spec
        .connectors
        .iter()
        .filter(|c| own(&c.pool))
        .filter_map(|c| Some((c.pool.clone(), hub.generation(&c.pool)?)))
        .collect();
    let at = now.as_second();
    let mut statuses = Vec::new();
    let mut lagging = Vec::new();
    let mut lost_now = Vec::new();
    for a in hub.agents() {
        // Only the agents of pools the agents file gives this gateway: another gateway's
        // agents are none of its business.
        let Some(c) = m
            .spec
            .connectors
            .iter()
            .find(|c| c.pool == a.pool && own(&c.pool))
        else {
            continue;
        };
        let lost = silent_for(&a) > c.lost_after.as_std();
        let state = match (a.revoked, lost) {
            (true, _) => "Revoked",
            (false, true) => "Lost",
            (false, false) => "Connected",
        };
        let pool_generation = published.get(&a.pool).copied();
        if state == "Connected" && pool_generation.is_some() && a.generation != pool_generation {
            lagging.push(a.name.clone());
        }
        if !a.revoked {
            lost_now.push((a.name.clone(), lost));
        }
        let candidate = hub
            .preview_of(&m.name, &a.pool)
            .map(|(_, generation)| candidate_summary(generation, a.preview.as_ref()));
        statuses.push(ConnectorStatus {
            name: a.name,
            pool: a.pool,
            state: state.into(),
            version: a.version,
            generation: a.generation,
            published_generation: pool_generation,
            last_seen: a
                .last_seen
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            refused: a.refused.map(|r| r.reason),
            candidate,
        });
    }
    for (name, lost) in lost_now {
        m.event_on(
            at,
            &name,
            crate::detect::engine::AGENT_LOST,
            lost,
            Severity::High,
        )
        .await;
    }
    m.status.connectors = statuses;
    if m.spec.connectors.is_empty() {
        return;
    }
    let (state, reason, message) = if !unbound.is_empty() {
        (ConditionStatus::False, "PoolNotBound", unbound.join("; "))
    } else if lagging.is_empty() {
        (
            ConditionStatus::True,
            "InSync",
            "every connected agent serves its pool's configuration".to_string(),
        )
    } else {
        (
            ConditionStatus::False,
            "AgentsBehind",
            format!(
                "not yet on their pool's configuration (or refusing it, see status.connectors): {}",
                lagging.join(", ")
            ),
        )
    };
    set_condition(
        &mut m.status.conditions,
        "ConnectorsInSync",
        state,
        reason,
        &message,
        generation,
        now,
    );
}

/// The gateway database's orgs and keys (hashes), over a connection kept for `url`.
pub(super) async fn agent_entities(
    db: &mut Option<(String, sqlx::PgPool)>,
    url: &str,
) -> Result<crate::db::keys::DbEntities, crate::db::DbError> {
    let pool = match db {
        Some((u, pool)) if u == url => pool.clone(),
        _ => {
            let pool = crate::db::connect(url, 1).await?;
            *db = Some((url.to_string(), pool.clone()));
            pool
        }
    };
    let mut e = crate::db::keys::load_entities(&pool).await?;
    // Agents get orgs and keys only: the database's APIs and credentials are the cluster's.
    e.routes.clear();
    e.credentials.clear();
    Ok(e)
}

/// What the gateway's Connector Agents served since the last window, from their reports. An
/// agent speaks for its own pool's routes only: whatever else its report names (a cluster
/// route, another pool's) is dropped, so an agent cannot raise or hide an incident elsewhere.
pub(super) fn agent_window<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
) -> Option<GatewayWindow> {
    let hub = ctx.agents.as_ref()?;
    let mut total: Option<GatewayWindow> = None;
    for c in &m.spec.connectors {
        if hub.gateway_of(&c.pool).as_deref() != Some(m.name.as_str()) {
            continue;
        }
        let now = match Snapshot::from_texts(hub.pool_metrics(&[c.pool.as_str()])) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(gateway = %m.name, pool = %c.pool, "cannot read the agents' reported metrics: {e}");
                continue;
            }
        };
        let Some(before) = m
            .runtime
            .agent_snapshots
            .insert(c.pool.clone(), now.clone())
        else {
            continue;
        };
        let mut w = window_between(&before, &now);
        w.routes
            .retain(|route, _| c.routes.iter().any(|r| &r.name == route));
        total
            .get_or_insert_with(GatewayWindow::default)
            .absorb_agents(w);
    }
    let pools: Vec<&str> = m.spec.connectors.iter().map(|c| c.pool.as_str()).collect();
    m.runtime
        .agent_snapshots
        .retain(|pool, _| pools.contains(&pool.as_str()));
    total
}
