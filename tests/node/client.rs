//! Client pods: a workload in another namespace posting usage events to the Service's
//! DNS name with its projected ServiceAccount token, as users' services do. Each event is
//! retried with the same id until it is accepted, so the totals must come out exact
//! whatever happens to the operator or NATS meanwhile.

use std::time::Duration;

use crate::common::tools::Kubectl;
use crate::node::{wait_for, Node};

/// The workloads' namespace and ServiceAccount.
pub const NAMESPACE: &str = "team-a";
pub const ACCOUNT: &str = "app";
pub const EVENT_TYPE: &str = "api.calls";

/// Posts events `from..=to` (id `<name>-<i>`, value `i`, five subjects); prints
/// `sent <i>` every 100, `retry <id> <status>` for each refusal (000: no answer), and
/// `done` at the end.
const SCRIPT: &str = r#"
i=$FROM
while [ "$i" -le "$TO" ]; do
  tries=0
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 \
      -H "Authorization: Bearer $(cat /var/run/kloudmeter/token)" \
      -H 'Content-Type: application/json' \
      -d "{\"id\":\"$NAME-$i\",\"eventType\":\"$EVENT_TYPE\",\"subject\":\"customer-$((i % 5))\",\"data\":{\"n\":$i}}" \
      "$URL")
    case "$code" in 2??) break ;; esac
    echo "retry $NAME-$i $code"
    tries=$((tries + 1))
    if [ "$tries" -ge 900 ]; then echo "gave up on $NAME-$i"; exit 1; fi
    sleep 0.2
  done
  if [ $((i % 100)) -eq 0 ]; then echo "sent $i"; fi
  i=$((i + 1))
done
echo done
"#;

/// The namespace, its ServiceAccount and the binding to the chart's event-writer role.
pub fn setup(node: &Node, release: &str) {
    node.apply(&format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {ACCOUNT}, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {ACCOUNT}-writes-events, namespace: {NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {release}-event-writer}}
subjects: [{{kind: ServiceAccount, name: {ACCOUNT}, namespace: {NAMESPACE}}}]
"#
    ));
}

/// A pod that runs `script` with sh and curl, its token for the audience `kloudmeter` at
/// /var/run/kloudmeter/token, and `env`.
pub fn pod(node: &Node, name: &str, account: &str, script: &str, env: &[(&str, String)]) {
    let env: String = env
        .iter()
        .map(|(k, v)| format!("\n        - {{name: {k}, value: {v:?}}}"))
        .collect();
    node.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  serviceAccountName: {account}
  restartPolicy: Never
  securityContext: {{runAsNonRoot: true, runAsUser: 65532}}
  containers:
    - name: client
      image: localhost/km-client:1
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", {script:?}]
      env:{env}
      volumeMounts: [{{name: token, mountPath: /var/run/kloudmeter}}]
  volumes:
    - name: token
      projected:
        sources: [{{serviceAccountToken: {{audience: kloudmeter, path: token, expirationSeconds: 3600}}}}]
"#
    ));
}

/// A posting client for ids `from..=to` against `url`.
pub fn start(node: &Node, name: &str, url: &str, from: u64, to: u64) -> Client {
    pod(
        node,
        name,
        ACCOUNT,
        SCRIPT,
        &[
            ("NAME", name.to_string()),
            ("FROM", from.to_string()),
            ("TO", to.to_string()),
            ("URL", url.to_string()),
            ("EVENT_TYPE", EVENT_TYPE.to_string()),
        ],
    );
    Client {
        name: name.to_string(),
        from,
        to,
    }
}

#[derive(Clone)]
pub struct Client {
    pub name: String,
    pub from: u64,
    pub to: u64,
}

impl Client {
    pub fn log(&self, node: &Node) -> String {
        node.kubectl_status(&["-n", NAMESPACE, "logs", &self.name])
            .1
    }

    /// Until the client has sent event `i`.
    pub fn wait_sent(&self, node: &Node, i: u64) {
        wait_for(
            &format!("{} sending {i}", self.name),
            Duration::from_secs(120),
            || {
                let log = self.log(node);
                let sent = log
                    .lines()
                    .filter_map(|l| l.strip_prefix("sent ")?.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0);
                if sent >= i || log.contains("done") {
                    Ok(())
                } else {
                    Err(format!("sent {sent}; {}", last_lines(&log)))
                }
            },
        );
    }

    /// Until the client has posted everything; its refusals as (id, status).
    pub fn finish(&self, node: &Node, timeout: Duration) -> Vec<(String, String)> {
        wait_for(&format!("{} finishing", self.name), timeout, || {
            let phase =
                node.try_jsonpath(NAMESPACE, &format!("pod/{}", self.name), "{.status.phase}");
            match phase.as_str() {
                "Succeeded" => Ok(()),
                "Failed" => panic!("{} failed: {}", self.name, self.log(node)),
                _ => Err(format!("{phase}; {}", last_lines(&self.log(node)))),
            }
        });
        let log = self.log(node);
        assert!(log.trim_end().ends_with("done"), "{log}");
        log.lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("retry ")?.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect()
    }

    /// The sum of the values it posts.
    pub fn sum(&self) -> u64 {
        (self.from + self.to) * (self.to - self.from + 1) / 2
    }

    pub fn count(&self) -> u64 {
        self.to - self.from + 1
    }
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
