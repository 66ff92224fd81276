"""Train Mamba4Rec and baselines under one protocol and write a table, a CSV and a chart.

Every model goes through :func:`mamba4rec.pipeline.run` with the same data set, split, seed,
evaluation and overrides; each model keeps its own RecBole defaults. A model that fails is
reported in the table and the others go on.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
import traceback
from pathlib import Path

from .pipeline import resolve_model, run

METRIC_KEYS = ("hit@10", "ndcg@10", "mrr@10")
logger = logging.getLogger(__name__)


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 50 ms;
    plus the CUDA peak when a GPU is in use."""

    def __init__(self, interval=0.05):
        self.interval, self.peak_mib, self.cuda_peak_mib = interval, 0.0, None
        self._stop = threading.Event()

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the process-wide maximum is the best we have
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.rss_mib())
        if torch.cuda.is_available():
            self.cuda_peak_mib = torch.cuda.max_memory_allocated() / 2**20
        return False


def _row(model, result=None, error=None, peak=None, seconds=None):
    row = {"model": model, "status": "ok" if error is None else f"failed: {error}"}
    for split in ("valid", "test"):
        values = {} if result is None else (result.best_valid_result if split == "valid" else result.test_result)
        for key in METRIC_KEYS:
            row[f"{split}_{key}"] = values.get(key)
    row.update({
        "best_epoch": None if result is None else result.best_epoch,
        "epochs_run": None if result is None else result.epochs_run,
        "params": None if result is None else result.params,
        "train_s_per_epoch": None if result is None else round(result.train_seconds_per_epoch, 2),
        "eval_s": None if result is None else round(result.eval_seconds, 2),
        "peak_rss_mib": None if peak is None else round(peak.peak_mib),
        "peak_cuda_mib": None if peak is None or peak.cuda_peak_mib is None else round(peak.cuda_peak_mib),
        "wall_s": None if seconds is None else round(seconds, 1),
    })
    return row


def compare(models, dataset, out_dir, config_files=None, config_dict=None, cmd_args=None,
            progress=print) -> list[dict]:
    """Run each model, then write ``out_dir``/compare.md, compare.csv and compare.png."""
    names = [resolve_model(m)[1] for m in models]  # unknown names fail before any training
    if len(set(names)) != len(names):
        raise ValueError(f"--compare lists a model twice: {', '.join(names)}")
    rows = []
    for i, name in enumerate(names, 1):
        progress(f"[{i}/{len(names)}] {name} on {dataset} ...")
        t0 = time.perf_counter()
        try:
            with PeakMemory() as peak:
                result = run(name, dataset, config_files=config_files, config_dict=config_dict,
                             cmd_args=cmd_args)
            rows.append(_row(name, result, peak=peak, seconds=time.perf_counter() - t0))
            progress(f"[{i}/{len(names)}] {name}: test " + ", ".join(
                f"{k}={result.test_result.get(k, float('nan')):.4f}" for k in METRIC_KEYS))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a failed model is reported; the others still run
            logger.error("%s failed:\n%s", name, traceback.format_exc())
            rows.append(_row(name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                             seconds=time.perf_counter() - t0))
            progress(f"[{i}/{len(names)}] {name}: FAILED ({type(exc).__name__}: {exc})")
    write_outputs(rows, dataset, out_dir)
    return rows


def _fmt(value):
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and value <= 1.0 else str(value)


def markdown_table(rows, dataset) -> str:
    cols = ["model", "status"] + [f"{s}_{k}" for s in ("valid", "test") for k in METRIC_KEYS] + [
        "best_epoch", "epochs_run", "params", "train_s_per_epoch", "eval_s", "peak_rss_mib", "peak_cuda_mib"]
    lines = [f"Data set: {dataset}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_outputs(rows, dataset, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}
    _atomic_write(paths["md"], lambda p: p.write_text(markdown_table(rows, dataset)))

    def write_csv(p):
        with open(p, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(paths["csv"], write_csv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        paths.pop("png")
        return paths
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(len(ok), 1)
    for j, row in enumerate(ok):
        axes[0].bar([i + j * width for i in range(3)], [row[f"test_{k}"] for k in METRIC_KEYS], width,
                    label=row["model"])
    axes[0].set_xticks([i + width * (len(ok) - 1) / 2 for i in range(3)], [k.upper() for k in METRIC_KEYS])
    axes[0].set_title(f"test metrics, {dataset}")
    axes[0].legend()
    names = [r["model"] for r in ok]
    axes[1].bar(names, [r["train_s_per_epoch"] for r in ok])
    axes[1].set_title("train seconds / epoch")
    axes[2].bar(names, [r["peak_cuda_mib"] or r["peak_rss_mib"] for r in ok])
    axes[2].set_title("peak memory (MiB; CUDA if used, else RSS)")
    fig.tight_layout()
    _atomic_write(paths["png"], lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return paths
