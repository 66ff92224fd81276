#!/usr/bin/env bash
# Issue #4's full comparison on the two Amazon data sets, in the background-friendly way:
# prepares the data from ../shared/datasets when it is not there yet, then runs
#   Mamba4Rec vs GRU4Rec vs SASRec (paper protocol: early stopping, full ranking)
# on Amazon Beauty, then on Amazon Video Games, each with --resume. Interrupt it at any
# point (kill, end of a session) and run the same command again: finished models keep their
# rows, the interrupted one continues from its last epoch.
#
#   bash benchmarks/compare_amazon.sh OUT_DIR [extra run_recbole.py overrides...]
#   nohup nice -n 5 bash benchmarks/compare_amazon.sh /work/runs > /work/runs/compare.log 2>&1 &
#   LANES=2 nohup nice -n 5 bash benchmarks/compare_amazon.sh /work/runs > /work/runs/compare.log 2>&1 &
#
# LANES=2 (for a 2-core machine): two processes of one thread each share the comparisons
# (--compare_run): lane 1 runs Mamba4Rec then GRU4Rec on Beauty, then on Video Games; lane 2
# runs SASRec (the slowest) on Beauty, then on Video Games; logs in OUT_DIR/<folder>/lane{1,2}.log.
# Then one pass per data set, with nothing left to train, writes the full tables.
# Stop it with `kill <pid of this script>` (its lanes and their trainings go too).
# One-thread processes lose less to a core taken by other work than a two-thread one does
# (torch's threads wait for each other), and SASRec need not wait hours for the others.
# The rows record their thread count: seconds per epoch are comparable only at equal threads
# and load (benchmarks/bench_epoch_cpu.py measures them side by side on a quiet machine).
#
# OUT_DIR/dataset/<name>/      prepared atomic files
# OUT_DIR/<name>/out/          compare.md, compare.csv, compare.png, rows/, checkpoints/
# Beauty keeps the folder name beauty8/ of the session that started it (its first 8 epochs
# were run with --epochs=8; the rows of that run were moved aside, and the models continue).
main() {  # a function, so that bash has read all of it before running (edits are then safe)
set -euo pipefail
case "${LANES:-1}" in 1|2) ;; *) echo "LANES must be 1 or 2, not '$LANES'" >&2; exit 2 ;; esac
trap stop_lanes EXIT  # stopping this script stops its lanes too
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/compare_amazon.sh OUT_DIR [overrides...]}
shift
python=${PYTHON:-python}
shared=${SHARED_DATASETS:-../shared/datasets}
sets=("amazon-beauty beauty8" "amazon-video-games video-games")

prepare amazon-beauty amazon-beauty/Beauty.txt
prepare amazon-video-games amazon-video-games/Video_Games.txt
if [ "${LANES:-1}" = 2 ]; then
    lane 1 Mamba4Rec,GRU4Rec "$@" &
    local lane1=$!
    lane 2 SASRec "$@" &
    local lane2=$!
    local folders=("${sets[@]#* }")
    echo "lanes: $lane1 (Mamba4Rec, GRU4Rec), $lane2 (SASRec); logs $out/{$(IFS=,; echo "${folders[*]}")}/lane{1,2}.log"
    wait "$lane1" || echo "lane 1 ended with status $?"
    wait "$lane2" || echo "lane 2 ended with status $?"
fi
# all models of each data set (with LANES=2 only a model whose lane failed is left to train;
# the pass writes the whole table)
for set in "${sets[@]}"; do
    compare $set "$@" || echo "${set%% *}: a model failed (its row says why); going on"
done
}

stop_lanes() {  # each lane subshell, then the training it was running
    local p kids
    for p in $(jobs -p); do
        kids=$(pgrep -P "$p" || true)
        kill "$p" $kids 2>/dev/null || true
    done
}

prepare() {  # name, file under $shared
    local name=$1 src=$2
    if [ ! -f "$out/dataset/$name/$name.inter" ]; then
        "$python" datasets/prepare.py --format seq-text --input "$shared/$src" --dataset "$name" \
            --output-dir "$out/dataset"
    fi
}

compare() {  # name, folder, overrides...
    local name=$1 folder=$2
    shift 2
    echo "== $name: $(date -u +%FT%TZ)"
    "$python" run_recbole.py -d "$name" --compare=GRU4Rec,SASRec --compare_dir="$out/$folder/out" \
        --data_path="$out/dataset/" --show_progress=False --resume "$@"
}

lane() {  # number, models, overrides...: those models on each data set, one thread
    local n=$1 models=$2
    shift 2
    for set in "${sets[@]}"; do
        local folder=${set#* }
        mkdir -p "$out/$folder"
        OMP_NUM_THREADS=1 compare $set "$@" --compare_run="$models" >> "$out/$folder/lane$n.log" 2>&1 \
            || echo "lane $n: ${set%% *} ended with status $? (see $out/$folder/lane$n.log)"
    done
}

main "$@"
exit
