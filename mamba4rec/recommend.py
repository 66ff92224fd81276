"""Top-k recommendations from a serving checkpoint (mamba4rec.serving), on the command line.

    python -m mamba4rec.recommend --checkpoint model.pt --history 50 172 133 --k 10
    python -m mamba4rec.recommend --checkpoint model.pt --events events.txt --k 5
    printf 'u1 50\\nu1 172\\n' | python -m mamba4rec.recommend --checkpoint model.pt --events -

--history prints one line per recommendation: rank, item, score (tab-separated).
--events reads "user item" per line (blank lines and lines starting with # are skipped), folds
each event into that user's state (O(1) per event) and prints, per event, one line:
user, item, then the top-k as item:score pairs separated by spaces (tab-separated fields).
Items are the data set's original tokens. Bad input (missing or unreadable checkpoint, an
unknown item without --on-unknown skip, a malformed events line) prints "error: ..." on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mamba4rec.recommend",
                                description=__doc__.split("\n\n")[0],
                                epilog="Format and options: docs/STREAMING.md")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a serving checkpoint (mamba4rec.serving.export_checkpoint, run_recbole.py --export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", nargs="+", metavar="ITEM", help="one history, oldest item first")
    src.add_argument("--events", metavar="FILE", help="a file of 'user item' lines, or - for stdin")
    p.add_argument("--k", type=int, default=10, help="recommendations per answer (default 10)")
    p.add_argument("--include-seen", action="store_true",
                   help="also recommend items already in the history (default: leave them out)")
    p.add_argument("--on-unknown", choices=["error", "skip"], default="error",
                   help="an item not in the checkpoint: error (default, exit 2) or skip it")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    return args


def _format(top):
    return " ".join(f"{item}:{score:.4f}" for item, score in top)


def _events(args, rec, out) -> None:
    fh = sys.stdin if args.events == "-" else open(args.events, encoding="utf-8")
    name = "<stdin>" if args.events == "-" else args.events
    try:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            if len(parts) != 2:
                raise ValueError(f"{name}:{lineno}: expected 'user item', got {text!r}")
            user, item = parts
            try:
                applied = rec.update(user, item)
            except KeyError as exc:  # UnknownItemError
                raise ValueError(f"{name}:{lineno}: {exc}") from None
            if not applied:
                print(f"{name}:{lineno}: skipped unknown item {item!r}", file=sys.stderr)
            top = rec.recommend_user(user, args.k, exclude_seen=not args.include_seen) if user in rec.users else []
            print(f"{user}\t{item}\t{_format(top)}", file=out, flush=True)
    finally:
        if fh is not sys.stdin:
            fh.close()


def main(argv=None, out=None) -> int:
    args = parse_args(argv)
    out = out or sys.stdout
    from .serving import Recommender

    try:
        rec = Recommender.from_checkpoint(args.checkpoint, device=args.device, on_unknown=args.on_unknown)
        if args.history is not None:
            top = rec.recommend(args.history, k=args.k, exclude_seen=not args.include_seen)
            for rank, (item, score) in enumerate(top, 1):
                print(f"{rank}\t{item}\t{score:.4f}", file=out)
        else:
            _events(args, rec, out)
    except (ValueError, KeyError, OSError) as exc:  # CheckpointError, UnknownItemError, bad files
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
