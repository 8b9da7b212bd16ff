"""The boundary agent's device pool: spawns and supervises one worker process per device, runs
participation windows over a gloo group in which the agent is rank 0, and returns only the
token-weighted SUM of the workers' deltas (never one worker's update or token count).

Per window: a StartWindow control message over each worker's Pipe; with level-1 secure
aggregation on (`PoolConfig.secure`), the key rounds over the Pipes (`secure.py`); theta_v to
each worker point-to-point over gloo; each worker's contribution (see `contribution.py`:
float, or masked) back as one length-checked frame on its Pipe, waited on until the
window's deadline; with level 1 on, the survivor signatures and unmasking shares over the
Pipes. A worker that dies or misses the deadline is dropped (killed), the window completes
with the survivors, and the group is rebuilt on a fresh rendezvous port before the next
window.

A refused window (`WindowRefused`: fewer than `k_min` contributors, or too few survivors to
unmask) applies nothing. Each worker keeps what it holds locally (AdamW moments and step
count, persisted in its `work_dir`) and discards its delta: every window starts from the
global adapter the agent sends, so the next window starts from the global version as usual.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from echelon.device.members import Membership, PoolError, WorkerEntry, worker_entry
from echelon.device.pool_config import DeviceWindowResult, Evaluation, PoolConfig
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
    "Evaluation",
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

    One caller at a time drives windows and evaluations (they serialize on a lock); `close`
    may come from any thread at any moment, also in the middle of a window: it stops the
    workers, waits for the driving call to fail out, and only then tears the group down, so
    no thread is left inside gloo while the process exits.

    Scheduled evaluations (`PoolConfig.eval_every`) run in one worker after the window's sum
    is returned, so they overlap the agent's synchronization; the next window or evaluation
    collects the result first (`last_evaluation`).
    """

    def __init__(
        self,
        cfg: PoolConfig,
        *,
        transcript: Transcript | None = None,
        on_stage: StageObserver = ignore_stage,
        entry: WorkerEntry = worker_entry,
    ) -> None:
        """`transcript`, for tests and audits of the device plane, is called with everything
        the agent process receives from the workers during each window (`TranscriptEntry`);
        `on_stage` with each `PoolStage` a window reaches; `entry` is what each spawned
        worker process runs (tests run hostile devices through it)."""
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
            entry=entry,
        )
        self._started = False
        self._closed = False
        self._drive = threading.Lock()  # held by the call that is using the workers
        self._pending_eval: tuple[WorkerHandle, int, float] | None = None  # handle, window, t0
        self.last_evaluation: Evaluation | None = None

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

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the workers (Stop, then terminate, then kill); idempotent, from any thread.

        When another thread is in a window or an evaluation, the workers are terminated at
        once (they may be mid-computation and would not read Stop until done); that call then
        fails with PoolError within `timeout_s` (default: the collective timeout) and the
        group is torn down only after it has left.
        """
        if self._closed:
            return
        self._closed = True
        busy = not self._drive.acquire(blocking=False)
        if busy:
            log.info("pool_closing_mid_call")
            self._members.terminate_all()
            wait = self.cfg.collective_timeout_s + 5.0 if timeout_s is None else timeout_s
            if not self._drive.acquire(timeout=wait):
                log.error("pool_close_timeout", waited_s=wait)
                return  # the caller is stuck in a collective: leave the group to the OS
        try:
            self._members.close()
        finally:
            self._drive.release()
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
        with self._driving():
            return self._run_window(window, global_flat, steps, inner, deadline_s)

    def _run_window(
        self,
        window: int,
        global_flat: np.ndarray,
        steps: int,
        inner: InnerConfig | None,
        deadline_s: float,
    ) -> DeviceWindowResult:
        layout = self.layout()
        if global_flat.shape != (layout.numel,):
            raise AdapterLayoutError(
                "global adapter length", expected=layout.numel, found=global_flat.shape
            )
        self._settle_evaluation()
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
            self._on_stage(PoolStage.THETA_SENT, window)
            failed.update(
                collect_contributions(
                    self._live(members, failed),
                    aggregation.sink,
                    deadline,
                    self._recorder(window),
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
        result = DeviceWindowResult(
            delta_sum=total.delta_sum,
            weight_sum=total.weight_sum,
            tokens=round(total.weight_sum),
            devices=total.devices,
            train_loss=total.train_loss,
            error_bound=total.error_bound,
        )
        log.info(
            "pool_window_done",
            window=window,
            devices=result.devices,
            tokens=result.tokens,
            train_loss=round(result.train_loss, 4),
            dropped=len(failed),
            secure=self.cfg.secure is not None,
        )
        if self.cfg.eval_every and window % self.cfg.eval_every == 0:
            local = global_flat.astype(np.float64) - total.delta_sum / total.weight_sum
            self._start_evaluation(local.astype(np.float32), window)
        return result

    def evaluate(self, global_flat: np.ndarray) -> float:
        """Validation loss of this boundary's held-out text under the adapter `global_flat`
        (computed in a worker, so the agent never loads the model); waits for it, after any
        scheduled evaluation still running.

        Raises:
            AdapterLayoutError: `global_flat` does not match the layout.
            PoolError: no worker could evaluate, or the pool closed meanwhile.
        """
        with self._driving():
            layout = self.layout()
            if global_flat.shape != (layout.numel,):
                raise AdapterLayoutError(
                    "adapter length", expected=layout.numel, found=global_flat.shape
                )
            self._settle_evaluation()
            while self._members.workers:
                self._start_evaluation(global_flat, -1)
                evaluation = self._settle_evaluation()
                if evaluation is not None:
                    return evaluation.loss
            raise PoolError("evaluate: no live worker")

    def evaluation(self) -> Evaluation | None:
        """The latest evaluation, after waiting for a scheduled one still running."""
        with self._driving():
            self._settle_evaluation()
            return self.last_evaluation

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

    @contextmanager
    def _driving(self) -> Iterator[None]:
        """Holds the workers for one call; refuses when the pool is not running."""
        with self._drive:
            if self._closed:
                raise PoolError("the pool is closed")
            if not self._started:
                raise PoolError("call start() first")
            try:
                yield
            except Exception as exc:
                if self._closed:  # closed from another thread while this call ran
                    raise PoolError("the pool closed during the call") from exc
                raise

    def _start_evaluation(self, theta: np.ndarray, window: int) -> None:
        """Sends `theta` to the first live worker to evaluate; does not wait."""
        msg = Evaluate(theta=np.ascontiguousarray(theta, dtype=np.float32))
        for shard in sorted(self._members.workers):
            handle = self._members.workers[shard]
            if self._members.send(handle, msg):
                self._pending_eval = (handle, window, time.monotonic())
                return
            self._members.drop(shard, "evaluation failed: control pipe closed")
        log.warning("pool_eval_failed", window=window, error="no live worker")

    def _settle_evaluation(self) -> Evaluation | None:
        """Waits for the evaluation in flight, if any; its result becomes `last_evaluation`.
        A worker that fails it is dropped (None)."""
        pending, self._pending_eval = self._pending_eval, None
        if pending is None:
            return None
        handle, window, started = pending
        reply = self._members.await_reply(handle, EvalResult, self.cfg.eval_timeout_s)
        if reply is None:
            log.warning("pool_eval_failed", window=window, shard=handle.shard)
            self._members.drop(handle.shard, "evaluation failed", window=window)
            return None
        evaluation = Evaluation(window=window, loss=reply.loss, seconds=time.monotonic() - started)
        self.last_evaluation = evaluation
        log.info(
            "pool_eval_done",
            window=window,
            val_loss=round(reply.loss, 4),
            seconds=round(evaluation.seconds, 3),
        )
        return evaluation


def _logs_json() -> bool:
    """Whether this process renders structlog as JSON (its spawned workers then follow)."""
    processors = structlog.get_config().get("processors", [])
    return any(isinstance(p, structlog.processors.JSONRenderer) for p in processors)
