//! The Helm chart, rendered and validated without a cluster, with real tools: Helm (which
//! `scripts/test` installs into ~/.cache/apitree when missing), kubernetes-validate and promtool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use apitree::crd::ApiGateway;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::CustomResourceExt;
use serde_json::Value;

mod common;
use apitree::crd::validate::{schema_of, validate};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/apitree")
}

/// Helm: `APITREE_HELM`, the copy `scripts/test` installs, or `helm` on PATH.
fn helm() -> PathBuf {
    if let Some(p) = std::env::var_os("APITREE_HELM") {
        return PathBuf::from(p);
    }
    let cached =
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/apitree/helm/helm");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("helm")
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what}: {e}; scripts/test installs it (see the README's test command)")
    });
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of the chart, as documents; `values` is a file under the chart.
fn render(values: Option<&str>, extra: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "apitree"])
        .arg(chart())
        .args(["--namespace", "apitree-system"]);
    if let Some(v) = values {
        cmd.arg("-f").arg(chart().join(v));
    }
    cmd.args(extra);
    let text = run(&mut cmd, "helm template");
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

const FULL: Option<&str> = Some("tests/full-values.yaml");

/// The operator's Deployment (the console's is named `<fullname>-console`).
fn operator_deployment(docs: &[Value]) -> &Value {
    deployment(docs, false)
}

fn deployment(docs: &[Value], console: bool) -> &Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| {
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-console") == console)
        })
        .expect("the Deployment")
}

/// The console, when enabled: locked down like the operator, every secret from a Secret
/// (never a value), probes on /healthz over the scheme it serves, no Kubernetes token, the
/// gateway database migrated first, and the operator given the same keyring so its status
/// data answers console sessions. Off by default, and refused without its Secrets.
#[test]
fn the_console_runs_locked_down_with_its_secrets_from_secrets() {
    let docs = render(FULL, &[]);
    let d: Deployment = serde_json::from_value(deployment(&docs, true).clone()).unwrap();
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let c = &pod.containers[0];
    assert_eq!(c.args.as_deref(), Some(&["console".to_string()][..]));
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    for name in [
        "APITREE_DATABASE_URL",
        "APITREE_JWT_SECRETS",
        "APITREE_KEY_PEPPER",
        "APITREE_MASTER_KEY",
    ] {
        let e = c.env.iter().flatten().find(|e| e.name == name);
        let e = e.unwrap_or_else(|| panic!("{name} is not set"));
        assert!(e.value.is_none(), "{name} is a plain value");
        assert!(
            e.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .is_some(),
            "{name} does not come from a Secret"
        );
    }
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    assert_eq!(
        probe.scheme.as_deref(),
        Some("HTTPS"),
        "tlsSecret is set in the full values"
    );
    assert_eq!(
        env_value(c, "APITREE_CONSOLE_LISTEN").as_deref(),
        Some("0.0.0.0:8090")
    );
    assert_eq!(
        env_value(c, "APITREE_SECURITY_CONTACT").as_deref(),
        Some("security@marketplace.example")
    );
    assert_eq!(
        env_value(c, "APITREE_PRIVACY_CONTACT").as_deref(),
        Some("https://marketplace.example/privacy")
    );
    assert_eq!(
        env_value(c, "APITREE_CONSOLE_TRUSTED_PROXIES").as_deref(),
        Some("10.42.0.0/16,fd00::/8"),
        "the ingress's addresses reach the console"
    );
    assert_eq!(
        env_value(c, "APITREE_UPSTREAM_ALLOW").as_deref(),
        Some("10.20.0.0/16")
    );
    // The flags those variables stand for exist.
    let help = run(
        Command::new(env!("CARGO_BIN_EXE_apitree")).args(["console", "--help"]),
        "apitree console --help",
    );
    for var in [
        "APITREE_CONSOLE_LISTEN",
        "APITREE_CONSOLE_TRUSTED_PROXIES",
        "APITREE_UPSTREAM_ALLOW",
        "APITREE_SESSION_TTL",
        "APITREE_TLS_CERT",
        "APITREE_DATABASE_URL",
    ] {
        assert!(
            help.contains(var),
            "{var} is not in `apitree console --help`"
        );
    }
    let op: Deployment = serde_json::from_value(operator_deployment(&docs).clone()).unwrap();
    let op_env = op.spec.template.spec.clone().unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(op_env
        .iter()
        .any(|e| e.name == "APITREE_JWT_SECRETS" && e.value_from.is_some()));
    let services: Vec<String> = of_kind(&docs, "Service")
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str().map(String::from))
        .collect();
    let console_service = services
        .iter()
        .find(|n| n.ends_with("-console"))
        .unwrap_or_else(|| panic!("no console Service in {services:?}"));
    // The operator confirms sessions with that Service, over the scheme the console serves.
    let console_url = op_env
        .iter()
        .find(|e| e.name == "APITREE_CONSOLE_URL")
        .and_then(|e| e.value.clone())
        .expect("APITREE_CONSOLE_URL");
    assert_eq!(
        console_url,
        format!("https://{console_service}.apitree-system.svc:8090/")
    );
    // Its certificate's private CA: the file the operator reads is the Secret's key.
    let ca_file = op_env
        .iter()
        .find(|e| e.name == "APITREE_CONSOLE_CA_FILE")
        .and_then(|e| e.value.clone())
        .expect("APITREE_CONSOLE_CA_FILE");
    let op_pod = op.spec.template.spec.clone().unwrap();
    let mount = op_pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| ca_file.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{ca_file} is on no volume"));
    let volume = op_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("apitree-console-ca"));
    let item = &secret.items.as_ref().unwrap()[0];
    assert_eq!(
        (
            item.key.as_str(),
            format!("{}/{}", mount.mount_path, item.path)
        ),
        ("ca.crt", ca_file)
    );
    let job = of_kind(&docs, "Job")[0].to_string();
    assert!(
        job.contains("apitree-db"),
        "the gateway database is migrated first"
    );

    // Off by default; on without its Secrets it does not render.
    let plain = render(None, &[]);
    assert!(of_kind(&plain, "Deployment").len() == 1);
    let out = Command::new(helm())
        .args(["template", "t"])
        .arg(chart())
        .args([
            "--set",
            "console.enabled=true",
            "--set",
            "database.existingSecret=db",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("console.jwt.existingSecret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_chart_installs_the_crate_version() {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion must equal the crate version in Cargo.toml"
    );
    let docs = render(None, &[]);
    let d: Deployment = serde_json::from_value(operator_deployment(&docs).clone()).unwrap();
    let image = d.spec.template.spec.unwrap().containers[0].image.clone();
    assert_eq!(
        image.as_deref(),
        Some(concat!(
            "ghcr.io/apitree/apitree:",
            env!("CARGO_PKG_VERSION")
        ))
    );
}

#[test]
fn helm_lint_passes_with_default_and_full_values() {
    run(
        Command::new(helm())
            .arg("lint")
            .arg(chart())
            .arg("--strict"),
        "helm lint",
    );
    run(
        Command::new(helm())
            .arg("lint")
            .arg(chart())
            .arg("--strict")
            .arg("-f")
            .arg(chart().join("tests/full-values.yaml")),
        "helm lint (full values)",
    );
}

#[test]
fn the_values_schema_refuses_unknown_keys_and_wrong_types() {
    for bad in [
        "replicaCount=two",
        "serviceMonitr.enabled=true",
        "image.pullPolicy=Sometimes",
        "prometheusRule.proxyErrorRatio=2",
    ] {
        let out = Command::new(helm())
            .args(["template", "apitree"])
            .arg(chart())
            .args(["--set", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--set {bad} rendered");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{err}"
        );
    }
    // The example gateway without its pepper Secret says what is missing.
    let out = Command::new(helm())
        .args(["template", "apitree"])
        .arg(chart())
        .args(["--set", "exampleGateway.enabled=true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs pepper.existingSecret"));
}

/// Writes the Kubernetes objects (not the prometheus-operator or apitree ones) to a file and
/// runs kubernetes-validate --strict on it.
fn validate_strictly(docs: &[Value], dir: &Path, name: &str) {
    let core: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            let v = d["apiVersion"].as_str().unwrap_or("");
            !v.starts_with("monitoring.coreos.com/")
                && !v.starts_with("apitree.io/")
                && !v.starts_with("cert-manager.io/")
        })
        .collect();
    let file = dir.join(name);
    let text: Vec<String> = core
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    std::fs::write(&file, text.join("\n---\n")).unwrap();
    let out = run(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(&file),
        "kubernetes-validate",
    );
    assert_eq!(
        out.matches(" passed for resource ").count(),
        core.len(),
        "every object must pass:\n{out}"
    );
}

fn deserialize_all(docs: &[Value]) {
    for d in docs {
        let v = d.clone();
        let kind = d["kind"].as_str().unwrap_or("");
        let ok = match kind {
            "Deployment" => serde_json::from_value::<Deployment>(v).map(|_| ()),
            "Service" => serde_json::from_value::<Service>(v).map(|_| ()),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(v).map(|_| ()),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(v).map(|_| ()),
            "PodDisruptionBudget" => serde_json::from_value::<PodDisruptionBudget>(v).map(|_| ()),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(v).map(|_| ()),
            "ClusterRoleBinding" => serde_json::from_value::<ClusterRoleBinding>(v).map(|_| ()),
            "Role" => serde_json::from_value::<Role>(v).map(|_| ()),
            "RoleBinding" => serde_json::from_value::<RoleBinding>(v).map(|_| ()),
            "ApiGateway" => serde_json::from_value::<ApiGateway>(v).map(|_| ()),
            "NetworkPolicy" => serde_json::from_value::<NetworkPolicy>(v).map(|_| ()),
            "Job" => serde_json::from_value::<Job>(v).map(|_| ()),
            "ServiceMonitor" | "PodMonitor" | "PrometheusRule" | "Certificate" => Ok(()),
            other => panic!("the chart renders a {other} the tests do not know"),
        };
        ok.unwrap_or_else(|e| panic!("{kind} does not deserialize: {e}"));
    }
}

#[test]
fn every_rendered_object_validates_strictly_and_deserializes() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = render(None, &[]);
    validate_strictly(&defaults, dir.path(), "defaults.yaml");
    deserialize_all(&defaults);
    let full = render(FULL, &[]);
    validate_strictly(&full, dir.path(), "full.yaml");
    deserialize_all(&full);
    let kinds: BTreeSet<&str> = full.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ApiGateway",
        "PodDisruptionBudget",
        "Certificate",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(k), "full values render no {k}");
    }
    // Off by default.
    let default_kinds: BTreeSet<&str> =
        defaults.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "ServiceMonitor",
        "PrometheusRule",
        "ApiGateway",
        "Certificate",
        "NetworkPolicy",
    ] {
        assert!(!default_kinds.contains(k), "{k} must be opt-in");
    }
    // The example gateway is a valid ApiGateway by the CRD's own schema.
    let schema = schema_of(&ApiGateway::crd());
    for gw in of_kind(&full, "ApiGateway") {
        let problems = validate(&schema, gw);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

#[test]
fn the_operator_runs_locked_down_with_probes_and_leader_election() {
    let docs = render(FULL, &[]);
    let d: Deployment = serde_json::from_value(operator_deployment(&docs).clone()).unwrap();
    let pod = d.spec.template.spec.unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert!(c.resources.as_ref().unwrap().limits.is_some());
    assert_eq!(c.args.as_deref(), Some(&["operator".to_string()][..]));
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for name in [
        "POD_NAME",
        "POD_NAMESPACE",
        "APITREE_LEASE",
        "SLACK_BOT_TOKEN",
        "SLACK_SIGNING_SECRET",
    ] {
        assert!(env.contains(name), "operator env lacks {name}");
    }
    // The Slack token comes from the Secret, never as a value in the manifest.
    let token = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "SLACK_BOT_TOKEN")
        .unwrap();
    assert!(token.value.is_none() && token.value_from.is_some());
    // Its state database's URL too, in the variable the binary reads (`apitree operator
    // --help`); none without `operator.database.existingSecret`.
    let help = run(
        Command::new(env!("CARGO_BIN_EXE_apitree")).args(["operator", "--help"]),
        "apitree operator --help",
    );
    assert!(help.contains("env: APITREE_DATABASE_URL"), "{help}");
    let url = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "APITREE_DATABASE_URL")
        .expect("the operator gets its state database");
    let from = url
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref());
    assert!(url.value.is_none());
    assert_eq!(
        from.map(|r| (r.name.as_str(), r.key.as_str())),
        Some(("apitree-state", "url"))
    );
    let plain = operator_pod(&render(None, &[]));
    assert!(!plain.containers[0]
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "APITREE_DATABASE_URL"));

    // The Service reaches the leading replica only: the one whose pod the operator labelled
    // apitree.io/role=leader (the pod template does not carry it: a standby must not get
    // Slack presses it cannot act on), and the leader may label its own pod.
    let svc = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "apitree")
        .expect("the operator's Service");
    let svc: Service = serde_json::from_value(svc.clone()).unwrap();
    let selector = svc.spec.unwrap().selector.unwrap();
    assert_eq!(
        selector
            .get(apitree::operator::lease::ROLE_LABEL)
            .map(String::as_str),
        Some("leader")
    );
    let template_labels = d.spec.template.metadata.unwrap().labels.unwrap();
    assert!(!template_labels.contains_key(apitree::operator::lease::ROLE_LABEL));
    for (k, v) in selector
        .iter()
        .filter(|(k, _)| *k != apitree::operator::lease::ROLE_LABEL)
    {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "the Service selects the operator's pods"
        );
    }
    let leader_role: Role = serde_json::from_value(of_kind(&docs, "Role")[0].clone()).unwrap();
    assert!(leader_role.rules.unwrap().iter().any(|r| {
        r.resources.as_deref() == Some(&["pods".to_string()][..]) && r.verbs == ["patch"]
    }));
}

/// A fresh install migrates the databases the release knows (the operator's state database,
/// the example gateway's) in a Helm hook Job before anything starts, so the operator's start
/// and the gate's schema check find the schema without a manual `apitree migrate`; the Job
/// runs locked down, reads each URL from its Secret into the variable `apitree migrate`
/// reads, and its pods are not the operator's (its Service and PDB do not select them).
#[test]
fn the_install_migrates_the_databases_it_knows_in_a_hook_job_first() {
    let help = run(
        Command::new(env!("CARGO_BIN_EXE_apitree")).args(["migrate", "--help"]),
        "apitree migrate --help",
    );
    assert!(help.contains("env: APITREE_DATABASE_URL"), "{help}");
    assert!(
        of_kind(&render(None, &[]), "Job").is_empty(),
        "nothing to migrate by default"
    );
    let docs = render(FULL, &[]);
    let jobs = of_kind(&docs, "Job");
    assert_eq!(jobs.len(), 1);
    let job: Job = serde_json::from_value(jobs[0].clone()).unwrap();
    let hooks = job.metadata.annotations.clone().unwrap();
    assert_eq!(hooks["helm.sh/hook"], "pre-install,pre-upgrade");
    let pod = job.spec.as_ref().unwrap().template.clone();
    let labels = pod.metadata.unwrap().labels.unwrap();
    let operator: Deployment = serde_json::from_value(operator_deployment(&docs).clone()).unwrap();
    let selector = operator.spec.selector.match_labels.unwrap();
    assert!(
        !selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the operator's selector matches the migration pods: {labels:?}"
    );
    let spec = pod.spec.unwrap();
    assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let targets: Vec<(String, String, String)> = spec
        .containers
        .iter()
        .map(|c| {
            assert_eq!(c.args.as_deref(), Some(&["migrate".to_string()][..]));
            let sc = c.security_context.clone().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            let url = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "APITREE_DATABASE_URL")
                .unwrap();
            assert!(url.value.is_none(), "a URL in the manifest");
            let r = url.value_from.clone().unwrap().secret_key_ref.unwrap();
            (c.name.clone(), r.name, r.key)
        })
        .collect();
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart().join("tests/full-values.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        targets,
        [
            (
                "migrate-state".to_string(),
                values["operator"]["database"]["existingSecret"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                "url".to_string()
            ),
            (
                "migrate-gateway".to_string(),
                values["database"]["existingSecret"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                "url".to_string()
            ),
        ]
    );
}

/// The operator's pod, from a render.
fn operator_pod(docs: &[Value]) -> k8s_openapi::api::core::v1::PodSpec {
    let d: Deployment = serde_json::from_value(operator_deployment(docs).clone()).unwrap();
    d.spec.template.spec.unwrap()
}

fn env_value(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// TLS in both modes: a cert-manager Certificate naming the Service, or an existing Secret. The
/// Secret is mounted where the variables the binary reads (`apitree operator --help`) point,
/// the probes and the ServiceMonitor switch to https, and TLS without a certificate source
/// does not render. Off by default: plain HTTP, nothing mounted.
#[test]
fn tls_mounts_the_certificate_where_the_operator_reads_it_and_switches_probes_to_https() {
    let help = run(
        Command::new(env!("CARGO_BIN_EXE_apitree")).args(["operator", "--help"]),
        "apitree operator --help",
    );
    for var in ["APITREE_TLS_CERT", "APITREE_TLS_KEY"] {
        assert!(
            help.contains(&format!("env: {var}")),
            "the binary reads no {var}:\n{help}"
        );
    }
    let existing = [
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.existingSecret=operator-tls",
    ];
    for (docs, secret) in [
        (render(FULL, &[]), "apitree-tls"),
        (render(None, &existing), "operator-tls"),
    ] {
        let pod = operator_pod(&docs);
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "tls")
            .expect("the certificate is mounted");
        assert_eq!(mount.read_only, Some(true));
        for (var, file) in [
            ("APITREE_TLS_CERT", "tls.crt"),
            ("APITREE_TLS_KEY", "tls.key"),
        ] {
            assert_eq!(
                env_value(c, var),
                Some(format!("{}/{file}", mount.mount_path)),
                "{var} points into the mounted Secret"
            );
        }
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some(secret)
        );
        for probe in [&c.liveness_probe, &c.readiness_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
        }
        let certs = of_kind(&docs, "Certificate");
        if secret == "apitree-tls" {
            let cert = certs[0];
            assert_eq!(cert["spec"]["secretName"], secret);
            assert_eq!(cert["spec"]["issuerRef"]["name"], "internal-ca");
            let names: Vec<&str> = cert["spec"]["dnsNames"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|n| n.as_str())
                .collect();
            for want in [
                "apitree.apitree-system.svc",
                "apitree.apitree-system.svc.cluster.local",
                "apitree.example.com",
            ] {
                assert!(names.contains(&want), "{want} not in {names:?}");
            }
            let sm = of_kind(&docs, "ServiceMonitor")[0];
            let ep = &sm["spec"]["endpoints"][0];
            assert_eq!(ep["scheme"], "https");
            assert_eq!(ep["tlsConfig"]["serverName"], "apitree.apitree-system.svc");
        } else {
            assert!(certs.is_empty(), "an existing Secret needs no Certificate");
        }
    }

    let out = Command::new(helm())
        .args(["template", "apitree"])
        .arg(chart())
        .args(["--set", "tls.enabled=true"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "TLS without a certificate rendered");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.existingSecret") && err.contains("issuerRef"),
        "{err}"
    );

    let pod = operator_pod(&render(None, &[]));
    let c = &pod.containers[0];
    assert!(env_value(c, "APITREE_TLS_CERT").is_none());
    assert!(pod.volumes.is_none());
    let get = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(get.scheme.as_deref(), Some("HTTP"));
}

/// NetworkPolicies admit only what each pod needs: the operator's one port (from the given
/// peers), and in each gateway namespace the proxies' public port from anywhere but their
/// admin port only from the operator's pods and the metrics peers. The ports are named as
/// the operator names them on the proxies it deploys, and it labels them as selected.
#[test]
fn network_policies_keep_the_proxies_admin_port_to_the_operator_and_prometheus() {
    let spec: apitree::crd::gateway::ApiGatewaySpec = serde_saphyr::from_str(
        "proxy:\n  routes:\n  - name: r\n    pathPrefix: /r/\n    upstream: http://up/\n",
    )
    .unwrap();
    let proxy = apitree::platform::kube::deployment(
        apitree::crd::gateway::Color::Blue,
        &apitree::platform::Workload {
            gateway: "shop/web".into(),
            revision: "abc".into(),
            replicas: 1,
            config: Default::default(),
            image: "apitree".into(),
            spec,
            owner_uid: None,
        },
    );
    let template = proxy.spec.template;
    let proxy_labels = template.metadata.unwrap().labels.unwrap();
    let proxy_ports: BTreeSet<String> = template.spec.unwrap().containers[0]
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    let operator_labels =
        operator_deployment(&render(FULL, &[]))["spec"]["template"]["metadata"]["labels"].clone();

    let docs = render(FULL, &[]);
    let policies: Vec<NetworkPolicy> = of_kind(&docs, "NetworkPolicy")
        .into_iter()
        .map(|d| serde_json::from_value((*d).clone()).unwrap())
        .collect();
    let namespaces: BTreeSet<&str> = policies
        .iter()
        .filter_map(|p| p.metadata.namespace.as_deref())
        .collect();
    assert_eq!(
        namespaces,
        BTreeSet::from(["apitree-system", "shop", "payments"])
    );
    let port_name = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        let ports = rule.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        match ports[0].port.as_ref().unwrap() {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
            other => panic!("ports are named, not {other:?}"),
        }
    };
    for p in &policies {
        let spec = p.spec.as_ref().unwrap();
        for rule in spec.ingress.iter().flatten() {
            if p.metadata.namespace.as_deref() != Some("apitree-system") {
                let port = port_name(rule);
                assert!(proxy_ports.contains(&port), "proxies have no port {port}");
            }
        }
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        let rules = spec.ingress.as_ref().unwrap();
        if p.metadata.namespace.as_deref() == Some("apitree-system") {
            // The operator's port from the ingress controller; the agent endpoint (on in the
            // full values) from anywhere, since agents call from partners' networks.
            assert_eq!(rules.len(), 2);
            assert_eq!(port_name(&rules[0]), "http");
            let from = serde_json::to_value(rules[0].from.as_ref().unwrap()).unwrap();
            assert_eq!(
                from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                "ingress-nginx"
            );
            assert_eq!(port_name(&rules[1]), "agents");
            assert!(rules[1].from.is_none());
            continue;
        }
        let selected = spec
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        for (k, v) in selected {
            assert_eq!(
                proxy_labels.get(k),
                Some(v),
                "proxies lack the label {k}={v}"
            );
        }
        let public = rules.iter().find(|r| port_name(r) == "http").unwrap();
        assert!(public.from.is_none(), "the public port is open to clients");
        let admin = rules.iter().find(|r| port_name(r) == "admin").unwrap();
        let from = serde_json::to_value(admin.from.as_ref().unwrap()).unwrap();
        let from = from.as_array().unwrap();
        assert_eq!(from.len(), 2, "the operator and Prometheus only: {from:?}");
        assert_eq!(
            from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "apitree-system"
        );
        for (k, v) in from[0]["podSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&operator_labels[k], v, "the operator's pods lack {k}={v}");
        }
        assert_eq!(
            from[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "monitoring"
        );
    }
}

/// The gateway proxies are scraped with the scheme their admin port speaks, told apart by the
/// label the operator puts on their pods: plain HTTP for gateways without `spec.tls`; https
/// verified against a CA named in the values for those with it (not scraped by Prometheus
/// without one, never unverified).
#[test]
fn gateway_proxies_are_scraped_with_the_scheme_their_admin_port_speaks() {
    use apitree::platform::kube::ADMIN_SCHEME_LABEL;
    let monitors = |docs: &[Value]| -> Vec<Value> {
        of_kind(docs, "PodMonitor").into_iter().cloned().collect()
    };
    let only_plain = monitors(&render(None, &["--set", "serviceMonitor.enabled=true"]));
    assert_eq!(only_plain.len(), 1, "{only_plain:#?}");
    let full = monitors(&render(FULL, &[]));
    assert_eq!(full.len(), 2, "{full:#?}");
    for plain in [&only_plain[0], &full[0]] {
        let spec = &plain["spec"];
        let exprs = spec["selector"]["matchExpressions"].as_array().unwrap();
        assert!(
            exprs.iter().any(|e| e["key"] == ADMIN_SCHEME_LABEL
                && e["operator"] == "NotIn"
                && e["values"] == serde_json::json!(["https"])),
            "{spec:#?}"
        );
        assert!(spec["podMetricsEndpoints"][0]["scheme"].is_null());
    }
    let tls = &full[1]["spec"];
    assert_eq!(tls["selector"]["matchLabels"][ADMIN_SCHEME_LABEL], "https");
    let endpoint = &tls["podMetricsEndpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(endpoint["port"], "admin");
    assert_eq!(
        endpoint["tlsConfig"]["serverName"],
        "gateways.apitree.internal"
    );
    assert_eq!(endpoint["tlsConfig"]["ca"]["secret"]["name"], "gateway-ca");
    assert_eq!(endpoint["tlsConfig"]["ca"]["secret"]["key"], "ca.crt");
    assert!(endpoint["tlsConfig"]["insecureSkipVerify"].is_null());
    // A CA without the name to verify does not render, and says why.
    let out = Command::new(helm())
        .args(["template", "apitree"])
        .arg(chart())
        .args(["--set", "serviceMonitor.enabled=true"])
        .args([
            "--set",
            "serviceMonitor.gatewayTls.caSecret.name=gateway-ca",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("serviceMonitor.gatewayTls.serverName is required"),
        "{err}"
    );
}

#[test]
fn rbac_has_no_wildcards_and_grants_what_the_controller_calls() {
    let docs = render(None, &[]);
    let role: ClusterRole =
        serde_json::from_value(of_kind(&docs, "ClusterRole")[0].clone()).unwrap();
    let mut granted = BTreeSet::new();
    for r in role.rules.iter().flatten() {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert_ne!(v, "*", "wildcard verb");
                    assert_ne!(res, "*", "wildcard resource");
                    assert_ne!(g, "*", "wildcard group");
                    granted.insert(format!("{g}/{res}:{v}"));
                }
            }
        }
    }
    // What src/operator/gateway/{controller,apply}.rs and src/platform/kube.rs call.
    for need in [
        "apitree.io/apigateways:watch",
        "apitree.io/apigateways:patch",
        "apitree.io/apigateways/status:patch",
        "apps/deployments:get",
        "apps/deployments:watch",
        "apps/deployments:patch",
        "apps/deployments:delete",
        "/services:patch",
        "/configmaps:patch",
        "/serviceaccounts:patch",
        "/pods:list",
        "/secrets:get",
        "policy/poddisruptionbudgets:patch",
        "events.k8s.io/events:create",
        "apitree.io/credentialpolicies:watch",
        "apitree.io/credentialpolicies/status:patch",
        "/secrets:list",
    ] {
        assert!(granted.contains(need), "ClusterRole lacks {need}");
    }
    // Secrets are read, never written or watched.
    assert!(!granted
        .iter()
        .any(|g| g.starts_with("/secrets:") && g != "/secrets:get" && g != "/secrets:list"));
    // slack.rotateKeys adds one write: patch, on Secrets named apitree-rotated-keys only.
    let full = render(FULL, &[]);
    let role: ClusterRole =
        serde_json::from_value(of_kind(&full, "ClusterRole")[0].clone()).unwrap();
    let secret_rules: Vec<_> = role
        .rules
        .iter()
        .flatten()
        .filter(|r| r.resources.iter().flatten().any(|res| res == "secrets"))
        .collect();
    assert_eq!(secret_rules.len(), 2);
    for r in secret_rules {
        match r.resource_names.as_deref() {
            None => assert_eq!(r.verbs, ["get", "list"]),
            Some(names) => {
                assert_eq!(names, ["apitree-rotated-keys"]);
                assert_eq!(r.verbs, ["patch"]);
            }
        }
    }
    let lease: Role = serde_json::from_value(of_kind(&docs, "Role")[0].clone()).unwrap();
    let rule = &lease.rules.unwrap()[0];
    assert_eq!(rule.resources.as_deref(), Some(&["leases".to_string()][..]));
    assert_eq!(rule.verbs, ["get", "create", "update"]);
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let docs = render(FULL, &[]);
    let rule = of_kind(&docs, "PrometheusRule")[0];
    let dir = tempfile::tempdir().unwrap();
    let rules = serde_json::json!({"groups": rule["spec"]["groups"]});
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).unwrap();
    std::fs::copy(
        chart().join("tests/rules-test.yaml"),
        dir.path().join("rules-test.yaml"),
    )
    .unwrap();
    run(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(dir.path().join("rules.yaml")),
        "promtool check rules",
    );
    let out = run(
        Command::new("promtool")
            .args(["test", "rules", "rules-test.yaml"])
            .current_dir(dir.path()),
        "promtool test rules",
    );
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(chart().join("tests/rules-test.yaml")).unwrap();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "alert {name} has no promtool test"
            );
        }
    }
}

/// Every `apitree_*` metric name the code registers.
fn exported_metrics() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in common::files_under(&repo().join("src"), &["rs"]) {
        let text = std::fs::read_to_string(&p).unwrap();
        for part in text.split('"').skip(1).step_by(2) {
            if part.starts_with("apitree_")
                && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                out.insert(part.to_string());
            }
        }
    }
    out
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("apitree_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // Names of apitree's own objects (apitree-operator, apitree_demo…) are not metrics.
        if base.starts_with("apitree_proxy_") || base.starts_with("apitree_operator_") {
            out.insert(base.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_and_the_rules_use_only_metrics_the_code_exports() {
    let exported = exported_metrics();
    assert!(exported.contains("apitree_proxy_requests_total"));
    let docs = render(FULL, &[]);
    let dashboard_cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "apitree-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(dashboard_cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(dashboard_cm["data"]["apitree.json"].as_str().unwrap()).unwrap();
    assert_eq!(dashboard["refresh"], "10s");
    let rules = of_kind(&docs, "PrometheusRule")[0].to_string();
    let used: BTreeSet<String> = metric_names(&dashboard.to_string())
        .into_iter()
        .chain(metric_names(&rules))
        .collect();
    assert!(used.len() >= 10, "{used:?}");
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but never exported: {missing:?}"
    );
}

/// The values schema takes a footer contact exactly when the console does: a value the schema
/// lets through but the console refuses would crash-loop the console at start.
#[test]
fn the_values_schema_and_the_console_agree_on_contacts() {
    for value in [
        "security@example.com",
        "dpo+gdpr@corp.example.co.kr",
        "https://example.com/security",
        "https://example.com",
        "security",
        "@example.com",
        "a@b",
        "a@b@c.com",
        "http://example.com/security",
        "javascript:alert(1)",
        "https://",
        "https://user@evil.example/",
        "mailto:a@b.com",
        "a b@c.com",
        "\"a\"@b.com",
        "ops@exämple.com",
        "https://exämple.com/",
    ] {
        let console = apitree::console::Contact::parse(value).is_ok();
        let out = Command::new(helm())
            .args(["template", "apitree"])
            .arg(chart())
            .args([
                "--set-string",
                &format!("console.contacts.security={value}"),
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            console,
            "{value:?}: console {}, chart {}",
            if console { "takes it" } else { "refuses it" },
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Connector Agent endpoint: off by default; on, the leader alone serves it (its own
/// Service, selecting the leader pod), TLS and the signing key come from Secrets (the key
/// owner-read-only), and the agents file the operator reads is what the values list — in the
/// format `apitree agent token` prints and the operator loads, a revoked agent marked so.
#[test]
fn the_agent_endpoint_is_the_leaders_with_its_keys_from_secrets() {
    let docs = render(None, &[]);
    assert!(docs.iter().all(|d| !d["metadata"]["name"]
        .as_str()
        .unwrap_or("")
        .ends_with("-agents")));
    let docs = render(FULL, &[]);
    let service = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str().unwrap().ends_with("-agents"))
        .expect("the agents' Service");
    assert_eq!(service["spec"]["selector"]["apitree.io/role"], "leader");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["ports"][0]["port"], 8443);
    let d = operator_deployment(&docs);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let env: BTreeMap<&str, &str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(env["APITREE_AGENT_LISTEN"], "0.0.0.0:8443");
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for var in [
        "APITREE_AGENT_TLS_CERT",
        "APITREE_AGENT_TLS_KEY",
        "APITREE_AGENT_SIGNING_KEY",
        "APITREE_AGENTS_FILE",
    ] {
        assert!(
            mounts.iter().any(|m| env[var].starts_with(m)),
            "{var} = {} is on no mounted volume ({mounts:?})",
            env[var]
        );
    }
    let volumes = d["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let signing = volumes
        .iter()
        .find(|v| v["name"] == "agent-signing")
        .unwrap();
    assert_eq!(signing["secret"]["secretName"], "apitree-agent-signing");
    assert_eq!(signing["secret"]["defaultMode"], 0o400);
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|m| m["metadata"]["name"].as_str().unwrap().ends_with("-agents"))
        .expect("the agents ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents.yaml");
    std::fs::write(&file, cm["data"]["agents.yaml"].as_str().unwrap()).unwrap();
    let agents = apitree::agent::hub::AgentsFile::load(&file).unwrap();
    assert_eq!(agents.pools.len(), 1);
    assert_eq!(agents.pools[0].gateway, "payments/bank");
    let names: Vec<(&str, bool)> = agents
        .agents
        .iter()
        .map(|a| (a.name.as_str(), a.revoked))
        .collect();
    assert_eq!(names, [("bank-a-1", false), ("bank-a-2", true)]);
    // Enabled with no pools or agents yet: still a file the operator reads (empty lists).
    let docs = render(
        None,
        &[
            "--set",
            "agents.enabled=true,agents.tlsSecret=t,agents.signingKey.existingSecret=k",
        ],
    );
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|m| m["metadata"]["name"].as_str().unwrap().ends_with("-agents"))
        .expect("the agents ConfigMap");
    std::fs::write(&file, cm["data"]["agents.yaml"].as_str().unwrap()).unwrap();
    let empty = apitree::agent::hub::AgentsFile::load(&file).unwrap();
    assert!(empty.pools.is_empty() && empty.agents.is_empty());
    // Enabled without its Secrets: refused by the values schema.
    let out = Command::new(helm())
        .args(["template", "t"])
        .arg(chart())
        .args(["--set", "agents.enabled=true"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "agents without a TLS Secret rendered"
    );
}
