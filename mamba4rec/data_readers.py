"""Readers of raw public interaction data, for mamba4rec.data_prep (which filters and writes).

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

This module imports nothing from RecBole or torch. Every problem with the input is a
:class:`PrepareError` whose message is one line naming the file, the line and the reason.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import os
import zipfile
import zlib
from typing import Callable, Iterator, Optional

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
