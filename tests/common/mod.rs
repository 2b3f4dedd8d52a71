//! Test harness: a real nats-server and real kloudmeter processes on loopback, on
//! random ports in temp dirs, stopped by PID. Nothing here is mocked.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod chart;
pub mod control_plane;
pub mod tools;

use std::future::IntoFuture;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where nats-server comes from (see [`tools`]).
pub fn nats_server_bin() -> PathBuf {
    tools::nats_server()
}

fn wait_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {port} did not open within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A nats-server with JetStream on a random port and its own store directory.
pub struct Nats {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Arguments beyond the single server's (a cluster member's name and routes).
    cluster_args: Vec<String>,
    /// Environment beyond the harness's own.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_with_env(&[])
    }

    /// A single server with extra environment (the benchmark's `GODEBUG=gctrace=1`).
    pub fn start_with_env(env: &[(&str, &str)]) -> Nats {
        let mut n = Nats {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            cluster_args: vec![],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        n.spawn();
        n
    }

    /// What the server wrote to stderr so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// A JetStream cluster of `size` servers routed to each other on loopback.
    pub fn cluster(size: usize) -> Vec<Nats> {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<Nats> = route_ports
            .iter()
            .enumerate()
            .map(|(i, route)| Nats {
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                cluster_args: vec![
                    "--server_name".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "km".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    routes.clone(),
                ],
                env: vec![],
                child: None,
            })
            .collect();
        for n in &mut servers {
            n.spawn();
        }
        servers
    }

    /// Every server of a cluster, as NATS_URL takes them.
    pub fn urls(cluster: &[Nats]) -> String {
        cluster.iter().map(Nats::url).collect::<Vec<_>>().join(",")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server_bin())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("js"))
            .args(&self.cluster_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
    }
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// Stop by PID (SIGKILL) and start again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    pub async fn client(&self) -> jetstream::Context {
        let c = async_nats::connect(self.url())
            .await
            .expect("test client connects");
        jetstream::new(c)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kloudmeter's store on `nats` under stream name `stream`, opened from the flags as the
/// process opens it, with no kloudmeter process.
pub async fn store_alone(nats: &Nats, stream: &str) -> kloudmeter::nats::store::Store {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: kloudmeter::config::Config,
    }
    let cli = <Cli as clap::Parser>::try_parse_from([
        "kloudmeter",
        "--nats-url",
        &nats.url(),
        "--meter-nats-stream",
        stream,
    ])
    .unwrap();
    kloudmeter::nats::store::Store::connect_once(&cli.cfg.nats)
        .await
        .unwrap()
}

/// One kloudmeter process (the binary under test).
pub struct Km {
    pub port: u16,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Km {
    /// Start with the given NATS and extra environment; waits until /readyz is 200.
    pub async fn start(nats: &Nats, stream: &str, extra: &[(&str, &str)]) -> Km {
        let mut env: Vec<(String, String)> = vec![
            ("NATS_URL".into(), nats.url()),
            ("METER_NATS_STREAM".into(), stream.into()),
            ("KUBERNETES".into(), "false".into()),
            ("HTTP_BIND_ADDRESS".into(), "127.0.0.1".into()),
            ("LEADER_TTL".into(), "2s".into()),
            ("LOG_LEVEL".into(), "info,async_nats=warn".into()),
        ];
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let log = nats
            .dir
            .path()
            .join(format!("kloudmeter-{}.log", free_port()));
        let mut km = Km {
            port: free_port(),
            env,
            log,
            child: None,
        };
        km.spawn().await;
        km
    }
    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // KM_WRAPPER="heaptrack -o /tmp/km" (say) runs kloudmeter under a profiler
        let wrapper = std::env::var("KM_WRAPPER").unwrap_or_default();
        // KLOUDMETER_BIN=/path/to/another/build compares binaries (before/after a change)
        let binary = std::env::var("KLOUDMETER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kloudmeter").to_string());
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&binary);
                c.env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default());
                c
            }
            None => {
                let mut c = Command::new(&binary);
                c.env_clear();
                c
            }
        };
        // kloudmeter's default DATA_DIR is a fresh temporary folder, which a `kill -9`
        // leaves behind: keep it inside the test's own temporary folder.
        if let Some(scratch) = self.log.parent() {
            command.env("TMPDIR", scratch);
        }
        let child = command
            .envs(self.env.iter().cloned())
            .env("HTTP_SERVER_PORT", self.port.to_string())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting kloudmeter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(self.url("/readyz")).await {
                if r.status() == 200 {
                    break;
                }
            }
            if Instant::now() > deadline {
                let body = match reqwest::get(self.url("/readyz")).await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                panic!("kloudmeter not ready ({body}); log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap()
    }
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }
    /// The `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    /// A metric's value from /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Drop for Km {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn post_raw(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Post until a 2xx, retrying on any error or non-2xx, as a well-behaved client does.
/// Returns the number of attempts.
pub async fn post_until_accepted(url: &str, body: &Value, give_up: Duration) -> u32 {
    post_until_accepted_by(&[url.to_string()], 0, body, give_up).await
}

/// [`post_until_accepted`] over several replicas: starts at `urls[first]` and moves to
/// the next URL after each failure.
pub async fn post_until_accepted_by(
    urls: &[String],
    first: usize,
    body: &Value,
    give_up: Duration,
) -> u32 {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let deadline = Instant::now() + give_up;
    let mut attempts = 0;
    loop {
        let url = &urls[(first + attempts as usize) % urls.len()];
        attempts += 1;
        if let Ok(r) = client.post(url).json(body).send().await {
            if r.status().is_success() {
                return attempts;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no 2xx for {url} within {give_up:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` events of `event_type` stored as ingestion stores them (dedup header, JSON body),
/// straight into the stream: the fastest way to a long history. Each has `{"v": 1}`.
pub async fn preload_events(js: &jetstream::Context, stream: &str, event_type: &str, n: usize) {
    let events = (0..n).map(|i| {
        let e = json!({"id": format!("{event_type}-{i}"), "eventType": event_type,
            "subject": format!("customer-{}", i % 100), "time": "2026-11-02T10:00:00Z", "data": {"v": 1}});
        (format!("{:016x}{i:016x}", event_type.len()), e)
    });
    store_events(js, &format!("{stream}.events.{event_type}"), events).await;
}

/// Events published on `subject` as ingestion stores them: each with its dedup header
/// (32 hex digits) and JSON body, 2,000 acknowledgements in flight.
pub async fn store_events(
    js: &jetstream::Context,
    subject: &str,
    events: impl IntoIterator<Item = (String, Value)>,
) {
    let mut acks = FuturesUnordered::new();
    for (dedup, e) in events {
        let mut h = HeaderMap::new();
        h.insert("Km-Dedup", dedup.as_str());
        let ack = js
            .publish_with_headers(subject.to_string(), h, e.to_string().into())
            .await
            .unwrap();
        acks.push(ack.into_future());
        while acks.len() >= 2000 {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(a) = acks.next().await {
        a.unwrap();
    }
}

/// Wait until the aggregator has folded everything in the stream: its cursor (in the
/// state bucket) has reached the stream's last sequence. Readings are then final.
pub async fn caught_up(js: &jetstream::Context, stream: &str, timeout: Duration) {
    if let Err(e) = wait_caught_up(js, stream, 0, timeout).await {
        panic!("{e}");
    }
}

/// [`caught_up`] in every one of `partitions` partitions of the installation `stream`.
#[allow(dead_code)]
pub async fn caught_up_partitions(
    js: &jetstream::Context,
    stream: &str,
    partitions: u16,
    timeout: Duration,
) {
    for p in 0..partitions {
        if let Err(e) = wait_caught_up(js, stream, p, timeout).await {
            panic!("partition {p}: {e}");
        }
    }
}

/// [`caught_up`], showing the end of `km`'s log when it does not happen (a stuck
/// aggregator is otherwise a mystery once the test's folders are gone).
pub async fn caught_up_or_log(js: &jetstream::Context, stream: &str, timeout: Duration, km: &Km) {
    if let Err(e) = wait_caught_up(js, stream, 0, timeout).await {
        let log = km.logs();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        panic!("{e}; kloudmeter's log ends:\n{tail}");
    }
}

async fn wait_caught_up(
    js: &jetstream::Context,
    stream: &str,
    partition: u16,
    timeout: Duration,
) -> Result<(), String> {
    let names = kloudmeter::nats::keys::Names::new(stream).partition(partition);
    let (stream, cursor_key) = (names.stream.as_str(), names.cursor_key());
    let deadline = Instant::now() + timeout;
    let state = loop {
        if let Ok(kv) = js.get_key_value(names.state_bucket()).await {
            break kv;
        }
        if Instant::now() >= deadline {
            return Err("state bucket never appeared".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    loop {
        let last = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence;
        // (a failed read is retried: right after a nats-server restart it can be)
        let (cursor, error) = match state.get(&cursor_key).await {
            Ok(Some(v)) => (std::str::from_utf8(&v).unwrap().parse().unwrap(), None),
            Ok(None) => (0, None),
            Err(e) => (0, Some(e.to_string())),
        };
        if cursor >= last {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(match error {
                Some(e) => format!("aggregator's cursor unreadable ({e}); stream at {last}"),
                None => format!("aggregator stuck at {cursor} of {last}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `i`th claim [`fill_claim_log`] makes: an id no event has, received at `time_ns`.
pub fn claim(i: usize, time_ns: i64) -> ([u8; 16], kloudmeter::domain::dedup::Record) {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    id[8..].copy_from_slice(&(i as u64).to_be_bytes());
    (
        id,
        kloudmeter::domain::dedup::Record {
            seq: i as u64 + 1_000_000_000,
            time_ns,
        },
    )
}

/// Claims per claim-log message, as the aggregator appends them.
pub const CLAIMS_PER_MESSAGE: usize = 16_384;

/// `n` claims ([`claim`]) received now (inside the window), straight into the claim
/// log of `stream` as the aggregator appends them. Returns their receipt time.
pub async fn fill_claim_log(js: &jetstream::Context, stream: &str, n: usize) -> i64 {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let mut acks = Vec::new();
    for first in (0..n).step_by(CLAIMS_PER_MESSAGE) {
        let claims: Vec<_> = (first..(first + CLAIMS_PER_MESSAGE).min(n))
            .map(|i| claim(i, now))
            .collect();
        acks.push(
            js.publish(
                format!("{stream}.claims"),
                kloudmeter::claims::encode(&claims).into(),
            )
            .await
            .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
    now
}

/// A `count` meter `live` on event type `live`: freshness checks post to it and wait for
/// its one subject, `s`, to show the count.
pub async fn create_live_meter(km: &Km) {
    let meter = json!({"id": "live", "eventType": "live", "aggregation": "count"});
    let (status, body) = post(&km.url("/api/v1/meters"), &meter).await;
    assert_eq!(status, 201, "{body}");
}

/// Post the `k`th event of the `live` meter (the same `k` is the same event id).
pub async fn post_live(km: &Km, k: usize, give_up: Duration) {
    let event = json!({"id": format!("live-{k}"), "eventType": "live", "subject": "s"});
    post_until_accepted(&km.url("/api/v1/events"), &event, give_up).await;
}

/// Wait until the `live` meter shows `n` events.
pub async fn live_counted(km: &Km, n: usize, timeout: Duration) {
    let want = n.to_string();
    wait_for(&format!("the live meter at {n}"), timeout, || async {
        try_subject_values(km, "live")
            .await
            .is_some_and(|v| v.get("s") == Some(&want))
    })
    .await;
}

/// Wait until `check` holds (for state that changes asynchronously, such as a meter
/// being picked up), failing with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subject totals of a meter as `subject -> value` from /api/v1/readings.
/// Two string fields of every row of a query answer, in order: e.g. (`subject`, `value`).
pub fn row_pairs(answer: &Value, a: &str, b: &str) -> Vec<(String, String)> {
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[a].as_str().unwrap().to_string(),
                r[b].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// [`subject_values`], or None when the process does not answer 200 (for polling through
/// faults: a process reconnecting to NATS answers 503 meanwhile).
pub async fn try_subject_values(
    km: &Km,
    meter: &str,
) -> Option<std::collections::BTreeMap<String, String>> {
    let (status, body) = get(&km.url(&format!("/api/v1/readings?meter={meter}"))).await;
    (status == 200).then(|| subject_rows(&body))
}

/// `subject -> value` of a `/api/v1/readings` answer.
fn subject_rows(body: &Value) -> std::collections::BTreeMap<String, String> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["subject"].as_str().unwrap().to_string(),
                r["value"].as_str().unwrap_or("null").to_string(),
            )
        })
        .collect()
}

pub async fn subject_values(km: &Km, meter: &str) -> std::collections::BTreeMap<String, String> {
    let (status, body) = get(&km.url(&format!("/api/v1/readings?meter={meter}"))).await;
    assert_eq!(status, 200, "{body}");
    subject_rows(&body)
}

/// The meter-level reading from the seed endpoint.
pub async fn meter_reading(km: &Km, meter: &str) -> Value {
    let (status, body) = get(&km.url(&format!("/api/reading/?key={meter}"))).await;
    if status != 200 {
        let log = km.logs();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        panic!(
            "{status} {body}; kloudmeter's errors:\n{}",
            errors.join("\n")
        );
    }
    body
}

/// One request to every route `/openapi.json` describes (path parameters filled with
/// placeholders, `{}` as the body of writes): (method, path, status, JSON body).
pub async fn walk_described_routes(
    km: &Km,
    client: &reqwest::Client,
) -> Vec<(String, String, u16, Value)> {
    let doc: Value = client
        .get(km.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = km.url(
                &path
                    .replace("{id}", "x")
                    .replace("{namespace}", "ns")
                    .replace("{name}", "n"),
            );
            let req = match method.as_str() {
                "get" => client.get(&url),
                "post" => client.post(&url).json(&serde_json::json!({})),
                "put" => client.put(&url).json(&serde_json::json!({})),
                "delete" => client.delete(&url),
                other => panic!("unexpected method {other}"),
            };
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            out.push((
                method.clone(),
                path.clone(),
                status,
                r.json().await.unwrap_or(Value::Null),
            ));
        }
    }
    out
}

/// The Lease/NATS-lease holder name a kloudmeter process started by [`Km`] uses.
pub fn holder_of(pid: u32) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host}-{pid}")
}
