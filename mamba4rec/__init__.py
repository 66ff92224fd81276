"""mamba4rec: Mamba4Rec for RecBole, with a pure-torch CPU scan and a Triton GPU scan.

``from mamba4rec import Mamba4Rec`` gives a RecBole SequentialRecommender. Importing the
package applies the RecBole compatibility shims (mamba4rec/compat.py) and checks that the
``kernels`` package found is this project's. ``config_files(model, dataset)`` and
``config_dict(model, dataset)`` give the paper's settings as shipped (mamba4rec/defaults.py);
``Config(model=Mamba4Rec, dataset=...)`` reads them by itself.
"""

from ._version import __version__


def _check_kernels_package():
    import importlib

    kernels = importlib.import_module("kernels")
    if getattr(kernels, "__kernels_project__", None) != "mamba4rec":
        where = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        raise ImportError(
            f"the 'kernels' package found at {where} is not mamba4rec's (PyPI has an unrelated "
            f"package of that name). Uninstall it (pip uninstall kernels) or put mamba4rec's "
            f"checkout first on sys.path, then reinstall mamba4rec (pip install -e .)."
        )


_check_kernels_package()

from . import compat  # noqa: E402

compat.install()

from . import defaults  # noqa: E402

defaults.install()  # RecBole's Config reads Mamba4Rec's packaged configs as its defaults

from .defaults import config_dict, config_files  # noqa: E402
from .model import MODEL_DEFAULTS, Mamba4Rec, resolve_model_config  # noqa: E402

#: submodules reachable as attributes after a bare ``import mamba4rec`` (imported on first use:
#: ``mamba4rec.pipeline.run(...)``), without making every import pay for them
_LAZY_SUBMODULES = ("pipeline", "compare", "serving", "streaming", "significance", "hyper")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Mamba4Rec", "MODEL_DEFAULTS", "resolve_model_config", "config_files", "config_dict", "__version__"]
