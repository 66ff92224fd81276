"""mamba4rec: Mamba4Rec for RecBole (placeholder on the data branch; main's version replaces it).

Kept import-light on purpose: mamba4rec.data_prep must be importable without torch or RecBole.
"""

from ._version import __version__

__all__ = ["__version__"]
