"""What an install meets: another project's top-level ``kernels`` package beside mamba4rec, and
RecBole missing, of another version, or missing one of its requirements. Each case runs in a
fresh interpreter (an import is once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mamba4rec

REPO = Path(__file__).resolve().parents[1]


def _python(code, tmp_path, check=True, flags=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", MAMBA4REC_FAST_DROPOUT="0")
    proc = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _package(root: Path, name: str, init: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(init))
    return root


HUB_KERNELS = '''
    """A stand-in for Hugging Face's `kernels` (PyPI), a top-level package of that name."""
    def get_kernel(repo_id):
        return f"hub:{repo_id}"
'''


@pytest.mark.parametrize("first", ["kernels", "mamba4rec"])
def test_another_top_level_kernels_package_imports_beside_mamba4rec(tmp_path, first):
    standin = _package(tmp_path / "site", "kernels", HUB_KERNELS)
    proc = _python(f"""
        import sys
        sys.path.insert(0, {str(standin)!r})
        import importlib
        importlib.import_module({first!r})
        import kernels
        import mamba4rec, torch
        from kernels import get_kernel
        from mamba4rec.kernels import scan
        assert get_kernel("x") == "hub:x" and kernels.__file__.startswith({str(standin)!r}), kernels.__file__
        assert sys.modules["mamba4rec.kernels"].__file__.startswith({str(REPO / "mamba4rec")!r})
        torch.manual_seed(0)
        b, d, n, l = 2, 4, 3, 5
        u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
        A, B, C = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l)
        out = scan(u, delta, A, B, C, impl="torch")
        ref = scan(u, delta, A, B, C, impl="ref")
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        print("both")
    """, tmp_path)
    assert proc.stdout.strip().endswith("both")


def test_import_without_recbole_says_how_to_install_it(tmp_path):
    proc = _python("""
        import importlib.abc, sys
        class NoRecBole(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "recbole" or name.startswith("recbole."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoRecBole())
        import mamba4rec
    """, tmp_path, check=False)
    assert proc.returncode != 0
    assert "ImportError: mamba4rec needs RecBole 1.2.1, which is not installed" in proc.stderr
    assert mamba4rec.RECBOLE_INSTALL in proc.stderr
    assert mamba4rec.RECBOLE_INSTALL == 'pip install --no-deps "recbole==1.2.1"'
    assert "ModuleNotFoundError" not in proc.stderr  # one error, not a chained traceback


def test_import_with_another_recbole_version_says_which_and_how_to_fix_it(tmp_path):
    fake = _package(tmp_path / "site", "recbole", '__version__ = "1.1.1"\n')
    proc = _python(f"""
        import sys
        sys.path.insert(0, {str(fake)!r})
        import mamba4rec
    """, tmp_path, check=False)
    assert proc.returncode != 0
    assert "but the recbole found at" in proc.stderr and "is version 1.1.1" in proc.stderr
    assert mamba4rec.RECBOLE_INSTALL in proc.stderr
    # nothing of RecBole ran: the failure is raised before the shims touch it
    assert "recbole/config" not in proc.stderr and "compat.py" not in proc.stderr


def test_import_with_a_requirement_of_recbole_missing_names_it(tmp_path):
    proc = _python("""
        import importlib.abc, sys
        class NoColorlog(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "colorlog":
                    raise ModuleNotFoundError("No module named 'colorlog'", name=name)
        sys.meta_path.insert(0, NoColorlog())
        import mamba4rec
    """, tmp_path, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()
    message = proc.stderr[proc.stderr.rindex("ImportError: RecBole 1.2.1 is installed but does not import"):]
    assert "No module named 'colorlog'" in message and "The module 'colorlog' is missing: RecBole needs it" in message
    assert "pip install colorlog" in message and "reinstall mamba4rec-recbole" in message, last[-6:]
    assert mamba4rec.RECBOLE_INSTALL in message
    assert "Traceback" not in proc.stderr.split("ImportError: RecBole 1.2.1")[0].split("mamba4rec/__init__.py")[-1]


def test_import_with_a_recbole_folder_that_is_not_recbole_says_so(tmp_path):
    """A folder named recbole with no __init__.py (what an uninstall can leave behind) imports as
    a namespace package where no real RecBole is installed: -S keeps site-packages out."""
    fake = tmp_path / "site"
    (fake / "recbole").mkdir(parents=True)
    proc = _python(f"""
        import sys
        sys.path.insert(0, {str(fake)!r})
        import mamba4rec
    """, tmp_path, check=False, flags=("-S",))
    assert proc.returncode != 0
    assert f"the recbole found at {fake / 'recbole'} has no __version__" in proc.stderr
    assert mamba4rec.RECBOLE_INSTALL in proc.stderr


def test_setup_cfg_lists_every_subpackage_and_no_module_passes_450_lines():
    """A package folder missing from setup.cfg's explicit list would be left out of the wheel
    (``python -m mamba4rec.selfcheck`` would not exist in an install)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mamba4rec").rglob("__init__.py")}
    assert folders <= listed, f"not in setup.cfg's packages: {sorted(folders - listed)}"
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines())
             for p in (REPO / "mamba4rec").rglob("*.py") if "__pycache__" not in p.parts}
    assert len(sizes) > 30 and not {k: v for k, v in sizes.items() if v > 450}, sizes
