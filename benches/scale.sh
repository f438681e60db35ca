#!/usr/bin/env bash
# Scale benchmark: a seeded shoal synth log, segmented by shoal and by the same work
# written with pandas + implicit + scikit-learn, in one run. See benches/README.md.
#
#   benches/scale.sh [--size 1m|10m] [--no-peer] [--keep-data]
#
# 1m:  1,000,000 users x 50,000 items x 20,000,000 rows (8 files); shoal with one
#      in-process worker and with four (labels compared), the peer script.
# 10m: 10,000,000 users x 500,000 items x 200,000,000 rows (40 files),
#      recommendations off (top_n = 0), 32 shards; shoal with one worker process, and as a
#      `shoal coordinator` + 4 `shoal worker` processes (labels compared); the
#      peer is not run at this size (benches/README.md says why).
#
# Every process runs under /usr/bin/time (peak RSS). Data and outputs live under
# target/bench-out/scale/<size>/ (the log is generated once and reused).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

size=1m
peer=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) size="$2"; shift 2 ;;
        --no-peer) peer=0; shift ;;
        *) echo "scale.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$size" in
    1m) users=1000000 items=50000 rows=20000000 files=8 top_n=10 shards=16 ;;
    10m) users=10000000 items=500000 rows=200000000 files=40 top_n=0 shards=32; peer=0 ;;
    *) echo "scale.sh: --size is 1m or 10m" >&2; exit 2 ;;
esac

bin="${CARGO_TARGET_DIR:-target}/release/shoal"
base="target/bench-out/scale/$size"
data="$base/data"
timing() { /usr/bin/time -f "%e %M" -o "$1" "${@:2}"; }

# shellcheck source=benches/venv.sh
source benches/venv.sh
bench_venv scale benches/requirements-als.txt benches/requirements.txt

echo "==> cargo build --release" >&2
cargo build --release --bin shoal

if [[ ! -f "$data/job.toml" ]]; then
    echo "==> shoal synth ($users users, $items items, $rows rows, $files files)" >&2
    rm -rf "$data"
    timing "$base/synth.time" "$bin" synth --output "$data" --users "$users" --items "$items" \
        --interactions "$rows" --groups 6 --files "$files" --seed 42
fi

# The spec synth wrote, with this run's outputs, recommendations and shards (at
# 10m, 32: smaller shards are what lets four workers of a quarter of the machine
# each take their share; see benches/README.md).
spec_for() { # name top_n
    sed -e "s#^path = .*#path = \"$root/$base/$1\"#" -e "s#^top_n = .*#top_n = $2#" \
        -e "s#^shards = .*#shards = $shards#" "$data/job.toml" >"$base/$1.toml"
    echo "$base/$1.toml"
}

rm -rf "$base"/shoal-* "$base"/*.time.txt
echo "==> shoal run, 1 worker" >&2
spec="$(spec_for shoal-1 "$top_n")"
timing "$base/shoal-1.time.txt" "$bin" run "$spec" --workers 1 >/dev/null

if [[ "$size" == 1m ]]; then
    echo "==> shoal run, 4 workers in one process" >&2
    spec="$(spec_for shoal-4 "$top_n")"
    timing "$base/shoal-4.time.txt" "$bin" run "$spec" --workers 4 >/dev/null
    echo "==> shoal run, 1 worker, no recommendations (the 10m run's yardstick)" >&2
    spec="$(spec_for shoal-norec 0)"
    timing "$base/shoal-norec.time.txt" "$bin" run "$spec" --workers 1 >/dev/null
else
    echo "==> shoal coordinator + 4 shoal worker processes" >&2
    port=$((20000 + RANDOM % 20000))
    mem="$(awk '/MemTotal/ {print int($2 / 4) "K"}' /proc/meminfo)"
    timing "$base/coordinator.time.txt" "$bin" coordinator --listen "127.0.0.1:$port" \
        --http-listen "127.0.0.1:$((port + 10))" 2>"$base/coordinator.log" &
    pids=($!)
    for w in 1 2 3 4; do
        timing "$base/worker-$w.time.txt" "$bin" worker --coordinator "http://127.0.0.1:$port" \
            --listen "127.0.0.1:$((port + w))" --memory-limit "$mem" 2>"$base/worker-$w.log" &
        pids+=($!)
    done
    # a standing coordinator gives a job the workers registered when it starts
    for _ in $(seq 600); do
        if curl -sf "http://127.0.0.1:$((port + 10))/metrics" | grep -q '^shoal_workers 4$'; then
            break
        fi
        sleep 0.1
    done
    spec="$(spec_for shoal-4 "$top_n")"
    status=0
    "$bin" submit "$spec" --coordinator "http://127.0.0.1:$port" --wait >/dev/null || status=$?
    # stop the processes (SIGTERM: they shut down cleanly and /usr/bin/time reports)
    pkill -TERM -f "^$bin (coordinator|worker) .*127.0.0.1:$port" || true
    for p in "${pids[@]}"; do wait "$p" || true; done
    if [[ "$status" != 0 ]]; then
        echo "scale.sh: the 4-process job failed (exit $status); see $base/*.log" >&2
        exit 1
    fi
fi

if [[ "$peer" == 1 ]]; then
    echo "==> the peer: pandas + implicit + scikit-learn" >&2
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \
        /usr/bin/time -f "%e %M" -o "$base/peer.time.txt" \
        "$venv/bin/python" benches/scale_peer.py --data "$data" --top-n "$top_n" \
        >"$base/peer.json"
fi

exec "$venv/bin/python" benches/scale.py --base "$base" --size "$size"
