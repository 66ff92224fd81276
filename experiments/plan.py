"""The plan of the converged comparison: its data sets, its jobs (data set, train mode, model) and
where a job's files are.

A job is one ``run_recbole.py --compare ... --compare_run=MODEL --resume`` process; its OUT
layout: OUT/<folder>/out (prefix mode: the three models share one comparison),
OUT/<folder>/sequence or history (those modes), OUT/<folder>/<mode>-<variant> (a variant's own
comparison), each with rows/, per_user/, curves/, checkpoints/ and one log per job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
RESULTS_DOC = REPO / "docs" / "RESULTS.md"
METRICS = ("hit@10", "ndcg@10", "mrr@10")

#: data set -> (OUT folder, file under ../shared/datasets, prepare.py k-core flags)
DATASETS = {
    "amazon-beauty": ("beauty", "amazon-beauty/Beauty.txt", []),
    "amazon-video-games": ("video-games", "amazon-video-games/Video_Games.txt", []),
    "ml-1m": ("ml-1m", "ml-1m/ml-1m.txt", ["--kcore-item", "5"]),
}


@dataclass(frozen=True)
class Job:
    dataset: str
    mode: str   # prefix | sequence | history
    name: str   # Mamba4Rec, Mamba4Rec-2layers, SASRec, GRU4Rec: the results file's name

    @property
    def model(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def variant(self) -> str | None:
        """"2layers" (Mamba4Rec, num_layers=2), "seed2021" (the run-to-run noise), "residual" (one
        layer, block_residual=True), or None."""
        return self.name.split("-", 1)[1] if "-" in self.name else None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.mode}/{self.name}"

    def compare_dir(self, out: Path) -> Path:
        folder = DATASETS[self.dataset][0]
        if self.variant:
            return out / folder / f"{self.mode}-{self.variant}"
        return out / folder / ("out" if self.mode == "prefix" else self.mode)

    def command(self, out: Path) -> list[str]:
        cmd = ["run_recbole.py", "-d", self.dataset, f"--compare_dir={self.compare_dir(out)}",
               f"--data_path={out}/dataset/", "--show_progress=False", "--resume", *RECORDS]
        if self.variant:  # a comparison of its own: num_layers is GRU4Rec's key too
            cmd += ["--compare=SASRec", *VARIANTS[self.variant], f"--compare_run={self.model}"]
        else:
            cmd += ["--compare=GRU4Rec,SASRec", f"--compare_run={self.model}"]
        if self.mode != "prefix":  # history mode evaluates from the whole history (eval_history=whole)
            cmd.append(f"--train_mode={self.mode}")
        return cmd

    def row_path(self, out: Path) -> Path:
        return self.compare_dir(out) / "rows" / f"{self.model}.json"


#: what every job records beyond RecBole's results, for results/: the masked test values and the
#: machine of each stretch of epochs (a run's settings leave them out: mamba4rec.registry.RECORD_KEYS)
RECORDS = ("--test_input_masked=True", "--record_machine_by_epoch=True")

#: the settings of a variant job on top of the configs
VARIANTS = {"2layers": ["--num_layers=2"],
            # the same training under another seed, for 25 epochs: the run-to-run noise of a curve
            "seed2021": ["--seed=2021", "--epochs=25", "--stopping_step=100"],
            # one layer with the residual around its block that two layers get: is it the residual,
            # not the depth, that closes the HR@10 gap to SASRec on the Amazon sets?
            "residual": ["--block_residual=True"]}
_SEQ = ("Mamba4Rec", "SASRec", "GRU4Rec", "Mamba4Rec-2layers")
_PRE = ("Mamba4Rec", "SASRec", "GRU4Rec")
#: in order: Beauty (both modes: prefix SASRec, the longest run, starts as soon as a lane is
#: free; the short seed-2021 run of Mamba4Rec and the prefix Mamba4Rec run give the learning
#: curves early), then Video Games in sequence mode, ML-1M, and Video Games in prefix mode
JOBS = ([Job("amazon-beauty", "sequence", n) for n in ("Mamba4Rec", "SASRec")]
        + [Job("amazon-beauty", "prefix", "SASRec")]
        + [Job("amazon-beauty", "sequence", n) for n in ("GRU4Rec", "Mamba4Rec-seed2021")]
        + [Job("amazon-beauty", "prefix", "Mamba4Rec")]
        + [Job("amazon-beauty", "sequence", n) for n in ("Mamba4Rec-2layers", "SASRec-seed2021")]
        + [Job("amazon-beauty", "prefix", "GRU4Rec")]
        + [Job("amazon-video-games", "sequence", n) for n in _SEQ]
        + [Job("ml-1m", "sequence", n) for n in _SEQ]
        + [Job(d, "sequence", "Mamba4Rec-residual") for d in ("amazon-video-games", "amazon-beauty")]
        + [Job("amazon-video-games", "prefix", n) for n in _PRE]
        # each user's whole history (train_mode=history), paired with the window rows above
        + [Job("ml-1m", "history", "Mamba4Rec"), Job("amazon-video-games", "history", "Mamba4Rec"),
           Job("ml-1m", "history", "Mamba4Rec-2layers")])


def finished(job: Job, out: Path) -> dict | None:
    """The job's saved compare row (with its settings and data) when it finished, else None."""
    path = job.row_path(out)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if str(saved["row"].get("status", "")).startswith("ok") else None


def in_results(job: Job, results: Path = RESULTS) -> bool:
    """Whether results/ holds the job's finished row (trained here or on an earlier machine)."""
    return (results / job.dataset / job.mode / f"{job.name}.json").is_file()
