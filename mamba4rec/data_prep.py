"""Raw public interaction data -> RecBole atomic files, with k-core filtering and statistics.

Readers (each yields ``(user, item, rating or None, timestamp)`` tuples, ids as strings):

=============  ==============================================================================
movielens      ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``u.data`` (tab
               separated), or the ``ml-1m.zip`` / ``ml-100k.zip`` archives themselves (the
               ratings member is read inside the zip, nothing is extracted).
amazon         ratings CSV (``user,item,rating,timestamp``, no header) or 5-core reviews JSON
               lines (``reviewerID, asin, overall, unixReviewTime``); told apart by extension,
               else by content. Gzip (``.gz``) is read directly.
seq-text       one line per user, ``user item_1 item_2 ...`` in chronological order; the
               timestamp is the position on the line (0, 1, 2, ...) and there is no rating.
=============  ==============================================================================

Any input may be gzip-compressed (detected by its magic bytes, not its name).

This module imports nothing from RecBole or torch (``datasets/prepare.py`` loads it on its
own, so preparing data does not pay for importing either). Every problem with the input is a
:class:`PrepareError` whose message is one line naming the file, the line and the reason.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import os
import statistics
import tempfile
import zipfile
import zlib
from collections import Counter
from typing import Callable, Iterable, Iterator, Optional

FORMATS = ("movielens", "amazon", "seq-text")

#: One interaction: (user, item, rating or None, timestamp).
Record = tuple  # (str, str, Optional[float], float); plain tuples: 2x cheaper than NamedTuple

#: Members tried, in order, when a MovieLens zip is given (RecBole's / GroupLens' archives).
MOVIELENS_ZIP_MEMBERS = ("ml-1m/ratings.dat", "ml-100k/u.data", "ml-10M100K/ratings.dat")
MOVIELENS_RATING_FILES = ("ratings.dat", "u.data")

AMAZON_JSON_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime")
CSV_COLUMNS = ("user", "item", "rating", "timestamp")

#: Inputs at least this large (bytes on disk) get a tqdm bar when progress is asked for.
PROGRESS_MIN_BYTES = 8 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"


class PrepareError(ValueError):
    """Bad input, bad arguments or an empty result; the message is one line."""


# --------------------------------------------------------------------------- input lines


def _check_input(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: not a regular file")
    return path


def _magic(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


def _is_zip(path: str) -> bool:
    return _magic(path) == _ZIP_MAGIC


def _pick_zip_member(path: str, zf: zipfile.ZipFile) -> str:
    names = [n for n in zf.namelist() if not n.endswith("/")]
    for candidate in MOVIELENS_ZIP_MEMBERS:
        if candidate in names:
            return candidate
    found = [n for n in names if n.rsplit("/", 1)[-1] in MOVIELENS_RATING_FILES]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PrepareError(f"{path}: zip archive has no {' or '.join(MOVIELENS_RATING_FILES)} member")
    raise PrepareError(f"{path}: zip archive has several ratings members ({', '.join(found)}); "
                       f"extract the one you want and pass it as --input")


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled or total < PROGRESS_MIN_BYTES:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a RecBole dependency, but the script works without it
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def _iter_lines(path: str, *, allow_zip: bool = False, progress: bool = False
                ) -> Iterator[tuple[str, int, str]]:
    """Yield ``(source name, line number from 1, line without its newline)``.

    ``source name`` is the path, or ``archive.zip:member`` for a zip member. Lines are decoded
    as UTF-8 one by one, so a bad byte is reported with its line number.
    """
    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        zf = None
        if head == _ZIP_MAGIC:
            if not allow_zip:
                raise PrepareError(f"{path}: zip archives are read for --format movielens only; "
                                   f"extract the file first")
            try:
                zf = zipfile.ZipFile(raw)
                member = _pick_zip_member(path, zf)
            except zipfile.BadZipFile as exc:
                raise PrepareError(f"{path}: not a readable zip archive ({exc})") from None
            name = f"{path}:{member}"
            stream = zf.open(member)
            total, position = zf.getinfo(member).file_size, None  # count uncompressed bytes
        elif head[:2] == _GZIP_MAGIC:
            name = path
            stream = gzip.GzipFile(fileobj=raw)
            total, position = os.fstat(raw.fileno()).st_size, raw.tell  # compressed bytes read
        else:
            name = path
            stream = raw
            total, position = os.fstat(raw.fileno()).st_size, None
        bar = _progress_bar(progress, total, os.path.basename(name))
        lineno, done, shown = 0, 0, 0
        try:
            for lineno, data in enumerate(stream, 1):
                if bar is not None:
                    done += len(data)
                    if done - shown >= 1 << 20:  # redraw about once per MiB read
                        shown = done
                        bar.update((position() if position else done) - bar.n)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PrepareError(f"{name}, line {lineno}: not UTF-8 text ({exc.reason} at "
                                       f"byte {exc.start})") from None
                yield name, lineno, text.rstrip("\r\n")
        except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as exc:
            raise PrepareError(f"{name}, after line {lineno}: corrupt or truncated compressed "
                               f"data ({exc})") from None
        finally:
            if bar is not None:
                bar.close()
            if stream is not raw:
                stream.close()
            if zf is not None:
                zf.close()


def _bad(name: str, lineno: int, why: str, line: Optional[str] = None) -> PrepareError:
    shown = "" if line is None else f": {line[:80]!r}"
    return PrepareError(f"{name}, line {lineno}: {why}{shown}")


def _number(text, what: str, name: str, lineno: int, line: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _bad(name, lineno, f"{what} {text!r} is not a number", line) from None
    if not math.isfinite(value):
        raise _bad(name, lineno, f"{what} {text!r} is not finite", line)
    return value


def _token(text, what: str, name: str, lineno: int, line: str) -> str:
    if not isinstance(text, str):
        raise _bad(name, lineno, f"{what} is not a string", line)
    text = text.strip()
    if not text:
        raise _bad(name, lineno, f"empty {what}", line)
    if "\t" in text or "\n" in text or "\r" in text:  # would break the tab-separated .inter
        raise _bad(name, lineno, f"{what} {text!r} contains a tab or newline", line)
    return text


# --------------------------------------------------------------------------- readers


def read_movielens(path, progress: bool = False) -> Iterator[Record]:
    """MovieLens ratings: ``ratings.dat`` (``::``), ``u.data`` (tabs) or ml-1m / ml-100k zip."""
    path = _check_input(path)
    for name, lineno, line in _iter_lines(path, allow_zip=True, progress=progress):
        if not line.strip():
            continue
        # "::" (ratings.dat) or tabs (u.data); not any whitespace, which would take a
        # 4-token seq-text line for a rating
        parts = line.split("::") if "::" in line else line.split("\t")
        if len(parts) != 4:
            raise _bad(name, lineno, f"expected 4 fields (user, item, rating, timestamp) separated "
                                     f"by '::' or tabs, found {len(parts)}", line)
        user = _token(parts[0], "user id", name, lineno, line)
        item = _token(parts[1], "item id", name, lineno, line)
        yield (user, item, _number(parts[2], "rating", name, lineno, line),
               _number(parts[3], "timestamp", name, lineno, line))


def amazon_kind(path) -> str:
    """``"json"`` or ``"csv"``: by extension (``.json``, ``.jsonl``, ``.csv``, each optionally
    ``.gz``), else by the first non-blank character of the content (``{`` means JSON)."""
    path = _check_input(path)
    lower = os.path.basename(path).lower()
    if lower.endswith(".gz"):
        lower = lower[:-3]
    if lower.endswith((".json", ".jsonl")):
        return "json"
    if lower.endswith(".csv"):
        return "csv"
    for _, _, line in _iter_lines(path):
        stripped = line.lstrip()
        if stripped:
            return "json" if stripped.startswith("{") else "csv"
    return "csv"  # empty: the CSV reader yields nothing and the caller reports it


def _parse_csv_columns(columns) -> tuple:
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    columns = tuple(c.strip().lower() for c in columns)
    if sorted(columns) != sorted(CSV_COLUMNS):
        raise PrepareError(f"CSV columns must name each of {', '.join(CSV_COLUMNS)} once, "
                           f"got {','.join(columns)}")
    return columns


def read_amazon(path, progress: bool = False, csv_columns=CSV_COLUMNS) -> Iterator[Record]:
    """Amazon ratings CSV or 5-core reviews JSON lines (see :func:`amazon_kind`).

    ``csv_columns``: the CSV column order. The 2014 ``ratings_<Category>.csv`` files are
    ``user,item,rating,timestamp`` (the default); the 2018 ones are ``item,user,rating,timestamp``.
    A first row that names the columns is used as the order and skipped.
    """
    path = _check_input(path)
    if amazon_kind(path) == "json":
        yield from _read_amazon_json(path, progress)
    else:
        yield from _read_amazon_csv(path, progress, _parse_csv_columns(csv_columns))


def _read_amazon_json(path: str, progress: bool) -> Iterator[Record]:
    for name, lineno, line in _iter_lines(path, progress=progress):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # Some Amazon 2014 dumps are Python dict literals ("loose JSON"): read those safely.
            try:
                obj = ast.literal_eval(line) if line.lstrip().startswith("{") else None
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = None
            if obj is None:
                raise _bad(name, lineno, f"not a JSON object ({exc.msg} at column {exc.colno})",
                           line) from None
        if not isinstance(obj, dict):
            raise _bad(name, lineno, "not a JSON object", line)
        missing = [k for k in AMAZON_JSON_KEYS if k not in obj]
        if missing:
            raise _bad(name, lineno, f"missing key(s) {', '.join(missing)}", line)
        yield (_token(obj["reviewerID"], "reviewerID", name, lineno, line),
               _token(obj["asin"], "asin", name, lineno, line),
               _number(obj["overall"], "overall", name, lineno, line),
               _number(obj["unixReviewTime"], "unixReviewTime", name, lineno, line))


def _read_amazon_csv(path: str, progress: bool, columns: tuple) -> Iterator[Record]:
    first = True
    for name, lineno, line in _iter_lines(path, progress=progress):
        if not line.strip():
            continue
        # csv only when quoting is present: plain split is several times faster
        parts = next(csv.reader([line])) if '"' in line else line.split(",")
        if len(parts) != 4:
            raise _bad(name, lineno, f"expected 4 comma-separated fields ({','.join(columns)}), "
                                     f"found {len(parts)}", line)
        if first:
            first = False
            header = tuple(p.strip().lower() for p in parts)
            if sorted(header) == sorted(CSV_COLUMNS):
                columns = header
                continue
        row = dict(zip(columns, parts))
        yield (_token(row["user"], "user id", name, lineno, line),
               _token(row["item"], "item id", name, lineno, line),
               _number(row["rating"], "rating", name, lineno, line),
               _number(row["timestamp"], "timestamp", name, lineno, line))


def read_seq_text(path, progress: bool = False) -> Iterator[Record]:
    """One line per user, ``user item_1 item_2 ...``; timestamp = position (0, 1, 2, ...)."""
    path = _check_input(path)
    seen: dict[str, int] = {}
    for name, lineno, line in _iter_lines(path, progress=progress):
        parts = line.split()
        if not parts:
            continue
        user = parts[0]
        if user in seen:
            raise _bad(name, lineno, f"user {user!r} already had a line (line {seen[user]}); the "
                                     f"format is one line per user")
        seen[user] = lineno
        if len(parts) == 1:
            raise _bad(name, lineno, f"user {user!r} has no items", line)
        for position, item in enumerate(parts[1:]):
            yield (user, item, None, float(position))


READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "movielens": read_movielens,
    "amazon": read_amazon,
    "seq-text": read_seq_text,
}


def read_records(fmt: str, path, progress: bool = False, **options) -> Iterator[Record]:
    """The reader for ``fmt`` (one of :data:`FORMATS`) applied to ``path``."""
    if fmt not in READERS:
        raise PrepareError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return READERS[fmt](path, progress=progress, **options)


# --------------------------------------------------------------------------- filtering


def kcore_pass(records: list, user_k: int = 0, item_k: int = 0) -> list:
    """One pass: drop interactions of users with < user_k and items with < item_k of them."""
    users = Counter(r[0] for r in records) if user_k > 1 else None
    items = Counter(r[1] for r in records) if item_k > 1 else None
    if users is not None and min(users.values(), default=user_k) >= user_k:
        users = None
    if items is not None and min(items.values(), default=item_k) >= item_k:
        items = None
    if users is None and items is None:
        return records
    return [r for r in records
            if (users is None or users[r[0]] >= user_k) and (items is None or items[r[1]] >= item_k)]


def _check_k(user_k, item_k) -> None:
    for what, k in (("user", user_k), ("item", item_k)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise PrepareError(f"--kcore-{what} must be an integer >= 0, got {k!r}")


def kcore_filter(records: list, user_k: int = 0, item_k: int = 0) -> tuple[list, int]:
    """k-core filtering repeated until nothing changes; returns ``(records, passes)``.

    Dropping an item can push a user under user_k and the reverse, so one pass is not enough.
    The fixed point is the largest sub-data set where every user has >= user_k and every item
    >= item_k interactions, whatever the order of removals. ``passes`` counts the passes that
    removed something. K <= 1 means no filtering on that side. Order is kept.
    """
    _check_k(user_k, item_k)
    passes = 0
    while True:
        kept = kcore_pass(records, user_k, item_k)
        if len(kept) == len(records):
            return kept, passes
        records, passes = kept, passes + 1


# --------------------------------------------------------------------------- statistics


def compute_stats(records: list) -> dict:
    """users, items, interactions, density and per-user sequence length min/median/mean/max."""
    lengths = Counter(r[0] for r in records)
    n_items = len({r[1] for r in records})
    n_users, n = len(lengths), len(records)
    seq = sorted(lengths.values())
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "density": n / (n_users * n_items) if n_users and n_items else 0.0,
        "seq_len": {
            "min": seq[0] if seq else 0,
            "median": statistics.median(seq) if seq else 0,
            "mean": n / n_users if n_users else 0.0,
            "max": seq[-1] if seq else 0,
        },
    }


def format_stats(stats: dict) -> str:
    s = stats["seq_len"]
    return (f"users {stats['users']:,}  items {stats['items']:,}  interactions "
            f"{stats['interactions']:,}  density {stats['density']:.4%}  sequence length "
            f"min {s['min']} / median {s['median']:g} / mean {s['mean']:.1f} / max {s['max']}")


# --------------------------------------------------------------------------- writing


def _fmt(x: float) -> str:
    # integral values written as integers ("5", "978300760"): exact and as RecBole's own files
    if x.is_integer() and abs(x) < 2 ** 53:
        return str(int(x))
    return repr(x)


def inter_header(with_rating: bool) -> str:
    cols = ["user_id:token", "item_id:token"]
    if with_rating:
        cols.append("rating:float")
    cols.append("timestamp:float")
    return "\t".join(cols)


def inter_lines(records: list, with_rating: bool) -> Iterator[str]:
    """Header, then each user's interactions in time order (users in order of first appearance;
    equal timestamps keep the input order, which RecBole's stable sort keeps too)."""
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r[0], []).append(r)
    yield inter_header(with_rating) + "\n"
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r[3])  # stable
        if with_rating:
            for _, item, rating, ts in rows:
                yield f"{user}\t{item}\t{_fmt(rating)}\t{_fmt(ts)}\n"
        else:
            for _, item, _, ts in rows:
                yield f"{user}\t{item}\t{_fmt(ts)}\n"


def _temp_file(path: str):
    directory, base = os.path.split(os.path.abspath(path))
    return tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="\n", dir=directory,
                                       prefix=f".{base}.", suffix=".tmp", delete=False)


def write_atomic(path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, then ``os.replace`` it: readers see
    the old file or the whole new one, and a failure leaves no partial file behind."""
    _commit_atomic([(os.fspath(path), chunks)])


def _commit_atomic(files: list) -> None:
    """Several files at once: every temporary is written before any is renamed into place."""
    temps = []
    try:
        for path, chunks in files:
            fh = _temp_file(path)
            temps.append((fh.name, path))
            with fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def _make_dirs(path: str) -> list:
    """os.makedirs that returns the folders it created, outermost first."""
    created, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    created.reverse()
    for d in created:
        os.mkdir(d)
    return created


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise PrepareError(f"--dataset must be a plain folder name such as ml-1m, got {name!r}")
    return name


# --------------------------------------------------------------------------- the whole job


def prepare(fmt: str, input_path, dataset: str, output_dir, user_k: int = 0, item_k: int = 0,
            progress: bool = False, **reader_options) -> dict:
    """Read, k-core filter, and write ``output_dir/dataset/dataset.inter`` plus
    ``dataset.stats.json``; returns the statistics written. Nothing is written (no folder is
    created) unless the whole input was read and the result is not empty."""
    _check_name(dataset)
    _check_k(user_k, item_k)  # before reading: a typo should not cost a full read
    if fmt not in READERS:
        raise PrepareError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    input_path = _check_input(input_path)
    records = list(read_records(fmt, input_path, progress=progress, **reader_options))
    if not records:
        raise PrepareError(f"{input_path}: no interactions found")
    before = compute_stats(records)
    records, passes = kcore_filter(records, user_k, item_k)
    if not records:
        raise PrepareError(
            f"nothing left after k-core filtering (users >= {user_k}, items >= {item_k} "
            f"interactions) of {before['interactions']:,} interactions from {input_path}")
    with_rating = records[0][2] is not None
    stats = {
        "dataset": dataset,
        "format": fmt,
        "input": os.path.abspath(input_path),
        "kcore": {"user": user_k, "item": item_k, "passes": passes},
        "before_filter": {k: before[k] for k in ("users", "items", "interactions")},
        **compute_stats(records),
        "columns": inter_header(with_rating).split("\t"),
    }
    folder = os.path.join(os.fspath(output_dir), dataset)
    created = _make_dirs(folder)
    try:
        _commit_atomic([
            (os.path.join(folder, f"{dataset}.inter"), inter_lines(records, with_rating)),
            (os.path.join(folder, f"{dataset}.stats.json"),
             [json.dumps(stats, indent=2) + "\n"]),
        ])
    except BaseException:
        for d in reversed(created):  # only folders this call made, and only if still empty
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return stats
