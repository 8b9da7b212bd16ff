"""The window loop: open a window, run the secure-aggregation rounds, collect, unmask,
apply the outer step, store and distribute the new global adapter.

Decisions (cohort, closing, unmasking) are the pure functions of `echelon.window`;
this module only performs them against real agents, in parallel, with deadlines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import numpy as np
import structlog

from echelon.aggregation import AggregationError, WindowSum
from echelon.controller import SyncSignals, agreement_ratio, cosine, decide, initial_state
from echelon.outer import OuterOptimizer
from echelon.window import BoundarySeen, close_decision, select_cohort, unmask_decision
from echelon_proto.boundary.v1 import boundary_pb2
from echelon_proto.common.v1 import common_pb2
from services.common.audited import AuditedPeer
from services.common.wire import new_ref, vector_header, vector_sha256

from . import metrics
from .agents import AgentCallError, AgentClient
from .config import CoordinatorConfig
from .registry import Registry
from .secure import RoundAborted, WindowAggregation, make_aggregation
from .store import CoordinatorStore, Registration, VersionRecord

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WindowOutcome:
    window: int
    committed: bool
    reason: str
    version: int
    contributors: tuple[str, ...] = ()


class WindowDriver:
    """Runs windows one after another until stopped or `config.windows` are done."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        store: CoordinatorStore,
        registry: Registry,
        audit: AuditedPeer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.audit = audit
        self.clock = clock
        self.inner_steps = config.window.inner_steps
        self.mu = config.inner.mu
        self._sync = initial_state(self.inner_steps, self.mu, config.controller)
        if config.adaptive_h:
            self.inner_steps = self._sync.inner_steps
        self._previous_g: np.ndarray | None = None
        self.window_id = int(store.get_meta("window") or 0)
        self.completed = sum(1 for v in store.versions() if v.version > 0)
        self.aborted = 0
        self._clients: dict[str, AgentClient] = {}
        self._phi: np.ndarray | None = None
        self._optimizer: OuterOptimizer | None = None

    # -- state -----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        latest = self.store.latest_version()
        return -1 if latest is None else latest.version

    def _ensure_initialized(self, dim: int) -> None:
        """Version 0 is the shared initial adapter: offset zero; restores after a restart."""
        if self._phi is not None:
            return
        latest = self.store.latest_version()
        if latest is None:
            phi = np.zeros(dim, dtype=np.float32)
            record = VersionRecord(0, 0, vector_sha256(phi), (), 0.0, int(self.clock() * 1000), b"")
            self.store.save_version(record, phi, None, None)
            self._phi, momentum = phi, None
        else:
            self._phi = self.store.load_adapter(latest.version)
            momentum = self.store.load_momentum(latest.version)
        self._optimizer = OuterOptimizer(self.config.outer, dim, momentum)

    def _client(self, boundary: str, address: str) -> AgentClient:
        client = self._clients.get(boundary)
        if client is None or client.address != address:
            if client is not None:
                client.close()
            client = AgentClient(boundary, address, self.audit, self.config.rpc_timeout_s)
            self._clients[boundary] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    # -- the loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.config.windows and self.completed >= self.config.windows:
                log.info("run_complete", windows=self.completed, version=self.version)
                return
            outcome = self.step()
            if outcome is None:
                stop.wait(self.config.idle_poll_s)
            elif not outcome.committed:
                stop.wait(self.config.abort_backoff_s)

    def step(self) -> WindowOutcome | None:
        """Runs one window if a cohort is available; None when there is none yet."""
        identity = self.registry.identity
        regs, last_seen = self.registry.snapshot()
        now = self.clock()
        seen = [BoundarySeen(b, last_seen[b]) for b in regs if b in last_seen]
        decision = select_cohort(now, seen, self.config.window)
        if not decision.open_window or identity is None:
            return None
        self._ensure_initialized(identity.dim)
        self.window_id += 1
        self.store.set_meta("window", str(self.window_id))
        window = self.window_id
        metrics.WINDOW.set(window)
        started = self.clock()
        with structlog.contextvars.bound_contextvars(window=window):
            outcome = self._run(
                window, decision.members, regs, identity.dim, identity.layout_digest
            )
        metrics.WINDOWS.labels("committed" if outcome.committed else "aborted").inc()
        seconds = self.clock() - started
        metrics.WINDOW_SECONDS.observe(seconds)
        if outcome.committed:
            self.completed += 1
        else:
            self.aborted += 1
        log.info(
            "window_done",
            window=window,
            committed=outcome.committed,
            reason=outcome.reason,
            version=outcome.version,
            contributors=list(outcome.contributors),
            seconds=round(seconds, 3),
        )
        return outcome

    def _run(
        self,
        window: int,
        members: tuple[str, ...],
        regs: dict[str, Registration],
        dim: int,
        layout_digest: bytes,
    ) -> WindowOutcome:
        cfg = self.config
        assert self._phi is not None and self._optimizer is not None
        version = self.version
        parties = {b: i for i, b in enumerate(members)}
        clients = {b: self._client(b, regs[b].address) for b in members}
        opened = self.clock()
        deadline = opened + cfg.window.deadline_s
        request = self._open_request(window, version, members, parties, regs, deadline)
        pool = futures.ThreadPoolExecutor(max_workers=max(2, len(members)))
        try:
            live = self._parallel(
                pool, clients, lambda b, c: self._open(c, window, version, layout_digest, request)
            )
            metrics.COHORT.set(len(live))
            if len(live) < cfg.window.min_cohort:
                return self._abort(window, clients, live, version, f"{len(live)} opened")
            aggregation = make_aggregation(request.secagg, window, parties, regs, dim)
            live = aggregation.key_rounds({b: clients[b] for b in live}, pool)
            collected = self._collect(
                pool, aggregation, {b: clients[b] for b in live}, window, dim, opened, deadline
            )
            try:
                survivors = aggregation.fix_survivors()
            except RoundAborted as exc:
                return self._abort(window, clients, live, version, f"too few survivors: {exc}")
            gate = unmask_decision(len(survivors), cfg.window)
            if not gate.unmask:
                return self._abort(window, clients, live, version, gate.reason)
            try:
                total = aggregation.unmask({b: clients[b] for b in live}, pool)
            except (RoundAborted, AgentCallError, AggregationError) as exc:
                return self._abort(window, clients, live, version, f"unmasking failed: {exc}")
            names = tuple(sorted(b for b in live if parties[b] in total.contributors))
            new_version = self._outer_step(window, version, total, names, collected)
            tokens = sum(m.tokens for b, m in collected.items() if b in names)
            metrics.TOKENS_PER_S.set(tokens / max(self.clock() - opened, 1e-9))
            self._distribute(pool, clients, live, window, new_version, layout_digest, names)
            return WindowOutcome(window, True, gate.reason, new_version, names)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _open_request(
        self,
        window: int,
        version: int,
        members: tuple[str, ...],
        parties: dict[str, int],
        regs: dict[str, Registration],
        deadline: float,
    ) -> boundary_pb2.OpenWindowRequest:
        cfg = self.config
        sa = cfg.secagg
        metrics.INNER_STEPS.set(self.inner_steps)
        return boundary_pb2.OpenWindowRequest(
            version=version,
            cohort=[
                boundary_pb2.CohortMember(
                    boundary=b, party=parties[b], identity_key=regs[b].identity_key
                )
                for b in members
            ],
            deadline_unix_ms=int(deadline * 1000),
            inner_steps=self.inner_steps,
            inner=boundary_pb2.InnerHyperparams(
                lr=cfg.inner.lr,
                mu=self.mu,
                batch_size=cfg.inner.batch_size,
                seq_len=cfg.inner.seq_len,
            ),
            secagg=boundary_pb2.SecAggParams(
                levels=common_pb2.SecAggLevels(level1=sa.level1, level2=sa.level2),
                threshold_fraction=sa.threshold_fraction,
                neighbours=sa.neighbours,
                frac_bits=sa.frac_bits,
                clip=sa.clip,
                max_weight=sa.max_weight,
                graph_seed=f"{cfg.run_id}/{window}".encode(),
                m_min=cfg.window.m_min,
                k_min=sa.k_min,
            ),
            token_unit=cfg.token_unit,
        )

    def _open(
        self,
        client: AgentClient,
        window: int,
        version: int,
        layout_digest: bytes,
        template: boundary_pb2.OpenWindowRequest,
    ) -> None:
        """Opens the window on an agent, then delivers its version if the agent lacks it."""
        request = boundary_pb2.OpenWindowRequest()
        request.CopyFrom(template)
        request.ref.CopyFrom(new_ref(window))
        response = client.open_window(request)
        if not response.holds_window_version:
            assert self._phi is not None
            latest = self.store.latest_version()
            names = list(latest.contributors) if latest else []
            described = vector_header(self._phi, layout_digest)
            client.deliver_global(window, version, self._phi, described, names)

    def _parallel(
        self,
        pool: futures.ThreadPoolExecutor,
        clients: dict[str, AgentClient],
        call: Callable[[str, AgentClient], object],
    ) -> list[str]:
        """Runs `call` for every boundary; returns those that succeeded, sorted."""
        jobs = {pool.submit(call, b, c): b for b, c in clients.items()}
        ok = []
        for job in futures.as_completed(jobs):
            boundary = jobs[job]
            try:
                job.result()
                ok.append(boundary)
            except AgentCallError as exc:
                log.warning("agent_call_failed", boundary=boundary, error=str(exc))
                if exc.code is not None and exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    self.registry.mark_unreachable(boundary)
        return sorted(ok)

    def _collect(
        self,
        pool: futures.ThreadPoolExecutor,
        aggregation: WindowAggregation,
        clients: dict[str, AgentClient],
        window: int,
        dim: int,
        opened: float,
        deadline: float,
    ) -> dict[str, common_pb2.WindowMetadata]:
        """Collects contributions until the window closes; returns metadata by boundary."""
        cfg = self.config
        jobs = {
            pool.submit(
                c.collect_delta, window, dim, len(clients), max(0.1, deadline - self.clock())
            ): b
            for b, c in clients.items()
        }
        metadata: dict[str, common_pb2.WindowMetadata] = {}
        failed = 0
        pending = set(jobs)
        while True:
            decision = close_decision(
                self.clock(),
                opened_s=opened,
                cohort_size=len(clients),
                collected=len(metadata),
                failed=failed,
                config=cfg.window,
            )
            if decision.close:
                log.info("window_closing", reason=decision.detail)
                break
            done, pending = futures.wait(pending, timeout=0.2, return_when=futures.FIRST_COMPLETED)
            for job in done:
                boundary = jobs[job]
                try:
                    got = job.result()
                    aggregation.add(boundary, got.vector)
                except (AgentCallError, AggregationError) as exc:
                    failed += 1
                    log.warning("contribution_failed", boundary=boundary, error=str(exc))
                    continue
                metadata[boundary] = got.header.metadata
                self._observe(boundary, got.header)
        for job in pending:
            clients[jobs[job]].cancel_collect()
        metrics.CONTRIBUTIONS.set(len(metadata))
        return metadata

    def _observe(self, boundary: str, header: boundary_pb2.DeltaHeader) -> None:
        meta = header.metadata
        metrics.STALENESS.observe(meta.staleness)
        metrics.TOKENS.inc(meta.tokens)
        metrics.DRIFT.labels(boundary).set(meta.drift)
        if np.isfinite(meta.val_loss):
            metrics.VAL_LOSS.labels(boundary).set(meta.val_loss)
        metrics.BYTES_IN.labels(common_pb2.PayloadType.Name(header.payload_type)).inc(
            header.vector.total_bytes
        )

    def _outer_step(
        self,
        window: int,
        version: int,
        total: WindowSum,
        names: tuple[str, ...],
        collected: dict[str, common_pb2.WindowMetadata],
    ) -> int:
        assert self._phi is not None and self._optimizer is not None
        g = total.pseudo_gradient()
        phi = self._optimizer.step(self._phi, g)
        self._control(window, g, total, [m for b, m in collected.items() if b in names])
        aggregate = np.append(total.weighted_sum, total.weight_sum).astype(np.float64)
        record = VersionRecord(
            version + 1,
            window,
            vector_sha256(phi),
            names,
            total.weight_sum,
            int(self.clock() * 1000),
            vector_sha256(aggregate),
        )
        self.store.save_version(record, phi, self._optimizer.momentum, aggregate)
        self._phi = phi
        metrics.VERSION.set(version + 1)
        return version + 1

    def _control(
        self,
        window: int,
        g: np.ndarray,
        total: WindowSum,
        metadata: list[common_pb2.WindowMetadata],
    ) -> None:
        """Signals of the closed window; with `adaptive_h`, the next window's H and mu."""
        tokens = sum(m.tokens for m in metadata)
        signals = SyncSignals(
            drift=max((m.drift for m in metadata), default=0.0),
            agreement=agreement_ratio(
                total.weighted_sum, sum(m.weight * m.delta_norm for m in metadata)
            ),
            cosine=cosine(self._previous_g, g),
            loss=sum(m.train_loss * m.tokens for m in metadata) / max(tokens, 1),
        )
        self._previous_g = g
        metrics.AGREEMENT.set(signals.agreement)
        metrics.TRAIN_LOSS.set(signals.loss)
        if not self.config.adaptive_h:
            return
        decision = decide(self._sync, signals, self.config.controller)
        self._sync = decision.state
        self.inner_steps, self.mu = decision.inner_steps, decision.mu
        metrics.H_DECISIONS.labels(decision.reason.value).inc()
        metrics.MU.set(self.mu)
        log.info(
            "sync_decision",
            window=window,
            inner_steps=self.inner_steps,
            mu=self.mu,
            reason=decision.reason.value,
            detail=decision.detail,
        )

    def _distribute(
        self,
        pool: futures.ThreadPoolExecutor,
        clients: dict[str, AgentClient],
        live: list[str],
        window: int,
        version: int,
        layout_digest: bytes,
        names: tuple[str, ...],
    ) -> None:
        assert self._phi is not None
        phi = self._phi
        described = vector_header(phi, layout_digest)  # one digest for every boundary

        def deliver(boundary: str, client: AgentClient) -> None:
            client.deliver_global(window, version, phi, described, list(names))

        self._parallel(pool, {b: clients[b] for b in live}, deliver)

    def _abort(
        self,
        window: int,
        clients: dict[str, AgentClient],
        live: list[str],
        version: int,
        reason: str,
    ) -> WindowOutcome:
        for boundary in live:
            try:
                clients[boundary].abort_window(window, reason)
            except AgentCallError as exc:
                log.warning("abort_failed", boundary=boundary, error=str(exc))
        return WindowOutcome(window, False, reason, version)
