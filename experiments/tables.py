"""The tables of docs/RESULTS.md's generated block, from results/ alone: per data set and train
mode the rows with their speed and memory beside SASRec's, the goals (:mod:`experiments.goals`),
the masked test values, the run-to-run noise, prefix vs sequence mode, the learning curves'
summary (every epoch's value is in results/<dataset>/curves.csv and its chart).

    python -m experiments.results tables     # rewrites the block between the two markers
"""

from __future__ import annotations

import json
from pathlib import Path

from . import plan
from .export import _atomic_write, _read_curves
from .goals import REFERENCES, _ablation_lines, _f, _goal_lines, _paired_lines, _variants
from .plan import DATASETS, METRICS, RESULTS, RESULTS_DOC

BEGIN, END = "<!-- results:begin (python -m experiments.results tables) -->", "<!-- results:end -->"


def load_results(results: Path = RESULTS) -> dict:
    """{dataset: {mode: {model: record}}} from results/."""
    found = {}
    for path in sorted(results.glob("*/*/*.json")):
        record = json.loads(path.read_text())
        found.setdefault(record["dataset"], {}).setdefault(record["train_mode"], {})[record["model"]] = record
    return found


def _load_per_user(results: Path, dataset: str) -> dict:
    import numpy as np

    path = results / dataset / "per_user.npz"
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {k: data[k].astype(np.float64) for k in data.files}


def _hours(seconds):
    return None if seconds is None else seconds / 3600


def tables(results: Path = RESULTS) -> str:
    """The markdown tables of every data set and train mode in results/, with the goal checks."""
    from mamba4rec.significance import paired_difference

    found = load_results(results)
    out = []
    for dataset in [d for d in DATASETS if d in found] + [d for d in found if d not in DATASETS]:
        per_user = _load_per_user(results, dataset)
        for mode in ("sequence", "prefix", "history"):
            recs = found[dataset].get(mode)
            if not recs:
                continue
            expected = [j.name for j in plan.JOBS if j.dataset == dataset and j.mode == mode and not _noise(j.name)]
            noise = {n: r for n, r in recs.items() if _noise(n)}
            recs = {n: r for n, r in recs.items() if not _noise(n)}
            out += [f"### {dataset}, train_mode={mode}", ""]
            out.append("| model | test HR@10 | test NDCG@10 | test MRR@10 | valid NDCG@10 | best epoch / run | "
                       "stopped by | s/epoch | x SASRec | peak MiB | x SASRec | train h to stop | threads |")
            out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            # history mode has no SASRec row (SASRec has no state to carry): its speed is set beside
            # SASRec's sequence-mode row, the one it replaces
            base = recs.get("SASRec") or (found[dataset].get("sequence", {}).get("SASRec") if mode == "history" else None)
            for name in [n for n in expected if n in recs] + [n for n in recs if n not in expected]:
                r = recs[name]
                t, v = r["test_result"], r["valid_result"]
                spe = r.get("train_s_per_epoch")
                mem = r.get("peak_rss_mib")
                t_ratio = (_setting_gap(r, base) or _f(spe / base["train_s_per_epoch"], 2)) \
                    if base and spe and base.get("train_s_per_epoch") else "-"
                m_ratio = _f(mem / base["peak_rss_mib"], 2) if base and mem and base.get("peak_rss_mib") else "-"
                out.append(f"| {name} | {_f(t['hit@10'])} | {_f(t['ndcg@10'])} | {_f(t['mrr@10'])} | "
                           f"{_f(v['ndcg@10'])} | {r['best_epoch']} / {r['epochs_run']} | {r['stopped_by'] or '-'} | "
                           f"{_f(spe, 1)} | {t_ratio} | {mem if mem is not None else '-'} | {m_ratio} | "
                           f"{_f(_hours(r.get('train_s_to_stop')), 2)} | {r.get('threads') or '-'} |")
            for label, figures in REFERENCES.get(dataset, []) if mode == "sequence" else []:
                out.append(f"| *{label}* | {figures['hit@10']:.4f} | {figures['ndcg@10']:.4f} | "
                           f"{figures['mrr@10']:.4f} | | | | | | | | | |")
            missing = [n for n in expected if n not in recs]
            if missing:
                out += ["", f"Not finished yet: {', '.join(missing)}."]
            # history rows have no SASRec of their own: their pairing is the "whole histories" block
            goal = _goal_lines(dataset, mode, recs, per_user, paired_difference) if mode != "history" else []
            out += [""] + (goal + [""] if goal else [])
            out += _masked_lines(recs, mode, per_user, paired_difference)
            out += _noise_lines(recs, noise)
            machines = sorted({r.get("machine") or "?" for r in recs.values()}
                              | {s["machine"] for r in recs.values() for s in r.get("machine_by_epoch", [])
                                 if s["machine"] != "not recorded"})
            out += [f"Machine: {'; '.join(machines)}. Rows: `results/{dataset}/{mode}/*.json` "
                    f"(each with its command and commit); curves: `results/{dataset}/curves.csv`, "
                    f"`results/{dataset}/curves.png`."]
            out += [f"{name} trained in stretches (resumed): {_stretches(r)}." for name, r in recs.items()
                    if r.get("machine_by_epoch")]
            out += [""]
        out += mode_lines(dataset, found[dataset], per_user, paired_difference)
        out += history_lines(dataset, found[dataset], per_user, paired_difference)
        out += curve_lines(results, dataset)
    return "\n".join(out).rstrip() + "\n"


def _setting_gap(a: dict, b: dict) -> str | None:
    """None when two rows trained every epoch on one machine with the same threads (a ratio of their
    seconds then compares the models), else what differs: "other machine" or "other threads"."""
    def setting(r):
        stretches = r.get("machine_by_epoch") or []
        machines = {s["machine"] for s in stretches} | {r.get("machine")}
        threads = {s.get("threads") for s in stretches if s.get("threads")} | {r.get("threads") or 1}
        return machines, threads

    (ma, ta), (mb, tb) = setting(a), setting(b)
    if len(ma) > 1 or ma != mb or None in ma or "not recorded" in ma:
        return "other machine"
    return "other threads" if len(ta) > 1 or ta != tb else None


def mode_lines(dataset, by_mode, per_user, paired_difference, models=("Mamba4Rec", "SASRec", "GRU4Rec")) -> list[str]:
    """Prefix vs sequence mode at their stopping points, per model with both rows: the test values,
    prefix minus sequence paired over the same test users, and for scale the same model's two
    sequence-mode seeds paired the same way."""
    rows, lines, seeded = [], [], False
    for m in models:
        pre, seq = by_mode.get("prefix", {}).get(m), by_mode.get("sequence", {}).get(m)
        if not pre or not seq:
            continue
        for mode, r in (("prefix", pre), ("sequence", seq)):
            t = r["test_result"]
            rows.append(f"| {m} | {mode} | {_f(t['hit@10'])} | {_f(t['ndcg@10'])} | {_f(t['mrr@10'])} | "
                        f"{_f(r['valid_result']['ndcg@10'])} | {r['best_epoch']} / {r['epochs_run']} | "
                        f"{_f(_hours(r.get('train_s_to_stop')), 2)} |")
        same_data = pre.get("data_sha256") == seq.get("data_sha256")
        pairs = [("prefix - sequence", f"prefix/{m}/", f"sequence/{m}/", same_data)]
        other = by_mode.get("sequence", {}).get(f"{m}-seed2021")
        if other and (seq.get("best_epoch") or 0) < (other.get("epochs_run") or 0):  # a seed run that got as far
            seeded = True
            pairs.append(("sequence, seed 2021 - seed 2020", f"sequence/{m}-seed2021/", f"sequence/{m}/",
                          other.get("data_sha256") == seq.get("data_sha256")))
        for label, a_key, b_key, paired in pairs:
            lines.append(f"- {m}, {label}: " + _paired_parts(per_user, a_key, b_key, paired, paired_difference))
    if not rows:
        return []
    return ([f"### {dataset}: prefix vs sequence mode at the stopping point", "",
             "| model | train mode | test HR@10 | test NDCG@10 | test MRR@10 | valid NDCG@10 | best epoch / run | "
             "train h to stop |", "|---|---|---|---|---|---|---|---|"] + rows
            + ["", "Paired over the same test users (difference, 95% interval); "
                   + ("the two seeds of one mode give the run-to-run spread the modes' difference compares with:"
                      if seeded else
                      "no second seed ran on this data set, so the run-to-run spread is not measured here:"),
               ""] + lines + [""])


def _paired_parts(per_user, a_key, b_key, paired, paired_difference) -> str:
    """Per metric, the mean of a - b over the same test users and its 95% interval ("not paired" when
    the rows trained on other data or lack per-user values)."""
    parts = []
    for metric in METRICS:
        a, b = per_user.get(a_key + metric), per_user.get(b_key + metric)
        if not paired or a is None or b is None or a.shape != b.shape:
            parts.append(f"{metric}: not paired")
            continue
        d, lo, hi = paired_difference(a, b)
        parts.append(f"{metric} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" + ("" if lo <= 0 <= hi else " (beyond the users' noise)"))
    return "; ".join(parts)


def history_lines(dataset, by_mode, per_user, paired_difference) -> list[str]:
    """Each history-mode row (whole histories, evaluated whole) paired over the same test users with
    the window row of the same variant (train_mode=sequence) and with SASRec's sequence row."""
    lines = []
    for name, r in by_mode.get("history", {}).items():
        for other in (name, "SASRec"):
            w = by_mode.get("sequence", {}).get(other)
            if not w:
                continue
            paired = r.get("data_sha256") == w.get("data_sha256")
            lines.append(f"- {name} (history) - {other} (sequence): " + _paired_parts(
                per_user, f"history/{name}/", f"sequence/{other}/", paired, paired_difference))
    if not lines:
        return []
    return [f"### {dataset}: whole histories vs windows", "",
            "Paired over the same test users (difference, 95% interval), each history-mode row against the "
            "window row of the same variant and against SASRec:", ""] + lines + [""]


def _masked_lines(recs: dict, mode: str, per_user: dict, paired_difference) -> list[str]:
    """The test values with each user's input sequence masked (not RecBole's protocol: run()'s
    second test pass) beside RecBole's, and the paired differences of the better Mamba4Rec on them."""
    have = {n: r for n, r in recs.items() if r.get("test_result_input_masked")}
    if not have:
        return []
    lines = ["Test with each user's input sequence masked (its items ranked out; RecBole's protocol ranks "
             "them), and the change from RecBole's values:", "",
             "| model | HR@10 | NDCG@10 | MRR@10 | HR@10 change | NDCG@10 change | MRR@10 change |",
             "|---|---|---|---|---|---|---|"]
    for name, r in have.items():
        m, t = r["test_result_input_masked"], r["test_result"]
        lines.append(f"| {name} | " + " | ".join(_f(m[k]) for k in METRICS) + " | "
                     + " | ".join("-" if m[k] is None or t[k] is None else f"{m[k] - t[k]:+.4f}" for k in METRICS)
                     + " |")
    missing = [n for n in recs if n not in have]
    if missing:
        lines += ["", f"No masked test values: {', '.join(missing)} (exported without them; `python -m experiments.results masked OUT` adds them from a row's best checkpoint)."]
    candidates, best = _variants(recs)
    if candidates:
        baselines = [n for n in ("SASRec", "GRU4Rec") if n in have]
        for name in sorted((n for n in candidates if n in have and baselines), key=lambda n: n != best):
            label = "chosen by valid NDCG@10, as above" if name == best else "not chosen"
            lines += ["", f"{name} ({label}) minus each baseline, masked test values, paired:", ""]
            lines += _paired_lines(name, mode, have, per_user, paired_difference, goal=False,
                                   values="input_masked_")
    lines += _ablation_lines(have, mode, per_user, paired_difference, values="input_masked_")
    return lines + [""]


def _noise(name: str) -> bool:
    return "-seed" in name


def _noise_lines(recs: dict, noise: dict) -> list[str]:
    """The same training under another seed beside its row: the run-to-run noise of the metrics."""
    lines = []
    for name, r in sorted(noise.items()):
        base = recs.get(name.split("-seed", 1)[0])
        t = r["test_result"]
        line = (f"- {name} (run-to-run noise: {r['epochs_run']} epochs, best {r['best_epoch']}): test HR@10 "
                f"{_f(t['hit@10'])}, NDCG@10 {_f(t['ndcg@10'])}, MRR@10 {_f(t['mrr@10'])}")
        if base and (base.get("best_epoch") or 0) >= (r.get("epochs_run") or 0):
            line += (f"; not a noise figure for the converged row: it stopped at its epoch limit before the "
                     f"seed-2020 run's best epoch ({base['best_epoch']}); its curve gives the noise at equal epochs")
        elif base:
            b = base["test_result"]
            line += (f"; minus the seed-2020 row: {t['hit@10'] - b['hit@10']:+.4f}, {t['ndcg@10'] - b['ndcg@10']:+.4f}, "
                     f"{t['mrr@10'] - b['mrr@10']:+.4f}")
        lines.append(line)
    return lines + [""] if lines else []


def curve_lines(results: Path, dataset: str, models=("Mamba4Rec", "SASRec"), upto=25) -> list[str]:
    """Prefix vs sequence mode at equal epochs (same seed), beside the run-to-run noise of one
    mode (sequence mode, seeds 2020 and 2021): mean and largest absolute gap in valid NDCG@10."""
    curves = _read_curves(results / dataset / "curves.csv")
    if not curves:
        return []
    by = {}
    for c in curves:
        by.setdefault((c["train_mode"], c["model"]), {})[c["epoch"]] = c["valid_ndcg@10"]
    lines = []
    for m in models:
        pre, seq, other = by.get(("prefix", m)), by.get(("sequence", m)), by.get(("sequence", f"{m}-seed2021"))
        if not pre or not seq:
            continue
        def gap(a, b):
            epochs = [e for e in sorted(set(a) & set(b)) if e < upto]
            d = [abs(a[e] - b[e]) for e in epochs]
            return (f"mean {sum(d) / len(d):.4f}, largest {max(d):.4f} over epochs 0-{epochs[-1]}" if d else "-")
        seeded = bool(other) or any(j.dataset == dataset and j.name == f"{m}-seed2021" for j in plan.JOBS)
        noise = gap(seq, other) if other else "not measured yet" if seeded else "not run on this data set"
        unfinished = [f"{mode} {name}, its first {len(curve)} epochs" for mode, name, curve in
                      (("prefix", m, pre), ("sequence", m, seq), ("sequence", f"{m}-seed2021", other))
                      if curve and not (results / dataset / mode / f"{name}.json").is_file()]
        partial = f" (runs not yet at their stopping point: {'; '.join(unfinished)})" if unfinished else ""
        lines.append(f"- {m}: |sequence - prefix| {gap(seq, pre)}; run-to-run noise |seed 2020 - seed 2021| "
                     f"(sequence mode) {noise}{partial}")
    if not lines:
        return []
    return [f"### {dataset}: learning curves, prefix vs sequence mode (seed 2020)", "",
            f"Valid NDCG@10 at equal epochs (chart: `results/{dataset}/curves.png`; every epoch's value: "
            f"`results/{dataset}/curves.csv`):", ""] + lines + [""]


def _stretches(rec) -> str:
    """"epochs 0-50 on A (1 thread), 51-87 on B (2 threads)": where each stretch of a resumed row's
    epochs trained."""
    parts = rec["machine_by_epoch"]
    ends = [p["from_epoch"] - 1 for p in parts[1:]] + [(rec.get("epochs_run") or 0) - 1]
    where = [("a machine not recorded" if p["machine"] == "not recorded" else p["machine"])
             + (f" ({p['threads']} thread{'s' if p['threads'] != 1 else ''})" if p.get("threads") else "")
             for p in parts]
    return ", ".join(f"epochs {p['from_epoch']}-{end} on {w}" for p, end, w in zip(parts, ends, where))


def write_tables(doc: Path = RESULTS_DOC, results: Path = RESULTS) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = tables(results) if results.is_dir() and any(results.glob("*/*/*.json")) else "No finished run yet.\n"
    _atomic_write(doc, (head + BEGIN + "\n\n" + body + "\n" + END + tail).encode())
