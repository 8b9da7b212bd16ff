"""A service process runs numpy's BLAS on one thread (`services.common.native`), without
touching the environment its children inherit."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from services.common.native import _loaded_openblas, single_threaded_blas


def test_loaded_openblas_reads_the_mapped_libraries(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /opt/numpy.libs/libscipy_openblas64_-ab12.so\n"
        "7f01-7f02 r--p 00001000 08:01 1 /opt/numpy.libs/libscipy_openblas64_-ab12.so\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/libc.so.6\n"
        "7f03-7f04 rw-p 00000000 00:00 0 [heap]\n"
        "7f04-7f05 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3\n"
    )
    assert _loaded_openblas(maps) == [
        "/opt/numpy.libs/libscipy_openblas64_-ab12.so",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",  # Debian's numpy
    ]
    assert _loaded_openblas(tmp_path / "absent") == []


def test_numpy_blas_runs_on_one_thread_and_the_environment_is_kept() -> None:
    before = dict(os.environ)
    limited = single_threaded_blas()
    assert dict(os.environ) == before
    libraries = _loaded_openblas()
    assert limited == len(libraries)  # numpy's OpenBLAS, where numpy was built with it
    for path in libraries:
        lib = ctypes.CDLL(path)
        getter = getattr(lib, "scipy_openblas_get_num_threads64_", None) or getattr(
            lib, "openblas_get_num_threads", None
        )
        if getter is not None:
            getter.restype = ctypes.c_int
            assert getter() == 1
