# Real kubelet nodes for the rig (tests/cluster/up --real-kubelet NAME=IP). Sourced by up and down.
#
# Each node is a kubelet (built from the rig's k8s.io/kubernetes module) with its own containerd
# (Debian's 1.6, runc, cgroupfs) and a CNI bridge (Debian's containernetworking-plugins), all
# inside the network namespace the caller made (up refuses the host's). What each piece needs, as
# found on this machine (see /work/shared/design/real-peers.md, "Wave 2 peers"):
#   - containerd: private root/state/socket; SystemdCgroup = false; restrict_oom_score_adj = true
#     (runc otherwise fails writing oom_score_adj -998); the sandbox image imported locally under
#     the name of sandbox_image (no registry is reachable): the harness's static `pause`;
#   - kubelet: cgroupDriver cgroupfs and failCgroupV1 false (containerd 1.6 has no RuntimeConfig
#     call, so kubelet takes the driver from its config); cgroupsPerQOS false, so several kubelets
#     on one host do not share one /kubepods tree; a node IP assigned to an interface (else the
#     node has no InternalIP) and not a loopback one (kubelet: "nodeIP can't be loopback
#     address", again no InternalIP, no hostIP for hostNetwork pods); client certificate system:node:NAME (the Node authorizer applies);
#     serving certificate from the rig CA; webhook authentication/authorization, so the apiserver
#     (with the admin client certificate) can fetch logs and exec;
#   - the kubernetes Service (10.96.0.1:443): pods reach the apiserver through a DNAT to
#     127.0.0.1:<apiserver port> in the namespace (a kube-proxy stand-in; route_localnet=1).

RK_PAUSE_IMAGE=localhost/derp-fleet-rig/pause:1

rk_in_host_netns() { [[ $(readlink /proc/self/ns/net) == "$(readlink /proc/1/ns/net)" ]]; }

# rk_packages: containerd, runc, CNI plugins, iptables (apt-get when missing).
rk_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v containerd-shim-runc-v2 >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || rig_die "up --real-kubelet: needs ${missing[*]} and root to install them"
  rig_log "installing ${missing[*]} (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2 \
    || rig_die "up --real-kubelet: apt-get install ${missing[*]} failed"
}

# rk_cgroup_mounts: `ip netns exec` runs its command in a new mount namespace with a fresh /sys,
# which has no cgroup mounts; kubelet and runc need them. Mount the host's hierarchies again
# (same controllers, so the same hierarchies) as PID 1 has them. Never in the host's own mount
# namespace (there they exist).
rk_cgroup_mounts() {
  grep -qE ' - cgroup2? ' /proc/self/mountinfo && return 0
  [[ $(readlink /proc/self/ns/mnt) != "$(readlink /proc/1/ns/mnt)" ]] \
    || rig_die "up: no cgroup mounts in the host's mount namespace: kubelet cannot run here"
  local id parent mm root target opts rest fstype src super
  while read -r id parent mm root target opts rest; do
    fstype=${rest#*- }; src=${fstype#* }; super=${src#* }; fstype=${fstype%% *}; src=${src%% *}
    case $fstype in
      tmpfs) [[ $target == /sys/fs/cgroup ]] && { mount -t tmpfs -o "${super#rw,}" cgroup "$target" || return 1; } ;;
      cgroup|cgroup2)
        mkdir -p "$target" && mount -t "$fstype" -o "${super#rw,}" "$src" "$target" || return 1 ;;
    esac
  done < <(awk '$5 ~ "^/sys/fs/cgroup"' /proc/1/mountinfo)
}

# rk_sign NAME SUBJ EXT: a key and certificate from the rig CA (in $PKI).
rk_sign() {
  (cd "$PKI" && openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" >/dev/null 2>&1 &&
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 30 \
      -extfile <(printf '%s\n' "$3") >/dev/null 2>&1 && rm -f "$1.csr") || rig_die "up: signing $1 failed"
}

# rk_cluster_network API_PORT: the kube-proxy stand-in for the kubernetes Service, once per rig.
rk_cluster_network() {
  sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.route_localnet=1 >/dev/null \
    || rig_die "up: sysctl in the rig's network namespace failed"
  local chain
  for chain in PREROUTING OUTPUT; do
    iptables -w 5 -t nat -A "$chain" -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$1" \
      || rig_die "up: iptables DNAT for the kubernetes Service failed"
  done
}

# rk_start_node INDEX NAME IP: containerd + kubelet for one node (components kubelet-NAME etc.).
rk_start_node() {
  local idx=$1 name=$2 ip=$3 D=$STATE/nodes/$2
  mkdir -p "$D"/{containerd,net.d,cni-ipam,kubelet,kubelet-pki,pod-logs}
  ip addr show dev lo | grep -q " $ip/" || ip addr add "$ip/32" dev lo || rig_die "up: cannot assign $ip to lo"

  cat >"$D/containerd.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$D/containerd.sock"
[ttrpc]
  address = "$D/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$RK_PAUSE_IMAGE"
  restrict_oom_score_adj = true
  # Pod network namespaces under the node's state dir, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/net.d"
    max_conf_num = 1
EOF
  # One bridge per node; pods of different nodes reach each other through the namespace's routes.
  cat >"$D/net.d/10-rig.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "rig-$name", "plugins": [
  {"type": "bridge", "bridge": "rkbr$idx", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$D/cni-ipam", "ranges": [[{"subnet": "10.244.$idx.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  start "containerd-$name" containerd --config "$D/containerd.toml"
  wait_for 30 "containerd-$name" ctr --address "$D/containerd.sock" version
  local ctr=(ctr --address "$D/containerd.sock" -n k8s.io)
  "${ctr[@]}" images import "$STATE/pause.tar" >>"$LOGS/images-$name.log" 2>&1 \
    || rig_die "up: importing the pause image into $name failed; log: $LOGS/images-$name.log"
  local a
  for a in "${RK_ARCHIVES[@]}"; do
    "${ctr[@]}" images import "$a" >>"$LOGS/images-$name.log" 2>&1 \
      || rig_die "up: importing $a into $name failed; log: $LOGS/images-$name.log"
  done

  rk_sign "kubelet-$name" "/O=system:nodes/CN=system:node:$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  rk_sign "kubelet-$name-serving" "/CN=$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$ip,DNS:$name"
  cat >"$D/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: rig
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$PKI/ca.crt"}
users:
- name: node
  user: {client-certificate: "$PKI/kubelet-$name.crt", client-key: "$PKI/kubelet-$name.key"}
contexts:
- name: rig
  context: {cluster: rig, user: node}
current-context: rig
KC
  local kport hport
  read -r kport hport < <("$HARNESS_HOME/bin/rigctl" freeport 2 | xargs)
  printf '%s\n' "$kport" "$hport" >>"$STATE/ports"
  cat >"$D/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "$ip"
port: $kport
readOnlyPort: 0
healthzBindAddress: "$ip"
healthzPort: $hport
tlsCertFile: "$PKI/kubelet-$name-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-$name-serving.key"
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
containerRuntimeEndpoint: "unix://$D/containerd.sock"
imageServiceEndpoint: "unix://$D/containerd.sock"
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
resolvConf: ""
clusterDomain: cluster.local
staticPodPath: ""
podLogsDir: "$D/pod-logs"
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
nodeStatusUpdateFrequency: 10s
rotateCertificates: false
serverTLSBootstrap: false
EOF
  start "kubelet-$name" "$KUBELET_HOME/bin/kubelet" --config="$D/kubelet.yaml" --kubeconfig="$D/kubelet.kubeconfig" \
    --hostname-override="$name" --node-ip="$ip" --root-dir="$D/kubelet" --cert-dir="$D/kubelet-pki" \
    --node-labels="derp-fleet.test/real-kubelet=true${RK_LABELS:+,$RK_LABELS}" --v=1
  echo "$name $ip $D" >>"$STATE/real-nodes"
}

# rk_wait_ready NAME...: every node Ready (kubelet registered, CNI ready, runtime ready).
rk_wait_ready() {
  local name
  for name in "$@"; do
    wait_for 120 "kubelet-$name" "$KUBECTL" wait --for=condition=Ready "node/$name" --timeout=2s
  done
}

# rk_down STATE: stop kubelets, then every pod container (ctr), then (with the other components)
# containerd; afterwards the pods' network namespace files and any mount left under STATE.
# Called by down before it stops the components.
rk_down_pods() {
  local state=$1 name ip D pid id
  [[ -f $state/real-nodes ]] || return 0
  for pid in "$state"/pids/kubelet-*.pid; do
    [[ -f $pid ]] && stop_groups "$pid"
  done
  while read -r name ip D; do
    [[ -S $D/containerd.sock ]] || continue
    local ctr=(timeout 20 ctr --address "$D/containerd.sock" -n k8s.io)
    for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks kill -s SIGTERM "$id" >/dev/null 2>&1; done
    for _ in $(seq 1 50); do
      "${ctr[@]}" tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"' | grep -q . || break
      sleep 0.1
    done
    for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
      "${ctr[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1
      "${ctr[@]}" tasks delete -f "$id" >/dev/null 2>&1
    done
    for id in $("${ctr[@]}" containers ls -q 2>/dev/null); do "${ctr[@]}" containers delete "$id" >/dev/null 2>&1; done
  done <"$state/real-nodes"
}

rk_down_after() {
  local state=$1 name ip D p
  [[ -f $state/real-nodes ]] || return 0
  while read -r name ip D; do
    # Shims outlive containerd (they are reparented); each names its containerd's socket. A
    # container whose task ctr could not kill is a child of its shim: killed first, with the shim.
    local shim c
    for shim in $(pgrep -f "containerd-shim-runc-v2 .*-address $D/containerd.sock" || true); do
      for c in $(ps -o pid= --ppid "$shim" 2>/dev/null); do kill -KILL "$c" 2>/dev/null; done
      kill -KILL "$shim" 2>/dev/null
      rig_log "down: killed containerd shim $shim of node $name and its containers (ctr did not stop them)"
    done
  done <"$state/real-nodes"
  # Mounts under the state dir (pod volumes, overlay rootfs), deepest first, when `up` ran in this
  # mount namespace; in an `ip netns exec` mount namespace they went with it.
  awk -v s="$state/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r p; do
    umount -l "$p" 2>/dev/null
  done
}
