//! The operator against a real kube-apiserver (and etcd) and a real nats-server. One
//! control plane serves every scenario; each scenario works in its own namespace.

use std::time::{Duration, Instant};

use crate::common::control_plane::ControlPlane;
use crate::common::tools::Kubectl;
use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

async fn wait_kubectl(cp: &ControlPlane, what: &str, ns: &str, obj: &str, path: &str, want: &str) {
    wait_for(what, T, || async { cp.try_jsonpath(ns, obj, path) == want }).await;
}

/// The Meter manifest of the README's Kubernetes section (so the README stays true).
/// Wait for a Warning Event with `reason` on the Meter `name` whose note satisfies `note`.
async fn wait_event(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    reason: &str,
    note: impl Fn(&str) -> bool,
) {
    wait_for(&format!("a {reason} event on {name}"), T, || async {
        let ev = cp.kubectl(&["get", "events.v1.events.k8s.io", "-n", ns, "-o", "json"]);
        let ev: Value = serde_json::from_str(&ev).unwrap();
        ev["items"].as_array().unwrap().iter().any(|e| {
            e["reason"] == json!(reason)
                && e["type"] == json!("Warning")
                && e["regarding"]["name"] == json!(name)
                && e["note"].as_str().is_some_and(&note)
        })
    })
    .await;
}

fn readme_manifest() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```yaml\napiVersion: kloudmeter.io/v1alpha1")
        .expect("README has a Meter manifest");
    let body = &readme[start + "```yaml\n".len()..];
    body[..body.find("```").unwrap()].to_string()
}

fn ns(cp: &ControlPlane, name: &str) {
    cp.kubectl(&["create", "namespace", name]);
}

async fn post_ok(km: &Km, events: Value) {
    let (s, b) = post(&km.url("/api/v1/events"), &events).await;
    assert_eq!(s, 202, "{b}");
}

#[tokio::test]
async fn operator_against_a_real_api_server() {
    let cp = ControlPlane::with_crds();
    ns(&cp, "kloudmeter");
    let mut nats = Nats::start();
    let kubeconfig = cp.kubeconfig.display().to_string();
    let env = [
        ("KUBERNETES", "true"),
        ("KUBECONFIG", kubeconfig.as_str()),
        ("POD_NAMESPACE", "kloudmeter"),
        ("METER_INTERVAL", "1"),
        ("LEADER_TTL", "3s"),
        // two partitions: statuses are merged from both, and a second operator takes
        // partition 1 (its own Lease) while the first keeps partition 0 and the role
        ("PARTITIONS", "2"),
    ];
    let mut a = Km::start(&nats, "op", &env).await;
    wait_kubectl(
        &cp,
        "a lease",
        "kloudmeter",
        "lease/kloudmeter-leader",
        "{.spec.holderIdentity}",
        &holder_of(a.pid().unwrap()),
    )
    .await;

    // --- the README's Meter, events over HTTP, kubectl get meters ---
    ns(&cp, "team-a");
    let applied = Instant::now();
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], &readme_manifest());
    assert!(ok, "{err}");
    wait_kubectl(
        &cp,
        "llm-tokens Ready",
        "team-a",
        "meter/llm-tokens",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    )
    .await;
    let to_ready = applied.elapsed();
    let events = json!([
        {"id": "e1", "eventType": "api.request", "subject": "customer-1", "time": "2026-11-24T10:00:00Z", "data": {"tokens": 120, "model": "gpt-x"}},
        {"id": "e2", "eventType": "api.request", "subject": "customer-1", "time": "2026-11-24T10:05:00Z", "data": {"tokens": 80, "model": "gpt-y"}},
        {"id": "e3", "eventType": "api.request", "subject": "customer-2", "time": "2026-11-24T11:00:00Z", "data": {"tokens": "7.5", "model": "gpt-x"}},
        {"id": "e4", "eventType": "api.request", "subject": "customer-2", "time": "2026-11-24T11:00:00Z", "data": {"model": "gpt-x"}}
    ]);
    let posted = Instant::now();
    post_ok(&a, events).await;
    wait_kubectl(
        &cp,
        "VALUE in status",
        "team-a",
        "meter/llm-tokens",
        "{.status.value}",
        "207.5",
    )
    .await;
    let to_value = posted.elapsed();
    eprintln!("measured: kubectl apply -> Ready=True {to_ready:?}; event -> status.value {to_value:?} (METER_INTERVAL=1)");
    let table = cp.kubectl(&["get", "meters", "-n", "team-a"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        vec![
            "NAME",
            "EVENT TYPE",
            "AGGREGATION",
            "VALUE",
            "EVENTS",
            "READY",
            "AGE"
        ],
        "{table}"
    );
    assert_eq!(
        &lines[1][..6],
        &["llm-tokens", "api.request", "sum", "207.5", "3", "True"],
        "{table}"
    );
    let y: Value = serde_json::from_str(&cp.kubectl(&[
        "get",
        "mtr",
        "llm-tokens",
        "-n",
        "team-a",
        "-o",
        "json",
    ]))
    .unwrap();
    let st = &y["status"];
    assert_eq!(
        (
            st["events"].clone(),
            st["invalidEvents"].clone(),
            st["subjects"].clone()
        ),
        (json!(3), json!(1), json!(2))
    );
    assert_eq!(st["lastEventTime"], json!("2026-11-24T11:00:00Z"));
    assert_eq!(
        st["topSubjects"],
        json!([{"subject": "customer-1", "value": "200"}, {"subject": "customer-2", "value": "7.5"}])
    );
    assert_eq!(st["observedGeneration"], y["metadata"]["generation"]);
    assert!(
        st["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{st}"
    );
    assert_eq!(
        y["metadata"]["finalizers"],
        json!(["kloudmeter.io/cleanup"])
    );
    // the same readings over HTTP, under the <namespace>/<name> id
    assert_eq!(
        subject_values(&a, "team-a/llm-tokens")
            .await
            .get("customer-1")
            .map(String::as_str),
        Some("200")
    );

    // --- the reconcile count stays flat while status write-backs happen ---
    let reconciles = a.metric("kloudmeter_reconciles_total").await;
    for i in 0..3 {
        let before = cp.try_jsonpath("team-a", "meter/llm-tokens", "{.status.lastUpdated}");
        post_ok(&a, json!([{"id": format!("flat{i}"), "eventType": "api.request", "subject": "customer-3", "data": {"tokens": 1}}])).await;
        wait_for("a status write-back", T, || async {
            cp.try_jsonpath("team-a", "meter/llm-tokens", "{.status.lastUpdated}") != before
        })
        .await;
    }
    wait_kubectl(
        &cp,
        "three more events",
        "team-a",
        "meter/llm-tokens",
        "{.status.events}",
        "6",
    )
    .await;
    assert_eq!(
        a.metric("kloudmeter_reconciles_total").await,
        reconciles,
        "status writes must not trigger reconciles"
    );

    // --- invalid Meters: the schema rejects what it can, the controller the rest ---
    ns(&cp, "team-b");
    let bad = |name: &str, spec: &str| {
        format!("apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: {name}, namespace: team-b}}\nspec: {spec}\n")
    };
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &bad(
            "median",
            "{eventType: x, aggregation: median, valueProperty: $.v}",
        ),
    );
    assert!(!ok && err.contains("spec.aggregation"), "{err}");
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &bad(
            "nodollar",
            "{eventType: x, aggregation: sum, valueProperty: v}",
        ),
    );
    assert!(!ok && err.contains("spec.valueProperty"), "{err}");
    for (name, spec, msg) in [
        (
            "badpath",
            "{eventType: x, aggregation: sum, valueProperty: '$.[['}",
            "spec.valueProperty: invalid JSONPath",
        ),
        (
            "novalue",
            "{eventType: x, aggregation: sum}",
            "spec.valueProperty: is required for aggregation sum",
        ),
        // the schema keeps `eq` operands as sent; the controller names the bad one
        (
            "badfilter",
            "{eventType: x, aggregation: count, filter: {'$.region': {eq: {a: 1}}}}",
            "spec.filter[\"$.region\"].eq: values must be strings, numbers or booleans",
        ),
    ] {
        let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], &bad(name, spec));
        assert!(ok, "{err}");
        let obj = format!("meter/{name}");
        wait_kubectl(
            &cp,
            "InvalidSpec",
            "team-b",
            &obj,
            "{.status.conditions[0].reason}",
            "InvalidSpec",
        )
        .await;
        assert_eq!(
            cp.try_jsonpath("team-b", &obj, "{.status.conditions[0].status}"),
            "False"
        );
        assert!(cp
            .try_jsonpath("team-b", &obj, "{.status.conditions[0].message}")
            .starts_with(msg));
        wait_event(&cp, "team-b", name, "InvalidSpec", |note| {
            note.starts_with(msg)
        })
        .await;
    }

    // --- a misspelt field: the API server prunes it silently, the controller says so.
    // (kubectl refuses it on its own side; clients that do not validate, or
    // `--validate=false`, send it and see it vanish) ---
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "--validate=false", "-f", "-"],
        &bad(
            "typo",
            "{eventType: x, aggregation: count, groupby: {model: $.model}}",
        ),
    );
    assert!(ok, "{err}");
    wait_event(&cp, "team-b", "typo", "UnknownField", |note| {
        note == "spec.groupby: unknown field; did you mean groupBy?; the API server dropped it"
    })
    .await;
    // the meter itself is valid without the dropped field (count needs nothing else)
    wait_kubectl(
        &cp,
        "typo Ready",
        "team-b",
        "meter/typo",
        "{.status.conditions[0].reason}",
        "Ready",
    )
    .await;

    // --- editing valueProperty rebuilds; editing description does not ---
    ns(&cp, "team-c");
    let manifest = |vp: &str, desc: &str| {
        format!("apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: m, namespace: team-c}}\nspec: {{eventType: edit, aggregation: sum, valueProperty: '{vp}', description: '{desc}'}}\n")
    };
    post_ok(
        &a,
        json!([
            {"id": "x1", "eventType": "edit", "subject": "s", "data": {"a": 1, "b": 10}},
            {"id": "x2", "eventType": "edit", "subject": "s", "data": {"a": 2, "b": 20}}
        ]),
    )
    .await;
    assert!(
        cp.kubectl_stdin(&["apply", "-f", "-"], &manifest("$.a", "one"))
            .0
    );
    wait_kubectl(
        &cp,
        "m backfilled",
        "team-c",
        "meter/m",
        "{.status.value}",
        "3",
    )
    .await;
    let rebuilds = a.metric("kloudmeter_rebuilds_total").await;
    assert!(
        cp.kubectl_stdin(&["apply", "-f", "-"], &manifest("$.a", "two"))
            .0
    );
    wait_kubectl(
        &cp,
        "description seen",
        "team-c",
        "meter/m",
        "{.status.observedGeneration}",
        "2",
    )
    .await;
    assert_eq!(a.metric("kloudmeter_rebuilds_total").await, rebuilds);
    assert!(
        cp.kubectl_stdin(&["apply", "-f", "-"], &manifest("$.b", "two"))
            .0
    );
    wait_kubectl(
        &cp,
        "rebuilt from $.b",
        "team-c",
        "meter/m",
        "{.status.value}",
        "30",
    )
    .await;
    assert_eq!(a.metric("kloudmeter_rebuilds_total").await, rebuilds + 1.0);
    wait_kubectl(
        &cp,
        "Ready after the rebuild",
        "team-c",
        "meter/m",
        "{.status.conditions[0].reason}",
        "Ready",
    )
    .await;

    // --- a build's progress is in its Ready condition; suspend, resume ---
    ns(&cp, "team-e");
    let js = nats.client().await;
    let n = 300_000;
    preload_events(&js, "op", "bulk", n).await;
    caught_up(&js, "op", Duration::from_secs(300)).await;
    let big = |suspend: bool| {
        format!("apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: big, namespace: team-e}}\nspec: {{eventType: bulk, aggregation: count, suspend: {suspend}}}\n")
    };
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], &big(false)).0);
    let ready = "{.status.conditions[?(@.type==\"Ready\")]}";
    wait_for("Building, with percent done and time left", T, || async {
        let cond: Value = serde_json::from_str(&cp.try_jsonpath("team-e", "meter/big", ready))
            .unwrap_or(Value::Null);
        let message = cond["message"].as_str().unwrap_or_default();
        cond["reason"] == json!("Building")
            && cond["status"] == json!("False")
            && message.contains("% (")
            && message.contains("s left")
    })
    .await;
    wait_kubectl(
        &cp,
        "big built",
        "team-e",
        "meter/big",
        "{.status.value}",
        &n.to_string(),
    )
    .await;
    wait_kubectl(
        &cp,
        "big Ready",
        "team-e",
        "meter/big",
        "{.status.conditions[0].reason}",
        "Ready",
    )
    .await;
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], &big(true)).0);
    wait_kubectl(
        &cp,
        "big Suspended",
        "team-e",
        "meter/big",
        "{.status.conditions[0].reason}",
        "Suspended",
    )
    .await;
    post_ok(
        &a,
        json!([{"id": "late-1", "eventType": "bulk", "subject": "s", "data": {}}]),
    )
    .await;
    caught_up(&js, "op", T).await;
    assert_eq!(
        cp.try_jsonpath("team-e", "meter/big", "{.status.value}"),
        n.to_string()
    );
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], &big(false)).0);
    wait_kubectl(
        &cp,
        "big resumed",
        "team-e",
        "meter/big",
        "{.status.value}",
        &(n + 1).to_string(),
    )
    .await;
    wait_kubectl(
        &cp,
        "big Ready again",
        "team-e",
        "meter/big",
        "{.status.conditions[0].reason}",
        "Ready",
    )
    .await;

    // --- a meter created over HTTP is a Meter resource kubectl shows ---
    let (s, body) = post(
        &a.url("/api/v1/meters"),
        &json!({"id": "api-made", "eventType": "edit", "aggregation": "count"}),
    )
    .await;
    assert_eq!((s, body["id"].clone()), (201, json!("kloudmeter/api-made")));
    assert_eq!(
        cp.try_jsonpath("kloudmeter", "meter/api-made", "{.spec.aggregation}"),
        "count"
    );
    wait_kubectl(
        &cp,
        "api-made counted",
        "kloudmeter",
        "meter/api-made",
        "{.status.value}",
        "2",
    )
    .await;
    let (s, _) = post(&a.url("/api/create-meter"), &json!({"id": "seed-made", "eventType": "edit", "aggregation": "sum", "valueProperty": "$.a"})).await;
    assert_eq!(s, 202);
    assert_eq!(
        cp.try_jsonpath("kloudmeter", "meter/seed-made", "{.spec.valueProperty}"),
        "$.a"
    );
    let (s, _) = post(
        &a.url("/api/create-meter"),
        &json!({"id": "Not_A_Name", "eventType": "edit", "aggregation": "count"}),
    )
    .await;
    assert_eq!(s, 400);
    let r = reqwest::Client::new()
        .delete(a.url("/api/v1/meters/kloudmeter/api-made"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    wait_for("api-made gone", T, || async {
        !cp.kubectl_status(&["-n", "kloudmeter", "get", "meter/api-made"])
            .0
    })
    .await;

    // --- two operators: one leader; kill -9 it while events flow; totals exact ---
    ns(&cp, "team-d");
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], "apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {name: ha, namespace: team-d}\nspec: {eventType: ha, aggregation: sum, valueProperty: $.v}\n").0);
    wait_kubectl(
        &cp,
        "ha Ready",
        "team-d",
        "meter/ha",
        "{.status.conditions[0].status}",
        "True",
    )
    .await;
    let b = Km::start(&nats, "op", &env).await;
    assert_eq!(
        (
            a.metric("kloudmeter_leader").await,
            b.metric("kloudmeter_leader").await
        ),
        (1.0, 0.0)
    );
    // the newcomer takes its share: partition 1, through its own Lease
    wait_kubectl(
        &cp,
        "partition 1 handed over",
        "kloudmeter",
        "lease/kloudmeter-leader-p1",
        "{.spec.holderIdentity}",
        &holder_of(b.pid().unwrap()),
    )
    .await;
    assert_eq!(
        b.metric(r#"kloudmeter_partition_owned{partition="1"}"#)
            .await,
        1.0
    );
    let mut expected = 0i64;
    let client = reqwest::Client::new();
    for i in 0..60i64 {
        if i == 20 {
            a.kill9();
        }
        let batch: Vec<Value> = (0..20).map(|k| json!({"id": format!("ha-{i}-{k}"), "eventType": "ha", "subject": format!("s{}", k % 3), "data": {"v": k + 1}})).collect();
        expected += (1..=20).sum::<i64>();
        // the survivor serves ingestion throughout
        let r = client
            .post(b.url("/api/v1/events"))
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    wait_for("b leads", T, || async {
        b.metric("kloudmeter_leader").await == 1.0
    })
    .await;
    wait_kubectl(
        &cp,
        "lease moved",
        "kloudmeter",
        "lease/kloudmeter-leader",
        "{.spec.holderIdentity}",
        &holder_of(b.pid().unwrap()),
    )
    .await;
    wait_kubectl(
        &cp,
        "exact total after takeover",
        "team-d",
        "meter/ha",
        "{.status.value}",
        &expected.to_string(),
    )
    .await;
    caught_up(&nats.client().await, "op", T).await;
    assert_eq!(
        meter_reading(&b, "team-d/ha").await["events"],
        json!(60 * 20)
    );

    // --- deleting a Meter removes its readings; with NATS down it completes later ---
    let js = nats.client().await;
    let kv = js.get_key_value("op-readings").await.unwrap();
    let count_keys = |prefix: &'static str| {
        let kv = kv.clone();
        async move {
            use futures::StreamExt;
            let mut n = 0;
            let mut keys = kv.keys().await.unwrap();
            while let Some(k) = keys.next().await {
                if k.unwrap().starts_with(prefix) {
                    n += 1;
                }
            }
            n
        }
    };
    // (every generation: `m` was rebuilt, its readings are under `team-c/m@1` in
    // partition 0 and `team-c/m#1@1` in partition 1)
    assert!(count_keys("r.team-c=2Fm=401.").await + count_keys("r.team-c=2Fm=231=401.").await > 0);
    cp.kubectl(&["delete", "meter", "m", "-n", "team-c", "--timeout=60s"]);
    assert_eq!(count_keys("r.team-c=2Fm").await, 0);
    nats.stop();
    cp.kubectl(&["delete", "meter", "ha", "-n", "team-d", "--wait=false"]);
    wait_kubectl(
        &cp,
        "CleanupPending",
        "team-d",
        "meter/ha",
        "{.status.conditions[0].reason}",
        "CleanupPending",
    )
    .await;
    assert!(
        cp.kubectl_status(&["-n", "team-d", "get", "meter/ha"]).0,
        "still held by the finalizer"
    );
    nats.restart();
    wait_for("ha deleted after NATS returned", T, || async {
        !cp.kubectl_status(&["-n", "team-d", "get", "meter/ha"]).0
    })
    .await;
    let js = nats.client().await;
    let kv = js.get_key_value("op-readings").await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    use futures::StreamExt;
    while let Some(k) = keys.next().await {
        assert!(
            !k.unwrap().starts_with("r.team-d=2Fha"),
            "readings of a deleted meter remain"
        );
    }
    drop(b);
}
