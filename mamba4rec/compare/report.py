"""What a comparison shows: the table (compare.md, with the runs that may not have converged and
the paired intervals), the CSV, the charts and learning curves (compare.png, curves.csv,
compare_curves.png), and ``progress_report``, where a running or stopped comparison stands
(``--compare_status``).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from .rows import METRIC_KEYS, _atomic_write, load_curves, load_per_user

logger = logging.getLogger(__name__)

#: what a comparison says when matplotlib, the ``plot`` extra, is not installed
NO_CHART = ('matplotlib is not installed: the comparison wrote its table and CSV but no chart '
            '(compare.png, compare_curves.png); for them install matplotlib (the plot extra): '
            'pip install matplotlib')


def chart_note() -> str | None:
    """:data:`NO_CHART` when matplotlib cannot be imported, else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return NO_CHART
    return None


def paired_lines(per_user, model="Mamba4Rec", values="") -> list[str]:
    """Per baseline and test metric: ``model`` - baseline over the same users, with its 95%
    interval (mamba4rec.significance). ``values``: "" RecBole's test values, "input_masked_"
    those of run()'s second test pass (input sequences ranked out)."""
    from ..significance import describe

    if model not in per_user:
        return []
    lines = []
    for other, other_values in per_user.items():
        if other == model:
            continue
        for key in METRIC_KEYS:
            a, b = per_user[model].get(values + key), other_values.get(values + key)
            if a is not None and b is not None and a.shape == b.shape and len(a) > 1:
                lines.append(describe(values + key, model, other, a, b))
    return lines


def _fmt(value):
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and value <= 1.0 else str(value)


def convergence_lines(rows) -> list[str]:
    """A line naming the finished runs that may not have converged: they reached the epoch limit
    with their best validation score in the last epoch, so more epochs may change the ranking."""
    open_runs = [r["model"] for r in rows if str(r.get("status", "")).startswith("ok")
                 and r.get("stopped_by") == "epoch limit" and r.get("best_epoch") is not None
                 and r.get("best_epoch") == (r.get("epochs_run") or 0) - 1]
    if not open_runs:
        return []
    return [f"- not converged: {', '.join(open_runs)} reached the epoch limit with the best validation "
            f"score in the last epoch; more epochs may change the ranking"]


def markdown_table(rows, dataset, per_user=None) -> str:
    masked = [f"test_input_masked_{k}" for k in METRIC_KEYS] if any(
        f"test_input_masked_{k}" in row for row in rows for k in METRIC_KEYS) else []
    cols = ["model", "status"] + [f"{s}_{k}" for s in ("valid", "test") for k in METRIC_KEYS] + masked + [
        "best_epoch", "epochs_run", "stopped_by", "params", "train_s_per_epoch", "threads", "eval_s",
        "peak_rss_mib", "peak_cuda_mib"]
    lines = [f"Data set: {dataset}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    unconverged = convergence_lines(rows)
    if unconverged:
        lines += [""] + unconverged
    paired = paired_lines(per_user or {})
    if paired:
        lines += ["", "Paired over the same test users (is the difference more than the sample of users?):"] + paired
    paired = paired_lines(per_user or {}, values="input_masked_")
    if paired:
        lines += ["", "The same with each user's input sequence masked (test_input_masked_*: its items ranked out, "
                      "not RecBole's protocol):"] + paired
    return "\n".join(lines) + "\n"


def write_outputs(rows, dataset, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}
    per_user = load_per_user(out, rows)
    _atomic_write(paths["md"], lambda p: p.write_text(markdown_table(rows, dataset, per_user)))

    def write_csv(p):
        # every key of every row: rows kept from an earlier version (--resume) may lack newer ones
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(p, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(paths["csv"], write_csv)
    curves = load_curves(out, rows)
    if curves:
        paths["curves_csv"] = out / "curves.csv"

        def write_curves(p):
            with open(p, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["model", "epoch", "valid_metric", "valid_score", "train_s", "cum_train_s"])
                for model, curve in curves.items():
                    seconds = curve.get("train_seconds") or []
                    if len(seconds) < max(e for e, _ in curve["valid_scores"]) + 1:
                        seconds = []  # resumed from a file without history: not every epoch's time is known
                    for epoch, score in curve["valid_scores"]:
                        spent = seconds[epoch] if epoch < len(seconds) else None
                        total = sum(seconds[:epoch + 1]) if epoch < len(seconds) else None
                        writer.writerow([model, epoch, curve.get("metric"), score,
                                         None if spent is None else round(spent, 2),
                                         None if total is None else round(total, 1)])

        _atomic_write(paths["curves_csv"], write_curves)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra: without it the table and CSV are the comparison's outputs
        logger.warning("%s", NO_CHART)
        for stale in (paths.pop("png"), out / "compare_curves.png"):
            if stale.exists():  # a chart of an earlier table would no longer match this one
                stale.unlink()
        return paths
    ok = [r for r in rows if r["status"].startswith("ok")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    width = 0.8 / max(len(ok), 1)
    for j, row in enumerate(ok):
        axes[0].bar([i + j * width for i in range(3)], [row[f"test_{k}"] for k in METRIC_KEYS], width,
                    label=row["model"])
    axes[0].set_xticks([i + width * (len(ok) - 1) / 2 for i in range(3)], [k.upper() for k in METRIC_KEYS])
    axes[0].set_title(f"test metrics, {dataset}")
    if ok:
        axes[0].legend()
    names = [r["model"] for r in ok]
    axes[1].bar(names, [r["train_s_per_epoch"] for r in ok])
    axes[1].set_title("train seconds / epoch")
    axes[2].bar(names, [r.get("eval_s") or 0 for r in ok])  # rows kept from older versions may lack it
    axes[2].set_title("test evaluation seconds")
    axes[3].bar(names, [r["peak_cuda_mib"] or r["peak_rss_mib"] for r in ok])
    axes[3].set_title("peak memory (MiB; CUDA if used, else RSS)")
    fig.tight_layout()
    _atomic_write(paths["png"], lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    if curves:
        paths["curves_png"] = out / "compare_curves.png"
        _plot_curves(plt, curves, dataset, paths["curves_png"])
    return paths


def _plot_curves(plt, curves, dataset, path):
    """Valid score per epoch, and against the training time spent to reach it."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    metric = next(iter(curves.values())).get("metric") or "valid score"
    for model, curve in curves.items():
        epochs = [e for e, _ in curve["valid_scores"]]
        scores = [v for _, v in curve["valid_scores"]]
        line, = axes[0].plot(epochs, scores, label=model)
        sign = 1.0 if curve.get("bigger", True) else -1.0  # the last of tied bests: the checkpoint tested
        best = max(range(len(scores)), key=lambda i: (sign * scores[i], i))
        axes[0].plot([epochs[best]], [scores[best]], "o", color=line.get_color())
        seconds = curve.get("train_seconds") or []
        if len(seconds) >= max(epochs) + 1:
            cumulative, total = [], 0.0
            for t in seconds:
                total += t
                cumulative.append(total / 3600)
            axes[1].plot([cumulative[e] for e in epochs], scores, label=model, color=line.get_color())
    axes[0].set(title=f"validation {metric} per epoch, {dataset} (dot: best)", xlabel="epoch", ylabel=metric)
    axes[1].set(title="against training time (hours; threads and load as in the rows)", xlabel="hours of training",
                ylabel=metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def progress_report(out_dir, checkpoint_dir=None, now=None, models=()) -> str:
    """Where a comparison stands, from what is on disk (rows/ and the models' -last.pth files),
    while it runs or after it stopped: per model, finished / failed / in progress / pending,
    epochs so far, best and last validation score, evaluations since the best (early stopping
    ends the run at stopping_step), recent seconds per epoch and how long ago the last epoch ended.
    ``models``: the comparison's models (those not started yet show as pending).
    ``run_recbole.py --compare_status`` prints it."""
    import torch

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"--compare_status: no comparison at {out} (give the --compare_dir it ran with)")
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    now = time.time() if now is None else now
    rows, row_files, dataset = {}, {}, None
    for path in sorted((out / "rows").glob("*.json")):
        try:
            saved = json.loads(path.read_text())
            rows[path.stem], row_files[path.stem] = saved["row"], path
            dataset = dataset or saved["settings"]["dataset"]
        except (ValueError, KeyError, TypeError):
            continue
    lasts = {}
    for path in sorted(checkpoints.glob("*-last.pth")):
        model, rest = path.name.split("-", 1)  # <model>-<dataset>-last.pth; model names have no "-"
        if dataset is None or rest == f"{dataset}-last.pth":  # a checkpoint_dir may hold other data sets'
            lasts.setdefault(model, path)
    lines = [f"Comparison at {out}", "",
             "| model | state | epochs | best valid (epoch) | last valid | evals since best | s/epoch (last 5) | "
             "last epoch ended |", "|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys([*models, *rows, *lasts]):
        row, last = rows.get(model), lasts.get(model)
        if row and not (last and last.stat().st_mtime > row_files[model].stat().st_mtime):
            state = "finished" if str(row.get("status", "")).startswith("ok") else str(row.get("status"))
        else:  # no row yet, or a failed model being run again since its row was written
            state = "in progress" if last else "pending"
        state = state.replace("|", "\\|")
        epochs = best = latest = since = pace = age = "-"
        if last is not None:
            try:
                saved = torch.load(last, map_location="cpu", weights_only=False)  # our own file
            except Exception as exc:  # noqa: BLE001 - being rewritten, or foreign: say so, go on
                lines.append(f"| {model} | {state} | unreadable {last.name}: {type(exc).__name__} | | | | | |")
                continue
            history = saved.get("history") or {}
            scores, seconds = history.get("valid_scores") or [], history.get("train_seconds") or []
            epochs = str(saved.get("epoch", -1) + 1)
            if scores:
                target = saved.get("best_valid_score")  # the trainer's, whichever way its metric points
                top = next((i for i, (_, v) in enumerate(scores) if target is not None and abs(v - target) < 1e-12),
                           max(range(len(scores)), key=lambda i: scores[i][1]))
                best = f"{scores[top][1]:.4f} ({scores[top][0]})"
                latest = f"{scores[-1][1]:.4f}"
                since = str(saved.get("cur_step", len(scores) - 1 - top))
            if seconds:
                pace = f"{sum(seconds[-5:]) / len(seconds[-5:]):.0f}"
            age = _ago(now - last.stat().st_mtime)
        elif row:
            epochs = _fmt(row.get("epochs_run"))
            best = f"{_fmt(row.get('valid_ndcg@10'))} ({_fmt(row.get('best_epoch'))})"
        lines.append(f"| {model} | {state} | {epochs} | {best} | {latest} | {since} | {pace} | {age} |")
    return "\n".join(lines) + "\n"


def _ago(seconds) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds / 3600:.1f} h ago"
