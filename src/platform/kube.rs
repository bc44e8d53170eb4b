//! The Kubernetes platform: per color a Deployment `<name>-<color>` with a ConfigMap of its
//! rendered proxy config; Services `<name>` (active) and `<name>-preview`; a
//! PodDisruptionBudget and a ServiceAccount. Every write is a server-side apply with one field
//! manager; every child carries the managed-by and gateway labels and an owner reference to its
//! ApiGateway. Besides `operator::controller`, this is the only module that writes to the API.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment as KubeDeployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, Pod, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, SecretVolumeSource,
    Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use sha2::{Digest, Sha256};

use super::{Platform, PlatformError, Workload};
use crate::crd::gateway::{Color, SecretKeyRef};
use crate::gate::ColorObservation;

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "apitree-operator";

/// Writes the whole status of one of our resources with server-side apply, as the one field
/// manager (forced: the operator owns its resources' status).
pub async fn apply_status<K>(
    client: &Client,
    obj: &K,
    status: &impl serde::Serialize,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let ns = obj
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    Api::<K>::namespaced(client.clone(), &ns)
        .patch_status(
            obj.meta().name.as_deref().unwrap_or_default(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(|_| ())
}

/// Label naming the ApiGateway a child belongs to.
pub const GATEWAY_LABEL: &str = "apitree.io/gateway";
/// Label naming the color of a Deployment or pod.
pub const COLOR_LABEL: &str = "apitree.io/color";
/// Annotation holding the revision a Deployment runs.
pub const REVISION_ANNOTATION: &str = "apitree.io/revision";
/// On a gateway's pods: `https` when their admin port speaks TLS (`spec.tls`), else `http`,
/// so a scraper (the chart's PodMonitors) can pick the scheme.
pub const ADMIN_SCHEME_LABEL: &str = "apitree.io/admin-scheme";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "apitree-operator");
const PUBLIC_PORT: i32 = 8080;
const ADMIN_PORT: i32 = 9090;

/// How the operator reaches a Service or a pod. In a cluster: cluster DNS and pod IPs. Tests
/// point it at servers on loopback.
pub type Resolver = dyn Fn(Target<'_>) -> String + Send + Sync;

/// Something the operator sends HTTP to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Service {
        namespace: &'a str,
        name: &'a str,
        port: i32,
        /// The Service's port speaks TLS.
        tls: bool,
    },
    Pod {
        ip: &'a str,
        port: i32,
        /// The pod's port speaks TLS.
        tls: bool,
    },
}

/// In-cluster addresses.
pub fn cluster_resolver(t: Target<'_>) -> String {
    match t {
        Target::Service {
            namespace,
            name,
            port,
            tls,
        } => {
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{name}.{namespace}.svc:{port}")
        }
        Target::Pod { ip, port, tls } => {
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{ip}:{port}")
        }
    }
}

/// Deployments and Services in a cluster.
pub struct KubePlatform {
    client: Client,
    resolve: Arc<Resolver>,
}

fn split(gateway: &str) -> (&str, &str) {
    gateway.split_once('/').unwrap_or(("default", gateway))
}

fn labels(name: &str, color: Option<Color>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "apitree".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (GATEWAY_LABEL.to_string(), name.to_string()),
    ]);
    if let Some(c) = color {
        l.insert(COLOR_LABEL.to_string(), c.as_str().to_string());
    }
    l
}

fn selector(name: &str, color: Option<Color>) -> String {
    let mut s = format!("{GATEWAY_LABEL}={name}");
    if let Some(c) = color {
        s.push_str(&format!(",{COLOR_LABEL}={}", c.as_str()));
    }
    s
}

fn owner(name: &str, uid: &Option<String>) -> Option<Vec<OwnerReference>> {
    uid.as_ref().map(|uid| {
        vec![OwnerReference {
            api_version: "apitree.io/v1alpha1".into(),
            kind: "ApiGateway".into(),
            name: name.to_string(),
            uid: uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]
    })
}

fn meta(
    name: String,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owners: Option<Vec<OwnerReference>>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: owners,
        ..ObjectMeta::default()
    }
}

fn secret_env(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// A kubelet probe of the admin port; over HTTPS when the port speaks TLS (the kubelet does
/// not verify the certificate).
fn http_probe(path: &str, tls: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("admin".into()),
            scheme: tls.then(|| "HTTPS".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    }
}

/// The Deployment of one color. The revision is on the pod template too, so a new revision
/// rolls the pods even when only the ConfigMap changed.
pub fn deployment(color: Color, d: &Workload) -> KubeDeployment {
    let (ns, name) = split(&d.gateway);
    let full = format!("{name}-{}", color.as_str());
    let mut env = vec![EnvVar {
        name: "APITREE_LOG_FORMAT".into(),
        value: Some("json".into()),
        ..EnvVar::default()
    }];
    if let Some(s) = &d.spec.secrets {
        env.push(secret_env("APITREE_KEY_PEPPER", &s.key_pepper));
        if let Some(m) = &s.master_key {
            env.push(secret_env("APITREE_MASTER_KEY", m));
            env.push(EnvVar {
                name: "APITREE_MASTER_KEY_VERSION".into(),
                value: Some(s.master_key_version.to_string()),
                ..EnvVar::default()
            });
        }
    }
    if let Some(db) = &d.spec.database {
        env.push(secret_env("APITREE_DATABASE_URL", db));
    }
    if let Some(redis) = &d.spec.redis {
        env.push(secret_env("APITREE_REDIS_URL", redis));
    }
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: "/etc/apitree".into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: full.clone(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(tls) = &d.spec.tls {
        // A Secret volume, not a subPath, so a renewed pair reaches the running proxies.
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: super::TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let mut pod_labels = labels(name, Some(color));
    pod_labels.insert(
        ADMIN_SCHEME_LABEL.to_string(),
        if d.config.admin_tls { "https" } else { "http" }.to_string(),
    );
    let annotations = BTreeMap::from([(REVISION_ANNOTATION.to_string(), d.revision.clone())]);
    let mut m = meta(
        full.clone(),
        ns,
        labels(name, Some(color)),
        owner(name, &d.owner_uid),
    );
    m.annotations = Some(annotations.clone());
    KubeDeployment {
        metadata: m,
        spec: DeploymentSpec {
            replicas: Some(d.replicas),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (GATEWAY_LABEL.to_string(), name.to_string()),
                    (COLOR_LABEL.to_string(), color.as_str().to_string()),
                ])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.to_string()),
                    containers: vec![Container {
                        name: "proxy".into(),
                        image: Some(d.image.clone()),
                        args: Some(vec![
                            "proxy".into(),
                            "--config".into(),
                            "/etc/apitree/proxy.yaml".into(),
                        ]),
                        env: Some(env),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("http".into()),
                                container_port: PUBLIC_PORT,
                                ..ContainerPort::default()
                            },
                            ContainerPort {
                                name: Some("admin".into()),
                                container_port: ADMIN_PORT,
                                ..ContainerPort::default()
                            },
                        ]),
                        readiness_probe: Some(http_probe("/readyz", d.config.admin_tls)),
                        liveness_probe: Some(http_probe("/healthz", d.config.admin_tls)),
                        resources: d.spec.resources.clone(),
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The ConfigMap with one color's rendered config; listeners on all interfaces, secrets from
/// the environment the Deployment sets.
pub fn config_map(color: Color, d: &Workload) -> ConfigMap {
    let (ns, name) = split(&d.gateway);
    let mut cfg = d.config.clone();
    cfg.listen = format!("0.0.0.0:{PUBLIC_PORT}");
    cfg.admin = format!("0.0.0.0:{ADMIN_PORT}");
    cfg.secrets = Default::default();
    let yaml = serde_saphyr::to_string(&cfg).unwrap_or_default();
    ConfigMap {
        metadata: meta(
            format!("{name}-{}", color.as_str()),
            ns,
            labels(name, Some(color)),
            owner(name, &d.owner_uid),
        ),
        data: Some(BTreeMap::from([("proxy.yaml".to_string(), yaml)])),
        ..ConfigMap::default()
    }
}

/// A Service selecting one color of the gateway.
/// The port a gateway's Services listen on: 443 with TLS (`spec.tls`), else 80.
fn service_port(tls: bool) -> i32 {
    if tls {
        443
    } else {
        80
    }
}

/// Whether a color's Deployment runs its proxies with TLS (it mounts the TLS Secret).
fn serves_tls(d: &KubeDeployment) -> bool {
    d.spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v.name == "tls"))
}

/// A Service selecting one color of the gateway; with `tls` it listens on 443 (`https`).
pub fn service(
    gateway: &str,
    name: String,
    color: Color,
    owner_uid: &Option<String>,
    tls: bool,
) -> Service {
    let (ns, gw) = split(gateway);
    Service {
        metadata: meta(name, ns, labels(gw, None), owner(gw, owner_uid)),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([
                (GATEWAY_LABEL.to_string(), gw.to_string()),
                (COLOR_LABEL.to_string(), color.as_str().to_string()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some(if tls { "https" } else { "http" }.into()),
                port: service_port(tls),
                target_port: Some(IntOrString::String("http".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

impl KubePlatform {
    pub fn new(client: Client, resolve: Arc<Resolver>) -> Self {
        Self { client, resolve }
    }

    fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn apply<K>(&self, ns: &str, name: &str, obj: &K) -> Result<(), PlatformError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + serde::Serialize
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let kind = short_kind::<K>();
        self.api::<K>(ns)
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map(|_| ())
            .map_err(|source| PlatformError::Kube {
                verb: "apply",
                kind,
                name: format!("{ns}/{name}"),
                source,
            })
    }

    /// Pods of one color (or of the whole gateway).
    async fn pods(&self, gateway: &str, color: Option<Color>) -> Result<Vec<Pod>, PlatformError> {
        let (ns, name) = split(gateway);
        self.api::<Pod>(ns)
            .list(&ListParams::default().labels(&selector(name, color)))
            .await
            .map(|list| list.items)
            .map_err(|source| PlatformError::Kube {
                verb: "list",
                kind: "Pod",
                name: format!("{gateway} ({})", color.map_or("all", |c| c.as_str())),
                source,
            })
    }

    /// The Deployment of one color, None when there is none.
    async fn color_deployment(
        &self,
        gateway: &str,
        color: Color,
    ) -> Result<Option<KubeDeployment>, PlatformError> {
        let (ns, name) = split(gateway);
        let full = format!("{name}-{}", color.as_str());
        self.api::<KubeDeployment>(ns)
            .get_opt(&full)
            .await
            .map_err(|source| PlatformError::Kube {
                verb: "get",
                kind: "Deployment",
                name: format!("{ns}/{full}"),
                source,
            })
    }

    /// The children of a gateway, to be deleted (resource deleted) by kind and name.
    async fn delete_labelled<K>(&self, gateway: &str) -> Result<(), PlatformError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let (ns, name) = split(gateway);
        let api = self.api::<K>(ns);
        let kind = short_kind::<K>();
        let list = api
            .list(&ListParams::default().labels(&format!(
                "{GATEWAY_LABEL}={name},{}={}",
                MANAGED_BY.0, MANAGED_BY.1
            )))
            .await
            .map_err(|source| PlatformError::Kube {
                verb: "list",
                kind,
                name: format!("{ns}/{name}"),
                source,
            })?;
        for item in list.items {
            let child = item.meta().name.clone().unwrap_or_default();
            match api.delete(&child, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(PlatformError::Kube {
                        verb: "delete",
                        kind,
                        name: format!("{ns}/{child}"),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Deletes every child of the gateway (the finalizer's work).
    pub async fn delete_children(&self, gateway: &str) -> Result<(), PlatformError> {
        self.delete_labelled::<KubeDeployment>(gateway).await?;
        self.delete_labelled::<Service>(gateway).await?;
        self.delete_labelled::<ConfigMap>(gateway).await?;
        self.delete_labelled::<PodDisruptionBudget>(gateway).await?;
        self.delete_labelled::<ServiceAccount>(gateway).await?;
        Ok(())
    }
}

fn short_kind<K: kube::Resource>() -> &'static str
where
    <K as kube::Resource>::DynamicType: Default,
{
    match K::kind(&Default::default()).as_ref() {
        "Deployment" => "Deployment",
        "Service" => "Service",
        "ConfigMap" => "ConfigMap",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "ServiceAccount" => "ServiceAccount",
        "Pod" => "Pod",
        _ => "object",
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Platform for KubePlatform {
    async fn deploy(&self, color: Color, d: &Workload) -> Result<(), PlatformError> {
        let (ns, name) = split(&d.gateway);
        let full = format!("{name}-{}", color.as_str());
        let sa = ServiceAccount {
            metadata: meta(
                name.to_string(),
                ns,
                labels(name, None),
                owner(name, &d.owner_uid),
            ),
            ..ServiceAccount::default()
        };
        self.apply(ns, name, &sa).await?;
        self.apply(ns, &full, &config_map(color, d)).await?;
        self.apply(ns, &full, &deployment(color, d)).await?;
        let pdb = PodDisruptionBudget {
            metadata: meta(
                full.clone(),
                ns,
                labels(name, Some(color)),
                owner(name, &d.owner_uid),
            ),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([
                        (GATEWAY_LABEL.to_string(), name.to_string()),
                        (COLOR_LABEL.to_string(), color.as_str().to_string()),
                    ])),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            status: None,
        };
        self.apply(ns, &full, &pdb).await?;
        // The preview Service reaches the color being deployed.
        let preview = format!("{name}-preview");
        self.apply(
            ns,
            &preview,
            &service(
                &d.gateway,
                preview.clone(),
                color,
                &d.owner_uid,
                d.spec.tls.is_some(),
            ),
        )
        .await
    }

    async fn observe(
        &self,
        gateway: &str,
        color: Color,
    ) -> Result<Option<ColorObservation>, PlatformError> {
        let Some(d) = self.color_deployment(gateway, color).await? else {
            return Ok(None);
        };
        let replicas = d.spec.replicas.unwrap_or(1);
        if replicas == 0 {
            return Ok(None);
        }
        let revision = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION_ANNOTATION))
            .cloned()
            .unwrap_or_default();
        let status = d.status.unwrap_or_default();
        // Ready pods of an older template do not count until the rollout has caught up.
        let current = status.observed_generation >= d.metadata.generation
            && status.updated_replicas.unwrap_or(0) >= replicas;
        let ready = if current {
            status.ready_replicas.unwrap_or(0)
        } else {
            0
        };
        let mut pods: Vec<String> = self
            .pods(gateway, Some(color))
            .await?
            .iter()
            .map(|p| {
                let restarts: i32 = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .map(|c| c.iter().map(|c| c.restart_count).sum())
                    .unwrap_or(0);
                format!("{}:{restarts}", p.metadata.name.clone().unwrap_or_default())
            })
            .collect();
        pods.sort();
        Ok(Some(ColorObservation {
            revision,
            ready,
            replicas,
            instance: hex::encode(&Sha256::digest(pods.join(",").as_bytes())[..4]),
        }))
    }

    async fn switch(&self, gateway: &str, to: Color) -> Result<(), PlatformError> {
        let (ns, name) = split(gateway);
        // A read that fails is not "no Deployment": the Services would lose their owner and,
        // for a TLS gateway, their https port.
        let target = self.color_deployment(gateway, to).await?;
        let tls = target.as_ref().is_some_and(serves_tls);
        let owner_uid = target
            .and_then(|d| d.metadata.owner_references)
            .and_then(|o| o.first().map(|o| o.uid.clone()));
        self.apply(
            ns,
            name,
            &service(gateway, name.to_string(), to, &owner_uid, tls),
        )
        .await?;
        let preview = format!("{name}-preview");
        self.apply(
            ns,
            &preview,
            &service(gateway, preview.clone(), to.other(), &owner_uid, tls),
        )
        .await
    }

    async fn scale_down(&self, gateway: &str, color: Color) -> Result<(), PlatformError> {
        let (ns, name) = split(gateway);
        let full = format!("{name}-{}", color.as_str());
        let patch = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": full},
            "spec": {"replicas": 0},
        });
        match self
            .api::<KubeDeployment>(ns)
            .patch(
                &full,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(PlatformError::Kube {
                verb: "scale",
                kind: "Deployment",
                name: format!("{ns}/{full}"),
                source,
            }),
        }
    }

    async fn preview_url(&self, gateway: &str, tls: bool) -> Option<String> {
        let (ns, name) = split(gateway);
        Some((self.resolve)(Target::Service {
            namespace: ns,
            name: &format!("{name}-preview"),
            port: service_port(tls),
            tls,
        }))
    }

    async fn active_url(&self, gateway: &str) -> Option<String> {
        let (ns, name) = split(gateway);
        Some((self.resolve)(Target::Service {
            namespace: ns,
            name,
            port: 80,
            tls: false,
        }))
    }

    async fn admin_urls(
        &self,
        gateway: &str,
        color: Color,
        tls: bool,
    ) -> Result<Vec<String>, PlatformError> {
        Ok(self
            .pods(gateway, Some(color))
            .await?
            .iter()
            .filter(|p| pod_ready(p))
            .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
            .map(|ip| {
                (self.resolve)(Target::Pod {
                    ip: &ip,
                    port: ADMIN_PORT,
                    tls,
                })
            })
            .collect())
    }

    async fn remove(&self, gateway: &str) {
        if let Err(e) = self.delete_children(gateway).await {
            tracing::warn!(gateway, "cannot delete the gateway's children: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gateway::ApiGatewaySpec;

    fn deployment_of(tls: bool) -> Workload {
        let mut yaml = String::from(
            "proxy:\n  routes:\n  - name: r\n    pathPrefix: /r/\n    upstream: http://up/\n",
        );
        if tls {
            yaml.push_str("tls:\n  secretName: shop-tls\n");
        }
        let spec: ApiGatewaySpec = serde_saphyr::from_str(&yaml).unwrap();
        let config = crate::operator::gateway::plan::render(&spec, &Default::default());
        Workload {
            gateway: "shop/web".into(),
            revision: "abc".into(),
            replicas: 2,
            config,
            image: "apitree".into(),
            spec,
            owner_uid: None,
        }
    }

    /// With `spec.tls` the Secret is mounted read-only where the rendered config reads the
    /// pair, the Services listen on 443, and the operator calls the preview over https;
    /// without it nothing of that is there.
    #[test]
    fn a_tls_gateway_mounts_its_secret_where_its_config_reads_it_and_serves_https() {
        let d = deployment_of(true);
        let pod = deployment(Color::Blue, &d).spec.template.spec.unwrap();
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "tls")
            .unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert!(
            mount.sub_path.is_none(),
            "a subPath mount never sees a renewal"
        );
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("shop-tls")
        );
        let yaml = &config_map(Color::Blue, &d).data.unwrap()["proxy.yaml"];
        let cfg: crate::proxy::config::ProxyConfig = serde_saphyr::from_str(yaml).unwrap();
        let tls = cfg.tls.unwrap();
        for file in [&tls.cert_file, &tls.key_file] {
            assert_eq!(
                file.parent().unwrap(),
                std::path::Path::new(&mount.mount_path),
                "{file:?} is read from the mounted Secret"
            );
        }
        let svc = service("shop/web", "web-preview".into(), Color::Blue, &None, true);
        let port = &svc.spec.unwrap().ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("https"), 443));
        let url = cluster_resolver(Target::Service {
            namespace: "shop",
            name: "web-preview",
            port: service_port(true),
            tls: true,
        });
        assert_eq!(url, "https://web-preview.shop.svc:443");
        // The admin port speaks TLS too: the kubelet probes it over HTTPS, the operator's
        // health checks and scrapes call https URLs.
        assert!(cfg.admin_tls);
        let schemes = |pod: &PodSpec| {
            let c = &pod.containers[0];
            [&c.readiness_probe, &c.liveness_probe].map(|p| {
                let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
                get.scheme.clone()
            })
        };
        assert_eq!(
            schemes(&pod),
            [Some("HTTPS".to_string()), Some("HTTPS".to_string())]
        );
        let scheme_label = |d: &Workload| {
            let template = deployment(Color::Blue, d).spec.template;
            template.metadata.unwrap().labels.unwrap()[ADMIN_SCHEME_LABEL].clone()
        };
        assert_eq!(scheme_label(&d), "https");
        let admin = |tls| {
            cluster_resolver(Target::Pod {
                ip: "10.0.0.7",
                port: ADMIN_PORT,
                tls,
            })
        };
        assert_eq!(admin(true), format!("https://10.0.0.7:{ADMIN_PORT}"));
        assert_eq!(admin(false), format!("http://10.0.0.7:{ADMIN_PORT}"));

        let d = deployment_of(false);
        let plain_pod = deployment(Color::Blue, &d).spec.template.spec.unwrap();
        assert_eq!(schemes(&plain_pod), [None, None]);
        assert_eq!(scheme_label(&d), "http");
        let rendered = deployment(Color::Blue, &d);
        assert!(!serves_tls(&rendered));
        let cfg: crate::proxy::config::ProxyConfig =
            serde_saphyr::from_str(&config_map(Color::Blue, &d).data.unwrap()["proxy.yaml"])
                .unwrap();
        assert!(cfg.tls.is_none());
        assert!(!cfg.admin_tls);
        let svc = service("shop/web", "web".into(), Color::Blue, &None, false);
        let port = &svc.spec.unwrap().ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 80));
        assert!(serves_tls(&deployment(Color::Blue, &deployment_of(true))));
    }
}
