//! The Meter CRD's CEL rules (`x-kubernetes-validations`) as an API server from 1.25 on
//! enforces them: apiextensions-apiserver v1.36 (the CRD server kube-apiserver embeds,
//! `.ci/cel-assets.sh`), storing in the control plane's etcd under its own prefix and
//! asking that control plane who callers are and what they may do. A bad Meter is refused
//! with the rule's message, by `kubectl apply`. kubectl reaches the CRD server through
//! [`front`], which answers the one question a CRD server cannot (the core API's
//! versions: it serves none) as kube-apiserver's aggregator does on a real cluster, and
//! passes every other request through. (Behind the 1.20 aggregator itself, writes were
//! seen to bypass the rules now and then.) On 1.20 the same CRD installs, its rules
//! dropped, and the controller's own checks remain (the operator tests).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;

use crate::common::control_plane::ControlPlane;
use crate::common::tools::Kubectl;
use crate::common::{free_port, tools};

struct CrdServer {
    child: Child,
    kubeconfig: std::path::PathBuf,
}

impl Drop for CrdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(cp: &ControlPlane) -> CrdServer {
    let port = free_port();
    let dir = cp.dir.path();
    let kc = cp.kubeconfig.display().to_string();
    let child = Command::new(tools::cel_apiserver())
        .args([
            "--etcd-servers",
            &cp.etcd_url,
            "--etcd-prefix",
            "/crd-server",
        ])
        .args([
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            &port.to_string(),
        ])
        .args([
            "--cert-dir",
            &dir.join("crd-server-certs").display().to_string(),
        ])
        .args(["--kubeconfig", &kc])
        .args([
            "--authentication-kubeconfig",
            &kc,
            "--authorization-kubeconfig",
            &kc,
        ])
        // what a 1.20 core server cannot feed: admission (its plugins wait on informers
        // of v1 admission policies) and priority and fairness (v1 flow schemas)
        .arg("--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook")
        .arg("--enable-priority-and-fairness=false")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("crd-server.log")).unwrap())
        .spawn()
        .expect("starting apiextensions-apiserver");
    // the same admin token, through the front (plain HTTP on loopback; the front
    // talks TLS to the CRD server, whose certificate is self-signed)
    let front = front(format!("https://127.0.0.1:{port}"), cp.token.clone());
    let kubeconfig = dir.join("kubeconfig.crd-server");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: crd\n  cluster: {{server: \"http://127.0.0.1:{front}\"}}\nusers:\n- name: admin\n  user: {{token: {}}}\ncontexts:\n- name: crd\n  context: {{cluster: crd, user: admin, namespace: default}}\ncurrent-context: crd\n",
            cp.token
        ),
    )
    .unwrap();
    let server = CrdServer { child, kubeconfig };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // serving the CRD API is what counts: its /readyz stays false, since informers
        // for v1 kinds a 1.20 core server lacks (admission policies, flow schemas) never
        // sync; nothing here uses them
        let (ready, out, err) = kubectl(
            &server,
            &["get", "--raw", "/apis/apiextensions.k8s.io/v1"],
            "",
        );
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "apiextensions-apiserver not ready: {out}{err}\n{}",
            std::fs::read_to_string(dir.join("crd-server.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    server
}

/// A front for the CRD server on a port of its own: kubectl's discovery asks for the
/// core API's versions (`/api`) before anything else and gives up on a server that has
/// no core API, as a standalone CRD server has not. The front answers that one request
/// (no versions: nothing here uses the core API) and passes every other one through
/// unchanged, as kube-apiserver's aggregator passes a group's requests to its server.
/// (kubectl sends no credentials over plain HTTP: the front adds the admin token the
/// kubeconfig names, so the CRD server still authenticates and authorizes every call.)
fn front(backend: String, token: String) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .build()
                .unwrap();
            let core = serde_json::json!({"kind": "APIVersions", "versions": [], "serverAddressByClientCIDRs": []});
            let (c, b, t) = (client.clone(), backend.clone(), token.clone());
            let app = axum::Router::new()
                .route("/api", axum::routing::get(move || async move { axum::Json(core) }))
                .route(
                    "/apis",
                    axum::routing::get(move || groups(c.clone(), b.clone(), t.clone())),
                )
                .fallback(move |req: Request| {
                    pass(client.clone(), backend.clone(), token.clone(), req)
                });
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    port
}

/// The API groups the CRD server serves (its own and those of its CRDs), listed as an
/// aggregator lists them: the server answers each group's own discovery document, but
/// not the list of them all.
async fn groups(
    client: reqwest::Client,
    backend: String,
    token: String,
) -> axum::Json<serde_json::Value> {
    let get = |path: String| {
        let request = client.get(format!("{backend}{path}")).bearer_auth(&token);
        async move {
            let answer = request.send().await.ok()?;
            if !answer.status().is_success() {
                return None;
            }
            answer.json::<serde_json::Value>().await.ok()
        }
    };
    let crds = get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions".into()).await;
    let mut names: Vec<String> = crds
        .iter()
        .flat_map(|list| list["items"].as_array().into_iter().flatten())
        .filter_map(|crd| crd["spec"]["group"].as_str().map(str::to_string))
        .collect();
    names.push("apiextensions.k8s.io".into());
    names.sort();
    names.dedup();
    let mut groups = Vec::new();
    for name in names {
        if let Some(group) = get(format!("/apis/{name}")).await {
            groups.push(group);
        }
    }
    axum::Json(serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

/// One request passed to the CRD server, and its answer back (a failure to reach it
/// is a 502 that kubectl shows).
async fn pass(client: reqwest::Client, backend: String, token: String, req: Request) -> Response {
    use axum::http::header;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let mut out = client
        .request(parts.method, format!("{backend}{path}"))
        .bearer_auth(token)
        .body(body);
    for (name, value) in &parts.headers {
        if name != header::HOST && name != header::AUTHORIZATION {
            out = out.header(name, value);
        }
    }
    let answer = match out.send().await {
        Ok(answer) => answer,
        Err(e) => {
            return Response::builder()
                .status(502)
                .body(Body::from(e.to_string()))
                .unwrap()
        }
    };
    let mut back = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        // the body is passed whole: hop-by-hop framing is the front's own
        if name != header::TRANSFER_ENCODING
            && name != header::CONNECTION
            && name != header::CONTENT_LENGTH
        {
            back = back.header(name, value);
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    back.body(Body::from(bytes)).unwrap()
}

/// kubectl against the CRD server, with a discovery cache of this test's own.
fn kubectl(server: &CrdServer, args: &[&str], input: &str) -> (bool, String, String) {
    let cache = server.kubeconfig.with_extension("cache");
    let mut all = vec!["--cache-dir", cache.to_str().unwrap()];
    all.extend_from_slice(args);
    tools::kubectl_with(&server.kubeconfig, &all, input)
}

fn meter(name: &str, spec: &str) -> String {
    format!("apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n")
}

/// Meters each rule refuses, with the message it answers.
const REFUSED: &[(&str, &str, &str)] = &[
    (
        "no-value",
        "{eventType: api.request, aggregation: sum}",
        "spec.valueProperty: Required value: valueProperty is required for every aggregation except count",
    ),
    (
        "null-value",
        "{eventType: api.request, aggregation: max, valueProperty: null}",
        "valueProperty is required for every aggregation except count",
    ),
    (
        "bad-group",
        "{eventType: api.request, aggregation: count, groupBy: {\"model name\": $.model}}",
        "spec.groupBy: Invalid value: group names must be 1-63 characters of [A-Za-z0-9_-]",
    ),
    (
        "zone-for-all",
        "{eventType: api.request, aggregation: count, thresholds: [{value: \"10\", period: ALL, timeZone: Europe/Berlin}]}",
        "spec.thresholds[0].timeZone: Invalid value: timeZone has no meaning for period ALL",
    ),
];

/// Meters the rules let through (the controller takes them too).
const ACCEPTED: &[(&str, &str)] = &[
    ("count", "{eventType: api.request, aggregation: COUNT}"),
    (
        "sum",
        "{eventType: api.request, aggregation: sum, valueProperty: $.tokens, groupBy: {model: $.model, region_2-b: $.r}}",
    ),
    (
        "monthly",
        "{eventType: api.request, aggregation: count, thresholds: [{value: \"10\", period: MONTH, timeZone: Europe/Berlin}, {value: \"5\", period: ALL}]}",
    ),
];

#[test]
fn a_crd_server_with_cel_refuses_bad_meters_at_apply_with_the_rules_message() {
    let cp = ControlPlane::start();
    let server = start(&cp);
    // installed as the README says (`--validate=false`: the client-side schema check
    // needs the OpenAPI documents a full API server serves); the CRD passes the
    // server's cost estimate for its rules
    let (ok, _, err) = kubectl(
        &server,
        &[
            "apply",
            "--validate=false",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/crds/"),
        ],
        "",
    );
    assert!(
        ok,
        "the CRD is refused: {err}\n{}",
        std::fs::read_to_string(cp.dir.path().join("crd-server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("dmission"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let meters = "/apis/kloudmeter.io/v1alpha1/namespaces/default/meters";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kubectl(&server, &["get", "--raw", meters], "").0 {
        assert!(Instant::now() < deadline, "the Meter API is not served");
        std::thread::sleep(Duration::from_millis(200));
    }
    let create = |name: &str, spec: &str| {
        kubectl(
            &server,
            &["apply", "--validate=false", "-f", "-"],
            &meter(name, spec),
        )
    };
    // more groupBy keys than the schema allows (also the controller's limit)
    let many: Vec<String> = (0..33).map(|i| format!("g{i}: $.g{i}")).collect();
    let many = format!(
        "{{eventType: api.request, aggregation: count, groupBy: {{{}}}}}",
        many.join(", ")
    );
    let too_many = [(
        "many-groups",
        many.as_str(),
        "spec.groupBy: Too many: 33: must have at most 32 items",
    )];
    for (name, spec, message) in REFUSED.iter().copied().chain(too_many) {
        let (ok, out, err) = create(name, spec);
        assert!(!ok, "{name} accepted: {out}");
        assert!(
            err.contains(message) && err.contains(&format!("The Meter \"{name}\" is invalid")),
            "{name}: want {message:?} in {err}"
        );
    }
    for (name, spec) in ACCEPTED {
        let (ok, _, err) = create(name, spec);
        assert!(ok, "{name} refused: {err}");
    }
    let (_, listed, _) = kubectl(&server, &["get", "--raw", meters], "");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["count", "monthly", "sum"]);

    // 1.20 installs the same CRD and drops its rules: a bad Meter is stored there, and the
    // controller's own checks answer it (InvalidSpec, in the operator tests)
    cp.kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/crds/"),
    ]);
    cp.wait_established(&["crd/meters.kloudmeter.io"]);
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], &meter(REFUSED[0].0, REFUSED[0].1));
    assert!(ok, "1.20 took the rule-breaking Meter: {err}");
}
