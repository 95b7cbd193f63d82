# Shared by tests/cluster/{build,up,down,smoke}. Source it; do not run it.
# Versions come from the pinned go.mod files, so go.mod is the one place to bump.

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS_DIR=$RIG_DIR/peers
RIG_CACHE=${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/peers

export GOTOOLCHAIN=local
export CGO_ENABLED=0
# No VCS stamping: the harness lives in a git checkout that may be dirty; keeps builds reproducible.
[[ ${GOFLAGS:-} == *-buildvcs* ]] || export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"

rig_die() { echo "tests/cluster: ERROR: $*" >&2; exit 1; }
rig_log() { echo "tests/cluster: $*" >&2; }

# rig_modver DIR MODULE -> the version of MODULE required in DIR/go.mod
rig_modver() {
  local v
  v=$(awk -v m="$2" '($1==m && $2 ~ /^v/){print $2; exit} ($1=="require" && $2==m){print $3; exit}' "$1/go.mod")
  [[ -n "$v" ]] || rig_die "no version of $2 in $1/go.mod"
  echo "$v"
}

K8S_VERSION=$(rig_modver "$PEERS_DIR/k8s" k8s.io/kubernetes)
ETCD_VERSION=$(rig_modver "$PEERS_DIR/etcd" go.etcd.io/etcd/server/v3)
KWOK_VERSION=$(rig_modver "$PEERS_DIR/kwok" sigs.k8s.io/kwok)
HELM_VERSION=$(rig_modver "$PEERS_DIR/helm" helm.sh/helm/v3)
CERTMANAGER_VERSION=$(rig_modver "$PEERS_DIR/certmanager" github.com/cert-manager/cert-manager)

K8S_HOME=$RIG_CACHE/k8s-$K8S_VERSION
KUBELET_HOME=$RIG_CACHE/kubelet-$K8S_VERSION
ETCD_HOME=$RIG_CACHE/etcd-$ETCD_VERSION
KWOK_HOME=$RIG_CACHE/kwok-$KWOK_VERSION
HELM_HOME=$RIG_CACHE/helm-$HELM_VERSION
CERTMANAGER_HOME=$RIG_CACHE/certmanager-$CERTMANAGER_VERSION

# The harness (process-kubelet, rigctl) is our own code: keyed by a hash of its sources.
rig_harness_hash() {
  (cd "$RIG_DIR/harness" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
HARNESS_HOME=$RIG_CACHE/harness-$(rig_harness_hash)

# crds_established SECS CRD...: polls until every named CRD reports Established. Not `kubectl wait
# --for=condition=Established`: it fails at once ("accessor error: <nil>") while a CRD just
# created has no conditions yet, which a loaded machine shows.
crds_established() {
  local deadline=$((SECONDS + $1)) crd; shift
  for crd in "$@"; do
    until [[ $("${KUBECTL:-kubectl}" get crd "${crd#customresourcedefinition.apiextensions.k8s.io/}" \
                 -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null) == True ]]; do
      ((SECONDS >= deadline)) && return 1
      sleep 0.2
    done
  done
}
