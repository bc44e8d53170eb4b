//! `apitree local -f FILE_OR_DIR`: the ApiGateway loop on this machine. ApiGateway and Secret
//! manifests come from YAML files (a directory is read in name order); proxies run in-process on
//! the local platform; editing a file starts a new revision through the gate. Annotations
//! `apitree.io/promote=<revision>` and `apitree.io/rollback=<revision>` in the files, or the
//! Slack buttons, act as they do in a cluster. The status page, `/metrics`, `/healthz` and
//! `/readyz` are served on `--http`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::gateway::rollout::{reconcile, Context, Managed, Press};
use super::http::{self, HttpState};
use super::metrics::OperatorMetrics;
use crate::crd::gateway::{ApiGatewaySpec, SecretKeyRef};
use crate::gate::Request;
use crate::notify::Notifier;
use crate::platform::local::{LocalPlatform, LocalSecrets};
use crate::platform::Platform;
use crate::proxy::config::ProxyConfig;

/// Annotation that approves a revision waiting in AwaitingApproval.
pub const PROMOTE_ANNOTATION: &str = "apitree.io/promote";
/// Annotation that rolls back (or refuses) a revision.
pub const ROLLBACK_ANNOTATION: &str = "apitree.io/rollback";

/// How `apitree local` runs.
#[derive(Debug)]
pub struct LocalOptions {
    /// A manifest file or a directory of them.
    pub path: PathBuf,
    /// A proxy config (the `apitree proxy` format) supplying orgs, keys, credentials and the
    /// pepper and master-key sources; its routes and tiers are replaced by each ApiGateway's.
    pub proxy_config: Option<PathBuf>,
    /// Address of the status page and metrics.
    pub http: String,
    /// TLS for that port: certificate chain and key files (PEM).
    pub http_tls: Option<(PathBuf, PathBuf)>,
    /// First port of the gateways' front listeners (two per gateway: active and preview).
    pub base_port: Option<u16>,
    /// Admins with a console session who may read the status (`Viewers::from_env`).
    pub viewers: Option<http::Viewers>,
    /// How often the loop runs.
    pub interval: Duration,
    /// Where incidents, the Slack outbox and baselines live.
    pub durable: Arc<super::durable::Durable>,
    /// The Connector Agent endpoint, when this control plane serves one.
    pub agents: Option<crate::agent::hub::EndpointOptions>,
}

/// Why `apitree local` could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}")]
    ProxyConfig(String),
    #[error("cannot listen on {addr}: {reason}; pick another address with --http")]
    Listen { addr: String, reason: String },
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(String),
    #[error("{0}")]
    Agents(String),
}

/// An ApiGateway read from a file.
#[derive(Debug, Clone)]
pub struct GatewayManifest {
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// The spec, or why it is refused (it does not parse, fails the CRD schema, or its name is
    /// taken by another file).
    pub spec: Result<ApiGatewaySpec, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Everything the files say.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub gateways: Vec<GatewayManifest>,
    /// (Secret name, key) → value.
    pub secrets: HashMap<(String, String), String>,
    /// Secret name → digest of its content (its "resourceVersion" here).
    pub secret_versions: BTreeMap<String, String>,
    /// Secret name → the file it came from.
    pub secret_files: BTreeMap<String, PathBuf>,
    /// Documents that could not be read, with where and why.
    pub problems: Vec<String>,
    /// Files that exist but could not be read whole (not YAML, a document of an unknown kind
    /// or version, or without a name), with the first problem. A gateway such a file defined
    /// before is kept on its last good spec, not removed: only deleting it from a file that
    /// reads cleanly, or deleting the file, removes a gateway.
    pub unreadable: BTreeMap<PathBuf, String>,
}

/// The `apiVersion` of the resources `apitree local` reads.
const API_VERSION: &str = "apitree.io/v1alpha1";

fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..4])
}

fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, LocalError> {
    let read_err = |e: std::io::Error| LocalError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every ApiGateway and Secret in `path`. Unreadable documents become problems, not
/// errors: one bad file must not stop the gateways of the others.
pub fn load_manifests(path: &Path) -> Result<Manifests, LocalError> {
    let mut out = Manifests::default();
    let troubled = |out: &mut Manifests, file: &Path, problem: String| {
        out.unreadable
            .entry(file.to_path_buf())
            .or_insert_with(|| problem.clone());
        out.problems.push(problem);
    };
    for file in yaml_files(path)? {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                troubled(
                    &mut out,
                    &file,
                    format!("{}: cannot read: {e}", file.display()),
                );
                continue;
            }
        };
        let docs: Vec<Value> = match serde_saphyr::from_str_multiple(&text) {
            Ok(d) => d,
            Err(e) => {
                let problem = format!("{}: not valid YAML: {e}", file.display());
                troubled(&mut out, &file, problem);
                continue;
            }
        };
        for (i, doc) in docs.into_iter().enumerate() {
            let at = format!("{} (document {})", file.display(), i + 1);
            let name = doc["metadata"]["name"].as_str().unwrap_or("").to_string();
            match doc["kind"].as_str() {
                Some("ApiGateway") => {
                    if name.is_empty() {
                        troubled(
                            &mut out,
                            &file,
                            format!("{at}: ApiGateway without metadata.name"),
                        );
                        continue;
                    }
                    if doc["apiVersion"].as_str() != Some(API_VERSION) {
                        troubled(
                            &mut out,
                            &file,
                            format!(
                                "{at}: ApiGateway {name} has apiVersion {}; this version of apitree reads {API_VERSION}",
                                doc["apiVersion"]
                            ),
                        );
                        continue;
                    }
                    let annotations = doc["metadata"]["annotations"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                                .collect()
                        })
                        .unwrap_or_default();
                    // As an API server would: the CRD schema first (unknown fields, types,
                    // ranges), then the Rust types.
                    let refused = crate::crd::validate::api_gateway(&doc);
                    let spec = if refused.is_empty() {
                        serde_json::from_value::<ApiGatewaySpec>(doc["spec"].clone())
                            .map_err(|e| format!("{at}: spec: {e}"))
                    } else {
                        Err(format!("{at}: {}", refused.join("; ")))
                    };
                    if let Some(first) = out.gateways.iter_mut().find(|g| g.name == name) {
                        // Two files (or documents) name one gateway: neither wins.
                        let conflict = format!(
                            "ApiGateway {name} is defined in both {} and {at}; keep one",
                            first.file.display()
                        );
                        out.problems.push(conflict.clone());
                        first.spec = Err(conflict);
                        continue;
                    }
                    out.gateways.push(GatewayManifest {
                        name,
                        file: file.clone(),
                        spec,
                        annotations,
                    });
                }
                Some("Secret") => {
                    let mut content = Vec::new();
                    if let Some(data) = doc["data"].as_object() {
                        for (k, v) in data {
                            let decoded = v
                                .as_str()
                                .and_then(|v| {
                                    base64::engine::general_purpose::STANDARD.decode(v).ok()
                                })
                                .and_then(|b| String::from_utf8(b).ok());
                            match decoded {
                                Some(value) => {
                                    content.push(format!("{k}={value}"));
                                    out.secrets.insert((name.clone(), k.clone()), value);
                                }
                                None => out.problems.push(format!(
                                    "{at}: Secret {name} data.{k} is not base64 of UTF-8 text"
                                )),
                            }
                        }
                    }
                    if let Some(data) = doc["stringData"].as_object() {
                        for (k, v) in data {
                            let value = v.as_str().unwrap_or_default().to_string();
                            content.push(format!("{k}={value}"));
                            out.secrets.insert((name.clone(), k.clone()), value);
                        }
                    }
                    content.sort();
                    out.secret_files.insert(name.clone(), file.clone());
                    out.secret_versions
                        .insert(name, digest(content.join("\n").as_bytes()));
                }
                other => {
                    let kind =
                        other.map_or_else(|| "no kind".to_string(), |k| format!("kind {k:?}"));
                    troubled(
                        &mut out,
                        &file,
                        format!(
                            "{at}: {kind}; apitree local reads ApiGateway and Secret documents"
                        ),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// What a file that can no longer be read said before stays said: its gateways, refused with
/// the file's problem (so each keeps serving its last good spec and its gate history), and its
/// Secrets as they were.
pub fn carry_over(before: &Manifests, now: &mut Manifests) {
    for (file, problem) in &now.unreadable {
        for g in before.gateways.iter().filter(|g| &g.file == file) {
            if !now.gateways.iter().any(|n| n.name == g.name) {
                now.gateways.push(GatewayManifest {
                    spec: Err(problem.clone()),
                    ..g.clone()
                });
            }
        }
        for (name, origin) in &before.secret_files {
            if origin != file || now.secret_versions.contains_key(name) {
                continue;
            }
            for ((secret, key), value) in &before.secrets {
                if secret == name {
                    now.secrets
                        .insert((secret.clone(), key.clone()), value.clone());
                }
            }
            if let Some(v) = before.secret_versions.get(name) {
                now.secret_versions.insert(name.clone(), v.clone());
            }
            now.secret_files.insert(name.clone(), origin.clone());
        }
    }
}

/// A digest of the manifest files' names and contents: any edit, added or removed file changes
/// it, whatever the file system's timestamp resolution.
fn fingerprint(path: &Path) -> String {
    let mut h = Sha256::new();
    for f in yaml_files(path).unwrap_or_default() {
        h.update(f.display().to_string().as_bytes());
        h.update([0]);
        h.update(std::fs::read(&f).unwrap_or_default());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Fingerprint of the pepper and master keys the proxies use (never the values).
fn base_secret_versions(cfg: &ProxyConfig, dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let sources = [
        ("pepper", "APITREE_KEY_PEPPER", &cfg.secrets.pepper_file),
        (
            "master-keys",
            "APITREE_MASTER_KEY",
            &cfg.secrets.master_key_file,
        ),
    ];
    for (name, env, file) in sources {
        let bytes = std::env::var(env)
            .ok()
            .map(String::into_bytes)
            .or_else(|| file.as_ref().and_then(|f| std::fs::read(dir.join(f)).ok()));
        if let Some(b) = bytes {
            out.push((name.to_string(), digest(&b)));
        }
    }
    out
}

/// Runs until `stop` resolves.
pub async fn run(
    mut opts: LocalOptions,
    notifier: Arc<Notifier>,
    signing_secret: Option<String>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), LocalError> {
    let (base, pepper, master_keys, versions) = match &opts.proxy_config {
        Some(path) => {
            let cfg =
                ProxyConfig::load(path).map_err(|e| LocalError::ProxyConfig(e.to_string()))?;
            let dir = path.parent().map(PathBuf::from).unwrap_or_default();
            let pepper =
                crate::proxy::state::load_pepper(&cfg, &dir).map_err(LocalError::ProxyConfig)?;
            let keys = crate::proxy::state::load_master_keys(&cfg, &dir)
                .map_err(LocalError::ProxyConfig)?;
            let versions = base_secret_versions(&cfg, &dir);
            (cfg, pepper, keys, versions)
        }
        None => {
            tracing::warn!("no --proxy-config: the gateways know no API keys and refuse every request with 401");
            let mut bytes = [0u8; 32];
            rand::fill(&mut bytes);
            let pepper = crate::entities::keys::Pepper::new(bytes.to_vec())
                .map_err(|e| LocalError::ProxyConfig(e.to_string()))?;
            (ProxyConfig::default(), pepper, None, Vec::new())
        }
    };
    let metrics = Arc::new(OperatorMetrics::new());
    let (press_tx, mut press_rx) = tokio::sync::mpsc::unbounded_channel::<Press>();
    let interactions = signing_secret.map(|secret| {
        http::button_endpoint(Some(secret), Arc::default(), notifier.clone(), move |p| {
            let _ = press_tx.send(p);
        })
    });
    let state =
        Arc::new(HttpState::new(metrics.clone(), interactions).with_viewers(opts.viewers.take()));
    let listener = tokio::net::TcpListener::bind(&opts.http)
        .await
        .map_err(|e| LocalError::Listen {
            addr: opts.http.clone(),
            reason: e.to_string(),
        })?;
    let tls = match &opts.http_tls {
        Some((cert, key)) => Some(http::tls(cert, key, &metrics).map_err(LocalError::Tls)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let status_url = listener
        .local_addr()
        .ok()
        .map(|a| format!("{scheme}://{a}/"));
    tracing::info!(url = status_url.as_deref().unwrap_or(""), "status page");
    let server = http::spawn(listener, state.clone(), tls);

    let platform = Arc::new(LocalPlatform::new(
        LocalSecrets {
            pepper,
            master_keys: master_keys.clone(),
        },
        opts.base_port,
    ));
    let agents = match &opts.agents {
        Some(endpoint) => Some(
            crate::agent::hub::start_endpoint(endpoint, &metrics.registry)
                .await
                .map_err(LocalError::Agents)?
                .0,
        ),
        None => None,
    };
    let store = opts.durable.store.clone();
    state.set_state(opts.durable.kind());
    let mut gateways: BTreeMap<String, Managed> = BTreeMap::new();
    let mut seen: Option<String> = None;
    let mut manifests = Manifests::default();
    // The Secrets in the files replace `secrets` and `secret_versions` on every reload.
    let mut ctx = Context {
        platform: platform.clone(),
        notifier: notifier.clone(),
        store: store.clone(),
        base,
        master_keys,
        secrets: Arc::new(|_: &SecretKeyRef| None),
        secret_versions: Vec::new(),
        default_image: format!("apitree:{}", env!("CARGO_PKG_VERSION")),
        http: reqwest::Client::new(),
        status_url: status_url.clone(),
        metrics: metrics.clone(),
        agents,
    };
    tokio::pin!(stop);
    loop {
        let now_seen = fingerprint(&opts.path);
        if seen.as_deref() != Some(now_seen.as_str()) {
            seen = Some(now_seen);
            match load_manifests(&opts.path) {
                Ok(mut m) => {
                    for p in &m.problems {
                        tracing::error!("{p}");
                    }
                    carry_over(&manifests, &mut m);
                    manifests = m;
                }
                Err(e) => tracing::error!("{e}; keeping the manifests read before"),
            }
            let secrets = manifests.secrets.clone();
            ctx.secrets = Arc::new(move |r: &SecretKeyRef| {
                secrets.get(&(r.name.clone(), r.key.clone())).cloned()
            });
            ctx.secret_versions = versions.clone();
            ctx.secret_versions
                .extend(manifests.secret_versions.clone());
            let names: Vec<String> = manifests.gateways.iter().map(|g| g.name.clone()).collect();
            let gone: Vec<String> = gateways
                .keys()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect();
            // (Gateways of files that cannot be read are still listed: see `carry_over`.)
            for name in gone {
                tracing::info!(gateway = %name, "manifest removed: stopping the gateway");
                platform.remove(&name).await;
                gateways.remove(&name);
                if let Some(hub) = &ctx.agents {
                    hub.retain_previews(&name, &[]);
                }
            }
            for g in &manifests.gateways {
                match (&g.spec, gateways.get_mut(&g.name)) {
                    (Ok(spec), Some(m)) => {
                        if &m.spec != spec {
                            let generation = m.generation + 1;
                            m.update_spec(spec.clone(), generation);
                        } else {
                            // Back to the spec it runs (a bad save undone).
                            m.manifest_fixed();
                        }
                    }
                    (Ok(spec), None) => {
                        gateways.insert(
                            g.name.clone(),
                            Managed::new(
                                &g.name,
                                spec.clone(),
                                1,
                                notifier.clone(),
                                store.clone(),
                                status_url.clone(),
                            ),
                        );
                    }
                    (Err(problem), Some(m)) => m.manifest_problem(problem, Timestamp::now()),
                    (Err(_), None) => {}
                }
            }
        }
        while let Ok(press) = press_rx.try_recv() {
            let mut taken = false;
            for m in gateways.values_mut() {
                if m.accept(&press, Timestamp::now()).await {
                    taken = true;
                    break;
                }
            }
            if !taken {
                tracing::warn!(action = press.action.audit_name(), incident = %press.incident,
                    "a Slack button names no open incident or revision of any gateway; ignored");
            }
        }
        for g in &manifests.gateways {
            if let Some(m) = gateways.get_mut(&g.name) {
                let ask = |key: &str| {
                    g.annotations.get(key).map(|rev| Request {
                        revision: rev.clone(),
                        by: format!("annotation {key}"),
                    })
                };
                if let Some(r) = ask(PROMOTE_ANNOTATION) {
                    m.promote.get_or_insert(r);
                }
                if let Some(r) = ask(ROLLBACK_ANNOTATION) {
                    m.rollback.get_or_insert(r);
                }
            }
        }
        let now = Timestamp::now();
        metrics.phases.reset();
        let mut views = Vec::new();
        for m in gateways.values_mut() {
            // A pass that stopped early recorded why in the status; the next tick retries.
            if let Err(e) = reconcile(m, &ctx, now).await {
                tracing::debug!(gateway = %m.name, "pass stopped early: {e}");
            }
            let phase = m.status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
            metrics.phases.with_label_values(&[phase.as_str()]).inc();
            views.push(m.view(platform.active_url(&m.name).await));
        }
        super::gateway::rollout::count_open_incidents(gateways.values(), &metrics);
        state.publish(views);
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(opts.interval) => {}
        }
    }
    platform.shutdown().await;
    server.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gateways_and_secrets_and_reports_bad_documents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: apitree.io/v1alpha1\nkind: ApiGateway\nmetadata:\n  name: shop\n  annotations:\n    apitree.io/promote: abc\nspec:\n  proxy:\n    routes:\n    - name: r\n      pathPrefix: /r/\n      upstream: http://127.0.0.1:9/\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: keys\ndata:\n  live: c2VjcmV0\nstringData:\n  test: plain\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            "apiVersion: apitree.io/v1alpha1\nkind: ApiGateway\nmetadata:\n  name: broken\nspec:\n  proxy: {}\n---\nkind: ApiGatway\nmetadata:\n  name: typo\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let m = load_manifests(dir.path()).unwrap();
        assert_eq!(m.gateways.len(), 2);
        assert!(m.gateways[0].spec.is_ok());
        assert_eq!(m.gateways[0].annotations[PROMOTE_ANNOTATION], "abc");
        let broken = m.gateways[1].spec.as_ref().unwrap_err();
        assert!(broken.contains("b.yml (document 1)"), "{broken}");
        assert!(broken.contains("routes"), "{broken}");
        // A document of an unknown kind makes its file unreadable (its gateways are kept).
        let typo = &m.unreadable[&dir.path().join("b.yml")];
        assert!(
            typo.contains("document 2") && typo.contains("ApiGatway"),
            "{typo}"
        );
        assert_eq!(m.secrets[&("keys".into(), "live".into())], "secret");
        assert_eq!(m.secrets[&("keys".into(), "test".into())], "plain");
        // A Secret's version changes with its content, and does not reveal it.
        let v = m.secret_versions["keys"].clone();
        assert_eq!(v.len(), 8);
        assert!(!v.contains("secret"));
    }
}
