//! The Meter CRD's CEL rules (`x-kubernetes-validations`) as an API server from 1.25 on
//! enforces them: apiextensions-apiserver v1.36 (the CRD server kube-apiserver embeds,
//! `.ci/cel-assets.sh`), storing in the control plane's etcd under its own prefix and
//! asking that control plane who callers are and what they may do. A bad Meter is refused
//! with the rule's message (the create request `kubectl apply` makes, sent raw: the
//! standalone server has no core API for kubectl's discovery; behind the 1.20
//! aggregator, writes were seen to bypass the rules now and then); on 1.20 the same CRD installs, its rules
//! dropped, and the controller's own checks remain (the operator tests).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::control_plane::ControlPlane;
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
    // the same admin token, against the CRD server (its certificate is self-signed)
    let kubeconfig = dir.join("kubeconfig.crd-server");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: crd\n  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\nusers:\n- name: admin\n  user: {{token: {}}}\ncontexts:\n- name: crd\n  context: {{cluster: crd, user: admin, namespace: default}}\ncurrent-context: crd\n",
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

fn kubectl(server: &CrdServer, args: &[&str], input: &str) -> (bool, String, String) {
    tools::kubectl_with(&server.kubeconfig, args, input)
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
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/meters.kloudmeter.io.yaml"
    ))
    .unwrap();
    let server = start(&cp);
    // the CRD server serves no core API (/api), which kubectl's discovery for `apply`
    // needs: the same requests are made raw
    let json = |yaml: &str| {
        let v: serde_json::Value = serde_yaml::from_str(yaml.trim_start_matches("---\n")).unwrap();
        v.to_string()
    };
    let crd_json = json(crd.split("\n---\n").nth(1).expect("the CRD document"));
    // the CRD passes the server's cost estimate for its rules
    let (ok, _, err) = kubectl(
        &server,
        &[
            "create",
            "--raw",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            "-f",
            "-",
        ],
        &crd_json,
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
            &["create", "--raw", meters, "-f", "-"],
            &json(&meter(name, spec)),
        )
    };
    for (name, spec, message) in REFUSED {
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
