//! The OpenAPI description against the running server: every route it lists is served,
//! and schemathesis (from PyPI) finds no 5xx and no answer that breaks the schema.

use crate::common::*;
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
    assert_eq!(listed, kloudmeter::http::routes::ROUTES.len());
    for (method, path, status, body) in walk_described_routes(&km, &reqwest::Client::new()).await {
        assert_ne!(status, 405, "{method} {path}");
        // every answer is one the route documents
        let documented = &doc["paths"][&path][&method]["responses"];
        assert!(
            documented.get(status.to_string()).is_some(),
            "{method} {path} answered {status}, documented: {documented}"
        );
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
    // a method a path does not serve: 405 with the usual error body
    let r = reqwest::Client::new()
        .patch(km.url("/api/meters"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "error", "message": "method: PATCH is not served on this path"})
    );
}

#[tokio::test]
async fn the_description_matches_what_the_server_takes_and_answers() {
    let nats = Nats::start();
    let km = Km::start(&nats, "oadoc", &[]).await;
    let (_, doc) = get(&km.url("/openapi.json")).await;
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    let codes = |path: &str, method: &str| -> Vec<String> {
        let mut c: Vec<String> = op(path, method)["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        c.sort();
        c
    };
    // each route lists its own statuses (500: a stored record that does not decode);
    // nothing answers 429
    assert_eq!(codes("/healthz", "get"), ["200"]);
    assert_eq!(codes("/readyz", "get"), ["200", "503"]);
    assert_eq!(
        codes("/api/v1/events", "post"),
        ["202", "400", "401", "403", "413", "503"]
    );
    assert_eq!(
        codes("/api/v1/meters", "post"),
        ["200", "201", "400", "401", "403", "409", "413", "500", "503"]
    );
    assert_eq!(
        codes("/api/v1/meters/{id}", "put"),
        ["200", "201", "400", "401", "403", "413", "500", "503"]
    );
    assert_eq!(
        codes("/api/v1/meters/{id}", "delete"),
        ["204", "401", "403", "404", "500", "503"]
    );
    assert_eq!(
        codes("/api/v1/meters/{id}/query", "get"),
        ["200", "400", "401", "403", "404", "500", "503"]
    );
    // lists show only what the caller may list (AUTH_MODE kubernetes): never 403
    assert_eq!(codes("/api/v1/meters", "get"), ["200", "401", "500", "503"]);
    // every /api route declares the bearer scheme; health, metrics and this document
    // stay open
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let secured = op["security"] == json!([{"bearer": []}]);
            assert_eq!(secured, path.starts_with("/api"), "{method} {path}");
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        json!("bearer")
    );
    assert!(!doc.to_string().contains("\"429\""));
    // every query parameter the server reads is described
    let params: Vec<String> = op("/api/v1/meters/{id}/query", "get")["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for p in [
        "id",
        "from",
        "to",
        "windowSize",
        "windowTimeZone",
        "subject",
        "groupBy",
        "filterGroupBy",
    ] {
        assert!(params.iter().any(|q| q == p), "{p} missing from {params:?}");
    }
    // meter bodies: POST needs an id, PUT takes it from the path, windowSize is
    // optional, and unknown fields are refused by the schema as by the server
    let body = |path: &str, method: &str| {
        op(path, method)["requestBody"]["content"]["application/json"]["schema"].clone()
    };
    assert_eq!(body("/api/v1/meters", "post")["required"], json!(["id"]));
    assert!(body("/api/v1/meters/{id}", "put").get("required").is_none());
    let input = &doc["components"]["schemas"]["MeterInput"];
    assert_eq!(input["additionalProperties"], json!(false));
    assert_eq!(input["required"], json!(["eventType", "aggregation"]));
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let st = tools::schemathesis();
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
    // One worker thread. Python 3.11's ast module keeps its constructor's recursion counter
    // in state its threads share (CPython gh-106905, fixed after 3.11): two schemathesis
    // workers describing hypothesis strategies at once can trip "AST constructor recursion
    // depth mismatch", an error of the tool's own that fails a run whose cases all passed.
    let out = tokio::task::spawn_blocking(move || {
        // schemathesis keeps a cache in its working directory: not in the checkout
        let scratch = tempfile::tempdir().unwrap();
        std::process::Command::new(st)
            .current_dir(scratch.path())
            .args(["run", &url])
            .args(["--checks", "not_a_server_error,response_schema_conformance"])
            .args(["--max-examples", "25", "--workers", "1", "--no-color"])
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
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
}
