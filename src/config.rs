//! Configuration: every setting is an environment variable and the same `--flag`
//! (CONTRACT §2). Invalid values stop start-up with one line naming the variable.

use std::time::Duration;

use clap::{Args, ValueEnum};

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

fn parse_interval(raw: &str) -> Result<u64, String> {
    match raw.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 second".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{raw:?} is not a whole number of seconds")),
    }
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

#[derive(Args, Clone, Debug)]
pub struct Config {
    /// NATS server (JetStream enabled).
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
    pub nats_url: String,
    /// JetStream stream that holds ingested events; KV buckets are named after it.
    #[arg(long, env = "METER_NATS_STREAM", default_value = "meters", value_parser = parse_stream)]
    pub meter_nats_stream: String,
    /// HTTP API port.
    #[arg(long, env = "HTTP_SERVER_PORT", default_value_t = 8080)]
    pub http_server_port: u16,
    /// Seconds between writes of readings into each Meter's status.
    #[arg(long, env = "METER_INTERVAL", default_value = "60", value_parser = parse_interval)]
    pub meter_interval: u64,
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
    /// An event id seen again within this window is counted once.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub dedup_window: Duration,
    /// How long raw events stay replayable (backfill, rebuilds).
    #[arg(long, env = "EVENT_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub event_retention: Duration,
    /// When set, every /api/** call needs `Authorization: Bearer <token>`.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Address the HTTP server binds to.
    #[arg(long, env = "HTTP_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub http_bind_address: std::net::IpAddr,
    /// How long the aggregator's leadership lasts without renewal; a standby takes over
    /// within this time after the leader dies.
    #[arg(long, env = "LEADER_TTL", default_value = "10s", value_parser = parse_duration)]
    pub leader_ttl: Duration,
    /// JetStream's own in-memory duplicate window on the event stream (a first, cheap
    /// line of defence; the durable one is DEDUP_WINDOW).
    #[arg(long, env = "JETSTREAM_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub jetstream_duplicate_window: Duration,
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
    /// Most events in flight to JetStream from ingestion before new requests get 503.
    #[arg(long, env = "MAX_INFLIGHT_EVENTS", default_value_t = 20_000)]
    pub max_inflight_events: usize,
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.api_token.as_deref() == Some("") {
            return Err("API_TOKEN: must not be empty when set".into());
        }
        if self.leader_ttl < Duration::from_secs(1) {
            return Err("LEADER_TTL: must be at least 1s".into());
        }
        if let Some(dir) = &self.data_dir {
            if dir.exists() && !dir.is_dir() {
                return Err(format!("DATA_DIR: {} is not a folder", dir.display()));
            }
        }
        if self.max_inflight_events == 0 {
            return Err("MAX_INFLIGHT_EVENTS: must be at least 1".into());
        }
        if !self.nats_url.contains("://") && !self.nats_url.contains(':') {
            return Err(format!(
                "NATS_URL: {:?} is not a NATS URL (nats://host:4222)",
                self.nats_url
            ));
        }
        Ok(())
    }
}
