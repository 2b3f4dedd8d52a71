//! The one place tests find the programs they run: a variable naming the program
//! (NATS_SERVER_BIN, HELM_BIN, KUBECTL_BIN, KUBEBUILDER_ASSETS), else the tool cache
//! that `.ci/tools.sh` and `.ci/kube-assets.sh` fill (`KLOUDMETER_CACHE`, default
//! `~/.cache/kloudmeter`, as in `.ci/env.sh`), else PATH. A missing tool is a failure,
//! never a skip.

use std::path::{Path, PathBuf};

/// The tool cache, resolved as `.ci/env.sh` resolves it.
pub fn cache_dir() -> PathBuf {
    match std::env::var("KLOUDMETER_CACHE") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/kloudmeter"),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|cand| cand.is_file())
}

/// `name` from `$var`, else `<cache>/<in_cache>/<name>`, else PATH; panics naming how to
/// install it.
pub fn tool(name: &str, var: &str, in_cache: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let cached = cache_dir().join(in_cache).join(name);
    if cached.is_file() {
        return cached;
    }
    on_path(name).unwrap_or_else(|| {
        panic!(
            "{name} not found in {} nor on PATH (CI={}): `task test` installs every tool first (.ci/tools.sh, .ci/cel-assets.sh), or set {var}",
            cached.display(),
            std::env::var("CI").unwrap_or_default()
        )
    })
}

pub fn nats_server() -> PathBuf {
    tool("nats-server", "NATS_SERVER_BIN", "venv/bin")
}

pub fn helm() -> PathBuf {
    tool("helm", "HELM_BIN", "bin")
}

pub fn kubectl() -> PathBuf {
    tool("kubectl", "KUBECTL_BIN", "bin")
}

/// promtool, from Debian's `prometheus` package (`.ci/tools.sh`).
pub fn promtool() -> PathBuf {
    tool("promtool", "PROMTOOL_BIN", "bin")
}

/// kubectl against `kubeconfig` with `input` on stdin: (success, stdout, stderr).
pub fn kubectl_with(kubeconfig: &Path, args: &[&str], input: &str) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// kubectl against one API server, named by its kubeconfig: the test control plane and
/// the real node are driven the same way.
pub trait Kubectl {
    fn kubeconfig(&self) -> &Path;

    /// kubectl with `input` on stdin: (success, stdout, stderr).
    fn kubectl_stdin(&self, args: &[&str], input: &str) -> (bool, String, String) {
        kubectl_with(self.kubeconfig(), args, input)
    }

    /// kubectl: (success, stdout, stderr).
    fn kubectl_status(&self, args: &[&str]) -> (bool, String, String) {
        self.kubectl_stdin(args, "")
    }

    /// kubectl; returns stdout, panics with stderr on failure.
    fn kubectl(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl_status(args);
        assert!(ok, "kubectl {args:?}: {err}");
        out
    }

    /// One field of one object, empty while it does not exist (for polling).
    fn try_jsonpath(&self, namespace: &str, object: &str, path: &str) -> String {
        let path = format!("jsonpath={path}");
        self.kubectl_status(&["-n", namespace, "get", object, "-o", &path])
            .1
    }
}

/// schemathesis' command line.
pub fn schemathesis() -> PathBuf {
    tool("st", "SCHEMATHESIS_BIN", "venv/bin")
}

/// The cache's Python, which has `jsonschema` (schemathesis brings it).
pub fn python() -> PathBuf {
    tool("python3", "KLOUDMETER_PYTHON", "venv/bin")
}

/// A folder holding etcd and kube-apiserver (and kube-controller-manager), as envtest's
/// KUBEBUILDER_ASSETS.
pub fn kube_assets() -> PathBuf {
    let dir = match std::env::var("KUBEBUILDER_ASSETS") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => cache_dir().join("kube"),
    };
    for bin in ["etcd", "kube-apiserver"] {
        assert!(
            dir.join(bin).is_file(),
            "{} missing (CI={}): run `bash .ci/kube-assets.sh` (task test does) or set KUBEBUILDER_ASSETS to a folder with etcd and kube-apiserver",
            dir.join(bin).display(),
            std::env::var("CI").unwrap_or_default()
        );
    }
    dir
}

/// apiextensions-apiserver v1.36, the CRD server that enforces CEL rules
/// (`.ci/cel-assets.sh` builds it into the cache; CEL_APISERVER_BIN names another).
pub fn cel_apiserver() -> PathBuf {
    tool("apiextensions-apiserver", "CEL_APISERVER_BIN", "cel")
}
