# Sourced by the benchmark scripts: the shared Python venv target/bench-venv.
#
#   bench_venv NAME REQUIREMENTS_FILE...
#
# Creates the venv once and reinstalls into it only when one of the requirements
# files changed since NAME's last install (a stamp per NAME), so a later run needs
# no network. Sets $venv.
venv="target/bench-venv"

bench_venv() {
    local name="$1"
    shift
    local stamp="$venv/.requirements-$name.sha256"
    local want
    want="$(cat "$@" | sha256sum | cut -d' ' -f1)"
    if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
        echo "==> setting up $venv for $name ($*)" >&2
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$1"
        echo "$want" >"$stamp"
    fi
}
