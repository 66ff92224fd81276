"""The resumable state of a run: everything ``-last.pth`` holds after each validated epoch
(:func:`_save_last`) and how a run continues from it (:func:`_resume`), so that a resumed run
ends exactly where an uninterrupted one would."""

from __future__ import annotations

import os


def _save_last(path, trainer, net, train_data, epoch_idx, history) -> None:
    """Everything needed to continue after ``epoch_idx`` exactly as an uninterrupted run would:
    weights, optimizer, early-stopping state, every random state training draws from, and the
    per-epoch history (validation scores, train seconds) that the final report is built from."""
    import random

    import numpy as np
    import torch

    from . import compat

    state = {
        "epoch": epoch_idx, "state_dict": net.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "cur_step": trainer.cur_step, "best_valid_score": trainer.best_valid_score,
        "best_valid_result": trainer.best_valid_result, "train_loss_dict": trainer.train_loss_dict,
        "saved_model_file": trainer.saved_model_file, "buckets": trainer.batch_buckets(),
        "history_chunk": trainer.history_chunk,
        "history": {"valid_scores": list(history["valid_scores"]), "train_seconds": list(history["train_seconds"]),
                    "machines": [list(m) for m in history.get("machines", [])]},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "loader": train_data.generator.get_state(),
                # dropout on a GPU draws from CUDA's generators, which init_seed reseeds on a resume
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    compat._trainer_save(state, path)  # temporary file + rename: a kill leaves the previous one


def _resume(path, trainer, net, train_data, log) -> dict:
    """Restore the state _save_last wrote; returns its per-epoch history (empty in older files)."""
    import random

    import numpy as np
    import torch

    from . import compat

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    try:  # the user named this file to resume from: their own, so fully unpickled
        state = torch.load(path, map_location=net.item_embedding.weight.device if hasattr(net, "item_embedding")
                           else "cpu", weights_only=False)
        keys = {"epoch", "state_dict", "optimizer", "rng"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"it has no {sorted(keys)}: not a '-last.pth' file written by mamba4rec")
        net.load_state_dict(state["state_dict"])
    except Exception as exc:  # truncated, foreign, another model's weights
        raise ValueError(f"--resume: {path!r} cannot be resumed from ({type(exc).__name__}: {exc})") from None
    saved, now = state.get("buckets"), trainer.batch_buckets()
    if trainer.history_chunk is not None:  # train_mode=history: its chunks, not length buckets
        saved = now
    if saved is not None and saved != now:  # other dropout draws: not the run this file continues
        raise ValueError(f"--resume: {path!r} was trained with length_buckets={saved} (how each training batch "
                         f"is grouped by length) and this run would use {now}; resume with --length_buckets={saved} "
                         f"to continue the run as it began")
    if "history_chunk" in state and state["history_chunk"] != trainer.history_chunk:
        raise ValueError(f"--resume: {path!r} was trained with history_chunk={state['history_chunk']} and this run "
                         f"would use {trainer.history_chunk} (None: not train_mode=history); resume with the "
                         f"train_mode and history_chunk the run began with")
    if saved is None:
        log.warning("--resume: %s does not record its length buckets (written before they were recorded); "
                    "continuing with %d", path, now)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.start_epoch = state["epoch"] + 1
    trainer.cur_step = state["cur_step"]
    trainer.best_valid_score = state["best_valid_score"]
    trainer.best_valid_result = state["best_valid_result"]
    trainer.train_loss_dict = state["train_loss_dict"]
    if state.get("saved_model_file") and os.path.isfile(state["saved_model_file"]):
        trainer.saved_model_file = state["saved_model_file"]
        compat.trust_checkpoint(trainer.saved_model_file)
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    train_data.generator.set_state(state["rng"]["loader"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    log.info("resumed from %s after epoch %d", path, state["epoch"])
    history = state.get("history") or {}
    # (first epoch, machine, threads) of each stretch of training; a file from before they were
    # recorded trained its epochs so far on a machine nobody wrote down (and from before the
    # threads were, with threads nobody wrote down: [epoch, machine] only)
    machines = history.get("machines") or ([[0, None]] if state["epoch"] >= 0 else [])
    return {"valid_scores": [tuple(v) for v in history.get("valid_scores", [])],
            "train_seconds": list(history.get("train_seconds", [])),
            "machines": [list(m) for m in machines]}
