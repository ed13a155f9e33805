"""``out=DIR/manifest.json``: what a run draws and how far it got, so that an interrupted run
says it is incomplete and ``Predictive(..., out=DIR, resume=True)`` continues it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from devicemem.sampling import Site

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "devicemem.out/1"


def describe_sites(sites: Mapping[str, Site], reduce: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """The stored sites as a manifest lists them: name -> shape per sample and dtype."""
    return {name: {"shape": list(site.shape), "dtype": str(site.dtype)} for name, site in sites.items() if name not in reduce}


class Manifest:
    """``out=DIR/manifest.json``: what a run draws (samples, seed, plan, sites) and how far it
    got (``complete_samples``, the batch that comes next), rewritten atomically after every
    batch; ``complete`` turns true only when the last batch is on disk. An interrupted run
    therefore says it is incomplete, and ``Predictive(..., out=DIR, resume=True)`` continues it.
    """

    def __init__(self, out: Path, fields: dict[str, Any]) -> None:
        self.path = out / MANIFEST
        self.fields = fields

    @classmethod
    def begin(cls, out: Path, num_samples: int, seed: int | None, plan: dict[str, Any], sites: dict[str, Any]) -> Manifest:
        fields = {
            "format": MANIFEST_FORMAT, "num_samples": num_samples, "seed": seed, "plan": plan, "sites": sites,
            "complete_samples": 0, "complete": False,
            "next_batch": {"device": plan["device"], "batch_size": plan["batch_size"], "vectorized": plan["vectorized"]},
        }
        manifest = cls(out, fields)
        manifest._write()
        return manifest

    @classmethod
    def load(cls, out: Path) -> Manifest:
        """The manifest in ``out``; ValueError naming the file when it is missing or not one."""
        path = out / MANIFEST
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"resume: cannot read {path} ({type(exc).__name__}: {exc}); nothing to resume") from exc
        if not isinstance(fields, dict) or fields.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"resume: {path} is not a devicemem manifest")
        return cls(out, fields)

    def record(self, complete_samples: int, device: str, batch_size: int, vectorized: bool) -> None:
        """After a batch: samples ``0 .. complete_samples - 1`` are on disk; the next batch."""
        self.fields["complete_samples"] = complete_samples
        self.fields["next_batch"] = {"device": device, "batch_size": batch_size, "vectorized": vectorized}
        self.fields["complete"] = complete_samples == self.fields["num_samples"]
        self._write()

    def _write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.fields, indent=1))
        os.replace(partial, self.path)
