//! The detector on synthetic traces, through the same replay command users tune with.

use std::process::Command;

use apitree::crd::gateway::DetectionSpec;
use apitree::detect::{replay, ScoreConfig, Severity};
use rand::{rngs::StdRng, RngExt, SeedableRng};

const T0: i64 = 1_767_225_600; // a Thursday, 00:00 UTC
const WINDOW: i64 = 300;

/// Diurnal traffic (quiet nights, busy afternoons) with a steady 1% error ratio and binomial
/// noise (normal approximation), one row per 5-minute window.
fn diurnal_week(seed: u64, spike: Option<(usize, usize, f64)>) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut csv = String::from("timestamp,requests,errors\n");
    for i in 0..(7 * 288) {
        let at = T0 + i as i64 * WINDOW;
        let hour = ((at % 86_400) as f64) / 3600.0;
        let level = 0.5 - 0.5 * ((hour - 3.0) / 24.0 * std::f64::consts::TAU).cos(); // 0 at 03:00, 1 at 15:00
        let requests = (40.0 + 4000.0 * level * rng.random_range(0.85..1.15)) as u64;
        let mut p = 0.01;
        if let Some((from, to, ratio)) = spike {
            if (from..to).contains(&i) {
                p *= ratio;
            }
        }
        let mean = requests as f64 * p;
        let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let errors = (mean + z * (mean * (1.0 - p)).sqrt())
            .round()
            .clamp(0.0, requests as f64) as u64;
        csv.push_str(&format!("{at},{requests},{errors}\n"));
    }
    csv
}

#[test]
fn a_steady_diurnal_week_with_noise_stays_silent() {
    let cfg = ScoreConfig::from(&DetectionSpec::default());
    for seed in 1..=5 {
        let rows = replay::replay(&diurnal_week(seed, None), &cfg).unwrap();
        assert_eq!(rows.len(), 2016);
        let loud: Vec<_> = rows
            .iter()
            .filter(|r| r.event.is_some() || r.severity != "none")
            .collect();
        assert!(loud.is_empty(), "seed {seed}: false alarms {loud:#?}");
    }
}

#[test]
fn an_error_burst_escalates_through_the_levels_and_resolves() {
    let cfg = ScoreConfig::from(&DetectionSpec::default());
    // Day 3 around 15:00: 20 minutes at 4x, 20 at 7x, 20 at 15x, then back to normal.
    let start = 2 * 288 + 180;
    let mut csv = String::from("timestamp,requests,errors\n");
    let base = diurnal_week(7, None);
    for (i, line) in base.lines().skip(1).enumerate() {
        let mut f: Vec<u64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let factor = match i.checked_sub(start) {
            Some(0..=3) => 4.0,
            Some(4..=7) => 7.0,
            Some(8..=11) => 15.0,
            _ => 1.0,
        };
        f[2] = ((f[2] as f64) * factor).min(f[1] as f64) as u64;
        csv.push_str(&format!("{},{},{}\n", f[0], f[1], f[2]));
    }
    let rows = replay::replay(&csv, &cfg).unwrap();
    let events: Vec<(i64, &str, &str)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.event.map(|e| (i as i64 - start as i64, e, r.severity)))
        .collect();
    assert_eq!(
        events.iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(),
        [
            ("open", "warning"),
            ("escalate", "high"),
            ("escalate", "critical"),
            // The six-hour burn's half-hour window still holds the burst for a while.
            ("deescalate", "warning"),
            ("resolve", "none")
        ],
        "{events:?}"
    );
    assert_eq!(events[0].0, 0, "opens in the first bad window");
    assert!(
        events[4].0 <= 12 + 8,
        "resolves within the half-hour burn window and the hysteresis after recovery: {events:?}"
    );
}

#[test]
fn the_replay_command_prints_one_json_object_per_row_and_rejects_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("w.csv");
    std::fs::write(&input, diurnal_week(3, Some((1044, 1050, 12.0)))).unwrap();
    let cfg = dir.path().join("d.yaml");
    std::fs::write(
        &cfg,
        "thresholds: { warning: 2, high: 4, critical: 8 }\nresolveAfterWindows: 2\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args([
            "detect",
            "replay",
            "--input",
            input.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2016);
    for key in [
        "timestamp",
        "baseline",
        "ratio",
        "p_value",
        "severity",
        "anomaly_score",
        "event",
    ] {
        assert!(
            rows[1044].get(key).is_some(),
            "{key} missing: {}",
            rows[1044]
        );
    }
    assert_eq!(rows[1044]["event"], "open");
    assert_eq!(rows[1044]["severity"], "critical");
    assert!(rows[1044]["anomaly_score"].as_f64().unwrap() > 0.9);

    std::fs::write(
        &input,
        "timestamp,requests,errors\n1767225600,100,1\n1767225900,ten,1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["detect", "replay", "--input", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3: requests \"ten\" is not a whole number"),
        "{err}"
    );

    std::fs::write(&cfg, "thresholds: { warning: 5, high: 4, critical: 8 }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args([
            "detect",
            "replay",
            "--input",
            input.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning < high < critical"));
}

mod common;

use apitree::detect::engine::{Detector, IncidentStore, NoticeContext};
use apitree::detect::source::{GatewayWindow, RouteWindow};
use apitree::notify::Notifier;
use std::sync::Arc;

/// A detector of `gateway` with the documented defaults.
fn detector(gateway: &str, store: Arc<IncidentStore>, notifier: Arc<Notifier>) -> Detector {
    Detector::new(
        gateway,
        ScoreConfig::from(&DetectionSpec::default()),
        NoticeContext::default(),
        store,
        notifier,
    )
}

fn window(shop: (u64, u64), cart: (u64, u64), auth_failures: u64) -> GatewayWindow {
    let mut w = GatewayWindow {
        auth_failures,
        ..Default::default()
    };
    w.routes.insert(
        "shop".into(),
        RouteWindow {
            requests: shop.0,
            errors: shop.1,
            ..Default::default()
        },
    );
    w.routes.insert(
        "cart".into(),
        RouteWindow {
            requests: cart.0,
            errors: cart.1,
            ..Default::default()
        },
    );
    w
}

#[tokio::test]
async fn the_engine_keeps_one_incident_per_route_and_signal_in_postgres_and_notifies_each_change() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let store = Arc::new(IncidentStore::Postgres(pool.clone()));
    let notifier = Arc::new(Notifier::recording());
    let ctx = NoticeContext {
        runbook_url: Some("https://runbooks.example/gw".into()),
        ..Default::default()
    };
    let mut d = Detector::new(
        "apis/marketplace",
        ScoreConfig::from(&DetectionSpec::default()),
        ctx,
        store.clone(),
        notifier.clone(),
    );
    for i in 0..12 {
        assert!(d
            .observe(T0 + i * WINDOW, &window((5000, 50), (3000, 30), 20))
            .await
            .unwrap()
            .is_empty());
    }
    // Shop breaks at 12x; cart stays healthy; a burst of bad keys hits auth.
    let n = d
        .observe(T0 + 12 * WINDOW, &window((5000, 600), (3000, 31), 900))
        .await
        .unwrap();
    let opened: Vec<(String, String, &str)> = n
        .iter()
        .map(|x| (x.route.clone(), x.signal.clone(), x.severity.label()))
        .collect();
    assert_eq!(
        opened,
        [
            ("shop".to_string(), "error ratio".to_string(), "critical"),
            (String::new(), "auth failures".to_string(), "critical")
        ]
    );
    let open = store.open().await.unwrap();
    assert_eq!(open.len(), 2);
    let shop_id = n[0].incident_id;
    assert!(open.iter().any(|i| i.id == shop_id && i.route == "shop"));

    for i in 13..16 {
        d.observe(T0 + i * WINDOW, &window((5000, 50), (3000, 30), 20))
            .await
            .unwrap();
    }
    assert!(
        store.open().await.unwrap().is_empty(),
        "both resolved after three quiet windows"
    );
    let (max, resolved): (String, bool) = sqlx::query_as(
        "SELECT max_severity::text, resolved_at IS NOT NULL FROM incidents WHERE id = $1",
    )
    .bind(shop_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((max.as_str(), resolved), ("critical", true));
    let seen = notifier.recorded();
    assert_eq!(seen.len(), 4, "two opens, two resolves");
    assert!(seen.iter().all(|s| s.runbook_url.is_some()));
    assert_eq!(
        seen.iter().filter(|s| s.incident_id == shop_id).count(),
        2,
        "the resolve refers to the same incident"
    );
}

/// A detector that restarts (a new process, a leader change) takes up where the last one left
/// off from PostgreSQL: the open incident is escalated, acknowledged and resolved as the same
/// incident (no second one, no refused insert), its Slack messages continue under new outbox
/// keys (none dropped as a duplicate), and the baseline is the one learned before the restart.
#[tokio::test]
async fn a_restarted_detector_takes_up_its_open_incidents_and_baselines_from_postgres() {
    use apitree::detect::engine::Response;
    use apitree::detect::incident::IncidentEvent;
    use apitree::notify::{outbox::Outbox, Channels};
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let store = Arc::new(IncidentStore::Postgres(pool.clone()));
    let notifier = Arc::new(Notifier::Slack {
        outbox: Arc::new(Outbox::postgres(pool.clone())),
        channels: Channels {
            warning: "C-ONCALL".into(),
            high: None,
            critical: None,
        },
    });
    let detector = || detector("apis/marketplace", store.clone(), notifier.clone());
    let quiet = window((5000, 50), (3000, 30), 20);
    let mut first = detector();
    for i in 0..12 {
        assert!(first
            .observe(T0 + i * WINDOW, &quiet)
            .await
            .unwrap()
            .is_empty());
    }
    // 4x on shop: an incident below critical.
    let opened = first
        .observe(T0 + 12 * WINDOW, &window((5000, 200), (3000, 30), 20))
        .await
        .unwrap();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].event, IncidentEvent::Open);
    assert!(opened[0].severity < Severity::Critical);
    let id = opened[0].incident_id;
    drop(first);

    // A new process: 12x on shop escalates the same incident, scored against the baseline
    // learned before (1%), not a cold start.
    let mut second = detector();
    let escalated = second
        .observe(T0 + 13 * WINDOW, &window((5000, 600), (3000, 30), 20))
        .await
        .unwrap();
    assert_eq!(escalated.len(), 1, "{escalated:?}");
    let e = &escalated[0];
    assert_eq!(
        (e.incident_id, e.event, e.severity),
        (id, IncidentEvent::Escalate, Severity::Critical)
    );
    assert!((e.baseline - 0.01).abs() < 0.002, "baseline {}", e.baseline);
    assert_eq!(
        store.open().await.unwrap().len(),
        1,
        "one incident, not two"
    );
    drop(second);

    // Another restart: a Slack press finds the incident and updates its message.
    let mut third = detector();
    let acked = third
        .respond(id, "U0ONCALL", Response::Acknowledge)
        .await
        .unwrap()
        .expect("the open incident is known after a restart");
    assert_eq!(acked.severity, Severity::Critical);
    for i in 14..17 {
        third.observe(T0 + i * WINDOW, &quiet).await.unwrap();
    }
    assert!(store.open().await.unwrap().is_empty(), "resolved");

    // Every change reached the outbox under its own key: open, escalate, press, resolve.
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT dedupe_key FROM notification_outbox WHERE incident_id = $1 AND kind <> 'reply' ORDER BY id",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        keys,
        ["main", "update", "update", "update"]
            .iter()
            .enumerate()
            .map(|(i, kind)| format!("{id}:{}:{kind}", i + 1))
            .collect::<Vec<_>>()
    );
}

/// Credential changes page people: each change in the audit log is a notice in the gateway's
/// channel saying who did what when (never the row's detail, where a secret could hide), the
/// same notice id every time it is seen (delivered once), and a burst of five or more in one
/// window is an incident of its own, resolved by the next quieter window.
#[tokio::test]
async fn credential_changes_are_each_a_notice_and_a_burst_is_an_incident() {
    use apitree::db::audit::AuditRow;
    use apitree::detect::engine::CREDENTIAL_CHANGES;
    use apitree::detect::incident::IncidentEvent;
    let store = Arc::new(IncidentStore::memory());
    let notifier = Arc::new(Notifier::recording());
    let mut d = detector("apis/marketplace", store.clone(), notifier.clone());
    let row = |id: i64, action: &str| AuditRow {
        id,
        at: chrono::DateTime::from_timestamp(T0 + id, 0).unwrap(),
        actor: "jiwoo@example.com".into(),
        action: action.into(),
        target: format!("at_live_Xy3k{id:04}"),
        org_id: None,
        detail: r#"{"plaintext":"at_live_SECRETSECRETSECRET"}"#.into(),
        prev_hash: Vec::new(),
        hash: Vec::new(),
    };
    let few = vec![
        row(1, "key.rotate"),
        row(2, "org.rename"),
        row(3, "credential.write"),
        row(4, "key.revoke"),
    ];
    assert_eq!(d.credential_changes(T0, &few).await.unwrap(), None);
    let notes = notifier.recorded_notes();
    assert_eq!(notes.len(), 3, "org.rename is not a credential change");
    assert!(notes[0]
        .text
        .contains("key.rotate at_live_Xy3k0001 by jiwoo@example.com at "));
    assert!(notes
        .iter()
        .all(|n| !n.text.contains("SECRET") && !n.urgent));
    // Seen again (a re-read): the same notice ids, so the outbox sends each once.
    d.credential_changes(T0, &few[..1]).await.unwrap();
    assert_eq!(notifier.recorded_notes()[3].id, notes[0].id);

    let burst: Vec<AuditRow> = (10..15).map(|i| row(i, "key.create")).collect();
    let opened = d
        .credential_changes(T0 + WINDOW, &burst)
        .await
        .unwrap()
        .expect("five changes in one window are an incident");
    assert_eq!(
        (opened.signal.as_str(), opened.event, opened.severity),
        (CREDENTIAL_CHANGES, IncidentEvent::Open, Severity::High)
    );
    let resolved = d
        .credential_changes(T0 + 2 * WINDOW, &[])
        .await
        .unwrap()
        .expect("a quiet window resolves it");
    assert_eq!(
        (resolved.incident_id, resolved.event),
        (opened.incident_id, IncidentEvent::Resolve)
    );
    assert!(store.open().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_acknowledged_incident_says_who_and_a_silenced_one_posts_only_critical_changes() {
    use apitree::detect::engine::Response;
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let store = Arc::new(IncidentStore::Postgres(pool.clone()));
    let notifier = Arc::new(Notifier::recording());
    let mut d = detector("apis/marketplace", store.clone(), notifier.clone());
    for i in 0..12 {
        d.observe(T0 + i * WINDOW, &window((5000, 50), (3000, 30), 20))
            .await
            .unwrap();
    }
    // 4x: a warning opens.
    let opened = d
        .observe(T0 + 12 * WINDOW, &window((5000, 200), (3000, 30), 20))
        .await
        .unwrap();
    assert_eq!(opened.len(), 1);
    let id = opened[0].incident_id;

    let ack = d
        .respond(id, "U1", Response::Acknowledge)
        .await
        .unwrap()
        .expect("the incident is open here");
    assert_eq!(ack.acknowledged_by.as_deref(), Some("U1"));
    assert_eq!(ack.remark.as_deref(), Some("acknowledged by <@U1>"));
    assert_eq!(
        ack.severity, opened[0].severity,
        "a response changes no severity"
    );
    let until = T0 + 13 * WINDOW + 3600;
    let silenced = d
        .respond(id, "U2", Response::Silence { until })
        .await
        .unwrap()
        .unwrap();
    assert!(silenced.remark.unwrap().contains("silenced by <@U2>"));
    let (by, silenced_until): (Option<String>, Option<f64>) = sqlx::query_as(
        "SELECT acknowledged_by, extract(epoch FROM silenced_until)::float8 FROM incidents WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(by.as_deref(), Some("U1"));
    assert_eq!(silenced_until, Some(until as f64));
    let stored = store.open().await.unwrap();
    assert_eq!(stored[0].silenced_until, Some(until));
    let posted = notifier.recorded().len();
    assert_eq!(posted, 3, "open, acknowledged, silenced");

    // 6x while silenced: recorded, not posted.
    let high = d
        .observe(T0 + 13 * WINDOW, &window((5000, 300), (3000, 30), 20))
        .await
        .unwrap();
    assert_eq!(high[0].severity, Severity::High);
    assert_eq!(
        notifier.recorded().len(),
        posted,
        "a silenced escalation below critical is not posted"
    );
    // 14x: critical gets through the silence, still showing who acknowledged.
    let critical = d
        .observe(T0 + 14 * WINDOW, &window((5000, 700), (3000, 30), 20))
        .await
        .unwrap();
    assert_eq!(critical[0].severity, Severity::Critical);
    let last = notifier.recorded().pop().unwrap();
    assert_eq!(last.severity, Severity::Critical);
    assert_eq!(last.acknowledged_by.as_deref(), Some("U1"));
    assert!(last.remark.is_none());

    assert!(
        d.respond(uuid::Uuid::new_v4(), "U1", Response::Acknowledge)
            .await
            .unwrap()
            .is_none(),
        "an incident of another gateway is not this detector's"
    );
}

#[tokio::test]
async fn breaker_opens_and_latency_jumps_are_signals_too() {
    let store = Arc::new(IncidentStore::memory());
    let notifier = Arc::new(Notifier::recording());
    let mut d = detector("gw", store.clone(), notifier.clone());
    let with = |p99: f64, open: bool| {
        let mut w = window((5000, 50), (3000, 30), 20);
        let shop = w.routes.get_mut("shop").unwrap();
        shop.p99_ms = Some(p99);
        shop.breaker_open = open;
        w
    };
    for i in 0..12 {
        d.observe(T0 + i * WINDOW, &with(80.0 + (i % 3) as f64, false))
            .await
            .unwrap();
    }
    let n = d
        .observe(T0 + 12 * WINDOW, &with(2_000.0, true))
        .await
        .unwrap();
    let got: Vec<(&str, &str, &str)> = n
        .iter()
        .map(|x| (x.signal.as_str(), x.event.label(), x.severity.label()))
        .collect();
    assert_eq!(
        got,
        [
            ("p99 latency", "open", "critical"),
            ("circuit open", "open", "high")
        ]
    );
    let n = d
        .observe(T0 + 13 * WINDOW, &with(81.0, false))
        .await
        .unwrap();
    assert!(
        n.iter()
            .any(|x| x.signal == "circuit open" && x.event.label() == "resolve"),
        "{n:?}"
    );
}

#[tokio::test]
async fn credential_changes_from_the_audit_log_are_attached_to_the_auth_incident_that_follows() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let notifier = Arc::new(Notifier::recording());
    let mut d = detector("gw", Arc::new(IncidentStore::memory()), notifier.clone());
    apitree::db::audit::append(
        &pool,
        "cli:ops",
        "key.rotate",
        "at_live_Xy3kQ9ab",
        None,
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    apitree::db::audit::append(
        &pool,
        "cli:ops",
        "org.create",
        "acme",
        None,
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    let rows = apitree::db::audit::read_rows(&pool, 0, 100).await.unwrap();
    d.note_audit(&rows);
    // Quiet history up to just before the rotation, then an auth spike in the window that
    // contains it.
    let start = rows[0].at.timestamp() - 12 * WINDOW - 60;
    for i in 0..12 {
        d.observe(start + i * WINDOW, &window((5000, 50), (3000, 30), 20))
            .await
            .unwrap();
    }
    let n = d
        .observe(start + 12 * WINDOW, &window((5000, 50), (3000, 30), 2_000))
        .await
        .unwrap();
    let auth = n
        .iter()
        .find(|x| x.signal == "auth failures")
        .expect("auth incident");
    assert_eq!(auth.related_changes.len(), 1, "{:?}", auth.related_changes);
    assert!(auth.related_changes[0].starts_with("key.rotate at_live_Xy3kQ9ab at "));
    let blocks = apitree::notify::message::incident_blocks(auth).to_string();
    assert!(blocks.contains("Recent credential changes"), "{blocks}");
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// `detect replay` streams: each window's verdict is printed before the next rows arrive, and
/// memory stays flat however long the input is. The detector's own history is bounded (five
/// weeks of windows), so the first phase feeds more than that; the second feeds ten times
/// as much again, and the process's peak resident memory must not grow with it (an
/// implementation that holds the input grows by hundreds of MB here).
#[test]
fn replay_streams_its_verdicts_and_memory_stays_flat_as_the_input_grows() {
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut child = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["detect", "replay", "--input", "-", "--format", "json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let printed = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stdout, printed) = (child.stdout.take().unwrap(), printed.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                assert!(line.starts_with('{'), "{line}");
                printed.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut stdin = std::io::BufWriter::new(child.stdin.take().unwrap());
    writeln!(stdin, "timestamp,requests,errors").unwrap();
    let mut row = 0u64;
    let mut feed = |rows: u64, stdin: &mut std::io::BufWriter<_>| {
        for _ in 0..rows {
            let errors = 10 + (row * 7919) % 5;
            writeln!(stdin, "{},1000,{errors}", T0 + row as i64 * 60).unwrap();
            row += 1;
        }
        stdin.flush().unwrap();
        // The rows fed are answered while the input is still open (all but what sits in the
        // output buffer: a few KiB of lines).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while printed.load(Ordering::SeqCst) + 1000 < row {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {row} rows answered before the input ended",
                printed.load(Ordering::SeqCst)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak_rss_kib(pid)
    };
    let warm = feed(80_000, &mut stdin);
    let after = feed(800_000, &mut stdin);
    eprintln!("peak RSS: {warm} KiB after 80,000 rows, {after} KiB after 880,000");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        after < warm + 16 * 1024,
        "peak memory grew from {warm} KiB to {after} KiB over 800,000 more rows"
    );
}
