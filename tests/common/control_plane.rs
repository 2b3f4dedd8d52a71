//! A real Kubernetes control plane on loopback: etcd and kube-apiserver from
//! KUBEBUILDER_ASSETS (as envtest does), else from the cache `.ci/kube-assets.sh`
//! fills. TLS with a CA made per run, a static admin token, random ports, a temp dir;
//! both processes are stopped by PID on drop. A missing control plane is a failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::tools::Kubectl;

pub fn assets_dir() -> PathBuf {
    super::tools::kube_assets()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub kubeconfig: PathBuf,
    pub token: String,
    /// The etcd the API server stores in (other servers may share it under their own
    /// prefix).
    pub etcd_url: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
}

/// Extras some tests need.
#[derive(Default)]
pub struct Options {
    /// Log every request (Metadata level) to `audit.log` in the temp dir.
    pub audit: bool,
    /// Run kube-controller-manager too (garbage collection, ServiceAccount tokens,
    /// ReplicaSets); no kubelet runs, so Pods stay Pending.
    pub controller_manager: bool,
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        Self::start_with(Options::default())
    }

    /// [`Self::start`], with the project's CRDs installed and established.
    pub fn with_crds() -> ControlPlane {
        let cp = Self::start();
        cp.kubectl(&[
            "apply",
            "--validate=false",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/crds/"),
        ]);
        cp.wait_established(&["crd/meters.kloudmeter.io"]);
        cp
    }

    /// Wait (up to a minute) until every named CRD is established.
    pub fn wait_established(&self, crds: &[&str]) {
        let mut args = vec!["wait", "--for", "condition=established", "--timeout=60s"];
        args.extend_from_slice(crds);
        self.kubectl(&args);
    }

    /// The environment of a kloudmeter process that operates this control plane from
    /// the namespace `kloudmeter`, plus `extra`.
    pub fn operator_env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let kubeconfig = self.kubeconfig.to_str().expect("a UTF-8 temporary path");
        let mut env = vec![
            ("KUBERNETES", "true"),
            ("KUBECONFIG", kubeconfig),
            ("POD_NAMESPACE", "kloudmeter"),
        ];
        env.extend_from_slice(extra);
        env
    }

    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    pub fn start_with(opts: Options) -> ControlPlane {
        let assets = assets_dir();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ossl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(d));
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=kloudmeter-test-ca",
        ]);
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        ]);
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        ossl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        ossl(&["genrsa", "-out", "sa.key", "2048"]);
        ossl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        let token = "kloudmeter-test-admin-token".to_string();
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();

        let (etcd_port, peer_port, port) = (free_port(), free_port(), free_port());
        let etcd = Command::new(assets.join("etcd"))
            .args(["--data-dir", &d.join("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).unwrap())
            .spawn()
            .expect("starting etcd");
        let path = |f: &str| d.join(f).display().to_string();
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n",
        )
        .unwrap();
        let mut apiserver = Command::new(assets.join("kube-apiserver"));
        if opts.audit {
            apiserver.args([
                "--audit-policy-file",
                &path("audit-policy.yaml"),
                "--audit-log-path",
                &path("audit.log"),
            ]);
        }
        let apiserver = apiserver
            .args(["--etcd-servers", &format!("http://127.0.0.1:{etcd_port}")])
            .args([
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
            ])
            .args(["--secure-port", &port.to_string()])
            .args([
                "--tls-cert-file",
                &path("server.crt"),
                "--tls-private-key-file",
                &path("server.key"),
            ])
            .args(["--client-ca-file", &path("ca.crt")])
            .args(["--token-auth-file", &path("tokens.csv")])
            .args(["--authorization-mode", "RBAC"])
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args([
                "--service-account-key-file",
                &path("sa.pub"),
                "--service-account-signing-key-file",
                &path("sa.key"),
            ])
            .args(["--service-cluster-ip-range", "10.96.0.0/24"])
            .args(["--cert-dir", &path("certs")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log")).unwrap())
            .spawn()
            .expect("starting kube-apiserver");
        let ca = std::fs::read(d.join("ca.crt")).unwrap();
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n",
                base64_encode(&ca)
            ),
        )
        .unwrap();
        let mut cp = ControlPlane {
            dir,
            port,
            kubeconfig,
            token,
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            etcd: Some(etcd),
            apiserver: Some(apiserver),
            controller_manager: None,
        };
        cp.wait_ready(Duration::from_secs(60));
        if opts.controller_manager {
            let bin = assets.join("kube-controller-manager");
            assert!(
                bin.is_file(),
                "{} missing: run `bash .ci/kube-assets.sh`",
                bin.display()
            );
            let d = cp.dir.path();
            let cm = Command::new(bin)
                .args(["--kubeconfig", &cp.kubeconfig.display().to_string()])
                .args([
                    "--service-account-private-key-file",
                    &d.join("sa.key").display().to_string(),
                ])
                .args(["--root-ca-file", &d.join("ca.crt").display().to_string()])
                .args([
                    "--leader-elect=false",
                    "--port=0",
                    "--secure-port=0",
                    "--use-service-account-credentials=false",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("controller-manager.log")).unwrap())
                .spawn()
                .expect("starting kube-controller-manager");
            cp.controller_manager = Some(cm);
        }
        cp
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "--cacert",
                    &self.dir.path().join("ca.crt").display().to_string(),
                ])
                .args(["-H", &format!("Authorization: Bearer {}", self.token)])
                .arg(format!("https://127.0.0.1:{}/readyz", self.port))
                .output()
                .unwrap();
            if out.stdout == b"ok" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                std::fs::read_to_string(self.dir.path().join("apiserver.log"))
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    /// One field of one object: `kubectl -n <namespace> get <object> -o jsonpath=<path>`.
    pub fn jsonpath(&self, namespace: &str, object: &str, path: &str) -> String {
        self.kubectl(&[
            "-n",
            namespace,
            "get",
            object,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }
}

impl Kubectl for ControlPlane {
    fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in [
            self.controller_manager.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
