//! What an incident looks like in Slack: one Block Kit message (title, severity, ratio vs
//! baseline, p-value, window, gateway/route, runbook hint, links, buttons) kept up to date,
//! and one thread reply per change. Built from the notice alone: no secret can reach it.

use serde_json::{json, Value};

use super::{Note, RolloutNotice};
use crate::detect::engine::is_event_signal;
use crate::detect::IncidentNotice;
use crate::detect::{IncidentEvent, Severity};

fn emoji(s: Severity) -> &'static str {
    match s {
        Severity::Critical => ":red_circle:",
        Severity::High => ":large_orange_circle:",
        Severity::Warning => ":large_yellow_circle:",
        Severity::None => ":white_check_mark:",
    }
}

/// The one-line summary (also the notification text and the message's fallback).
pub fn summary(n: &IncidentNotice) -> String {
    let state = state_label(n);
    let route = if n.route.is_empty() {
        "all routes".to_string()
    } else if n.signal == crate::detect::engine::AGENT_LOST {
        format!("agent {}", n.route)
    } else {
        format!("route {}", n.route)
    };
    if is_event_signal(&n.signal) {
        return format!(
            "{} {state}: {} on {} ({route})",
            emoji(n.severity),
            n.signal,
            n.gateway
        );
    }
    format!(
        "{} {state}: {} on {} ({route}) at {:.1}x baseline",
        emoji(n.severity),
        n.signal,
        n.gateway,
        n.ratio
    )
}

/// The header's state: the severity, or RESOLVED.
fn state_label(n: &IncidentNotice) -> String {
    if n.event == IncidentEvent::Resolve {
        "RESOLVED".into()
    } else {
        n.severity.label().to_uppercase()
    }
}

/// The main message's blocks.
pub fn incident_blocks(n: &IncidentNotice) -> Value {
    let mut fields =
        vec![json!({"type": "mrkdwn", "text": format!("*Severity*\n{}", n.severity.label())})];
    if !is_event_signal(&n.signal) {
        fields.extend([
            json!({"type": "mrkdwn", "text": format!("*Ratio vs baseline*\n{:.1}x ({:.3}% vs {:.3}%)", n.ratio, n.current * 100.0, n.baseline * 100.0)}),
            json!({"type": "mrkdwn", "text": format!("*p-value*\n{}", crate::detect::p_text(n.p_value).trim_start_matches("p="))}),
        ]);
    }
    fields.extend([
        json!({"type": "mrkdwn", "text": format!("*Window*\n{}s ending {}", n.window_secs, n.at)}),
        json!({"type": "mrkdwn", "text": format!("*Gateway*\n{}", n.gateway)}),
        json!({"type": "mrkdwn", "text": format!("*{}*\n{}", if n.signal == crate::detect::engine::AGENT_LOST { "Agent" } else { "Route" }, if n.route.is_empty() { "-" } else { &n.route })}),
    ]);
    if let Some(who) = &n.acknowledged_by {
        fields.push(json!({"type": "mrkdwn", "text": format!("*Acknowledged*\n<@{who}>")}));
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": format!("{} {} on {}", state_label(n), n.signal, n.gateway)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": summary(n)}, "fields": fields}),
    ];
    let mut hint = format!(
        "Runbook: {}",
        n.runbook_url.as_deref().unwrap_or(
            "check the gateway's recent rollout, its upstream health and `kubectl describe agw`"
        )
    );
    if let Some(url) = &n.status_url {
        hint.push_str(&format!(" · <{url}|status page>"));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": hint}]}));
    if !n.related_changes.is_empty() {
        let list = n
            .related_changes
            .iter()
            .map(|c| format!("• {}", slack_literal(c, 300)))
            .collect::<Vec<_>>()
            .join("\n");
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*Recent credential changes*\n{list}")}}));
    }
    if n.event != IncidentEvent::Resolve {
        let id = n.incident_id.to_string();
        let mut buttons = vec![
            json!({"type": "button", "action_id": "ack", "text": {"type": "plain_text", "text": "Acknowledge"}, "value": id}),
            json!({"type": "button", "action_id": "silence_1h", "text": {"type": "plain_text", "text": "Silence 1h"}, "value": id}),
        ];
        if let Some(rev) = &n.rollout_revision {
            buttons.push(json!({"type": "button", "action_id": "promote", "style": "primary", "text": {"type": "plain_text", "text": "Promote"}, "value": format!("{id}:{rev}")}));
            buttons.push(json!({"type": "button", "action_id": "rollback", "style": "danger", "text": {"type": "plain_text", "text": "Roll back"}, "value": format!("{id}:{rev}")}));
        }
        blocks
            .push(json!({"type": "actions", "block_id": "incident_actions", "elements": buttons}));
    }
    Value::Array(blocks)
}

/// The thread reply recording one change.
pub fn change_text(n: &IncidentNotice) -> String {
    if let Some(remark) = &n.remark {
        return format!("{} {remark}", emoji(n.severity));
    }
    let what = match n.event {
        IncidentEvent::Open => "opened",
        IncidentEvent::Escalate => "escalated",
        IncidentEvent::Deescalate => "de-escalated",
        IncidentEvent::Resolve => "resolved",
    };
    let mention = match (&n.critical_mention, n.severity, n.event) {
        (Some(group), Severity::Critical, IncidentEvent::Open | IncidentEvent::Escalate) => {
            format!("<!subteam^{group}> ")
        }
        _ => String::new(),
    };
    if is_event_signal(&n.signal) {
        return format!(
            "{mention}{} {what} to *{}* at {}",
            emoji(n.severity),
            n.severity.label(),
            n.at
        );
    }
    format!(
        "{mention}{} {what} to *{}* at {}: {:.1}x baseline, {}",
        emoji(n.severity),
        n.severity.label(),
        n.at,
        n.ratio,
        crate::detect::p_text(n.p_value)
    )
}

/// Text from outside (a gate's reason can quote what a Connector Agent reported) as Slack
/// shows it literally: `&`, `<` and `>` escaped, so it cannot mention `<!channel>` or dress a
/// link as a button; cut to `max` characters (a section holds 3000).
pub fn slack_literal(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// The longest reason a rollout message shows (a section's text holds 3000 characters).
const ROLLOUT_REASON_MAX: usize = 2000;

/// A rollout notice's fields as Slack shows them literally: kind, gateway, revision, progress
/// and reason.
fn rollout_fields(n: &RolloutNotice) -> [String; 5] {
    [
        slack_literal(&n.kind, 64),
        slack_literal(&n.gateway, 253),
        slack_literal(&n.revision, 64),
        slack_literal(&n.progress, 16),
        slack_literal(&n.reason, ROLLOUT_REASON_MAX),
    ]
}

/// A rollout notice's one line for Slack (the notification text and the fallback).
pub fn rollout_text(n: &RolloutNotice) -> String {
    let [kind, gateway, revision, progress, reason] = rollout_fields(n);
    format!("rollout {gateway}: {kind} revision {revision} (gate {progress}): {reason}")
}

/// A rollout step: what happened, the gate's progress and the reason, with Promote / Roll back
/// buttons while a person can still decide.
pub fn rollout_blocks(n: &RolloutNotice) -> Value {
    let [kind, gateway, revision, progress, reason] = rollout_fields(n);
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!(
            "*{kind}* · gateway `{gateway}` · revision `{revision}` · gate {progress}\n{reason}"
        )}}),
    ];
    let value = format!("{}:{}", n.id, n.revision);
    let mut buttons = Vec::new();
    if n.promote_button {
        buttons.push(json!({"type": "button", "action_id": "promote", "style": "primary", "text": {"type": "plain_text", "text": "Promote"}, "value": value}));
    }
    if n.rollback_button {
        buttons.push(json!({"type": "button", "action_id": "rollback", "style": "danger", "text": {"type": "plain_text", "text": "Roll back"}, "value": value}));
    }
    if !buttons.is_empty() {
        blocks.push(json!({"type": "actions", "block_id": "rollout_actions", "elements": buttons}));
    }
    Value::Array(blocks)
}

/// A reminder with a "Rotate now" button behind a confirmation dialog that says where the new
/// key will be (it is never posted).
pub fn note_blocks(n: &Note, text: &str) -> Value {
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})];
    if let Some(b) = &n.rotate {
        let namespace = b.policy.split('/').next().unwrap_or_default();
        let confirm = json!({
            "title": {"type": "plain_text", "text": "Rotate this API key?"},
            "text": {"type": "mrkdwn", "text": format!(
                "A new key replaces `{}`; the old key keeps working for {}. The new key is written to Secret `{}` in namespace `{namespace}`, never to Slack.",
                b.key_prefix, b.grace, crate::crd::credential_policy::ROTATED_KEYS_SECRET)},
            "confirm": {"type": "plain_text", "text": "Rotate"},
            "deny": {"type": "plain_text", "text": "Cancel"},
        });
        blocks.push(
            json!({"type": "actions", "block_id": "rotation_actions", "elements": [
                {"type": "button", "action_id": "rotate_key", "style": "primary",
                 "text": {"type": "plain_text", "text": "Rotate now"},
                 "value": b.value(n.id), "confirm": confirm}
            ]}),
        );
    }
    Value::Array(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::engine::SIGNALS;

    fn notice(signal: &str, event: IncidentEvent, severity: Severity) -> IncidentNotice {
        IncidentNotice {
            incident_id: uuid::Uuid::nil(),
            seq: 1,
            gateway: "shop/api".into(),
            route: String::new(),
            signal: signal.into(),
            severity,
            event,
            ratio: 6.2,
            current: 0.062,
            baseline: 0.01,
            p_value: 1e-9,
            window_secs: 60,
            at: "2026-12-04T10:00:00Z".into(),
            runbook_url: None,
            status_url: None,
            rollout_revision: None,
            acknowledged_by: None,
            remark: None,
            critical_mention: None,
            related_changes: vec![],
        }
    }

    /// A ratio and a p-value are shown for scored signals only (an event such as drift found
    /// has none: "1.0x baseline, p=0.00e0" would mislead), and a resolved incident's header
    /// says RESOLVED, never the severity "NONE".
    #[test]
    fn ratios_only_for_scored_signals_and_resolved_headers_say_so() {
        for signal in SIGNALS {
            for (event, severity) in [
                (IncidentEvent::Open, Severity::Critical),
                (IncidentEvent::Escalate, Severity::High),
                (IncidentEvent::Resolve, Severity::None),
            ] {
                let n = notice(signal, event, severity);
                let blocks = incident_blocks(&n);
                let texts = [summary(&n), change_text(&n), blocks.to_string()];
                let shows_ratio = texts
                    .iter()
                    .any(|t| t.contains("baseline") || t.contains("p=") || t.contains("p-value"));
                let scored = ["error ratio", "auth failures", "p99 latency"].contains(&signal);
                assert_eq!(shows_ratio, scored, "{signal}: {texts:?}");
                let header = blocks[0]["text"]["text"].as_str().unwrap();
                let want = if event == IncidentEvent::Resolve {
                    "RESOLVED"
                } else {
                    severity.label()
                };
                assert!(
                    header.to_uppercase().starts_with(&want.to_uppercase())
                        && !header.contains("NONE"),
                    "{header}"
                );
            }
        }
    }

    /// Whatever a rollout's reason holds (it can quote what an agent reported), Slack shows
    /// it as text: no mention, no link, no markup escapes it, and it fits in a section.
    #[test]
    fn a_rollout_reason_is_shown_literally_and_fits_a_section() {
        let hostile =
            "got 200 <!channel> <https://evil.example/approve|Promote: click here> & <@U123> "
                .to_string()
                + &"x".repeat(8000);
        let n = RolloutNotice {
            id: uuid::Uuid::nil(),
            gateway: "shop/api".into(),
            kind: "Rejected".into(),
            revision: "abc123".into(),
            reason: hostile,
            progress: "2/5".into(),
            promote_button: false,
            rollback_button: false,
        };
        let blocks = rollout_blocks(&n);
        let section = blocks[0]["text"]["text"].as_str().unwrap();
        for text in [section, rollout_text(&n).as_str()] {
            assert!(
                !text.contains('<') && !text.contains('>'),
                "{}",
                &text[..200]
            );
            assert!(text.contains("&lt;!channel&gt;") && text.contains("&amp;"));
            assert!(text.chars().count() < 3000, "{}", text.chars().count());
        }
    }
}
