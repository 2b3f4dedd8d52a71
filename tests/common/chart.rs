//! What the rendered chart says, for tests that hold the running operator to it.

use std::collections::BTreeSet;

use serde_json::{json, Value};

/// (apiGroup, resource, verb) triples the rendered chart grants the operator.
pub fn granted(rendered: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for doc in rendered.split("\n---") {
        let Ok(v) = serde_yaml::from_str::<Value>(doc) else {
            continue;
        };
        if !matches!(v["kind"].as_str(), Some("Role") | Some("ClusterRole")) {
            continue;
        }
        // roles the chart offers users to bind are not the operator's rights, nor are
        // the uninstall hook's (its own ServiceAccount, only while `helm uninstall` runs)
        if v["metadata"]["labels"]["kloudmeter.io/role-for"] == json!("users")
            || v["metadata"]["annotations"]["helm.sh/hook"].is_string()
        {
            continue;
        }
        for rule in v["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        let (g, r, verb) = (
                            g.as_str().unwrap(),
                            r.as_str().unwrap(),
                            verb.as_str().unwrap(),
                        );
                        assert!(g != "*" && r != "*" && verb != "*", "wildcard in {doc}");
                        out.insert((g.to_string(), r.to_string(), verb.to_string()));
                    }
                }
            }
        }
    }
    out
}

/// (apiGroup, resource[/subresource], verb) of every request `user` made, from an API
/// server's audit log (JSON lines); fails on any request that was forbidden.
pub fn requests_of(audit_log: &str, user: &str) -> BTreeSet<(String, String, String)> {
    let mut used = BTreeSet::new();
    for line in audit_log.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        // every stage counts: a long-running watch completes only when it ends
        if e["user"]["username"] != json!(user) {
            continue;
        }
        let code = e["responseStatus"]["code"].as_i64().unwrap_or(0);
        assert_ne!(code, 403, "forbidden: {line}");
        let r = &e["objectRef"];
        let resource = match r["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", r["resource"].as_str().unwrap_or("")),
            None => r["resource"].as_str().unwrap_or("").to_string(),
        };
        used.insert((
            r["apiGroup"].as_str().unwrap_or("").to_string(),
            resource,
            e["verb"].as_str().unwrap().to_string(),
        ));
    }
    used
}
