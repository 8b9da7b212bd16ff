"""The run's declared configuration: policy, hyperparameters and model identity.

It is recorded once on the audit log (a RUN_CONFIG record) as soon as the first
registration pins the model identity, before any window opens, and handed to every
boundary at registration; the verifier checks the whole history against it.
"""

from __future__ import annotations

import hashlib
import threading

from echelon.audit.policy import Policy, run_config
from echelon.audit.record import LOG_PARTY, PayloadType, RunConfig
from services.common.audited import AuditedPeer

from .config import CoordinatorConfig
from .registry import Registry
from .store import CoordinatorStore

_RECORDED = "run_config_sha256"


class RunDeclaration:
    """Callable that returns the declared configuration, recording it on first use."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        policy: Policy,
        registry: Registry,
        store: CoordinatorStore,
        audit: AuditedPeer,
    ) -> None:
        self.config = config
        self.policy = policy
        self.registry = registry
        self.store = store
        self.audit = audit
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        identity = self.registry.identity
        model = (
            {}
            if identity is None
            else {
                "layout_digest": identity.layout_digest.hex(),
                "dim": identity.dim,
                "base_model_digest": identity.base_model_digest.hex(),
                "tokenizer_digest": identity.tokenizer_digest.hex(),
            }
        )
        body = run_config(self.policy, self.config.declared(model))
        with self._lock:
            if identity is not None and self.store.get_meta(_RECORDED) is None:
                self.audit.gate.send(
                    PayloadType.RUN_CONFIG, LOG_PARTY, 0, body, RunConfig(config=body), lambda: None
                )
                self.store.set_meta(_RECORDED, hashlib.sha256(body).hexdigest())
        return body
