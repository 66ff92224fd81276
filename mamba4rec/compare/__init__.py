"""Train Mamba4Rec and baselines under one protocol and write a table, a CSV and a chart.

Every model goes through :func:`mamba4rec.pipeline.run` with the same data set, split, seed,
evaluation and overrides; each model keeps its own RecBole defaults. Each model trains in a
fresh process of its own, so its peak memory is its own and not what the models before it left
behind in a shared process. A model that fails, even by taking its process down (killed for
memory, a crash in native code), is reported in the table and the others go on.

A comparison can take hours per model on a CPU, so it survives being stopped: each finished
model's row is kept in ``out_dir/rows/<model>.json`` and the table is rewritten after every
model (models not yet run show as "pending"); checkpoints go to ``out_dir/checkpoints`` unless
the caller sets ``checkpoint_dir``. ``compare(..., resume=True)`` (``run_recbole.py ...
--compare=... --resume``) keeps the finished rows, continues an interrupted model from its
``-last.pth`` exactly where it stopped, and runs the rest. The rows record the settings they were
made with and the checksums of the data files they were trained on; resuming under other
settings, or on a data set prepared again since, is refused.

``compare(..., only=[...])`` (``--compare_run=...``) runs only some of the models and shows the
others as their rows on disk say: several processes can then share one comparison (one model
each, one thread each on a small CPU: the project's converged comparison does this with
``--lanes 2``, a queue of (data set, train mode, model) jobs), and the table, rewritten by whichever finishes,
merges their rows. Each row records the CPU threads it trained with, since its seconds per epoch
depend on them.

The package, by responsibility: ``runner`` (``compare``, the loop over the models), ``isolation``
(one model's training, in a process of its own), ``rows`` (row storage, checksums, settings),
``report`` (the table, the charts and curves, ``progress_report``). The names other
code uses are here; patch a name where it is looked up (``isolation.run``, ``isolation._train``).
"""

from .isolation import ModelFailed, ModelProcessDied
from .report import convergence_lines, markdown_table, paired_lines, progress_report, write_outputs
from .rows import METRIC_KEYS, git_commit, load_curves, load_per_user, machine
from .runner import compare

__all__ = ["compare", "progress_report", "write_outputs", "markdown_table", "convergence_lines", "paired_lines",
           "load_per_user", "load_curves", "METRIC_KEYS", "machine", "git_commit", "ModelFailed",
           "ModelProcessDied"]
