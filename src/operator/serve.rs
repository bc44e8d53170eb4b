//! `apitree operator`: connects to the cluster, serves the HTTP port (status page, metrics,
//! health, Slack interactions), waits for the leader Lease and runs the ApiGateway controller
//! while it holds it.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::Client;

use super::durable::Durable;
use super::gateway::controller::{self, Operator};
use super::http::{self, HttpState, Role};
use super::lease;
use super::metrics::OperatorMetrics;
use crate::crd::gateway::DetectionSpec;
use crate::notify::slack::console_or_slack;
use crate::operator::gateway::sweep::{SweepMetrics, Sweeper};
use crate::platform::kube::{cluster_resolver, KubePlatform};

/// How `apitree operator` runs.
#[derive(Debug)]
pub struct OperatorOptions {
    /// Address of the HTTP port.
    pub http: String,
    /// TLS for that port: certificate chain and key files (PEM).
    pub http_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Namespace of the leader Lease (the operator's own).
    pub namespace: String,
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// Slack channel of notifications when SLACK_BOT_TOKEN is set.
    pub slack_channel: String,
    /// Image of gateways whose spec names none.
    pub default_image: String,
    /// Public URL of the status page, linked from notifications.
    pub status_url: Option<String>,
    /// How often the health sweep runs (database, drift, grace expiry).
    pub sweep_every: Duration,
    /// PostgreSQL for incidents, the Slack outbox and baselines; memory when None.
    pub database_url: Option<String>,
    /// Admins with a console session who may read the status (`Viewers::from_env`), and the
    /// console whose sign-ins are watched.
    pub viewers: Option<http::Viewers>,
    /// The Connector Agent endpoint, when this operator serves one.
    pub agents: Option<crate::agent::hub::EndpointOptions>,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "cannot reach the Kubernetes API: {0}; run inside a cluster or point KUBECONFIG at one"
    )]
    Connect(#[source] kube::Error),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(String),
    #[error("{0}")]
    Lease(#[from] lease::LeaseError),
    #[error("lost the leader Lease {0} to another replica; exiting so a fresh start stands by")]
    LostLease(String),
    #[error("cannot start the health-sweep scheduler: {0}")]
    Scheduler(String),
    #[error("--database-url: {0}")]
    Database(#[from] crate::db::DbError),
    #[error("{0}")]
    Console(String),
    #[error("{0}")]
    Agents(String),
}

const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// The console watch, when `APITREE_CONSOLE_URL` names the console.
fn console_watch(
    viewers: Option<&http::Viewers>,
    store: Arc<crate::detect::engine::IncidentStore>,
    notifier: Arc<crate::notify::Notifier>,
) -> Result<Option<Arc<tokio::sync::Mutex<super::console_watch::ConsoleWatch>>>, OperatorError> {
    let Some(link) = viewers.and_then(http::Viewers::console) else {
        return Ok(None);
    };
    let watch =
        super::console_watch::ConsoleWatch::new(link, &DetectionSpec::default(), store, notifier)
            .map_err(OperatorError::Console)?;
    tracing::info!(console = %link.url, "the console's sign-ins are watched like a gateway's traffic");
    Ok(Some(Arc::new(tokio::sync::Mutex::new(watch))))
}

/// Runs until `stop` resolves or leadership is lost.
pub async fn run(
    mut opts: OperatorOptions,
    signing_secret: Option<String>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    let client = Client::try_default()
        .await
        .map_err(OperatorError::Connect)?;
    let metrics = Arc::new(OperatorMetrics::new());
    let durable = Arc::new(Durable::open(opts.database_url.as_deref()).await?);
    // Only the leader delivers; a standby's (and an old leader's) notices wait in the outbox.
    let state_cell: Arc<OnceLock<Arc<HttpState>>> = Arc::new(OnceLock::new());
    let leads = state_cell.clone();
    let (notifier, delivery) = console_or_slack(
        &opts.slack_channel,
        durable.outbox(""),
        Arc::new(move || leads.get().is_some_and(|s| s.delivers())),
    );
    let notifier = Arc::new(notifier);
    // The console's sign-ins, scored like a gateway's traffic (when the operator knows it).
    let console_watch = console_watch(
        opts.viewers.as_ref(),
        durable.store.clone(),
        notifier.clone(),
    )?;
    let console_presses = console_watch.clone();
    // Button presses reach the operator, which the endpoint is built before.
    let operator_cell: Arc<OnceLock<Weak<Operator>>> = Arc::new(OnceLock::new());
    let cell = operator_cell.clone();
    let rotations_cell: Arc<OnceLock<Weak<super::credentials::controller::Rotations>>> =
        Arc::new(OnceLock::new());
    let policies = rotations_cell.clone();
    let gateway_secrets: Arc<std::sync::RwLock<Vec<String>>> = Arc::default();
    let interactions = Some(http::button_endpoint(
        signing_secret,
        gateway_secrets.clone(),
        notifier.clone(),
        move |press| {
            // A CredentialPolicy's incident is answered at once; the rest wait for their
            // gateway's next pass.
            let op = cell.get().and_then(Weak::upgrade);
            let rotations = policies.get().and_then(Weak::upgrade);
            let console = console_presses.clone();
            tokio::spawn(async move {
                if let Some(c) = console {
                    if c.lock()
                        .await
                        .respond(&press, Timestamp::now().as_second())
                        .await
                    {
                        return;
                    }
                }
                if let Some(r) = rotations {
                    if r.rotate_from_slack(&press).await || r.respond(&press).await {
                        return;
                    }
                }
                if let Some(op) = op {
                    op.press(press).await;
                }
            });
        },
    ));
    let state =
        Arc::new(HttpState::new(metrics.clone(), interactions).with_viewers(opts.viewers.take()));
    state.set_state(durable.kind());
    let _ = state_cell.set(state.clone());
    let state_role = state.clone();
    let listener = tokio::net::TcpListener::bind(&opts.http)
        .await
        .map_err(|e| OperatorError::Listen {
            addr: opts.http.clone(),
            reason: e.to_string(),
        })?;
    let tls = match &opts.http_tls {
        Some((cert, key)) => Some(http::tls(cert, key, &metrics).map_err(OperatorError::Tls)?),
        None => None,
    };
    let server = http::spawn(listener, state.clone(), tls);
    let mut operator = Operator::new(
        client.clone(),
        Arc::new(KubePlatform::new(
            client.clone(),
            Arc::new(cluster_resolver),
        )),
        metrics,
        notifier,
        opts.default_image.clone(),
        opts.status_url.clone(),
        Arc::new(Timestamp::now),
        state,
    );
    operator.signing_secrets = gateway_secrets;
    if let Some(endpoint) = &opts.agents {
        let (hub, _) = crate::agent::hub::start_endpoint(endpoint, &operator.metrics.registry)
            .await
            .map_err(OperatorError::Agents)?;
        operator.agents = Some(hub);
    }
    operator.set_durable(durable);
    let op = Arc::new(operator);
    // The health sweep runs on the leader only.
    let sweeper = Arc::new(Sweeper::new(
        SweepMetrics::register(&op.metrics.registry),
        crate::operator::gateway::sweep::probe_client(),
    ));
    let (sweep_op, sweep_state) = (op.clone(), state_role.clone());
    let scheduler = crate::operator::gateway::sweep::every(opts.sweep_every, move || {
        let (op, state, sweeper) = (sweep_op.clone(), sweep_state.clone(), sweeper.clone());
        async move {
            if state.role() != Role::Leader {
                return;
            }
            let targets = op.sweep_targets().await;
            if let Some(outcomes) = sweeper.run(&targets, chrono::Utc::now()).await {
                op.record_sweep(outcomes).await;
            }
        }
    })
    .await
    .map_err(|e| OperatorError::Scheduler(e.to_string()))?;
    let _ = operator_cell.set(Arc::downgrade(&op));
    if let Some(watch) = console_watch {
        let state = state_role.clone();
        tokio::spawn(super::console_watch::run(
            watch,
            DetectionSpec::default().window.as_std(),
            move || state.role() == Role::Leader,
        ));
    }

    let leases: Api<Lease> = Api::namespaced(client, &opts.namespace);
    // Both controllers stop when this flips.
    let (ctl_stop, ctl_stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = ctl_stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let rotations = Arc::new(super::credentials::controller::Rotations::new(
        op.client.clone(),
        op.metrics.clone(),
        op.notifier.clone(),
        Arc::new(Timestamp::now),
    ));
    let _ = rotations_cell.set(Arc::downgrade(&rotations));
    // The operator's Service routes to the pod marked as leader. A restarted container may be
    // in a pod its earlier process marked: it stands by first.
    let own_pod = std::env::var("POD_NAME").ok().map(|name| {
        (
            Api::<Pod>::namespaced(op.client.clone(), &opts.namespace),
            name,
        )
    });
    if let Some((pods, name)) = &own_pod {
        if let Err(e) = lease::mark_pod(pods, name, false).await {
            tracing::warn!(pod = %name, "cannot clear this pod's {} label: {e}", lease::ROLE_LABEL);
        }
    }
    // Whether this pod carries the leader label (retried every attempt until it does).
    let mut marked = own_pod.is_none();
    let mut running: Option<Vec<tokio::task::JoinHandle<()>>> = None;
    let mut watch = lease::LeaseWatch::default();
    tokio::pin!(stop);
    let outcome = loop {
        match lease::try_lead(
            &leases,
            &opts.lease_name,
            &opts.identity,
            LEASE_DURATION,
            Timestamp::now(),
            &mut watch,
        )
        .await
        {
            Ok(true) if running.is_none() => {
                state_role.set_role(Role::Leader);
                tracing::info!(lease = %opts.lease_name, identity = %opts.identity, "leading: starting the ApiGateway and CredentialPolicy controllers");
                running = Some(vec![
                    tokio::spawn(controller::run(op.clone(), stopped())),
                    tokio::spawn(super::credentials::controller::run(
                        rotations.clone(),
                        stopped(),
                    )),
                ]);
            }
            Ok(true) => {}
            Ok(false) if running.is_some() => {
                break Err(OperatorError::LostLease(opts.lease_name.clone()));
            }
            Ok(false) => {
                state_role.set_role(Role::Standby);
                tracing::debug!("standing by: another replica holds the lease");
            }
            Err(e) if running.is_some() => {
                // Cannot renew: another replica may take over once the lease expires; stop first.
                tracing::error!("{e}");
                break Err(OperatorError::LostLease(opts.lease_name.clone()));
            }
            Err(e) => tracing::warn!("{e}; retrying"),
        }
        if let (Some((pods, name)), Some(_), false) = (&own_pod, &running, marked) {
            match lease::mark_pod(pods, name, true).await {
                Ok(()) => marked = true,
                // Leading still; but the Service does not route to this replica until a later
                // attempt succeeds.
                Err(e) => {
                    tracing::error!(pod = %name, "cannot label this pod {}=leader, so the operator Service does not route to it (status page, Slack buttons); retrying: {e}", lease::ROLE_LABEL)
                }
            }
        }
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
    };
    let _ = ctl_stop.send(true);
    for r in running.into_iter().flatten() {
        let _ = r.await;
    }
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    server.stop().await;
    if let Some(d) = delivery {
        d.finish().await;
    }
    outcome
}
