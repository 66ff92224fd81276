"""mamba4rec: Mamba4Rec for RecBole, with a pure-torch CPU scan and a Triton GPU scan.

``from mamba4rec import Mamba4Rec`` gives a RecBole SequentialRecommender. Importing the
package applies the RecBole compatibility shims (mamba4rec/compat.py) and checks that the
``kernels`` package found is this project's.
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

from .model import MODEL_DEFAULTS, Mamba4Rec, resolve_model_config  # noqa: E402

__all__ = ["Mamba4Rec", "MODEL_DEFAULTS", "resolve_model_config", "__version__"]
