//! Slack delivery against a local stand-in for the Slack Web API: update in place, threading,
//! 429 and 500 handling, no loss across a restart (PostgreSQL outbox), signed interactions.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use apitree::detect::{IncidentEvent, Severity};
use apitree::notify::{
    outbox::{Kind, Outbox},
    slack::{self, Action, InteractionError, SlackDelivery},
    Notifier,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use uuid::Uuid;

use common::slack::{channels, config, notice, slack_calls, start_stand_in, StandIn, TOKEN};

/// A Slack notifier over an in-memory outbox, its delivery to the stand-in, and the stand-in.
async fn slack_to_stand_in() -> (Notifier, SlackDelivery, Arc<Mutex<StandIn>>) {
    let (addr, stand_in) = start_stand_in().await;
    let outbox = Arc::new(Outbox::memory());
    let notifier = Notifier::Slack {
        outbox: outbox.clone(),
        channels: channels(),
    };
    (
        notifier,
        SlackDelivery::new(&config(addr), outbox),
        stand_in,
    )
}

async fn drain(delivery: &SlackDelivery) {
    for _ in 0..20 {
        let r = delivery.deliver_due().await.unwrap();
        if r.delivered == 0 && r.failed == 0 {
            return;
        }
    }
}

#[tokio::test]
async fn one_message_per_incident_updated_in_place_with_a_threaded_history() {
    let (notifier, delivery, stand_in) = slack_to_stand_in().await;
    let id = Uuid::new_v4();
    notifier
        .notify(&notice(id, 1, IncidentEvent::Open, Severity::Warning, 3.5))
        .await
        .unwrap();
    notifier
        .notify(&notice(
            id,
            2,
            IncidentEvent::Escalate,
            Severity::Critical,
            12.0,
        ))
        .await
        .unwrap();
    notifier
        .notify(&notice(id, 3, IncidentEvent::Resolve, Severity::None, 1.0))
        .await
        .unwrap();
    // A duplicate of an already queued change is ignored.
    notifier
        .notify(&notice(id, 3, IncidentEvent::Resolve, Severity::None, 1.0))
        .await
        .unwrap();
    drain(&delivery).await;

    let calls = stand_in.lock().unwrap().calls.clone();
    let methods: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        methods,
        [
            "chat.postMessage",
            "chat.postMessage",
            "chat.update",
            "chat.postMessage",
            "chat.postMessage",
            "chat.update",
            "chat.postMessage"
        ],
        "post, reply, update, reply, cross-post to the critical channel, update, reply"
    );
    let main_ts = "1700000000.000001";
    assert_eq!(calls[0].1["channel"], "C-WARN");
    assert!(calls[0].1["blocks"].to_string().contains("Acknowledge"));
    assert_eq!(calls[1].1["thread_ts"], main_ts);
    assert_eq!(calls[2].1["ts"], main_ts);
    assert_eq!(calls[2].1["channel"], "C-WARN");
    assert!(calls[2].1["text"].as_str().unwrap().contains("CRITICAL"));
    assert!(
        calls[3].1["text"]
            .as_str()
            .unwrap()
            .contains("<!subteam^S0ONCALL>"),
        "critical mentions on-call"
    );
    assert_eq!(calls[4].1["channel"], "C-CRIT");
    assert!(calls[4].1.get("thread_ts").is_none());
    assert!(calls[5].1["text"].as_str().unwrap().contains("RESOLVED"));
    assert!(
        !calls[5].1["blocks"].to_string().contains("Acknowledge"),
        "a resolved incident has no buttons"
    );
    for (_, body, auth) in &calls {
        assert!(
            !body.to_string().contains(TOKEN),
            "the token leaked into a payload"
        );
        assert_eq!(auth, &format!("Bearer {TOKEN}"));
    }
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_and_nothing_is_lost_across_a_restart() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let (addr, stand_in) = start_stand_in().await;
    stand_in.lock().unwrap().failures = vec![429, 500, 500];
    let notifier = Notifier::Slack {
        outbox: Arc::new(Outbox::postgres(pool.clone())),
        channels: channels(),
    };
    let id = Uuid::new_v4();
    notifier
        .notify(&notice(id, 1, IncidentEvent::Open, Severity::High, 6.0))
        .await
        .unwrap();

    {
        // First process: Slack answers 429 then 500; the rows stay in the outbox.
        let delivery = SlackDelivery::new(&config(addr), Arc::new(Outbox::postgres(pool.clone())));
        let r = delivery.deliver_due().await.unwrap();
        assert_eq!((r.delivered, r.failed), (0, 1));
        let retry_in: f64 = sqlx::query_scalar("SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM notification_outbox WHERE kind = 'main'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(
            retry_in > 0.5 && retry_in <= 1.1,
            "429 honours Retry-After: 1 (got {retry_in})"
        );
        assert_eq!(
            delivery.deliver_due().await.unwrap().delivered,
            0,
            "not retried before Retry-After"
        );
    }
    // Restart: a new delivery process picks the rows up and retries through the 500s.
    let delivery = SlackDelivery::new(&config(addr), Arc::new(Outbox::postgres(pool.clone())));
    let mut delivered = 0;
    for _ in 0..40 {
        sqlx::query(
            "UPDATE notification_outbox SET next_attempt_at = now() WHERE delivered_at IS NULL",
        )
        .execute(&pool)
        .await
        .unwrap();
        delivered += delivery.deliver_due().await.unwrap().delivered;
        if delivered == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(delivered, 2, "main message and thread reply both delivered");
    let (attempts, last_error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM notification_outbox WHERE kind = 'main'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 4, "three failures and one success");
    assert!(!last_error.unwrap_or_default().contains(TOKEN));
    let calls = stand_in.lock().unwrap().calls.len();
    assert_eq!(calls, 5);
    assert_eq!(
        Outbox::postgres(pool.clone())
            .pending_count()
            .await
            .unwrap(),
        0
    );
}

/// Two deliverers (a new leader while the old one finishes, or a second replica) never take
/// the same row: a row another deliverer holds is skipped without waiting, and a row handed
/// out is not handed out again until its claim lapses; a deliverer killed before it marked its
/// rows leaves them to the next one once the claim lapses (nothing lost).
#[tokio::test]
async fn two_deliverers_never_take_the_same_row_and_a_dead_ones_rows_come_back() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let outbox = Outbox::postgres(pool.clone());
    for i in 0..6 {
        outbox
            .enqueue(
                Uuid::new_v4(),
                Kind::Main,
                "C1",
                json!({"text": i}),
                &format!("k{i}"),
            )
            .await
            .unwrap();
    }
    // Another deliverer is in the middle of claiming the first row.
    let mut other = pool.begin().await.unwrap();
    let held: i64 =
        sqlx::query_scalar("SELECT id FROM notification_outbox ORDER BY id LIMIT 1 FOR UPDATE")
            .fetch_one(&mut *other)
            .await
            .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), outbox.due(4))
        .await
        .expect("a row another deliverer holds is skipped, not waited for")
        .unwrap();
    let second = Outbox::postgres(pool.clone()).due(10).await.unwrap();
    other.rollback().await.unwrap();
    let ids =
        |rows: &[apitree::notify::outbox::Pending]| rows.iter().map(|r| r.id).collect::<Vec<_>>();
    let (first, second) = (ids(&first), ids(&second));
    assert_eq!(first.len(), 4);
    assert!(!first.contains(&held) && !second.contains(&held));
    assert!(
        first.iter().all(|id| !second.contains(id)),
        "{first:?} {second:?}"
    );
    assert_eq!(first.len() + second.len(), 5);
    // Claimed rows are not due again; the row the other deliverer let go of is.
    assert_eq!(ids(&outbox.due(10).await.unwrap()), [held]);
    // The deliverer holding `first` dies: once its claim lapses, they come back.
    sqlx::query("UPDATE notification_outbox SET next_attempt_at = now() WHERE id = ANY($1)")
        .bind(&first)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(ids(&outbox.due(10).await.unwrap()), first);
    let claim: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM notification_outbox WHERE id = $1",
    )
    .bind(first[0])
    .fetch_one(&pool)
    .await
    .unwrap();
    let lease = apitree::notify::outbox::CLAIM_FOR.as_secs_f64();
    assert!(
        claim > lease - 5.0 && claim <= lease,
        "claimed for {claim}s"
    );
}

/// `apitree local` with and without `--database-url`, as a user runs it: Slack through a
/// stand-in, the status port on a free address. Stopped with SIGKILL when dropped.
struct Local {
    child: std::process::Child,
    http: SocketAddr,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Local {
    fn start(slack: SocketAddr, database_url: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stderr = dir.path().join("stderr");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_apitree"));
        cmd.args(["local", "-f"])
            .arg(dir.path())
            .args(["--http", &http.to_string()])
            .env("SLACK_BOT_TOKEN", TOKEN)
            .env("SLACK_API_URL", format!("http://{slack}/api"))
            .env_remove("DATABASE_URL")
            .env_remove("APITREE_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(url) = database_url {
            cmd.args(["--database-url", url]);
        }
        Self {
            child: cmd.spawn().unwrap(),
            http,
            stderr,
            _dir: dir,
        }
    }

    /// `/readyz` once the loop has made a pass.
    async fn ready(&self) -> Value {
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", self.http)).await {
                if r.status() == 200 {
                    return r.json().await.unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "apitree local never got ready: {}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `--database-url`, a notification accepted by a process that is then killed (SIGKILL,
/// before delivery) is delivered by the next process, once, and a process killed after
/// delivering does not deliver again; `/readyz` says where state lives. Without a database,
/// the process says at start that state is kept in memory, and `/readyz` says `memory`.
#[tokio::test]
async fn with_a_database_accepted_notifications_survive_a_kill_and_are_delivered_once() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let (addr, stand_in) = start_stand_in().await;
    // Accepted by a process that died before delivering: in the outbox, undelivered.
    let accepted = Notifier::Slack {
        outbox: Arc::new(Outbox::postgres(pool.clone())),
        channels: channels(),
    };
    let id = Uuid::new_v4();
    accepted
        .notify(&notice(id, 1, IncidentEvent::Open, Severity::High, 6.0))
        .await
        .unwrap();
    let first = Local::start(addr, Some(&tdb.url));
    assert_eq!(first.ready().await["state"], "postgres");
    let mut delivered = Vec::new();
    for _ in 0..100 {
        delivered = slack_calls(&stand_in);
        if delivered.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        delivered
            .iter()
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>(),
        ["chat.postMessage", "chat.postMessage"],
        "the message and its thread reply"
    );
    // Recorded as sent before the kill (a row claimed but not yet marked would be taken up
    // again once its claim expires, which is not what this test is about).
    common::eventually("the first process recorded its deliveries", || {
        let pool = pool.clone();
        async move { Outbox::postgres(pool).pending_count().await.unwrap() == 0 }
    })
    .await;
    drop(first); // SIGKILL
    let second = Local::start(addr, Some(&tdb.url));
    second.ready().await;
    // A notice accepted after the restart: rows go out in id order, so once it is delivered
    // the second process has passed over every older row.
    accepted
        .notify(&notice(
            Uuid::new_v4(),
            1,
            IncidentEvent::Open,
            Severity::High,
            7.5,
        ))
        .await
        .unwrap();
    // Both of its calls (message and thread reply) are new ones: a resend of the old notice
    // would repeat `delivered`'s calls, not count here, and show in the length below.
    common::until_within(
        "the notice accepted after the restart delivered",
        Duration::from_secs(10),
        || {
            let calls = slack_calls(&stand_in);
            calls.iter().filter(|c| !delivered.contains(c)).count() >= 2
        },
    )
    .await;
    let calls = slack_calls(&stand_in);
    assert_eq!(
        calls[..delivered.len()],
        delivered[..],
        "nothing sent twice"
    );
    assert_eq!(
        calls.len(),
        delivered.len() + 2,
        "only the new notice: {calls:?}"
    );
    assert_eq!(
        Outbox::postgres(pool.clone())
            .pending_count()
            .await
            .unwrap(),
        0
    );
    drop(second);

    let memory = Local::start(addr, None);
    assert_eq!(memory.ready().await["state"], "memory");
    let said = std::fs::read_to_string(&memory.stderr).unwrap();
    assert!(
        said.contains("kept in memory and lost on restart"),
        "{said}"
    );
    // Written to a file, the log carries no terminal colour codes.
    assert!(
        !said.contains('\x1b'),
        "ANSI escapes in a log file: {said:?}"
    );
}

#[tokio::test]
async fn signed_interactions_are_verified_audited_and_update_the_message() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let notifier = Notifier::recording();
    let id = Uuid::new_v4();
    let payload = json!({"type": "block_actions", "user": {"id": "U123", "username": "jiwoo"}, "actions": [{"action_id": "ack", "value": id.to_string()}]});
    let body = format!(
        "payload={}",
        form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    );
    let now = chrono::Utc::now().timestamp().to_string();
    let good = slack::sign("signing-secret", &now, &body);

    let got = slack::handle_interaction(
        Some("signing-secret"),
        Some(&good),
        Some(&now),
        &body,
        Some(&pool),
        &notifier,
        |i| {
            let mut n = notice(i.incident, 2, IncidentEvent::Escalate, Severity::High, 6.0);
            n.acknowledged_by = Some(i.user_id.clone());
            Some(n)
        },
    )
    .await
    .unwrap();
    assert_eq!(got.action, Action::Acknowledge);
    assert_eq!(got.incident, id);
    assert_eq!(
        notifier.recorded()[0].acknowledged_by.as_deref(),
        Some("U123")
    );
    let (actor, action, target) = common::audit_named(&pool).await.remove(0);
    assert_eq!(
        (actor.as_str(), action.as_str(), target),
        ("slack:jiwoo (U123)", "slack.acknowledge", id.to_string())
    );
    // The chain holds a reference, never the Slack user's name.
    let raw: String = sqlx::query_scalar("SELECT actor FROM audit_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(raw.starts_with("subject:"), "{raw}");

    let wrong = slack::sign("another-secret", &now, &body);
    let err = slack::verify_interaction(Some("signing-secret"), Some(&wrong), Some(&now), &body)
        .unwrap_err();
    assert_eq!(err, InteractionError::BadSignature);
    let stale_ts = (chrono::Utc::now().timestamp() - 600).to_string();
    let stale = slack::sign("signing-secret", &stale_ts, &body);
    let err =
        slack::verify_interaction(Some("signing-secret"), Some(&stale), Some(&stale_ts), &body)
            .unwrap_err();
    assert_eq!(
        err,
        InteractionError::BadSignature,
        "a replayed request older than 5 minutes is refused"
    );
    let err =
        slack::verify_interaction(Some("signing-secret"), None, Some(&now), &body).unwrap_err();
    assert_eq!(err, InteractionError::MissingHeaders);
}

#[tokio::test]
async fn the_interaction_endpoint_answers_over_http() {
    common::gateway::install_crypto();
    let notifier = Arc::new(Notifier::recording());
    let endpoint = Arc::new(slack::InteractionEndpoint {
        signing_secret: Some("signing-secret".into()),
        extra_secrets: Default::default(),
        audit: None,
        notifier: notifier.clone(),
        apply: Arc::new(|i: &slack::Interaction| {
            let mut n = notice(
                i.incident,
                5,
                IncidentEvent::Escalate,
                Severity::Critical,
                11.0,
            );
            n.acknowledged_by = Some(i.user_id.clone());
            n.rollout_revision = i.revision.clone();
            Some(n)
        }),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let ep = ep.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let ep = ep.clone();
                    async move {
                        Ok::<_, Infallible>(ep.serve(req).await.map(|b| Full::new(Bytes::from(b))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let id = Uuid::new_v4();
    let payload = json!({"user": {"id": "U9", "username": "minji"}, "actions": [{"action_id": "rollback", "value": format!("{id}:rev-abc123")}]});
    let body = format!(
        "payload={}",
        form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    );
    let ts = chrono::Utc::now().timestamp().to_string();
    let client = reqwest::Client::new();
    let post = |sig: String, ts: String| {
        client
            .post(format!("http://{addr}/slack/interactions"))
            .header("x-slack-signature", sig)
            .header("x-slack-request-timestamp", ts)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.clone())
            .send()
    };
    let ok = post(slack::sign("signing-secret", &ts, &body), ts.clone())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let seen = notifier.recorded();
    assert_eq!(seen[0].rollout_revision.as_deref(), Some("rev-abc123"));
    assert_eq!(seen[0].acknowledged_by.as_deref(), Some("U9"));
    let bad = post(slack::sign("nope", &ts, &body), ts.clone())
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let err: Value = bad.json().await.unwrap();
    assert_eq!(err["code"], "bad_signature");
    assert!(!err.to_string().contains("signing-secret"));
    assert_eq!(
        notifier.recorded().len(),
        1,
        "a refused press changes nothing"
    );
}

#[tokio::test]
async fn a_rotate_now_button_asks_first_comes_back_parsed_and_the_reminder_is_replaced() {
    use apitree::notify::{Note, RotateButton};
    let (notifier, delivery, stand_in) = slack_to_stand_in().await;
    let (note_id, key_id) = (Uuid::new_v4(), Uuid::new_v4());
    let note = Note {
        id: note_id,
        text: "CredentialPolicy shop/keys: apiKey at_live_Ab12Cd34 is due for rotation".into(),
        channel: Some("C-SECOPS".into()),
        urgent: false,
        rotate: Some(RotateButton {
            key_id,
            key_prefix: "at_live_Ab12Cd34".into(),
            policy: "shop/keys".into(),
            grace: "24h".into(),
        }),
    };
    notifier.note(&note).await.unwrap();
    drain(&delivery).await;
    let posted = stand_in.lock().unwrap().calls[0].1.clone();
    assert_eq!(posted["channel"], "C-SECOPS");
    let button = &posted["blocks"][1]["elements"][0];
    assert_eq!(button["action_id"], "rotate_key");
    assert_eq!(button["value"], format!("{note_id}:{key_id}:shop/keys"));
    let confirm = button["confirm"]["text"]["text"].as_str().unwrap();
    assert!(
        confirm.contains("apitree-rotated-keys") && confirm.contains("24h"),
        "the dialog says where the key goes and how long the old one works: {confirm}"
    );

    // The press comes back signed, naming the key and the policy.
    let payload = json!({"user": {"id": "U9", "username": "mina"},
                         "container": {"type": "message", "channel_id": "C-SECOPS", "message_ts": "1700000000.000001"},
                         "actions": [{"action_id": "rotate_key", "value": button["value"]}]});
    let body = format!(
        "payload={}",
        form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    );
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = slack::sign("signing-secret", &ts, &body);
    let press =
        slack::verify_interaction(Some("signing-secret"), Some(&sig), Some(&ts), &body).unwrap();
    assert_eq!(press.action, Action::RotateKey);
    assert_eq!(press.incident, note_id);
    assert_eq!(
        press.message,
        Some(("C-SECOPS".to_string(), "1700000000.000001".to_string()))
    );
    let target = press.rotate.unwrap();
    assert_eq!(
        (
            target.key_id,
            target.namespace.as_str(),
            target.policy.as_str()
        ),
        (key_id, "shop", "keys")
    );
    // A value that names no policy is refused, not guessed at.
    let bad = json!({"user": {"id": "U9"}, "actions": [{"action_id": "rotate_key", "value": format!("{note_id}:{key_id}")}]});
    let body = format!(
        "payload={}",
        form_urlencoded::byte_serialize(bad.to_string().as_bytes()).collect::<String>()
    );
    let sig = slack::sign("signing-secret", &ts, &body);
    assert!(matches!(
        slack::verify_interaction(Some("signing-secret"), Some(&sig), Some(&ts), &body),
        Err(InteractionError::Malformed(_))
    ));

    // Rotated: the reminder itself is replaced (no button left) and the thread says so; a
    // refusal only replies.
    notifier
        .note_reply(
            note_id,
            None,
            ":warning: did not rotate: Secret missing",
            false,
        )
        .await
        .unwrap();
    notifier
        .note_reply(note_id, None, ":key: rotated by slack:mina (U9)", true)
        .await
        .unwrap();
    drain(&delivery).await;
    let calls = stand_in.lock().unwrap().calls.clone();
    let main_ts = "1700000000.000001";
    let rest: Vec<(&str, &Value)> = calls[1..].iter().map(|c| (c.0.as_str(), &c.1)).collect();
    assert_eq!(rest.len(), 3);
    assert_eq!(rest[0].0, "chat.postMessage");
    assert_eq!(rest[0].1["thread_ts"], main_ts);
    assert_eq!(rest[0].1["channel"], "C-SECOPS");
    assert_eq!(rest[1].0, "chat.update");
    assert_eq!(rest[1].1["ts"], main_ts);
    assert!(!rest[1].1.to_string().contains("rotate_key"));
    assert_eq!(rest[2].1["thread_ts"], main_ts);
    assert!(rest[2].1["text"].as_str().unwrap().contains("rotated by"));

    // After a restart the outbox no longer knows the reminder (posted days ago): the press
    // says where it is, and the reply and update go there at once instead of waiting forever.
    let (notifier, delivery, stand_in) = slack_to_stand_in().await;
    notifier
        .note_reply(
            note_id,
            press.message.as_ref(),
            ":key: rotated by slack:mina (U9)",
            true,
        )
        .await
        .unwrap();
    drain(&delivery).await;
    let calls = stand_in.lock().unwrap().calls.clone();
    let methods: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(methods, ["chat.update", "chat.postMessage"]);
    assert_eq!(calls[0].1["ts"], main_ts);
    assert_eq!(calls[0].1["channel"], "C-SECOPS");
    assert_eq!(calls[1].1["thread_ts"], main_ts);
    assert_eq!(calls[1].1["channel"], "C-SECOPS");
}
