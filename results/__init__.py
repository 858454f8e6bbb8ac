"""The results store, paper tables and figures, committed reference numbers.

``privseg.results.load(path_or_"wandb:entity/project")`` returns one tidy DataFrame, one row
per run; :func:`render` makes the paper tables, :func:`make_figures` the figures.
"""

from privseg.results.store import load
from privseg.results.tables import aggregate, render, summary_table


def make_figures(*args, **kwargs):
    """See :func:`privseg.results.figures.make_figures` (imports matplotlib lazily)."""
    from privseg.results.figures import make_figures as _make

    return _make(*args, **kwargs)


__all__ = ["aggregate", "load", "make_figures", "render", "summary_table"]
