#!/usr/bin/env bash
# A real one-node Kubernetes (v1.20.2) on this machine, offline, for the chart's tests and
# for trying KloudMeter without a cluster:
#   node.sh up        start it (idempotent): prints the kubeconfig's path on its last line
#   node.sh down      stop everything it started, by PID, and remove its state (idempotent)
#   node.sh try       up, then KloudMeter installed by its chart (what `task cluster:up` runs)
#   node.sh images    (re)build the images and load them into a running node
#   node.sh env       the variables a client needs (KUBECONFIG, NODE_NETNS, NODE_DIR)
# Parts: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
# kube-proxy (.ci/kube-assets.sh node: built from Debian's source, or KUBEBUILDER_ASSETS),
# Debian's containerd 1.6 and runc, the bridge CNI plugins, dnsmasq answering for
# cluster.local, and images made locally (.ci/node-images.sh). Everything network-facing
# lives in the network namespace `kmnode`, which holds only `lo` and a veth pair whose both
# ends are inside: nothing in it reaches or is reached from outside. The API server is
# relayed to 127.0.0.1:$NODE_API_PORT (default 16443) through a unix socket; pods and
# Services are reached with `nsenter --net=/run/netns/kmnode`.
# State (certificates, etcd, containerd, kubelet, logs, volumes) lives in
# $KLOUDMETER_CACHE/node/run and is removed by `down`; kubelet's fixed /var/log/pods and
# /var/log/containers are bind mounts from it while the node runs.
# Needs root (network namespace, mounts, containerd); installs Debian's containerd, runc,
# containernetworking-plugins, dnsmasq-base, socat, conntrack and iptables when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/env.sh
NS=kmnode
NETNS=/run/netns/$NS
BASE="$KLOUDMETER_CACHE/node"
RUN="$BASE/run"
API_PORT="${NODE_API_PORT:-16443}"
NODE_IP=10.77.0.2
GW_IP=10.77.0.1
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/24
DNS_IP=$NODE_IP
log() { echo "node: $*" >&2; }
in_ns() { nsenter --net="$NETNS" "$@"; }

# start <name> <command>...: a daemon in the namespace, its PID in $RUN/pids/<name>
start() {
  local name=$1; shift
  mkdir -p "$RUN/pids" "$RUN/logs"
  if [ -f "$RUN/pids/$name" ] && kill -0 "$(cat "$RUN/pids/$name")" 2>/dev/null; then return; fi
  setsid nsenter --net="$NETNS" "$@" >"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/pids/$name"
}

# wait_for <what> <seconds> <command>...: until the command succeeds, else show the log
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "$what did not come up in ${secs}s; the end of its log:"
      tail -20 "$RUN/logs/$what.log" >&2 || true
      exit 1
    fi
    sleep 0.3
  done
}

packages() {
  local missing="" p
  for p in containerd runc containernetworking-plugins dnsmasq-base socat conntrack iptables iproute2 curl; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    log "installing Debian packages (system-wide, with apt-get):$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
}

certs() {
  local d="$RUN/pki"
  [ -f "$d/server.crt" ] && return
  mkdir -p "$d"
  (cd "$d"
   openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=kmnode-ca 2>/dev/null
   openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=kube-apiserver 2>/dev/null
   printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' "$NODE_IP" >san.ext
   openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 30 -extfile san.ext 2>/dev/null
   openssl genrsa -out sa.key 2048 2>/dev/null
   openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
   # one administrator token for the node's own components and for the tests
   head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >admin.token
   printf '%s,admin,admin,"system:masters"\n' "$(cat admin.token)" >tokens.csv)
}

kubeconfig() { # <file> <server>
  local ca
  ca=$(base64 -w0 <"$RUN/pki/ca.crt")
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kmnode
  cluster: {server: "$2", certificate-authority-data: $ca}
users:
- name: admin
  user: {token: $(cat "$RUN/pki/admin.token")}
contexts:
- name: kmnode
  context: {cluster: kmnode, user: admin, namespace: default}
current-context: kmnode
EOF
}

network() {
  if [ ! -e "$NETNS" ]; then
    mountpoint -q /run/netns || touch "$RUN/.made-run-netns"
    ip netns add "$NS"
  fi
  if ! ip -n "$NS" link show kmn0 >/dev/null 2>&1; then
    ip -n "$NS" link add kmn0 type veth peer name kmn1
    ip -n "$NS" addr add "$NODE_IP/24" dev kmn0
    ip -n "$NS" addr add "$GW_IP/24" dev kmn1
    ip -n "$NS" link set lo up
    ip -n "$NS" link set kmn0 up
    ip -n "$NS" link set kmn1 up
    # a default route (kubelet and kube-proxy look for one) that leads nowhere outside
    ip -n "$NS" route add default via "$GW_IP" dev kmn0
  fi
  in_ns sysctl -qw net.ipv4.ip_forward=1
  in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
}

config_files() {
  mkdir -p "$RUN/cni" "$RUN/dns" "$RUN/containerd" "$RUN/kubelet" "$RUN/log/pods" "$RUN/log/containers" "$RUN/pv"
  cat >"$RUN/cni/10-kmnode.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "kmnode", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$RUN/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  cat >"$RUN/containerd/config.toml" <<EOF
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$RUN/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:km"
  # this VM withholds CAP_SYS_RESOURCE: the pause container's oom_score_adj of -998 is refused
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    # runc's state under the run folder, not /run/containerd/runc
    Root = "$RUN/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
EOF
  cat >"$RUN/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
address: $NODE_IP
readOnlyPort: 0
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
staticPodPath: ""
EOF
  printf 'apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n' >"$RUN/audit-policy.yaml"
}

# kubelet writes to these fixed paths: bind them to the run folder while the node runs
log_mounts() {
  local d
  for d in pods containers; do
    if ! mountpoint -q "/var/log/$d"; then
      if [ ! -d "/var/log/$d" ]; then mkdir -p "/var/log/$d"; touch "$RUN/log/.made-$d"; fi
      mount --bind "$RUN/log/$d" "/var/log/$d"
    fi
  done
}

# Service and pod names for dnsmasq (authoritative for cluster.local, no upstream): a hosts
# file rewritten from the API every second; dnsmasq rereads its hostsdir by itself.
dns_names() {
  cat >"$RUN/dns/names.py" <<'EOF'
# Services as hosts-file lines: a ClusterIP Service's name to its IP; a headless one's to
# its endpoints, and each named endpoint (a StatefulSet's pod) by its own name.
import json, sys
items = json.load(sys.stdin)["items"]
headless = set()
lines = []
for it in items:
    if it["kind"] != "Service":
        continue
    ns, name = it["metadata"]["namespace"], it["metadata"]["name"]
    ip = it["spec"].get("clusterIP")
    if ip == "None":
        headless.add((ns, name))
    elif ip:
        lines.append(ip + " " + name + "." + ns + ".svc.cluster.local")
for it in items:
    if it["kind"] != "Endpoints":
        continue
    ns, name = it["metadata"]["namespace"], it["metadata"]["name"]
    svc = name + "." + ns + ".svc.cluster.local"
    for subset in it.get("subsets") or []:
        for a in (subset.get("addresses") or []) + (subset.get("notReadyAddresses") or []):
            if a.get("hostname"):
                lines.append(a["ip"] + " " + a["hostname"] + "." + svc)
            if (ns, name) in headless:
                lines.append(a["ip"] + " " + svc)
print("\n".join(lines))
EOF
  cat >"$RUN/dns/names.sh" <<'EOF'
#!/bin/sh
# <kubectl> <kubeconfig> <hosts dir>: rewritten every second, whole or not at all
while :; do
  if "$1" --kubeconfig "$2" get services,endpoints -A -o json 2>/dev/null |
      python3 "$(dirname "$0")/names.py" >"$3/.names"; then
    mv "$3/.names" "$3/names"
  fi
  sleep 1
done
EOF
  chmod +x "$RUN/dns/names.sh"
  mkdir -p "$RUN/dns/hosts"
}

up() {
  packages
  ASSETS=$(bash .ci/kube-assets.sh node | tail -1)
  IMAGES=$(bash .ci/node-images.sh | tail -1)
  bash .ci/tools.sh >/dev/null
  mkdir -p "$RUN"
  # the pods' network namespaces containerd makes (/run/netns/cni-*) that are not ours
  # already, for `down` to remove what it made
  [ -f "$RUN/netns.before" ] || { ip netns list | awk '{print $1}' | grep '^cni-' >"$RUN/netns.before" || true; }
  # folders kubelet, containerd and the CNI plugins use at fixed paths: `down` removes
  # those this node made
  local fixed
  mkdir -p "$RUN/made"
  for fixed in /run/containerd /var/lib/cni /var/lib/kubelet; do
    [ -e "$fixed" ] || [ -f "$RUN/made/${fixed//\//_}" ] || echo "$fixed" >"$RUN/made/${fixed//\//_}"
  done
  certs
  network
  config_files
  log_mounts
  dns_names
  kubeconfig "$RUN/kubeconfig.node" "https://$NODE_IP:6443"
  kubeconfig "$RUN/kubeconfig" "https://127.0.0.1:$API_PORT"
  local t0
  t0=$(date +%s)
  start etcd "$ASSETS/etcd" --data-dir "$RUN/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
  start containerd containerd --config "$RUN/containerd/config.toml"
  start kube-apiserver "$ASSETS/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --bind-address 0.0.0.0 --advertise-address "$NODE_IP" --secure-port 6443 \
    --tls-cert-file "$RUN/pki/server.crt" --tls-private-key-file "$RUN/pki/server.key" \
    --client-ca-file "$RUN/pki/ca.crt" --token-auth-file "$RUN/pki/tokens.csv" \
    --authorization-mode Node,RBAC --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$RUN/pki/sa.pub" --service-account-signing-key-file "$RUN/pki/sa.key" \
    --audit-policy-file "$RUN/audit-policy.yaml" --audit-log-path "$RUN/logs/audit.log" \
    --cert-dir "$RUN/pki/apiserver" --allow-privileged=true --kubelet-preferred-address-types InternalIP
  # the relay: a unix socket inside the namespace, 127.0.0.1:$API_PORT outside it
  start api-socket socat "UNIX-LISTEN:$RUN/api.sock,fork,unlink-early" "TCP:$NODE_IP:6443"
  if ! { [ -f "$RUN/pids/api-relay" ] && kill -0 "$(cat "$RUN/pids/api-relay")" 2>/dev/null; }; then
    setsid socat "TCP-LISTEN:$API_PORT,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$RUN/api.sock" \
      >"$RUN/logs/api-relay.log" 2>&1 </dev/null &
    echo $! >"$RUN/pids/api-relay"
  fi
  wait_for kube-apiserver 90 curl -sf --cacert "$RUN/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$RUN/pki/admin.token")" "https://127.0.0.1:$API_PORT/readyz"
  start kube-controller-manager "$ASSETS/kube-controller-manager" --kubeconfig "$RUN/kubeconfig.node" \
    --service-account-private-key-file "$RUN/pki/sa.key" --root-ca-file "$RUN/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --port=0 --secure-port=0 \
    --controllers='*,-nodeipam'
  start kube-scheduler "$ASSETS/kube-scheduler" --kubeconfig "$RUN/kubeconfig.node" \
    --leader-elect=false --port=0 --secure-port=0
  wait_for containerd 30 ctr --address "$RUN/containerd/containerd.sock" version
  local img
  for img in "$IMAGES"/*.tar; do
    ctr --address "$RUN/containerd/containerd.sock" -n k8s.io images import --no-unpack=false "$img" >/dev/null
  done
  start kubelet "$ASSETS/kubelet" --kubeconfig "$RUN/kubeconfig.node" --config "$RUN/kubelet/config.yaml" \
    --container-runtime remote --container-runtime-endpoint "unix://$RUN/containerd/containerd.sock" \
    --root-dir "$RUN/kubelet/root" --cert-dir "$RUN/kubelet/pki" --node-ip "$NODE_IP" \
    --hostname-override "$NS" --volume-plugin-dir "$RUN/kubelet/plugins" \
    --image-service-endpoint "unix://$RUN/containerd/containerd.sock"
  start kube-proxy "$ASSETS/kube-proxy" --kubeconfig "$RUN/kubeconfig.node" --proxy-mode iptables \
    --cluster-cidr "$POD_CIDR" --hostname-override "$NS" --conntrack-max-per-core=0 \
    --masquerade-all --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256
  start dns-names "$RUN/dns/names.sh" "$(command -v kubectl)" "$RUN/kubeconfig.node" "$RUN/dns/hosts"
  start dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --listen-address "$DNS_IP" \
    --bind-interfaces --local=/cluster.local/ --hostsdir "$RUN/dns/hosts" --user=root \
    --pid-file="$RUN/dns/dnsmasq.pid" --log-facility=-
  local k=(kubectl --kubeconfig "$RUN/kubeconfig")
  wait_for kubelet 90 sh -c "${k[*]} get node $NS -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  log "node $NS Ready in $(( $(date +%s) - t0 )) s; KUBECONFIG=$RUN/kubeconfig"
  echo "$RUN/kubeconfig"
}

images() {
  [ -S "$RUN/containerd/containerd.sock" ] || { log "no node is running (node.sh up)"; exit 1; }
  local img dir
  dir=$(bash .ci/node-images.sh | tail -1)
  for img in "$dir"/*.tar; do
    ctr --address "$RUN/containerd/containerd.sock" -n k8s.io images import "$img" >/dev/null
  done
}

# A hostPath PersistentVolume for the embedded NATS server's claim (no provisioner here).
volume() {
  mkdir -p "$RUN/pv/$1"; chmod 0777 "$RUN/pv/$1"
  kubectl --kubeconfig "$RUN/kubeconfig" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: $1}
spec:
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: $RUN/pv/$1, type: Directory}
EOF
}

try() {
  up >/dev/null
  local version nats_version t0
  version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
  nats_version=$(grep -m1 '^NATS_VERSION=' .ci/tools.sh | cut -d= -f2)
  volume try-nats
  t0=$(date +%s)
  helm --kubeconfig "$RUN/kubeconfig" upgrade --install kloudmeter charts/kloudmeter -n kloudmeter \
    --create-namespace --wait --timeout 5m \
    --set image.repository=localhost/kloudmeter --set "image.tag=$version" \
    --set nats.embedded.image.repository=localhost/nats --set "nats.embedded.image.tag=$nats_version" >&2
  log "KloudMeter installed and Ready in $(( $(date +%s) - t0 )) s"
  cat >&2 <<EOF

  export KUBECONFIG=$RUN/kubeconfig
  kubectl get pods -n kloudmeter
  kubectl port-forward -n kloudmeter svc/kloudmeter 8080:8080   # the API on localhost:8080
  task cluster:down                                             # stops it, leaves nothing

EOF
  echo "$RUN/kubeconfig"
}

down() {
  local name pid
  if [ -d "$RUN/pids" ]; then
    # pods first (kubelet stops their containers), then the node's own processes
    for name in kubelet kube-proxy kube-scheduler kube-controller-manager dnsmasq dns-names api-relay api-socket kube-apiserver etcd; do
      [ -f "$RUN/pids/$name" ] || continue
      pid=$(cat "$RUN/pids/$name")
      kill "$pid" 2>/dev/null || true
    done
    # containers: containerd's shims and their processes
    if [ -S "$RUN/containerd/containerd.sock" ]; then
      local c
      for c in $(ctr --address "$RUN/containerd/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
        ctr --address "$RUN/containerd/containerd.sock" -n k8s.io tasks kill -s KILL "$c" >/dev/null 2>&1 || true
      done
    fi
    sleep 1
    for pid in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $RUN/containerd/containerd.sock" || true); do
      kill -9 "$pid" 2>/dev/null || true
    done
    for name in "$RUN"/pids/*; do
      pid=$(cat "$name")
      kill -9 "$pid" 2>/dev/null || true
    done
  fi
  # what the kubelet and containerd mounted under the run folder
  if [ -d "$RUN" ]; then
    grep -o " $RUN[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  local d
  for d in pods containers; do
    if mountpoint -q "/var/log/$d" && grep -q " /var/log/$d " /proc/mounts; then umount -l "/var/log/$d" || true; fi
    if [ -f "$RUN/log/.made-$d" ]; then rmdir "/var/log/$d" 2>/dev/null || true; fi
  done
  # the pods' cgroups (kubelet's cgroupfs driver makes them under kubepods/)
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  local n made
  # the CNI plugins' cache of this node's pods (named after its network)
  rm -f /var/lib/cni/results/kmnode-* 2>/dev/null || true
  for made in "$RUN"/made/*; do
    [ -f "$made" ] && rm -rf "$(cat "$made")"
  done
  if [ -f "$RUN/netns.before" ]; then
    for n in $(ip netns list | awk '{print $1}' | grep '^cni-' || true); do
      grep -qx "$n" "$RUN/netns.before" || ip netns delete "$n" 2>/dev/null || true
    done
  fi
  [ -e "$NETNS" ] && ip netns delete "$NS"
  # `ip netns add` mounts /run/netns on itself the first time: undone when it made it
  if [ -f "$RUN/.made-run-netns" ] && [ -z "$(ip netns list)" ]; then umount /run/netns 2>/dev/null || true; fi
  rm -rf "$RUN"
  log "down"
}

case "${1:-}" in
  up) up ;;
  try) try ;;
  down) down ;;
  images) images ;;
  env) printf 'KUBECONFIG=%s\nNODE_NETNS=%s\nNODE_DIR=%s\n' "$RUN/kubeconfig" "$NETNS" "$RUN" ;;
  *) echo "usage: $0 up|try|down|images|env" >&2; exit 2 ;;
esac
