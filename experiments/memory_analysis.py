"""How far back a trained Mamba4Rec's state reaches: does a whole history reach the output?

    python -m experiments.memory_analysis CKPT.pth --data-path DIR [--horizons 10,25,50,100,200]

CKPT is a best checkpoint of a Mamba4Rec run (RecBole's Trainer file; not ``-last.pth``), rebuilt
as ``experiments.per_user_analysis checkpoint`` rebuilds it. For each test user, the history is
the one ``eval_history: whole`` scores the test item from (every training item and the valid
item). Everything runs in eval mode without gradients, on the users' whole histories.

The SSM state after item T is h_T = dA_T h_{T-1} + dt_T B_T x_T, with the decay dA_t = exp(dt_t A)
per (channel d, state n), dt_t > 0 and A < 0. What the state held k items back enters h_T scaled
by exactly exp(A[d, n] * (dt_{T-k+1} + ... + dt_T)): the **carry** over k items. The conv sees
only its last d_conv - 1 inputs, so beyond a window of L items only the SSM state can bring
anything of the history in, and only as much as its carry over L items lets through.

Prints, per Mamba layer:
1. the carry over each horizon k (the last k items of each test user with at least k items before
   the test item): percentiles over (user, channel, state) and the share above 1e-3;
2. the half-life in items of each (channel, state), 0.693 / (|A| mean dt), mean dt over the test
   users' histories: percentiles over the (channel, state) pairs;
and, for the test users with more than MAX_ITEM_LIST_LENGTH items, the model's output after the
whole history against after the window (the last L items): relative L2 difference, and how many
of the top 10 items (RecBole's scoring: item 0 and nothing else excluded) the two share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .per_user_analysis import markdown

#: percentiles reported over (user, channel, state) or (channel, state)
PERCENTILES = (50, 90, 99, 100)
DEFAULT_HORIZONS = (10, 25, 50, 100, 200)


def layer_dt(block, hidden):
    """dt [B, Di, L] of a MambaBlock for its input ``hidden`` [B, L, H] run from the empty state
    (the block's own computation: in_proj, causal conv, SiLU, x_proj, dt_proj, softplus)."""
    import torch.nn.functional as F

    L = hidden.shape[1]
    x, _ = block.in_proj(hidden).chunk(2, dim=-1)
    x = F.silu(block.conv1d(x.transpose(1, 2))[..., :L])
    dt_low = block.x_proj(x.transpose(1, 2))[..., :block.dt_rank]
    return F.softplus(block.dt_proj(dt_low)).transpose(1, 2).float()


def carry_stats(dt, A, lengths, horizons):
    """{k: carry values exp(A * sum of the last k dt)} over (row, channel, state), for the rows with
    at least k items; dt [B, Di, L] (left-aligned rows of ``lengths``), A [Di, N] (< 0)."""
    import torch

    # float64: a difference of running sums over thousands of items, whose small carries would
    # otherwise carry float32's rounding of the whole sum
    csum = torch.nn.functional.pad(dt.double().cumsum(-1), (1, 0))  # [B, Di, L + 1]: sum dt[:t]
    out = {}
    for k in horizons:
        rows = torch.nonzero(lengths >= k).reshape(-1)
        if len(rows) == 0:
            continue
        end = lengths[rows].view(-1, 1, 1).expand(-1, dt.shape[1], 1)
        s = csum[rows].gather(2, end) - csum[rows].gather(2, end - k)  # [R, Di, 1]: sum of the last k dt
        out[k] = torch.exp(s * A.double()[None]).reshape(-1).numpy()  # [R * Di * N]
    return out


def analyse(model, histories, max_len, horizons, batch=32):
    """(per-layer {"carry": {k: values}, "dt_sum": [Di], "dt_n": count}, A per layer, output rows)
    over ``histories`` (lists of internal item ids, each the whole history of one test user)."""
    import torch

    layers = [layer.mamba for layer in model.mamba_layers]
    A = [-torch.exp(b.A_log.detach().float()) for b in layers]
    carry = [{k: [] for k in horizons} for _ in layers]
    dt_sum = [torch.zeros(b.d_inner, dtype=torch.float64) for b in layers]
    dt_n = 0
    outputs = []  # per user over max_len: (relative difference, top-10 overlap)
    order = np.argsort([len(h) for h in histories])
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            hists = [histories[i] for i in idx]
            lengths = torch.tensor([len(h) for h in hists])
            items = torch.zeros(len(hists), int(lengths.max()), dtype=torch.long)
            for r, h in enumerate(hists):
                items[r, :len(h)] = torch.as_tensor(h)
            inputs = []
            hooks = [b.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in layers]
            try:
                hidden_all, _ = model.forward_chunk(items, lengths)  # one call: one input per layer
            finally:
                for h in hooks:
                    h.remove()
            if len(inputs) != len(layers):
                raise RuntimeError(f"expected one call of each of the {len(layers)} Mamba blocks, saw {len(inputs)}")
            out_whole = hidden_all[torch.arange(len(hists)), lengths - 1]
            valid = torch.arange(items.shape[1])[None, :] < lengths[:, None]
            for i, (block, hidden) in enumerate(zip(layers, inputs)):
                dt = layer_dt(block, hidden) * valid[:, None, :]
                dt_sum[i] += dt.sum((0, 2)).double()
                for k, v in carry_stats(dt, A[i], lengths, horizons).items():
                    carry[i][k].append(v)
            dt_n += int(lengths.sum())
            long = torch.nonzero(lengths > max_len).reshape(-1)
            if len(long):
                win = torch.zeros(len(long), max_len, dtype=torch.long)
                for r, j in enumerate(long.tolist()):
                    win[r] = items[j, lengths[j] - max_len:lengths[j]]
                out_win = model.forward_chunk(win, torch.full((len(long),), max_len))[0][:, -1]
                a, b = out_whole[long], out_win
                rel = ((a - b).norm(dim=1) / a.norm(dim=1)).numpy()
                weight = model.item_embedding.weight
                top = []
                for o in (a, b):
                    scores = o @ weight.T
                    scores[:, 0] = -torch.inf
                    top.append(scores.topk(10, dim=1).indices)
                overlap = np.array([len(set(x.tolist()) & set(y.tolist())) for x, y in zip(*top)])
                outputs += list(zip(rel, overlap))
    per_layer = [{"carry": {k: np.concatenate(v) for k, v in c.items() if v}, "mean_dt": (d / max(dt_n, 1)).numpy()}
                 for c, d in zip(carry, dt_sum)]
    return per_layer, [a.numpy() for a in A], outputs


def report(per_layer, A, outputs, max_len, n_users) -> str:
    out = []
    for i, (layer, a) in enumerate(zip(per_layer, A)):
        head = ["items back (k)", "(user, channel, state) values"] + [f"p{p}" for p in PERCENTILES] + ["share > 1e-3"]
        body = []
        for k, v in layer["carry"].items():
            body.append([k, f"{len(v):,}"] + [f"{np.percentile(v, p):.2e}" for p in PERCENTILES]
                        + [f"{np.mean(v > 1e-3):.4f}"])
        out += [f"#### Layer {i + 1}: carry exp(A * sum of the last k dt) of the state k items back", "",
                markdown(head, body), ""]
        half = np.log(2) / (np.abs(a) * layer["mean_dt"][:, None])  # [Di, N] items
        head = ["(channel, state) pairs"] + [f"p{p}" for p in (0, 10, 50, 90, 100)]
        body = [[f"{half.size:,}"] + [f"{np.percentile(half, p):.1f}" for p in (0, 10, 50, 90, 100)]]
        out += [f"Layer {i + 1}: half-life in items, 0.693 / (|A| mean dt); mean dt over the histories "
                f"{float(layer['mean_dt'].mean()):.3f} (channels {float(layer['mean_dt'].min()):.3f}-"
                f"{float(layer['mean_dt'].max()):.3f}):", "", markdown(head, body), ""]
    if outputs:
        rel = np.array([r for r, _ in outputs])
        ov = np.array([o for _, o in outputs])
        out += [f"#### Output after the whole history vs after the last {max_len} items "
                f"({len(outputs):,} of {n_users:,} test users have more)", "",
                markdown(["relative L2 difference p50", "p90", "p99", "max", "top 10 identical", "top-10 overlap (mean)"],
                         [[f"{np.percentile(rel, 50):.2e}", f"{np.percentile(rel, 90):.2e}",
                           f"{np.percentile(rel, 99):.2e}", f"{rel.max():.2e}", f"{np.mean(ov == 10):.4f}",
                           f"{ov.mean():.2f}"]]), ""]
    else:
        out += [f"No test user has more than {max_len} items: whole history and window are the same.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="best checkpoint of a Mamba4Rec run (RecBole's Trainer file)")
    p.add_argument("--data-path", type=Path, help="folder holding <dataset>/<dataset>.inter (default: the run's)")
    p.add_argument("--horizons", default=",".join(map(str, DEFAULT_HORIZONS)),
                   help="comma-separated k: the carry over the last k items")
    p.add_argument("--batch", type=int, default=32, help="users per forward pass")
    args = p.parse_args(argv)
    try:
        horizons = sorted({int(k) for k in args.horizons.split(",")})
    except ValueError:
        p.error(f"--horizons {args.horizons!r}: comma-separated integers expected")
    if not horizons or horizons[0] < 1:
        p.error("--horizons: each k must be >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")

    from mamba4rec.history import WholeHistory

    from .checkpoint_analysis import checkpoint_model

    state, config, _, model_class, name, _, train, valid, test, model = checkpoint_model(
        args.checkpoint, args.data_path.resolve() if args.data_path else None, device="cpu")
    if not hasattr(model_class, "forward_chunk"):
        raise SystemExit(f"{args.checkpoint}: a {name} checkpoint; this analysis reads a Mamba4Rec's SSM state")
    table = WholeHistory(train.dataset, valid.dataset, test.dataset, 1).by_split[id(test.dataset)]
    test_users = test.dataset.inter_feat[test.dataset.uid_field].numpy()
    histories = [table[int(u)] for u in test_users if int(u) in table]
    max_len = int(config["MAX_ITEM_LIST_LENGTH"])
    per_layer, A, outputs = analyse(model, histories, max_len, horizons, args.batch)
    lengths = np.array([len(h) for h in histories])
    print(f"### {config['dataset']}: how far back {name}'s state reaches ({args.checkpoint.name}, epoch "
          f"{state['epoch']}, {len(model.mamba_layers)} layer(s), d_state {model.d_state})\n")
    print(f"{len(histories):,} test users, whole histories of {lengths.min()}-{lengths.max()} items (median "
          f"{int(np.median(lengths))}); {np.mean(lengths > max_len):.4f} have more than MAX_ITEM_LIST_LENGTH = "
          f"{max_len}.\n")
    print(report(per_layer, A, outputs, max_len, len(histories)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
