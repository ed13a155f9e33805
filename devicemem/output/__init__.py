"""Where drawn samples go, shared by the local and the Ray executors.

- :mod:`devicemem.output.sink`: the preallocated host tensors (or ``out=`` memmaps) a run
  fills, batch by batch or shard by shard, and the pinned staging buffer GPU batches pass
  through;
- :mod:`devicemem.output.moments`: streamed mean and variance of reduced sites;
- :mod:`devicemem.output.manifest`: ``out=DIR/manifest.json``, how far a run got (resume);
- :mod:`devicemem.output.admission`: whether the results fit in host memory, before sampling.
"""
