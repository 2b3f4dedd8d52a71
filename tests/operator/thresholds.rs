//! Thresholds in operator mode: each crossing is a `ThresholdCrossed` Event on its Meter,
//! and `status.thresholds` shows where subjects stand in the current period.

use std::time::Duration;

use crate::common::control_plane::ControlPlane;
use crate::common::tools::Kubectl;
use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn crossings_are_events_on_the_meter_and_its_status_counts_them() {
    let cp = ControlPlane::with_crds();
    for ns in ["kloudmeter", "team-a"] {
        cp.kubectl(&["create", "namespace", ns]);
    }
    let manifest = "apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {name: tokens, namespace: team-a}\nspec:\n  eventType: use\n  aggregation: sum\n  valueProperty: $.v\n  thresholds: [{value: \"100\", period: MONTH, every: \"100\"}]\n";
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(ok, "{err}");
    let nats = Nats::start();
    let km = Km::start(&nats, "thr", &cp.operator_env(&[("METER_INTERVAL", "1")])).await;
    wait_for("the Meter served", T, || async {
        get(&km.url("/api/v1/meters/team-a/tokens")).await.0 == 200
    })
    .await;
    let e = |id: &str, subject: &str, v: i64| json!({"id": id, "eventType": "use", "subject": subject, "data": {"v": v}});
    // s1 reaches 250 (levels 100 and 200), s3 120 (100), s2 50 (none)
    post_until_accepted(
        &km.url("/api/v1/events"),
        &json!([e("1", "s1", 250), e("2", "s2", 50), e("3", "s3", 120)]),
        T,
    )
    .await;
    let want = json!({"crossed": 3, "subjects": [
        {"subject": "s1", "value": "250", "threshold": "200"},
        {"subject": "s3", "value": "120", "threshold": "100"},
    ]});
    wait_for("status.thresholds", T, || async {
        let raw = cp.try_jsonpath("team-a", "meter/tokens", "{.status.thresholds}");
        serde_json::from_str::<Value>(&raw).ok() == Some(want.clone())
    })
    .await;
    // one Normal Event per crossing, naming subject, level and value
    let notes = || {
        let ev = cp.kubectl(&[
            "get",
            "events.v1.events.k8s.io",
            "-n",
            "team-a",
            "-o",
            "json",
        ]);
        let ev: Value = serde_json::from_str(&ev).unwrap();
        let mut notes: Vec<String> = ev["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == json!("ThresholdCrossed"))
            .map(|e| {
                assert_eq!(e["type"], json!("Normal"));
                assert_eq!(e["regarding"]["name"], json!("tokens"));
                assert!(e["regarding"]["uid"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty()));
                e["note"]
                    .as_str()
                    .unwrap()
                    .split(" (")
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        notes.sort();
        notes
    };
    let want_notes = [
        "subject \"s1\" reached 100",
        "subject \"s1\" reached 200",
        "subject \"s3\" reached 100",
    ];
    wait_for("three ThresholdCrossed Events", T, || async {
        notes() == want_notes
    })
    .await;
}
