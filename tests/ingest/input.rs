//! Bad input: clear errors naming the field, and nothing stored.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn bad_requests_name_the_field_and_store_nothing() {
    let nats = Nats::start();
    let km = Km::start(&nats, "bad", &[]).await;
    let ev = km.url("/api/v1/events");
    let seed = km.url("/api/register-event");
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            &ev,
            "application/json",
            br#"{"id": "1", "eventType": "#.to_vec(),
            400,
            "body: invalid JSON",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": 1, "eventType": "t", "subject": "s"}"#.to_vec(),
            400,
            "id: must be a string",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t"}"#.to_vec(),
            400,
            "subject: is required",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "subject": "s"}"#.to_vec(),
            400,
            "eventType: is required",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t", "subject": "a b"}"#.to_vec(),
            400,
            "subject: must be",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t", "subject": "orders.>"}"#.to_vec(),
            400,
            "subject: must be",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t", "subject": "s", "time": "soon"}"#.to_vec(),
            400,
            "time: must be",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t", "subject": "s", "data": {"v": NaN}}"#.to_vec(),
            400,
            "body: invalid JSON",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t", "subject": "s", "data": {"v": Infinity}}"#.to_vec(),
            400,
            "body: invalid JSON",
        ),
        (
            &seed,
            "application/json",
            br#"{"id": "1", "eventType": "t", "subject": "s", "data": "x"}"#.to_vec(),
            400,
            "data: must be a JSON object",
        ),
        (
            &ev,
            "application/json",
            br#"[{"id": "1", "eventType": "t", "subject": "s"}, {"id": "2", "eventType": "t"}]"#
                .to_vec(),
            400,
            "[1].subject: is required",
        ),
        (
            &ev,
            "application/cloudevents+json",
            br#"{"id": "1", "type": "t", "subject": "s"}"#.to_vec(),
            400,
            "specversion: is required",
        ),
        (
            &ev,
            "application/json",
            vec![b' '; (1 << 20) + 1],
            413,
            "body: larger than",
        ),
    ];
    for (url, ct, body, want_status, want_msg) in cases {
        let (status, resp) = post_raw(url, ct, body).await;
        assert_eq!(status, want_status, "{want_msg}: {resp}");
        assert_eq!(resp["status"], json!("error"), "{resp}");
        let msg = resp["message"].as_str().unwrap();
        assert!(msg.starts_with(want_msg), "got {msg:?}, want {want_msg:?}");
    }
    let meters = km.url("/api/create-meter");
    let meter_cases = [
        (
            json!({"id": "m", "eventType": "t", "aggregation": "median", "valueProperty": "$.v"}),
            "aggregation: unknown aggregation",
        ),
        (
            json!({"id": "m", "eventType": "t", "aggregation": "sum", "valueProperty": "v"}),
            "valueProperty: JSONPath must start with '$'",
        ),
        (
            json!({"id": "m", "eventType": "t", "aggregation": "sum"}),
            "valueProperty: is required for aggregation sum",
        ),
        (
            json!({"id": "m", "eventType": "t", "aggregation": "count", "groupBy": {"g": "$..[("}}),
            "groupBy.g: invalid JSONPath",
        ),
        (
            json!({"id": "a/b", "eventType": "t", "aggregation": "count"}),
            "id: must be",
        ),
        (
            json!({"id": "m", "eventType": "t", "aggregation": "count", "windowSize": "YEAR"}),
            "windowSize: unknown",
        ),
    ];
    for (body, want) in meter_cases {
        for url in [meters.clone(), km.url("/api/v1/meters")] {
            let (status, resp) = post(&url, &body).await;
            assert_eq!(status, 400, "{resp}");
            assert!(
                resp["message"].as_str().unwrap().starts_with(want),
                "{resp} vs {want}"
            );
        }
    }
    assert_eq!(get(&km.url("/api/meter/?key=nope")).await.0, 404);
    assert_eq!(
        get(&km.url("/api/meter/")).await,
        (
            400,
            json!({"status": "error", "message": "key: is required"})
        )
    );
    // nothing was stored: no event in the stream, no meter
    let js = nats.client().await;
    let info = js
        .get_stream("bad")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 0);
    assert_eq!(get(&km.url("/api/meters")).await, (200, json!([])));
    assert_eq!(km.metric("kloudmeter_events_accepted_total").await, 0.0);
    assert_eq!(km.metric("kloudmeter_events_rejected_total").await, 13.0);
}

#[tokio::test]
async fn v1_meter_endpoints() {
    let nats = Nats::start();
    let km = Km::start(&nats, "v1m", &[]).await;
    let def = json!({"id": "calls", "eventType": "api", "aggregation": "count"});
    let (s, body) = post(&km.url("/api/v1/meters"), &def).await;
    assert_eq!(
        (s, body),
        (
            201,
            json!({"id": "calls", "eventType": "api", "aggregation": "count", "windowSize": "HOUR"})
        )
    );
    // same definition again: fine; a different one under the same id: conflict
    assert_eq!(post(&km.url("/api/v1/meters"), &def).await.0, 200);
    let (s, body) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "calls", "eventType": "other", "aggregation": "count"}),
    )
    .await;
    assert_eq!(
        (s, body["message"].clone()),
        (409, json!("id: meter \"calls\" already exists"))
    );
    assert_eq!(
        get(&km.url("/api/v1/meters/calls")).await.1["eventType"],
        json!("api")
    );
    assert_eq!(
        get(&km.url("/api/v1/meters"))
            .await
            .1
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let r = reqwest::Client::new()
        .delete(km.url("/api/v1/meters/calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(get(&km.url("/api/v1/meters/calls")).await.0, 404);
    let r = reqwest::Client::new()
        .delete(km.url("/api/v1/meters/calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // PUT creates (201), then replaces (200)
    let put = |def: Value| {
        let url = km.url("/api/v1/meters/made");
        async move {
            let r = reqwest::Client::new()
                .put(url)
                .json(&def)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, body) = put(json!({"eventType": "api", "aggregation": "count"})).await;
    assert_eq!(
        (s, body),
        (
            201,
            json!({"id": "made", "eventType": "api", "aggregation": "count", "windowSize": "HOUR"})
        )
    );
    let (s, body) =
        put(json!({"eventType": "api", "aggregation": "count", "windowSize": "DAY"})).await;
    assert_eq!((s, body["windowSize"].clone()), (200, json!("DAY")));
    // a misspelt field is refused, naming it and what it most likely meant
    for (field, want) in [
        ("groupby", "groupby: unknown field; did you mean groupBy?"),
        (
            "valuProperty",
            "valuProperty: unknown field; did you mean valueProperty?",
        ),
        (
            "window_size",
            "window_size: unknown field; did you mean windowSize?",
        ),
    ] {
        let mut def = json!({"id": "typo", "eventType": "api", "aggregation": "count"});
        def[field] = json!("x");
        for url in ["/api/v1/meters", "/api/create-meter"] {
            let (s, body) = post(&km.url(url), &def).await;
            assert_eq!((s, body["message"].clone()), (400, json!(want)), "{url}");
        }
    }
    assert_eq!(get(&km.url("/api/v1/meters/typo")).await.0, 404);
}

#[tokio::test]
async fn api_token_guards_api_but_not_health() {
    let nats = Nats::start();
    let km = Km::start(&nats, "auth", &[("API_TOKEN", "s3cret")]).await;
    let c = reqwest::Client::new();
    for path in [
        "/api/meters",
        "/api/readings",
        "/api/v1/meters",
        "/api/v1/readings",
    ] {
        assert_eq!(
            c.get(km.url(path)).send().await.unwrap().status().as_u16(),
            401,
            "{path}"
        );
        assert_eq!(
            c.get(km.url(path))
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            401,
            "{path}"
        );
        assert_eq!(
            c.get(km.url(path))
                .bearer_auth("s3cret")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200,
            "{path}"
        );
    }
    let ev = json!({"id": "1", "eventType": "t", "subject": "s"});
    assert_eq!(
        c.post(km.url("/api/register-event"))
            .json(&ev)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    // every /api/** route the description lists refuses a request without the token
    let mut walked = 0;
    for (method, path, status, _) in walk_described_routes(&km, &c).await {
        if path.starts_with("/api/") {
            assert_eq!(status, 401, "{method} {path}");
            walked += 1;
        } else {
            assert_ne!(status, 401, "{method} {path} must stay open");
        }
    }
    assert_eq!(
        walked,
        kloudmeter::http::routes::ROUTES
            .iter()
            .filter(|r| r.path.starts_with("/api/"))
            .count()
    );
    for path in [
        "/healthz",
        "/healthy",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert_eq!(
            c.get(km.url(path)).send().await.unwrap().status().as_u16(),
            200,
            "{path}"
        );
    }
}

#[test]
fn invalid_configuration_stops_startup_with_one_line() {
    let cases = [
        ("METER_INTERVAL", "0"),
        ("METER_INTERVAL", "0s"),
        ("LOG_LEVEL", "info,["),
        ("METER_INTERVAL", "soon"),
        ("DEDUP_WINDOW", "forever"),
        ("EVENT_RETENTION", "-1d"),
        ("HTTP_SERVER_PORT", "70000"),
        ("KUBERNETES", "maybe"),
        ("METER_NATS_STREAM", "a.b"),
        ("DATA_DIR", "/dev/null"),
        ("NATS_URL", "nats://a:4222,nats://b:notaport"),
        ("NATS_URL", "nats://a:4222,"),
        ("NATS_REPLICAS", "2"),
        ("NATS_REPLICAS", "0"),
        ("AUTH_MODE", "ldap"),
        ("AUTH_MODE", "token"),
        ("AUTH_CACHE_TTL", "0s"),
        ("TENANCY", "namespaced"),
        ("TENANCY", "per-team"),
        ("TENANCY_CROSS_NAMESPACE", "Billing"),
        ("WEBHOOK_URL", "ftp://hooks.example"),
    ];
    for (var, value) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kloudmeter"))
            .env_clear()
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{var}={value}: {stderr}");
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
    }
    let _ = Duration::ZERO;
    let _ = Value::Null;
    // `setup` takes the NATS settings only; `run` takes them all
    let help = |cmd: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kloudmeter"))
            .args([cmd, "--help"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let (setup, run) = (help("setup"), help("run"));
    for flag in [
        "--nats-url",
        "--meter-nats-stream",
        "--event-retention",
        "--log-level",
    ] {
        assert!(setup.contains(flag) && run.contains(flag), "{flag}");
    }
    for flag in [
        "--http-server-port",
        "--meter-interval",
        "--api-token",
        "--data-dir",
    ] {
        assert!(!setup.contains(flag) && run.contains(flag), "{flag}");
    }
}

#[tokio::test]
async fn meter_interval_and_log_level_take_the_usual_forms() {
    let nats = Nats::start();
    // a duration like every other setting, and a log filter as a flag's env
    let km = Km::start(
        &nats,
        "forms",
        &[
            ("METER_INTERVAL", "10s"),
            ("LOG_LEVEL", "debug,async_nats=warn"),
        ],
    )
    .await;
    wait_for(
        "a debug line in the log",
        Duration::from_secs(10),
        || async { km.logs().contains("\"level\":\"DEBUG\"") },
    )
    .await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_and_blocks_nobody() {
    use std::io::{Read, Write};
    let nats = Nats::start();
    let km = Km::start(&nats, "slow", &[("HTTP_HEADER_TIMEOUT", "1s")]).await;
    // a client that starts a request and never finishes its headers
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", km.port)).unwrap();
    slow.write_all(b"POST /api/register-event HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    // meanwhile the API answers others
    let (s, _) = get(&km.url("/api/meters")).await;
    assert_eq!(s, 200);
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the slow connection stayed open {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the timeout: {waited:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}
