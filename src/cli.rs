//! Command-line interface. Every flag can also be set through the `APITREE_*` variable named in
//! its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::crd::gateway::KeyScope;
pub use crate::entities::CredentialKind;

/// apitree runs and heals the gateway of an API marketplace: the gateway proxy (data plane) and
/// a Kubernetes operator that gates every new revision Blue/Green, detects error-rate anomalies,
/// remediates schema drift and prompts credential rotation.
#[derive(Debug, Parser)]
#[command(
    name = "apitree",
    version,
    propagate_version = true,
    after_help = "Examples:\n  apitree crds | kubectl apply --server-side -f -\n  apitree crds --out crds --out charts/apitree/crds\n  DATABASE_URL=postgres://postgres@127.0.0.1/apitree apitree migrate"
)]
pub struct Cli {
    /// Log line format on stderr: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "APITREE_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log filter in tracing's env-filter syntax, e.g. `info` or `apitree=debug,kube=warn`.
    #[arg(long, global = true, default_value = "info", env = "APITREE_LOG")]
    pub log_filter: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions generated from the Rust types, or write them to files.
    ///
    /// Without --out, all CRDs go to stdout as one multi-document YAML stream, ready for
    /// `kubectl apply --server-side -f -`. With --out, each CRD is written to
    /// DIR/<plural>.apitree.io.yaml; repeat --out to refresh several copies at once:
    ///
    ///   apitree crds --out crds --out charts/apitree/crds
    Crds(CrdsArgs),

    /// Apply the gateway database migrations (idempotent: applied ones are skipped).
    ///
    /// Creates the tenant tables (orgs, users, API keys, APIs, upstream credentials, usage) with
    /// row-level security, the incident and notification-outbox tables and the append-only,
    /// hash-chained audit log. Exits 1 with a one-line reason when the database is unreachable.
    Migrate(MigrateArgs),

    /// Run the gateway proxy (the data plane).
    ///
    /// DB-less: routes, tiers, orgs, keys (hashed) and encrypted credentials come from a YAML
    /// file. Secrets never do: the key pepper comes from APITREE_KEY_PEPPER or the file named
    /// by secrets.pepperFile, master keys from APITREE_MASTER_KEY(+_VERSION) or
    /// secrets.masterKeyFile. An invalid file exits 1 listing every problem with its YAML path.
    /// SIGHUP reloads the file (an invalid new file keeps the old config); SIGTERM/Ctrl-C drain
    /// in-flight requests, then exit.
    ///
    ///   apitree proxy --config examples/proxy.yaml
    Proxy(ProxyArgs),

    /// API keys: create, rotate, revoke and list them in the database; hash or generate one for a
    /// DB-less config.
    #[command(subcommand)]
    Keys(KeysCommand),

    /// Orgs (tenants) in the gateway database.
    #[command(subcommand)]
    Orgs(OrgsCommand),

    /// Upstream credentials: encrypt one for a config; re-encrypt the database's after a new master key.
    #[command(subcommand)]
    Credentials(CredentialsCommand),

    /// The append-only audit log.
    #[command(subcommand)]
    Audit(AuditCommand),

    /// The anomaly detector.
    #[command(subcommand)]
    Detect(DetectCommand),

    /// Korean PII detectors on stdin: list findings, or mask them (--mask).
    #[command(subcommand)]
    Pii(PiiCommand),

    /// A self-contained tour on embedded defaults: no cluster, database or Slack needed.
    ///
    /// Starts a sample API, a gateway on the local platform (in-process proxies behind a front
    /// listener) and synthetic clients with valid and invalid keys; rolls out a good revision
    /// through the 5-check gate (5/5 → switch); injects an error burst the detector escalates
    /// 3x → 5x → 10x and resolves; rolls out two bad revisions the gate refuses (a broken
    /// upstream caught by the smoke check, a flaky one caught by the analysis check).
    /// Notifications go to stderr, or to Slack when SLACK_BOT_TOKEN is set (SLACK_API_URL is
    /// honoured). With --database-url (an empty database) the schema check runs for real and a
    /// drift step is added. Takes about a minute and leaves nothing running.
    ///
    /// Examples:
    ///
    ///   apitree demo
    ///
    ///   apitree demo --format json > summary.json
    ///
    ///   apitree demo --database-url postgres://postgres@127.0.0.1/apitree_demo
    Demo(DemoArgs),

    /// Run the ApiGateway controller on this machine: manifests from files, proxies in-process.
    ///
    /// Reads ApiGateway and Secret manifests from FILE_OR_DIR (every *.yaml / *.yml of a
    /// directory). Each gateway gets a front listener (what clients call) and a preview listener
    /// (what the gate probes); every new revision — an edited file — passes the 5-check gate
    /// before the front switches to it. Approve with the annotation apitree.io/promote=<revision>
    /// or the Slack Promote button; roll back with apitree.io/rollback=<revision>. Orgs, keys,
    /// credentials and the pepper come from --proxy-config (the `apitree proxy` file format).
    /// The status page, /metrics, /healthz and /readyz are on --http.
    ///
    ///   apitree local -f examples/local --proxy-config examples/proxy.yaml --port 18000
    Local(LocalArgs),

    /// Schema drift of the gateway database against what the migrations create.
    ///
    /// `check` exits 0 in sync, 2 when drift is found (every drifted object is listed), 1 on
    /// error. `fix` applies missing and security fixes (and changed ones with --allow-changed)
    /// in one transaction under an advisory lock, audits each, and checks again; extra objects
    /// are only reported.
    #[command(subcommand)]
    Drift(DriftCommand),

    /// Run the ApiGateway controller in a cluster (in-cluster config or KUBECONFIG).
    ///
    /// One replica leads through a Lease and reconciles; the others stand by, ready to take
    /// over (/readyz says which role a replica has). Serves the status page, /metrics (apitree_operator_*),
    /// /healthz, /readyz and, with SLACK_SIGNING_SECRET, POST /slack/interactions on --http.
    /// Notifications go to the log, or to Slack when SLACK_BOT_TOKEN is set. With
    /// APITREE_JWT_SECRETS (the console's keyring) /api/gateways answers admins with a console
    /// session; APITREE_CONSOLE_URL names the console that confirms each session (and whose
    /// sign-ins are watched), APITREE_CONSOLE_CA_FILE the private CA that signed its certificate.
    Operator(OperatorArgs),

    /// Run the console: where buyers, sellers and admins sign in and act within their role.
    ///
    /// Serves the REST API under /api/v1 (JWT HS256 sessions), a web page at /, /metrics and
    /// /healthz on --listen. Sessions are signed with APITREE_JWT_SECRETS (`kid:secret` entries,
    /// the newest last; each secret at least 32 bytes). Keys are issued with APITREE_KEY_PEPPER
    /// and credentials sealed with APITREE_MASTER_KEY, as the proxy reads them. Every query
    /// runs as the database role apitree_console, which row-level security applies to. Create
    /// the first super_admin with `apitree users create`.
    ///
    ///   APITREE_JWT_SECRETS="k1:$(openssl rand -base64 48)" apitree console --database-url postgres://postgres@127.0.0.1/apitree
    Console(ConsoleArgs),

    /// Console users: create (the first super_admin), list, disable.
    #[command(subcommand)]
    Users(UsersCommand),

    /// Data subject requests (GDPR): export everything apitree holds about a person, or erase
    /// them. Both are audited and listed in the console's request queue.
    #[command(subcommand)]
    Dsar(DsarCommand),

    /// The on-premises Connector Agent: a proxy inside a bank, configured by the control plane.
    ///
    /// The agent dials out over TLS 1.3 (only the CA in --ca-file is trusted), authenticates
    /// with its token, receives its pool's routes, tiers, orgs and key hashes signed with the
    /// control plane's key (--config-key pins it), joins them with the bank's local file
    /// (listeners, pepper, master keys, credentials, each route's upstream: none of it ever
    /// leaves) and serves. The last applied configuration is cached in --cache-dir and served
    /// after a restart without the control plane; a configuration that fails a check is refused,
    /// reported and the old one keeps serving. Reports carry metadata only: counts, latency
    /// histograms, breaker state, version, generation. SIGHUP reads the local file again.
    ///
    ///   apitree agent --control-plane https://cp.example.com:8443/ --pool bank-a --config agent.yaml --token-file agent.token --config-key config-key.pub --ca-file cp-ca.crt --cache-dir /var/lib/apitree-agent
    ///
    /// On the control plane: `apitree agent keygen` makes the signing key, `apitree agent
    /// token` an agent's token and its agents-file entry.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Agent(AgentCommand),
}

/// The agent endpoint a control plane serves (`apitree operator`, `apitree local`).
#[derive(Debug, clap::Args)]
pub struct AgentEndpointArgs {
    /// Serve the Connector Agent endpoint on this address (TLS 1.3 only): agents dial it for
    /// their pool's configuration and send their reports. Needs the four --agent-*/--agents-file
    /// settings below.
    #[arg(
        long,
        value_name = "ADDR",
        env = "APITREE_AGENT_LISTEN",
        requires_all = ["agent_tls_cert", "agent_tls_key", "agent_signing_key", "agents_file"]
    )]
    pub agent_listen: Option<String>,
    /// The agent endpoint's certificate chain (PEM); agents pin the CA that signed it.
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_AGENT_TLS_CERT",
        requires = "agent_listen"
    )]
    pub agent_tls_cert: Option<PathBuf>,
    /// The agent endpoint's private key (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_AGENT_TLS_KEY",
        requires = "agent_listen"
    )]
    pub agent_tls_key: Option<PathBuf>,
    /// The key agents' configurations are signed with (`apitree agent keygen`).
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_AGENT_SIGNING_KEY",
        requires = "agent_listen"
    )]
    pub agent_signing_key: Option<PathBuf>,
    /// Which gateway configures each pool and the agents this control plane knows:
    /// `pools: [{name, gateway}]` (a pool not bound receives nothing) and `agents: [{name,
    /// pool, tokenSha256, revoked}]` (`apitree agent token` prints an entry). Read again when
    /// it changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_AGENTS_FILE",
        requires = "agent_listen"
    )]
    pub agents_file: Option<PathBuf>,
}

impl AgentEndpointArgs {
    /// The endpoint's options, when --agent-listen is given (clap has checked the rest).
    pub fn options(&self) -> Option<crate::agent::hub::EndpointOptions> {
        Some(crate::agent::hub::EndpointOptions {
            listen: self.agent_listen.clone()?,
            tls: (self.agent_tls_cert.clone()?, self.agent_tls_key.clone()?),
            signing_key: self.agent_signing_key.clone()?,
            agents_file: self.agents_file.clone()?,
        })
    }
}

/// `apitree agent`: run the agent, or make its keys on the control plane's side.
#[derive(Debug, clap::Args)]
pub struct AgentCommand {
    #[command(subcommand)]
    pub tool: Option<AgentTool>,
    #[command(flatten)]
    pub run: AgentArgs,
}

/// The control plane's tools for agents.
#[derive(Debug, Subcommand)]
pub enum AgentTool {
    /// Write a new configuration-signing key (Ed25519) to FILE (owner-only) and print its
    /// public key, which every agent pins with --config-key.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Issue a token for agent NAME of POOL: the token goes to FILE (owner-only; copy it to the
    /// agent's --token-file), the entry for the control plane's agents file to stdout. To revoke
    /// the agent, set `revoked: true` on its entry.
    Token {
        #[arg(long, value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "POOL")]
        pool: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// How the agent runs.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The control plane's agent endpoint (https only).
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_CONTROL_PLANE",
        required = true
    )]
    pub control_plane: Option<reqwest::Url>,
    /// File holding this agent's token (agt_NAME_SECRET).
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_AGENT_TOKEN_FILE",
        required = true
    )]
    pub token_file: Option<PathBuf>,
    /// The control plane's configuration-signing public key (ed25519:BASE64), pinned.
    #[arg(long, value_name = "FILE", env = "APITREE_CONFIG_KEY", required = true)]
    pub config_key: Option<PathBuf>,
    /// The CA that signed the control plane's certificate (PEM): only it is trusted. Without
    /// it, the system's CAs.
    #[arg(long, value_name = "FILE", env = "APITREE_CONTROL_PLANE_CA")]
    pub ca_file: Option<PathBuf>,
    /// The agent pool this agent serves; a configuration for another pool is refused.
    #[arg(long, value_name = "POOL", env = "APITREE_AGENT_POOL", required = true)]
    pub pool: Option<String>,
    /// Where the last applied configuration is cached.
    #[arg(
        long,
        value_name = "DIR",
        env = "APITREE_AGENT_CACHE_DIR",
        required = true
    )]
    pub cache_dir: Option<PathBuf>,
    /// The bank's local file: listeners, secrets, credentials, each route's upstream.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        env = "APITREE_CONFIG",
        required = true
    )]
    pub config: Option<PathBuf>,
    /// Share rate-limit counters through this Redis: with the pool's other agents (a Redis in
    /// the partner's network) or with the cloud's replicas too (the Redis they use, where the
    /// partner's network reaches it; rediss://… for TLS). Limits are per agent without it, and
    /// when it fails (/readyz then reports degraded).
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// With a rediss:// URL: verify Redis's certificate against these CA certificates (PEM)
    /// instead of the system's.
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_REDIS_CA_FILE",
        requires = "redis_url"
    )]
    pub redis_ca_file: Option<PathBuf>,
    /// How often metadata is reported to the control plane.
    #[arg(
        long,
        value_name = "DURATION",
        env = "APITREE_AGENT_REPORT_EVERY",
        default_value = "10s"
    )]
    pub report_every: crate::crd::KubeDuration,
    /// Do not write the JSON access log to stdout.
    #[arg(long, env = "APITREE_NO_ACCESS_LOG")]
    pub no_access_log: bool,
}

/// The person a data subject request is about.
#[derive(Debug, clap::Args)]
pub struct DsarSubject {
    /// The console user's id.
    #[arg(
        long,
        value_name = "ID",
        required_unless_present = "email",
        conflicts_with = "email"
    )]
    pub user: Option<uuid::Uuid>,
    /// The console user's email (case-insensitive).
    #[arg(long)]
    pub email: Option<String>,
    /// Another identity of the same person, recorded by the operator: slack:<Slack user id>
    /// (who pressed Slack buttons, acknowledged incidents) or os:<user name> (who ran the
    /// CLI). Repeatable.
    #[arg(long = "identity", value_name = "KIND:ID")]
    pub identities: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum DsarCommand {
    /// Print one JSON document with everything apitree holds about a person: profile, org and
    /// role, the API keys and BYOK credentials they created (never hashes or ciphertexts), the
    /// keys' usage, audit rows where they act or are acted on, incidents they acknowledged,
    /// their Slack/OS identities and earlier requests. The export is itself audited.
    ///
    ///   apitree dsar export --email alice@example.com --identity slack:U024BE7LH > alice.json
    Export {
        #[command(flatten)]
        who: DsarSubject,
        #[command(flatten)]
        actor: ActorArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Erase a person: the keys they created are revoked, the BYOK credentials they wrote
    /// removed, their profile overwritten, their identities forgotten and their Slack id
    /// scrubbed from incidents and queued messages. The audit log keeps its rows (they name
    /// people only by reference) and `apitree audit verify` still passes. Refused for a
    /// super_admin and for an org's last admin. Export first: nothing can be undone.
    ///
    ///   apitree dsar erase --email alice@example.com --reason "ticket 4711: account closed" --yes
    Erase {
        #[command(flatten)]
        who: DsarSubject,
        /// Why (recorded in the audit log and the request queue; no personal data here).
        #[arg(long)]
        reason: String,
        /// Confirms the erasure (without it the command only says what it would erase).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        actor: ActorArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DriftCommand {
    /// Compare the database with the expected schema and the migration history.
    Check {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
        /// Check a database that holds tables but no apitree migration history (refused
        /// otherwise: it is probably another application's).
        #[arg(long)]
        adopt: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Fix missing objects and security drift; changed objects with --allow-changed.
    Fix {
        /// Also rewrite objects that differ (column types, defaults, constraints): may rewrite data.
        #[arg(long)]
        allow_changed: bool,
        /// Fix a database that holds tables but no apitree migration history: creates apitree's
        /// tables and turns on row-level security there (refused otherwise).
        #[arg(long)]
        adopt: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// Migrate an EMPTY database and write its schema as the expected-schema snapshot.
    Snapshot {
        /// Where to write it; the release embeds src/drift/expected-schema.json.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Address of the status page, metrics, health and Slack interactions.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:8080",
        env = "APITREE_HTTP"
    )]
    pub http: String,
    #[command(flatten)]
    pub tls: HttpTlsArgs,
    /// Namespace of the leader Lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "apitree-system")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "APITREE_LEASE", default_value = "apitree-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Slack channel for notifications when SLACK_BOT_TOKEN is set.
    #[arg(long, env = "APITREE_SLACK_CHANNEL", default_value = "apitree")]
    pub slack_channel: String,
    /// Proxy image of gateways whose spec names none: the operator's own image.
    #[arg(long, env = "APITREE_IMAGE")]
    pub image: Option<String>,
    /// Public URL of the status page, linked from notifications.
    #[arg(long, env = "APITREE_STATUS_URL")]
    pub status_url: Option<String>,
    /// How often the health sweep checks every gateway: its routes' upstreams (each route's
    /// probe) and serving replicas, and its database's reachability, schema drift (fixed at
    /// once under driftPolicy auto), keys whose rotation grace ended (revoked) and data past
    /// its spec.retention (deleted in batches).
    #[arg(long, env = "APITREE_SWEEP_EVERY", default_value = "15m")]
    pub sweep_every: crate::crd::KubeDuration,
    #[command(flatten)]
    pub state: StateDbArgs,
    #[command(flatten)]
    pub agents: AgentEndpointArgs,
}

#[derive(Debug, Args)]
pub struct LocalArgs {
    /// A manifest file, or a directory of them.
    #[arg(long = "file", short = 'f', value_name = "FILE_OR_DIR")]
    pub path: PathBuf,
    /// Orgs, keys, credentials and secret sources for every gateway (the proxy config format;
    /// its routes and tiers are replaced by each ApiGateway's).
    #[arg(long, value_name = "FILE", env = "APITREE_CONFIG")]
    pub proxy_config: Option<PathBuf>,
    /// Address of the status page, metrics and Slack interactions.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        env = "APITREE_HTTP"
    )]
    pub http: String,
    #[command(flatten)]
    pub tls: HttpTlsArgs,
    /// First port of the gateways' listeners: gateway n (in name order of first sight) gets
    /// PORT+2n (front) and PORT+2n+1 (preview). Ephemeral ports when unset.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Slack channel for notifications when SLACK_BOT_TOKEN is set.
    #[arg(long, env = "APITREE_SLACK_CHANNEL", default_value = "apitree")]
    pub slack_channel: String,
    #[command(flatten)]
    pub state: StateDbArgs,
    #[command(flatten)]
    pub agents: AgentEndpointArgs,
}

/// TLS for the HTTP port (status page, `/api/gateways`, `/metrics`, `/slack/interactions`).
#[derive(Debug, Args)]
pub struct HttpTlsArgs {
    /// Serve the HTTP port over TLS 1.3 with this certificate chain (PEM, leaf first), with
    /// HSTS; re-read when the file changes (a bad new pair keeps the old one).
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

impl HttpTlsArgs {
    pub fn pair(&self) -> Option<(PathBuf, PathBuf)> {
        self.tls_cert.clone().zip(self.tls_key.clone())
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// `json` prints only one JSON summary on stdout (gate runs, incidents, notification
    /// count, the gateway's schema drift status); progress stays on stderr.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Leave the gateway, its synthetic clients, the sample API and the status page up after
    /// the tour, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Address of the status page with --keep-running.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        env = "APITREE_HTTP"
    )]
    pub http: String,
    /// Slack channel for the tour's notifications when SLACK_BOT_TOKEN is set.
    #[arg(
        long,
        env = "APITREE_DEMO_SLACK_CHANNEL",
        default_value = "apitree-demo"
    )]
    pub slack_channel: String,
    /// PostgreSQL for the tour: the gateway names it, so the gate's schema check runs for
    /// real; incidents and notifications are kept there; and a drift step is added (tenant
    /// isolation switched off, found and fixed by the health sweep). Give it an empty database:
    /// the demo migrates it and marks it as its own, and refuses one with other tables. Falls
    /// back to DATABASE_URL.
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The proxy's YAML configuration.
    #[arg(long, short = 'c', value_name = "FILE", env = "APITREE_CONFIG")]
    pub config: PathBuf,
    /// Share rate-limit counters across replicas through Redis, e.g. redis://127.0.0.1:6379
    /// (rediss://… for TLS).
    /// When Redis fails, limits are applied per replica and /readyz reports degraded.
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// With a rediss:// URL: verify Redis's certificate against these CA certificates (PEM)
    /// instead of the system's.
    #[arg(
        long,
        value_name = "FILE",
        env = "APITREE_REDIS_CA_FILE",
        requires = "redis_url"
    )]
    pub redis_ca_file: Option<PathBuf>,
    /// Database mode: serve orgs, keys, APIs and credentials from this PostgreSQL database (on
    /// top of the file's), reloading on every change. If the database goes away the last good
    /// configuration keeps serving and /readyz reports degraded.
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Database mode: networks sellers' upstreams may reach although they are loopback,
    /// link-local (cloud metadata), private or reserved, which are refused by default (each
    /// connection's resolved addresses are checked). Repeat or separate with commas.
    #[arg(
        long = "upstream-allow",
        value_name = "CIDR",
        value_delimiter = ',',
        env = "APITREE_UPSTREAM_ALLOW",
        requires = "database_url"
    )]
    pub upstream_allow: Vec<ipnet::IpNet>,
    /// Override the config's listen address.
    #[arg(long, value_name = "ADDR", env = "APITREE_LISTEN")]
    pub listen: Option<String>,
    /// Override the config's admin address (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", env = "APITREE_ADMIN")]
    pub admin: Option<String>,
    /// Do not write the JSON access log to stdout.
    #[arg(long, env = "APITREE_NO_ACCESS_LOG")]
    pub no_access_log: bool,
    /// In database mode, do not record usage (per key, API and day) in usage_counters: the
    /// console's usage and quota figures then stay empty.
    #[arg(long, env = "APITREE_NO_USAGE_METERING")]
    pub no_usage_metering: bool,
}

/// Where commands find the key pepper and master keys.
#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Read secrets.pepperFile / secrets.masterKeyFile from this proxy config (env variables
    /// APITREE_KEY_PEPPER and APITREE_MASTER_KEY win over it).
    #[arg(long, short = 'c', value_name = "FILE", env = "APITREE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Create an org; prints its id (a UUID).
    Create {
        /// Display name (unique).
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

/// Who is acting, for the audit log: always the OS user running the command (read from the
/// process's uid, not from the environment), with an optional label.
#[derive(Debug, Args)]
pub struct ActorArgs {
    /// A label recorded next to the OS user in the audit log, e.g. a ticket number.
    #[arg(long, env = "APITREE_ACTOR")]
    pub actor: Option<String>,
}

impl ActorArgs {
    /// `os:<user>` or `os:<user> (<label>)`; says on stderr what is recorded.
    pub fn resolve(&self) -> String {
        let label = self
            .actor
            .as_deref()
            .map(|a| {
                a.chars()
                    .filter(|c| !c.is_control())
                    .take(100)
                    .collect::<String>()
            })
            .filter(|a| !a.trim().is_empty());
        let actor = match label {
            Some(l) => format!("os:{} ({})", os_user(), l.trim()),
            None => format!("os:{}", os_user()),
        };
        eprintln!("audit actor: {actor} (the OS user running this command)");
        actor
    }
}

/// The name of the process's real user: uid from /proc, name from /etc/passwd; `uid:N` when
/// the name is unknown.
pub fn os_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(str::to_string))
        });
    let Some(uid) = uid else {
        return std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid:{uid}"))
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key in the database. Prints the key once; only its hash is stored.
    Create {
        /// Org id (from `apitree orgs create`).
        #[arg(long)]
        org: uuid::Uuid,
        /// live or test.
        #[arg(long, value_enum)]
        scope: KeyScope,
        /// Rate-limit tier name (keys with a tier the proxy does not define use its default).
        #[arg(long, default_value = "default")]
        tier: String,
        /// Requests per UTC day for this key (overrides the tier's per-day limit).
        #[arg(long)]
        daily_quota: Option<u64>,
        /// A label for people.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        secrets: SecretArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// Issue a replacement key. The old key stays valid for the grace period, then stops.
    Rotate {
        /// Key id (from `apitree keys list`).
        id: uuid::Uuid,
        /// How long the old key keeps working, e.g. 24h or 3d.
        #[arg(long, default_value = "24h")]
        grace: crate::crd::KubeDuration,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        secrets: SecretArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// Revoke every rotated key whose grace period has ended (the operator's sweep does this
    /// every 15 minutes; this runs it once). Prints the revoked prefixes.
    Sweep {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// Revoke a key now.
    Revoke {
        /// Key id.
        id: uuid::Uuid,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// List keys (prefixes and state; never the keys).
    List {
        /// Only this org's keys.
        #[arg(long)]
        org: Option<uuid::Uuid>,
        /// Table or JSON.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Print the stored form (prefix and HMAC hash) of a key, as a `keys:` entry for a DB-less
    /// config. Pass the key as an argument or `-` to read it from stdin (keeps it out of shell
    /// history).
    Hash {
        /// The key, or `-` for stdin.
        key: String,
        /// Org id to put in the entry.
        #[arg(long, default_value = "ORG_ID")]
        org: String,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// Generate a new key. Prints the key once (to stdout) and its config entry (to stderr).
    Generate {
        /// live or test.
        #[arg(long, value_enum, default_value_t = KeyScope::Live)]
        scope: KeyScope,
        /// Org id to put in the entry.
        #[arg(long, default_value = "ORG_ID")]
        org: String,
        #[command(flatten)]
        secrets: SecretArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Encrypt an upstream credential read from stdin for one org and API (route); prints a
    /// `credentials:` entry. The ciphertext only decrypts for that org and API.
    Encrypt {
        /// Name routes use to refer to it.
        #[arg(long)]
        name: String,
        /// Org the credential belongs to (the buyer's for BYOK).
        #[arg(long)]
        org: String,
        /// Route (API) it is for.
        #[arg(long)]
        api: String,
        /// Who owns it: byok (one buyer's own key) or system (the platform's or seller's).
        #[arg(long, value_enum, default_value_t = CredentialKind::System)]
        kind: CredentialKind,
        /// Header to inject.
        #[arg(long, default_value = "authorization")]
        header: String,
        /// Text before the secret in the header value.
        #[arg(long, default_value = "Bearer ")]
        value_prefix: String,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// After adding a new master-key version: re-encrypt every upstream credential in the
    /// database under it, in batches that each commit (an interrupted run resumes; concurrent
    /// runs share the work). Prints progress and which old versions are still in use; a version
    /// no credential uses can be removed from the master keys.
    Reencrypt {
        /// Credentials per transaction.
        #[arg(long, default_value_t = 100)]
        batch: i64,
        #[command(flatten)]
        secrets: SecretArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the audit log's hash chain. Exit 0 when intact; exit 3 naming the first row
    /// whose content or link does not match (e.g. edited by a superuser with triggers off).
    Verify {
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DetectCommand {
    /// Run recorded windows through the detector to see what it would have raised.
    ///
    /// Input CSV with a header: `timestamp,requests,errors` (optional `auth_failures`,
    /// `p99_ms`) or `timestamp,value` for a plain gauge; timestamps RFC 3339, `YYYY-MM-DD
    /// HH:MM:SS` (UTC) or unix seconds, one row per window, sorted (gaps are fine). Prints one
    /// line per row (JSON objects with --format json): timestamp, baseline, ratio, p_value,
    /// severity (the incident's level), anomaly_score in [0, 1] (0.5: anomalous; high
    /// where something starts) and event (open, escalate, deescalate, resolve). Malformed
    /// input exits 1 naming the line.
    ///
    ///   apitree detect replay --input errors.csv --config detection.yaml --format json
    Replay {
        /// The CSV file (`-` for stdin).
        #[arg(long, short = 'i', value_name = "FILE")]
        input: PathBuf,
        /// Detection settings: YAML shaped like an ApiGateway's spec.detection (window,
        /// thresholds, alpha, minRequests, baseline, baselineFloor, resolveAfterWindows).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// text or json.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum PiiCommand {
    /// Scan stdin. Lists findings (line, column, kind), or with --mask writes stdin to stdout
    /// with every finding masked (streaming, bounded memory).
    Scan {
        /// Write the masked text instead of a list of findings.
        #[arg(long)]
        mask: bool,
        /// Findings as text lines or one JSON document.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Directory to write one YAML file per CRD into (created if missing). Repeatable.
    #[arg(
        long,
        value_name = "DIR",
        env = "APITREE_CRDS_OUT",
        value_delimiter = ','
    )]
    pub out: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Migrate a database that holds tables but no apitree migration history (refused
    /// otherwise: it is probably another application's).
    #[arg(long)]
    pub adopt: bool,
    #[command(flatten)]
    pub db: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://apitree@db:5432/apitree. Falls back to DATABASE_URL.
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
}

/// Where `operator` and `local` keep their state.
#[derive(Debug, Args)]
pub struct StateDbArgs {
    /// PostgreSQL for incidents, the Slack outbox and the detector's baselines, so a restart or
    /// a leader change loses nothing; it must be at this release's latest migration (`apitree
    /// migrate` first). Without it they are kept in memory. Falls back to DATABASE_URL.
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
}

impl StateDbArgs {
    /// The URL from the flag, `APITREE_DATABASE_URL` or `DATABASE_URL`, in that order.
    pub fn resolve(&self) -> Option<String> {
        database_url_or_env(&self.database_url)
    }
}

/// `url`, else `DATABASE_URL`; an empty value counts as none.
pub fn database_url_or_env(url: &Option<String>) -> Option<String> {
    url.clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|u| !u.trim().is_empty())
}

impl DatabaseArgs {
    /// The URL from the flag, `APITREE_DATABASE_URL` or `DATABASE_URL`, in that order.
    pub fn resolve(&self) -> Option<String> {
        database_url_or_env(&self.database_url)
    }
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Address of the console port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8090",
        env = "APITREE_CONSOLE_LISTEN"
    )]
    pub listen: String,
    /// How long a session token is valid.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "15m",
        env = "APITREE_SESSION_TTL"
    )]
    pub session_ttl: crate::crd::duration::KubeDuration,
    /// Failed sign-ins per account within --login-window before that account is refused
    /// (429 with Retry-After) until the window ends.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        env = "APITREE_LOGIN_MAX_PER_ACCOUNT"
    )]
    pub login_max_per_account: u32,
    /// Failed sign-ins per client address within --login-window before that address is refused.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        env = "APITREE_LOGIN_MAX_PER_ADDRESS"
    )]
    pub login_max_per_address: u32,
    /// The window failed sign-ins are counted in.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "15m",
        env = "APITREE_LOGIN_WINDOW"
    )]
    pub login_window: crate::crd::duration::KubeDuration,
    /// Proxies (CIDRs, e.g. the ingress controller's pod network) whose X-Forwarded-For the
    /// console believes: a request from one of them is throttled and logged by the client
    /// address it names (the rightmost one not itself a trusted proxy). Without this, a
    /// console behind an ingress sees one address for everyone, and per-address throttling
    /// counts all sign-ins together. Repeat the flag or separate with commas.
    #[arg(
        long = "trusted-proxy",
        value_name = "CIDR",
        value_delimiter = ',',
        env = "APITREE_CONSOLE_TRUSTED_PROXIES"
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Networks sellers may register upstreams in although they are loopback, link-local
    /// (cloud metadata), private or reserved, which are refused by default. Give the gateways'
    /// `--upstream-allow` the same list. Repeat or separate with commas.
    #[arg(
        long = "upstream-allow",
        value_name = "CIDR",
        value_delimiter = ',',
        env = "APITREE_UPSTREAM_ALLOW"
    )]
    pub upstream_allow: Vec<ipnet::IpNet>,
    /// Where security vulnerabilities are reported (an email address or an https:// URL),
    /// shown in the page's footer.
    #[arg(long, value_name = "ADDRESS", env = "APITREE_SECURITY_CONTACT", value_parser = crate::console::Contact::parse)]
    pub security_contact: Option<crate::console::Contact>,
    /// Where people send data protection requests (access, erasure): an email address or an
    /// https:// URL, shown in the page's footer.
    #[arg(long, value_name = "ADDRESS", env = "APITREE_PRIVACY_CONTACT", value_parser = crate::console::Contact::parse)]
    pub privacy_contact: Option<crate::console::Contact>,
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
    #[command(flatten)]
    pub tls: HttpTlsArgs,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a console user with a password read from stdin (one line). Recorded in the
    /// audit log as the OS user running the command.
    ///
    ///   printf '%s\n' "$PASSWORD" | apitree users create --email ops@example.com --role super_admin --password-stdin
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum)]
        role: crate::console::authz::Role,
        /// The org of a buyer or seller (admins and super_admins belong to none).
        #[arg(long, value_name = "ORG_ID")]
        org: Option<uuid::Uuid>,
        /// Read the password from stdin (required: passwords are never arguments).
        #[arg(long, required = true)]
        password_stdin: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// List console users (email, role, org, state).
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Disable a user: their sessions stop working at their next request.
    Disable {
        #[arg(long)]
        email: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}
