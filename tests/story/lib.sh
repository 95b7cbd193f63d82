# tests/story/lib.sh: the story's pieces (build, namespace and capture, rig, chart, map Service,
# Headscale, tailscaleds, the no-leak check), sourced by tests/story/run and tests/headscale-day/run.
# The caller sets repo, KEEP, BUILD and RK (0/1) first; each function says what else it reads.
# shellcheck shell=bash
STORY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

T0=$(date +%s.%N)
PASS=0; FAIL=0
verdict() { # verdict NAME RC TEXT
  LAST_RC=$2
  if [ "$2" = 0 ]; then PASS=$((PASS + 1)); echo "PASS $1: $3"; else FAIL=$((FAIL + 1)); echo "FAIL $1: $3"; fi
}
# crit: the checks after this one need it; stop (teardown runs from the trap) if it failed.
crit() { [ "$LAST_RC" = 0 ] || { echo "  stopping here: the remaining checks depend on this one"; exit 1; }; }
note() { echo "  $*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.2f", b - a }'; }
finish() { # the summary line, last
  echo "suite time $(since "$T0")s"
  echo "$PASS passed, $FAIL failed"
}


# wait_until SECONDS CMD...: poll every 0.2 s (bounded)
wait_until() {
  local end; end=$(awk -v t="$1" -v n="$(now)" 'BEGIN { printf "%.3f", n + t }'); shift
  while ! "$@" >/dev/null 2>&1; do
    awk -v e="$end" -v n="$(now)" 'BEGIN { exit !(n > e) }' && return 1
    sleep 0.2
  done
}


# story_build: section 1 of the story README (skipped with BUILD=0) and the binaries' paths.
story_build() {
  PEERS=${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/peers
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/target}
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
  svchash=$(cd "$STORY_DIR/svcproxy" && cat go.mod go.sum main.go | sha256sum | cut -c1-12)
  SVCBIN=$PEERS/story-svcproxy-$svchash/bin
  IMGDIR=${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/containers-v2/archives
  if [ "$BUILD" = 1 ]; then
    tb=$(now)
    "$repo/tests/cluster/build" >&2 || { verdict build 1 "tests/cluster/build failed"; finish; exit 1; }
    if [ "$RK" = 1 ]; then
      "$repo/tests/images/build" "$IMGDIR" >"$IMGDIR.log" 2>&1 \
        || { verdict build 1 "tests/images/build failed: $(grep FAIL "$IMGDIR.log" | head -3)"; finish; exit 1; }
    else
    (cd "$repo" && cargo build --release -q -p derper -p operator) >&2 \
      || { verdict build 1 "cargo build --release -p derper -p operator failed"; finish; exit 1; }
    fi
    mapfile -t bins < <("$repo/tests/derper-e2e/build") || true
    [ "${#bins[@]}" = 3 ] || { verdict build 1 "tests/derper-e2e/build (Tailscale, Headscale) failed"; finish; exit 1; }
    mkdir -p "$SVCBIN"
    (cd "$STORY_DIR/svcproxy" && go build -o "$SVCBIN/svcproxy" .) >&2 \
      || { verdict build 1 "svcproxy build failed"; finish; exit 1; }
    note "build: $(since "$tb")s (rig, derper+operator, Tailscale, Headscale, svcproxy; cached parts take seconds)"
  fi
  source "$repo/tests/cluster/lib/common.sh"
  TSBIN=$PEERS/tailscale-$(awk '$1=="tailscale.com"{print $2}' "$repo/tests/interop/go.mod")/bin
  HSBIN=$PEERS/headscale-$(awk '{ for (i = 1; i < NF; i++) if ($i == "github.com/juanfont/headscale") { print $(i + 1); exit } }' "$repo/tests/derper-e2e/headscale/go.mod")/bin
  # STORY_DERPER / STORY_OPERATOR override the binaries (e.g. a debug build while iterating).
  DERPER=${STORY_DERPER:-$CARGO_TARGET_DIR/release/derper}
  OPERATOR=${STORY_OPERATOR:-$CARGO_TARGET_DIR/release/operator}
  BINS=("$DERPER" "$OPERATOR")
  [ "$RK" = 1 ] && BINS=("$IMGDIR/derper.tar" "$IMGDIR/operator.tar")
  for b in "$TSBIN/tailscaled" "$TSBIN/tailscale" "$HSBIN/headscale" "${BINS[@]}" "$SVCBIN/svcproxy" \
           "$K8S_HOME/bin/kubectl" "$HELM_HOME/bin/helm"; do
    [ -x "$b" ] || { [ "${b%.tar}" != "$b" ] && [ -s "$b" ]; } || { verdict build 1 "$b is missing (run without --no-build)"; finish; exit 1; }
  done
  command -v tcpdump >/dev/null || apt-get install -y -qq tcpdump >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq tcpdump >/dev/null 2>&1; }
  command -v tcpdump >/dev/null || { verdict tcpdump 1 "tcpdump missing and apt-get install failed"; finish; exit 1; }
  for c in jq curl python3 unshare; do
    command -v $c >/dev/null || { verdict tools 1 "$c is missing"; finish; exit 1; }
  done

}

nsx() { ip netns exec "$NS" "$@"; }
k() { nsx kubectl "$@"; }
# stamp: prefix every line of stdin with the Unix time (ms), for logs whose own clock is coarse.
stamp() { python3 -u -c 'import sys, time
for l in sys.stdin: sys.stdout.write("%.3f %s" % (time.time(), l))'; }
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  [ "$rc" != 0 ] && [ "$FAIL" = 0 ] && verdict run 1 "stopped early (exit status $rc: interrupted or a step failed outside a check)"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ -f "$RIG/env" ] || [ -d "$RIG/pids" ]; then
    nsx "$repo/tests/cluster/down" --state "$RIG" --grace 5 >"$W/down.log" 2>&1 || echo "  (rig down: see $W/down.log)"
  fi
  # Whatever is still in the namespace was started by this run.
  if ip netns pids "$NS" >/dev/null 2>&1; then
    for p in $(ip netns pids "$NS"); do kill -TERM "$p" 2>/dev/null; done
    sleep 1
    for p in $(ip netns pids "$NS"); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$NS" 2>/dev/null
  fi
  for p in "${CAPS[@]}"; do kill -INT "$p" 2>/dev/null; done
  [ "${#CAPS[@]}" -gt 0 ] && wait "${CAPS[@]}" 2>/dev/null
  if [ "$KEEP" = 1 ] || [ "$FAIL" != 0 ] || [ "$rc" != 0 ]; then
    echo "  work dir kept: $W"
  else
    rm -rf "$W"
  fi
  finish
  [ "$FAIL" = 0 ] && [ "$rc" = 0 ]
  exit $?
}

# story_netns PREFIX: work dir /tmp/PREFIX.*, namespace PREFIX-<pid> with lo and the dead-end veth,
# host capture, the foreign-process sampler, the EXIT trap. Sets W, NS, RIG, PIDS, CAPS, TESTNET.
story_netns() {
  W=$(mktemp -d "/tmp/${1:-derp-story}.XXXXXX")
  NS=${1:-derp-story}-$$
  RIG=$W/rig
  PIDS=(); CAPS=()
  trap teardown EXIT
  trap 'exit 130' INT TERM


  # A documentation prefix (RFC 5737) the host itself does not use (some hosts sit on 192.0.2.0/24,
  # some talk to a service in 203.0.113.0/24: the capture would take the host's own packets for ours).
  TESTNET=
  local peers; peers=$(ss -Htuna 2>/dev/null | awk '{ print $5; print $6 }')
  for n in 198.51.100 203.0.113 192.0.2; do
    ip -4 addr show | grep -q "inet $n\." || ip -4 route show | grep -q "^$n\." || grep -q "^$n\." <<<"$peers" \
      || { TESTNET=$n; break; }
  done
  [ -n "$TESTNET" ] || { verdict netns 1 "every RFC 5737 prefix is in use on this host"; exit 1; }
  # Capture on every real interface of the host, for the whole run.
  mkdir -p "$W/cap"
  CAPFILTER="net $TESTNET.0/24 or net 100.64.0.0/10 or ip6 net fd7a:115c:a1e0::/48 or udp port 3478 or udp port 41641 or port 8443 or port 9731 or port 53"
  mapfile -t IFACES < <(ip -o link show up | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -vx lo)
  for i in "${IFACES[@]}"; do
    tcpdump -i "$i" -n -U -w "$W/cap/$i.pcap" "$CAPFILTER" >"$W/cap/$i.log" 2>&1 &
    CAPS+=($!)
  done
  sleep 1
  ip netns add "$NS" || { verdict netns 1 "ip netns add $NS failed"; NS=; exit 1; }
  nsx ip link set lo up
  nsx ip link add vs0 type veth peer name vs1
  nsx ip addr add $TESTNET.1/24 dev vs0
  nsx ip link set vs0 up
  nsx ip link set vs1 up
  nsx ip route add default via $TESTNET.254 dev vs0
  # What the story tries to send off the box ends here (nothing answers .254).
  ip netns exec "$NS" tcpdump -i vs0 -n -U -w "$W/cap/ns-vs0.pcap" >"$W/cap/ns-vs0.log" 2>&1 &
  CAPS+=($!)
  # Tailscale/Headscale processes that run outside the story's namespace (other users of this host):
  # DNS for tailscale names on the real interface is attributed to them if they ran at that time.
  NSINO=$(stat -L -c %i "/run/netns/$NS")
  (for _ in $(seq 1 12000); do
     for p in $(pgrep -x 'tailscaled?|headscale|derper|derpprobe'); do
       ino=$(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null) || continue
       [ "$ino" = "$NSINO" ] || echo "$(date +%s.%N) $p $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-100)"
     done
     sleep 0.3
   done) >"$W/foreign-procs.log" 2>/dev/null &
  PIDS+=($!)
  verdict netns 0 "namespace $NS: lo, vs0 $TESTNET.1/24 (default route via $TESTNET.254, a veth whose peer vs1 is also inside); host capture on ${IFACES[*]:-no interface}"
}

# story_rig_up NAME=IP...: the rig (no kwok, no cert-manager) with these nodes: process nodes
# (label type=process), or with RK=1 real kubelets (label type=real) running the images. The
# operator image is our operator started with real in-cluster config. Sets NODETYPE.
story_rig_up() {
  mkdir -p "$W/bin"
  # The chart's operator image runs our operator binary with real in-cluster config: kube-rs reads
  # the token from the fixed path /var/run/secrets/kubernetes.io/serviceaccount, which the process
  # kubelet does not mount (it rewrites paths only in args/env). So the process starts in its own
  # mount namespace with the pod's projected kube-api-access volume bind-mounted there.
  cat >"$W/bin/operator-incluster" <<EOF
#!/bin/sh
sa="\${DERPFLEET_TEST_SA_DIR:-}"
case "\$sa" in ""|/var/run/secrets/*) echo "operator-incluster: DERPFLEET_TEST_SA_DIR='\$sa' (not the pod's volume)" >&2; exit 1;; esac
exec unshare --mount --propagation private -- /bin/sh -c '
  mount -t tmpfs -o mode=0755,size=1m story-run /run &&
  mkdir -p /run/secrets/kubernetes.io/serviceaccount &&
  mount --bind "\$0" /run/secrets/kubernetes.io/serviceaccount &&
  exec "\$@"' "\$sa" "$OPERATOR" "\$@"
EOF
  chmod +x "$W/bin/operator-incluster"

  t=$(now)
  # The nodes' label the chart and the region select: type=process or type=real.
  local n nodes_args=()
  if [ "$RK" = 1 ]; then
    NODETYPE=real
    for n in "$@"; do nodes_args+=(--real-kubelet "$n"); done
    nodes_args+=(--no-process-kubelet --real-node-labels type=real
      --image-archive "$IMGDIR/derper.tar" --image-archive "$IMGDIR/operator.tar")
  else
    NODETYPE=process
    for n in "$@"; do nodes_args+=(--process-node "$n"); done
    nodes_args+=(--image-bin "ghcr.io/derp-fleet/operator=$W/bin/operator-incluster" --image-bin "ghcr.io/derp-fleet/derper=$DERPER")
  fi
  if ! nsx "$repo/tests/cluster/up" --state "$RIG" --no-kwok --no-certmanager "${nodes_args[@]}" >"$W/up.log" 2>&1; then
    verdict rig-up 1 "tests/cluster/up failed: $(tail -n 3 "$W/up.log" | tr '\n' ' ')"; finish; exit 1
  fi
  source "$RIG/env"
  verdict rig-up 0 "control plane + $NODETYPE kubelet$([ "$RK" = 1 ] && echo "s (kubelet $RIG_K8S_VERSION, $(containerd --version | awk '{ print $1, $3 }'), $(runc --version | head -1))") in $(since "$t")s; $NODETYPE nodes $*"
  PKLOGS=$RIG/process-kubelet/logs
}
# The operator pods' logs: the process kubelet's files, or kubectl logs from the real kubelets.
operator_logs() {
  if [ "$RK" = 1 ]; then
    local p
    for p in $(k -n derp-fleet get pods -l app.kubernetes.io/name=derp-fleet -o name); do k -n derp-fleet logs "$p"; done
  else cat "$PKLOGS"/derp-fleet_*operator.log 2>/dev/null; fi
}

# story_helm_install VALUES: helm install the chart (release derp-fleet, namespace derp-fleet),
# wait for the two operator replicas; checks operator-pods and operator-incluster.
story_helm_install() {
  t=$(now)
  out=$(nsx helm install derp-fleet "$repo/charts/derp-fleet" -n derp-fleet --create-namespace -f "$1" 2>&1)
  rc=$?
  echo "$out" >"$W/helm-install.log"
  verdict helm-install $rc "helm install derp-fleet charts/derp-fleet -n derp-fleet ($(nsx helm version --short 2>/dev/null)): $(grep -m1 -E '^STATUS|Error' <<<"$out")"
  nsx helm get notes derp-fleet -n derp-fleet 2>/dev/null | grep -m1 -E 'derp.urls|derpmap.json' | sed 's/^ */  NOTES: /'
  k -n derp-fleet rollout status deploy/derp-fleet --timeout=90s >"$W/rollout.log" 2>&1
  rc=$?
  ops=$(k -n derp-fleet get pods -l app.kubernetes.io/name=derp-fleet -o jsonpath='{range .items[*]}{.metadata.name}@{.status.podIP}/{.status.conditions[?(@.type=="Ready")].status} {end}')
  verdict operator-pods $rc "2 operator replicas as $NODETYPE pods, Ready in $(since "$t")s: $ops"
  crit
  lease=$(k -n derp-fleet get lease derp-fleet-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)
  # In-cluster config for real: the pods authenticate as the chart's ServiceAccount.
  sa_ok=1
  if [ "$RK" = 1 ]; then
    # Real kubelet: the token is the kubelet's projected volume at the standard path, the image's
    # binary reads it itself; each replica's log must be free of auth errors.
    sa_ok=0
    for p in $(k -n derp-fleet get pods -l app.kubernetes.io/name=derp-fleet -o name); do
      k -n derp-fleet logs "$p" >"$W/$(basename "$p").log" 2>&1 || sa_ok=1
      grep -qiE 'forbidden|unauthorized|in-cluster config or KUBECONFIG' "$W/$(basename "$p").log" && sa_ok=1
    done
  else
  for f in "$PKLOGS"/derp-fleet_derp-fleet-*_operator.log; do
    [ -f "$f" ] && ! grep -qiE 'forbidden|unauthorized|in-cluster config or KUBECONFIG' "$f" && sa_ok=0
  done
  fi
  verdict operator-incluster "$([ -n "$lease" ] && [ $sa_ok = 0 ] && echo 0 || echo 1)" \
    "Lease derp-fleet-operator held by ${lease:-nobody}; operator logs show no forbidden/unauthorized (token from the projected kube-api-access volume, RBAC of the chart)"
  crit
}

# story_svcproxy N: svcproxy as the map Service at 127.0.1.1:80 (MAPURL); waits for N nodes in the
# map (check map-service) and saves it to $W/derpmap-initial.json.
story_svcproxy() {
  SVCADDR=127.0.1.1:80
  MAPURL=http://$SVCADDR/derpmap.json
  SVCARGS=()
  # Real kubelets: the operator pods are on the CNI bridges (10.244.<n>.0/24, inside the namespace).
  [ "$RK" = 1 ] && SVCARGS=(--allow-net 10.244.0.0/16)
  ip netns exec "$NS" env KUBECONFIG="$KUBECONFIG" "$SVCBIN/svcproxy" --namespace derp-fleet --service derp-fleet --listen "$SVCADDR" "${SVCARGS[@]}" \
    >"$W/svcproxy.log" 2>&1 &
  PIDS+=($!)
  map_nodes() { nsx curl -sf --max-time 2 "$MAPURL" | jq -r '[.Regions[]?.Nodes[]? | "\(.Name)=\(.IPv4):\(.DERPPort)"] | join(",")'; }
  map_has_n() { [ "$(map_nodes | tr ',' '\n' | grep -c .)" = "$1" ]; }
  wait_until 30 map_has_n "$1"; rc=$?
  verdict map-service $rc "Service derp-fleet/derp-fleet ($(k -n derp-fleet get svc derp-fleet -o jsonpath='{.spec.clusterIP}'):80, a label) served at $SVCADDR by svcproxy -> $(grep -m1 'endpoints: \[1' "$W/svcproxy.log" | sed 's/.*endpoints: //'); map nodes: $(map_nodes)"
  crit
  nsx curl -sf "$MAPURL" >"$W/derpmap-initial.json"
  note "map: $(jq -c '[.Regions[] | {RegionID, RegionCode, Nodes: [.Nodes[] | {Name, HostName, IPv4, IPv6, DERPPort, STUNPort, CertName: (.CertName // "" | .[0:20])}]}]' "$W/derpmap-initial.json")"
}

# story_headscale_config: writes $W/hs/config.yaml for Headscale v0.29.2 on 127.0.0.1 (ports
# HSPORT and GRPCPORT, chosen once), sqlite in $W/hs, embedded DERP off. Its derp section comes
# from HS_URLS (array, default: MAPURL), HS_PATHS (array, default none) and HS_UPDATE (default 10s).
story_headscale_config() {
  if [ -z "${HSPORT:-}" ]; then
    mapfile -t P < <(nsx "$RIG/bin/rigctl" freeport 2)
    HSPORT=${P[0]}; GRPCPORT=${P[1]}
  fi
  # (declare -p: an empty array counts as set)
  declare -p HS_URLS >/dev/null 2>&1 || HS_URLS=("$MAPURL")
  declare -p HS_PATHS >/dev/null 2>&1 || HS_PATHS=()
  declare -p HS_ENV >/dev/null 2>&1 || HS_ENV=()
  local urls="[]" paths="[]"
  [ "${#HS_URLS[@]}" -gt 0 ] && urls=$(printf '\n  - %s' "${HS_URLS[@]}")
  [ "${#HS_PATHS[@]}" -gt 0 ] && paths=$(printf '\n  - %s' "${HS_PATHS[@]}")
  mkdir -p "$W/hs" "$W/ts/logs"
  cat >"$W/hs/config.yaml" <<EOF
server_url: http://127.0.0.1:$HSPORT
listen_addr: 127.0.0.1:$HSPORT
metrics_listen_addr: ""
grpc_listen_addr: 127.0.0.1:$GRPCPORT
grpc_allow_insecure: false
noise:
  private_key_path: $W/hs/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
  urls: $urls
  paths: $paths
  auto_update_enabled: true
  update_frequency: ${HS_UPDATE:-10s}
disable_check_updates: true
database:
  type: sqlite
  sqlite:
    path: $W/hs/db.sqlite
unix_socket: $W/hs/headscale.sock
unix_socket_permission: "0770"
dns:
  magic_dns: false
  override_local_dns: false
log:
  level: info
policy:
  path: ""
EOF
}

# story_headscale: story_headscale_config, then Headscale started with a user and a reusable
# pre-auth key (authkey); check headscale. HS_ENV (array of NAME=VALUE) is added to its
# environment; with STORY_STAMP=1 its log lines carry the Unix time.
story_headscale() {
  story_headscale_config
  t=$(now)
  if [ "${STORY_STAMP:-0}" = 1 ]; then
    ip netns exec "$NS" env "${HS_ENV[@]}" "$HSBIN/headscale" -c "$W/hs/config.yaml" serve 2>&1 | stamp >"$W/headscale.log" &
  else
    ip netns exec "$NS" env "${HS_ENV[@]}" "$HSBIN/headscale" -c "$W/hs/config.yaml" serve >"$W/headscale.log" 2>&1 &
  fi
  PIDS+=($!)
  wait_until 30 hs_health; rc=$?
  HSVER=$(hs version 2>/dev/null | head -n 1)
  uid=$(hs users create story -o json 2>>"$W/hs-cli.err" | jq -r '.id')
  authkey=$(hs preauthkeys create --user "$uid" --reusable --expiration 1h 2>>"$W/hs-cli.err" | tail -n 1)
  [ $rc = 0 ] && [ -n "$authkey" ] && [ "$uid" != null ]
  verdict headscale $? "Headscale ${HSVER:-?} on 127.0.0.1:$HSPORT in $(since "$t")s, derp.urls [${HS_URLS[*]}], paths [${HS_PATHS[*]}], no embedded DERP, update ${HS_UPDATE:-10s}; user id $uid, pre-auth key ${authkey:0:10}..."
  crit
}
hs() { nsx timeout 30 "$HSBIN/headscale" -c "$W/hs/config.yaml" "$@"; }
hs_health() { nsx curl -sf --max-time 1 "http://127.0.0.1:$HSPORT/health"; }

# story_tailscaleds NAME...: one userspace tailscaled per name (statedir $W/ts/NAME, SOCKS5 on
# SOCKS[NAME], forced to DERP), joined to Headscale as story-NAME; TSIP[NAME] is its tailnet IPv4.
# Checks tailscaled-NAME. With STORY_STAMP=1 their log lines carry the Unix time.
declare -A TSIP SOCKS
ts() { local n=$1; shift; nsx timeout 40 "$TSBIN/tailscale" --socket="$W/ts/$n/tailscaled.sock" "$@"; }
story_tailscaleds() {
  TSENV=(env TS_LOGS_DIR="$W/ts/logs" TS_DISABLE_PORTMAPPER=1 TS_DEBUG_ALWAYS_USE_DERP=1 TS_PANIC_IF_HIT_MAIN_CONTROL=1)
  local n i=0 sp
  mapfile -t sp < <(nsx "$RIG/bin/rigctl" freeport $#)
  for n in "$@"; do
    SOCKS[$n]=${sp[$i]}; i=$((i + 1))
    mkdir -p "$W/ts/$n"
    if [ "${STORY_STAMP:-0}" = 1 ]; then
      # TS_DEBUG_LOG_RATE=all: tailscaled rate-limits repeated log formats (5 per 5 s), which would
      # hide reconnects from a harness that counts them.
      ip netns exec "$NS" "${TSENV[@]}" TS_DEBUG_LOG_RATE=all "$TSBIN/tailscaled" --tun=userspace-networking --statedir="$W/ts/$n" \
        --socket="$W/ts/$n/tailscaled.sock" --port=0 --no-logs-no-support --socks5-server="127.0.0.1:${SOCKS[$n]}" \
        2>&1 | stamp >"$W/tailscaled-$n.log" &
    else
      ip netns exec "$NS" "${TSENV[@]}" "$TSBIN/tailscaled" --tun=userspace-networking --statedir="$W/ts/$n" \
        --socket="$W/ts/$n/tailscaled.sock" --port=0 --no-logs-no-support --socks5-server="127.0.0.1:${SOCKS[$n]}" \
        >"$W/tailscaled-$n.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  for n in "$@"; do
    t=$(now)
    wait_until 20 test -S "$W/ts/$n/tailscaled.sock"
    ts "$n" up --login-server="http://127.0.0.1:$HSPORT" --auth-key="$authkey" --hostname="story-$n" \
      --accept-dns=false --timeout=30s >"$W/up-$n.out" 2>&1
    st=$(ts "$n" status --json 2>/dev/null)
    TSIP[$n]=$(jq -r '.Self.TailscaleIPs[0] // empty' <<<"$st")
    [ "$(jq -r .BackendState <<<"$st")" = Running ] && [ -n "${TSIP[$n]}" ]
    verdict "tailscaled-$n" $? "story-$n joined in $(since "$t")s: $(jq -r .BackendState <<<"$st") ${TSIP[$n]:-no IP}$(grep -m1 -i error "$W/up-$n.out" | sed 's/^/ /')"
    crit
  done
  TSVER=$(ts "$1" version 2>/dev/null | head -n 1)
}

# story_capture_check: stops everything, then check no-packet-left-the-host on the capture.
story_capture_check() {
  # Stop the story's processes before reading the capture, so it covers everything they sent.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  nsx "$repo/tests/cluster/down" --state "$RIG" --grace 5 >"$W/down.log" 2>&1 && rm -f "$RIG/env"
  sleep 1
  for p in "${CAPS[@]}"; do kill -INT "$p" 2>/dev/null; done
  wait "${CAPS[@]}" 2>/dev/null; CAPS=()
  leak=0; summary=""
  nforeign=$(awk '{print $2}' "$W/foreign-procs.log" | sort -u | wc -l)
  for i in "${IFACES[@]}"; do
    f=$W/cap/$i.pcap
    dns=$(tcpdump -n -r "$f" 'port 53' 2>/dev/null | wc -l)
    bad=$(tcpdump -n -r "$f" 'not port 53' 2>/dev/null | wc -l)
    tsdns=$(tcpdump -n -tt -r "$f" 'port 53' 2>/dev/null | grep -iE 'tailscale|ts\.net|headscale')
    ntsdns=$(grep -c . <<<"$tsdns")
    # a tailscale-name query is someone else's if a Tailscale/Headscale process outside the
    # namespace was alive within 5 s of it
    unexplained=$(awk 'NR == FNR { t[NR] = $1; n = NR; next } { ok = 0; for (i = 1; i <= n; i++) if (t[i] - $1 < 5 && $1 - t[i] < 5) { ok = 1; break } if (!ok) c++ } END { print c + 0 }' \
      "$W/foreign-procs.log" <(grep . <<<"$tsdns"))
    recv=$(grep -oE '[0-9]+ packets received by filter' "$W/cap/$i.log" | awk '{print $1}')
    summary+="$i: ${recv:-?} packets matched the filter: $bad story-shaped ($TESTNET.0/24, 100.64/10, fd7a:115c:a1e0::/48, udp 3478/41641, tcp 8443/9731); $dns DNS, $ntsdns of them for tailscale/ts.net/headscale names ($((ntsdns - unexplained)) while $nforeign Tailscale/Headscale/derper processes of other users ran outside the namespace, $unexplained unexplained); "
    leak=$((leak + bad + unexplained))
    [ "$bad" -gt 0 ] && tcpdump -n -r "$f" 'not port 53' 2>/dev/null | head -n 5 | sed 's/^/  leaked: /'
    [ "$ntsdns" -gt 0 ] && grep -oE '(A|AAAA|PTR)\? [^ ]+' <<<"$tsdns" | sort | uniq -c | head -n 4 | sed 's/^ */  host DNS (src: the host address, not the namespace): /'
  done
  nsc=$(tcpdump -n -r "$W/cap/ns-vs0.pcap" 2>/dev/null | wc -l)
  nsdns=$(tcpdump -n -r "$W/cap/ns-vs0.pcap" 'port 53' 2>/dev/null | grep -oE '(A|AAAA)\? [^ ]+' | sort -u | paste -sd, -)
  [ "$leak" = 0 ] && [ "${#IFACES[@]}" -gt 0 ]
  verdict no-packet-left-the-host $? "${summary}inside the namespace $nsc packets went to vs0 (the dead-end default route): $(tcpdump -n -r "$W/cap/ns-vs0.pcap" 2>/dev/null | awk '{print $3, $4, $5}' | sort | uniq -c | sort -rn | head -n 4 | awk '{$1=$1; print}' | paste -sd';' -); DNS the story tried: ${nsdns:-none}"
  echo "versions: Headscale ${HSVER:-?}; tailscale.com $(basename "$(dirname "$TSBIN")" | sed "s/^tailscale-//") (tailscale version: $TSVER); Kubernetes $K8S_VERSION (kube-apiserver, controller-manager, scheduler, kubectl); etcd $ETCD_VERSION; helm $HELM_VERSION; derp-fleet $(cd "$repo" && git describe --always --dirty 2>/dev/null) ($(cd "$repo" && "$OPERATOR" --version 2>/dev/null | head -n 1)); $(go version | awk '{print $3}')"
}
