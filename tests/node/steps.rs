//! The steps one install lives through, in order. Each adds a client's events to the
//! same Meter, so every step checks the whole history: nothing lost, nothing doubled.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::client::{self, Client, NAMESPACE};
use crate::common::chart::{granted, requests_of};
use crate::common::tools::Kubectl;
use crate::node::{wait_for, Node};

const RELEASE: &str = "kloudmeter";
const RELEASE_NS: &str = "kloudmeter";
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kloudmeter");
/// The Service's DNS name, as a workload in another namespace uses it.
const URL: &str = "http://kloudmeter.kloudmeter.svc:8080/api/v1/events";
/// LEADER_TTL after the upgrade step.
const LEADER_TTL: Duration = Duration::from_secs(5);
const OPERATOR: &str = "app.kubernetes.io/component=operator";

pub type Step = fn(&mut State);

pub fn all() -> Vec<(&'static str, Step)> {
    vec![
        (
            "install_serves_a_client_in_another_namespace",
            install_serves_a_client_in_another_namespace,
        ),
        (
            "rolling_upgrade_under_load_loses_and_doubles_nothing",
            rolling_upgrade_under_load_loses_and_doubles_nothing,
        ),
        (
            "leader_pod_deleted_the_lease_moves_within_leader_ttl",
            leader_pod_deleted_the_lease_moves_within_leader_ttl,
        ),
        (
            "nats_pod_deleted_503_then_accepted_and_the_volume_keeps_the_data",
            nats_pod_deleted_503_then_accepted_and_the_volume_keeps_the_data,
        ),
        (
            "the_single_operator_pod_can_be_evicted",
            the_single_operator_pod_can_be_evicted,
        ),
        (
            "the_pods_service_account_uses_exactly_its_grants",
            the_pods_service_account_uses_exactly_its_grants,
        ),
        (
            "uninstall_with_meters_present_leaves_nothing_stuck",
            uninstall_with_meters_present_leaves_nothing_stuck,
        ),
    ]
}

pub struct State<'a> {
    node: &'a Node,
    /// Every client that posted to the Meter `calls`.
    clients: Vec<Client>,
    /// What the note reports.
    figures: Vec<String>,
}

impl<'a> State<'a> {
    pub fn new(node: &'a Node) -> Self {
        State {
            node,
            clients: Vec::new(),
            figures: Vec::new(),
        }
    }

    pub fn report(&self) {
        for f in &self.figures {
            println!("figure: {f}");
        }
    }

    fn figure(&mut self, line: String) {
        println!("  {line}");
        self.figures.push(line);
    }

    /// The Meter `calls` shows, in `kubectl get meters`, the sum and count of every
    /// event every client posted.
    fn meter_is_exact(&self, timeout: Duration) {
        let value: u64 = self.clients.iter().map(Client::sum).sum();
        let events: u64 = self.clients.iter().map(Client::count).sum();
        let want = (value.to_string(), events.to_string());
        wait_for(
            "kubectl get meters showing every event once",
            timeout,
            || {
                let table = self
                    .node
                    .kubectl(&["get", "meters", "-n", NAMESPACE, "--no-headers"]);
                // NAME EVENT-TYPE AGGREGATION VALUE EVENTS READY AGE
                let row: Vec<&str> = table
                    .lines()
                    .find(|l| l.starts_with("calls "))
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect();
                match row.as_slice() {
                    [_, _, _, v, e, ..] if (v.to_string(), e.to_string()) == want => Ok(()),
                    _ => Err(format!(
                        "want VALUE {} EVENTS {}; got {table}",
                        want.0, want.1
                    )),
                }
            },
        );
    }

    /// The operator's pods that run and are not on their way out (a pod being deleted
    /// still shows phase Running until it has stopped).
    fn operator_pods(&self) -> Vec<String> {
        let pods = self.node.kubectl(&[
            "-n",
            RELEASE_NS,
            "get",
            "pods",
            "-l",
            OPERATOR,
            "--field-selector=status.phase=Running",
            "-o",
            "json",
        ]);
        let pods: serde_json::Value = serde_json::from_str(&pods).unwrap();
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn leader(&self) -> String {
        let holder = self.node.try_jsonpath(
            RELEASE_NS,
            "lease/kloudmeter-leader",
            "{.spec.holderIdentity}",
        );
        // `<pod name>-<pid>`
        holder
            .rsplit_once('-')
            .map(|(pod, _)| pod.to_string())
            .unwrap_or_default()
    }

    /// `helm upgrade` to `replicas` operator pods, and wait until that many run.
    fn scale_operator(&self, replicas: usize) {
        self.upgrade(&[&format!("replicaCount={replicas}")]);
        wait_for("the operator pods", Duration::from_secs(60), || {
            let pods = self.operator_pods();
            (pods.len() == replicas)
                .then_some(())
                .ok_or(format!("{pods:?}"))
        });
    }

    /// A client pod posting events `from..=to` to the Meter; kept for the totals.
    fn start_client(&mut self, name: &str, from: u64, to: u64) -> Client {
        let c = client::start(self.node, name, URL, from, to);
        self.clients.push(c.clone());
        c
    }

    fn upgrade(&self, set: &[&str]) {
        let mut args = vec![
            "upgrade",
            RELEASE,
            CHART,
            "-n",
            RELEASE_NS,
            "--reuse-values",
            "--wait",
            "--timeout",
            "5m",
        ];
        for s in set {
            args.extend_from_slice(&["--set", s]);
        }
        self.node.helm_ok(&args);
    }
}

/// Volumes for the NATS servers' claims (no provisioner on this node): hostPath
/// PersistentVolumes in the node's folder, kept (Retain) when released.
fn volumes(node: &Node, n: usize) {
    for i in 0..n {
        let dir = node.dir.join("pv").join(format!("pv-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        // the NATS container runs as 1000; fsGroup does not reach hostPath volumes
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        node.apply(&format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: pv-{i}}}\nspec:\n  capacity: {{storage: 20Gi}}\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: \"\"\n  hostPath: {{path: {}, type: Directory}}\n",
            dir.display()
        ));
    }
}

fn nats_version() -> String {
    let tools = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/tools.sh"))
        .expect(".ci/tools.sh");
    tools
        .lines()
        .find_map(|l| l.strip_prefix("NATS_VERSION="))
        .expect("NATS_VERSION in .ci/tools.sh")
        .trim()
        .to_string()
}

fn install_serves_a_client_in_another_namespace(s: &mut State) {
    let node = s.node;
    volumes(node, 2);
    let t = Instant::now();
    let tag = format!("image.tag={}", env!("CARGO_PKG_VERSION"));
    let nats_tag = format!("nats.embedded.image.tag={}", nats_version());
    // the chart's defaults, but for where the images come from
    node.helm_ok(&[
        "install",
        RELEASE,
        CHART,
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
        "--set",
        "image.repository=localhost/kloudmeter",
        "--set",
        &tag,
        "--set",
        "nats.embedded.image.repository=localhost/nats",
        "--set",
        &nats_tag,
    ]);
    let ready = t.elapsed();
    let pods = node.kubectl(&[
        "-n",
        RELEASE_NS,
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
    ]);
    let ready_pods: Vec<&str> = pods.lines().filter(|l| l.ends_with(" True")).collect();
    assert_eq!(ready_pods.len(), 2, "operator and NATS Ready: {pods}");
    s.figure(format!(
        "helm install to every pod Ready: {:.1} s",
        ready.as_secs_f64()
    ));

    client::setup(node, RELEASE);
    node.apply(&format!(
        "apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: calls, namespace: {NAMESPACE}}}\nspec: {{eventType: {}, aggregation: sum, valueProperty: $.n}}\n",
        client::EVENT_TYPE
    ));
    wait_for("Meter calls Ready", Duration::from_secs(60), || {
        let ready = node.try_jsonpath(
            NAMESPACE,
            "meter/calls",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        );
        (ready == "True").then_some(()).ok_or(ready)
    });
    let c = s.start_client("first", 1, 200);
    let refused = c.finish(node, Duration::from_secs(120));
    assert!(refused.is_empty(), "refused: {refused:?}");
    // statuses are written every METER_INTERVAL (60 s by default)
    s.meter_is_exact(Duration::from_secs(90));
}

fn rolling_upgrade_under_load_loses_and_doubles_nothing(s: &mut State) {
    let node = s.node;
    let before = s.operator_pods();
    let c = s.start_client("during-upgrade", 201, 1700);
    c.wait_sent(node, 400);
    let t = Instant::now();
    // a configuration change rolls the operator pod; faster write-backs and leases for
    // the steps after this one
    s.upgrade(&["config.meterInterval=2s", "config.leaderTtl=5s"]);
    let rolled = t.elapsed();
    let after = s.operator_pods();
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "the operator pod rolled: {before:?} -> {after:?}"
    );
    let refused = c.finish(node, Duration::from_secs(300));
    s.figure(format!(
        "rolling upgrade: {} events posted by a client across the roll (helm upgrade --wait: {:.1} s), {} refusals retried with the same id ({:?})",
        c.count(),
        rolled.as_secs_f64(),
        refused.len(),
        refused.iter().map(|(_, code)| code.as_str()).collect::<BTreeSet<_>>()
    ));
    s.meter_is_exact(Duration::from_secs(60));
    let events: u64 = s.clients.iter().map(Client::count).sum();
    s.figure(format!(
        "after the upgrade: kubectl get meters shows VALUE {} and EVENTS {events}, exactly what was sent",
        s.clients.iter().map(Client::sum).sum::<u64>()
    ));
}

fn leader_pod_deleted_the_lease_moves_within_leader_ttl(s: &mut State) {
    let node = s.node;
    s.scale_operator(2);
    let leader = s.leader();
    assert!(s.operator_pods().contains(&leader), "leader {leader}");
    let c = s.start_client("during-failover", 1701, 2700);
    c.wait_sent(node, 1900);
    let t = Instant::now();
    node.kubectl(&["-n", RELEASE_NS, "delete", "pod", &leader, "--wait=false"]);
    wait_for("the Lease to move", LEADER_TTL * 3, || {
        let now = s.leader();
        (!now.is_empty() && now != leader).then_some(()).ok_or(now)
    });
    let moved = t.elapsed();
    s.figure(format!(
        "leader pod deleted: Lease moved to {} in {:.1} s (LEADER_TTL {} s)",
        s.leader(),
        moved.as_secs_f64(),
        LEADER_TTL.as_secs()
    ));
    assert!(moved <= LEADER_TTL, "the Lease took {moved:?}");
    let refused = c.finish(node, Duration::from_secs(300));
    s.figure(format!(
        "failover: {} events, {} refusals retried",
        c.count(),
        refused.len()
    ));
    s.meter_is_exact(Duration::from_secs(60));
}

fn nats_pod_deleted_503_then_accepted_and_the_volume_keeps_the_data(s: &mut State) {
    let node = s.node;
    let nats = format!("{RELEASE}-nats-0");
    let claim = format!("pvc/data-{nats}");
    let volume = node.try_jsonpath(RELEASE_NS, &claim, "{.spec.volumeName}");
    assert!(!volume.is_empty(), "the NATS claim is bound");
    let c = s.start_client("during-nats-restart", 2701, 3700);
    c.wait_sent(node, 2900);
    let t = Instant::now();
    node.kubectl(&["-n", RELEASE_NS, "delete", "pod", &nats, "--wait=false"]);
    let refused = c.finish(node, Duration::from_secs(300));
    let codes: BTreeSet<&str> = refused.iter().map(|(_, code)| code.as_str()).collect();
    assert!(
        codes.contains("503"),
        "events posted while NATS was away are answered 503: {refused:?}"
    );
    // 503 from the API; nothing else but no answer at all while a pod is unready
    assert!(
        codes.iter().all(|c| ["503", "000"].contains(c)),
        "{refused:?}"
    );
    s.figure(format!(
        "NATS pod deleted: {} of {} events first refused ({codes:?}), all accepted after; the client was done {:.1} s after the deletion",
        refused.len(),
        c.count(),
        t.elapsed().as_secs_f64()
    ));
    assert_eq!(
        node.try_jsonpath(RELEASE_NS, &claim, "{.spec.volumeName}"),
        volume,
        "the rescheduled server has its volume"
    );
    // every earlier event is still counted: the readings came back from the volume
    s.meter_is_exact(Duration::from_secs(60));
}

fn the_single_operator_pod_can_be_evicted(s: &mut State) {
    let node = s.node;
    s.scale_operator(1);
    let before = s.operator_pods();
    let pdbs = node.kubectl(&["-n", RELEASE_NS, "get", "pdb", "-o", "name"]);
    assert!(pdbs.trim().is_empty(), "no budget at one replica: {pdbs}");
    let (ok, out, err) = node.kubectl_status(&[
        "drain",
        "kmnode",
        "--pod-selector",
        OPERATOR,
        "--delete-emptydir-data",
        "--ignore-daemonsets",
        "--timeout=90s",
    ]);
    node.kubectl(&["uncordon", "kmnode"]);
    assert!(ok, "drain: {out}{err}");
    assert!(out.contains("evicted"), "{out}");
    wait_for("a new operator pod", Duration::from_secs(90), || {
        let pods = s.operator_pods();
        let ready = node.try_jsonpath(
            RELEASE_NS,
            &format!("deploy/{RELEASE}"),
            "{.status.readyReplicas}",
        );
        (pods.len() == 1 && pods != before && ready == "1")
            .then_some(())
            .ok_or(format!("{pods:?} ready {ready}"))
    });
}

/// Requests made by a pod running a client script as a ServiceAccount that may define
/// meters (in the release's namespace), so the operator's HTTP meter API uses its grants.
fn define_and_delete_a_meter_over_the_api(node: &Node) {
    node.apply(&format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: meter-admin, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: meter-admin, namespace: {RELEASE_NS}}}
rules: [{{apiGroups: [kloudmeter.io], resources: [meters], verbs: [get, list, create, update, delete]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: meter-admin, namespace: {RELEASE_NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: meter-admin}}
subjects: [{{kind: ServiceAccount, name: meter-admin, namespace: {NAMESPACE}}}]
"#
    ));
    let script = r#"
api=http://kloudmeter.kloudmeter.svc:8080/api/v1/meters
auth="Authorization: Bearer $(cat /var/run/kloudmeter/token)"
made=$(curl -s -o /dev/null -w '%{http_code}' -H "$auth" -H 'Content-Type: application/json' \
  -d '{"id": "walk", "eventType": "walk", "aggregation": "count"}' "$api")
gone=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE -H "$auth" "$api/walk")
echo "made $made gone $gone"
"#;
    client::pod(node, "meter-admin", "meter-admin", script, &[]);
    wait_for("the meter API client", Duration::from_secs(60), || {
        let phase = node.try_jsonpath(NAMESPACE, "pod/meter-admin", "{.status.phase}");
        (phase == "Succeeded").then_some(()).ok_or(phase)
    });
    let out = node.kubectl(&["-n", NAMESPACE, "logs", "meter-admin"]);
    let answers: Vec<&str> = out.split_whitespace().collect();
    match answers.as_slice() {
        ["made", made, "gone", gone] => {
            assert!(made.starts_with('2') && gone.starts_with('2'), "{out}")
        }
        _ => panic!("{out}"),
    }
}

fn the_pods_service_account_uses_exactly_its_grants(s: &mut State) {
    let node = s.node;
    define_and_delete_a_meter_over_the_api(node);
    // an invalid Meter, reconciled twice: an Event, then a patch of its series
    for (generation, desc) in [("1", "one"), ("2", "two")] {
        node.apply(&format!(
            "apiVersion: kloudmeter.io/v1alpha1\nkind: Meter\nmetadata: {{name: bad, namespace: {NAMESPACE}}}\nspec: {{eventType: x, aggregation: sum, description: {desc}}}\n"
        ));
        wait_for("InvalidSpec", Duration::from_secs(60), || {
            let seen = node.try_jsonpath(NAMESPACE, "meter/bad", "{.status.observedGeneration}");
            (seen == generation).then_some(()).ok_or(seen)
        });
    }
    let user = format!("system:serviceaccount:{RELEASE_NS}:{RELEASE}");
    let rendered = node.helm_ok(&["get", "manifest", RELEASE, "-n", RELEASE_NS]);
    let grants = granted(&rendered);
    let audit = node.dir.join("logs/audit.log");
    wait_for(
        "every grant used by the operator pod's ServiceAccount",
        Duration::from_secs(60),
        || {
            let log = std::fs::read_to_string(&audit).unwrap_or_default();
            // fails on any request the API server refused as forbidden
            let used = requests_of(&log, &user);
            let unused: Vec<_> = grants.difference(&used).collect();
            let beyond: Vec<_> = used.difference(&grants).collect();
            assert!(
                beyond.is_empty(),
                "used beyond the chart's grants: {beyond:?}"
            );
            unused
                .is_empty()
                .then_some(())
                .ok_or(format!("granted, not yet used: {unused:?}"))
        },
    );
}

fn uninstall_with_meters_present_leaves_nothing_stuck(s: &mut State) {
    let node = s.node;
    let meters = node.kubectl(&["get", "meters", "-A", "-o", "name"]);
    assert!(meters.contains("meter.kloudmeter.io/calls"), "{meters}");
    let t = Instant::now();
    node.helm_ok(&[
        "uninstall",
        RELEASE,
        "-n",
        RELEASE_NS,
        "--wait",
        "--timeout",
        "5m",
    ]);
    s.figure(format!(
        "helm uninstall with {} Meters present: {:.1} s",
        meters.lines().count(),
        t.elapsed().as_secs_f64()
    ));
    // the pre-delete hook deleted them and the operator cleaned each up before it went
    let left = node.kubectl(&["get", "meters", "-A", "-o", "name"]);
    assert!(left.trim().is_empty(), "Meters left: {left}");
    let (ok, _, err) = node.kubectl_status(&["delete", "namespace", NAMESPACE, "--timeout=60s"]);
    assert!(ok, "the workloads' namespace goes: {err}");
    wait_for(
        "the release's objects gone",
        Duration::from_secs(90),
        || {
            let objects = node.kubectl(&[
                "-n",
                RELEASE_NS,
                "get",
                "all,sa,role,rolebinding,pdb,secret,configmap,jobs",
                "-l",
                &format!("app.kubernetes.io/instance={RELEASE}"),
                "-o",
                "name",
            ]);
            let cluster = node.kubectl(&["get", "clusterrole,clusterrolebinding", "-o", "name"]);
            let ours: Vec<&str> = cluster.lines().filter(|l| l.contains(RELEASE)).collect();
            (objects.trim().is_empty() && ours.is_empty())
                .then_some(())
                .ok_or(format!("{objects}{ours:?}"))
        },
    );
    // what stays on purpose: the NATS volume's claim
    let claims = node.kubectl(&["-n", RELEASE_NS, "get", "pvc", "-o", "name"]);
    assert_eq!(
        claims.trim(),
        format!("persistentvolumeclaim/data-{RELEASE}-nats-0")
    );
}
