# Sourced by the check and test scripts: Python tools pinned to exact versions, in
# a venv under target/ that is reused while every pin matches.
#
#   pinned_venv VENV SPEC...      SPEC: name==version or name[extras]==version
#   installed_version VENV NAME   the version installed in VENV, or nothing
#
# Extras are installed but not checked: a caller that needs what an extra brings
# checks for it (scripts/test.sh looks for moto_server).
#
# pinned_venv creates VENV with ${PYTHON:-python3} when it is missing, installs the
# specs when any pinned version is not the installed one (PyPI is needed only
# then), and fails when they still do not match afterwards.

installed_version() {
    "$1/bin/python" - "$2" <<'PY' 2>/dev/null || true
import sys, importlib.metadata as m
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
PY
}

# Whether every SPEC's version is the one installed in VENV: pins_match VENV SPEC...
pins_match() {
    local venv="$1" spec name
    shift
    [[ -x "$venv/bin/python" ]] || return 1
    for spec in "$@"; do
        name="${spec%%==*}"
        name="${name%%[*}"
        [[ "$(installed_version "$venv" "$name")" == "${spec##*==}" ]] || return 1
    done
}

pinned_venv() {
    local venv="$1"
    shift
    pins_match "$venv" "$@" && return 0
    echo "installing $* into $venv" >&2
    [[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    pins_match "$venv" "$@" || { echo "pinned_venv: $* did not install as pinned into $venv" >&2; return 1; }
}
