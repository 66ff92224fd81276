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
#
# OUT_DIR/dataset/<name>/      prepared atomic files
# OUT_DIR/<name>/out/          compare.md, compare.csv, compare.png, rows/, checkpoints/
# Beauty keeps the folder name beauty8/ of the session that started it (its first 8 epochs
# were run with --epochs=8; the rows of that run were moved aside, and the models continue).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/compare_amazon.sh OUT_DIR [overrides...]}
shift
python=${PYTHON:-python}
shared=${SHARED_DATASETS:-../shared/datasets}

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

prepare amazon-beauty amazon-beauty/Beauty.txt
prepare amazon-video-games amazon-video-games/Video_Games.txt
compare amazon-beauty beauty8 "$@" || echo "amazon-beauty: a model failed (its row says why); going on"
compare amazon-video-games video-games "$@"
