"""Optional libraries: which extra of pyproject.toml brings each, and the one error that says
how to install a missing one.

numpy, torch and pyro are all a dense fit needs. Files, sparse input and metadata tables need
the ``io`` extra (scipy, pandas, anndata, h5py), summaries and reports the ``report`` extra
(pandas, matplotlib). ``make setup`` installs them all (the ``dev`` extra), so in a clone of
the repository that is the command to run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"scipy": "io", "pandas": "io", "anndata": "io", "h5py": "io", "matplotlib": "report"}


class MissingDependencyError(ImportError):
    """An optional library is not installed; the message names it and how to install it."""


def install_hint(module: str) -> str:
    """The commands that install ``module``'s extra: in a clone, and from a package index."""
    extra = EXTRAS.get(module.split(".")[0], "io")
    return (f'in the repository run `make setup` (or `pip install -e ".[{extra}]"`); '
            f'installed from an index: pip install "devicemem[{extra}]"')


def require(module: str, what: str) -> ModuleType:
    """``import module``, or MissingDependencyError saying that ``what`` needs it and how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs {module.split('.')[0]}, which is not installed: {install_hint(module)}") from exc
