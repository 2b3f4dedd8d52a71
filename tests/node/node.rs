//! The node: started by `.ci/node.sh up`, stopped by `.ci/node.sh down` on drop; kubectl
//! and helm pointed at it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::tools::{self, Kubectl};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub struct Node {
    pub kubeconfig: PathBuf,
    /// The node's state folder (volumes, logs, the API server's audit log).
    pub dir: PathBuf,
}

fn script(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("bash");
    // without the variables cargo sets for a test (CARGO_PKG_*, CARGO_MANIFEST_DIR, ...):
    // build scripts that watch them would make the image's release build start over
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.arg(format!("{REPO}/.ci/node.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!(".ci/node.sh {args:?}: {e}"))
}

impl Node {
    /// A node from nothing: one left running (a run killed before its end, or
    /// KM_NODE_KEEP=1) is stopped first, so every run starts from the same state.
    pub fn up() -> Node {
        let t = Instant::now();
        assert!(
            script(&["down"]).status.success(),
            ".ci/node.sh down failed"
        );
        let out = script(&["up"]);
        assert!(
            out.status.success(),
            ".ci/node.sh up failed (CI={}): see above",
            std::env::var("CI").unwrap_or_default()
        );
        println!("node up in {:.1} s", t.elapsed().as_secs_f64());
        let env = String::from_utf8(script(&["env"]).stdout).unwrap();
        let var = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in `node.sh env`: {env}"))
                .to_string()
        };
        Node {
            kubeconfig: PathBuf::from(var("KUBECONFIG")),
            dir: PathBuf::from(var("NODE_DIR")),
        }
    }

    /// `kubectl apply -f -`; panics on failure.
    pub fn apply(&self, manifest: &str) {
        let (ok, _, err) = self.kubectl_stdin(&["apply", "-f", "-"], manifest);
        assert!(ok, "kubectl apply: {err}\n{manifest}");
    }

    pub fn helm(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(tools::helm())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env(
                "HELM_CACHE_HOME",
                std::env::temp_dir().join("km-helm-cache"),
            )
            .output()
            .expect("running helm");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    pub fn helm_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.helm(args);
        assert!(ok, "helm {args:?}: {out}{err}");
        out
    }
}

impl Kubectl for Node {
    fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::env::var("KM_NODE_KEEP").is_ok_and(|v| v == "1") {
            println!("KM_NODE_KEEP=1: the node keeps running (.ci/node.sh down stops it)");
            return;
        }
        let out = script(&["down"]);
        if !out.status.success() {
            eprintln!(".ci/node.sh down failed");
        }
    }
}

/// Poll `check` until it holds or `timeout` passes; panics naming `what`, with what the
/// last look saw.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}
