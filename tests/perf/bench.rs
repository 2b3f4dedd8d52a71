//! `task bench`: KloudMeter against raw JetStream on the same machine, in one run.
//!
//! Every scenario starts a fresh nats-server (and, where needed, kloudmeter or a
//! minimal baseline server, both as separate processes), runs the baseline and
//! KloudMeter interleaved for several repetitions, and reports medians, spread, the
//! ratio, and peak RSS (VmHWM). Nothing is pinned: servers and the load generator share
//! both cores, the same way for the baseline and for KloudMeter. The run exits non-zero
//! if any reading it checks is wrong.

#[path = "../common/mod.rs"]
mod common;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use common::tools::Kubectl;
use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A ~250-byte event in the seed shape.
fn event_json(i: usize, event_type: &str) -> Value {
    let mut e = json!({"id": format!("bench-{i:012}"), "eventType": event_type, "subject": format!("customer-{:04}", i % 1000),
        "time": "2026-11-24T10:00:00Z", "data": {"tokens": (i % 1000) as i64 + 1, "model": format!("model-{}", i % 4), "pad": ""}});
    let len = e.to_string().len();
    e["data"]["pad"] = json!("x".repeat(250usize.saturating_sub(len)));
    e
}

fn token(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("={b:02X}")
            }
        })
        .collect()
}

/// A field of `/proc/<pid>/status` in KiB (0 when unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Peak resident memory (VmHWM), KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Resident memory now (VmRSS), KiB.
fn current_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// CPU time (user + system) `pid` has used so far, in clock ticks (0 when unreadable).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // the fields after the command name, which is in parentheses
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// The machine's CPU time so far from /proc/stat, in clock ticks: (busy, steal, iowait).
/// Busy is user, nice, system, irq and softirq: what every process and the kernel ran.
fn machine_ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    (at(0) + at(1) + at(2) + at(5) + at(6), at(7), at(4))
}

/// Wait until `pids` together use under 5% of one core over a second (at most `limit`),
/// and say how long that took: a burst of writes leaves nats-server busy for a while
/// after the aggregator has caught up (writing its blocks out, its indexes), and query
/// latency measured then is that work's, not the query's.
async fn settled(pids: &[u32], limit: Duration) -> Duration {
    let began = Instant::now();
    let ticks = || pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let mut before = ticks();
    while began.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = ticks();
        // clock ticks are 1/100 s: 5 ticks a second is 5% of a core
        if now - before < 5 {
            break;
        }
        before = now;
    }
    began.elapsed()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!("{:.0}–{:.0}", min, max)
}

struct Row {
    scenario: String,
    baseline: String,
    base: Vec<f64>,
    km: Vec<f64>,
    km_rss: u64,
    nats_rss: u64,
}

impl Row {
    fn print(&mut self) {
        let b = median(&mut self.base.clone());
        let k = median(&mut self.km.clone());
        println!(
            "| {} | {} | {:.0} ({}) | {:.0} ({}) | {:.0}% | {:.1} | {:.1} |",
            self.scenario,
            self.baseline,
            b,
            spread(&self.base),
            k,
            spread(&self.km),
            100.0 * k / b.max(1.0),
            self.km_rss as f64 / 1024.0,
            self.nats_rss as f64 / 1024.0
        );
    }
}

async fn js_for(nats: &Nats) -> jetstream::Context {
    nats.client().await
}

/// Raw baseline: publish `events` to JetStream with a unique Nats-Msg-Id, ~1000 acks in flight.
async fn raw_publish(nats: &Nats, events: &[Vec<u8>]) -> f64 {
    let js = js_for(nats).await;
    js.create_stream(stream::Config {
        name: "raw".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for (i, e) in events.iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("m{i}").as_str());
        let ack = js
            .publish_with_headers("raw.events", h, e.clone().into())
            .await
            .unwrap();
        inflight.push(ack.into_future());
        while inflight.len() >= 1000 {
            inflight.next().await.unwrap().unwrap();
        }
    }
    while let Some(a) = inflight.next().await {
        a.unwrap();
    }
    events.len() as f64 / start.elapsed().as_secs_f64()
}

/// HTTP load: `bodies` posted by `clients` concurrent keep-alive clients.
async fn http_load(
    url: String,
    bodies: Arc<Vec<Vec<u8>>>,
    clients: usize,
    events_per_body: usize,
) -> f64 {
    http_load_as(url, bodies, clients, events_per_body, None).await
}

/// [`http_load`] with `Authorization: Bearer <bearer>` on every request.
async fn http_load_as(
    url: String,
    bodies: Arc<Vec<Vec<u8>>>,
    clients: usize,
    events_per_body: usize,
    bearer: Option<String>,
) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, bodies, next) = (url.clone(), bodies.clone(), next.clone());
        let bearer = bearer.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= bodies.len() {
                    break;
                }
                let mut req = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[i].clone());
                if let Some(b) = &bearer {
                    req = req.bearer_auth(b);
                }
                let r = req.send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (bodies.len() * events_per_body) as f64 / start.elapsed().as_secs_f64()
}

/// The minimal servers the single-event scenario compares with, run as a separate
/// process (`bench --baseline-server MODE PORT NATS_URL`).
async fn baseline_server(mode: String, port: u16, nats_url: String) {
    use axum::{body::Bytes, http::StatusCode, routing::post, Router};
    let js = jetstream::new(async_nats::connect(&nats_url).await.unwrap());
    js.get_or_create_stream(stream::Config {
        name: "raw".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = mode == "publish";
    let app = Router::new().route(
        "/",
        post(move |body: Bytes| {
            let js = js.clone();
            async move {
                let v: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(_) => return StatusCode::BAD_REQUEST,
                };
                if publish {
                    let mut h = HeaderMap::new();
                    h.insert("Nats-Msg-Id", v["id"].as_str().unwrap_or(""));
                    let acked = match js.publish_with_headers("raw.events", h, body).await {
                        Ok(a) => a.await.is_ok(),
                        Err(_) => false,
                    };
                    if !acked {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                }
                StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}

struct Baseline {
    child: std::process::Child,
    port: u16,
}

impl Baseline {
    fn start(mode: &str, nats: &Nats) -> Baseline {
        let port = free_port();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--baseline-server", mode, &port.to_string(), &nats.url()])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        Baseline { child, port }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_pid(nats: &Nats) -> u32 {
    nats.pid().unwrap_or(0)
}

async fn ingest_batch(reps: usize, n: usize, clients: usize) -> Row {
    let events: Vec<Value> = (0..n).map(|i| event_json(i, "api.request")).collect();
    let raw: Vec<Vec<u8>> = events.iter().map(|e| e.to_string().into_bytes()).collect();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        events
            .chunks(100)
            .map(|c| serde_json::to_vec(c).unwrap())
            .collect(),
    );
    let mut row = Row {
        scenario: format!("ingest, batch of 100 ({clients} clients)"),
        baseline: "async publish, 1000 acks in flight".into(),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    for _ in 0..reps {
        let nats = Nats::start();
        row.base.push(raw_publish(&nats, &raw).await);
        drop(nats);
        let nats = Nats::start();
        let km = Km::start(&nats, "meters", &[]).await;
        row.km
            .push(http_load(km.url("/api/v1/events"), bodies.clone(), clients, 100).await);
        row.km_rss = row.km_rss.max(rss_kib(km.pid().unwrap()));
        row.nats_rss = row.nats_rss.max(rss_kib(nats_pid(&nats)));
    }
    row
}

/// AUTH_MODE=kubernetes: single-event ingest with a ServiceAccount token (TokenReview
/// and SubjectAccessReview answers cached, warmed by one request first) against the same
/// process configuration with AUTH_MODE=none, both as operators of one real
/// kube-apiserver.
async fn ingest_auth(reps: usize, n: usize, clients: usize) -> Row {
    use common::control_plane::ControlPlane;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| event_json(i, "api.request").to_string().into_bytes())
            .collect(),
    );
    let mut row = Row {
        scenario: format!("ingest, single event ({clients} connections), AUTH_MODE=kubernetes"),
        baseline: "kloudmeter, AUTH_MODE=none".into(),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    let cp = ControlPlane::start();
    cp.kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/crds/"),
    ]);
    cp.kubectl(&["create", "namespace", "kloudmeter"]);
    cp.kubectl(&["create", "namespace", "team-a"]);
    cp.kubectl(&["-n", "team-a", "create", "serviceaccount", "app"]);
    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: writer}\nrules:\n- {apiGroups: [kloudmeter.io], resources: [events], verbs: [create]}\n";
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], role).0);
    cp.kubectl(&[
        "-n",
        "team-a",
        "create",
        "rolebinding",
        "w",
        "--clusterrole=writer",
        "--serviceaccount=team-a:app",
    ]);
    let token = cp
        .kubectl(&[
            "-n",
            "team-a",
            "create",
            "token",
            "app",
            "--audience",
            "kloudmeter",
        ])
        .trim()
        .to_string();
    let kubeconfig = cp.kubeconfig.display().to_string();
    for _ in 0..reps {
        for kubernetes in [false, true] {
            let nats = Nats::start();
            let mode = if kubernetes { "kubernetes" } else { "none" };
            let km = Km::start(
                &nats,
                "meters",
                &[
                    ("KUBERNETES", "true"),
                    ("KUBECONFIG", kubeconfig.as_str()),
                    ("POD_NAMESPACE", "kloudmeter"),
                    ("AUTH_MODE", mode),
                    // the default: a warm cache holds for the whole run
                    ("AUTH_CACHE_TTL", "10s"),
                ],
            )
            .await;
            let bearer = kubernetes.then(|| token.clone());
            // one request first: the run measures a warm cache, as the target says
            let warm = Arc::new(vec![event_json(n + 1, "warm").to_string().into_bytes()]);
            http_load_as(km.url("/api/register-event"), warm, 1, 1, bearer.clone()).await;
            let rate = http_load_as(
                km.url("/api/register-event"),
                bodies.clone(),
                clients,
                1,
                bearer,
            )
            .await;
            if kubernetes {
                row.km.push(rate);
                row.km_rss = row.km_rss.max(rss_kib(km.pid().unwrap()));
                row.nats_rss = row.nats_rss.max(rss_kib(nats_pid(&nats)));
            } else {
                row.base.push(rate);
            }
        }
    }
    row
}

/// NATS cluster: batch ingest through kloudmeter into one nats-server (one copy of
/// everything, the baseline) against a 3-server cluster with NATS_REPLICAS=3, all on
/// the same machine; each run also checks that a count meter ends with every event.
async fn cluster_ingest(reps: usize, n: usize, clients: usize, failures: &mut Vec<String>) -> Row {
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| event_json(i, "api.request"))
            .collect::<Vec<_>>()
            .chunks(100)
            .map(|c| serde_json::to_vec(c).unwrap())
            .collect(),
    );
    let mut row = Row {
        scenario: format!(
            "ingest, batch of 100 ({clients} clients), 3-server NATS cluster, NATS_REPLICAS=3"
        ),
        baseline: "kloudmeter on one nats-server".into(),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    for _ in 0..reps {
        for replicated in [false, true] {
            let servers = if replicated {
                Nats::cluster(3)
            } else {
                vec![Nats::start()]
            };
            let replicas = if replicated { "3" } else { "1" };
            let urls = Nats::urls(&servers);
            let env = [("NATS_URL", urls.as_str()), ("NATS_REPLICAS", replicas)];
            let km = Km::start(&servers[0], "meters", &env).await;
            let meter = json!({"id": "all", "eventType": "api.request", "aggregation": "count"});
            assert_eq!(post(&km.url("/api/v1/meters"), &meter).await.0, 201);
            let rate = http_load(km.url("/api/v1/events"), bodies.clone(), clients, 100).await;
            let counted = || async { meter_reading(&km, "all").await["events"] == json!(n) };
            let deadline = Instant::now() + Duration::from_secs(300);
            while !counted().await && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !counted().await {
                failures.push(format!(
                    "cluster (R{replicas}): the meter did not reach {n} events"
                ));
            }
            if replicated {
                row.km.push(rate);
                row.km_rss = row.km_rss.max(rss_kib(km.pid().unwrap()));
                row.nats_rss = row
                    .nats_rss
                    .max(servers.iter().map(nats_pid).map(rss_kib).max().unwrap_or(0));
            } else {
                row.base.push(rate);
            }
        }
    }
    row
}

async fn ingest_single(reps: usize, n: usize, clients: usize) -> Vec<Row> {
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| event_json(i, "api.request").to_string().into_bytes())
            .collect(),
    );
    let mut pub_row = Row {
        scenario: format!("ingest, single event ({clients} connections)"),
        baseline: "axum parse+publish+ack+202".into(),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    let mut parse_row = Row {
        scenario: "ingest, single event".into(),
        baseline: "axum parse+202 (no NATS)".into(),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    for _ in 0..reps {
        let nats = Nats::start();
        {
            let b = Baseline::start("parse", &nats);
            parse_row.base.push(
                http_load(
                    format!("http://127.0.0.1:{}/", b.port),
                    bodies.clone(),
                    clients,
                    1,
                )
                .await,
            );
        }
        {
            let b = Baseline::start("publish", &nats);
            pub_row.base.push(
                http_load(
                    format!("http://127.0.0.1:{}/", b.port),
                    bodies.clone(),
                    clients,
                    1,
                )
                .await,
            );
        }
        drop(nats);
        let nats = Nats::start();
        let km = Km::start(&nats, "meters", &[]).await;
        let rate = http_load(km.url("/api/register-event"), bodies.clone(), clients, 1).await;
        pub_row.km.push(rate);
        parse_row.km.push(rate);
        pub_row.km_rss = pub_row.km_rss.max(rss_kib(km.pid().unwrap()));
        pub_row.nats_rss = pub_row.nats_rss.max(rss_kib(nats_pid(&nats)));
    }
    parse_row.km_rss = pub_row.km_rss;
    parse_row.nats_rss = pub_row.nats_rss;
    vec![pub_row, parse_row]
}

fn unix_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

fn expected_sum(n: usize) -> i64 {
    (0..n).map(|i| (i % 1000) as i64 + 1).sum()
}

/// Ten thresholds of every period (DAY, MONTH, ALL), recurring: what the notifier
/// evaluates every second beside the aggregator in the thresholds scenario.
fn ten_thresholds() -> Value {
    let periods = ["DAY", "MONTH", "ALL"];
    (0..10)
        .map(|i| {
            // subject k ends at 300 × (k + 1) over 300,000 events: a few thousand
            // crossings in all, most of them in the first seconds
            let mut t = json!({"value": format!("{}", 50_000 * (i + 1)), "period": periods[i % 3]});
            if i % 3 == 2 {
                t["every"] = json!("50000");
            }
            t
        })
        .collect()
}

async fn aggregation(
    reps: usize,
    n: usize,
    meters: usize,
    thresholds: bool,
    failures: &mut Vec<String>,
) -> Row {
    let mut row = Row {
        scenario: format!("aggregation, {meters} meter(s), sum by model"),
        baseline: "durable pull consumer, ack each".into(),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    for _ in 0..reps {
        let nats = Nats::start();
        // stream and buckets exactly as kloudmeter makes them
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_kloudmeter"))
            .arg("setup")
            .env("NATS_URL", nats.url())
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let js = js_for(&nats).await;
        preload(&js, n, 1).await;
        row.base.push(raw_consume(&nats, 1).await);
        let kv = js.get_key_value("meters-meters").await.unwrap();
        for m in 0..meters {
            let mut def = json!({"id": format!("m{m}"), "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}, "windowSize": "HOUR"});
            if thresholds {
                def["thresholds"] = ten_thresholds();
            }
            kv.put(format!("m.m{m}"), def.to_string().into())
                .await
                .unwrap();
        }
        // meters exist before the first aggregation: the main pass does the work
        let state = js.get_key_value("meters-state").await.unwrap();
        for m in 0..meters {
            let p = json!({"hash": hash_of(&js, m).await, "complete": true});
            state
                .put(format!("p.m{m}"), p.to_string().into())
                .await
                .unwrap();
        }
        let log_level =
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "info,async_nats=warn".into());
        let km = Km::start(&nats, "meters", &[("LOG_LEVEL", log_level.as_str())]).await;
        // The clock starts when the aggregator creates its consumer on the event stream
        // (the server's timestamp, same machine clock) and stops when the cursor covers
        // every event, i.e. all readings are written.
        let events = js.get_stream("meters").await.unwrap();
        let mut t_first = None;
        let t_end;
        loop {
            if t_first.is_none() {
                let mut infos = events.consumers();
                while let Some(info) = infos.next().await {
                    let info = info.unwrap();
                    if info.name != "raw" {
                        t_first = Some(info.created.unix_timestamp_nanos());
                    }
                }
            }
            let c: u64 = state
                .get("cursor")
                .await
                .unwrap()
                .map(|v| std::str::from_utf8(&v).unwrap().parse().unwrap())
                .unwrap_or(0);
            if c as usize >= n {
                t_end = unix_nanos();
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let t_first = t_first.expect("the aggregator's consumer was never seen");
        row.km
            .push(n as f64 / ((t_end - t_first) as f64 / 1e9).max(1e-6));
        if std::env::var("BENCH_LOG").is_ok() {
            // where the aggregator's time went, from its debug lines
            let mut tally: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
            for line in km.logs().lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let fields = &v["fields"];
                let Some(msg) = fields["message"].as_str() else {
                    continue;
                };
                if let Some(obj) = fields.as_object() {
                    for (k, val) in obj {
                        if let Some(ms) = val.as_u64().filter(|_| k.ends_with("_ms")) {
                            let t = tally.entry(format!("{msg}.{k}")).or_default();
                            t.0 += 1;
                            t.1 += ms;
                        }
                    }
                }
            }
            for line in km
                .logs()
                .lines()
                .filter(|l| l.contains("\"batch\"") || l.contains("\"flush\""))
                .take(6)
            {
                eprintln!("{line}");
            }
            for (k, (count, ms)) in tally {
                eprintln!("  {k}: {count} times, {ms} ms");
            }
        }
        row.km_rss = row.km_rss.max(rss_kib(km.pid().unwrap()));
        row.nats_rss = row.nats_rss.max(rss_kib(nats_pid(&nats)));
        for m in 0..meters {
            let r = meter_reading(&km, &format!("m{m}")).await;
            let want = (expected_sum(n).to_string(), n as u64);
            let got = (
                r["value"].as_str().unwrap_or("").to_string(),
                r["events"].as_u64().unwrap_or(0),
            );
            if got != want {
                failures.push(format!("aggregation m{m}: got {got:?}, want {want:?}"));
            }
        }
    }
    row
}

/// Preload `n` events as ingestion stores them (with the dedup header), each in the
/// stream of its subject's partition.
async fn preload(js: &jetstream::Context, n: usize, partitions: u16) {
    let parts = kloudmeter::domain::partition::Partitions::new(partitions).unwrap();
    let names = kloudmeter::nats::keys::Names::new("meters");
    let subjects: Vec<String> = parts
        .all()
        .map(|p| names.partition(p).event_subject("api.request"))
        .collect();
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        let e = event_json(i, "api.request");
        let p = parts.of(e["subject"].as_str().unwrap());
        let mut h = HeaderMap::new();
        h.insert("Km-Dedup", format!("{i:032x}").as_str());
        let ack = js
            .publish_with_headers(subjects[usize::from(p)].clone(), h, e.to_string().into())
            .await
            .unwrap();
        inflight.push(ack.into_future());
        while inflight.len() >= 1000 {
            inflight.next().await.unwrap().unwrap();
        }
    }
    while let Some(a) = inflight.next().await {
        a.unwrap();
    }
}

/// Every partition's stream read at once by a plain consumer each (acks awaited): the
/// baseline of the aggregation scenarios.
async fn raw_consume(nats: &Nats, partitions: u16) -> f64 {
    let js = js_for(nats).await;
    let names = kloudmeter::nats::keys::Names::new("meters");
    let mut total = 0;
    let mut readers = Vec::new();
    for p in 0..partitions {
        let stream = js.get_stream(&names.partition(p).stream).await.unwrap();
        let n = stream.cached_info().state.messages as usize;
        total += n;
        readers.push(async move {
            let c = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some("raw".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut msgs = c.messages().await.unwrap();
            let mut seen = 0;
            while seen < n {
                msgs.next().await.unwrap().unwrap().ack().await.unwrap();
                seen += 1;
            }
        });
    }
    let start = Instant::now();
    futures::future::join_all(readers).await;
    total as f64 / start.elapsed().as_secs_f64()
}

/// Aggregation of one meter over `n` preloaded events spread over `partitions`
/// partitions, with as many kloudmeter processes: from the first aggregator's consumer
/// to every partition's cursor covering its stream.
async fn scaling(reps: usize, n: usize, partitions: u16, failures: &mut Vec<String>) -> Row {
    let mut row = Row {
        scenario: format!("aggregation, 1 meter, {partitions} partition(s) and process(es)"),
        baseline: format!("{partitions} durable pull consumer(s), ack each"),
        base: vec![],
        km: vec![],
        km_rss: 0,
        nats_rss: 0,
    };
    let names = kloudmeter::nats::keys::Names::new("meters");
    let count = partitions.to_string();
    for _ in 0..reps {
        let nats = Nats::start();
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_kloudmeter"))
            .arg("setup")
            .env("NATS_URL", nats.url())
            .env("PARTITIONS", &count)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let js = js_for(&nats).await;
        preload(&js, n, partitions).await;
        row.base.push(raw_consume(&nats, partitions).await);
        let kv = js.get_key_value("meters-meters").await.unwrap();
        let def = json!({"id": "m0", "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}, "windowSize": "HOUR"});
        kv.put("m.m0", def.to_string().into()).await.unwrap();
        let state = js.get_key_value("meters-state").await.unwrap();
        let progress = json!({"hash": hash_of(&js, 0).await, "complete": true});
        let mut last = Vec::new();
        for p in 0..partitions {
            let key =
                kloudmeter::nats::keys::progress_key(&kloudmeter::nats::keys::part_id("m0", p));
            state.put(key, progress.to_string().into()).await.unwrap();
            let mut stream = js.get_stream(&names.partition(p).stream).await.unwrap();
            last.push(stream.info().await.unwrap().state.last_sequence);
        }
        // the processes start together, as a rollout would start them
        let env = [("PARTITIONS", count.as_str())];
        let kms =
            futures::future::join_all((0..partitions).map(|_| Km::start(&nats, "meters", &env)))
                .await;
        let mut t_first: Option<i128> = None;
        let t_end;
        loop {
            for p in 0..partitions {
                let events = js.get_stream(&names.partition(p).stream).await.unwrap();
                let mut infos = events.consumers();
                while let Some(info) = infos.next().await {
                    let info = info.unwrap();
                    if info.name != "raw" {
                        let at = info.created.unix_timestamp_nanos();
                        t_first = Some(t_first.map_or(at, |t| t.min(at)));
                    }
                }
            }
            let mut done = true;
            for p in 0..partitions {
                let c: u64 = state
                    .get(names.partition(p).cursor_key())
                    .await
                    .unwrap()
                    .map(|v| std::str::from_utf8(&v).unwrap().parse().unwrap())
                    .unwrap_or(0);
                done &= c >= last[usize::from(p)];
            }
            if done {
                t_end = unix_nanos();
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t_first = t_first.expect("no aggregator consumer was seen");
        row.km
            .push(n as f64 / ((t_end - t_first) as f64 / 1e9).max(1e-6));
        for km in &kms {
            row.km_rss = row.km_rss.max(rss_kib(km.pid().unwrap()));
        }
        row.nats_rss = row.nats_rss.max(rss_kib(nats_pid(&nats)));
        let r = meter_reading(&kms[0], "m0").await;
        let want = (expected_sum(n).to_string(), n as u64);
        let got = (
            r["value"].as_str().unwrap_or("").to_string(),
            r["events"].as_u64().unwrap_or(0),
        );
        if got != want {
            failures.push(format!(
                "scaling, {partitions} partitions: got {got:?}, want {want:?}"
            ));
        }
    }
    row
}

/// The semantic hash kloudmeter computes for meter `m`, read back through its own API
/// would need a running process; recompute it the same way instead.
async fn hash_of(_js: &jetstream::Context, m: usize) -> String {
    let def: kloudmeter::domain::meter::MeterDef = serde_json::from_value(json!({"id": format!("m{m}"), "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}, "windowSize": "HOUR"})).unwrap();
    def.semantic_hash()
}

/// Probes posted one at a time while a background load of `rate` events/s flows, each
/// timed from its 2xx to its reading in KV; with `partitions` partitions and as many
/// processes (the load goes to each in turn, the probes to the first).
async fn end_to_end(
    rate: f64,
    secs: u64,
    partitions: u16,
    failures: &mut Vec<String>,
) -> (f64, f64, usize, u64, u64) {
    let nats = Nats::start();
    let count = partitions.to_string();
    let env = [("PARTITIONS", count.as_str())];
    let kms =
        futures::future::join_all((0..partitions).map(|_| Km::start(&nats, "meters", &env))).await;
    let km = &kms[0];
    let (s, _) = post(
        &km.url("/api/create-meter"),
        &json!({"id": "probe", "eventType": "probe", "aggregation": "count"}),
    )
    .await;
    assert_eq!(s, 202);
    let (s, _) = post(&km.url("/api/create-meter"), &json!({"id": "load", "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}})).await;
    assert_eq!(s, 202);
    wait_for("probe meter ready", Duration::from_secs(20), || async {
        meter_reading(km, "probe").await["ready"] == json!(true)
    })
    .await;
    // background load at `rate` events/s in batches of 100
    let urls: Vec<String> = kms.iter().map(|k| k.url("/api/v1/events")).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..4u64 {
        let url = urls[w as usize % urls.len()].clone();
        let (stop, sent) = (stop.clone(), sent.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let per_worker = rate / 4.0 / 100.0;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_worker));
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<Value> = (0..100)
                    .map(|k| event_json(10_000_000 * (w as usize + 1) + i * 100 + k, "api.request"))
                    .collect();
                i += 1;
                if client
                    .post(&url)
                    .json(&batch)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
                {
                    sent.fetch_add(100, Ordering::Relaxed);
                }
            }
        }));
    }
    let js = js_for(&nats).await;
    let kv = js.get_key_value("meters-readings").await.unwrap();
    let probe_key = {
        let part = kloudmeter::domain::partition::Partitions::new(partitions)
            .unwrap()
            .of("p");
        format!(
            "r.{}.p.total",
            token(&kloudmeter::nats::keys::part_id("probe", part))
        )
    };
    let mut watch = kv.watch(probe_key).await.unwrap();
    let client = reqwest::Client::new();
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut k = 0u64;
    while Instant::now() < end {
        k += 1;
        let r = client
            .post(km.url("/api/register-event"))
            .json(&json!({"id": format!("p{k}"), "eventType": "probe", "subject": "p"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let acked = Instant::now();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("reading update")
                .unwrap()
                .unwrap();
            let r: Value = serde_json::from_slice(&e.value).unwrap();
            if r["acc"]["count"].as_u64() == Some(k) {
                break;
            }
        }
        lat.push(acked.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    caught_up_partitions(&js, "meters", partitions, Duration::from_secs(60)).await;
    let r = meter_reading(km, "load").await;
    if r["events"].as_u64() != Some(sent.load(Ordering::Relaxed)) {
        failures.push(format!(
            "end-to-end: load meter has {} events, {} acknowledged",
            r["events"],
            sent.load(Ordering::Relaxed)
        ));
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    (
        p(0.5),
        p(0.99),
        lat.len(),
        kms.iter()
            .map(|k| rss_kib(k.pid().unwrap()))
            .max()
            .unwrap_or(0),
        rss_kib(nats_pid(&nats)),
    )
}

/// What the backfill scenario measured.
struct Backfill {
    build_rate: f64,
    build_secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    worst_ms: f64,
    samples: usize,
    km_rss: u64,
    nats_rss: u64,
}

/// Backfill: a new meter built over `n` retained events while a live meter receives
/// `rate` events/s, one request each. The build's events/s (meter created → `ready`),
/// and the live meter's acknowledgement → KV reading latency for the events posted
/// while it built.
async fn backfill(n: usize, rate: f64, failures: &mut Vec<String>) -> Backfill {
    let nats = Nats::start();
    let km = Km::start(&nats, "meters", &[]).await;
    let (s, _) = post(
        &km.url("/api/create-meter"),
        &json!({"id": "live", "eventType": "live", "aggregation": "count"}),
    )
    .await;
    assert_eq!(s, 202);
    wait_for("live meter ready", Duration::from_secs(20), || async {
        meter_reading(&km, "live").await["ready"] == json!(true)
    })
    .await;
    let js = js_for(&nats).await;
    preload(&js, n, 1).await;
    caught_up(&js, "meters", Duration::from_secs(900)).await;

    // the live load: one event per request at `rate`, acknowledgement times kept
    let acks: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (url, acks, stop) = (km.url("/api/register-event"), acks.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                k += 1;
                let r = client
                    .post(&url)
                    .json(&json!({"id": format!("l{k}"), "eventType": "live", "subject": "s"}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                acks.lock().unwrap().push(Instant::now());
            }
        })
    };
    // the live meter's count as KV sees it: when each event first shows
    let kv = js.get_key_value("meters-readings").await.unwrap();
    let mut watch = kv.watch("r.live.s.total").await.unwrap();
    let shown: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let watcher = {
        let shown = shown.clone();
        tokio::spawn(async move {
            while let Some(Ok(e)) = watch.next().await {
                let r: Value = serde_json::from_slice(&e.value).unwrap_or(Value::Null);
                let count = r["acc"]["count"].as_u64().unwrap_or(0) as usize;
                let mut shown = shown.lock().unwrap();
                while shown.len() < count {
                    shown.push(Instant::now());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let (s, _) = post(&km.url("/api/create-meter"), &json!({"id": "backfilled", "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}})).await;
    assert_eq!(s, 202);
    let t1 = loop {
        if meter_reading(&km, "backfilled").await["ready"] == json!(true) {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let km_rss = rss_kib(km.pid().unwrap());
    let nats_rss = rss_kib(nats_pid(&nats));
    // where the build's time went, from kloudmeter's own account
    for line in km
        .logs()
        .lines()
        .filter(|l| l.contains("build") || l.contains("built"))
    {
        eprintln!("  {line}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    caught_up(&js, "meters", Duration::from_secs(60)).await;
    let posted = acks.lock().unwrap().len();
    wait_for(
        "every live event shown",
        Duration::from_secs(30),
        || async { shown.lock().unwrap().len() >= posted },
    )
    .await;
    watcher.abort();
    let (acks, shown) = (acks.lock().unwrap().clone(), shown.lock().unwrap().clone());
    let mut lat: Vec<f64> = acks
        .iter()
        .zip(&shown)
        .filter(|(a, _)| **a >= t0 && **a <= t1)
        .map(|(a, s)| s.saturating_duration_since(*a).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let r = meter_reading(&km, "backfilled").await;
    let want = (expected_sum(n).to_string(), n as u64);
    let got = (
        r["value"].as_str().unwrap_or("").to_string(),
        r["events"].as_u64().unwrap_or(0),
    );
    if got != want {
        failures.push(format!("backfill: got {got:?}, want {want:?}"));
    }
    let live = meter_reading(&km, "live").await["events"].as_u64();
    if live != Some(posted as u64) {
        failures.push(format!(
            "backfill: live meter has {live:?} events, {posted} acknowledged"
        ));
    }
    let p = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let build_secs = (t1 - t0).as_secs_f64();
    Backfill {
        build_rate: n as f64 / build_secs,
        build_secs,
        p50_ms: p(0.5),
        p99_ms: p(0.99),
        worst_ms: lat.last().copied().unwrap_or(f64::NAN),
        samples: lat.len(),
        km_rss,
        nats_rss,
    }
}

/// What one cold start measured.
struct ColdStart {
    fresh_secs: f64,
    /// The new process's own account of fetching the snapshot (none: it read the log).
    fetched: Option<String>,
    km_rss: u64,
}

/// Cold start: `n` claims in the claim log, the only warm process `kill -9`ed and a new
/// one started on an empty DATA_DIR at once: seconds from the kill until an event posted
/// to the new process is counted. Without `snapshots` no snapshot is ever published and
/// the new process reads the whole log (the path before snapshots). With `seed` the
/// warm process itself starts from a snapshot the benchmark writes (reading tens of
/// millions of claims into its B-tree would take most of the run); it then publishes
/// its own, which is the one the new process fetches.
async fn cold_start(
    n: usize,
    snapshots: bool,
    seed: bool,
    failures: &mut Vec<String>,
) -> ColdStart {
    let nats = Nats::start();
    let js = js_for(&nats).await;
    let interval = if snapshots { "5s" } else { "24h" };
    let env = [("CLAIM_SNAPSHOT_INTERVAL", interval), ("LEADER_TTL", "2s")];
    Km::start(&nats, "meters", &env).await.kill9(); // lays out the streams
    let now = fill_claim_log(&js, "meters", n).await;
    let bucket = js.get_object_store("meters-claim-snapshots").await.unwrap();
    let mut seeded = None;
    if seed {
        let mut claims: Vec<_> = (0..n).map(|i| claim(i, now)).collect();
        claims.sort_unstable_by_key(|(id, _)| *id);
        let info = js
            .get_stream("meters-claims")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed");
        kloudmeter::claims::snapshot::write_sorted(
            &path,
            created,
            info.state.last_sequence,
            now,
            claims.into_iter().map(Ok),
        )
        .unwrap();
        kloudmeter::claims::snapshot::publish(&bucket, &path)
            .await
            .unwrap();
        seeded = Some(bucket.info("claim-index").await.unwrap().nuid);
    }
    let mut warm = Km::start(&nats, "meters", &env).await;
    create_live_meter(&warm).await;
    post_live(&warm, 1, Duration::from_secs(60)).await;
    live_counted(&warm, 1, Duration::from_secs(900)).await;
    if snapshots {
        // the warm leader's own snapshot, holding every claim
        wait_for(
            "the leader's snapshot",
            Duration::from_secs(600),
            || async {
                bucket
                    .info("claim-index")
                    .await
                    .is_ok_and(|i| Some(&i.nuid) != seeded.as_ref() && i.size >= 48 + 32 * (n + 1))
            },
        )
        .await;
        for line in warm.logs().lines().filter(|l| l.contains("snapshot")) {
            eprintln!("  warm: {line}");
        }
    }
    warm.kill9();
    let died = Instant::now();
    let cold = Km::start(&nats, "meters", &env).await;
    post_live(&cold, 2, Duration::from_secs(600)).await;
    live_counted(&cold, 2, Duration::from_secs(900)).await;
    let fresh_secs = died.elapsed().as_secs_f64();
    let fetched = cold
        .logs()
        .lines()
        .find(|l| l.contains("snapshot fetched"))
        .map(str::to_string);
    if snapshots != fetched.is_some() {
        failures.push(format!(
            "cold start of {n} claims: snapshot fetched {fetched:?}"
        ));
    }
    ColdStart {
        fresh_secs,
        fetched,
        km_rss: rss_kib(cold.pid().unwrap()),
    }
}

fn rss_now_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Soak: a steady rate for a long time with DEDUP_WINDOW=24h, RSS of both processes every
/// 10 s; memory should plateau rather than grow with the number of events.
async fn soak(rate: f64, secs: u64, failures: &mut Vec<String>) {
    let nats = Nats::start();
    let km = Km::start(&nats, "meters", &[("DEDUP_WINDOW", "24h")]).await;
    let (s, _) = post(&km.url("/api/create-meter"), &json!({"id": "load", "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}})).await;
    assert_eq!(s, 202);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..4u64 {
        let (url, stop, sent) = (km.url("/api/v1/events"), stop.clone(), sent.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(400.0 / rate));
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<Value> = (0..100)
                    .map(|k| {
                        event_json(100_000_000 * (w as usize + 1) + i * 100 + k, "api.request")
                    })
                    .collect();
                i += 1;
                if client
                    .post(&url)
                    .json(&batch)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
                {
                    sent.fetch_add(100, Ordering::Relaxed);
                }
            }
        }));
    }
    println!();
    println!("soak at {rate:.0} events/s for {secs} s, DEDUP_WINDOW=24h: RSS (MiB) every 10 s");
    println!("| t (s) | events sent | kloudmeter RSS | nats-server RSS |");
    println!("|---|---|---|---|");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        println!(
            "| {:.0} | {} | {:.1} | {:.1} |",
            started.elapsed().as_secs_f64(),
            sent.load(Ordering::Relaxed),
            rss_now_kib(km.pid().unwrap()) as f64 / 1024.0,
            rss_now_kib(nats_pid(&nats)) as f64 / 1024.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    caught_up(&js_for(&nats).await, "meters", Duration::from_secs(1800)).await;
    let r = meter_reading(&km, "load").await;
    if r["events"].as_u64() != Some(sent.load(Ordering::Relaxed)) {
        failures.push(format!(
            "soak: {} events aggregated, {} acknowledged",
            r["events"],
            sent.load(Ordering::Relaxed)
        ));
    }
}

/// The query cache's (hits, misses) so far, from kloudmeter's /metrics (0 before its
/// first read).
async fn query_cache_reads(km: &Km) -> (u64, u64) {
    let text = km.metrics_text().await;
    let count = |result: &str| {
        let name = format!("kloudmeter_query_cache_reads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    };
    (count("hit"), count("miss"))
}

/// Query latency over a month of history: `n` events over 30 days for 1,000 subjects.
/// 100,000 subjects over 30 days: one 1,000-subject page of DAY windows (p50/p99 over
/// the first pages, each from the previous page's cursor), and the whole set as
/// streamed CSV (time, rows, kloudmeter's peak RSS).
async fn query_subjects_100k(n: usize, failures: &mut Vec<String>) {
    const SUBJECTS: usize = 100_000;
    let nats = Nats::start();
    let km = Km::start(&nats, "meters", &[]).await;
    let def = json!({"id": "calls", "eventType": "api.request", "aggregation": "count", "windowSize": "HOUR"});
    let (s, _) = post(&km.url("/api/v1/meters"), &def).await;
    assert_eq!(s, 201);
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .timestamp();
    let span = 30 * 86_400i64;
    let bodies: Vec<Vec<u8>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|&i| {
                    let t = start + (i as i64 * 7919) % span;
                    json!({"id": format!("c{i}"), "eventType": "api.request", "subject": format!("customer-{:06}", i % SUBJECTS),
                        "time": chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339(), "data": {}})
                })
                .collect();
            serde_json::to_vec(&batch).unwrap()
        })
        .collect();
    let loading = Instant::now();
    http_load(km.url("/api/v1/events"), Arc::new(bodies), 8, 100).await;
    caught_up(&js_for(&nats).await, "meters", Duration::from_secs(1800)).await;
    let loaded = loading.elapsed();
    let settling = settled(
        &[km.pid().unwrap(), nats_pid(&nats)],
        Duration::from_secs(180),
    )
    .await;
    let base = km.url("/api/v1/meters/calls/query?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z&windowSize=DAY");
    let client = reqwest::Client::new();
    let mut lat = Vec::new();
    let mut cursor: Option<String> = None;
    let mut counted = 0u64;
    for _ in 0..30 {
        let url = match &cursor {
            Some(c) => format!("{base}&limit=1000&cursor={c}"),
            None => format!("{base}&limit=1000"),
        };
        let t = Instant::now();
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let page: Value = r.json().await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        counted += page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"].as_str().unwrap().parse::<u64>().unwrap())
            .sum::<u64>();
        cursor = page["nextCursor"].as_str().map(str::to_string);
    }
    // the first page lists the meter's subjects (kept for the pages after it)
    let first_page = lat.remove(0);
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (lat[lat.len() / 2], lat[lat.len() - 1]);
    // 30 pages of 1,000 subjects: subjects 0..29,999, each with n / SUBJECTS events
    let want = (30_000 * (n / SUBJECTS)) as u64;
    if counted != want {
        failures.push(format!(
            "100k subjects: 30 pages counted {counted}, want {want}"
        ));
    }
    // the peak RSS from here on is the stream's (writing 5 to clear_refs resets VmHWM),
    // the loading's and aggregation's peak having been read first
    let loading_rss = rss_kib(km.pid().unwrap());
    let streaming_from = current_rss_kib(km.pid().unwrap());
    let _ = std::fs::write(format!("/proc/{}/clear_refs", km.pid().unwrap()), "5");
    let t = Instant::now();
    let mut r = client
        .get(&base)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    let (mut bytes, mut lines, mut total) = (0usize, 0usize, 0u64);
    let mut partial = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        bytes += chunk.len();
        partial.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = partial.find('\n') {
            let line: String = partial.drain(..=end).collect();
            lines += 1;
            if lines > 1 {
                total += line
                    .trim_end()
                    .rsplit(',')
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    let csv_secs = t.elapsed().as_secs_f64();
    if total != n as u64 {
        failures.push(format!(
            "100k subjects: the CSV counts {total} events, want {n}"
        ));
    }
    println!();
    println!("queries over {SUBJECTS} subjects ({n} events over 30 days, count meter with HOUR windows; loaded and aggregated in {:.0} s):", loaded.as_secs_f64());
    println!(
        "  (queried once kloudmeter and nats-server were idle, {:.0} s after the aggregator caught up)",
        settling.as_secs_f64()
    );
    println!("  a page of 1,000 subjects, 30 DAY windows each (30 pages in a row): the first {first_page:.0} ms, the 29 after it p50 {p50:.0} ms, p99 {p99:.0} ms");
    println!(
        "  the whole set as CSV (streamed): {:.1} s, {} rows, {:.1} MB; kloudmeter peak RSS while streaming {:.1} MiB (RSS when it began {:.1} MiB; peak while loading and aggregating {:.1} MiB), nats-server {:.1} MiB",
        csv_secs,
        lines - 1,
        bytes as f64 / 1e6,
        rss_kib(km.pid().unwrap()) as f64 / 1024.0,
        streaming_from as f64 / 1024.0,
        loading_rss as f64 / 1024.0,
        rss_kib(nats_pid(&nats)) as f64 / 1024.0
    );
}

/// The sum of a query answer's row values.
fn rows_total(body: &Value) -> rust_decimal::Decimal {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["value"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum()
}

/// One garbage collection of nats-server's, from the line GODEBUG=gctrace=1 has it write
/// to stderr: when it began, how long it took (wall clock), and its heap before it and
/// live after it, in MB.
struct GoGc {
    n: u64,
    began: chrono::DateTime<chrono::Utc>,
    wall_ms: f64,
    heap_mb: (u64, u64),
}

impl GoGc {
    fn ended(&self) -> chrono::DateTime<chrono::Utc> {
        self.began + chrono::Duration::microseconds((self.wall_ms * 1e3) as i64)
    }
}

impl std::fmt::Display for GoGc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} at {} for {:.0} ms, {}->{} MB",
            self.n,
            self.began.format("%H:%M:%S%.3f"),
            self.wall_ms,
            self.heap_mb.0,
            self.heap_mb.1
        )
    }
}

/// nats-server's collections in its log (`started`: when the process started, which is
/// what gctrace's `@<seconds>s` counts from).
fn go_gcs(log: &str, started: chrono::DateTime<chrono::Utc>) -> Vec<GoGc> {
    log.lines()
        .filter_map(|line| {
            // gc 79 @94.058s 2%: 1.9+234+0.003 ms clock, …, 1034->1050->716 MB, 1132 MB goal, …
            let (n, rest) = line.strip_prefix("gc ")?.split_once(" @")?;
            let (at, rest) = rest.split_once("s ")?;
            let (clock, rest) = rest.split_once(": ")?.1.split_once(" ms clock")?;
            let wall_ms = clock
                .split('+')
                .map(|part| part.parse::<f64>().ok())
                .sum::<Option<f64>>()?;
            let heap = rest
                .split(", ")
                .find(|part| part.ends_with(" MB") && part.contains("->"))?;
            let sizes: Vec<u64> = heap
                .trim_end_matches(" MB")
                .split("->")
                .map(|size| size.parse().ok())
                .collect::<Option<_>>()?;
            let micros = (at.parse::<f64>().ok()? * 1e6) as i64;
            Some(GoGc {
                n: n.parse().ok()?,
                began: started + chrono::Duration::microseconds(micros),
                wall_ms,
                heap_mb: (*sizes.first()?, *sizes.last()?),
            })
        })
        .collect()
}

async fn query_latency(n: usize, failures: &mut Vec<String>) {
    // BENCH_LATENCIES=1 also says which of nats-server's garbage collections fell in
    // each run (a mark over its heap of the million events' index takes both cores for
    // a few hundred ms)
    let latencies = std::env::var("BENCH_LATENCIES").is_ok();
    let nats_started = chrono::Utc::now();
    let nats = if latencies {
        Nats::start_with_env(&[("GODEBUG", "gctrace=1")])
    } else {
        Nats::start()
    };
    let log_level = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info,async_nats=warn".into());
    let km = Km::start(&nats, "meters", &[("LOG_LEVEL", log_level.as_str())]).await;
    let def = json!({"id": "tokens", "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}, "windowSize": "HOUR"});
    let (s, _) = post(&km.url("/api/v1/meters"), &def).await;
    assert_eq!(s, 201);
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .timestamp();
    let span = 30 * 86_400i64;
    let mut expected = 0i64;
    // customer-0042's usage in the 30 days of Europe/Berlin (+01:00 all November) and of
    // Asia/Kolkata (+05:30) that the zone queries ask for: days there read 24 hours each,
    // not one UTC day rollup, and Kolkata's two quarter-hour edges of each day
    let zones = [
        ("Europe/Berlin", start - 3_600),
        ("Asia/Kolkata", start - 19_800),
    ];
    let mut expected_zoned = [0i64; 2];
    let bodies: Vec<Vec<u8>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|&i| {
                    let t = start + (i as i64 * 7919) % span;
                    let tokens = (i % 1000) as i64 + 1;
                    expected += tokens;
                    for (z, (_, from)) in zones.iter().enumerate() {
                        if i % 1000 == 42 && (*from..from + span).contains(&t) {
                            expected_zoned[z] += tokens;
                        }
                    }
                    json!({"id": format!("q{i}"), "eventType": "api.request", "subject": format!("customer-{:04}", i % 1000),
                        "time": chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339(), "data": {"tokens": tokens, "model": format!("m{}", (i / 1000) % 4)}})
                })
                .collect();
            serde_json::to_vec(&batch).unwrap()
        })
        .collect();
    let loading = Instant::now();
    http_load(km.url("/api/v1/events"), Arc::new(bodies), 8, 100).await;
    let js = js_for(&nats).await;
    caught_up(&js, "meters", Duration::from_secs(1800)).await;
    let loaded = loading.elapsed();
    // what the readings take in KV (HOUR windows keep their quarters inside them)
    let readings = js
        .get_stream("KV_meters-readings")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    let client = reqwest::Client::new();
    let pids = (km.pid().unwrap(), nats_pid(&nats));
    // each run also says the CPU a query cost each server (clock ticks of 10 ms over 100
    // queries): where a query's time goes
    let km_ref = &km;
    let nats_ref = &nats;
    let run = |url: String| {
        let client = client.clone();
        async move {
            let mut lat = Vec::new();
            let mut last = Value::Null;
            let began = chrono::Utc::now();
            // (what only BENCH_LATENCIES=1 prints is read only then)
            let cache_before = if latencies {
                query_cache_reads(km_ref).await
            } else {
                (0, 0)
            };
            let machine_before = machine_ticks();
            let cpu_before = (cpu_ticks(pids.0), cpu_ticks(pids.1));
            for _ in 0..100 {
                let t = Instant::now();
                let r = client.get(&url).send().await.unwrap();
                let status = r.status().as_u16();
                last = r.json().await.unwrap();
                assert_eq!(status, 200, "{url}: {last}");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let cpu = format!(
                "CPU a query: kloudmeter {:.1} ms, nats-server {:.1} ms",
                (cpu_ticks(pids.0) - cpu_before.0) as f64 / 10.0,
                (cpu_ticks(pids.1) - cpu_before.1) as f64 / 10.0
            );
            // BENCH_LATENCIES=1 prints each run's latencies in the order they came
            // (whether a tail is the first queries or spread over the run)
            // and what the query cache answered of the run's reads, and the CPU time the
            // rest of the machine took meanwhile (other processes and the kernel, time
            // the hypervisor took, waits for the disk)
            if latencies {
                let ended = chrono::Utc::now();
                let machine = machine_ticks();
                let servers = cpu_ticks(pids.0) + cpu_ticks(pids.1) - cpu_before.0 - cpu_before.1;
                let cache = query_cache_reads(km_ref).await;
                let each: Vec<String> = lat.iter().map(|l| format!("{l:.1}")).collect();
                let gcs: Vec<String> = go_gcs(&nats_ref.log(), nats_started)
                    .iter()
                    .filter(|gc| gc.began < ended && gc.ended() > began)
                    .map(GoGc::to_string)
                    .collect();
                eprintln!(
                    "  {url} ({} to {}; query cache hits {}, misses {}; CPU besides the servers {} ms, steal {} ms, iowait {} ms; nats-server GCs in the run: {}): {}",
                    began.format("%H:%M:%S%.3f"),
                    ended.format("%H:%M:%S%.3f"),
                    cache.0 - cache_before.0,
                    cache.1 - cache_before.1,
                    (machine.0 - machine_before.0).saturating_sub(servers) * 10,
                    (machine.1 - machine_before.1) * 10,
                    (machine.2 - machine_before.2) * 10,
                    if gcs.is_empty() { "none".to_string() } else { gcs.join("; ") },
                    each.join(" ")
                );
            }
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (lat[49], lat[98], last, cpu)
        }
    };
    let one = km.url("/api/v1/meters/tokens/query?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z&windowSize=DAY&subject=customer-0042");
    // as earlier runs measured it (right after the aggregator caught up), then settled
    let runs_began = chrono::Utc::now();
    let (p50r, p99r, _, _) = run(one.clone()).await;
    let settling = settled(
        &[km.pid().unwrap(), nats_pid(&nats)],
        Duration::from_secs(180),
    )
    .await;
    // what the cold queries at the end ask again
    let mut cold_urls = vec![("UTC", one.clone())];
    let (p50a, p99a, body_a, cpu_a) = run(one).await;
    // the same in zones whose days are not UTC days
    let mut zoned = Vec::new();
    for ((zone, from), expected) in zones.iter().zip(expected_zoned) {
        let at = |t: i64| {
            chrono::DateTime::from_timestamp(t, 0)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        };
        let url = km.url(&format!("/api/v1/meters/tokens/query?from={}&to={}&windowSize=DAY&windowTimeZone={zone}&subject=customer-0042", at(*from), at(from + span)));
        // (a build from before HOUR windows kept quarters refuses Kolkata's days)
        let probe = client.get(&url).send().await.unwrap();
        if probe.status().as_u16() == 400 {
            let why: Value = probe.json().await.unwrap();
            zoned.push(format!(
                "  the same in {zone}: refused ({})",
                why["message"]
            ));
            continue;
        }
        if *zone == "Asia/Kolkata" {
            cold_urls.push((*zone, url.clone()));
        }
        let (p50z, p99z, body_z, cpu_z) = run(url).await;
        let zoned_total = rows_total(&body_z);
        if zoned_total != rust_decimal::Decimal::from(expected) {
            failures.push(format!(
                "query: customer-0042's month in {zone} {zoned_total}, want {expected}"
            ));
        }
        zoned.push(format!(
            "  the same in {zone}: p50 {p50z:.1} ms, p99 {p99z:.1} ms ({cpu_z})"
        ));
    }
    let all =
        km.url("/api/v1/meters/tokens/query?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z");
    let (p50b, p99b, body_b, cpu_b) = run(all).await;
    let rows_a = body_a["data"].as_array().map_or(0, Vec::len);
    let total = rows_total(&body_b);
    if total != rust_decimal::Decimal::from(expected)
        || body_b["data"].as_array().unwrap().len() != 1000
    {
        failures.push(format!("query: month total {total}, want {expected}"));
    }
    // what kloudmeter did beside the queries, with its time (against each run's above):
    // every line it logged but the queries' own, from a minute before the first run
    // (a million events take dozens of collections: none read means the lines changed)
    if latencies && go_gcs(&nats.log(), nats_started).is_empty() {
        failures.push("query: no nats-server GC read from its GODEBUG=gctrace=1 log".into());
    }
    if latencies {
        let since = (runs_began - chrono::Duration::seconds(60))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string();
        let logs = km.logs();
        let beside: Vec<&str> = logs
            .lines()
            .filter(|l| !l.contains("\"query\""))
            .filter(|l| {
                l.split("\"timestamp\":\"")
                    .nth(1)
                    .and_then(|t| t.get(..since.len()))
                    .is_some_and(|t| t >= since.as_str())
            })
            .collect();
        for line in beside.iter().take(40) {
            eprintln!("  {line}");
        }
        // and nats-server's collections over the same time
        let since = runs_began - chrono::Duration::seconds(60);
        for gc in go_gcs(&nats.log(), nats_started)
            .iter()
            .filter(|gc| gc.began >= since)
        {
            eprintln!("  nats-server GC {gc}");
        }
    }
    if std::env::var("BENCH_LOG").is_ok() {
        for line in km
            .logs()
            .lines()
            .filter(|l| l.contains("\"query\""))
            .step_by(10)
        {
            eprintln!("{line}");
        }
    }
    // The first query after the readings went unread for a while (a dashboard polling
    // every 30 s): nats-server's file store lets a block's cache go about 10 s after its
    // last use, and the query then loads every block that holds a window it reads. Two
    // samples each, every one after 15 s without a request.
    let mut cold = Vec::new();
    for (zone, url) in &cold_urls {
        let mut took = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(15)).await;
            let t = Instant::now();
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{url}");
            r.bytes().await.unwrap();
            took.push(format!("{:.0}", t.elapsed().as_secs_f64() * 1000.0));
        }
        cold.push(format!("{zone} {} ms", took.join(", ")));
    }
    println!();
    println!("queries over {n} events (30 days, 1,000 subjects, 4 models, HOUR meter; loaded and aggregated in {:.0} s):", loaded.as_secs_f64());
    println!(
        "  one subject, 30 days at DAY windows ({rows_a} rows), right after the aggregator caught up: p50 {p50r:.1} ms, p99 {p99r:.1} ms"
    );
    println!(
        "  (below: once kloudmeter and nats-server were idle, {:.0} s later)",
        settling.as_secs_f64()
    );
    println!(
        "  one subject, 30 days at DAY windows ({rows_a} rows): p50 {p50a:.1} ms, p99 {p99a:.1} ms ({cpu_a})"
    );
    for line in zoned {
        println!("{line}");
    }
    println!(
        "  readings bucket: {} keys, {:.1} MB ({:.0} bytes a key)",
        readings.messages,
        readings.bytes as f64 / 1e6,
        readings.bytes as f64 / readings.messages.max(1) as f64
    );
    println!("  all 1,000 subjects' totals over the month: p50 {p50b:.1} ms, p99 {p99b:.1} ms ({cpu_b}); peak RSS kloudmeter {:.1} MiB, nats-server {:.1} MiB",
        rss_kib(km.pid().unwrap()) as f64 / 1024.0, rss_kib(nats_pid(&nats)) as f64 / 1024.0);
    println!(
        "  one subject's month again, each after 15 s without a request (cold): {}",
        cold.join("; ")
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--baseline-server") {
        baseline_server(args[2].clone(), args[3].parse().unwrap(), args[4].clone()).await;
        return;
    }
    // `cargo bench` passes --bench; ignore it.
    let reps = env_usize("BENCH_REPS", 3);
    let n = env_usize("BENCH_EVENTS", 100_000);
    let mut failures = Vec::new();
    println!("KloudMeter benchmark: {n} events of ~250 bytes per run ({} for aggregation), {reps} repetitions, medians (min–max); rates in events/s; RSS is peak (VmHWM) in MiB", env_usize("BENCH_AGG_EVENTS", 300_000));
    println!();
    println!("| scenario | baseline | baseline rate | kloudmeter rate | ratio | kloudmeter RSS | nats-server RSS |");
    println!("|---|---|---|---|---|---|---|");
    // BENCH_ONLY=ingest,aggregation,e2e picks scenarios (default: all)
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    let mut half = env_usize("BENCH_E2E_RATE", 0) as f64;
    if want("ingest") {
        let mut batch = ingest_batch(reps, n, env_usize("BENCH_CLIENTS", 8)).await;
        batch.print();
        for mut r in ingest_single(reps, n / 5, 32).await {
            r.print();
        }
        half = median(&mut batch.km.clone()) / 2.0;
    }
    if want("auth") {
        ingest_auth(reps, n / 5, 32).await.print();
    }
    if want("aggregation") {
        // BENCH_AGG_METERS=10 runs one of the two (for profiling)
        let counts = std::env::var("BENCH_AGG_METERS").unwrap_or_else(|_| "1,10".into());
        // A longer backlog than the other scenarios: with ten meters the events touch
        // 40,000 distinct readings, each loaded once and written at the end whatever the
        // backlog's length, and at 100,000 events that fixed work is most of the run.
        let agg_n = env_usize("BENCH_AGG_EVENTS", 300_000);
        for meters in counts.split(',').filter_map(|c| c.parse().ok()) {
            aggregation(reps, agg_n, meters, false, &mut failures)
                .await
                .print();
        }
    }
    if want("thresholds") {
        // the notifier queries every subject's period values each second beside the
        // aggregator: what ten thresholds cost the fold
        let agg_n = env_usize("BENCH_AGG_EVENTS", 300_000);
        let plain = aggregation(reps, agg_n, 1, false, &mut failures).await;
        let ten = aggregation(reps, agg_n, 1, true, &mut failures).await;
        Row {
            scenario: "aggregation, 1 meter with ten thresholds".into(),
            baseline: "the same meter without thresholds".into(),
            base: plain.km,
            km: ten.km,
            km_rss: ten.km_rss,
            nats_rss: ten.nats_rss,
        }
        .print();
    }
    if want("cluster") {
        cluster_ingest(reps, n, env_usize("BENCH_CLIENTS", 8), &mut failures)
            .await
            .print();
    }
    // not part of the default run (it wants as many cores as processes):
    // BENCH_ONLY=scaling, BENCH_SCALING_PARTITIONS=1,2,4,8
    if only.split(',').any(|o| o == "scaling") {
        let counts = std::env::var("BENCH_SCALING_PARTITIONS").unwrap_or_else(|_| "1,2,4,8".into());
        let agg_n = env_usize("BENCH_AGG_EVENTS", 300_000);
        let mut sustained = Vec::new();
        for p in counts.split(',').filter_map(|c| c.parse().ok()) {
            let mut row = scaling(reps, agg_n, p, &mut failures).await;
            row.print();
            sustained.push((p, median(&mut row.km.clone())));
        }
        // end to end at half of what each count aggregated (BENCH_E2E_SECS each)
        let secs = env_usize("BENCH_E2E_SECS", 10) as u64;
        println!();
        for (p, rate) in sustained {
            let (p50, p99, samples, krss, nrss) =
                end_to_end(rate / 2.0, secs, p, &mut failures).await;
            println!(
                "end to end, {p} partition(s) and process(es), at {:.0} events/s (half its aggregation rate): 2xx -> KV reading p50 {p50:.1} ms, p99 {p99:.1} ms over {samples} probes; peak RSS kloudmeter {:.1} MiB (largest process), nats-server {:.1} MiB",
                rate / 2.0,
                krss as f64 / 1024.0,
                nrss as f64 / 1024.0
            );
        }
    }
    // not part of the default run: BENCH_ONLY=soak (task soak)
    if only.split(',').any(|o| o == "soak") {
        soak(
            env_usize("BENCH_SOAK_RATE", 11_000) as f64,
            env_usize("BENCH_SOAK_SECS", 600) as u64,
            &mut failures,
        )
        .await;
    }
    if want("query") {
        query_latency(env_usize("BENCH_QUERY_EVENTS", 1_000_000), &mut failures).await;
    }
    if want("subjects") {
        query_subjects_100k(env_usize("BENCH_SUBJECTS_EVENTS", 300_000), &mut failures).await;
    }
    if want("e2e") {
        if half == 0.0 {
            half = 20_000.0;
        }
        let secs = env_usize("BENCH_E2E_SECS", 10) as u64;
        let (p50, p99, samples, krss, nrss) = end_to_end(half, secs, 1, &mut failures).await;
        println!();
        println!(
            "end to end at {half:.0} events/s (half the batch ingest maximum): 2xx -> KV reading p50 {p50:.1} ms, p99 {p99:.1} ms over {samples} probes; peak RSS kloudmeter {:.1} MiB, nats-server {:.1} MiB",
            krss as f64 / 1024.0,
            nrss as f64 / 1024.0
        );
    }
    if want("backfill") {
        let n = env_usize("BENCH_BACKFILL_EVENTS", 2_000_000);
        let rate = env_usize("BENCH_BACKFILL_RATE", 130) as f64;
        let b = backfill(n, rate, &mut failures).await;
        println!();
        println!(
            "backfill: a meter built over {n} retained events in {:.1} s ({:.0} events/s) while a live meter received {rate:.0} events/s: its 2xx -> KV reading p50 {:.1} ms, p99 {:.1} ms, worst {:.1} ms over {} events during the build; peak RSS kloudmeter {:.1} MiB, nats-server {:.1} MiB",
            b.build_secs,
            b.build_rate,
            b.p50_ms,
            b.p99_ms,
            b.worst_ms,
            b.samples,
            b.km_rss as f64 / 1024.0,
            b.nats_rss as f64 / 1024.0
        );
    }
    if want("coldstart") {
        let n = env_usize("BENCH_COLDSTART_CLAIMS", 20_000_000);
        let before_n = env_usize("BENCH_COLDSTART_BEFORE_CLAIMS", 2_000_000);
        println!();
        println!("cold start (LEADER_TTL 2s): kill -9 of the only warm process, a new one on an empty DATA_DIR; seconds until an event posted to it is counted");
        for (claims, snapshots, seed) in [
            (before_n, false, false),
            (before_n, true, false),
            (n, true, true),
        ] {
            let c = cold_start(claims, snapshots, seed, &mut failures).await;
            println!(
                "  {claims} claims, {}: fresh after {:.1} s; peak RSS {:.1} MiB{}",
                if snapshots {
                    "from the snapshot"
                } else {
                    "reading the whole claim log"
                },
                c.fresh_secs,
                c.km_rss as f64 / 1024.0,
                c.fetched.map(|l| format!("; {l}")).unwrap_or_default()
            );
        }
    }
    if !failures.is_empty() {
        eprintln!("WRONG READINGS:");
        for f in &failures {
            eprintln!("  {f}");
        }
        std::process::exit(1);
    }
    println!("all readings checked: exact");
}
