//! The I/O half of gate checks 2–4: health (every green replica's `/readyz`), schema (the
//! database is at the migration this release ships) and smoke (probes through the preview
//! endpoint, always including one without a key that must be refused).

use std::time::Duration;

use crate::crd::gateway::{ApiGatewaySpec, CheckPhase, SecretKeyRef, SmokeProbe};
use crate::detect::source::ScrapeTarget;
use crate::gate::{GateCheck, ProbeResult};

/// Resolves a Secret key reference to its value (Kubernetes Secret, local manifest, demo).
pub type SecretResolver = dyn Fn(&SecretKeyRef) -> Option<String> + Send + Sync;

/// Where and what to probe.
pub struct ProbeTarget<'a> {
    pub http: &'a reqwest::Client,
    pub spec: &'a ApiGatewaySpec,
    pub revision: &'a str,
    pub preview_url: Option<String>,
    pub admin_urls: Vec<String>,
    pub secrets: &'a SecretResolver,
}

fn result(
    check: GateCheck,
    t: &ProbeTarget<'_>,
    phase: CheckPhase,
    observed: String,
    threshold: &str,
    samples: u64,
    reason: String,
) -> ProbeResult {
    ProbeResult {
        check,
        revision: t.revision.to_string(),
        phase,
        observed: Some(observed),
        threshold: Some(threshold.to_string()),
        samples: Some(samples),
        reason,
    }
}

/// Runs the probe of `check` (health, schema or smoke).
pub async fn run(check: GateCheck, t: &ProbeTarget<'_>) -> ProbeResult {
    match check {
        GateCheck::Schema => schema(t).await,
        GateCheck::Smoke => smoke(t).await,
        _ => health(t).await,
    }
}

async fn health(t: &ProbeTarget<'_>) -> ProbeResult {
    let total = t.admin_urls.len();
    let mut good = 0;
    let mut problems = Vec::new();
    let tls = ProxyTls::of(t.spec, t.secrets);
    for url in &t.admin_urls {
        let client = match &tls {
            Ok(tls) => admin_client(t.http, tls.as_ref(), url, t.preview_url.as_deref()).await,
            Err(e) => Err(e.clone()),
        };
        let (client, base) = match client {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{url}: {e}"));
                continue;
            }
        };
        let answer = client
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        match answer {
            Ok(r) => {
                let code = r.status().as_u16();
                let doc: serde_json::Value = r.json().await.unwrap_or_default();
                match crate::proxy::admin::readyz_verdict(code, &doc) {
                    Ok(()) => good += 1,
                    Err(why) => problems.push(format!("{url}: {why}")),
                }
            }
            Err(e) => problems.push(format!("{url}: {}", no_answer(&e, t.spec.tls.is_some()))),
        }
    }
    let observed = format!("{good}/{total} replicas ready");
    let (phase, reason) = if total > 0 && good == total {
        (
            CheckPhase::Passed,
            "config loaded and every dependency reachable on every replica".to_string(),
        )
    } else if total == 0 {
        (
            CheckPhase::Failed,
            "green has no replicas to ask".to_string(),
        )
    } else {
        (CheckPhase::Failed, problems.join("; "))
    };
    result(
        GateCheck::Health,
        t,
        phase,
        observed,
        "every replica's /readyz says ready",
        total as u64,
        reason,
    )
}

async fn schema(t: &ProbeTarget<'_>) -> ProbeResult {
    let expected = crate::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let threshold = format!("migration {expected}");
    let Some(db) = &t.spec.database else {
        return result(
            GateCheck::Schema,
            t,
            CheckPhase::Skipped,
            "no database".into(),
            &threshold,
            0,
            "no database configured: the proxy runs DB-less from its rendered config".into(),
        );
    };
    let fail = |observed: String, reason: String| {
        result(
            GateCheck::Schema,
            t,
            CheckPhase::Failed,
            observed,
            &threshold,
            0,
            reason,
        )
    };
    let Some(url) = (t.secrets)(db) else {
        return fail(
            "unknown".into(),
            format!(
                "Secret {} has no key {:?}; create it with the database URL",
                db.name, db.key
            ),
        );
    };
    let pool = match crate::db::connect(&url, 1).await {
        Ok(p) => p,
        Err(e) => return fail("unreachable".into(), e.to_string()),
    };
    let applied: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&pool)
            .await;
    pool.close().await;
    let url = url.clone();
    match applied {
        Ok(Some(v)) if v == expected => drift_verdict(t, &url, v, &threshold).await,
        Ok(v) => fail(
            format!("migration {}", v.unwrap_or(0)),
            format!(
                "the database is at migration {} but this release expects {expected}; run `apitree migrate`",
                v.unwrap_or(0)
            ),
        ),
        Err(e) => fail(
            "no migration table".into(),
            format!("cannot read the applied migrations ({e}); run `apitree migrate`"),
        ),
    }
}

/// At the right migration: now the drift policy. `auto` fixes missing and security drift first;
/// any drift left other than extra objects (which are only reported) fails the check.
async fn drift_verdict(
    t: &ProbeTarget<'_>,
    url: &str,
    version: i64,
    threshold: &str,
) -> ProbeResult {
    use crate::crd::gateway::DriftPolicy;
    use crate::drift::{fix, Kind};
    let at = format!("migration {version}");
    let done = |phase, observed: String, reason: String| {
        result(GateCheck::Schema, t, phase, observed, threshold, 1, reason)
    };
    if t.spec.drift_policy == DriftPolicy::Off {
        return done(
            CheckPhase::Passed,
            at,
            "at the expected migration; drift checks are off (driftPolicy: off)".into(),
        );
    }
    let pool = match crate::db::connect(url, 2).await {
        Ok(p) => p,
        Err(e) => return done(CheckPhase::Failed, "unreachable".into(), e.to_string()),
    };
    let mut fixed = 0;
    if t.spec.drift_policy == DriftPolicy::Auto {
        match fix::fix(&pool, false, false, "apitree-operator (driftPolicy: auto)").await {
            Ok(r) => fixed = r.applied.len(),
            Err(e) => {
                pool.close().await;
                return done(
                    CheckPhase::Failed,
                    at,
                    format!("automatic drift fix failed: {e}"),
                );
            }
        }
    }
    let report = fix::check(&pool, false).await;
    pool.close().await;
    let report = match report {
        Ok(r) => r,
        Err(e) => return done(CheckPhase::Failed, at, e.to_string()),
    };
    let open: Vec<String> = report
        .items
        .iter()
        .filter(|i| i.kind != Kind::Extra)
        .map(|i| i.object.clone())
        .collect();
    if open.is_empty() {
        done(
            CheckPhase::Passed,
            format!("{at}, no drift"),
            if fixed > 0 {
                format!("fixed {fixed} drifted object(s) (driftPolicy: auto)")
            } else {
                "the database is at the schema this release expects".into()
            },
        )
    } else {
        done(
            CheckPhase::Failed,
            format!("{at}, {} drifted object(s)", open.len()),
            format!(
                "unresolved schema drift: {}; run `apitree drift check` and `apitree drift fix`",
                open.join(", ")
            ),
        )
    }
}

/// Tries per smoke probe when the answer is a 5xx or none.
const SMOKE_ATTEMPTS: usize = 3;
const SMOKE_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The probes a gate sends: the configured ones plus a keyless request that must be refused.
pub fn smoke_probes(spec: &ApiGatewaySpec) -> Vec<SmokeProbe> {
    let mut probes = spec.gate.smoke.clone();
    let path = spec
        .proxy
        .routes
        .first()
        .map(|r| r.path_prefix.clone())
        .unwrap_or_else(|| "/".into());
    probes.push(SmokeProbe {
        name: "no-key-is-refused".into(),
        path,
        method: "GET".into(),
        expect_status: 401,
        api_key: None,
    });
    probes
}

/// How the operator calls the proxies of a gateway with `spec.tls` (the preview endpoint and
/// each replica's admin port): https trusting only the CA in the gateway's Secret (`caKey`),
/// verifying the certificate for `serverName` (default: the preview endpoint's host) while
/// connecting to the address it was given. Verification is never turned off: a certificate
/// that does not verify fails the call, and the reason says what to check.
pub struct ProxyTls {
    roots: Vec<reqwest::Certificate>,
    name: Option<String>,
}

impl ProxyTls {
    /// `None` for a gateway without `spec.tls`; an error when its Secret holds no usable CA.
    pub fn of(spec: &ApiGatewaySpec, secrets: &SecretResolver) -> Result<Option<Self>, String> {
        let Some(tls) = &spec.tls else {
            return Ok(None);
        };
        let ca_ref = SecretKeyRef {
            name: tls.secret_name.clone(),
            key: tls.ca_key.clone(),
        };
        let Some(ca) = secrets(&ca_ref) else {
            return Err(format!(
                "Secret {} has no key {:?}: the probes need the CA that issued the gateway's certificate (set spec.tls.caKey to the key that holds it)",
                ca_ref.name, ca_ref.key
            ));
        };
        let roots = reqwest::Certificate::from_pem_bundle(ca.as_bytes())
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                format!(
                    "Secret {} key {:?} holds no PEM certificate (spec.tls.caKey)",
                    ca_ref.name, ca_ref.key
                )
            })?;
        Ok(Some(Self {
            roots,
            name: tls.server_name.clone(),
        }))
    }

    /// A client that connects to `url`'s address and verifies the name (`serverName`, else
    /// `default_name`'s host, else `url`'s), and the URL to ask it: `url` with that name.
    pub async fn client_for(
        &self,
        url: &str,
        default_name: Option<&str>,
    ) -> Result<(reqwest::Client, String), String> {
        let host_port = |u: &str| -> Result<(String, u16), String> {
            let parsed = reqwest::Url::parse(u).map_err(|e| format!("URL {u}: {e}"))?;
            match (parsed.host_str(), parsed.port_or_known_default()) {
                (Some(h), Some(p)) => Ok((h.trim_matches(['[', ']']).to_string(), p)),
                _ => Err(format!("URL {u} names no host and port")),
            }
        };
        let (host, port) = host_port(url)?;
        let name = match (&self.name, default_name) {
            (Some(n), _) => n.clone(),
            (None, Some(d)) => host_port(d)?.0,
            (None, None) => host.clone(),
        };
        let mut builder = reqwest::Client::builder()
            .tls_certs_only(self.roots.iter().cloned())
            .https_only(true)
            .connect_timeout(Duration::from_secs(5));
        if name != host {
            // Verify `name` while connecting to `url`'s address.
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("cannot resolve {host}"))?;
            builder = builder.resolve(&name, addr);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the https client for the probes: {e}"))?;
        let mut named = reqwest::Url::parse(url).map_err(|e| format!("URL {url}: {e}"))?;
        named
            .set_host(Some(&name))
            .map_err(|e| format!("spec.tls.serverName {name:?}: {e}"))?;
        let named = named.as_str().trim_end_matches('/').to_string();
        Ok((client, named))
    }
}

/// The client and base URL of the smoke probes: `t.http` and the preview URL, or for a
/// gateway with `spec.tls` a [`ProxyTls`] client.
async fn smoke_client(
    t: &ProbeTarget<'_>,
    base: &str,
) -> Result<(reqwest::Client, String), String> {
    match ProxyTls::of(t.spec, t.secrets)? {
        None => Ok((t.http.clone(), base.to_string())),
        Some(tls) => tls.client_for(base, None).await,
    }
}

/// The client and base URL for one replica's admin port (`admin`, from
/// [`crate::platform::Platform::admin_urls`]): `http` as it is, or over `tls` verified as the
/// preview endpoint is (`preview` gives the default name).
pub async fn admin_client(
    http: &reqwest::Client,
    tls: Option<&ProxyTls>,
    admin: &str,
    preview: Option<&str>,
) -> Result<(reqwest::Client, String), String> {
    match tls {
        None => Ok((http.clone(), admin.to_string())),
        Some(tls) => tls.client_for(admin, preview).await,
    }
}

/// The `/metrics` of each replica at `admins` (admin base URLs), reached as the health check
/// reaches them: over https verified against the gateway's CA when it has `spec.tls`.
pub async fn metric_targets(
    http: &reqwest::Client,
    spec: &ApiGatewaySpec,
    secrets: &SecretResolver,
    admins: &[String],
    preview: Option<&str>,
) -> Result<Vec<ScrapeTarget>, String> {
    let tls = ProxyTls::of(spec, secrets)?;
    let mut out = Vec::with_capacity(admins.len());
    for admin in admins {
        let (client, base) = admin_client(http, tls.as_ref(), admin, preview).await?;
        out.push(ScrapeTarget {
            name: format!("{admin}/metrics"),
            client,
            url: format!("{base}/metrics"),
        });
    }
    Ok(out)
}

/// Why a call to a proxy got no answer; for a gateway with `spec.tls` whose certificate did
/// not verify, what to check.
fn no_answer(e: &reqwest::Error, tls: bool) -> String {
    let why = crate::tls::error_chain(e);
    let hint = if tls && why.contains("certificate") {
        " — check that spec.tls.serverName is a name on the gateway's certificate and that spec.tls.caKey holds the CA that issued it"
    } else {
        ""
    };
    format!("no answer ({why}){hint}")
}

async fn smoke(t: &ProbeTarget<'_>) -> ProbeResult {
    let probes = smoke_probes(t.spec);
    let total = probes.len();
    let Some(base) = &t.preview_url else {
        return result(
            GateCheck::Smoke,
            t,
            CheckPhase::Failed,
            "no preview endpoint".into(),
            "every probe gets its expected status",
            0,
            "the preview endpoint does not exist yet".into(),
        );
    };
    let (http, base) = match smoke_client(t, base).await {
        Ok(client) => client,
        Err(reason) => {
            return result(
                GateCheck::Smoke,
                t,
                CheckPhase::Failed,
                "no probe sent".into(),
                "every probe gets its expected status",
                0,
                reason,
            )
        }
    };
    let mut failures = Vec::new();
    for p in &probes {
        let method = reqwest::Method::from_bytes(p.method.as_bytes()).unwrap_or_default();
        let mut req = http
            .request(method, format!("{base}{}", p.path))
            .timeout(Duration::from_secs(10));
        if let Some(r) = &p.api_key {
            match (t.secrets)(r) {
                Some(key) => req = req.bearer_auth(key),
                None => {
                    failures.push(format!(
                        "{}: Secret {} has no key {:?}",
                        p.name, r.name, r.key
                    ));
                    continue;
                }
            }
        }
        // One upstream error is the analysis check's business, not a broken revision: a 5xx
        // or no answer is tried again; any other wrong status fails at once.
        let mut answer = None;
        for attempt in 0..SMOKE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(SMOKE_RETRY_PAUSE).await;
            }
            let Some(req) = req.try_clone() else { break };
            let got = req.send().await;
            let retry = match &got {
                Ok(resp) => {
                    resp.status().is_server_error() && resp.status().as_u16() != p.expect_status
                }
                Err(_) => true,
            };
            answer = Some(got);
            if !retry {
                break;
            }
        }
        let Some(answer) = answer else {
            failures.push(format!("{}: the request could not be built", p.name));
            continue;
        };
        match answer {
            Ok(resp) if resp.status().as_u16() == p.expect_status => {}
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let code = body["code"].as_str().unwrap_or("");
                failures.push(format!(
                    "{}: {} {} → {status}{}, expected {}",
                    p.name,
                    p.method,
                    p.path,
                    if code.is_empty() {
                        String::new()
                    } else {
                        format!(" ({code})")
                    },
                    p.expect_status
                ));
            }
            Err(e) => failures.push(format!(
                "{}: {}",
                p.name,
                no_answer(&e, t.spec.tls.is_some())
            )),
        }
    }
    let passed = total - failures.len();
    let (phase, reason) = if failures.is_empty() {
        (
            CheckPhase::Passed,
            "every probe got its expected status".to_string(),
        )
    } else {
        (CheckPhase::Failed, failures.join("; "))
    };
    result(
        GateCheck::Smoke,
        t,
        phase,
        format!("{passed}/{total} probes passed"),
        "every probe gets its expected status",
        total as u64,
        reason,
    )
}
