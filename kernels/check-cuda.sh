#!/usr/bin/env bash
# Compiles every CUDA kernel source (kernels/cuda/*.cu) through the backend's own
# NVRTC code path for compute_80 and compute_90, assembles the PTX with ptxas for
# sm_80 and sm_90, and prints registers, shared memory and spills per kernel.
# Fails on any compile error, any ptxas error and any spill. Needs no GPU: NVRTC
# and ptxas come from NVIDIA's PyPI wheels, installed once into a cached venv.
#
# Usage: kernels/check-cuda.sh            (from any directory)
# Env:   SHOAL_CUDA_VENV  venv to use/create (default: <repo>/target/cuda-venv)
#        PYTHON           python interpreter for the venv (default: python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

CUDA_WHEEL_VERSION="12.9.86"
WHEELS=("nvidia-cuda-nvrtc-cu12==$CUDA_WHEEL_VERSION" "nvidia-cuda-nvcc-cu12==$CUDA_WHEEL_VERSION")
ARCHS=(80 90)
venv="${SHOAL_CUDA_VENV:-$repo/target/cuda-venv}"
out="$repo/target/cuda-ptx"

# --- NVRTC + ptxas from the pinned wheels, in a venv reused while it matches. ---
# shellcheck source=scripts/pinned-venv.sh
source scripts/pinned-venv.sh
pinned_venv "$venv" "${WHEELS[@]}" || { echo "check-cuda: the wheels did not install as pinned" >&2; exit 1; }
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nvrtc_lib="$site/nvidia/cuda_nvrtc/lib"
ptxas="$site/nvidia/cuda_nvcc/bin/ptxas"
[[ -e "$nvrtc_lib/libnvrtc.so.12" ]] || { echo "check-cuda: no libnvrtc.so.12 in $nvrtc_lib" >&2; exit 1; }
[[ -x "$ptxas" ]] || { echo "check-cuda: no ptxas at $ptxas" >&2; exit 1; }
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# --- PTX through the project's NVRTC path (kernels::cuda::compile_ptx). ---
rm -rf "$out"
mkdir -p "$out"
arch_args=()
for a in "${ARCHS[@]}"; do arch_args+=("compute_$a"); done
echo "check-cuda: compiling kernels/cuda/*.cu with NVRTC $CUDA_WHEEL_VERSION for ${arch_args[*]}"
if ! cargo run --quiet -p shoal-kernels --example compile_ptx -- "$out" "${arch_args[@]}" >/dev/null; then
    echo "check-cuda: FAILED: NVRTC compile error (log above)" >&2
    exit 1
fi

# Every .cu must have produced PTX for every arch (a source left out of
# kernels::cuda::sources() would otherwise go unchecked).
status=0
for cu in kernels/cuda/*.cu; do
    name="$(basename "$cu" .cu)"
    for a in "${ARCHS[@]}"; do
        if [[ ! -s "$out/$name.compute_$a.ptx" ]]; then
            echo "check-cuda: FAILED: $cu was not compiled for compute_$a (is it in kernels::cuda::sources()?)" >&2
            status=1
        fi
    done
done

# --- ptxas: registers, shared memory, spills. ---
printf '\n%-8s %-20s %-6s %5s %10s %7s %9s %9s\n' source kernel arch regs smem_B stack_B spill_st spill_ld
for ptx in "$out"/*.ptx; do
    file="$(basename "$ptx" .ptx)"   # <source>.compute_XY
    name="${file%%.*}"
    a="${file##*.compute_}"
    log="$out/$file.sm_$a.log"
    if ! "$ptxas" "-arch=sm_$a" -v "$ptx" -o "$out/$file.sm_$a.cubin" >"$log" 2>&1; then
        echo "check-cuda: FAILED: ptxas -arch=sm_$a on $name:" >&2
        cat "$log" >&2
        status=1
        continue
    fi
    # ptxas -v prints, per entry: "Compiling entry function 'K' for 'sm_XY'",
    # "N bytes stack frame, S bytes spill stores, L bytes spill loads",
    # "Used R registers, ... B bytes smem, ...".
    if ! awk -v src="$name" -v arch="sm_$a" '
        /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); k = substr($0, RSTART + 1, RLENGTH - 2) }
        /bytes stack frame/ {
            for (i = 1; i <= NF; i++) {
                if ($(i+1) == "bytes" && $(i+2) == "stack") stack[k] = $i
                if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores") st[k] = $i
                if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "loads") ld[k] = $i
            }
        }
        /Used [0-9]+ registers/ {
            regs[k] = 0; smem[k] = 0
            for (i = 1; i <= NF; i++) {
                if ($(i+1) ~ /^registers/) regs[k] = $i
                if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem[k] = $i
            }
            order[++n] = k
        }
        END {
            bad = 0
            for (j = 1; j <= n; j++) {
                k = order[j]
                flag = (st[k] + ld[k] > 0) ? "  <- SPILLS" : ""
                printf "%-8s %-20s %-6s %5d %10d %7d %9d %9d%s\n", src, k, arch, regs[k], smem[k], stack[k], st[k], ld[k], flag
                if (st[k] + ld[k] > 0) bad = 1
            }
            if (n == 0) { print "no kernels found in ptxas output" > "/dev/stderr"; bad = 1 }
            exit bad
        }' "$log"; then
        status=1
    fi
done

echo
echo "(smem: static shared memory per block; als_cg sizes its shared memory at launch)"
if [[ $status -ne 0 ]]; then
    echo "check-cuda: FAILED (compile errors, ptxas errors or spills above)" >&2
    exit 1
fi
echo "check-cuda: OK: every kernel compiles with NVRTC for ${arch_args[*]} and assembles for sm_${ARCHS[0]}/sm_${ARCHS[1]} without spills"
