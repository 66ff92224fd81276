"""Serving: export_checkpoint / Recommender round trip on a model trained on the tiny data set,
top-k rules, streaming per user, unknown items, bad checkpoints, and the recommend CLI."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mamba4rec.pipeline as pipeline
from mamba4rec import recommend as cli
from mamba4rec.serving import (FORMAT, CheckpointError, Recommender, UnknownItemError, export_checkpoint,
                               load_checkpoint)
from tests.test_model import make_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's one epoch on tests/data/tiny through pipeline.run(export_path=...)
    (tests/conftest.py: tiny_run): the export, RecBole's own best checkpoint of the same run, and
    the data set's item map."""
    from recbole.data import create_dataset

    tmp = tiny_run["tmp"]
    cwd = os.getcwd()
    os.chdir(tmp)  # RecBole writes ./log/
    try:
        config = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_run["config"])
        tokens = list(create_dataset(config).field2id_token["item_id"])
    finally:
        os.chdir(cwd)
    assert tiny_run["result"].extra["export_path"] == str(tiny_run["export"])
    return {"export": tiny_run["export"], "recbole": tiny_run["recbole"], "tokens": tokens, "tmp": tmp}


@pytest.fixture(scope="module")
def rec(trained):
    return Recommender.from_checkpoint(trained["export"])


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; see tests/test_streaming.py
    yield
    torch.set_num_threads(saved)


def _scores(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.tensor([len(ids)]))
        return (out @ model.item_embedding.weight.t())[0]


def test_export_holds_the_best_weights_config_and_item_map(trained, rec):
    payload = load_checkpoint(trained["export"])
    assert payload["format"] == FORMAT and payload["model"] == "Mamba4Rec"
    assert payload["item_tokens"] == trained["tokens"] and payload["item_tokens"][0] == "[PAD]"
    cfg = payload["config"]
    assert (cfg["n_items"], cfg["MAX_ITEM_LIST_LENGTH"], cfg["hidden_size"], cfg["d_state"]) == (31, 10, 16, 4)
    best = torch.load(trained["recbole"], weights_only=False)["state_dict"]  # this process's own file
    assert best.keys() == payload["state_dict"].keys()
    for name, tensor in best.items():
        assert torch.equal(tensor.cpu(), payload["state_dict"][name]), name
    assert not [p for p in trained["export"].parent.iterdir() if p.name != "tiny.pt"]  # no temp file left


def test_recommend_matches_the_model_and_excludes_seen_and_padding(rec):
    history = ["i5", "i6", "i7", "i6"]
    ids = [rec.token2id[t] for t in history]
    top = rec.recommend(history, k=100)
    assert len(top) == rec.n_items - 3  # every item but the 3 seen ones and padding
    items = [item for item, _ in top]
    assert "[PAD]" not in items and not set(history) & set(items)
    scores = _scores(rec.model, ids)
    expected = sorted((float(scores[i]), rec.item_tokens[i]) for i in range(1, 31) if i not in ids)[::-1]
    assert items[:5] == [t for _, t in expected[:5]]
    torch.testing.assert_close(torch.tensor([s for _, s in top]), torch.tensor([s for s, _ in expected]))
    with_seen = rec.recommend(history, k=100, exclude_seen=False)
    assert len(with_seen) == rec.n_items and "[PAD]" not in [i for i, _ in with_seen]
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        rec.recommend(history, k=0)


def test_streaming_updates_equal_recommending_from_the_history(trained):
    rec = Recommender.from_checkpoint(trained["export"])
    events = [("u1", "i5"), ("u2", "i9"), ("u1", "i6"), ("u1", "i7"), ("u2", "i10"), ("u1", "i5")]
    seen = {}
    for user, item in events:
        assert rec.update(user, item) is True
        seen.setdefault(user, []).append(item)
        got, want = rec.recommend_user(user, k=5), rec.recommend(seen[user], k=5)
        assert [i for i, _ in got] == [i for i, _ in want]
        torch.testing.assert_close(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]))
    assert set(rec.users) == {"u1", "u2"} and rec.users["u1"].state.steps.tolist() == [4]
    with pytest.raises(KeyError, match="user 'u3' has no events"):
        rec.recommend_user("u3")
    rec.forget("u1")
    assert "u1" not in rec.users


def test_unknown_items_error_by_default_or_are_skipped(trained):
    rec = Recommender.from_checkpoint(trained["export"])
    for bad in ("nope", "[PAD]"):  # the padding token is not an item
        with pytest.raises(UnknownItemError, match=re.escape(f"unknown item {bad!r}") + ".*on_unknown='skip'") as info:
            rec.recommend(["i5", bad])
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert info.value.item == bad and str(info.value).startswith("unknown item")
    with pytest.raises(UnknownItemError):
        rec.update("u1", "nope")
    assert "u1" not in rec.users  # nothing half-applied
    assert rec.recommend(["i5", "nope"], k=3, on_unknown="skip") == rec.recommend(["i5"], k=3)
    with pytest.raises(ValueError, match="no known item"):
        rec.recommend(["nope"], on_unknown="skip")
    skipping = Recommender.from_checkpoint(trained["export"], on_unknown="skip")
    assert skipping.update("u1", "nope") is False and "u1" not in skipping.users
    with pytest.raises(ValueError, match="on_unknown='ignore'"):
        Recommender.from_checkpoint(trained["export"], on_unknown="ignore")
    with pytest.raises(TypeError, match="sequence of items"):
        rec.recommend("i5")


def test_position_embedding_stream_keeps_the_last_max_len_items():
    """With a position embedding only max_seq_length positions exist: past that, the stream is
    restarted from its last items, which is what recommending from that window gives."""
    model = make_model(n_items=20, max_len=5, position_embedding=True, hidden_size=16, d_state=4).eval()
    tokens = ["[PAD]"] + [f"t{i}" for i in range(1, 20)]
    rec = Recommender(model, tokens)
    items = [f"t{i}" for i in (3, 4, 5, 6, 7, 8, 9, 3, 11)]
    for n, item in enumerate(items, 1):
        rec.update("u", item)
        window = items[max(0, n - 5): n]
        want = _scores(model, [tokens.index(t) for t in window])
        got = dict(rec.recommend_user("u", k=19, exclude_seen=False))
        torch.testing.assert_close(torch.tensor([got[t] for t in tokens[1:]]), want[1:], rtol=1e-4, atol=1e-4)
        again = dict(rec.recommend(items[:n], k=19, exclude_seen=False))  # the same window, in one pass
        torch.testing.assert_close(torch.tensor([again[t] for t in tokens[1:]]), want[1:], rtol=1e-4, atol=1e-4)
    assert len(rec.users["u"].seen) == 8  # every item streamed is excluded, not just the window


# --------------------------------------------------------------------------- bad checkpoints

class Plain:
    """A class of this module: unpickling it would import and run this module's code."""


class Boom:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_files(trained, tmp):
    good = trained["export"].read_bytes()
    payload = load_checkpoint(trained["export"])
    files = {}

    def put(name, data=None, obj=None):
        path = tmp / name
        if obj is not None:
            torch.save(obj, path)
        else:
            path.write_bytes(data)
        files[name] = path

    put("truncated.pt", good[: len(good) // 2])
    put("random.pt", os.urandom(4096))
    put("empty.pt", b"")
    put("other_dict.pt", obj={"weights": torch.zeros(3), "epoch": 4})
    put("a_list.pt", obj=[torch.zeros(2)])
    put("sasrec.pt", obj={**payload, "model": "SASRec"})
    put("future.pt", obj={**payload, "format_version": 99})
    put("bad_config.pt", obj={**payload, "config": {**payload["config"], "d_state": 0}})
    put("wrong_shape.pt", obj={**payload, "config": {**payload["config"], "hidden_size": 32}})
    put("short_map.pt", obj={**payload, "item_tokens": payload["item_tokens"][:-1]})
    put("custom_class.pt", obj={"format": FORMAT, "thing": Plain()})
    put("runs_code.pt", obj={"format": FORMAT, "boom": Boom(str(tmp / "pwned"))})
    (tmp / "plain_pickle.pt").write_bytes(pickle.dumps(Boom(str(tmp / "pwned"))))
    files["plain_pickle.pt"] = tmp / "plain_pickle.pt"
    files["recbole_trainer.pth"] = trained["recbole"]
    return files


EXPECTED = {
    "truncated.pt": "is not a torch.save archive",
    "random.pt": "is not a torch.save archive",
    "empty.pt": "is not a torch.save archive",
    "plain_pickle.pt": "is not a torch.save archive",
    "other_dict.pt": r"not a mamba4rec serving checkpoint \(format 'mamba4rec-serving'\): it holds a dict with keys \['epoch', 'weights'\]",
    "a_list.pt": "it holds a list",
    "sasrec.pt": "holds a 'SASRec' model; only Mamba4Rec",
    "future.pt": "format_version 99; this mamba4rec .* reads versions 1..1",
    "bad_config.pt": "d_state=0 is invalid",
    "wrong_shape.pt": "the weights do not fit the config",
    "short_map.pt": "n_items=31 does not match the item map's 30 tokens",
    "custom_class.pt": "pickles the global tests.test_serving.Plain; .*nothing in the file is run",
    "runs_code.pt": "pickles the global .*open; .*nothing in the file is run",
    "recbole_trainer.pth": "is a RecBole trainer checkpoint.*export_checkpoint",
}


def test_bad_checkpoints_get_a_clear_error_naming_the_file(trained, tmp_path):
    files = _bad_files(trained, tmp_path)
    assert set(files) == set(EXPECTED)
    for name, path in files.items():
        with pytest.raises(CheckpointError, match=EXPECTED[name]) as info:
            Recommender.from_checkpoint(path)
        assert isinstance(info.value, ValueError) and repr(str(path)) in str(info.value), name
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recommender.from_checkpoint(tmp_path / "missing.pt")


def test_export_refuses_a_mismatched_item_map_and_other_models(tmp_path):
    model = make_model(n_items=12)
    with pytest.raises(ValueError, match="item map has 3 tokens but the model scores 12 items"):
        export_checkpoint(model, ["[PAD]", "a", "b"], tmp_path / "x.pt")
    with pytest.raises(TypeError, match="expected a Mamba4Rec"):
        export_checkpoint(torch.nn.Linear(2, 2), ["a"], tmp_path / "x.pt")
    path = export_checkpoint(model, ["[PAD]"] + [str(10 * i) for i in range(1, 12)], tmp_path / "sub" / "x.pt")
    assert os.listdir(tmp_path / "sub") == ["x.pt"]
    rec = Recommender.from_checkpoint(path)
    assert rec.n_items == 11
    assert rec.recommend([50, 60], k=3) == rec.recommend(["50", "60"], k=3)  # tokens are strings
    with pytest.raises(ValueError, match="only Mamba4Rec models can be exported"):
        pipeline.run("SASRec", "tiny", export_path=str(tmp_path / "s.pt"))


# --------------------------------------------------------------------------- the CLI

def _cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "mamba4rec.recommend", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_history_and_an_unknown_item(trained, rec, capsys):
    code = cli.main(["--checkpoint", str(trained["export"]), "--history", "i5", "i6", "i7", "--k", "4"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines()]
    want = rec.recommend(["i5", "i6", "i7"], k=4)
    assert [(int(r), i, float(s)) for r, i, s in lines] == [(n, i, round(s, 4)) for n, (i, s) in enumerate(want, 1)]

    code = cli.main(["--checkpoint", str(trained["export"]), "--history", "i5", "zzz"])
    out, err = capsys.readouterr()
    assert code == 2 and "error: unknown item 'zzz'" in err and not out


def test_cli_events_from_stdin_in_a_subprocess(trained, rec):
    """python -m mamba4rec.recommend as a user runs it: events piped to its stdin."""
    out = _cli("--checkpoint", trained["export"], "--events", "-", "--k", "3", stdin="u1 i5\n\n# note\nu2 i9\nu1 i6\n")
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["u1", "i5"], ["u2", "i9"], ["u1", "i6"]]
    assert [p.split(":")[0] for p in rows[2][2].split()] == [i for i, _ in rec.recommend(["i5", "i6"], k=3)]


@pytest.mark.parametrize("case", ["bad_checkpoint", "missing_checkpoint", "missing_events", "malformed_line",
                                  "unknown_item", "skip_unknown", "bad_k"])
def test_cli_errors_exit_2(trained, tmp_path, capsys, case):
    events = tmp_path / "events.txt"
    events.write_text("u1 i5\nu1 nope\nu1 i6\n" if case in ("unknown_item", "skip_unknown") else
                      "u1 i5\nu1 i6 extra\n")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    ckpt = {"bad_checkpoint": garbage, "missing_checkpoint": tmp_path / "none.pt"}.get(case, trained["export"])
    argv = ["--checkpoint", str(ckpt), "--events", str(tmp_path / "none.txt" if case == "missing_events" else events)]
    argv += {"skip_unknown": ["--on-unknown", "skip"], "bad_k": ["--k", "0"]}.get(case, [])
    if case == "bad_k":
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and "--k must be >= 1" in capsys.readouterr().err
        return
    code = cli.main(argv)
    out, err = capsys.readouterr()
    expect = {
        "bad_checkpoint": "is not a torch.save archive", "missing_checkpoint": "does not exist",
        "missing_events": "No such file", "malformed_line": "events.txt:2: expected 'user item'",
        "unknown_item": "events.txt:2: unknown item 'nope'",
    }
    if case == "skip_unknown":
        assert code == 0 and "events.txt:2: skipped unknown item 'nope'" in err
        assert [line.split("\t")[1] for line in out.splitlines()] == ["i5", "nope", "i6"]
        return
    assert code == 2 and "error: " in err and expect[case] in err, err
