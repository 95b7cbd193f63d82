# Sourced by tests/images/run once the static binaries are built (BIN[derper], BIN[operator]).
# The images built for real, from the Dockerfiles, with buildah, and run with podman (runc,
# cgroupfs) as the operator and the chart render them:
#   - a local stand-in for distroless/static:nonroot (FROM scratch: passwd/group with nonroot
#     65532, CA certificates, /tmp, /home/nonroot), since no registry is reachable here;
#   - both images with BINARY=prebuilt and BASE_IMAGE=that stand-in, tagged with the names and
#     the version the chart uses; their config (user, entrypoint, labels) and sizes;
#   - the derper image, in a network namespace made here, with the pod spec `operator render`
#     prints for two DerpRegions (read by podman-args.py, not restated): port 443 as uid 0 with
#     only NET_BIND_SERVICE and a self-signed IP certificate, and a high port as uid 65532 with a
#     cert-manager-style Secret (tls.crt, tls.key, ca.crt) mounted read-only; Tailscale's Go
#     client (derprelay) relays through each, derpprobe probes each, STUN answers; SIGTERM stops it;
#   - the derper image under the usual Let's Encrypt recipe (a volume on /app/certs and
#     DERP_DOMAIN) against Pebble: tests/acme/run --image;
#   - the operator image against the cluster rig, its ServiceAccount token (TokenRequest) at
#     /var/run/secrets/kubernetes.io/serviceaccount, with the chart's RBAC and container spec.
# Images are left in $IMG_STORE for tests/cluster/up --real-kubelet (which imports them).

IMG_STORE=${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/containers-v2
# Fixed root and runroot: podman records both in its database and refuses a different pair later.
# The runroot is not under the cache: podman refuses one longer than 50 characters, which a cache
# path such as a cold run's /var/tmp/derp-fleet-cold.XXXXXX/cache/... exceeds. Named by a hash of
# the store's path, it stays the same for the same store.
IMG_RUNROOT=/run/derp-fleet-podman-$(printf '%s' "$IMG_STORE" | sha256sum | cut -c1-12)
PODMAN=(podman --root "$IMG_STORE/storage" --runroot "$IMG_RUNROOT" --runtime runc --cgroup-manager cgroupfs
  --events-backend file)
BUILDAH=(buildah --root "$IMG_STORE/storage" --runroot "$IMG_RUNROOT")
APP_VERSION=$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' "$ROOT/charts/derp-fleet/Chart.yaml")
BASE_TAG=localhost/derp-fleet-test/static:nonroot
case $(uname -m) in x86_64) DOCKER_ARCH=amd64 ;; aarch64) DOCKER_ARCH=arm64 ;; *) DOCKER_ARCH=$(uname -m) ;; esac
declare -A IMAGE=([derper]="ghcr.io/derp-fleet/derper:$APP_VERSION" [operator]="ghcr.io/derp-fleet/operator:$APP_VERSION")
IMG_NS=
IMG_CONTAINERS=()
IMG_RIG=
containers_cleanup() {
  local c
  for c in "${IMG_CONTAINERS[@]}"; do
    nsenter_img "${PODMAN[@]}" rm -f -t 2 "$c" >/dev/null 2>&1
  done
  [[ -n $IMG_RIG ]] && "$ROOT/tests/cluster/down" --state "$IMG_RIG" >/dev/null 2>&1
  [[ -n $IMG_NS ]] && ip netns del "$IMG_NS" 2>/dev/null
}
# podman in the test's network namespace only (nsenter, not `ip netns exec`: that makes a new
# mount namespace per call, and podman's mounts must stay visible to the next podman call).
nsenter_img() {
  if [[ -n $IMG_NS ]]; then nsenter --net="/run/netns/$IMG_NS" "$@"; else "$@"; fi
}

containers_main() {
  # ---- tools --------------------------------------------------------------------------------
  local missing=() t
  for t in podman buildah runc nsenter; do command -v $t >/dev/null || missing+=("$t"); done
  python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
  if ((${#missing[@]})); then
    echo "tests/images: installing ${missing[*]} (apt-get)" >&2
    local pkgs=("${missing[@]/nsenter/util-linux}")
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } >&2 \
      || { bad "apt-get install ${pkgs[*]} failed: the images cannot be built or run"; return; }
  fi
  ok "container tools: $(podman --version), $(buildah --version | cut -d' ' -f1-3), $(runc --version | head -1)"
  mkdir -p "$IMG_STORE"
  # The store before containers-v2 recorded a runroot under the cache; podman would refuse it
  # with the new one. Its images are rebuilt below anyway.
  local old_store=${IMG_STORE%-v2}
  if [[ -d $old_store/storage ]]; then
    note "removing the previous image store $old_store (runroot moved to $IMG_RUNROOT)"
    podman --root "$old_store/storage" --runroot "$old_store/run" system reset -f >/dev/null 2>&1
    rm -rf "$old_store"
  fi

  # ---- the base image: a local stand-in for gcr.io/distroless/static-debian12:nonroot ----------
  local B=$TMP/base-ctx
  mkdir -p "$B/rootfs/etc/ssl/certs" "$B/rootfs/tmp" "$B/home/nonroot"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$B/rootfs/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$B/rootfs/etc/group"
  cp /etc/ssl/certs/ca-certificates.crt "$B/rootfs/etc/ssl/certs/"
  chmod 1777 "$B/rootfs/tmp"; chmod 700 "$B/home/nonroot"
  printf '%s\n' 'FROM scratch' 'COPY rootfs/ /' 'COPY --chown=65532:65532 home/ /home/' >"$B/Containerfile"
  if out=$("${BUILDAH[@]}" bud --quiet -f "$B/Containerfile" -t "$BASE_TAG" "$B" 2>&1); then
    ok "base image $BASE_TAG (scratch + passwd/group with nonroot 65532, CA certificates, /tmp 1777, /home/nonroot)"
  else bad "building $BASE_TAG: $(tail -3 <<<"$out")"; return; fi

  # ---- both images, from the Dockerfiles, with prebuilt binaries ------------------------------
  local ctx=$TMP/image-bin bin built=0
  mkdir -p "$ctx/$DOCKER_ARCH"
  for bin in derper operator; do
    [[ -n ${BIN[$bin]:-} ]] || { bad "$bin image: no binary was built"; continue; }
    cp "${BIN[$bin]}" "$ctx/$DOCKER_ARCH/$bin"
    local t0=$SECONDS
    if out=$("${BUILDAH[@]}" bud --quiet -f "$ROOT/$bin/Dockerfile" --build-arg BINARY=prebuilt \
          --build-arg BASE_IMAGE="$BASE_TAG" --build-arg VERSION="$APP_VERSION" \
          --build-arg REVISION="$(cd "$ROOT" && git rev-parse HEAD 2>/dev/null || echo unknown)" \
          -t "${IMAGE[$bin]}" "$ctx" 2>&1); then
      ok "$bin image ${IMAGE[$bin]} built from $bin/Dockerfile (BINARY=prebuilt, BASE_IMAGE=$BASE_TAG) in $((SECONDS - t0))s"
      built=$((built + 1))
    else bad "$bin image: buildah bud failed: $(tail -5 <<<"$out")"; fi
  done
  ((built == 2)) || return
  local cfg size base_size
  base_size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$BASE_TAG")
  for bin in derper operator; do
    cfg=$("${PODMAN[@]}" image inspect --format '{{json .Config}}' "${IMAGE[$bin]}")
    size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "${IMAGE[$bin]}")
    local want_cmd=null; [[ $bin == operator ]] && want_cmd='["run"]'
    if jq -e --arg bin "$bin" --arg v "$APP_VERSION" --arg base "$BASE_TAG" --argjson cmd "$want_cmd" '
        .User == "65532:65532" and .Entrypoint == ["/usr/local/bin/" + $bin] and .Cmd == $cmd
        and .Labels["org.opencontainers.image.version"] == $v
        and .Labels["org.opencontainers.image.base.name"] == $base' <<<"$cfg" >/dev/null; then
      ok "$bin image config: User 65532:65532, Entrypoint /usr/local/bin/$bin, Cmd $want_cmd, version and base labels"
    else bad "$bin image config: $(jq -c '{User, Entrypoint, Cmd, Labels}' <<<"$cfg")"; fi
    note "$bin image: $((size / 1024)) KiB ($(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }') MiB uncompressed; the local base is $((base_size / 1024)) KiB of it, the binary $(($(stat -c %s "${BIN[$bin]}") / 1024)) KiB)"
  done
  # Archives for the real-kubelet rig (tests/cluster/up --image-archive), when asked for.
  if [[ -n ${IMAGES_ARCHIVE_DIR:-} ]]; then
    mkdir -p "$IMAGES_ARCHIVE_DIR"
    for bin in derper operator; do
      rm -f "$IMAGES_ARCHIVE_DIR/$bin.tar"
      "${PODMAN[@]}" save --format docker-archive -o "$IMAGES_ARCHIVE_DIR/$bin.tar" "${IMAGE[$bin]}" >/dev/null 2>"$TMP/save.err" \
        && ok "$bin image saved to $IMAGES_ARCHIVE_DIR/$bin.tar" || bad "podman save ${IMAGE[$bin]}: $(cat "$TMP/save.err")"
    done
  fi
  [[ ${IMAGES_BUILD_ONLY:-0} == 1 ]] && return
  # /app/certs: the derper's volume, writable by 65532 in a fresh named volume.
  local ctr mp
  if ctr=$("${BUILDAH[@]}" from --pull-never "${IMAGE[derper]}" 2>/dev/null) && mp=$("${BUILDAH[@]}" mount "$ctr"); then
    if [[ $(stat -c '%u:%g' "$mp/app/certs") == 65532:65532 && $(stat -c '%u:%a' "$mp/usr/local/bin/derper") == 0:755 ]]; then
      ok "derper image: /app/certs owned by 65532:65532, /usr/local/bin/derper root-owned 0755"
    else bad "derper image: /app/certs $(stat -c '%u:%g %a' "$mp/app/certs"), binary $(stat -c '%u:%a' "$mp/usr/local/bin/derper")"; fi
    "${BUILDAH[@]}" umount "$ctr" >/dev/null; "${BUILDAH[@]}" rm "$ctr" >/dev/null
  else bad "derper image: cannot mount it to inspect its files"; fi

  # ---- Tailscale's Go peers (derprelay, derpprobe, stuncheck) --------------------------------
  local tsbin
  tsbin=$("$ROOT/tests/interop/build" 2>"$TMP/interop-build.log" | tail -1)
  if [[ ! -x $tsbin/derprelay || ! -x $tsbin/derpprobe ]]; then
    bad "tests/interop/build (Tailscale's Go peers) failed: $(tail -3 "$TMP/interop-build.log")"; return
  fi

  # ---- the derper image as the operator renders it ------------------------------------------
  IMG_NS=derp-img-$$
  ip netns add "$IMG_NS" || { bad "ip netns add $IMG_NS"; IMG_NS=; return; }
  nsenter_img ip link set lo up
  local R=$TMP/render
  mkdir -p "$R"
  cat >"$R/nodes.yaml" <<'EOF'
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a}
  status:
    addresses:
    - {type: InternalIP, address: 127.0.0.1}
EOF
  # Port 443 (+80, 3478): the operator's defaults, self-signed IP certificate (Pin).
  cat >"$R/p443.yaml" <<'EOF'
apiVersion: derpfleet.io/v1alpha1
kind: DerpRegion
metadata: {name: img443, namespace: derp}
spec:
  regionId: 960
  code: img443
  tls: {selfSigned: {}}
  addressTypes: [InternalIP]
  ipFamilies: [IPv4]
EOF
  # A high port, non-root, bound to the node IP, a cert-manager-style Secret for a DNS name.
  cat >"$R/high.yaml" <<'EOF'
apiVersion: derpfleet.io/v1alpha1
kind: DerpRegion
metadata: {name: imghigh, namespace: derp}
spec:
  regionId: 961
  code: imghigh
  hostnameTemplate: "{node}.derp.test"
  tls: {secretName: imghigh-tls}
  addressTypes: [InternalIP]
  ipFamilies: [IPv4]
  bindToNodeIP: true
  mesh: {enabled: false}
  ports: {derpPort: 8443, stunPort: 3479, httpPort: -1, metricsPort: 9732}
EOF
  # The Secrets the controller (selfSigned) and cert-manager (issuer) would write.
  mkdir -p "$R/sec-p443-tls" "$R/sec-p443-mesh" "$R/sec-high-tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$R/sec-p443-tls/tls.key" -out "$R/sec-p443-tls/tls.crt" 2>/dev/null
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$R/sec-p443-mesh/mesh.key"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=derp-fleet images test CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -days 30 -keyout "$R/ca.key" -out "$R/sec-high-tls/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=node-a.derp.test -keyout "$R/sec-high-tls/tls.key" -out "$R/leaf.csr" 2>/dev/null
  openssl x509 -req -in "$R/leaf.csr" -CA "$R/sec-high-tls/ca.crt" -CAkey "$R/ca.key" -CAcreateserial -days 30 \
    -extfile <(printf '%s\n' 'subjectAltName=DNS:node-a.derp.test' 'extendedKeyUsage=serverAuth' 'basicConstraints=CA:FALSE') \
    -out "$R/sec-high-tls/tls.crt" 2>/dev/null
  local name
  for name in p443 high; do
    if "${BIN[operator]}" render -f "$R/$name.yaml" --nodes "$R/nodes.yaml" >"$R/$name.rendered.yaml" 2>"$R/$name.render.err" \
       && grep -q '^kind: DaemonSet' "$R/$name.rendered.yaml"; then :; else
      bad "operator render -f $name.yaml: $(tail -3 "$R/$name.render.err")"; continue
    fi
    derper_container "$name" "$tsbin"
  done

  # ---- the derper image under the usual Let's Encrypt recipe, pointed at Pebble -------------
  acme_image


  # ---- the operator image against the rig ---------------------------------------------------
  operator_container
}

# acme_image: tests/acme/run --image, which runs this image as `docker run -v ...:/app/certs -e
# DERP_DOMAIN=...` against Pebble in a namespace of its own; each of its checks counts here.
acme_image() {
  local out=$TMP/acme-image.out line
  ACME_PODMAN="${PODMAN[*]}" "$ROOT/tests/acme/run" --image "${IMAGE[derper]}" >"$out" 2>&1
  local rc=$?
  while IFS= read -r line; do
    case $line in
      "PASS "*) ok "derper image, Let's Encrypt recipe (Pebble): ${line#PASS }" ;;
      "FAIL "*) bad "derper image, Let's Encrypt recipe (Pebble): ${line#FAIL }" ;;
    esac
  done <"$out"
  if ((rc != 0)) && ! grep -q '^FAIL ' "$out"; then
    bad "derper image, Let's Encrypt recipe: tests/acme/run --image exited $rc: $(tail -3 "$out" | tr '\n' ' ')"
  fi
}

# run_until_ready LABEL NAME PROBES SECONDS ARGS...: podman run -d, then wait (bounded) until every
# probe URL the kubelet would GET answers 200, or the container exits.
run_until_ready() {
  local label=$1 cname=$2 probes=$3 secs=$4 err kind_ url up=0; shift 4
  err=$(nsenter_img "${PODMAN[@]}" run -d --name "$cname" "$@" 2>&1 >/dev/null) \
    || { bad "$label: podman run failed: $(tail -3 <<<"$err")"; return 1; }
  IMG_CONTAINERS+=("$cname")
  for _ in $(seq 1 $((secs * 5))); do
    up=1
    while read -r kind_ url; do nsenter_img curl -sf --max-time 1 -o /dev/null "$url" || up=0; done <"$probes"
    ((up)) && break
    [[ $(nsenter_img "${PODMAN[@]}" inspect --format '{{.State.Running}}' "$cname" 2>/dev/null) == true ]] || break
    sleep 0.2
  done
  if ((up)); then ok "$label: container up; the probes answer 200: $(awk '{ printf "%s %s; ", $1, $2 }' "$probes")"; return 0; fi
  bad "$label: not ready: $(nsenter_img "${PODMAN[@]}" logs --tail 10 "$cname" 2>&1 | tr '\n' ' ' | cut -c1-600)"
  return 1
}

# derper_container NAME TSBIN: run the rendered DaemonSet's pod in the namespace and check it.
derper_container() {
  local name=$1 tsbin=$2 R=$TMP/render ds secrets=() args=() cname="derp-img-$1-$$"
  ds=$(awk '/^kind: DaemonSet/ { d = 1 } d && /^  name: / { print $2; exit }' "$R/$name.rendered.yaml")
  case $name in
    p443) secrets=(--secret img443-derper-tls="$R/sec-p443-tls" --secret img443-derper-mesh-key="$R/sec-p443-mesh") ;;
    high) secrets=(--secret imghigh-tls="$R/sec-high-tls") ;;
  esac
  if ! mapfile -d '' -t args < <(python3 "$ROOT/tests/images/podman-args.py" "$R/$name.rendered.yaml" "DaemonSet/$ds" \
        --node-name node-a --host-ip 127.0.0.1 --work "$R/$name-pod" "${secrets[@]}" 2>"$R/$name.args.err") \
     || [[ -s $R/$name.args.err ]]; then
    bad "derper ($name): the rendered pod spec: $(cat "$R/$name.args.err")"; return
  fi
  local shown
  shown=$(printf '%s ' "${args[@]}" | sed "s|$R/$name-pod/volumes/|<vol>/|g")
  note "derper ($name): podman run $shown"
  run_until_ready "derper ($name)" "$cname" "$R/$name-pod/probes" 20 "${args[@]}" || return
  local pid
  pid=$(nsenter_img "${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$cname")
  local uid gid capeff nnp want_uid want_caps
  uid=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status"); gid=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
  capeff=$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status"); nnp=$(awk '/^NoNewPrivs:/ { print $2 }' "/proc/$pid/status")
  # Only NET_BIND_SERVICE (bit 10) for port 443 as uid 0; nothing for the high port.
  if [[ $name == p443 ]]; then want_uid=0; want_caps=0000000000000400; else want_uid=65532; want_caps=0000000000000000; fi
  if [[ $uid == "$want_uid $want_uid $want_uid $want_uid" && $capeff == "$want_caps" && $nnp == 1 ]]; then
    ok "derper ($name): runs as uid ${uid%% *} gid ${gid%% *}, CapEff $capeff, NoNewPrivs 1 (as rendered)"
  else bad "derper ($name): uid '$uid' gid '$gid' CapEff $capeff NoNewPrivs $nnp (want uid $want_uid, CapEff $want_caps)"; fi
  # Read-only root: the key went to the state emptyDir, nothing else was writable.
  if [[ -s $R/$name-pod/volumes/state/derper.key ]]; then ok "derper ($name): node key written to the state emptyDir (root filesystem read-only)"
  else bad "derper ($name): no derper.key in the state volume: $(ls -A "$R/$name-pod/volumes/state")"; fi
  # The map a client gets, and Tailscale's Go client relaying through the container.
  local port stun ca map=$R/$name.map.json
  port=$(grep -oE -- '-a=[^ ]*:[0-9]+' <<<"${args[*]}" | head -1 | sed 's/.*://')
  stun=$(grep -oE -- '-stun-port=[0-9]+' <<<"${args[*]}" | head -1 | cut -d= -f2)
  if [[ $name == p443 ]]; then
    "$tsbin/derpkit" derpmap -region 960 -code img443 -host 127.0.0.1 -ipv4 127.0.0.1 -port "$port" -stun-port "$stun" \
      -cert "$R/sec-p443-tls/tls.crt" >"$map"
    ca=$R/sec-p443-tls/tls.crt
  else
    "$tsbin/derpkit" derpmap -region 961 -code imghigh -host node-a.derp.test -ipv4 127.0.0.1 -port "$port" \
      -stun-port "$stun" >"$map"
    ca=$R/sec-high-tls/ca.crt
  fi
  if nsenter_img timeout -k 5 120 env SSL_CERT_FILE="$ca" "$tsbin/derprelay" -map "$map" -per-class 20 -random 100 -small 1000 \
       >"$R/$name.derprelay.out" 2>&1; then
    ok "derper ($name): Tailscale's derphttp clients relay through the container on port $port: $(grep -cE '^(ok|PASS)' "$R/$name.derprelay.out") checks ($(tail -1 "$R/$name.derprelay.out"))"
  else bad "derper ($name): derprelay on port $port: $(grep -E 'FAIL|fail' "$R/$name.derprelay.out" | head -3 | tr '\n' ' ')"; fi
  local probe_args=(-once -spread=false -derp-map "file://$map")
  [[ $name == high ]] && probe_args+=(-bw-interval 1s -bw-probe-size-bytes 1000000)
  # (derpprobe flags certificates that expire within 7 days, so the CA-issued one lives 30.)
  # derpprobe's TLS probe dials the HostName: a private /etc/hosts names node-a.derp.test (a mount
  # namespace of its own; the host's file is untouched).
  printf '127.0.0.1 localhost\n127.0.0.1 node-a.derp.test\n' >"$R/hosts"
  nsenter_img timeout -k 5 120 unshare --mount --propagation private sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' \
    "$R/hosts" env SSL_CERT_FILE="$ca" "$tsbin/derpprobe" "${probe_args[@]}" >"$R/$name.derpprobe.out" 2>&1
  local rc=$? o=$R/$name.derpprobe.out good bad_n
  good=$(grep -cE '(^| )good: ' "$o"); bad_n=$(grep -cE '(^| )bad: ' "$o")
  if [[ $name == p443 ]]; then
    # An IP HostName: derpprobe's node-pair probe needs a DNS name (tests/interop/README.md, spec §13).
    if grep -qE ' good: derp/[^ ]*/960a/tls:' "$o" && grep -qE ' good: derp/[^ ]*/960a/udp:' "$o" \
       && ((bad_n == 0 || bad_n == $(grep -cE ' bad: derp/[^ ]*/960a/960a/mesh: TLS server name "" != derp hostname "127.0.0.1"' "$o"))); then
      ok "derper ($name): derpprobe: tls (pinned IP certificate on 443) and udp good; $good good, $bad_n bad (node-pair needs a DNS name)"
    else bad "derper ($name): derpprobe exit $rc: $(grep -E 'good:|bad:' "$o" | head -6 | tr '\n' ' ')"; fi
  else
    local missing="" pr
    for pr in "/961a/tls:" "/961a/udp:" "/961a/961a/mesh:" "/961a/961a/bw:"; do
      grep -qE "(^| )good: derp/[^ ]*$pr" "$o" || missing+=" ${pr%:}"
    done
    if ((rc == 0 && bad_n == 0)) && [[ -z $missing ]]; then
      ok "derper ($name): derpprobe passes: $good good (tls, udp, node-pair, bandwidth), 0 bad"
    else bad "derper ($name): derpprobe exit $rc, $bad_n bad${missing:+, not good:$missing}: $(grep -E 'bad:' "$o" | head -3 | tr '\n' ' ')"; fi
  fi
  # SIGTERM (podman stop, as the kubelet stops a pod) -> exit 0 within the grace period.
  local t0=$SECONDS code
  nsenter_img "${PODMAN[@]}" stop -t 10 "$cname" >/dev/null 2>&1
  code=$(nsenter_img "${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$cname")
  if [[ $code == 0 ]] && ((SECONDS - t0 < 10)); then ok "derper ($name): SIGTERM: exit 0 in $((SECONDS - t0))s"
  else bad "derper ($name): stop: exit $code after $((SECONDS - t0))s"; fi
}

# operator_container: the chart installed on the rig with no replica of its own; the operator
# image runs as the one replica with the chart's container spec and a real ServiceAccount token.
operator_container() {
  local R=$TMP/op cname="derp-img-operator-$$" helm kubectl
  mkdir -p "$R"
  IMG_RIG=$R/rig
  if ! nsenter_img "$ROOT/tests/cluster/up" --state "$IMG_RIG" --no-kwok --no-certmanager --no-process-kubelet \
       >"$R/up.log" 2>&1; then
    bad "operator image: tests/cluster/up failed: $(tail -3 "$R/up.log" | tr '\n' ' ')"; return
  fi
  # shellcheck disable=SC1091
  source "$IMG_RIG/env"
  kubectl=(nsenter_img "$IMG_RIG/bin/kubectl"); helm=(nsenter_img "$IMG_RIG/bin/helm")
  # Everything the chart installs (CRD, ServiceAccount, RBAC, Service), with no replica: the
  # container below is the replica, its spec taken from the chart's Deployment.
  if ! "${helm[@]}" install derp-fleet "$ROOT/charts/derp-fleet" -n derp-fleet --create-namespace \
       --set replicaCount=0 >"$R/helm.log" 2>&1; then
    bad "operator image: helm install: $(tail -3 "$R/helm.log")"; return
  fi
  "${helm[@]}" template derp-fleet "$ROOT/charts/derp-fleet" -n derp-fleet --kube-version "$RIG_K8S_VERSION" \
    >"$R/chart.yaml" 2>>"$R/helm.log" || { bad "operator image: helm template: $(tail -3 "$R/helm.log")"; return; }
  local sa
  sa=$(python3 -c 'import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Deployment": print(d["spec"]["template"]["spec"]["serviceAccountName"])' "$R/chart.yaml")
  # The projected kube-api-access volume as the kubelet writes it: a bound token (TokenRequest),
  # the cluster CA and the namespace.
  mkdir -p "$R/sa"
  if ! "${kubectl[@]}" -n derp-fleet create token "$sa" --duration=1h >"$R/sa/token" 2>"$R/token.err"; then
    bad "operator image: kubectl create token $sa: $(cat "$R/token.err")"; return
  fi
  cp "$RIG_CA" "$R/sa/ca.crt"; printf derp-fleet >"$R/sa/namespace"
  chmod 755 "$R/sa"; chmod 644 "$R/sa"/*
  local args=()
  # The kubelet's service-link variables for the kubernetes Service: its ClusterIP is a label
  # here (no kube-proxy), so they name the apiserver's real address; the real-kubelet rig
  # (tests/story/run --real-kubelet) keeps 10.96.0.1:443 and DNATs it.
  if ! mapfile -d '' -t args < <(python3 "$ROOT/tests/images/podman-args.py" "$R/chart.yaml" Deployment/derp-fleet \
        --node-name rig --host-ip 127.0.0.1 --work "$R/pod" --pod-name derp-fleet-podman --sa-dir "$R/sa" \
        --env KUBERNETES_SERVICE_HOST=127.0.0.1 --env KUBERNETES_SERVICE_PORT="$RIG_APISERVER_PORT" \
        2>"$R/args.err") || [[ -s $R/args.err ]]; then
    bad "operator image: the chart's pod spec: $(cat "$R/args.err")"; return
  fi
  note "operator: podman run $(printf '%s ' "${args[@]}" | sed "s|$R/||g")"
  run_until_ready "operator image" "$cname" "$R/pod/probes" 30 "${args[@]}" || return
  local pid uid capeff
  pid=$(nsenter_img "${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$cname")
  uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status"); capeff=$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")
  if [[ $uid == 65532 && $capeff == 0000000000000000 ]]; then ok "operator image: runs as uid 65532 with no capabilities (the chart's securityContext)"
  else bad "operator image: uid $uid CapEff $capeff"; fi
  local holder
  for _ in $(seq 1 50); do
    holder=$("${kubectl[@]}" -n derp-fleet get lease derp-fleet-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)
    [[ -n $holder ]] && break; sleep 0.2
  done
  [[ $holder == derp-fleet-podman* ]] && ok "operator image: holds the Lease derp-fleet-operator ($holder); its only credential is the token at /var/run/secrets/kubernetes.io/serviceaccount" \
    || bad "operator image: Lease holder '${holder}'"
  # It reconciles as its ServiceAccount: a DerpRegion becomes a DaemonSet.
  "${kubectl[@]}" create namespace derp >/dev/null 2>&1
  printf '%s\n' 'apiVersion: derpfleet.io/v1alpha1' 'kind: DerpRegion' 'metadata: {name: podman, namespace: derp}' \
    'spec: {regionId: 962, code: podman, tls: {selfSigned: {}}}' | "${kubectl[@]}" apply -f - >/dev/null 2>"$R/apply.err"
  local ds=""
  for _ in $(seq 1 100); do
    ds=$("${kubectl[@]}" -n derp get daemonset podman-derper -o jsonpath='{.metadata.name}' 2>/dev/null) && [[ -n $ds ]] && break
    sleep 0.2
  done
  local forb
  forb=$(nsenter_img "${PODMAN[@]}" logs "$cname" 2>&1 | grep -ciE 'forbidden|unauthorized')
  if [[ $ds == podman-derper && $forb == 0 ]]; then ok "operator image: reconciled DerpRegion derp/podman into DaemonSet $ds as ServiceAccount $sa; no forbidden/unauthorized in its log"
  else bad "operator image: DaemonSet '${ds}', $forb forbidden/unauthorized log lines: $(cat "$R/apply.err")"; fi
  nsenter_img "${PODMAN[@]}" stop -t 10 "$cname" >/dev/null 2>&1
  local code
  code=$(nsenter_img "${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$cname")
  [[ $code == 0 ]] && ok "operator image: SIGTERM: exit 0" || bad "operator image: stop: exit $code"
}
