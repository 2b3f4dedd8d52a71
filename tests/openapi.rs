//! The OpenAPI description against the running server: every route it lists is served,
//! and schemathesis (from PyPI) finds no 5xx and no answer that breaks the schema.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::json;

#[tokio::test]
async fn every_route_is_described_and_every_described_route_is_served() {
    let nats = Nats::start();
    let km = Km::start(&nats, "oa", &[]).await;
    let (s, doc) = get(&km.url("/openapi.json")).await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], json!("3.1.0"));
    let paths = doc["paths"].as_object().unwrap();
    // the router is built from the same list, so the two cannot differ
    let listed: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(listed, kloudmeter::openapi::ROUTES.len());
    for (method, path, status, body) in walk_described_routes(&km, &reqwest::Client::new()).await {
        assert_ne!(status, 405, "{method} {path}");
        assert_ne!(
            body["message"],
            json!("path: no such endpoint"),
            "{method} {path} is not served"
        );
    }
    // and an unlisted path is not
    let (s, body) = get(&km.url("/api/v2/anything")).await;
    assert_eq!(
        (s, body["message"].clone()),
        (404, json!("path: no such endpoint"))
    );
}

fn schemathesis() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let cached = PathBuf::from(home).join(".cache/kloudmeter/venv/bin/st");
    if cached.is_file() {
        return Some(cached);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "schemathesis missing under CI=true: .ci/tools.sh installs it"
    );
    None
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let Some(st) = schemathesis() else {
        panic!("schemathesis not installed: run `bash .ci/tools.sh`");
    };
    let nats = Nats::start();
    let km = Km::start(&nats, "st", &[]).await;
    // something to find: a meter with events
    let (s, _) = post(&km.url("/api/v1/meters"), &json!({"id": "m", "eventType": "t", "aggregation": "sum", "valueProperty": "$.v", "groupBy": {"g": "$.g"}})).await;
    assert_eq!(s, 201);
    let (s, _) = post(
        &km.url("/api/v1/events"),
        &json!([{"id": "1", "eventType": "t", "subject": "s", "data": {"v": 2, "g": "a"}}]),
    )
    .await;
    assert_eq!(s, 202);
    let url = km.url("/openapi.json");
    let out = tokio::task::spawn_blocking(move || {
        // schemathesis keeps a cache in its working directory: not in the checkout
        let scratch = tempfile::tempdir().unwrap();
        std::process::Command::new(st)
            .current_dir(scratch.path())
            .args(["run", &url])
            .args(["--checks", "not_a_server_error,response_schema_conformance"])
            .args(["--max-examples", "25", "--workers", "2", "--no-color"])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    eprintln!(
        "{}",
        text.lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
