"""The search space of a hyper-parameter search (mamba4rec.hyper): RecBole's params file read
and checked, and the plan of the search (which search, how many trials).

The params file is RecBole's: one ``name type range`` line per parameter, where type is
``choice`` (a Python list: ``dropout_prob choice [0.2,0.4]``), ``uniform`` (``low,high``),
``quniform`` (``low,high,q``: uniform rounded to a multiple of q; integers when all three are)
or ``loguniform`` (``low,high``: exp of a uniform draw, so ``learning_rate loguniform -8,0`` is
e^-8 .. 1). Blank lines and lines starting with ``#`` are skipped. Searches: ``exhaustive``
(every combination of an all-``choice`` space, in order; no hyperopt needed), ``random`` and
``bayes`` (hyperopt's TPE), which need ``--max_evals``; ``auto`` picks exhaustive for an
all-choice space and bayes otherwise. Every problem is a :class:`SpaceError` naming the line,
raised before any trial.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .checks import int_in

TYPES = {"choice": "a Python list of values, e.g. [0.2,0.4]", "uniform": "low,high, e.g. 0.1,0.5",
         "quniform": "low,high,q, e.g. 32,128,32", "loguniform": "low,high as natural logs, e.g. -8,0"}
ALGOS = ("auto", "exhaustive", "random", "bayes")
_NAME = re.compile(r"^[A-Za-z_][\w]*$")


class SpaceError(ValueError):
    """A params file (or search setting) that cannot be searched; the message names the line."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of TYPES
    args: tuple  # choice: the values; uniform/loguniform: (low, high); quniform: (low, high, q)
    line: int = 0
    text: str = ""
    source: str = "params file"

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line} ({self.text!r})" if self.line else f"parameter {self.name!r}"

    @property
    def integral(self) -> bool:
        """quniform over integers gives ints (a float 64.0 is not a size)."""
        return self.kind == "quniform" and all(float(a).is_integer() for a in self.args)

    def value(self, drawn):
        """A drawn value as the config gets it: plain Python, rounded for quniform."""
        if hasattr(drawn, "item"):  # numpy scalar
            drawn = drawn.item()
        if self.kind == "quniform":
            low, high, q = self.args
            drawn = min(max(round(drawn / q) * q, low), high)
            return int(round(drawn)) if self.integral else float(drawn)
        return drawn

    def probes(self) -> list:
        """Values to check before any trial: every choice, a range's two ends."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args[:2]
        if self.kind == "loguniform":
            return [math.exp(low), math.exp(high)]
        if self.kind == "quniform":
            q = self.args[2]
            return [self.value(math.ceil(low / q) * q), self.value(math.floor(high / q) * q)]
        return [float(low), float(high)]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name}: {len(self.args)} choices {list(self.args)!r}"
        if self.kind == "loguniform":
            return f"{self.name}: loguniform e^{self.args[0]:g} .. e^{self.args[1]:g} = {math.exp(self.args[0]):.4g} .. " \
                   f"{math.exp(self.args[1]):.4g}"
        return f"{self.name}: {self.kind} {', '.join(f'{a:g}' for a in self.args)}"


def _numbers(param_name, kind, text, where, count):
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) != count or not all(math.isfinite(v) for v in values):
        raise SpaceError(f"{where}: {param_name} {kind} needs {count} finite numbers separated by commas "
                         f"({TYPES[kind]}), got {text!r}")
    if values[0] >= values[1]:
        raise SpaceError(f"{where}: {param_name} {kind} needs low < high, got {values[0]:g},{values[1]:g}")
    if kind == "quniform" and values[2] <= 0:
        raise SpaceError(f"{where}: {param_name} quniform needs a step q > 0, got {values[2]:g}")
    if kind == "quniform" and math.floor(values[1] / values[2]) < math.ceil(values[0] / values[2]):
        raise SpaceError(f"{where}: {param_name} quniform {text}: no multiple of {values[2]:g} lies in "
                         f"[{values[0]:g}, {values[1]:g}]")
    return tuple(values)


def parse_space(text: str, source: str = "params file") -> list[Param]:
    """RecBole's params format (module docstring) -> parameters; SpaceError naming the line."""
    params, seen = [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {n}"
        tokens = line.split()
        if len(tokens) < 3:
            raise SpaceError(f"{where}: {line!r} is not 'name type range' "
                             f"(e.g. learning_rate loguniform -8,0 or dropout_prob choice [0.2,0.4])")
        name, kind, rest = tokens[0], tokens[1], "".join(tokens[2:])  # RecBole joins the rest: [0.2, 0.4]
        if not _NAME.match(name):
            raise SpaceError(f"{where}: {name!r} is not a config key name (letters, digits, _)")
        if kind not in TYPES:
            close = difflib.get_close_matches(kind, TYPES, n=1)
            raise SpaceError(f"{where}: unknown type {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; the types are {', '.join(TYPES)}")
        if name in seen:
            raise SpaceError(f"{where}: {name} is already searched on line {seen[name]}; give each key one line")
        if kind == "choice":
            try:
                values = ast.literal_eval(rest)
            except (ValueError, SyntaxError):
                raise SpaceError(f"{where}: {name} choice needs {TYPES['choice']} (numbers, strings, "
                                 f"True/False/None or lists of them), got {rest!r}") from None
            if not isinstance(values, (list, tuple)) or not values:
                raise SpaceError(f"{where}: {name} choice needs a non-empty list, e.g. [0.2,0.4]; got {rest!r}")
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise SpaceError(f"{where}: {name} choice lists {repeated[0]!r} twice")
            args = tuple(values)
        else:
            args = _numbers(name, kind, rest, where, 3 if kind == "quniform" else 2)
        seen[name] = n
        params.append(Param(name, kind, args, n, line, source))
    if not params:
        raise SpaceError(f"{source} has no parameters (only blank or # lines): write one 'name type range' line "
                         f"per parameter, e.g. learning_rate loguniform -8,0")
    return params


def read_space(path) -> list[Param]:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"params file {str(path)!r} does not exist")
    return parse_space(path.read_text(encoding="utf-8"), source=f"params file {path}")


def _overridden_keys(cmd_args) -> dict:
    return {a[2:].split("=", 1)[0]: a for a in cmd_args or []}


def check_space(space, model, dataset, config_files=None, cmd_args=None):
    """Before any trial: every key must be one the model's config has, none may also be fixed on
    the command line (it would win over every trial's value), and every choice and range end must
    pass the config's own checks. Returns the config of the fixed settings (no searched values)."""
    from .model import MODEL_DEFAULTS, Mamba4Rec
    from .pipeline import check_dataset_files
    from .registry import build_config, resolve_model

    base = build_config(model, dataset, config_files, None, cmd_args)
    model_class = resolve_model(model)[0]
    known = set(base.final_config_dict) | (set(MODEL_DEFAULTS) if issubclass(model_class, Mamba4Rec) else set())
    fixed = _overridden_keys(cmd_args)
    for p in space:
        if p.name not in known:
            close = difflib.get_close_matches(p.name, sorted(known), n=3)
            raise SpaceError(f"{p.where}: unknown key {p.name!r}: {base['model']} on {dataset} has no such config key"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        if p.name in fixed:
            raise SpaceError(f"{p.where}: {p.name} is searched but also fixed on the command line ({fixed[p.name]}), "
                             f"which would win over every trial's value: drop one of them")
        for value in p.probes():
            try:
                build_config(model, dataset, config_files, {p.name: value}, cmd_args)
            except Exception as exc:  # noqa: BLE001 - any refusal of the value, reworded with the line
                raise SpaceError(f"{p.where}: {p.name}={value!r} is refused: {type(exc).__name__}: {exc}") from None
    check_dataset_files(base)
    return base


def plan(space, algo="auto", max_evals=None) -> tuple[str, int]:
    """(search, trials): exhaustive runs every combination (or max_evals of them, drawn at random
    but run in order); random and bayes need max_evals."""
    if algo not in ALGOS:
        raise SpaceError(f"unknown search {algo!r}; choose one of {', '.join(ALGOS)}")
    if max_evals is not None and not int_in(max_evals, 1):
        raise SpaceError(f"max_evals must be an integer >= 1, got {max_evals!r}")
    ranged = [p for p in space if p.kind != "choice"]
    if algo == "auto":
        algo = "bayes" if ranged else "exhaustive"
    if algo == "exhaustive":
        if ranged:
            raise SpaceError(f"{ranged[0].where}: an exhaustive search needs choice parameters only "
                             f"({ranged[0].name} is {ranged[0].kind}): use --algo=random or --algo=bayes with "
                             f"--max_evals, or list the values with choice")
        size = math.prod(len(p.args) for p in space)
        return algo, min(size, max_evals or size)
    if max_evals is None:
        what = f"{ranged[0].name} {ranged[0].kind}" if ranged else "this space"
        raise SpaceError(f"a {algo} search has no natural end ({what}): give the number of trials, e.g. --max_evals=20")
    return algo, max_evals
