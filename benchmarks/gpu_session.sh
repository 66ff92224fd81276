#!/usr/bin/env bash
# What a session lent a GPU (the device tool: 30 minutes a session, 10 a command, a bare
# machine each time) runs, in few calls. Two halves:
#
# Here, on the dev machine, before the first call:
#   bash benchmarks/gpu_session.sh prepare [STATE_DIR]
#     .whl/  the wheels the GPU image lacks: recbole 1.2.1, colorlog 4.7.2, texttable (pure
#            Python, fetched with --no-deps; the image's numpy 2 and pandas are fine, see
#            README "numpy 2, pandas 3, Python 3.12"; ray is not needed)
#     .gpu/  ml-1m.txt from ../shared/datasets (../shared does not travel) and, given
#            STATE_DIR (an earlier call's files_at), the ML-1M training state it brought back
# There, as the device tool's command, with carry [".whl", ".gpu"]:
#   bash benchmarks/gpu_session.sh kernels
#     scan speed and memory (bench_scan), triton vs torch training curves (e2e), streaming step
#     latency (bench_streaming), register/stack use (kernel_resources); outputs in $OUT
#   bash benchmarks/gpu_session.sh ml1m SECONDS [overrides...]
#     the ML-1M comparison (Mamba4Rec vs GRU4Rec vs SASRec, the paper's protocol) for SECONDS,
#     then stopped (the epoch under way is lost); every model's state comes back in $OUT as
#     ml1m-<model>.tar with compare.md/.csv and the log. Run `prepare STATE_DIR` here with that
#     call's files_at, and the next call continues (--resume: exact continuation).
#
# The training state lives at a fixed path there (/tmp/mamba4rec-ml1m), since the last
# checkpoint names the best one by its absolute path.
set -euo pipefail
cd "$(dirname "$0")/.."
state_root=${STATE_ROOT:-/tmp/mamba4rec-ml1m}
py=${PYTHON:-python3}
models=(Mamba4Rec GRU4Rec SASRec)

need_out() {
    if [ -z "${OUT:-}" ]; then echo "OUT is not set: run this through the device tool (or set OUT=dir)" >&2; exit 2; fi
    mkdir -p "$OUT"
}

setup_device() {  # the carried wheels, importable; the repo itself on the path
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        echo "no wheels in .whl/: run 'bash benchmarks/gpu_session.sh prepare' here and carry .whl" >&2; exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
        | tee "$OUT/gpu.txt"
    "$py" -c "import importlib.metadata as m, sys; print(sys.version.split()[0], *(f'{n} {m.version(n)}' for n in ('torch', 'triton', 'numpy', 'pandas', 'recbole', 'numba') if __import__('importlib.util').util.find_spec(n)))" | tee -a "$OUT/gpu.txt"
}

case "${1:-}" in
prepare)
    mkdir -p .whl .gpu
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        recbole==1.2.1 colorlog==4.7.2 texttable==1.7.0
    src=${SHARED_DATASETS:-../shared/datasets}/ml-1m/ml-1m.txt
    if [ -f "$src" ]; then cp "$src" .gpu/ml-1m.txt; else echo "warning: no $src: the ml1m step will not run" >&2; fi
    if [ -n "${2:-}" ]; then
        mkdir -p .gpu/state
        cp "$2"/ml1m-*.tar .gpu/state/
    fi
    if ls .gpu/state/*.tar > /dev/null 2>&1; then  # carried along, and resumed by the next ml1m call
        echo "ML-1M state to resume: $(cd .gpu/state && echo *.tar) (rm -r .gpu/state to start over)"
    fi
    for ignored in /.whl/ /.gpu/; do
        grep -qxF "$ignored" .gitignore || echo "warning: $ignored is not in .gitignore" >&2
    done
    du -sh .whl .gpu
    echo "carry: [\".whl\", \".gpu\"]; command: bash benchmarks/gpu_session.sh kernels  (or: ml1m 540)"
    ;;
kernels)
    need_out
    setup_device
    set +e  # one failing benchmark must not cost the others
    timeout 240 "$py" benchmarks/bench_scan.py --device cuda 2>&1 | tee "$OUT/bench_scan.txt"
    timeout 120 "$py" benchmarks/e2e_triton_vs_torch.py 2>&1 | tee "$OUT/e2e_triton_vs_torch.txt"
    timeout 120 "$py" benchmarks/bench_streaming.py --device cuda 2>&1 | tee "$OUT/bench_streaming.txt"
    timeout 60 "$py" benchmarks/kernel_resources.py 2>&1 | tee "$OUT/kernel_resources.txt"
    ;;
ml1m)
    seconds=${2:?usage: gpu_session.sh ml1m SECONDS [overrides...]}
    shift 2
    need_out
    input=${ML1M_INPUT:-.gpu/ml-1m.txt}  # another seq-text file: a smaller stand-in, for a try on CPU
    if [ ! -f "$input" ]; then echo "no $input: run prepare here and carry .gpu" >&2; exit 2; fi
    setup_device
    mkdir -p "$state_root"
    for t in .gpu/state/ml1m-*.tar; do [ -f "$t" ] && tar -xf "$t" -C "$state_root"; done
    if [ ! -f "$state_root/dataset/ml-1m/ml-1m.inter" ]; then
        "$py" datasets/prepare.py --format seq-text --input "$input" --dataset ml-1m \
            --output-dir "$state_root/dataset" --kcore-item 5
    fi
    set +e
    # SIGTERM at the limit: the last checkpoint is written to a temporary file and renamed, so
    # a kill mid-epoch loses that epoch only
    timeout --kill-after=30 "$seconds" "$py" run_recbole.py -d ml-1m --compare=GRU4Rec,SASRec \
        --compare_dir="$state_root/out" --data_path="$state_root/dataset/" --show_progress=False --resume "$@" \
        > "$OUT/ml1m.log" 2>&1
    echo "run_recbole exit status $? (124: stopped at the time limit; the next call resumes)"
    set -e
    for m in "${models[@]}"; do  # the last and the best checkpoint and the row of each model
        files=$(cd "$state_root" && ls out/checkpoints/"$m"-* out/rows/"$m".json 2>/dev/null || true)
        [ -n "$files" ] && (cd "$state_root" && tar -cf "$OUT/ml1m-$m.tar" $files)
    done
    cp "$state_root"/out/compare.md "$state_root"/out/compare.csv "$OUT"/ 2>/dev/null || true
    ls -la "$OUT"
    ;;
*)
    sed -n '2,24p' "$0" >&2
    exit 2
    ;;
esac
