#!/usr/bin/env bash
# What a session lent a GPU (the device tool: 15 minutes of device time a task, 10 a command,
# a bare machine after each give-back) runs, in few calls. Two halves:
#
# Here, on the dev machine, before the first call:
#   bash benchmarks/gpu_session.sh prepare [STATE_DIR]
#     .whl/  the wheels the GPU image lacks: recbole 1.2.1, colorlog 4.7.2, texttable (pure
#            Python, fetched with --no-deps; the image's numpy 2 and pandas are fine, see
#            README "numpy 2, pandas 3, Python 3.12"; ray is not needed)
#     .gpu/  ml-1m.txt, amazon-beauty.txt, amazon-video-games.txt from ../shared/datasets
#            (../shared does not travel) and, given STATE_DIR (an earlier call's files_at), the
#            training state it brought back (.gpu/state/<data set>.tar)
# There, as the device tool's command, with carry [".whl", ".gpu"]:
#   bash benchmarks/gpu_session.sh kernels
#     scan speed and memory (bench_scan), triton vs torch training curves (e2e), streaming step
#     latency (bench_streaming), register/stack use (kernel_resources); outputs in $OUT
#   bash benchmarks/gpu_session.sh compare SECONDS [DATA SET...] [--key=value overrides...]
#     issue #4's comparison (Mamba4Rec vs GRU4Rec vs SASRec, the paper's protocol) on ML-1M,
#     Amazon Beauty and Amazon Video Games (or the data sets named): all nine (data set, model)
#     trainings at once on the one GPU, each its own process (--compare_run), for SECONDS, then
#     stopped (an epoch under way is lost). $OUT gets per data set <name>.tar (rows, tables,
#     curves, logs, and the checkpoints of the models not finished yet, as many as fit in the
#     16 MiB a file may have: the best ones without optimizer state), <name>.md (its table) and
#     status.txt (--compare_status of each): 8 files for 3 data sets, the device tool's most.
#     Run `prepare STATE_DIR` here with that call's files_at, and the next call continues each
#     unfinished model (--resume: exact continuation); a failed model is trained again.
#   bash benchmarks/gpu_session.sh ml1m SECONDS [overrides...]   = compare SECONDS ml-1m ...
#
# The training state lives at a fixed path there (/tmp/mamba4rec-gpu), since the last
# checkpoint names the best one by its absolute path.
set -euo pipefail
cd "$(dirname "$0")/.."
state_root=${STATE_ROOT:-/tmp/mamba4rec-gpu}
py=${PYTHON:-python3}
whl=${WHL_DIR:-.whl}
gpu=${GPU_DIR:-.gpu}
models=(Mamba4Rec GRU4Rec SASRec)
all_sets=(ml-1m amazon-beauty amazon-video-games)
max_bytes=$((16 * 1024 * 1024))  # the device tool brings back files of at most 16 MiB

finished() {  # data set, model: its row is on disk and says it trained (a failed row is trained again)
    grep -q '"status": "ok' "$state_root/$1/rows/$2.json" 2>/dev/null
}

strip_optimizer() {  # best checkpoint in, a copy without its optimizer state out: only its weights
    # are read again (the test evaluation); the last checkpoint keeps the optimizer for --resume
    "$py" - "$1" "$2" <<'PY' || cp "$1" "$2"
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)  # our own run's file
if isinstance(state, dict):
    state.pop("optimizer", None)
torch.save(state, sys.argv[2])
PY
}

stage_state() {  # data set, bytes: into $stage, the checkpoints of its unfinished models, Mamba4Rec
    # first, as many models as fit in bytes (a file the device tool brings back is 16 MiB at most)
    local ds=$1 room=$2 m f size names left=()
    stage="$state_root/.back"
    rm -rf "$stage" && mkdir -p "$stage/$ds/checkpoints"
    for m in "${models[@]}"; do
        finished "$ds" "$m" && continue
        names=$(cd "$state_root" && ls "$ds"/checkpoints/"$m"-* 2>/dev/null || true)
        [ -n "$names" ] || continue
        mkdir -p "$stage/$ds/$m"
        for f in $names; do
            case "$f" in
            *-last.pth|*.json) cp "$state_root/$f" "$stage/$ds/$m/" ;;
            *.pth) strip_optimizer "$state_root/$f" "$stage/$ds/$m/${f##*/}" ;;
            esac
        done
        size=$(du -cb "$stage/$ds/$m" | tail -n 1 | cut -f 1)
        if [ "$size" -le "$room" ]; then
            mv "$stage/$ds/$m"/* "$stage/$ds/checkpoints/"
            room=$((room - size))
        else
            left+=("$m")
        fi
        rm -rf "${stage:?}/$ds/$m"
    done
    if [ ${#left[@]} -gt 0 ]; then
        echo "warning: $ds: no room for the checkpoints of ${left[*]} in the 16 MiB the device tool brings" \
             "back per file: the next call starts them over (or finish them in this one: a longer SECONDS)" >&2
    fi
}

compare_args() {  # data set: run_recbole.py's arguments for its comparison, into args
    args=(run_recbole.py -d "$1" --compare=GRU4Rec,SASRec --compare_dir="$state_root/$1"
          --data_path="$state_root/dataset/" --show_progress=False --resume "${overrides[@]}")
}

need_out() {
    if [ -z "${OUT:-}" ]; then echo "OUT is not set: run this through the device tool (or set OUT=dir)" >&2; exit 2; fi
    mkdir -p "$OUT"
}

setup_device() {  # the carried wheels, importable; the repo itself on the path
    if ! ls "$whl"/*.whl > /dev/null 2>&1; then
        echo "no wheels in $whl/: run 'bash benchmarks/gpu_session.sh prepare' here and carry .whl" >&2; exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$whl"/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } \
        | tee "$OUT/gpu.txt"
    "$py" -c "import importlib.metadata as m, sys; print(sys.version.split()[0], *(f'{n} {m.version(n)}' for n in ('torch', 'triton', 'numpy', 'pandas', 'recbole', 'numba') if __import__('importlib.util').util.find_spec(n)))" | tee -a "$OUT/gpu.txt"
}

case "${1:-}" in
prepare)
    mkdir -p "$whl" "$gpu"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$whl" \
        recbole==1.2.1 colorlog==4.7.2 texttable==1.7.0
    shared=${SHARED_DATASETS:-../shared/datasets}
    for pair in ml-1m:ml-1m/ml-1m.txt amazon-beauty:amazon-beauty/Beauty.txt \
                amazon-video-games:amazon-video-games/Video_Games.txt; do
        if [ -f "$shared/${pair#*:}" ]; then cp "$shared/${pair#*:}" "$gpu/${pair%%:*}.txt"
        else echo "warning: no $shared/${pair#*:}: compare cannot run ${pair%%:*}" >&2; fi
    done
    if [ -n "${2:-}" ]; then
        mkdir -p "$gpu/state"
        cp "$2"/*.tar "$gpu/state/"
    fi
    if ls "$gpu"/state/*.tar > /dev/null 2>&1; then  # carried along, and resumed by the next compare call
        echo "state to resume: $(cd "$gpu/state" && echo *.tar) (rm -r $gpu/state to start over)"
    fi
    for ignored in /.whl/ /.gpu/; do
        grep -qxF "$ignored" .gitignore || echo "warning: $ignored is not in .gitignore" >&2
    done
    du -sh "$whl" "$gpu"
    echo "carry: [\".whl\", \".gpu\"]; command: bash benchmarks/gpu_session.sh compare 420, timeout_s 600  (or: kernels)"
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
    exec bash "$PWD/benchmarks/gpu_session.sh" compare "$seconds" ml-1m "${@:3}"
    ;;
compare)
    seconds=${2:?usage: gpu_session.sh compare SECONDS [DATA SET...] [--key=value...]}
    case "$seconds" in ''|*[!0-9]*|0*) echo "SECONDS must be a whole number > 0, not '$seconds'" >&2; exit 2 ;; esac
    shift 2
    sets=() overrides=()
    for a in "$@"; do
        case "$a" in
        --*) overrides+=("$a") ;;
        ml-1m|amazon-beauty|amazon-video-games) sets+=("$a") ;;
        *) echo "unknown data set '$a': one of ${all_sets[*]} (overrides start with --)" >&2; exit 2 ;;
        esac
    done
    [ ${#sets[@]} -gt 0 ] || sets=("${all_sets[@]}")
    need_out
    for ds in "${sets[@]}"; do
        if [ ! -f "$gpu/$ds.txt" ]; then echo "no $gpu/$ds.txt: run prepare here and carry .gpu" >&2; exit 2; fi
    done
    setup_device
    mkdir -p "$state_root"
    for ds in "${sets[@]}"; do
        if [ -f "$gpu/state/$ds.tar" ]; then tar -xf "$gpu/state/$ds.tar" -C "$state_root"; fi
        mkdir -p "$state_root/$ds"
        if [ ! -f "$state_root/dataset/$ds/$ds.inter" ]; then
            kcore=()
            [ "$ds" = ml-1m ] && kcore=(--kcore-item 5)  # the paper's ML-1M: 6,040 / 3,416 / 999,611
            "$py" datasets/prepare.py --format seq-text --input "$gpu/$ds.txt" --dataset "$ds" \
                --output-dir "$state_root/dataset" "${kcore[@]}"
        fi
    done
    set +e
    # every (data set, model) at once: these models are far too small to fill an H200 one at a
    # time. SIGTERM at the limit: the last checkpoint is written to a temporary file and renamed,
    # so a kill mid-epoch loses that epoch only.
    jobs_run=() pids=()
    for ds in "${sets[@]}"; do
        for m in "${models[@]}"; do
            compare_args "$ds"
            OMP_NUM_THREADS=1 timeout --kill-after=30 "$seconds" "$py" "${args[@]}" --compare_run="$m" \
                >> "$state_root/$ds/$m.log" 2>&1 &  # appended: the log of every call so far
            pids+=($!) jobs_run+=("$ds $m")
        done
    done
    echo "training ${#pids[@]} models for at most $seconds s: ${jobs_run[*]/ /:}"
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        status=$?
        case $status in
        0) note="finished" ;;
        124|137) note="stopped at the time limit; the next call resumes" ;;
        *) note="failed: its row and ${jobs_run[$i]%% *}/${jobs_run[$i]#* }.log say why" ;;
        esac
        echo "${jobs_run[$i]}: exit status $status ($note)"
    done
    table_pids=()
    for ds in "${sets[@]}"; do  # every model of a data set finished: a pass that trains nothing
        done_all=1              # writes its whole table (the passes run side by side)
        for m in "${models[@]}"; do finished "$ds" "$m" || done_all=0; done
        if [ $done_all = 1 ]; then
            compare_args "$ds"
            { timeout 120 "$py" "${args[@]}" > "$state_root/$ds/table.log" 2>&1 \
                || echo "$ds: the table pass failed (see table.log in $ds.tar)"; } &
            table_pids+=($!)
        fi
    done
    for p in "${table_pids[@]}"; do wait "$p"; done
    for ds in "${sets[@]}"; do
        compare_args "$ds"
        { echo "== $ds"; "$py" "${args[@]}" --compare_status 2>&1; } >> "$OUT/status.txt"
        # back: rows, tables, curves and logs, and the checkpoints of the models not finished yet
        files=$(cd "$state_root" && ls -d "$ds"/*.log "$ds"/compare.* "$ds"/rows "$ds"/curves "$ds"/curves.csv \
            "$ds"/per_user 2>/dev/null || true)
        stage_state "$ds" $((max_bytes - $(cd "$state_root" && du -cb $files | tail -n 1 | cut -f 1) - 1048576))
        (cd "$state_root" && tar -cf "$OUT/$ds.tar" $files -C "$stage" $(cd "$stage" && find "$ds" -type f | sort))
        if [ -f "$state_root/$ds/compare.md" ]; then cp "$state_root/$ds/compare.md" "$OUT/$ds.md"; fi
    done
    cat "$OUT/status.txt"
    ls -la "$OUT"
    ;;
*)
    sed -n '2,30p' "$0" >&2
    exit 2
    ;;
esac
