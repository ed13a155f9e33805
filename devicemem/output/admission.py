"""Whether a run's results fit in host memory, asked before anything is drawn: the results
(stored sites, reducers) and, for batches on the host, their working memory, against the
call's reading of the host; and what a user can do when they do not."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from devicemem.backends import DeviceMemory
from devicemem.output.moments import REDUCER_BYTES
from devicemem.sampling import Site
from devicemem.units import format_bytes


def host_result_bytes(
    sites: Mapping[str, Site], reduce: Mapping[str, tuple[str, ...]], num_samples: int, out: Path | None
) -> int:
    """Host RAM the results take: reducers, plus the stored sites unless they go to ``out``."""
    need = sum(s.numel * REDUCER_BYTES for n, s in sites.items() if n in reduce)
    if out is None:
        need += sum(s.nbytes * num_samples for n, s in sites.items() if n not in reduce)
    return need


def remedies(out: Path | None, reduce: Mapping[str, tuple[str, ...]], more: tuple[str, ...] = ()) -> str:
    """What a user can do about results that do not fit, leaving out what is already in use:
    ``out=DIR`` unless given, ``reduce=`` unless some site is reduced already, then ``more``."""
    options = [] if out is not None else ["pass out=DIR to write the results to numpy memmaps"]
    options += [] if reduce else ["reduce={site: ('mean', 'var')}"]
    return ", ".join(options + ["fewer return_sites or fewer samples", *more])


def check_host(
    sites: Mapping[str, Site], reduce: Mapping[str, tuple[str, ...]], num_samples: int, out: Path | None,
    host: DeviceMemory, working: int = 0,
) -> None:
    """Fail before sampling when the results (and ``working`` bytes of batches on the host)
    cannot fit in the ``host``'s usable memory (the call's reading)."""
    stored = {n: s.nbytes * num_samples for n, s in sites.items() if n not in reduce}
    need = host_result_bytes(sites, reduce, num_samples, out)
    usable = host.usable_bytes
    if usable is None or need + working <= usable:
        return
    parts = [f"{n} {format_bytes(b)}" for n, b in stored.items()] if out is None else []
    parts += [f"{n} reducer {format_bytes(sites[n].numel * REDUCER_BYTES)}" for n in reduce]
    batches = f" plus {format_bytes(working)} for the batches" if working else ""
    raise ValueError(
        f"[MEMORY] the results need {format_bytes(need)} of host memory ({', '.join(parts)}){batches}, "
        f"but only {format_bytes(usable)} is usable; {remedies(out, reduce, ('fewer reduced sites',) if reduce else ())}"
    )
