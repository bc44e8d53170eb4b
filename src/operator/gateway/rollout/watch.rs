//! The detector's side of a pass: scoring the active color's error ratios (and the agents'),
//! credential changes from the audit log, and the incidents that become notices, the status's
//! summary and the open-incident gauges.

use super::*;

/// Scores the active color's last window when one is due.
pub(super) async fn detect<P: Platform>(m: &mut Managed, ctx: &Context<P>, now: Timestamp) {
    if m.runtime.next_detect.is_some_and(|t| now < t) {
        return;
    }
    let window = m.spec.detection.window.as_std();
    m.runtime.next_detect = now.checked_add(window).ok();
    let at = now.as_second() - window.as_secs() as i64;
    // First, so an incident opened in this window carries the changes that preceded it.
    credential_changes(m, ctx, at).await;
    let Some(active) = m.status.active_color else {
        return;
    };
    let admins = match ctx
        .platform
        .admin_urls(&m.name, active, m.spec.tls.is_some())
        .await
    {
        Ok(admins) => admins,
        Err(e) => {
            tracing::warn!(gateway = %m.name, "cannot list the active color's replicas, this window is skipped: {e}");
            return;
        }
    };
    if m.runtime
        .detect_source
        .as_ref()
        .is_none_or(|(t, _)| *t != admins)
    {
        let targets = match metric_targets(m, ctx, &admins).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(gateway = %m.name, "cannot reach the active color's metrics: {e}");
                return;
            }
        };
        let selector = prometheus_selector(&m.name, active);
        let source = MetricSource::from_spec(&m.spec.detection.source, targets, &selector);
        m.runtime.detect_source = Some((admins, source));
    }
    let Some((_, source)) = m.runtime.detect_source.as_mut() else {
        return;
    };
    let mut w = match source.window(window).await {
        Ok(Some(w)) => w,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(gateway = %m.name, "cannot read the active color's metrics: {e}");
            m.runtime.detect_source = None;
            return;
        }
    };
    if let Some(agents) = agent_window(m, ctx) {
        w.absorb_agents(agents);
    }
    let t = traffic(&w);
    m.runtime.error_ratios.push_back(if t.requests > 0 {
        t.errors as f64 / t.requests as f64
    } else {
        0.0
    });
    while m.runtime.error_ratios.len() > SPARKLINE {
        m.runtime.error_ratios.pop_front();
    }
    let notices = match m.runtime.detector.observe(at, &w).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(gateway = %m.name, "cannot record incidents: {e}");
            return;
        }
    };
    record_notices(m, notices);
}

/// A position in a gateway database's audit log.
pub(super) struct AuditCursor {
    url: String,
    pool: sqlx::PgPool,
    /// The last row read.
    after: i64,
}

/// The credential changes the gateway database's audit log recorded since the last look go to
/// the detector (a notice each, an incident on a burst). Where the log was last read is kept
/// in the state database, so changes made while the operator was down are announced after it
/// restarts; without one (or the first time) the first look starts at the end of the log.
pub(super) async fn credential_changes<P: Platform>(m: &mut Managed, ctx: &Context<P>, at: i64) {
    let Some(url) = m.database_url.clone() else {
        m.runtime.audit = None;
        return;
    };
    let rows = match read_audit(&mut m.runtime.audit, &url, &m.name, &ctx.store).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(gateway = %m.name, "cannot read the audit log for credential changes: {e}");
            return;
        }
    };
    match m.runtime.detector.credential_changes(at, &rows).await {
        Ok(notice) => record_notices(m, notice.into_iter().collect()),
        Err(e) => tracing::error!(gateway = %m.name, "cannot record incidents: {e}"),
    }
}

/// The audit rows after `cursor`: opened for a new or changed `url` where `store` says the
/// log was last read, else at its end.
pub(super) async fn read_audit(
    cursor: &mut Option<AuditCursor>,
    url: &str,
    gateway: &str,
    store: &IncidentStore,
) -> Result<Vec<crate::db::audit::AuditRow>, crate::db::DbError> {
    let c = match cursor {
        Some(c) if c.url == url => c,
        _ => {
            let pool = crate::db::connect(url, 1).await?;
            let after = match store.audit_cursor(gateway).await? {
                Some(after) => after,
                None => {
                    let end: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM audit_log")
                        .fetch_one(&pool)
                        .await
                        .map_err(crate::db::DbError::query("find the end of the audit log"))?;
                    store.set_audit_cursor(gateway, end).await?;
                    end
                }
            };
            cursor.insert(AuditCursor {
                url: url.to_string(),
                pool,
                after,
            })
        }
    };
    let rows = crate::db::audit::read_rows(&c.pool, c.after, 1000).await?;
    if let Some(last) = rows.last() {
        c.after = last.id;
        store.set_audit_cursor(gateway, last.id).await?;
    }
    Ok(rows)
}

/// Keeps the incident records and `status.incidents` up to date with the detector's notices.
pub(super) fn record_notices(m: &mut Managed, notices: Vec<crate::detect::IncidentNotice>) {
    for n in notices {
        m.runtime.notifications += 1;
        let key = (n.route.clone(), n.signal.clone());
        if n.remark.is_some() {
            // A person's response: the incident's state is unchanged.
            if let Some(&i) = m.runtime.open.get(&key) {
                m.runtime.incidents[i].acknowledged_by = n.acknowledged_by.clone();
            }
            continue;
        }
        match n.event {
            IncidentEvent::Open => {
                m.runtime.open.insert(key, m.runtime.incidents.len());
                m.runtime.incidents.push(IncidentRecord {
                    signal: n.signal.clone(),
                    route: n.route.clone(),
                    max_severity: n.severity,
                    resolved: false,
                    opened_at: n.at.clone(),
                    severity: n.severity,
                    ratio: n.ratio,
                    acknowledged_by: None,
                });
            }
            IncidentEvent::Resolve => {
                if let Some(i) = m.runtime.open.remove(&key) {
                    m.runtime.incidents[i].resolved = true;
                    m.runtime.incidents[i].severity = Severity::None;
                }
            }
            _ => {
                if let Some(&i) = m.runtime.open.get(&key) {
                    let r = &mut m.runtime.incidents[i];
                    r.severity = n.severity;
                    r.max_severity = r.max_severity.max(n.severity);
                    r.ratio = n.ratio;
                }
            }
        }
        // Only traffic signals judge a fresh revision; security drift is the database's.
        if m.status.phase == Some(GatewayPhase::Promoting)
            && n.severity == Severity::Critical
            && n.event != IncidentEvent::Resolve
            && n.signal != crate::detect::engine::SECURITY_DRIFT
        {
            m.runtime.critical = Some(crate::notify::message::summary(&n));
        }
    }
    summarize_incidents(m);
}

/// Puts the open incidents, most severe first, in status.
pub(super) fn summarize_incidents(m: &mut Managed) {
    let mut open: Vec<IncidentSummary> = m
        .runtime
        .open
        .values()
        .map(|&i| {
            let r = &m.runtime.incidents[i];
            IncidentSummary {
                id: if r.route.is_empty() {
                    r.signal.clone()
                } else {
                    format!("{}/{}", r.route, r.signal)
                },
                signal: r.signal.clone(),
                route: r.route.clone(),
                severity: r.severity.label().to_string(),
                ratio: Some(r.ratio),
                opened_at: r.opened_at.clone(),
                acknowledged_by: r.acknowledged_by.clone(),
            }
        })
        .collect();
    open.sort_by_key(|i| std::cmp::Reverse(severity_rank(&i.severity)));
    m.status.open_incidents = open.len() as i32;
    m.status.incidents = open;
}

/// Sets `apitree_operator_open_incidents{severity}` from the gateways' open incidents.
pub fn count_open_incidents<'a>(
    gateways: impl Iterator<Item = &'a Managed>,
    metrics: &crate::operator::metrics::OperatorMetrics,
) {
    let mut counts = [0i64; 3];
    for m in gateways {
        for (c, n) in counts.iter_mut().zip(open_incident_counts(m)) {
            *c += n;
        }
    }
    set_open_incidents(counts, metrics);
}

/// One gateway's open incidents by severity: warning, high, critical.
pub fn open_incident_counts(m: &Managed) -> [i64; 3] {
    let mut counts = [0i64; 3];
    for i in &m.status.incidents {
        let rank = severity_rank(&i.severity) as usize;
        if (1..=3).contains(&rank) {
            counts[rank - 1] += 1;
        }
    }
    counts
}

/// Sets the open-incident gauges to `counts` (warning, high, critical).
pub fn set_open_incidents(counts: [i64; 3], metrics: &crate::operator::metrics::OperatorMetrics) {
    for (severity, n) in ["warning", "high", "critical"].iter().zip(counts) {
        metrics.open_incidents.with_label_values(&[severity]).set(n);
    }
}

/// Label matchers of the active color's proxy series in Prometheus (scraped by the chart's
/// PodMonitor, which labels them with namespace and pod).
pub(super) fn prometheus_selector(gateway: &str, color: Color) -> String {
    match gateway.split_once('/') {
        Some((ns, name)) => format!("namespace=\"{ns}\",pod=~\"{name}-{}-.*\"", color.as_str()),
        None => format!("pod=~\"{gateway}-{}-.*\"", color.as_str()),
    }
}

pub(super) fn severity_rank(s: &str) -> u8 {
    match s {
        "critical" => 3,
        "high" => 2,
        "warning" => 1,
        _ => 0,
    }
}
