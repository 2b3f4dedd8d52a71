//! AUTH_MODE=kubernetes against a real kube-apiserver with RBAC and ServiceAccount token
//! signing: tokens come from TokenRequest (`kubectl create token`), every decision from
//! TokenReview and SubjectAccessReview.

use std::time::{Duration, Instant};

use crate::common::control_plane::ControlPlane;
use crate::common::tools::Kubectl;
use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
/// AUTH_CACHE_TTL of the process under test: a revoked grant is refused this much later
/// at most.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// A role that may do everything with meters and events (beside the chart's two
/// ClusterRoles for users).
const ADMIN_ROLE: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: test-meter-admin}
rules:
- {apiGroups: [kloudmeter.io], resources: [meters, events], verbs: [get, list, create, update, delete]}
"#;

/// The ClusterRoles the chart offers users (`kloudmeter-event-writer`,
/// `kloudmeter-usage-reader`), as `helm template` renders them.
fn chart_user_roles() -> String {
    let rendered = crate::helm::helm_ok(
        None,
        &[
            "template",
            "kloudmeter",
            crate::helm::CHART,
            "-n",
            "kloudmeter",
        ],
    );
    let roles: Vec<&str> = rendered
        .split("\n---")
        .filter(|doc| doc.contains("kloudmeter.io/role-for: users"))
        .collect();
    assert_eq!(roles.len(), 2, "{rendered}");
    roles.join("\n---\n")
}

fn bind(cp: &ControlPlane, ns: &str, role: &str, sa_ns: &str, sa: &str) {
    let name = format!("{sa}-{role}");
    cp.kubectl(&[
        "-n",
        ns,
        "create",
        "rolebinding",
        &name,
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount={sa_ns}:{sa}"),
    ]);
}

fn token(cp: &ControlPlane, ns: &str, sa: &str, audience: &str) -> String {
    cp.kubectl(&["-n", ns, "create", "token", sa, "--audience", audience])
        .trim()
        .to_string()
}

fn meter(cp: &ControlPlane, ns: &str, name: &str, event_type: &str) {
    let manifest = format!(
        "apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  eventType: {event_type}\n  aggregation: sum\n  valueProperty: $.n\n"
    );
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(ok, "{err}");
}

fn event(id: &str, event_type: &str) -> Value {
    json!({"id": id, "eventType": event_type, "subject": "s1", "data": {"n": 1}})
}

/// A request for every `/api` route the description lists, filled so that a caller
/// holding every permission in `team-a` and `kloudmeter` succeeds; `n` keeps ids apart
/// between walks. A route the description gains without a case here fails the test.
fn request(
    client: &reqwest::Client,
    km: &Km,
    method: &str,
    path: &str,
    n: usize,
) -> reqwest::RequestBuilder {
    let url = |p: &str| km.url(p);
    let new_meter = |id: &str| json!({"id": id, "eventType": "walk", "aggregation": "count"});
    match (method, path) {
        ("post", "/api/register-event") | ("post", "/api/v1/events") => client
            .post(url(path))
            .json(&event(&format!("walk-{n}-{path}"), "walk")),
        ("post", "/api/create-meter") => client
            .post(url(path))
            .json(&new_meter(&format!("seed-{n}"))),
        ("post", "/api/v1/meters") => client.post(url(path)).json(&new_meter(&format!("v1-{n}"))),
        ("get", "/api/meters") | ("get", "/api/v1/meters") | ("get", "/api/readings") => {
            client.get(url(path))
        }
        ("get", "/api/meter")
        | ("get", "/api/meter/")
        | ("get", "/api/reading")
        | ("get", "/api/reading/") => client.get(url(&format!("{path}?key=team-a/usage"))),
        ("delete", "/api/meter") => client.delete(url(&format!("{path}?key=team-a/gone-{n}-a"))),
        ("delete", "/api/meter/") => client.delete(url(&format!("{path}?key=team-a/gone-{n}-b"))),
        ("get", "/api/v1/meters/{id}") => client.get(url("/api/v1/meters/team-a%2Fusage")),
        ("put", "/api/v1/meters/{id}") => client
            .put(url(&format!("/api/v1/meters/put-{n}")))
            .json(&json!({"eventType": "walk", "aggregation": "count"})),
        ("delete", "/api/v1/meters/{id}") => {
            client.delete(url(&format!("/api/v1/meters/gone-{n}-c")))
        }
        ("get", "/api/v1/meters/{namespace}/{name}") => {
            client.get(url("/api/v1/meters/team-a/usage"))
        }
        ("put", "/api/v1/meters/{namespace}/{name}") => client
            .put(url(&format!("/api/v1/meters/team-a/put-{n}")))
            .json(&json!({"eventType": "walk", "aggregation": "count"})),
        ("delete", "/api/v1/meters/{namespace}/{name}") => {
            client.delete(url(&format!("/api/v1/meters/team-a/gone-{n}-d")))
        }
        ("get", "/api/v1/meters/{id}/query") => client.get(url(
            "/api/v1/meters/team-a%2Fusage/query?from=2026-01-01T00:00:00Z",
        )),
        ("get", "/api/v1/meters/{namespace}/{name}/query") => client.get(url(
            "/api/v1/meters/team-a/usage/query?from=2026-01-01T00:00:00Z",
        )),
        ("get", "/api/v1/readings") => client.get(url("/api/v1/readings?meter=team-a/usage")),
        other => panic!("the access walk has no request for {other:?}"),
    }
}

/// Every `/api` route as `bearer` (none when empty): (method, path, status, body).
async fn walk(km: &Km, bearer: &str, n: usize) -> Vec<(String, String, u16, Value)> {
    let client = reqwest::Client::new();
    let (_, doc) = get(&km.url("/openapi.json")).await;
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            let mut req = request(&client, km, method, path, n);
            if !bearer.is_empty() {
                req = req.bearer_auth(bearer);
            }
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

fn is_list(method: &str, path: &str) -> bool {
    method == "get" && ["/api/meters", "/api/v1/meters", "/api/readings"].contains(&path)
}

/// The meter ids a list answer shows (meters, seed readings or v1 readings).
fn ids(answer: &Value) -> std::collections::BTreeSet<String> {
    let rows = answer
        .get("data")
        .unwrap_or(answer)
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {answer}"));
    rows.iter()
        .filter_map(|r| r.get("id").or(r.get("meter")).or(r.get("meterId")))
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

async fn get_as(km: &Km, path: &str, bearer: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(km.url(path))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn kubernetes_identities_see_and_do_only_what_rbac_grants() {
    let cp = ControlPlane::with_crds();
    for ns in ["kloudmeter", "team-a", "team-b"] {
        cp.kubectl(&["create", "namespace", ns]);
    }
    for roles in [chart_user_roles(), ADMIN_ROLE.to_string()] {
        let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], &roles);
        assert!(ok, "{err}");
    }
    for (ns, sa) in [
        ("team-a", "app"),
        ("team-b", "app"),
        ("team-a", "nogrants"),
        ("team-a", "admin"),
    ] {
        cp.kubectl(&["-n", ns, "create", "serviceaccount", sa]);
    }
    for team in ["team-a", "team-b"] {
        bind(&cp, team, "kloudmeter-event-writer", team, "app");
        bind(&cp, team, "kloudmeter-usage-reader", team, "app");
    }
    bind(&cp, "team-a", "test-meter-admin", "team-a", "admin");
    bind(&cp, "kloudmeter", "test-meter-admin", "team-a", "admin");
    meter(&cp, "team-a", "usage", "a-calls");
    meter(&cp, "team-b", "usage", "b-calls");
    // TENANCY=shared (the default): a Meter counts its event type from everywhere
    meter(&cp, "team-b", "spy", "a-calls");

    let nats = Nats::start();
    let ttl = format!("{}s", CACHE_TTL.as_secs());
    let km = Km::start(
        &nats,
        "access",
        &cp.operator_env(&[
            ("AUTH_MODE", "kubernetes"),
            ("AUTH_CACHE_TTL", ttl.as_str()),
        ]),
    )
    .await;
    let a = token(&cp, "team-a", "app", "kloudmeter");
    let b = token(&cp, "team-b", "app", "kloudmeter");
    let admin = token(&cp, "team-a", "admin", "kloudmeter");
    let nogrants = token(&cp, "team-a", "nogrants", "kloudmeter");
    let wrong_audience = token(&cp, "team-a", "admin", "someone-else");
    // both meters copied into NATS by the controller
    wait_for("both Meters served", T, || async {
        let (s, v) = get_as(&km, "/api/v1/meters", &admin).await;
        let (sb, vb) = get_as(&km, "/api/v1/meters", &b).await;
        s == 200
            && ids(&v).contains("team-a/usage")
            && sb == 200
            && ids(&vb).contains("team-b/usage")
    })
    .await;

    // no token, a garbage token, a token for another audience (the admin's own): 401
    // everywhere, with the Bearer challenge
    for (who, bearer) in [
        ("no token", ""),
        ("garbage", "not-a-token"),
        ("wrong audience", wrong_audience.as_str()),
    ] {
        for (method, path, status, body) in walk(&km, bearer, 0).await {
            assert_eq!(status, 401, "{who}: {method} {path}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("authorization: "),
                "{body}"
            );
        }
    }
    // a ServiceAccount without grants: 403 naming the permission; lists show nothing
    for (method, path, status, body) in walk(&km, &nogrants, 0).await {
        if is_list(&method, &path) {
            assert_eq!(status, 200, "{method} {path}: {body}");
            assert!(ids(&body).is_empty(), "{method} {path}: {body}");
        } else {
            assert_eq!(status, 403, "{method} {path}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("forbidden: this identity may not "),
                "{body}"
            );
        }
    }
    let (s, body) = post_as(&km, "/api/v1/events", &nogrants, &event("x", "a-calls")).await;
    assert_eq!(
        (s, body),
        (
            403,
            json!({"status": "error", "message": "forbidden: this identity may not create events.kloudmeter.io in namespace team-a"})
        )
    );
    // one holding every permission in team-a and kloudmeter: 2xx everywhere (the meters
    // it deletes exist first)
    for (ns, name) in [
        ("team-a", "gone-1-a"),
        ("team-a", "gone-1-b"),
        ("kloudmeter", "gone-1-c"),
        ("team-a", "gone-1-d"),
    ] {
        meter(&cp, ns, name, "walk");
    }
    for (method, path, status, body) in walk(&km, &admin, 1).await {
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {body}"
        );
    }

    // each team's writer posts into its own namespace, each reader sees only its own
    for (bearer, event_type) in [(&a, "a-calls"), (&b, "b-calls")] {
        for i in 0..3 {
            let (s, body) = post_as(
                &km,
                "/api/v1/events",
                bearer,
                &event(&format!("{event_type}-{i}"), event_type),
            )
            .await;
            assert_eq!(s, 202, "{body}");
        }
    }
    for (bearer, own, other) in [
        (&a, "team-a/usage", "team-b/usage"),
        (&b, "team-b/usage", "team-a/usage"),
    ] {
        // counted first, so that every list has the subject readings too
        wait_for(
            &format!("{own} counts its writer's 3 events"),
            T,
            || async {
                let (_, v) = get_as(&km, &format!("/api/reading/?key={own}"), bearer).await;
                v["value"] == json!("3")
            },
        )
        .await;
        for list in [
            "/api/meters",
            "/api/v1/meters",
            "/api/readings",
            "/api/v1/readings",
        ] {
            let (s, body) = get_as(&km, list, bearer).await;
            assert_eq!(s, 200, "{list}: {body}");
            let shown = ids(&body);
            assert!(shown.contains(own), "{list}: {body}");
            assert!(
                shown.iter().all(|id| id.starts_with(&own[..7])),
                "{list}: {body}"
            );
        }
        let (s, _) = get_as(&km, &format!("/api/v1/readings?meter={own}"), bearer).await;
        assert_eq!(s, 200);
        let (s, body) = get_as(&km, &format!("/api/v1/meters/{other}/query"), bearer).await;
        assert_eq!(s, 403, "{body}");
        let (ns, name) = other.split_once('/').unwrap();
        assert_eq!(
            body["message"],
            json!(format!("forbidden: this identity may not get meters.kloudmeter.io {name:?} in namespace {ns}"))
        );
    }

    let (_, spy) = get_as(&km, "/api/reading/?key=team-b/spy", &b).await;
    assert_eq!(spy["value"], json!("3"), "shared tenancy: {spy}");

    // a revoked grant is refused within the cache's lifetime
    let (s, _) = get_as(&km, "/api/v1/meters/team-b/usage", &b).await;
    assert_eq!(s, 200);
    cp.kubectl(&[
        "-n",
        "team-b",
        "delete",
        "rolebinding",
        "app-kloudmeter-usage-reader",
    ]);
    let revoked = Instant::now();
    loop {
        let (s, _) = get_as(&km, "/api/v1/meters/team-b/usage", &b).await;
        if s == 403 {
            break;
        }
        assert!(
            revoked.elapsed() < CACHE_TTL + Duration::from_secs(3),
            "still {s} {:?} after the RoleBinding was deleted",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // health, readiness, metrics and the description stay open
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = reqwest::get(km.url(open)).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{open}");
    }
}

async fn post_as(km: &Km, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(km.url(path))
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The all-time value of a meter's reading.
async fn read_value(km: &Km, meter: &str, bearer: &str) -> Value {
    get_as(km, &format!("/api/reading/?key={meter}"), bearer)
        .await
        .1["value"]
        .clone()
}

/// TENANCY=namespaced with `billing` cross-namespace: team-b's Meter on team-a's event
/// type counts only team-b's events, billing's counts everyone's (the static token's,
/// which belong to no namespace, included).
#[tokio::test]
async fn namespaced_tenancy_counts_each_namespace_its_own_events() {
    let cp = ControlPlane::with_crds();
    for ns in ["kloudmeter", "team-a", "team-b", "billing"] {
        cp.kubectl(&["create", "namespace", ns]);
    }
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], &chart_user_roles());
    assert!(ok, "{err}");
    for team in ["team-a", "team-b"] {
        cp.kubectl(&["-n", team, "create", "serviceaccount", "app"]);
        bind(&cp, team, "kloudmeter-event-writer", team, "app");
    }
    // three Meters on team-a's event type: team-a's own, team-b's, and billing's
    meter(&cp, "team-a", "usage", "a-calls");
    meter(&cp, "team-b", "spy", "a-calls");
    meter(&cp, "billing", "all", "a-calls");
    let nats = Nats::start();
    let km = Km::start(
        &nats,
        "tenancy",
        &cp.operator_env(&[
            ("AUTH_MODE", "kubernetes"),
            ("API_TOKEN", "static-token"),
            ("TENANCY", "namespaced"),
            ("TENANCY_CROSS_NAMESPACE", "billing"),
        ]),
    )
    .await;
    let a = token(&cp, "team-a", "app", "kloudmeter");
    let b = token(&cp, "team-b", "app", "kloudmeter");
    // ids are unique per namespace: team-b and the static token reuse team-a's ids, and
    // a body cannot claim a namespace
    let mut posts = Vec::new();
    for i in 0..3 {
        posts.push((&a, json!({"id": format!("x{i}"), "eventType": "a-calls", "subject": "s1", "data": {"n": 1}})));
    }
    for i in 0..2 {
        posts.push((&b, json!({"id": format!("x{i}"), "eventType": "a-calls", "subject": "s1", "data": {"n": 10}, "namespace": "team-a"})));
    }
    let static_token = "static-token".to_string();
    posts.push((
        &static_token,
        json!({"id": "x0", "eventType": "a-calls", "subject": "s1", "data": {"n": 100}}),
    ));
    for (bearer, e) in &posts {
        let (s, body) = post_as(&km, "/api/v1/events", bearer, e).await;
        assert_eq!(s, 202, "{body}");
    }
    // a repeat within a namespace still counts once
    let (s, _) = post_as(&km, "/api/v1/events", &a, &posts[0].1).await;
    assert_eq!(s, 202);
    for (meter, want) in [
        ("billing/all", "123"),
        ("team-a/usage", "3"),
        ("team-b/spy", "20"),
    ] {
        wait_for(&format!("{meter} = {want}"), T, || async {
            read_value(&km, meter, &static_token).await == json!(want)
        })
        .await;
    }
}
