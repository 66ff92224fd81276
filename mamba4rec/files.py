"""Writing files so that a reader, or a kill mid-write, never meets half of one; and the
checkpoints this process trusts to unpickle (mamba4rec.compat, note 4), keyed on their sha256.

Every file the package writes for later use (checkpoints, serving exports, comparison rows,
prepared data sets, a distributed run's result) goes through :func:`atomic_paths`: the bytes go
to a temporary file beside the target, and only a complete write is renamed onto it
(``os.replace``: atomic on one file system). A failure leaves the old file, or none, and no
temporary behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading


def _temporary(path: str) -> str:
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_paths(*paths, fsync=False):
    """Yield one temporary path per target (str); when the block ends without an error, rename
    each onto its target (all temporaries are complete before the first rename). ``fsync``:
    flush each temporary to disk first (for data that must survive a power cut)."""
    targets = [os.path.abspath(os.fspath(p)) for p in paths]
    temps = [_temporary(p) for p in targets]
    for target in targets:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        yield temps
        if fsync:
            for tmp in temps:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path, fsync=False):
    """:func:`atomic_paths` for one target: yields its temporary path."""
    with atomic_paths(path, fsync=fsync) as (tmp,):
        yield tmp


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def file_sha256(path) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints, data files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_TRUST_LOCK = threading.Lock()
#: realpath -> sha256 of checkpoints written by a RecBole trainer in this process (or trusted).
_TRUSTED: dict[str, str] = {}


def trust_checkpoint(path) -> None:
    """Allow RecBole's trainer to unpickle ``path`` (its current bytes) in this process.

    For a RecBole checkpoint you wrote yourself in an earlier run, before
    ``trainer.resume_checkpoint(path)`` or ``trainer.evaluate(..., model_file=path)``.
    If the file changes afterwards it is refused again.
    """
    real = os.path.realpath(os.fspath(path))
    if not os.path.isfile(real):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with _TRUST_LOCK:
        _TRUSTED[real] = file_sha256(real)


def is_trusted_checkpoint(path) -> bool:
    try:
        real = os.path.realpath(os.fspath(path))
    except TypeError:  # a file object, a buffer: never trusted implicitly
        return False
    with _TRUST_LOCK:
        digest = _TRUSTED.get(real)
    return digest is not None and os.path.isfile(real) and file_sha256(real) == digest
