"""Throughput of a boundary's device pool: tokens/s of inner steps for N workers on the demo
corpus (`python -m echelon_tools.pool_bench --corpus-cache DIR --workers 1 2`), with level-1
secure aggregation off (the float path) or on (`--secure`), and the mean seconds per window.

`no_sync_runs` is the baseline of `make bench`'s end-to-end ratio: the pools of several
boundaries, built as their agents build them, training back to back with no synchronization.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from echelon.device.pool import DevicePool, PoolConfig, device_secagg_config
from echelon.tomlconfig import load_toml
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.tokenizer import TokenizerConfig, obtain_tokenizer
from echelon_tools.corpus import fetch_domain
from echelon_tools.runlogs import TrainingRun
from services.boundary_agent.__main__ import load_setup
from services.boundary_agent.training import DeviceSecurity, model_facts, pool_config
from services.common.native import single_threaded_blas


def measure(cfg: PoolConfig, *, steps: int, windows: int) -> tuple[float, float]:
    """Tokens/s and seconds per window over `windows` windows of `steps` steps (after one
    warm-up window)."""
    with DevicePool(cfg) as pool:
        theta = np.zeros(pool.layout().numel, dtype=np.float32)
        pool.run_window(window=0, global_flat=theta, steps=2, inner=None, deadline_s=600.0)
        tokens = 0
        started = time.perf_counter()
        for window in range(1, windows + 1):
            result = pool.run_window(
                window=window, global_flat=theta, steps=steps, inner=None, deadline_s=600.0
            )
            tokens += result.tokens
        elapsed = time.perf_counter() - started
        return tokens / elapsed, elapsed / windows


def agent_pool_config(agent_config: Path, work_dir: Path) -> PoolConfig:
    """The device pool an agent's TOML file describes (same workers, model, data, inner
    loop), with level-1 secure aggregation and the per-window evaluation off: its devices
    doing nothing but inner steps and the pool's plain float sum."""
    setup = load_setup(load_toml(agent_config), agent_config.parent)
    facts = model_facts(setup, work_dir)
    plain = DeviceSecurity(secure=None, k_min=1, graph_seed=b"")
    return dataclasses.replace(pool_config(setup, facts, work_dir, plain), eval_every=0)


def no_sync_runs(
    configs: Mapping[str, PoolConfig], *, steps: int, windows: int, timeout_s: float = 600.0
) -> list[TrainingRun]:
    """Every boundary's pool runs `windows` windows of `steps` inner steps back to back, all
    pools at once and none waiting for another (the devices with no synchronization at all).
    Pools start together; windows begin once every pool is up. Raises the first pool's error.
    This process drives the pools as the agents drive theirs, and so runs numpy's BLAS as
    they do (single-threaded: services.common.native), lest its BLAS helper threads spin on
    the devices' cores in the baseline only.
    """
    single_threaded_blas()
    pools = {name: DevicePool(cfg) for name, cfg in configs.items()}
    ready = threading.Barrier(len(pools), timeout=timeout_s)
    runs: list[TrainingRun] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def drive(name: str, pool: DevicePool) -> None:
        try:
            pool.start()
            ready.wait()
            theta = np.zeros(pool.layout().numel, dtype=np.float32)
            for window in range(1, windows + 1):
                started = time.monotonic()
                result = pool.run_window(
                    window=window, global_flat=theta, steps=steps, inner=None, deadline_s=timeout_s
                )
                seconds = time.monotonic() - started
                with lock:
                    runs.append(TrainingRun(name, time.time(), seconds, result.tokens, window))
        except BaseException as exc:  # reported to the caller, after every pool closed
            errors.append(exc)
            ready.abort()

    threads = [
        threading.Thread(target=drive, args=(n, p), name=f"pool-{n}") for n, p in pools.items()
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for pool in pools.values():
            pool.close()
    if errors:
        raise errors[0]
    return sorted(runs, key=lambda r: r.end)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echelon_tools.pool_bench")
    parser.add_argument("--corpus-cache", type=Path, required=True)
    parser.add_argument("--domain", default="python-docs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--offline", action="store_true")
    parser.add_argument("--secure", action="store_true", help="level-1 secure aggregation on")
    args = parser.parse_args(argv)
    text = fetch_domain(
        args.domain, args.corpus_cache, max_bytes=1 << 20, allow_network=not args.offline
    )
    with tempfile.TemporaryDirectory(prefix="echelon-bench-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        obtain_tokenizer(TokenizerConfig(files=(text.path,), vocab_size=4096), tok_dir)
        for n in args.workers:
            cfg = PoolConfig(
                n_workers=n,
                data=DataConfig(files=(text.path,), seq_len=args.seq_len),
                tokenizer_dir=tok_dir,
                work_dir=Path(tmp) / f"work-{n}",
                threads_per_worker=args.threads_per_worker,
                inner_cfg=InnerConfig(batch_size=args.batch_size, seq_len=args.seq_len),
                eval_every=0,
                secure=device_secagg_config(max_devices=max(n, 2)) if args.secure else None,
            )
            rate, per_window = measure(cfg, steps=args.steps, windows=args.windows)
            print(
                f"workers={n} threads/worker={args.threads_per_worker} secure={args.secure} "
                f"tokens/s={rate:.0f} s/window={per_window:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
