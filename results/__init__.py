"""The results store, paper tables and figures, committed reference numbers.

``privseg.results.load(path_or_"wandb:entity/project")`` returns one tidy DataFrame, one row
per run; :func:`render` makes the paper tables, :func:`make_figures` the figures.
"""

import importlib

#: public names and the module each lives in; imported on first use (pandas, ~0.8 s, is not
#: imported by ``privseg --help`` or the commands that need no run store)
_LAZY = {"load": "privseg.results.store", "aggregate": "privseg.results.tables",
         "render": "privseg.results.tables", "summary_table": "privseg.results.tables"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_figures(*args, **kwargs):
    """See :func:`privseg.results.figures.make_figures` (imports matplotlib lazily)."""
    from privseg.results.figures import make_figures as _make

    return _make(*args, **kwargs)


__all__ = ["aggregate", "load", "make_figures", "render", "summary_table"]
