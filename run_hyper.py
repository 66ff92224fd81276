#!/usr/bin/env python
"""Search hyper-parameters as RecBole's run_hyper.py does, every trial through mamba4rec's pipeline.

    python run_hyper.py                                        # Mamba4Rec on ml-100k, configs/hyper/Mamba4Rec.hyper
    python run_hyper.py -m SASRec -d amazon-beauty --epochs=50 # a baseline, the same number of trials
    python run_hyper.py --params_file=my.hyper --algo=bayes --max_evals=30 --output_file=out.md

Flags as RecBole's run_hyper.py: --model, --dataset, --config_files, --params_file, --output_file,
plus --max_evals, --algo, --early_stop, and any --key=value override for every trial. The params
file format, the searches and the output: mamba4rec/hyper.py (also python -m mamba4rec.hyper).
"""

import sys

from mamba4rec.hyper import main

if __name__ == "__main__":
    sys.exit(main())
