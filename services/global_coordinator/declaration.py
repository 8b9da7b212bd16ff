"""Publishes the run's declaration (`echelon.declaration.RunDeclaration`).

It is recorded once on the audit log (a RUN_CONFIG record) as soon as the first
registration pins the model identity, before any window opens, and handed to every
boundary at registration; the verifier checks the whole history against it.
"""

from __future__ import annotations

import hashlib
import threading

from echelon.audit.record import LOG_PARTY, PayloadType, RunConfig
from services.common.audited import AuditedPeer

from .config import CoordinatorConfig
from .registry import Registry
from .store import CoordinatorStore

_RECORDED = "run_config_sha256"


class DeclarationPublisher:
    """Callable that returns the canonical declaration, recording it on first use."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        registry: Registry,
        store: CoordinatorStore,
        audit: AuditedPeer,
    ) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.audit = audit
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        """Raises LookupError before any registration has pinned the model identity."""
        identity = self.registry.identity
        if identity is None:
            raise LookupError("no registration has pinned the model identity yet")
        body = self.config.declaration(identity).to_canonical_bytes()
        with self._lock:
            if self.store.get_meta(_RECORDED) is None:
                self.audit.gate.send(
                    PayloadType.RUN_CONFIG, LOG_PARTY, 0, body, RunConfig(config=body), lambda: None
                )
                self.store.set_meta(_RECORDED, hashlib.sha256(body).hexdigest())
        return body
