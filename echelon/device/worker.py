"""The worker process of one device: holds the model, its data shard, the inner optimizer state
(in memory and in its `work_dir`), and serves the pool's control messages; only its weighted
contribution leaves it, over the gloo group, to the agent: in the clear (level 1 off) or masked
for the other devices of the window (level 1 on, `masking.py`), under an Ed25519 identity it
generates at spawn."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from echelon.device.contribution import THETA_TAG, encode_contribution, send_contribution
from echelon.device.control import (
    EvalResult,
    Evaluate,
    Joined,
    JoinGroup,
    Ready,
    StartWindow,
    Stop,
    WindowDone,
    WorkerError,
    WorkerSpec,
)
from echelon.device.group import GroupInfo, PointToPointGroup, client_store, connect
from echelon.device.masking import DeviceMasking
from echelon.protocol.messages import WindowAborted
from echelon.training.data import (
    BatchSampler,
    TokenBlocks,
    dirichlet_partition,
    fixed_batches,
    iid_partition,
    load_blocks,
    split_train_val,
)
from echelon.training.inner import InnerLoop, evaluate
from echelon.training.model import build_model
from echelon.training.tokenizer import TextTokenizer, load_tokenizer

log = structlog.get_logger(__name__)


def shard_blocks(spec: WorkerSpec, tokenizer: TextTokenizer) -> tuple[TokenBlocks, TokenBlocks]:
    """This worker's training shard and the boundary's (shared) held-out blocks."""
    blocks = load_blocks(spec.data, tokenizer, cache_dir=spec.work_dir / "cache")
    train, val = split_train_val(blocks, spec.data.val_fraction, spec.data.seed)
    if spec.partition == "iid":
        parts = iid_partition(len(train), spec.n_shards, spec.data.seed)
    else:
        parts = dirichlet_partition(
            train.sources, spec.n_shards, spec.dirichlet_alpha, spec.data.seed
        )
    return train.select(parts[spec.shard]), val


class DeviceWorker:
    """The state of one device; its methods answer one control message each."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        tokenizer = load_tokenizer(spec.tokenizer_dir)
        self.train, val = shard_blocks(spec, tokenizer)
        self.val_batches = fixed_batches(val, spec.eval_batch_size, spec.eval_batches)
        model, self.layout = build_model(spec.model_cfg, spec.lora_cfg, tokenizer.vocab_size)
        self.model = model.to(self.device)
        self.loop = InnerLoop(self.model, self.layout, spec.inner_cfg, self.device)
        self.sampler = BatchSampler(
            self.train, spec.inner_cfg.batch_size, seed=spec.inner_cfg.seed * 1_000_003 + spec.shard
        )
        self.identity = Ed25519PrivateKey.generate()
        self.group: PointToPointGroup | None = None
        self.store: dist.TCPStore | None = None
        self.group_info: GroupInfo | None = None
        self._restore()

    @property
    def state_dir(self) -> Path:
        """This device's private directory (0700): its optimizer state stays the device's."""
        return self.spec.work_dir / f"worker-{self.spec.shard}"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.pt"

    def _restore(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)  # also one made before, or under a lax umask
        saved = load_worker_state(self.state_path, self.device, self.layout.digest())
        if saved is None:
            return
        self.loop.load_state_dict(saved)
        log.info("worker_state_restored", shard=self.spec.shard, step=self.loop.step)

    def _persist(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        torch.save({"layout_digest": self.layout.digest(), "inner": self.loop.state_dict()}, tmp)
        tmp.replace(self.state_path)

    def join(self, msg: JoinGroup) -> Joined:
        self.leave()
        self.group_info = msg.group
        self.store = client_store(msg.group)
        self.group = connect(msg.group, msg.rank, self.store)
        return Joined(generation=msg.group.generation)

    def leave(self) -> None:
        if self.group is not None:
            self.group.abort()
        self.group = None
        self.store = None

    @property
    def identity_public(self) -> bytes:
        return self.identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def window(self, msg: StartWindow, conn: Connection) -> WindowDone:
        """One window: (level 1: key rounds over `conn`), theta_v, inner steps, contribution,
        (level 1: survivor signature and unmasking shares). A window the agent refuses ends
        early or after masking; the optimizer state is kept either way."""
        if self.group is None or self.group_info is None:
            raise RuntimeError("StartWindow before JoinGroup")
        if msg.inner is not None:
            self.loop.set_config(msg.inner)
            self.sampler.batch_size = msg.inner.batch_size
        masking = None
        if msg.secure is not None:
            masking = self.masking(msg, conn)
            if not masking.exchange_keys():
                return WindowDone(window=msg.window)
        seq_len = self.loop.cfg.seq_len
        received = torch.zeros(self.layout.numel, dtype=torch.float32)
        self.group.recv([received], 0, THETA_TAG).wait(timedelta(seconds=self.group_info.timeout_s))
        theta_v = received.numpy().copy()
        batches = (b[:, :seq_len] for b in self.sampler)
        started = time.perf_counter()
        result = self.loop.run(theta_v, batches, msg.steps)
        elapsed = time.perf_counter() - started
        theta = self.loop.adapter()
        if self.spec.record_updates:
            self._record_update(msg.window, theta_v, theta, result.tokens, result.mean_loss)
        if masking is None:
            contribution = encode_contribution(
                theta_v, theta, tokens=result.tokens, train_loss=result.mean_loss
            )
        else:
            contribution = masking.mask(
                theta_v, theta, tokens=result.tokens, train_loss=result.mean_loss
            )
        send_contribution(conn, contribution)
        del contribution, theta
        self._persist()
        if masking is not None:
            masking.finish()
        log.info(
            "worker_window_done",
            window=msg.window,
            shard=self.spec.shard,
            steps=msg.steps,
            tokens_per_s=round(result.tokens / max(elapsed, 1e-9)),
        )
        return WindowDone(window=msg.window)

    def masking(self, msg: StartWindow, conn: Connection) -> DeviceMasking:
        """This device's side of one level-1 window (tests put a hostile one here)."""
        return DeviceMasking(conn=conn, start=msg, shard=self.spec.shard, identity=self.identity)

    def _record_update(
        self, window: int, theta_v: np.ndarray, theta: np.ndarray, tokens: int, loss: float
    ) -> None:
        """Test mode only (`PoolConfig.record_updates`): this device's true update, kept on its
        own disk, so a test can check that the agent never received it in the clear."""
        delta = theta_v.astype(np.float64) - theta.astype(np.float64)
        path = self.spec.work_dir / f"update-w{window}-s{self.spec.shard}.npz"
        np.savez(path, delta=delta, tokens=np.int64(tokens), train_loss=np.float64(loss))

    def evaluate(self, msg: Evaluate) -> EvalResult:
        self.loop.set_adapter(np.asarray(msg.theta, dtype=np.float32))
        return EvalResult(loss=evaluate(self.model, self.val_batches, self.device))


def _log_json_lines() -> None:
    """A spawned worker is a process entry point: it renders its logs as its agent does."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def load_worker_state(path: Path, device: torch.device, layout_digest: str) -> Any | None:
    """The inner loop's saved state at `path`, or None (and a warning) when there is none,
    it is unreadable, it holds anything but tensors and plain containers (loaded with
    `weights_only`: a tampered file cannot run code in the worker), or it was saved for
    another adapter layout."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # any unreadable file: start afresh, and say why
        log.warning("worker_state_ignored", path=str(path), reason=str(exc)[:300])
        return None
    if not isinstance(saved, dict) or saved.get("layout_digest") != layout_digest:
        log.warning("worker_state_ignored", path=str(path), reason="another adapter layout")
        return None
    return saved["inner"]


def worker_main(
    spec: WorkerSpec,
    conn: Connection,
    *,
    worker_type: Callable[[WorkerSpec], DeviceWorker] = DeviceWorker,
) -> None:
    """Entry point of a spawned worker process: serve control messages until Stop or EOF.

    Crash-only: a worker that fails a join or a window exits, so that the agent's pending
    point-to-point receive fails at once (peer closed) instead of waiting for the deadline;
    the pool then drops it (and restarts it when configured). A failed evaluation is only
    reported.
    """
    torch.set_num_threads(spec.threads)
    if spec.log_json:
        _log_json_lines()
    structlog.contextvars.bind_contextvars(shard=spec.shard)
    try:
        worker = worker_type(spec)
        conn.send(
            Ready(
                shard=spec.shard,
                layout_json=worker.layout.to_json(),
                device=spec.device,
                identity=worker.identity_public,
            )
        )
    except Exception as exc:
        log.exception("worker_start_failed", shard=spec.shard)
        conn.send(WorkerError(message=f"worker {spec.shard} start: {exc}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(msg, Stop):
            break
        if isinstance(msg, WindowAborted):
            continue  # a refusal that crossed this worker's last reply: the window is over
        try:
            if isinstance(msg, JoinGroup):
                conn.send(worker.join(msg))
            elif isinstance(msg, StartWindow):
                conn.send(worker.window(msg, conn))
            elif isinstance(msg, Evaluate):
                conn.send(worker.evaluate(msg))
            else:
                conn.send(WorkerError(message=f"unknown control message {type(msg).__name__}"))
        except Exception as exc:
            log.warning(
                "worker_request_failed",
                shard=spec.shard,
                request=type(msg).__name__,
                error=str(exc),
            )
            try:
                conn.send(WorkerError(message=f"{type(msg).__name__}: {exc}"))
            except (BrokenPipeError, OSError):
                break
            if not isinstance(msg, Evaluate):
                break
    worker.leave()
