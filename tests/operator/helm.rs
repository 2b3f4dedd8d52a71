//! The Helm chart against a real kube-apiserver (with kube-controller-manager, so
//! garbage collection and ServiceAccount tokens work; no kubelet: Pods stay Pending).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use crate::common::chart::{granted, requests_of};
use crate::common::control_plane::{ControlPlane, Options};
use crate::common::tools::Kubectl;
use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
pub(crate) const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kloudmeter");

fn helm(cp: Option<&ControlPlane>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(tools::helm());
    if let Some(cp) = cp {
        c.arg("--kubeconfig").arg(&cp.kubeconfig);
    }
    let out = c
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("km-helm-cache"),
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub(crate) fn helm_ok(cp: Option<&ControlPlane>, args: &[&str]) -> String {
    let (ok, out, err) = helm(cp, args);
    assert!(ok, "helm {args:?}: {err}");
    out
}

#[test]
fn chart_lints_renders_and_validates_values() {
    let (ok, out, err) = helm(None, &["lint", "--strict", CHART]);
    assert!(ok, "{out}{err}");
    // the chart ships the same CRD as crds/
    let a = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/meters.kloudmeter.io.yaml"
    ))
    .unwrap();
    let b = std::fs::read_to_string(format!("{CHART}/crds/meters.kloudmeter.io.yaml")).unwrap();
    assert_eq!(a, b, "charts/kloudmeter/crds/ differs from crds/");
    // a wrong type fails at install time with a message naming the value
    let (ok, _, err) = helm(None, &["template", "x", CHART, "--set", "replicaCount=two"]);
    assert!(
        !ok && err.contains("replicaCount: Invalid type. Expected: integer, given: string"),
        "{err}"
    );
    let (ok, _, err) = helm(
        None,
        &[
            "template",
            "x",
            CHART,
            "--set",
            "config.dedupWindow=forever",
        ],
    );
    assert!(
        !ok && err.contains("config.dedupWindow: Does not match pattern"),
        "{err}"
    );
    let (ok, _, err) = helm(
        None,
        &[
            "template",
            "x",
            CHART,
            "--set",
            "nats.embedded.enabled=false",
        ],
    );
    assert!(!ok && err.contains("nats.url is required"), "{err}");
    // access: Kubernetes identities by default (with the review rights and the two
    // roles for users); the shared token mode needs the token
    let (ok, _, err) = helm(None, &["template", "x", CHART, "--set", "auth.mode=token"]);
    assert!(
        !ok && err.contains("auth.mode=token needs apiToken.enabled=true"),
        "{err}"
    );
    let (ok, _, err) = helm(None, &["template", "x", CHART, "--set", "auth.mode=oidc"]);
    assert!(
        !ok && err.contains("auth.mode: auth.mode must be one of"),
        "{err}"
    );
    let (ok, default, err) = helm(None, &["template", "x", CHART]);
    assert!(ok, "{err}");
    for want in [
        r#"{name: AUTH_MODE, value: "kubernetes"}"#,
        "resources: [\"tokenreviews\"]",
        "resources: [\"subjectaccessreviews\"]",
        "name: x-kloudmeter-event-writer",
        "name: x-kloudmeter-usage-reader",
    ] {
        assert!(default.contains(want), "{want} missing:\n{default}");
    }
    let (ok, _, err) = helm(
        None,
        &[
            "template",
            "x",
            CHART,
            "--set",
            "tenancy.mode=namespaced",
            "--set",
            "auth.mode=none",
        ],
    );
    assert!(
        !ok && err.contains("tenancy.mode=namespaced needs auth.mode=kubernetes"),
        "{err}"
    );
    let (ok, none, err) = helm(None, &["template", "x", CHART, "--set", "auth.mode=none"]);
    assert!(ok, "{err}");
    assert!(!none.contains("tokenreviews"), "{none}");
    // no PodDisruptionBudget at one replica (the install's notes say why)
    let (ok, one, err) = helm(None, &["template", "x", CHART]);
    assert!(ok, "{err}");
    assert!(!one.contains("kind: PodDisruptionBudget"), "{one}");
    let (ok, two, err) = helm(None, &["template", "x", CHART, "--set", "replicaCount=2"]);
    assert!(ok, "{err}");
    assert!(two.contains("kind: PodDisruptionBudget"), "{two}");
    // METER_INTERVAL takes durations like every other setting
    let (ok, _, err) = helm(
        None,
        &["template", "x", CHART, "--set", "config.meterInterval=5m"],
    );
    assert!(ok, "{err}");
}

#[tokio::test]
async fn install_upgrade_uninstall_and_least_privilege() {
    let cp = ControlPlane::start_with(Options {
        audit: true,
        controller_manager: true,
    });
    let kc = cp.kubeconfig.display().to_string();
    // every documented variant passes server-side validation
    cp.kubectl(&["create", "namespace", "kloudmeter"]);
    cp.kubectl(&["create", "namespace", "team-a"]);
    cp.kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/crds/"),
    ]);
    let servicemonitor_crd = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: servicemonitors.monitoring.coreos.com}\nspec:\n  group: monitoring.coreos.com\n  names: {kind: ServiceMonitor, plural: servicemonitors}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n";
    assert!(
        cp.kubectl_stdin(&["apply", "-f", "-"], servicemonitor_crd)
            .0
    );
    let prometheusrule_crd = servicemonitor_crd
        .replace("servicemonitors", "prometheusrules")
        .replace("ServiceMonitor", "PrometheusRule");
    assert!(
        cp.kubectl_stdin(&["apply", "-f", "-"], &prometheusrule_crd)
            .0
    );
    cp.wait_established(&[
        "crd/meters.kloudmeter.io",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);
    let variants: &[&[&str]] = &[
        &[],
        &[
            "--set",
            "nats.embedded.enabled=false",
            "--set",
            "nats.url=nats://nats.messaging.svc:4222",
        ],
        &["--set", "watchNamespace=team-a"],
        &["--set", "nats.embedded.cluster.enabled=true"],
        &[
            "--set",
            "nats.embedded.enabled=false",
            "--set",
            "nats.url=nats://a.messaging.svc:4222\\,nats://b.messaging.svc:4222",
            "--set",
            "nats.replicas=3",
        ],
        &["--set", "apiToken.enabled=true"],
        &["--set", "auth.mode=none"],
        &[
            "--set",
            "webhook.url=https://billing.example/hooks",
            "--set",
            "webhook.existingSecret=hook-key",
        ],
        &[
            "--set",
            "tenancy.mode=namespaced",
            "--set",
            "tenancy.crossNamespaces={billing}",
        ],
        &["--set", "auth.mode=token", "--set", "apiToken.enabled=true"],
        &[
            "--set",
            "apiToken.enabled=true",
            "--set",
            "apiToken.existingSecret=my-token",
        ],
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "replicaCount=3",
        ],
        &[
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
        ],
    ];
    for v in variants {
        // --validate renders with the API server's capabilities (e.g. which PDB version)
        let mut args = vec![
            "template",
            "kloudmeter",
            CHART,
            "-n",
            "kloudmeter",
            "--validate",
        ];
        args.extend_from_slice(v);
        let rendered = helm_ok(Some(&cp), &args);
        let (ok, _, err) = cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
        assert!(ok, "{v:?}: {err}");
        // a NATS cluster: every server in NATS_URL, three copies of everything
        if v.iter()
            .any(|a| a.contains("cluster.enabled") || a.contains("replicas"))
        {
            let servers = rendered
                .lines()
                .find(|l| l.contains("name: NATS_URL"))
                .map(|l| l.matches("nats://").count());
            assert_eq!(servers, Some(if v.len() == 2 { 3 } else { 2 }), "{v:?}");
            assert!(
                rendered.contains(r#"{name: NATS_REPLICAS, value: "3"}"#),
                "{v:?}"
            );
        } else {
            assert!(
                rendered.contains(r#"{name: NATS_REPLICAS, value: "1"}"#),
                "{v:?}"
            );
        }
    }

    // install: every object exists
    let notes = helm_ok(
        Some(&cp),
        &[
            "install",
            "kloudmeter",
            CHART,
            "-n",
            "kloudmeter",
            "--wait=false",
        ],
    );
    assert!(
        notes.contains(
            "No PodDisruptionBudget was created: with one replica it would block every node drain."
        ),
        "{notes}"
    );
    for obj in [
        "serviceaccount/kloudmeter",
        "deployment/kloudmeter",
        "service/kloudmeter",
        "statefulset/kloudmeter-nats",
        "service/kloudmeter-nats",
        "role/kloudmeter-local",
        "rolebinding/kloudmeter-local",
        "clusterrole/kloudmeter-meters",
        "clusterrolebinding/kloudmeter-meters",
    ] {
        assert!(
            cp.kubectl_status(&["-n", "kloudmeter", "get", obj]).0,
            "{obj} missing after install"
        );
    }
    assert!(
        !cp.kubectl_status(&["-n", "kloudmeter", "get", "poddisruptionbudget/kloudmeter"])
            .0,
        "one replica: a PodDisruptionBudget would block every node drain"
    );
    let port = cp.jsonpath(
        "kloudmeter",
        "service/kloudmeter",
        "{.spec.ports[0].name}={.spec.ports[0].port}",
    );
    assert_eq!(port, "http=8080");
    let sc = cp.jsonpath(
        "kloudmeter",
        "deployment/kloudmeter",
        "{.spec.template.spec.containers[0].securityContext}",
    );
    let sc: Value = serde_json::from_str(&sc).unwrap();
    assert_eq!(
        (
            sc["readOnlyRootFilesystem"].clone(),
            sc["allowPrivilegeEscalation"].clone(),
            sc["capabilities"]["drop"].clone()
        ),
        (json!(true), json!(false), json!(["ALL"]))
    );
    // the claim index lives on a writable volume, the root filesystem stays read-only
    let data = cp.jsonpath("kloudmeter", "deployment/kloudmeter", "{.spec.template.spec.containers[0].env[?(@.name=='DATA_DIR')].value} {.spec.template.spec.containers[0].volumeMounts[0].mountPath} {.spec.template.spec.volumes[0].emptyDir}");
    assert_eq!(data, "/var/lib/kloudmeter /var/lib/kloudmeter {}");

    // upgrade: more replicas and a generated API token that survives further upgrades
    helm_ok(
        Some(&cp),
        &[
            "upgrade",
            "kloudmeter",
            CHART,
            "-n",
            "kloudmeter",
            "--set",
            "replicaCount=2",
            "--set",
            "apiToken.enabled=true",
        ],
    );
    assert_eq!(
        cp.jsonpath("kloudmeter", "deployment/kloudmeter", "{.spec.replicas}"),
        "2"
    );
    // a disruption budget only once it can be honoured: none with one replica (it
    // would block every drain), minAvailable 1 with two
    assert_eq!(
        cp.jsonpath(
            "kloudmeter",
            "poddisruptionbudget/kloudmeter",
            "{.spec.minAvailable}"
        ),
        "1"
    );
    let token = cp.jsonpath("kloudmeter", "secret/kloudmeter-api-token", "{.data.token}");
    assert_eq!(token.len(), 56);
    helm_ok(
        Some(&cp),
        &[
            "upgrade",
            "kloudmeter",
            CHART,
            "-n",
            "kloudmeter",
            "--set",
            "replicaCount=2",
            "--set",
            "apiToken.enabled=true",
            "--set",
            "config.meterInterval=1",
        ],
    );
    assert_eq!(
        cp.jsonpath("kloudmeter", "secret/kloudmeter-api-token", "{.data.token}"),
        token
    );

    // RBAC proof: the binary out of cluster with exactly the chart's rights
    let sa_token = cp
        .kubectl(&[
            "-n",
            "kloudmeter",
            "create",
            "token",
            "kloudmeter",
            "--duration=1h",
        ])
        .trim()
        .to_string();
    let sa_kc = cp.dir.path().join("sa-kubeconfig");
    let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    std::fs::write(
        &sa_kc,
        admin
            .replace(&cp.token, &sa_token)
            .replace("name: admin", "name: sa")
            .replace("user: admin", "user: sa"),
    )
    .unwrap();
    let nats = Nats::start();
    let sa_kc_s = sa_kc.display().to_string();
    let km = Km::start(
        &nats,
        "rbac",
        &[
            ("KUBERNETES", "true"),
            ("KUBECONFIG", sa_kc_s.as_str()),
            ("POD_NAMESPACE", "kloudmeter"),
            ("METER_INTERVAL", "1"),
            // the chart's default: callers are Kubernetes identities
            ("AUTH_MODE", "kubernetes"),
        ],
    )
    .await;
    // a client workload: may post (the chart's event-writer role) and manage meters in
    // the operator's namespace
    cp.kubectl(&["-n", "kloudmeter", "create", "serviceaccount", "client"]);
    cp.kubectl(&[
        "-n",
        "kloudmeter",
        "create",
        "rolebinding",
        "client-writer",
        "--clusterrole=kloudmeter-event-writer",
        "--serviceaccount=kloudmeter:client",
    ]);
    cp.kubectl(&[
        "-n",
        "kloudmeter",
        "create",
        "role",
        "meter-admin",
        "--verb=create,delete,get",
        "--resource=meters.kloudmeter.io",
    ]);
    cp.kubectl(&[
        "-n",
        "kloudmeter",
        "create",
        "rolebinding",
        "client-meters",
        "--role=meter-admin",
        "--serviceaccount=kloudmeter:client",
    ]);
    let client_token = cp
        .kubectl(&[
            "-n",
            "kloudmeter",
            "create",
            "token",
            "client",
            "--audience",
            "kloudmeter",
        ])
        .trim()
        .to_string();
    let client = reqwest::Client::new();
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], "apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {name: calls, namespace: team-a}\nspec: {eventType: call, aggregation: count}\n").0);
    let r = client
        .post(km.url("/api/v1/events"))
        .bearer_auth(&client_token)
        .json(&json!([{"id": "1", "eventType": "call", "subject": "c"}, {"id": "2", "eventType": "call", "subject": "c"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    wait_for("status written with the chart's rights", T, || async {
        cp.jsonpath("team-a", "meter/calls", "{.status.value}") == "2"
    })
    .await;
    // an invalid meter, reconciled twice: an Event, then a patch of its series
    for desc in ["one", "two"] {
        let m = format!("apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: bad, namespace: team-a}}\nspec: {{eventType: call, aggregation: sum, description: {desc}}}\n");
        assert!(cp.kubectl_stdin(&["apply", "-f", "-"], &m).0);
        wait_for("InvalidSpec", T, || async {
            cp.jsonpath("team-a", "meter/bad", "{.status.observedGeneration}")
                == if desc == "one" { "1" } else { "2" }
        })
        .await;
    }
    // the HTTP API creates and deletes Meters in the operator's namespace
    let r = client
        .post(km.url("/api/v1/meters"))
        .bearer_auth(&client_token)
        .json(&json!({"id": "made", "eventType": "call", "aggregation": "count"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = client
        .delete(km.url("/api/v1/meters/kloudmeter/made"))
        .bearer_auth(&client_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    cp.kubectl(&["delete", "meter", "bad", "-n", "team-a", "--timeout=60s"]);
    let holder = cp.jsonpath(
        "kloudmeter",
        "lease/kloudmeter-leader",
        "{.spec.holderIdentity}",
    );
    assert_eq!(
        holder,
        holder_of(km.pid().unwrap()),
        "the operator holds its Lease"
    );
    // every request the operator made was allowed, and every granted verb was used
    let user = "system:serviceaccount:kloudmeter:kloudmeter";
    let used = requests_of(&cp.audit_log(), user);
    let rendered = helm_ok(None, &["template", "kloudmeter", CHART, "-n", "kloudmeter"]);
    let grants = granted(&rendered);
    let unused: Vec<_> = grants.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "granted but never used: {unused:?}\nused: {used:?}"
    );
    drop(km);

    // uninstall: nothing of the release is left but what is documented to stay
    helm_ok(
        Some(&cp),
        // without the pre-delete hook: no kubelet runs here, so its Job could never run
        // (the real-node test runs it); the by-hand path below is what is left
        &[
            "uninstall",
            "kloudmeter",
            "-n",
            "kloudmeter",
            "--wait",
            "--no-hooks",
        ],
    );
    wait_for("garbage collection", T, || async {
        let left = cp.kubectl(&[
            "-n",
            "kloudmeter",
            "get",
            "all,sa,role,rolebinding,pdb,secret,configmap",
            "-l",
            "app.kubernetes.io/instance=kloudmeter",
            "-o",
            "name",
        ]);
        let pods = cp.kubectl(&["-n", "kloudmeter", "get", "pods,replicasets", "-o", "name"]);
        left.trim().is_empty() && pods.trim().is_empty()
    })
    .await;
    assert!(cp
        .kubectl(&["get", "clusterrole,clusterrolebinding", "-o", "name"])
        .lines()
        .all(|l| !l.contains("kloudmeter")));
    // Meters and the CRD stay (Helm never deletes CRDs); a Meter still carries the
    // finalizer, which is removed by hand once no operator runs (README)
    assert_eq!(
        cp.jsonpath("team-a", "meter/calls", "{.metadata.finalizers}"),
        "[\"kloudmeter.io/cleanup\"]"
    );
    cp.kubectl(&[
        "-n",
        "team-a",
        "patch",
        "meter/calls",
        "--type=merge",
        "-p",
        "{\"metadata\":{\"finalizers\":null}}",
    ]);
    cp.kubectl(&["-n", "team-a", "delete", "meter/calls", "--timeout=30s"]);
    let _ = kc;
}

/// Sample names a `/metrics` exposition can carry, from its `# TYPE` lines (a counter's
/// samples end in `_total`, a histogram's in `_bucket`, `_sum` and `_count`).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Every `kloudmeter_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kloudmeter_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

#[tokio::test]
async fn the_alert_rules_pass_their_tests_and_read_only_metrics_that_exist() {
    let files = format!("{CHART}/files");
    let out = Command::new(tools::promtool())
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // every name the rules and the dashboard query is one /metrics really exposes. Some
    // series exist only while there is something to say: usage once a meter has counted,
    // build progress while a meter builds; so the process gets both, and the names are
    // gathered over the scrapes meanwhile.
    let used: BTreeSet<String> = ["alerts.yaml", "dashboard.json"]
        .iter()
        .flat_map(|f| metric_names(&std::fs::read_to_string(format!("{files}/{f}")).unwrap()))
        .collect();
    assert!(used.len() >= 15, "{used:?}");
    let nats = Nats::start();
    let km = Km::start(&nats, "names", &[]).await;
    let meter = json!({"id": "usage", "eventType": "use", "aggregation": "count", "export": {"topSubjects": 1}});
    assert_eq!(post(&km.url("/api/v1/meters"), &meter).await.0, 201);
    let event = json!({"id": "1", "eventType": "use", "subject": "s"});
    post_until_accepted(&km.url("/api/v1/events"), &event, T).await;
    preload_events(&nats.client().await, "names", "bulk", 100_000).await;
    let bulk = json!({"id": "bulk", "eventType": "bulk", "aggregation": "count"});
    assert_eq!(post(&km.url("/api/v1/meters"), &bulk).await.0, 201);
    let mut exposed = BTreeSet::new();
    let deadline = std::time::Instant::now() + T;
    while !used.is_subset(&exposed) && std::time::Instant::now() < deadline {
        let text = km.metrics_text().await;
        exposed.extend(exposed_names(&text));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<&String> = used.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "the chart uses {missing:?}; /metrics had {exposed:?}"
    );
}
