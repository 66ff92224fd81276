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
# LANES=N (N >= 2; 2 for a 2-core machine): N processes of one thread each share the work as a
# queue of (data set, model) jobs (--compare_run=MODEL): Beauty's Mamba4Rec, SASRec, GRU4Rec,
# then Video Games' SASRec, Mamba4Rec, GRU4Rec; each lane takes the next job nobody has taken
# (so Beauty's table is complete first and the slowest Video Games model starts early) and
# logs to OUT_DIR/<folder>/lane<n>.log. A job already finished (--resume keeps its row) ends
# at once. Then one pass per data set, with nothing left to train, writes the full tables.
# Stop it with `kill <pid of this script>` (its lanes and their trainings go too).
# Where each model stands (epochs, best valid so far, pace):
#   python run_recbole.py --compare_status --compare_dir=OUT_DIR/beauty/out
# One-thread processes lose less to a core taken by other work than a two-thread one does
# (torch's threads wait for each other), and SASRec need not wait hours for the others.
# The rows record their thread count: seconds per epoch are comparable only at equal threads
# and load (benchmarks/bench_epoch_cpu.py measures them side by side on a quiet machine).
#
# OUT_DIR/dataset/<name>/      prepared atomic files
# OUT_DIR/<name>/out/          compare.md, compare.csv, compare.png, rows/, checkpoints/
main() {  # a function, so that bash has read all of it before running (edits are then safe)
set -euo pipefail
lanes=${LANES:-1}
case "$lanes" in ''|*[!0-9]*|0*) echo "LANES must be a whole number >= 1, not '$lanes'" >&2; exit 2 ;; esac
trap stop_lanes EXIT  # stopping this script stops its lanes too
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/compare_amazon.sh OUT_DIR [overrides...]}
shift
python=${PYTHON:-python}
shared=${SHARED_DATASETS:-../shared/datasets}
sets=("amazon-beauty beauty" "amazon-video-games video-games")

prepare amazon-beauty amazon-beauty/Beauty.txt
prepare amazon-video-games amazon-video-games/Video_Games.txt
if [ "$lanes" -ge 2 ]; then
    # the queue, in order; a lane claims job i by creating $claims/i (mkdir is atomic)
    jobs_list=("amazon-beauty beauty Mamba4Rec" "amazon-beauty beauty SASRec"
               "amazon-beauty beauty GRU4Rec" "amazon-video-games video-games SASRec"
               "amazon-video-games video-games Mamba4Rec" "amazon-video-games video-games GRU4Rec")
    claims=$(mktemp -d)
    local pids=() n
    for n in $(seq 1 "$lanes"); do
        lane "$n" "$@" &
        pids+=($!)
    done
    local folders=("${sets[@]#* }")
    echo "lanes: ${pids[*]}; logs $out/{$(IFS=,; echo "${folders[*]}")}/lane{1..$lanes}.log"
    for n in "${!pids[@]}"; do
        wait "${pids[$n]}" || echo "lane $((n + 1)) ended with status $?"
    done
    rm -rf "$claims"
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
    if [ -n "${claims:-}" ]; then rm -rf "$claims"; fi
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

lane() {  # number, overrides...: the next unclaimed job of the queue, one thread, until none
    local n=$1 i
    shift
    for i in "${!jobs_list[@]}"; do
        mkdir "$claims/$i" 2>/dev/null || continue
        local job=(${jobs_list[$i]})
        mkdir -p "$out/${job[1]}"
        echo "lane $n: ${job[0]} ${job[2]} ($(date -u +%FT%TZ))"
        OMP_NUM_THREADS=1 compare "${job[0]}" "${job[1]}" "$@" --compare_run="${job[2]}" \
            >> "$out/${job[1]}/lane$n.log" 2>&1 \
            || echo "lane $n: ${job[0]} ${job[2]} ended with status $? (see $out/${job[1]}/lane$n.log)"
    done
}

main "$@"
exit
