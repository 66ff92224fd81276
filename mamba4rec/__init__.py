"""mamba4rec: Mamba4Rec for RecBole, with compiled CPU scans and a Triton GPU scan.

``from mamba4rec import Mamba4Rec`` gives a RecBole SequentialRecommender. Importing the
package checks that RecBole 1.2.1 is installed and importable (else an ImportError that prints
the command that installs it: :data:`RECBOLE_INSTALL`), then applies the RecBole compatibility
shims (mamba4rec/compat.py). ``config_files(model, dataset)`` and ``config_dict(model,
dataset)`` give the paper's settings as shipped (mamba4rec/defaults.py);
``Config(model=Mamba4Rec, dataset=...)`` reads them by itself.
"""

from ._version import __version__

#: the distribution that installs this package (``pip install mamba4rec-recbole``)
DISTRIBUTION = "mamba4rec-recbole"
#: the RecBole release the shims are written for and tested against
RECBOLE_VERSION = "1.2.1"
#: RecBole without its requirement of ray (which has no wheel past Python 3.11 and which only
#: recbole.quick_start imports); mamba4rec's own install brings RecBole's other requirements
RECBOLE_INSTALL = f'pip install --no-deps "recbole=={RECBOLE_VERSION}"'


def _check_recbole():
    """Fail here, with the fix, rather than deep inside RecBole or the shims."""
    import importlib

    why = ("(--no-deps: RecBole's metadata requires ray<=2.6.3, which has no wheel past Python 3.11 "
           f"and which mamba4rec never imports; {DISTRIBUTION} brings RecBole's other requirements.)")
    try:
        recbole = importlib.import_module("recbole")
    except ModuleNotFoundError as exc:
        if exc.name != "recbole":
            raise
        raise ImportError(
            f"mamba4rec needs RecBole {RECBOLE_VERSION}, which is not installed. Install it with:\n\n"
            f"    {RECBOLE_INSTALL}\n\n{why}") from None
    version = getattr(recbole, "__version__", None)
    if version != RECBOLE_VERSION:
        where = getattr(recbole, "__file__", None) or ", ".join(getattr(recbole, "__path__", []))
        found = (f"is version {version}" if version is not None else
                 "has no __version__ (not RecBole, or a folder named recbole without __init__.py)")
        raise ImportError(
            f"mamba4rec needs RecBole {RECBOLE_VERSION}, but the recbole found at {where} {found}: the "
            f"shims in mamba4rec.compat change RecBole {RECBOLE_VERSION}'s internals and are tested on "
            f"that release only. Install it with:\n\n    {RECBOLE_INSTALL}\n\n{why}")
    try:
        for name in ("recbole.config", "recbole.data", "recbole.trainer", "recbole.utils"):
            importlib.import_module(name)
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        reinstall = (f"reinstall {DISTRIBUTION}, which installs all of RecBole's requirements but ray "
                     f"(in a checkout: pip install -e .; from a wheel: pip install --force-reinstall WHEEL)")
        if missing and missing.split(".")[0] != "recbole":
            fix = f"The module {missing!r} is missing: RecBole needs it. pip install {missing.split('.')[0]}, or {reinstall}"
        elif missing:
            fix = "The install of RecBole is incomplete: reinstall it, adding --force-reinstall to the command below"
        else:  # a module that is there but too old or too new, or broken (traceback above)
            fix = (f"A package it imports is there but does not load (another version than RecBole "
                   f"{RECBOLE_VERSION} was written for, or a broken install; the traceback above says "
                   f"which): pip check lists unmet requirements; or {reinstall}")
        raise ImportError(
            f"RecBole {RECBOLE_VERSION} is installed but does not import ({type(exc).__name__}: {exc}). "
            f"{fix}. RecBole itself is installed with:\n\n    {RECBOLE_INSTALL}\n") from (None if missing else exc)


_check_recbole()

from . import compat  # noqa: E402

compat.install()  # every change to RecBole (mamba4rec.compat.PATCHES), once

from .defaults import config_dict, config_files  # noqa: E402
from .model import MODEL_DEFAULTS, Mamba4Rec, resolve_model_config  # noqa: E402

#: submodules reachable as attributes after a bare ``import mamba4rec`` (imported on first use:
#: ``mamba4rec.pipeline.run(...)``), without making every import pay for them
_LAZY_SUBMODULES = ("pipeline", "compare", "serving", "streaming", "significance", "hyper", "quick_start")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Mamba4Rec", "DISTRIBUTION", "RECBOLE_VERSION", "RECBOLE_INSTALL", "MODEL_DEFAULTS", "resolve_model_config", "config_files", "config_dict", "__version__"]
