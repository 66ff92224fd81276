"""The goals, judged against the papers and the baselines: the published figures (defined here
only), the paired verdicts of the converged rows (docs/RESULTS.md's generated block, through
:mod:`experiments.tables`), and the verdict of any one comparison's rows:

    python -m experiments.goals COMPARE_DIR    # a run_recbole.py --compare folder: its rows judged

A goal is met when Mamba4Rec (the better of 1 and 2 layers by valid NDCG@10) is ahead of every
baseline beyond the noise of the test users (a paired 95% interval above 0) and, on ML-1M, at or
above the paper's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import plan
from .plan import METRICS, VARIANTS


#: published figures shown beside ours: Mamba4Rec's paper (Liu et al. 2024, ML-1M) and RecBole SASRec
#: as RecBLR (Liu et al. 2024, Table 1) reports it
REFERENCES = {
    "ml-1m": [("Mamba4Rec, paper", {"hit@10": 0.3121, "ndcg@10": 0.1822, "mrr@10": 0.1425}),
              ("SASRec, RecBLR Table 1", {"hit@10": 0.2993, "ndcg@10": 0.1692, "mrr@10": 0.1294})],
    "amazon-beauty": [("SASRec, RecBLR Table 1", {"hit@10": 0.0829, "ndcg@10": 0.0409, "mrr@10": 0.0281})],
}
TIM4REC_ML1M_HIT = 0.3253  # the best published Mamba4Rec HR@10 on ML-1M (TiM4Rec, 2 layers)
#: Mamba4Rec's test metrics as its paper reports them, per data set: what a comparison is judged by
PAPER = {dataset: figures for dataset, refs in REFERENCES.items() for label, figures in refs
         if label == "Mamba4Rec, paper"}


def _f(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def _paired_lines(name, mode, recs, per_user, paired_difference, goal, values="",
                  others=("SASRec", "GRU4Rec")) -> list[str]:
    """``name`` minus each of ``others``, paired per test user: one line per other model with each
    metric's difference, its 95% interval and verdict (the goal's, when ``goal``). ``values``: ""
    RecBole's test values, "input_masked_" those with input sequences masked."""
    lines = []
    for other in others:
        if other not in recs:
            continue
        data_a, data_b = recs[name].get("data_sha256"), recs[other].get("data_sha256")
        if data_a and data_b and data_a != data_b:
            lines.append(f"- {name} - {other}: not paired (trained on different data files)")
            continue
        parts = []
        for metric in METRICS:
            a = per_user.get(f"{mode}/{name}/{values}{metric}")
            b = per_user.get(f"{mode}/{other}/{values}{metric}")
            if a is None or b is None or a.shape != b.shape or len(a) < 2:
                parts.append(None)
                continue
            diff, lo, hi = paired_difference(a, b)
            where = "ahead" if lo > 0 else "behind" if hi < 0 else "within the noise"
            verdict = (f"met ({where})" if lo > 0 else f"**NOT MET** ({where})") if goal else where
            parts.append(f"{metric} {diff:+.4f} [{lo:+.4f}, {hi:+.4f}] {verdict}")
        if not any(parts):
            lines.append(f"- {name} - {other}: no per-user values")
            continue
        lines.append(f"- {name} - {other}: " + "; ".join(p or f"{m}: no per-user values" for p, m in zip(parts, METRICS)))
    return lines


#: variants outside the goal's choice of 1 or 2 layers, run to find out why a goal is not met: shown
#: beside the rows, paired with the baselines and with the variants they take apart
ABLATIONS = {"Mamba4Rec-residual": "one layer with the residual around its block that two layers have "
                                   f"(`{' '.join(VARIANTS['residual'])}`)"}


def _ablation_lines(recs, mode, per_user, paired_difference, values="") -> list[str]:
    lines = []
    for name, what in ABLATIONS.items():
        if name not in recs:
            continue
        others = [n for n in ("SASRec", "GRU4Rec", "Mamba4Rec", "Mamba4Rec-2layers") if n in recs]
        if not others:  # nothing to pair it with (on these values): no heading over an empty list
            continue
        lines += ["", f"{name}, {what}: outside the goal's choice, paired the same way"
                  + (" on the masked test values" if values else "") + ", for reference:", ""]
        lines += _paired_lines(name, mode, recs, per_user, paired_difference, goal=False, values=values,
                               others=others)
    return lines


def _variants(recs) -> tuple[list[str], str | None]:
    """The Mamba4Rec variants with rows, and the one the goal judges: the better by valid NDCG@10."""
    candidates = [n for n in ("Mamba4Rec", "Mamba4Rec-2layers") if n in recs]
    best = max(candidates, key=lambda n: recs[n]["valid_result"]["ndcg@10"] or -1) if candidates else None
    return candidates, best


def _goal_lines(dataset, mode, recs, per_user, paired_difference) -> list[str]:
    candidates, best = _variants(recs)
    if not candidates:  # no goal to judge yet; an ablation row is still paired with what there is
        return _ablation_lines(recs, mode, per_user, paired_difference)[1:]
    planned = {j.name for j in plan.JOBS if j.dataset == dataset and j.mode == mode}
    pending = [n for n in ("Mamba4Rec", "Mamba4Rec-2layers") if n not in recs and n in planned]
    lines = [f"Mamba4Rec, the better of 1 and 2 layers by valid NDCG@10: **{best}**"
             + (f" (provisional: {pending[0]} is not finished yet)" if pending else "")
             + ". Paired over the same test users (difference, 95% interval; ahead / behind: the interval "
             "excludes 0):", ""]
    lines += _paired_lines(best, mode, recs, per_user, paired_difference, goal=True)
    if dataset == "ml-1m":  # the published figures, judged on the chosen variant, under its own lines
        for label, figures in REFERENCES["ml-1m"][:1]:
            for metric, target in figures.items():
                mine = recs[best]["test_result"].get(metric)
                if mine is not None:
                    lines.append(f"- {metric} >= {label} {target:.4f} ({best}): "
                                 f"{'met' if mine >= target else '**NOT MET**'} ({mine:.4f})")
    tim4rec = []  # a goal of the 2-layer variant whichever is chosen: under the 2-layer lines
    if dataset == "ml-1m" and "Mamba4Rec-2layers" in recs:
        mine = recs["Mamba4Rec-2layers"]["test_result"].get("hit@10") or 0.0
        tim4rec = [f"- 2 layers, hit@10 >= TiM4Rec's {TIM4REC_ML1M_HIT}: "
                   f"{'met' if mine >= TIM4REC_ML1M_HIT else '**NOT MET**'} ({mine:.4f})"]
    if best == "Mamba4Rec-2layers":
        lines += tim4rec
    for name in (n for n in candidates if n != best):  # the variant not chosen, beside it: no verdict
        lines += ["", f"{name} (not chosen: valid NDCG@10 {_f(recs[name]['valid_result']['ndcg@10'])} against "
                      f"{_f(recs[best]['valid_result']['ndcg@10'])}), paired the same way, for reference:", ""]
        lines += _paired_lines(name, mode, recs, per_user, paired_difference, goal=False)
        if name == "Mamba4Rec-2layers":
            lines += tim4rec
    lines += _ablation_lines(recs, mode, per_user, paired_difference)
    return lines


def verdict(rows, model="Mamba4Rec", dataset=None) -> list[str]:
    """Lines saying, per test metric, whether ``model`` is >= every baseline that finished in a
    comparison's ``rows`` (mamba4rec.compare's row dicts) and, for a data set in :data:`PAPER`,
    >= the paper's figure; and which runs may not have converged."""
    ok = {r["model"]: r for r in rows if str(r.get("status", "")).startswith("ok")}
    lines = []
    paper = PAPER.get(dataset) if model == "Mamba4Rec" else None
    if paper and model in ok:
        for key, target in paper.items():
            mine = ok[model].get(f"test_{key}")
            if mine is not None:
                met = "met" if mine >= target else "**NOT MET**"
                lines.append(f"- test_{key}: {model} >= the paper's {target:.4f}: {met} ({model} {mine:.4f})")
    if model not in ok or len(ok) < 2:
        return lines
    for key in METRICS:
        col = f"test_{key}"
        mine = ok[model].get(col)
        ahead = [(n, r[col]) for n, r in ok.items() if n != model and None not in (mine, r.get(col)) and r[col] > mine]
        if ahead:
            lines.append(f"- {col}: {model} >= every baseline: **NOT MET** ({model} {mine:.4f}; "
                         + ", ".join(f"{n} {v:.4f}" for n, v in ahead) + ")")
        elif mine is not None:
            lines.append(f"- {col}: {model} >= every baseline: met ({model} {mine:.4f})")
    return lines


def compare_dir_verdict(compare_dir: Path, model="Mamba4Rec") -> str:
    """The verdict of the rows a ``--compare`` run left in ``compare_dir``/rows."""
    rows, dataset = [], None
    for path in sorted((compare_dir / "rows").glob("*.json")):
        saved = json.loads(path.read_text())
        rows.append(saved["row"])
        dataset = dataset or saved.get("settings", {}).get("dataset")
    if not rows:
        raise SystemExit(f"no rows in {compare_dir / 'rows'}: give the --compare_dir of a comparison")
    title = f"Goal ({model} >= every baseline" + (" and the paper's figures" if dataset in PAPER else "")
    lines = verdict(rows, model, dataset)
    return "\n".join([f"{title}, {dataset}, test split):"] + (lines or ["- nothing to judge yet"])) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.goals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_dir", type=Path, help="the --compare_dir of a run_recbole.py --compare run")
    p.add_argument("--model", default="Mamba4Rec", help="the model judged against the others (default Mamba4Rec)")
    args = p.parse_args(argv)
    print(compare_dir_verdict(args.compare_dir, args.model), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
