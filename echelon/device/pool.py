"""The boundary agent's device pool: spawns and supervises one worker process per device, runs
participation windows over a gloo group in which the agent is rank 0, and returns only the
token-weighted SUM of the workers' deltas (never one worker's update or token count).

Per window: a StartWindow control message over each worker's Pipe; with level-1 secure
aggregation on (`PoolConfig.secure`), the key rounds over the Pipes (`secure.py`); theta_v to
each worker point-to-point over gloo; each worker's contribution (see `contribution.py`:
float, or masked) back point-to-point, waited on until the window's deadline; with level 1 on,
the survivor signatures and unmasking shares over the Pipes. A worker that dies or misses the
deadline is dropped (killed), the window completes with the survivors, and the group is
rebuilt on a fresh rendezvous port before the next window.

A refused window (`WindowRefused`: fewer than `k_min` contributors, or too few survivors to
unmask) applies nothing. Each worker keeps what it holds locally (AdamW moments and step
count, persisted in its `work_dir`) and discards its delta: every window starts from the
global adapter the agent sends, so the next window starts from the global version as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import numpy as np
import structlog
import torch

from echelon.device.contribution import (
    FloatAggregation,
    Transcript,
    TranscriptEntry,
    WindowAggregation,
    collect_contributions,
    send_global,
)
from echelon.device.control import (
    EvalResult,
    Evaluate,
    StartWindow,
    WindowDone,
    WorkerSpec,
)
from echelon.device.handle import WorkerHandle
from echelon.device.members import Membership, PoolError
from echelon.device.pool_config import DeviceWindowResult, PoolConfig
from echelon.device.secure import (
    RefusalReason,
    SecureAggregation,
    WindowRefused,
    device_secagg_config,
)
from echelon.stages import StageObserver, ignore_stage
from echelon.training.adapter import AdapterLayout, AdapterLayoutError
from echelon.training.inner import InnerConfig

log = structlog.get_logger(__name__)

__all__ = [
    "DevicePool",
    "DeviceWindowResult",
    "PoolConfig",
    "PoolError",
    "PoolStage",
    "RefusalReason",
    "TranscriptEntry",
    "WindowRefused",
    "device_secagg_config",
]


class PoolStage(StrEnum):
    """Stages of a window the pool reports to its `on_stage` observer (tests gate faults on
    them)."""

    THETA_SENT = "theta_sent"  # theta_v went to every live worker; they are training


class DevicePool:
    """Agent side of one boundary's device plane (rank 0 of the workers' gloo group).

    Not thread-safe: one caller drives start, windows, evaluation and close in turn.
    """

    def __init__(
        self,
        cfg: PoolConfig,
        *,
        transcript: Transcript | None = None,
        on_stage: StageObserver = ignore_stage,
    ) -> None:
        """`transcript`, for tests and audits of the device plane, is called with everything
        the agent process receives from the workers during each window (`TranscriptEntry`);
        `on_stage` with each `PoolStage` a window reaches."""
        self.cfg = cfg
        self._transcript = transcript
        self._on_stage = on_stage
        self._inner = cfg.inner_cfg
        self._members = Membership(
            self._spec,
            n_workers=cfg.n_workers,
            start_timeout_s=cfg.start_timeout_s,
            collective_timeout_s=cfg.collective_timeout_s,
            restart=cfg.restart_dead_workers,
        )
        self._started = False
        self._closed = False

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the workers, wait until each has loaded its model and shard, build the group.

        Raises:
            PoolError: no worker came up, or the workers disagree on the adapter layout.
        """
        if self._started:
            return
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        self._members.start()
        self._started = True
        self._members.require_group()

    def close(self) -> None:
        """Stop the workers (Stop, then terminate, then kill); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._members.close()
        log.info("pool_closed")

    def __enter__(self) -> DevicePool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- queries ----------------------------------------------------------------------
    def layout(self) -> AdapterLayout:
        if self._members.layout is None:
            raise PoolError("DevicePool.layout: call start() first")
        return self._members.layout

    def alive_workers(self) -> int:
        return sum(1 for h in self._members.workers.values() if h.process.is_alive())

    def worker_pids(self) -> dict[int, int]:
        """Shard index -> process id of the live workers (for operators and fault tests)."""
        return {
            s: h.process.pid for s, h in self._members.workers.items() if h.process.pid is not None
        }

    # ---- windows ----------------------------------------------------------------------
    def run_window(
        self,
        *,
        window: int,
        global_flat: np.ndarray,
        steps: int,
        inner: InnerConfig | None,
        deadline_s: float,
    ) -> DeviceWindowResult:
        """Run `steps` inner steps on every live worker from `global_flat` and return the sum
        of their weighted deltas. `deadline_s` is seconds from now; a worker that has not
        delivered by then is dropped. `inner` None keeps the last window's inner config.

        Raises:
            AdapterLayoutError: `global_flat` does not match the layout.
            WindowRefused: level 1 on and fewer than `k_min` devices contributed, or too few
                survivors to unmask; nothing was unmasked or applied ("no delta").
            PoolError: the pool is not running or no worker contributed.
            ValueError: bad `steps`, `deadline_s` or `inner` for this pool.
        """
        layout = self._check_running()
        if global_flat.shape != (layout.numel,):
            raise AdapterLayoutError(
                "global adapter length", expected=layout.numel, found=global_flat.shape
            )
        if steps < 1 or deadline_s <= 0:
            raise ValueError(f"run_window: got steps={steps}, deadline_s={deadline_s}; want > 0")
        effective = inner if inner is not None else self._inner
        if effective.seq_len > self.cfg.data.seq_len:
            raise ValueError(
                f"run_window.inner.seq_len: got {effective.seq_len}, want <= "
                f"data.seq_len={self.cfg.data.seq_len}"
            )
        token_unit = self._token_unit(steps, effective)
        deadline = time.monotonic() + deadline_s
        self._members.supervise()
        group = self._members.require_group()
        members = list(self._members.workers.values())
        self._inner = effective
        aggregation = self._aggregation(window, members, layout.numel, token_unit)
        theta = torch.from_numpy(np.ascontiguousarray(global_flat, dtype=np.float32))
        start = StartWindow(
            window=window,
            steps=steps,
            inner=effective,
            send_timeout_s=deadline_s + self.cfg.collective_timeout_s,
            secure=aggregation.start_info(),
        )
        failed: dict[int, str] = {}
        for handle in members:
            if not self._members.send(handle, start):
                failed[handle.shard] = "control pipe closed"
        refused: WindowRefused | None = None
        try:
            aggregation.open(self._live(members, failed), failed)
            ranks = {h.shard: h.rank for h in self._live(members, failed)}
            failed.update(send_global(group, ranks, theta, self.cfg.collective_timeout_s))
            ranks = {shard: rank for shard, rank in ranks.items() if shard not in failed}
            self._on_stage(PoolStage.THETA_SENT, window)
            failed.update(
                collect_contributions(
                    group, ranks, aggregation.sink, deadline, self._recorder(window)
                )
            )
            total = aggregation.close(self._live(members, failed), failed)
        except WindowRefused as exc:
            refused = exc
            aggregation.abort(self._live(members, failed), str(exc))
        self._finish_window(window, members, failed)
        if refused is not None:
            log.warning(
                "pool_window_refused", window=window, reason=refused.reason.name, error=str(refused)
            )
            raise refused
        if total.devices == 0:
            raise PoolError(f"window {window}: no worker contributed ({failed})")
        val_loss = None
        if self.cfg.eval_each_window:
            local = global_flat.astype(np.float64) - total.delta_sum / total.weight_sum
            val_loss = self._evaluate_or_none(local.astype(np.float32), window)
        result = DeviceWindowResult(
            delta_sum=total.delta_sum,
            weight_sum=total.weight_sum,
            tokens=round(total.weight_sum),
            devices=total.devices,
            train_loss=total.train_loss,
            val_loss=val_loss,
            error_bound=total.error_bound,
        )
        log.info(
            "pool_window_done",
            window=window,
            devices=result.devices,
            tokens=result.tokens,
            train_loss=round(result.train_loss, 4),
            val_loss=val_loss,
            dropped=len(failed),
            secure=self.cfg.secure is not None,
        )
        return result

    def evaluate(self, global_flat: np.ndarray) -> float:
        """Validation loss of this boundary's held-out text under the adapter `global_flat`
        (computed in a worker, so the agent never loads the model).

        Raises:
            AdapterLayoutError: `global_flat` does not match the layout.
            PoolError: no worker could evaluate.
        """
        layout = self._check_running()
        if global_flat.shape != (layout.numel,):
            raise AdapterLayoutError(
                "adapter length", expected=layout.numel, found=global_flat.shape
            )
        msg = Evaluate(theta=np.ascontiguousarray(global_flat, dtype=np.float32))
        for shard in sorted(self._members.workers):
            handle = self._members.workers[shard]
            if self._members.send(handle, msg):
                reply = self._members.await_reply(handle, EvalResult, self.cfg.eval_timeout_s)
                if reply is not None:
                    return reply.loss
            self._members.drop(shard, "evaluation failed")
        raise PoolError("evaluate: no live worker")

    # ---- internals ----------------------------------------------------------------------
    def _spec(self, shard: int) -> WorkerSpec:
        use_cuda = self.cfg.backend == "nccl" or (
            self.cfg.backend == "auto" and torch.cuda.is_available()
        )
        device = f"cuda:{shard % torch.cuda.device_count()}" if use_cuda else "cpu"
        return WorkerSpec(
            shard=shard,
            n_shards=self.cfg.n_workers,
            data=self.cfg.data,
            partition=self.cfg.partition,
            dirichlet_alpha=self.cfg.dirichlet_alpha,
            model_cfg=self.cfg.model_cfg,
            lora_cfg=self.cfg.lora_cfg,
            inner_cfg=self.cfg.inner_cfg,
            tokenizer_dir=self.cfg.tokenizer_dir,
            threads=self.cfg.threads_per_worker,
            device=device,
            work_dir=self.cfg.work_dir,
            eval_batches=self.cfg.eval_batches,
            eval_batch_size=self.cfg.eval_batch_size,
            record_updates=self.cfg.record_updates,
            log_json=_logs_json(),
        )

    def _aggregation(
        self, window: int, members: list[WorkerHandle], numel: int, token_unit: float
    ) -> WindowAggregation:
        if self.cfg.secure is None:
            return FloatAggregation(numel)
        return SecureAggregation(
            window=window,
            handles=members,
            numel=numel,
            config=self.cfg.secure,
            k_min=self.cfg.k_min,
            graph_seed=self.cfg.graph_seed,
            token_unit=token_unit,
            members=self._members,
            timeout_s=self.cfg.collective_timeout_s,
            record=self._recorder(window),
        )

    def _token_unit(self, steps: int, inner: InnerConfig) -> float:
        """Tokens per unit of level-1 weight; checks that a full window fits `max_weight`."""
        full = float(steps * inner.batch_size * inner.seq_len)
        unit = self.cfg.token_unit if self.cfg.token_unit is not None else full
        secure = self.cfg.secure
        if secure is not None and full / unit > secure.max_weight:
            raise ValueError(
                f"run_window: a full window weighs {full} / token_unit {unit} = {full / unit}, "
                f"want <= secure.max_weight={secure.max_weight}; raise PoolConfig.token_unit"
            )
        return unit

    @staticmethod
    def _live(members: list[WorkerHandle], failed: dict[int, str]) -> list[WorkerHandle]:
        return [h for h in members if h.shard not in failed]

    def _recorder(self, window: int) -> Callable[[int, str, bytes], None] | None:
        hook = self._transcript
        if hook is None:
            return None

        def record(shard: int, kind: str, payload: bytes) -> None:
            hook(TranscriptEntry(window=window, shard=shard, kind=kind, payload=payload))

        return record

    def _finish_window(
        self, window: int, members: list[WorkerHandle], failed: dict[int, str]
    ) -> None:
        """Wait for every live worker's WindowDone, then drop the failed ones."""
        record = self._recorder(window)
        for handle in self._live(members, failed):
            reply = self._members.await_reply(handle, WindowDone, self.cfg.collective_timeout_s)
            if reply is None or reply.window != window:
                failed[handle.shard] = "no WindowDone"
            elif record is not None:
                record(handle.shard, "window_done", b"")
        for shard, reason in failed.items():
            self._members.drop(shard, reason, window=window)

    def _check_running(self) -> AdapterLayout:
        if self._closed:
            raise PoolError("the pool is closed")
        if not self._started:
            raise PoolError("call start() first")
        return self.layout()

    def _evaluate_or_none(self, theta: np.ndarray, window: int) -> float | None:
        try:
            return self.evaluate(theta)
        except PoolError as exc:
            log.warning("pool_eval_failed", window=window, error=str(exc))
            return None


def _logs_json() -> bool:
    """Whether this process renders structlog as JSON (its spawned workers then follow)."""
    processors = structlog.get_config().get("processors", [])
    return any(isinstance(p, structlog.processors.JSONRenderer) for p in processors)
