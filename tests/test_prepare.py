"""datasets/prepare.py and mamba4rec/data_prep.py: readers, k-core, stats, atomic output, errors.

Every input is written here, in tmp_path; nothing is downloaded. The tests marked ``slow``
read the real benchmark files in ../shared/datasets (beside the checkout) and skip without
them; each takes a few seconds.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import types
import warnings
import zipfile
from pathlib import Path

import pytest

from mamba4rec import data_prep as dp

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "datasets" / "prepare.py"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

HEADER_RATED = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
HEADER_SEQ = "user_id:token\titem_id:token\ttimestamp:float"


def write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def read_inter(folder: Path, name: str) -> list[str]:
    return (folder / name / f"{name}.inter").read_text(encoding="utf-8").splitlines()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _prepare_script():
    """datasets/prepare.py as a module (the folder is not a package), loaded once."""
    if "_prepare_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_prepare_script", PREPARE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_prepare_script"]


def run_cli(capsys, *args):
    """prepare.py's main(argv) in this process: returncode, stdout and stderr as its process
    would end (return status, or argparse's SystemExit)."""
    try:
        code = _prepare_script().main(["--no-progress", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


# --------------------------------------------------------------------------- readers

ML_DAT = "1::10::5::300\n1::11::3::100\n2::10::4::200\n\n"  # user 1 out of time order
ML_RECORDS = [("1", "10", 5.0, 300.0), ("1", "11", 3.0, 100.0), ("2", "10", 4.0, 200.0)]


def test_movielens_ratings_dat(tmp_path):
    path = write(tmp_path / "ratings.dat", ML_DAT)
    assert list(dp.read_movielens(path)) == ML_RECORDS


def test_movielens_u_data_tabs_and_gzip(tmp_path):
    text = "1\t10\t5\t300\n1\t11\t3\t100\n2\t10\t4\t200\n"
    assert list(dp.read_movielens(write(tmp_path / "u.data", text))) == ML_RECORDS
    assert list(dp.read_movielens(write(tmp_path / "u.data.gz", text, gz=True))) == ML_RECORDS


@pytest.mark.parametrize("member", ["ml-1m/ratings.dat", "ml-100k/u.data"])
def test_movielens_zip_reads_the_ratings_member_in_place(tmp_path, member):
    archive = tmp_path / (member.split("/")[0] + ".zip")
    text = ML_DAT if member.endswith(".dat") else ML_DAT.replace("::", "\t")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member.split("/")[0] + "/", "")
        zf.writestr(member.split("/")[0] + "/movies.dat", "10::Some Movie (1995)::Drama\n")
        zf.writestr(member, text)
    assert list(dp.read_movielens(archive)) == ML_RECORDS
    stats = dp.prepare("movielens", archive, "ml", tmp_path / "out")
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 2, 3)
    assert files_under(tmp_path) == sorted([archive.name, "out", "out/ml", "out/ml/ml.inter",
                                            "out/ml/ml.stats.json"])  # nothing extracted


def test_movielens_output_is_time_ordered_per_user_with_ratings(tmp_path):
    dp.prepare("movielens", write(tmp_path / "ratings.dat", ML_DAT), "ml", tmp_path)
    assert read_inter(tmp_path, "ml") == [HEADER_RATED, "1\t11\t3\t100", "1\t10\t5\t300",
                                          "2\t10\t4\t200"]


AMZ_CSV = "A1,B01,5.0,1300000000\nA1,B02,4.0,1200000000\nA2,B01,3.0,1250000000\n"
AMZ_RECORDS = [("A1", "B01", 5.0, 1.3e9), ("A1", "B02", 4.0, 1.2e9), ("A2", "B01", 3.0, 1.25e9)]


def amazon_json(records, loose=False) -> str:
    lines = []
    for user, item, rating, ts in records:
        obj = {"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": int(ts),
               "reviewText": "Great, \"really\"\tgood", "helpful": [0, 1]}
        lines.append(repr(obj) if loose else json.dumps(obj))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name,gz", [("ratings_Beauty.csv", False), ("ratings_Beauty.csv.gz", True),
                                     ("ratings", False)])
def test_amazon_csv(tmp_path, name, gz):
    path = write(tmp_path / name, AMZ_CSV, gz=gz)
    assert dp.amazon_kind(path) == "csv"
    assert list(dp.read_amazon(path)) == AMZ_RECORDS


def test_amazon_csv_column_order_from_option_or_header(tmp_path):
    swapped = "".join(f"{i},{u},{r},{t}\n" for u, i, r, t in
                      (line.split(",") for line in AMZ_CSV.strip().split("\n")))
    path = write(tmp_path / "Beauty.csv", swapped)
    assert list(dp.read_amazon(path, csv_columns="item,user,rating,timestamp")) == AMZ_RECORDS
    path = write(tmp_path / "with_header.csv", "item,user,rating,timestamp\n" + swapped)
    assert list(dp.read_amazon(path)) == AMZ_RECORDS
    with pytest.raises(dp.PrepareError, match="CSV columns"):
        list(dp.read_amazon(path, csv_columns="user,item,rating"))


@pytest.mark.parametrize("name,gz,loose", [("reviews_Beauty_5.json.gz", True, False),
                                           ("reviews_Beauty_5.json", False, False),
                                           ("reviews_Beauty_5", True, False),  # sniffed: '{'
                                           ("reviews_Beauty_5.json", False, True)])
def test_amazon_reviews_json(tmp_path, name, gz, loose):
    path = write(tmp_path / name, amazon_json(AMZ_RECORDS, loose=loose), gz=gz)
    assert dp.amazon_kind(path) == "json"
    assert list(dp.read_amazon(path)) == AMZ_RECORDS
    dp.prepare("amazon", path, "amazon-beauty", tmp_path / "out")
    assert read_inter(tmp_path / "out", "amazon-beauty") == [
        HEADER_RATED, "A1\tB02\t4\t1200000000", "A1\tB01\t5\t1300000000", "A2\tB01\t3\t1250000000"]


SEQ = "1 5 6 7\n2 6 8\n\n3 5\n"


@pytest.mark.parametrize("gz", [False, True])
def test_seq_text_positions_are_timestamps_and_no_rating(tmp_path, gz):
    path = write(tmp_path / "seq.txt", SEQ, gz=gz)
    assert list(dp.read_seq_text(path)) == [
        ("1", "5", None, 0.0), ("1", "6", None, 1.0), ("1", "7", None, 2.0),
        ("2", "6", None, 0.0), ("2", "8", None, 1.0), ("3", "5", None, 0.0)]
    dp.prepare("seq-text", path, "seq", tmp_path / "out")
    assert read_inter(tmp_path / "out", "seq") == [
        HEADER_SEQ, "1\t5\t0", "1\t6\t1", "1\t7\t2", "2\t6\t0", "2\t8\t1", "3\t5\t0"]


def test_repeated_items_are_kept_in_order(tmp_path):
    dp.prepare("seq-text", write(tmp_path / "s.txt", "u 1 2 1 1\n"), "s", tmp_path)
    assert read_inter(tmp_path, "s")[1:] == ["u\t1\t0", "u\t2\t1", "u\t1\t2", "u\t1\t3"]


# --------------------------------------------------------------------------- k-core

# With K = 2 on both sides: u4 has one interaction -> dropped (pass 1); then item c has only
# u3 -> dropped (pass 2); then u3 has only b -> dropped (pass 3). One pass is not enough.
CHAIN = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "b"), ("u3", "c"),
         ("u4", "c")]
CHAIN_RECORDS = [(u, i, None, float(t)) for t, (u, i) in enumerate(CHAIN)]


def test_kcore_iterates_to_a_fixed_point():
    one_pass = dp.kcore_pass(CHAIN_RECORDS, 2, 2)
    assert {r[0] for r in one_pass} == {"u1", "u2", "u3"}  # u3 and c survive a single pass
    kept, passes = dp.kcore_filter(CHAIN_RECORDS, 2, 2)
    assert [(r[0], r[1]) for r in kept] == CHAIN[:4]
    assert passes == 3
    again, more = dp.kcore_filter(kept, 2, 2)  # a fixed point: filtering again changes nothing
    assert again == kept and more == 0


def test_kcore_one_side_only_and_default_is_no_filter():
    kept, _ = dp.kcore_filter(CHAIN_RECORDS, 0, 2)  # items only: c has 2 (u3, u4): all kept
    assert kept == CHAIN_RECORDS
    kept, _ = dp.kcore_filter(CHAIN_RECORDS, 2, 0)  # users only: u4 goes, c stays with u3
    assert {r[0] for r in kept} == {"u1", "u2", "u3"}
    assert dp.kcore_filter(CHAIN_RECORDS) == (CHAIN_RECORDS, 0)
    with pytest.raises(dp.PrepareError, match="kcore-user"):
        dp.kcore_filter(CHAIN_RECORDS, -1, 0)


def test_cli_kcore_and_stats_file(tmp_path, capsys):
    text = "".join(f"{u} {' '.join(items)}\n" for u, items in
                   (("u1", "ab"), ("u2", "ab"), ("u3", "bc"), ("u4", "c")))
    result = run_cli(capsys, "--format", "seq-text", "--input", write(tmp_path / "s.txt", text),
                     "--dataset", "chain", "--output-dir", tmp_path / "out",
                     "--kcore-user", 2, "--kcore-item", 2)
    assert result.returncode == 0, result.stderr
    assert "users 2  items 2  interactions 4" in result.stdout
    stats = json.loads((tmp_path / "out" / "chain" / "chain.stats.json").read_text())
    assert stats["kcore"] == {"user": 2, "item": 2, "passes": 3}
    assert stats["before_filter"] == {"users": 4, "items": 3, "interactions": 7}
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 2, 4)
    assert read_inter(tmp_path / "out", "chain") == [
        HEADER_SEQ, "u1\ta\t0", "u1\tb\t1", "u2\ta\t0", "u2\tb\t1"]


# --------------------------------------------------------------------------- statistics


def test_stats_values():
    records = [(u, i, None, 0.0) for u, n in (("x", 1), ("y", 2), ("z", 6)) for i in "abcdef"[:n]]
    stats = dp.compute_stats(records)
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 6, 9)
    assert stats["density"] == pytest.approx(9 / 18)
    assert stats["seq_len"] == {"min": 1, "median": 2, "mean": 3.0, "max": 6}
    even = dp.compute_stats(records + [("w", "a", None, 0.0)] * 3)
    assert even["seq_len"]["median"] == 2.5


# --------------------------------------------------------------------------- bad input

MALFORMED = [
    ("movielens", "ratings.dat", "1::10::5::300\n1::11::5\n", r"line 2: expected 4 fields"),
    ("movielens", "ratings.dat", "1::10::5::300\n\n1::11::five::3\n", r"line 3: rating 'five'"),
    ("amazon", "r.csv", AMZ_CSV + "A3,B9,4.0\n", r"line 4: expected 4 comma-separated"),
    ("amazon", "r.csv", "A1,B01,5.0,1300000000\nA1,,4.0,12\n", r"line 2: empty item id"),
    ("amazon", "r.json", '{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1}\n'
                         '{"reviewerID": "A", "asin": "C"\n', r"line 2: not a JSON object"),
    ("amazon", "r.json", '{"reviewerID": "A", "asin": "B", "overall": 5}\n',
     r"line 1: missing key\(s\) unixReviewTime"),
    ("seq-text", "s.txt", "1 2 3\n2 4\n1 5\n", r"line 3: user '1' already had a line \(line 1\)"),
    ("seq-text", "s.txt", "1 2 3\n2\n", r"line 2: user '2' has no items"),
    ("seq-text", "s.txt", "1 2 3\n2 \xff\n".encode("latin-1").decode("utf-8", "surrogateescape"),
     r"line 2: not UTF-8"),
]


@pytest.mark.parametrize("fmt,name,text,why", MALFORMED,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_line_names_file_line_and_reason(tmp_path, fmt, name, text, why):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(dp.PrepareError, match=why) as info:
        dp.prepare(fmt, path, "bad", tmp_path / "out")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert files_under(tmp_path) == [name]  # no output folder, no temporary file


def test_truncated_gzip_is_an_error(tmp_path):
    path = tmp_path / "r.json.gz"
    path.write_bytes(gzip.compress(amazon_json(AMZ_RECORDS * 50).encode())[:-20])
    with pytest.raises(dp.PrepareError, match="corrupt or truncated"):
        dp.prepare("amazon", path, "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_and_empty_results(tmp_path):
    seq = write(tmp_path / "s.txt", SEQ)
    with pytest.raises(dp.PrepareError, match="no such file"):
        dp.prepare("seq-text", tmp_path / "missing.txt", "x", tmp_path / "out")
    with pytest.raises(dp.PrepareError, match="unknown format 'netflix'"):
        dp.prepare("netflix", seq, "x", tmp_path / "out")
    with pytest.raises(dp.PrepareError, match="plain folder name"):
        dp.prepare("seq-text", seq, "../x", tmp_path / "out")
    with pytest.raises(dp.PrepareError, match="no interactions found"):
        dp.prepare("seq-text", write(tmp_path / "empty.txt", "\n\n"), "x", tmp_path / "out")
    with pytest.raises(dp.PrepareError, match="nothing left after k-core"):
        dp.prepare("seq-text", seq, "x", tmp_path / "out", user_k=10)
    with pytest.raises(dp.PrepareError, match="zip archives are read for --format movielens"):
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
            zf.writestr("s.txt", SEQ)
        dp.prepare("seq-text", tmp_path / "a.zip", "x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert issubclass(dp.PrepareError, ValueError)


CLI_ERRORS = [
    (["--format", "seq-text", "--input", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--format", "netflix", "--input", "{tmp}/s.txt"], "invalid choice: 'netflix'"),
    (["--format", "movielens", "--input", "{tmp}/s.txt"], "s.txt, line 1: expected 4 fields"),
    (["--format", "seq-text", "--input", "{tmp}/s.txt", "--kcore-item", "9"], "nothing left"),
]


@pytest.mark.parametrize("args,message", CLI_ERRORS, ids=["missing", "format", "malformed", "empty"])
def test_cli_errors_exit_2_with_one_line_and_no_output(tmp_path, capsys, args, message):
    write(tmp_path / "s.txt", SEQ)
    out = tmp_path / "out"
    result = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args], "--dataset", "x", "--output-dir", out)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: ") and message in lines[0]
    assert not out.exists()


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_file(tmp_path, monkeypatch):
    seq = write(tmp_path / "s.txt", SEQ)

    def broken(records, with_rating):
        yield dp.inter_header(with_rating) + "\n"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dp, "inter_lines", broken)
    with pytest.raises(OSError):
        dp.prepare("seq-text", seq, "x", tmp_path / "out" / "deeper")
    assert files_under(tmp_path) == ["s.txt"]  # folders it created are gone, no temporaries

    monkeypatch.undo()
    dp.prepare("seq-text", seq, "x", tmp_path / "out")
    before = (tmp_path / "out" / "x" / "x.inter").read_text()
    monkeypatch.setattr(dp, "inter_lines", broken)
    with pytest.raises(OSError):
        dp.prepare("seq-text", write(tmp_path / "s2.txt", "9 9 9\n"), "x", tmp_path / "out")
    assert (tmp_path / "out" / "x" / "x.inter").read_text() == before
    assert files_under(tmp_path / "out") == ["x", "x/x.inter", "x/x.stats.json"]


def test_write_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "f.txt"
    dp.write_atomic(target, ["a\n", "b\n"])
    dp.write_atomic(target, ["c\n"])
    assert target.read_text() == "c\n" and files_under(tmp_path) == ["f.txt"]


def test_datasets_folder_is_not_a_package():
    # `datasets` is a popular PyPI package; an __init__.py here would shadow it from the repo root
    assert not (REPO / "datasets" / "__init__.py").exists()


@pytest.mark.parametrize("module", ["data_prep.py", "data_readers.py"])
def test_data_prep_imports_neither_torch_nor_recbole(module):
    # its own imports: the readers, k-core and writers need the standard library and numpy only
    import ast

    tree = ast.parse((REPO / "mamba4rec" / module).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported and not imported & {"torch", "recbole"}, imported


def test_the_script_uses_the_package_s_data_prep():
    assert _prepare_script().dp is sys.modules["mamba4rec.data_prep"]


# --------------------------------------------------------------------------- RecBole


def _recbole_dataset(tmp_path, name, config_files=(), monkeypatch=None):
    """RecBole's own loader on a prepared file (skipped, with the reason, if RecBole cannot
    be imported on this stack)."""
    try:
        from recbole.config import Config
        from recbole.data import create_dataset
    except Exception as exc:  # noqa: BLE001 - any import failure of the optional stack
        pytest.skip(f"RecBole cannot be imported here: {type(exc).__name__}: {exc}")
    monkeypatch.chdir(tmp_path)  # RecBole writes ./log/
    config = Config(model="SASRec", dataset=name, config_file_list=list(config_files) or None,
                    config_dict={"data_path": str(tmp_path / "out"),
                                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                                 "train_neg_sample_args": None,
                                 "user_inter_num_interval": None, "item_inter_num_interval": None,
                                 "state": "WARNING", "show_progress": False,
                                 "checkpoint_dir": str(tmp_path / "saved")})
    with warnings.catch_warnings():
        # RecBole 1.2.1's in-place fillna on a column (fixed by mamba4rec.compat on main)
        warnings.simplefilter("ignore", FutureWarning)
        return config, create_dataset(config)


@pytest.mark.parametrize("fmt", ["movielens", "seq-text"])
def test_recbole_loads_a_prepared_file(tmp_path, monkeypatch, fmt):
    if fmt == "movielens":
        text = "".join(f"{u}::{i}::{1 + (u + i) % 5}::{1000 + 10 * t}\n"
                       for u in range(1, 6) for t, i in enumerate(range(u, u + 4)))
        path = write(tmp_path / "ratings.dat", text)
    else:
        path = write(tmp_path / "s.txt", "".join(
            f"{u} {' '.join(str(i) for i in range(u, u + 4))}\n" for u in range(1, 6)))
    stats = dp.prepare(fmt, path, "tiny", tmp_path / "out")
    _, dataset = _recbole_dataset(tmp_path, "tiny", monkeypatch=monkeypatch)
    assert dataset.user_num == stats["users"] + 1 == 6  # RecBole adds the padding id 0
    assert dataset.item_num == stats["items"] + 1 == 9
    assert dataset.inter_num == stats["interactions"] == 20


@pytest.mark.parametrize("name", ["ml-1m", "amazon-beauty", "amazon-video-games",
                                  "amazon-sports-outdoors"])
def test_dataset_configs_load_in_recbole(tmp_path, monkeypatch, name):
    path = write(tmp_path / "s.txt", "".join(
        f"{u} {' '.join(str(i) for i in range(u, u + 5))}\n" for u in range(1, 8)))
    stats = dp.prepare("seq-text", path, name, tmp_path / "out")
    config_file = REPO / "configs" / "dataset" / f"{name}.yaml"
    config, dataset = _recbole_dataset(tmp_path, name, [str(config_file)], monkeypatch)
    assert config["MAX_ITEM_LIST_LENGTH"] == (200 if name == "ml-1m" else 50)
    assert config["TIME_FIELD"] == "timestamp"
    assert (dataset.user_num, dataset.item_num) == (stats["users"] + 1, stats["items"] + 1)
    model_file = REPO / "configs" / "model" / "Mamba4Rec" / f"{name}.yaml"
    assert f"dropout_prob: {0.2 if name == 'ml-1m' else 0.4}" in model_file.read_text()


def test_every_config_key_has_a_typed_comment():
    """Each key in configs/ says its type in its comment: `key: value  # (type) what it does`."""
    import re

    import yaml

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 10
    untyped = []
    for path in files:
        yaml.safe_load(path.read_text())  # and every file parses
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*[A-Za-z_][\w-]*\s*:", line) and not re.search(r"#\s*\((str|int|float|bool|list|dict)"
                                                                           r"[^)]*\)", line):
                untyped.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert untyped == []


# --------------------------------------------------------------------------- real data

REAL = [  # (folder/file, RecBole name, k-core args, users, items, interactions)
    ("ml-1m/ml-1m.txt", "ml-1m", ("--kcore-item", 5), 6040, 3416, 999611),
    ("amazon-beauty/Beauty.txt", "amazon-beauty", (), 22363, 12101, 198502),
    ("amazon-beauty/Beauty.txt", "amazon-beauty", ("--kcore-user", 5, "--kcore-item", 5),
     22363, 12101, 198502),  # already 5-core: filtering again changes nothing
]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"no {SHARED_DATASETS}")
@pytest.mark.parametrize("rel,name,kcore,users,items,inters", REAL,
                         ids=["ml-1m-item5", "beauty", "beauty-5core"])
def test_real_datasets(tmp_path, capsys, rel, name, kcore, users, items, inters):
    result = run_cli(capsys, "--format", "seq-text", "--input", SHARED_DATASETS / rel, "--dataset", name,
                     "--output-dir", tmp_path, *kcore)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / name / f"{name}.stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (users, items, inters)
    lines = read_inter(tmp_path, name)
    assert lines[0] == HEADER_SEQ and len(lines) == inters + 1
