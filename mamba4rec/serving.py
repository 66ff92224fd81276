"""Serving a trained Mamba4Rec: a checkpoint of plain data, and top-k recommendations from it,
for one history or for a stream of (user, item) events with per-user O(1) state updates.

    export_checkpoint(model, dataset, "mamba4rec.pt")       # after training (or pipeline.run(export_path=...))
    rec = Recommender.from_checkpoint("mamba4rec.pt")
    rec.recommend(["50", "172", "133"], k=10)               # [(item token, score), ...]
    rec.update("u1", "50"); rec.recommend_user("u1", k=10)  # streaming, one event at a time

The checkpoint (format "mamba4rec-serving", version 1) is one ``torch.save`` of a dict holding
only str / int / float / bool / list / dict / tensors, so it loads with
``torch.load(weights_only=True)``: opening a file runs no code from it. RecBole's own trainer
checkpoints pickle the whole Config and cannot be opened that way; they are refused with the
way to export one. docs/STREAMING.md describes the format field by field.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
import zipfile
from collections import deque
from dataclasses import dataclass, field

import torch

from ._version import __version__
from .checks import int_in
from .files import atomic_path
from .model import MODEL_DEFAULTS, Mamba4Rec, resolve_model_config
from .streaming import StreamState

FORMAT = "mamba4rec-serving"
FORMAT_VERSION = 1
ON_UNKNOWN = ("error", "skip")
#: RecBole field names a rebuilt model needs (SequentialRecommender reads them); the ids live in
#: the checkpoint, these only name interaction columns, which serving never reads.
_FIELDS = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
           "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_"}


class UnknownItemError(KeyError, ValueError):
    """An item id that is not in the checkpoint's item map (or is the padding token).

    A KeyError (a failed lookup) and a ValueError (bad input), so either ``except`` catches it;
    ``str()`` is the plain message, not KeyError's quoted repr.
    """

    def __init__(self, item, message):
        super().__init__(message)
        self.item = item

    def __str__(self):
        return str(self.args[0])


class CheckpointError(ValueError):
    """A file that is not a usable mamba4rec serving checkpoint; the message names the path."""


# ----------------------------------------------------------------------------- the checkpoint

def _item_tokens(dataset_or_tokens, item_field="item_id") -> list[str]:
    """The internal id -> original token list, from a RecBole Dataset or a given sequence."""
    if hasattr(dataset_or_tokens, "field2id_token"):
        field_name = getattr(dataset_or_tokens, "iid_field", None) or item_field
        tokens = dataset_or_tokens.field2id_token[field_name]
    else:
        tokens = dataset_or_tokens
    try:
        return [str(t) for t in tokens]
    except TypeError:
        raise TypeError(f"export_checkpoint: expected a RecBole Dataset (with field2id_token) or a "
                        f"sequence of item tokens, got {type(dataset_or_tokens).__name__}") from None


def export_checkpoint(model: Mamba4Rec, dataset_or_tokens, path) -> str:
    """Write ``model`` with its config and item map to ``path``, atomically; return the path.

    ``dataset_or_tokens``: the RecBole Dataset the model was trained on (its
    ``field2id_token[item_field]`` is the item map; ``train_data.dataset`` works), or the list of
    original item tokens indexed by internal id (index 0: the padding token).
    The file is written to a temporary name beside ``path`` and renamed: a reader never sees a
    half-written checkpoint, and a crash leaves the previous one intact.
    """
    if not isinstance(model, Mamba4Rec):
        raise TypeError(f"export_checkpoint: expected a Mamba4Rec model, got {type(model).__name__}")
    tokens = _item_tokens(dataset_or_tokens, getattr(model, "ITEM_ID", "item_id"))
    if len(tokens) != model.n_items:
        raise ValueError(f"export_checkpoint: the item map has {len(tokens)} tokens but the model scores "
                         f"{model.n_items} items; pass the data set the model was trained on")
    config = {key: model.model_config[key] for key in MODEL_DEFAULTS}
    config.update(n_items=int(model.n_items), MAX_ITEM_LIST_LENGTH=int(model.max_seq_length),
                  ITEM_ID_FIELD=str(model.ITEM_ID))
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": "Mamba4Rec",
        "mamba4rec_version": __version__,
        "config": config,
        "item_tokens": tokens,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _first_line(exc: BaseException, limit=200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}"


def _pickle_mentions(path, needle: bytes) -> bool:
    """Whether the pickle inside a torch zip archive names ``needle`` (read as bytes, not run)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(needle in zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))
    except Exception:
        return False


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and check a serving checkpoint; return its dict. Never unpickles code.

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) naming the
    path and what is wrong for anything else: truncated, not a torch file, a pickle of
    arbitrary objects (refused by weights_only), a RecBole trainer checkpoint, another format
    or model type, a config or item map that does not fit the weights.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the end
        raise CheckpointError(f"{path!r} is not a torch.save archive ({os.path.getsize(path)} bytes, no zip "
                              f"directory): truncated, or another kind of file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused something: no code was run
        if _pickle_mentions(path, b"recbole"):
            raise CheckpointError(
                f"{path!r} is a RecBole trainer checkpoint: it pickles RecBole's Config, which is not "
                f"loaded without trusting the file's code. Export a serving checkpoint instead: "
                f"mamba4rec.serving.export_checkpoint(model, dataset, path), "
                f"mamba4rec.pipeline.run(..., export_path=path) or run_recbole.py --export=PATH") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"the global {found.group(1)}" if found else "pickle instructions that torch's safe loader refuses"
        raise CheckpointError(
            f"{path!r} is not a mamba4rec serving checkpoint: it pickles {what}; only tensors and plain "
            f"containers are read, and nothing in the file is run") from None
    except Exception as exc:  # a damaged archive
        raise CheckpointError(f"{path!r} cannot be read as a torch checkpoint (damaged archive?): "
                              f"{_first_line(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = (f"a dict with keys {sorted(map(str, payload))[:8]}" if isinstance(payload, dict)
                else f"a {type(payload).__name__}")
        raise CheckpointError(f"{path!r} is not a mamba4rec serving checkpoint (format {FORMAT!r}): it holds "
                              f"{what}. Write one with mamba4rec.serving.export_checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has format_version {version!r}; this mamba4rec "
                              f"({__version__}) reads versions 1..{FORMAT_VERSION}: upgrade mamba4rec")
    if payload.get("model") != "Mamba4Rec":
        raise CheckpointError(f"{path!r} holds a {payload.get('model')!r} model; only Mamba4Rec is served here")
    for key, kind in (("config", dict), ("item_tokens", list), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path!r}: {key!r} is missing or not a {kind.__name__}")
    config, tokens = payload["config"], payload["item_tokens"]
    n_items = config.get("n_items")
    if not isinstance(n_items, int) or n_items < 2 or len(tokens) != n_items:
        raise CheckpointError(f"{path!r}: config n_items={n_items!r} does not match the item map's "
                              f"{len(tokens)} tokens")
    if not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{path!r}: the item map must hold strings")
    max_len = config.get("MAX_ITEM_LIST_LENGTH")
    if not isinstance(max_len, int) or max_len < 1:
        raise CheckpointError(f"{path!r}: config MAX_ITEM_LIST_LENGTH={max_len!r} must be an integer >= 1")
    try:
        resolve_model_config(config)
    except ValueError as exc:
        raise CheckpointError(f"{path!r}: {exc}") from None
    if not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        raise CheckpointError(f"{path!r}: the state_dict must hold tensors only")
    return payload


def model_from_checkpoint_config(config: dict, scan_impl=None, device="cpu") -> Mamba4Rec:
    """An untrained Mamba4Rec shaped by a checkpoint's config (no data set needed)."""
    cfg = dict(_FIELDS)
    cfg.update({k: config[k] for k in config if k != "n_items"})
    cfg["device"] = torch.device(device)
    if scan_impl is not None:
        cfg["scan_impl"] = scan_impl

    class _ItemCount:  # SequentialRecommender reads n_items from dataset.num(ITEM_ID_FIELD)
        def num(self, _field):
            return config["n_items"]

    return Mamba4Rec(cfg, _ItemCount())


# ----------------------------------------------------------------------------- recommending

@dataclass
class _User:
    state: StreamState          # batch of one
    seq_output: torch.Tensor    # [H], the model's output after the user's last event
    seen: set = field(default_factory=set)
    recent: deque | None = None  # the last max_seq_length ids, kept with a position embedding only


class Recommender:
    """Top-k recommendations from a Mamba4Rec and its item map.

    Items are given and returned as the original tokens of the data set (strings; ints are
    turned into strings, so ``50`` and ``"50"`` are the same item). ``on_unknown`` says what an
    item outside the map does: ``"error"`` (default) raises UnknownItemError naming it, ``"skip"``
    drops it (an event with an unknown item changes nothing). The padding id 0 is never an
    input nor a recommendation.

    History length: without a position embedding a history or stream is folded in whole (the
    recurrence has no length limit; that is what ``forward`` computes on the full sequence).
    With one, only the last ``max_seq_length`` items count, as in RecBole's training and
    evaluation; a stream past that length is restarted from its last items with ``prefill``
    (O(max_seq_length) per event from then on, instead of O(1)).
    """

    def __init__(self, model: Mamba4Rec, item_tokens, *, device="cpu", on_unknown="error"):
        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown={on_unknown!r}: use one of {', '.join(ON_UNKNOWN)}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.item_tokens = [str(t) for t in item_tokens]
        if len(self.item_tokens) != model.n_items:
            raise ValueError(f"{len(self.item_tokens)} item tokens for a model of {model.n_items} items")
        self.token2id = {t: i for i, t in enumerate(self.item_tokens) if i > 0}  # 0 is padding
        self.on_unknown = on_unknown
        self.users: dict = {}
        self.step_path = self.model.warm_up_step(1)  # compile / derive now, not on the first event

    @classmethod
    def from_checkpoint(cls, path, *, device="cpu", scan_impl=None, on_unknown="error") -> "Recommender":
        """Load an export_checkpoint file (weights_only: no code runs from it)."""
        payload = load_checkpoint(path, map_location=device)
        model = model_from_checkpoint_config(payload["config"], scan_impl=scan_impl, device=device)
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"{os.fspath(path)!r}: the weights do not fit the config: "
                                  f"{_first_line(exc, 400)}") from None
        return cls(model, payload["item_tokens"], device=device, on_unknown=on_unknown)

    # ids

    @property
    def n_items(self) -> int:
        return len(self.item_tokens) - 1  # without padding

    def item_id(self, item, on_unknown=None):
        """Internal id of an original item token, or None when skipped."""
        iid = self.token2id.get(str(item))
        if iid is None:
            if (on_unknown or self.on_unknown) == "skip":
                return None
            raise UnknownItemError(item, f"unknown item {item!r}: not in the checkpoint's item map of "
                                         f"{self.n_items} items (pass on_unknown='skip' to ignore unknown items)")
        return iid

    def _ids(self, history, on_unknown):
        if isinstance(history, (str, bytes, int)):
            raise TypeError(f"history must be a sequence of items, got {type(history).__name__} {history!r}")
        ids = [self.item_id(item, on_unknown) for item in history]
        return [i for i in ids if i is not None]

    # scoring

    def _top_k(self, seq_output, k, exclude):
        if not int_in(k, 1):
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        with torch.no_grad():
            scores = seq_output.float() @ self.model.item_embedding.weight.float().t()  # [n_items]
            scores[0] = -math.inf  # padding
            if exclude:
                scores[torch.tensor(sorted(exclude), dtype=torch.long, device=scores.device)] = -math.inf
            available = self.n_items - len(exclude)
            values, idx = torch.topk(scores, min(k, max(available, 0)))
        return [(self.item_tokens[i], float(v)) for v, i in zip(values.tolist(), idx.tolist())]

    def _window(self, ids):
        max_len = self.model.max_seq_length
        return ids[-max_len:] if self.model.position_embedding is not None else ids

    def recommend(self, history, k=10, exclude_seen=True, on_unknown=None):
        """Top-k (item token, score) after ``history`` (oldest first), best first.

        exclude_seen: leave out the items of the history. Raises ValueError when no item of the
        history is known.
        """
        ids = self._ids(history, on_unknown)
        if not ids:
            raise ValueError("the history has no known item: nothing to recommend from")
        window = self._window(ids)
        seq = torch.tensor([window], dtype=torch.long, device=self.device)
        seq_output, _ = self.model.prefill(seq, torch.tensor([len(window)], device=self.device))
        return self._top_k(seq_output[0], k, set(ids) if exclude_seen else set())

    # streaming

    def update(self, user, item, on_unknown=None) -> bool:
        """Fold one event into ``user``'s state (O(1) in the user's history). Returns False when
        the item was unknown and skipped, True otherwise."""
        iid = self.item_id(item, on_unknown)
        if iid is None:
            return False
        u = self.users.get(user)
        model = self.model
        with_positions = model.position_embedding is not None
        if u is None:
            u = _User(model.init_state(1), None, recent=deque(maxlen=model.max_seq_length) if with_positions else None)
            self.users[user] = u
        if with_positions and int(u.state.steps[0]) >= model.max_seq_length:
            # no position left: restart from the last max_seq_length items, this one included
            u.recent.append(iid)
            window = torch.tensor([list(u.recent)], dtype=torch.long, device=self.device)
            out, u.state = model.prefill(window, torch.tensor([window.shape[1]], device=self.device))
        else:
            out, u.state = model.step(torch.tensor([iid], device=self.device), u.state)
            if with_positions:
                u.recent.append(iid)
        u.seq_output = out[0]
        u.seen.add(iid)
        return True

    def recommend_user(self, user, k=10, exclude_seen=True):
        """Top-k (item token, score) for ``user`` after the events given to ``update``."""
        u = self.users.get(user)
        if u is None:
            raise KeyError(f"user {user!r} has no events yet: call update(user, item) first")
        return self._top_k(u.seq_output, k, u.seen if exclude_seen else set())

    def forget(self, user) -> None:
        """Drop a user's state (a no-op for an unknown user)."""
        self.users.pop(user, None)

    def __repr__(self):
        c = self.model.model_config
        return (f"Recommender(Mamba4Rec hidden_size={c['hidden_size']} num_layers={c['num_layers']}, "
                f"{self.n_items} items, {len(self.users)} users, device={self.device})")


__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "Recommender", "UnknownItemError",
           "model_from_checkpoint_config", "export_checkpoint", "load_checkpoint"]
