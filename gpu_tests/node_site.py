"""``python gpu_tests/node_site.py DEST``: the GPU node's package set, as a directory of links.

``gpu_tests/run.sh --dry-run`` rehearses the GPU run on a machine without CUDA, whose Python
may have far more installed than the GPU node (pyro-ppl, pytest, scipy...). This links into
``DEST`` only what the node has (torch, numpy, psutil, tqdm and
nvidia-ml-py, plus whatever those need, found through their ``Requires-Dist`` without extras),
taken from the running interpreter's installed distributions: each one's top-level packages,
modules and ``.dist-info``. ``python -S`` with ``PYTHONPATH=DEST`` then sees the standard
library and these only. Standard library only (``packaging`` evaluates markers when present).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

NODE_PACKAGES = ("torch", "numpy", "psutil", "tqdm", "nvidia-ml-py")


def _requirements(dist: metadata.Distribution) -> list[str]:
    """Names of what ``dist`` needs on this platform, extras left out."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    names = []
    for text in dist.requires or []:
        if Requirement is not None:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                names.append(requirement.name)
        elif ";" not in text:  # without packaging, markered requirements are left out
            names.append(re.match(r"[A-Za-z0-9._-]+", text).group(0))
    return names


def node_distributions(roots: tuple[str, ...] = NODE_PACKAGES) -> tuple[list[metadata.Distribution], list[str]]:
    """(installed distributions of ``roots`` and their requirements, names not installed here)."""
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    pending = list(roots)
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found or key in missing:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(key)
            continue
        found[key] = dist
        pending.extend(_requirements(dist))
    return list(found.values()), missing


def link_site(dest: Path, roots: tuple[str, ...] = NODE_PACKAGES) -> tuple[list[str], list[str]]:
    """Link every top-level entry of the node's distributions into ``dest``; returns (the
    distributions linked, the names not installed here)."""
    dists, missing = node_distributions(roots)
    dest.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        tops = {Path(str(file)).parts[0] for file in dist.files or []}
        for top in sorted(tops - {"..", "__pycache__"}):
            source = Path(dist.locate_file(top))
            link = dest / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return sorted(f"{d.metadata['Name']}=={d.version}" for d in dists), missing


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    linked, missing = link_site(Path(argv[0]))
    print(" ".join(linked))
    if missing:
        print(f"not installed here (the GPU node has them or does not need them): {' '.join(missing)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
