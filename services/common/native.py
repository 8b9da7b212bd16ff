"""Native thread pools in a service process: numpy's BLAS runs on the calling thread only.

numpy's bundled OpenBLAS starts one helper thread per core and hands it every large
enough level-1 call (the float64 dot behind `np.linalg.norm` of a model vector, say);
after each such call the helper spins for a while before it sleeps. In a service those
calls are a few per window on vectors a single thread handles in microseconds, and the
helper's spinning takes CPU from the device workers that share the machine (about 0.05 s
of CPU per window in the coordinator and in each agent). `single_threaded_blas` limits
this process's OpenBLAS to one thread; the environment, and so the device workers an
agent spawns, is left as it is.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# The setter's name in numpy's scipy-openblas builds (64-bit ints, prefixed), then in
# plain OpenBLAS builds.
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def _loaded_openblas(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (none off Linux)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    # numpy's wheels bundle libscipy_openblas64_-*.so; Debian's numpy maps
    # .../openblas-pthread/libblas.so.3: "openblas" anywhere in the path.
    paths = {line.split()[-1] for line in lines if "/" in line}
    return sorted(p for p in paths if p.startswith("/") and "openblas" in p.lower())


def single_threaded_blas() -> int:
    """Limits every OpenBLAS loaded in this process (numpy's, imported here) to one
    thread; returns how many libraries it limited (0 where there is none to limit)."""
    import numpy  # noqa: F401  (loads numpy's OpenBLAS, so that it is limited too)

    limited = 0
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)  # the mapped library: dlopen only adds a reference
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                setter(1)
                limited += 1
                break
    if limited:
        log.debug("blas_threads_limited", libraries=limited)
    else:  # MKL, BLIS, Accelerate, or not Linux: its helper threads may take the devices' CPU
        log.info("blas_threads_not_limited", reason="no OpenBLAS with a thread setter is mapped")
    return limited
