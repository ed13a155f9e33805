"""The executors: what runs a :class:`devicemem.Predictive` call once it is checked.

- :mod:`devicemem.execute.request`: the call as the executors receive it, and the sites it
  returns (shared by both);
- :mod:`devicemem.execute.local`: batches on this process's devices, out-of-memory retries
  and the fall-back to the host;
- :mod:`devicemem.execute.ray`: shards on Ray, each run by the local executor in its worker.
"""
