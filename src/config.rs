//! Configuration: every setting is an environment variable and the same `--flag`
//! (CONTRACT §2). Invalid values stop start-up with one line naming the variable.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Who may call `/api/**` (CONTRACT §2 `AUTH_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Anyone.
    None,
    /// The one shared `API_TOKEN`.
    Token,
    /// Kubernetes tokens, checked with a TokenReview and authorized per request with a
    /// SubjectAccessReview (API_TOKEN, when set, is still accepted and may do anything).
    Kubernetes,
}

/// CONTRACT §2 `TENANCY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TenancyMode {
    Shared,
    Namespaced,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubernetesMode {
    Auto,
    True,
    False,
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{e} (e.g. 90s, 15m, 24h, 30d)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// METER_INTERVAL: a duration like every other (`10s`, `1m`), or a bare number of
/// seconds as the original KloudMeter took it.
fn parse_interval(raw: &str) -> Result<Duration, String> {
    let d = match raw.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(raw.trim())
            .map_err(|e| format!("{e} (seconds, or e.g. 30s, 5m)"))?,
    };
    if d < Duration::from_secs(1) {
        return Err("must be at least 1 second".into());
    }
    Ok(d)
}

fn parse_webhook_url(raw: &str) -> Result<String, String> {
    let ok = (raw.starts_with("http://") || raw.starts_with("https://"))
        && reqwest::Url::parse(raw).is_ok_and(|u| u.host_str().is_some());
    if ok {
        Ok(raw.to_string())
    } else {
        Err(format!("{raw:?} must be an http:// or https:// URL"))
    }
}

fn parse_log_level(raw: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(raw)
        .map(|_| raw.to_string())
        .map_err(|e| format!("{e} (e.g. info, debug, info,kloudmeter=debug)"))
}

fn parse_stream(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(raw.to_string())
    } else {
        Err(format!("{raw:?} must be 1-64 characters of [A-Za-z0-9_-]"))
    }
}

/// Where the events and readings live: what `kloudmeter setup` needs, and the part of
/// [`Config`] the NATS layer reads.
#[derive(Args, Clone, Debug)]
pub struct NatsConfig {
    /// NATS server (JetStream enabled), or a comma-separated list of a cluster's
    /// servers: the connection moves to another while any of them is up.
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
    pub nats_url: String,
    /// Copies of every stream and bucket KloudMeter creates (1, 3 or 5; at most the
    /// servers in the NATS cluster). With 3 they survive the loss of one server.
    #[arg(long, env = "NATS_REPLICAS", default_value_t = 1, value_parser = parse_replicas)]
    pub nats_replicas: usize,
    /// JetStream stream that holds ingested events; KV buckets are named after it.
    #[arg(long, env = "METER_NATS_STREAM", default_value = "meters", value_parser = parse_stream)]
    pub meter_nats_stream: String,
    /// Partitions the events are spread over by subject (1-64), each aggregated by one
    /// process at a time: replicas share them. Fixed when the installation's streams are
    /// first created; a different value later is refused.
    #[arg(long, env = "PARTITIONS", default_value_t = 1, value_parser = parse_partitions)]
    pub partitions: u16,
    /// An event id seen again within this window is counted once.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub dedup_window: Duration,
    /// How long raw events stay replayable (backfill, rebuilds).
    #[arg(long, env = "EVENT_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub event_retention: Duration,
    /// JetStream's own in-memory duplicate window on the event stream (a first, cheap
    /// line of defence; the durable one is DEDUP_WINDOW).
    #[arg(long, env = "JETSTREAM_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub jetstream_duplicate_window: Duration,
    /// How long the aggregator's leadership lasts without renewal; a standby takes over
    /// within this time after the leader dies.
    #[arg(long, env = "LEADER_TTL", default_value = "10s", value_parser = parse_duration)]
    pub leader_ttl: Duration,
    /// A meter build writes its readings and checkpoint this often: a restarted build
    /// repeats at most this much replay, and each checkpoint rewrites every reading the
    /// build touched since the last (more often builds slower).
    #[arg(long, env = "BUILD_CHECKPOINT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub build_checkpoint_interval: Duration,
    /// shared | namespaced: whether a Meter counts events posted from any namespace
    /// (shared) or only from its own (namespaced; events record their poster's
    /// ServiceAccount namespace, and ids are unique per namespace).
    #[arg(
        long,
        env = "TENANCY",
        default_value = "shared",
        value_enum,
        ignore_case = true
    )]
    pub tenancy: TenancyMode,
    /// With TENANCY=namespaced: comma-separated namespaces whose Meters count events
    /// from every namespace (e.g. `billing`).
    #[arg(long, env = "TENANCY_CROSS_NAMESPACE", default_value = "")]
    pub tenancy_cross_namespace: String,
    /// MiB of readings kept in memory for queries that ask for them again (a dashboard's
    /// month), exact at every query: a watch of the readings bucket drops what changes.
    /// 0 turns the cache off.
    #[arg(long, env = "QUERY_CACHE_MB", default_value_t = 32)]
    pub query_cache_mb: usize,
    /// Log filter (JSON logs on stdout), e.g. `info` or `info,kloudmeter=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info,async_nats=warn", value_parser = parse_log_level)]
    pub log_level: String,
}

impl NatsConfig {
    pub fn partitions(&self) -> crate::domain::partition::Partitions {
        crate::domain::partition::Partitions::new(self.partitions)
            .unwrap_or(crate::domain::partition::Partitions::ONE)
    }

    /// The tenancy rule TENANCY and TENANCY_CROSS_NAMESPACE give.
    pub fn tenancy(&self) -> crate::domain::tenancy::Tenancy {
        use crate::domain::tenancy::Tenancy;
        match self.tenancy {
            TenancyMode::Shared => Tenancy::Shared,
            TenancyMode::Namespaced => Tenancy::Namespaced {
                cross: self
                    .tenancy_cross_namespace
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            },
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        for ns in self.tenancy_cross_namespace.split(',').map(str::trim) {
            let dns_label = ns.len() <= 63
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !dns_label {
                return Err(format!(
                    "TENANCY_CROSS_NAMESPACE: {ns:?} is not a namespace name (comma-separated names)"
                ));
            }
        }
        if self.leader_ttl < Duration::from_secs(1) {
            return Err("LEADER_TTL: must be at least 1s".into());
        }
        self.servers().map(|_| ())
    }

    /// The servers of NATS_URL, each checked (a list is what NATS clients
    /// conventionally take: `nats://a:4222,nats://b:4222`).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        self.nats_url
            .split(',')
            .map(str::trim)
            .map(|url| {
                let parsed = (url.contains("://") || url.contains(':'))
                    .then(|| url.parse::<async_nats::ServerAddr>().ok())
                    .flatten();
                parsed.ok_or_else(|| {
                    format!("NATS_URL: {url:?} is not a NATS URL (nats://host:4222, or a comma-separated list of them)")
                })
            })
            .collect()
    }
}

fn parse_partitions(raw: &str) -> Result<u16, String> {
    raw.trim()
        .parse::<u16>()
        .ok()
        .and_then(crate::domain::partition::Partitions::new)
        .map(|p| p.count())
        .ok_or_else(|| {
            format!(
                "{raw:?} must be a whole number from 1 to {}",
                crate::domain::partition::MAX_PARTITIONS
            )
        })
}

fn parse_replicas(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err(format!(
            "{raw:?} must be 1, 3 or 5 (copies kept by a NATS cluster)"
        )),
    }
}

#[derive(Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsConfig,
    /// HTTP API port.
    #[arg(long, env = "HTTP_SERVER_PORT", default_value_t = 8080)]
    pub http_server_port: u16,
    /// How often readings are written into each Meter's status (`60s`; a bare number
    /// is seconds).
    #[arg(long, env = "METER_INTERVAL", default_value = "60", value_parser = parse_interval)]
    pub meter_interval: Duration,
    /// auto | true | false: whether to run as a Kubernetes operator.
    #[arg(
        long,
        env = "KUBERNETES",
        default_value = "auto",
        value_enum,
        ignore_case = true
    )]
    pub kubernetes: KubernetesMode,
    /// Limit the controller to one namespace (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// When set, every /api/** call needs `Authorization: Bearer <token>`.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// none | token | kubernetes. Default: token when API_TOKEN is set, else none.
    #[arg(long, env = "AUTH_MODE", value_enum, ignore_case = true)]
    pub auth_mode: Option<AuthMode>,
    /// The audience a Kubernetes token must be issued for (AUTH_MODE=kubernetes).
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "kloudmeter")]
    pub auth_audience: String,
    /// How long a token's identity and a permission decision are reused before the API
    /// server is asked again (a revoked grant is refused at most this much later).
    #[arg(long, env = "AUTH_CACHE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub auth_cache_ttl: Duration,
    /// Address the HTTP server binds to.
    #[arg(long, env = "HTTP_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub http_bind_address: std::net::IpAddr,
    /// How long a client may take to send its request headers before the connection is
    /// closed (slow clients cannot hold connections forever).
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// Longest a request may take before it is answered 503 (nothing waits forever).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Folder for this process's local index of event-id claims (a cache of the claim
    /// log in NATS, rebuilt from it when missing). Unset: a fresh temporary folder, so
    /// every start reads the claim log again.
    #[arg(long, env = "DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// How often the aggregator leader publishes a snapshot of its claim index to NATS
    /// (when it has changed): a process with an empty DATA_DIR fetches it and reads only
    /// the claim log after it.
    #[arg(long, env = "CLAIM_SNAPSHOT_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub claim_snapshot_interval: Duration,
    /// Threshold notifications are also POSTed here (CloudEvents, signed when
    /// WEBHOOK_SECRET is set), retried with backoff until a 2xx.
    #[arg(long, env = "WEBHOOK_URL", value_parser = parse_webhook_url)]
    pub webhook_url: Option<String>,
    /// Key of the `Kloudmeter-Signature: sha256=<HMAC-SHA256 of the body>` header.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// How long an undelivered notification is retried before it is given up on (and
    /// counted in kloudmeter_notifications_failed_total).
    #[arg(long, env = "WEBHOOK_RETRY_FOR", default_value = "24h", value_parser = parse_duration)]
    pub webhook_retry_for: Duration,
    /// Most events in flight to JetStream from ingestion before new requests get 503.
    #[arg(long, env = "MAX_INFLIGHT_EVENTS", default_value_t = 20_000)]
    pub max_inflight_events: usize,
}

impl Config {
    /// AUTH_MODE as given, or its default: token when API_TOKEN is set, else none.
    pub fn auth(&self) -> AuthMode {
        self.auth_mode.unwrap_or(if self.api_token.is_some() {
            AuthMode::Token
        } else {
            AuthMode::None
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.api_token.as_deref() == Some("") {
            return Err("API_TOKEN: must not be empty when set".into());
        }
        if self.auth() == AuthMode::Token && self.api_token.is_none() {
            return Err("AUTH_MODE: token needs API_TOKEN to be set".into());
        }
        if self.nats.tenancy == TenancyMode::Namespaced && self.auth() != AuthMode::Kubernetes {
            return Err(
                "TENANCY: namespaced needs AUTH_MODE=kubernetes (an event records the namespace of the ServiceAccount that posted it)"
                    .into(),
            );
        }
        if self.auth_audience.trim().is_empty() {
            return Err("AUTH_AUDIENCE: must not be empty".into());
        }
        if let Some(dir) = &self.data_dir {
            if dir.exists() && !dir.is_dir() {
                return Err(format!("DATA_DIR: {} is not a folder", dir.display()));
            }
        }
        if self.webhook_secret.as_deref() == Some("") {
            return Err("WEBHOOK_SECRET: must not be empty when set".into());
        }
        if self.webhook_url.is_some() && self.webhook_retry_for > self.nats.event_retention {
            return Err(format!(
                "WEBHOOK_RETRY_FOR: at most EVENT_RETENTION ({}), which is how long notifications are kept",
                humantime::format_duration(self.nats.event_retention)
            ));
        }
        if self.max_inflight_events == 0 {
            return Err("MAX_INFLIGHT_EVENTS: must be at least 1".into());
        }
        self.nats.validate()
    }
}
