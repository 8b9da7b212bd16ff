"""Worker side of level-1 secure aggregation: one fresh `PartyRounds` per window (fresh keys,
window bound in), driven by the agent's round messages over the worker's Pipe; it masks
`x = [delta (numel), train_loss / LOSS_RANGE * clip]` with weight `w = tokens / token_unit`
(the library appends `w`). See `secure.py` for the agent side.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import TypeVar

import numpy as np
import structlog
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.device.control import StartWindow
from echelon.protocol.messages import (
    KeysRelayed,
    SharesRelayed,
    SurvivorsAnnounced,
    UnmaskRequested,
    WindowAborted,
)
from echelon.protocol.rounds import PartyRounds

log = structlog.get_logger(__name__)

#: The train loss travels as `loss / LOSS_RANGE * clip`: losses up to 32 nats are carried
#: exactly (up to quantization), larger ones are clipped.
LOSS_RANGE = 32.0

_R = TypeVar("_R", KeysRelayed, SharesRelayed, SurvivorsAnnounced, UnmaskRequested)


def level1_vector(
    theta_v: np.ndarray, theta: np.ndarray, train_loss: float, clip: float
) -> np.ndarray:
    """Worker side: the unweighted vector `[theta_v - theta, train_loss / LOSS_RANGE * clip]`."""
    if theta_v.shape != theta.shape or theta.ndim != 1:
        raise ValueError(f"contribution: got theta {theta.shape}, want theta_v's {theta_v.shape}")
    out = np.empty(theta.shape[0] + 1, dtype=np.float64)
    np.subtract(theta_v, theta, out=out[:-1], dtype=np.float64)
    out[-1] = float(train_loss) / LOSS_RANGE * clip
    return out


class DeviceMasking:
    """Worker side of one level-1 window: a `PartyRounds` (fresh keys, window bound in) fed
    the agent's round messages from the worker's Pipe; its answers go back the same way."""

    def __init__(
        self, *, conn: Connection, start: StartWindow, shard: int, identity: Ed25519PrivateKey
    ) -> None:
        if start.secure is None:
            raise ValueError("DeviceMasking: StartWindow.secure is None (level 1 is off)")
        secure = start.secure
        self.window = start.window
        self._conn = conn
        self._secure = secure
        self._timeout_s = start.send_timeout_s
        self._rounds = PartyRounds(
            party=shard,
            window=start.window,
            cohort=secure.cohort,
            config=secure.config,
            secure=True,
            identity=identity,
            identities={p: Ed25519PublicKey.from_public_bytes(k) for p, k in secure.identities},
            graph_seed=secure.graph_seed,
        )

    def exchange_keys(self) -> bool:
        """Advertise, share keys, receive shares. False when the agent refused the window."""
        self._conn.send(self._rounds.advertise())
        relay = self._expect(KeysRelayed)
        if relay is None:
            return False
        self._conn.send(self._rounds.on_keys(relay))
        routed = self._expect(SharesRelayed)
        if routed is None:
            return False
        self._rounds.on_shares(routed)
        return True

    def weight(self, tokens: int) -> float:
        return tokens / self._secure.token_unit

    def mask(
        self, theta_v: np.ndarray, theta: np.ndarray, *, tokens: int, train_loss: float
    ) -> torch.Tensor:
        """The masked contribution (uint32 words as an int32 tensor) of length numel + 2."""
        clip = self._secure.config.clip
        x = level1_vector(theta_v, theta, train_loss, clip)
        clipped = int(np.count_nonzero(np.abs(x[:-1]) > clip))
        if clipped:
            log.info("worker_delta_clipped", window=self.window, coordinates=clipped, clip=clip)
        sent = self._rounds.contribute(
            x, self.weight(tokens), np.random.default_rng(), base_version=0, devices=1
        )
        return torch.from_numpy(sent.vector.view(np.int32))

    def finish(self) -> bool:
        """Sign the survivor list and release unmasking shares. False when the agent refused
        the window instead (WindowAborted): then no share was released."""
        announced = self._expect(SurvivorsAnnounced)
        if announced is None:
            return False
        self._conn.send(self._rounds.on_survivors(announced))
        request = self._expect(UnmaskRequested)
        if request is None:
            return False
        self._conn.send(self._rounds.on_unmask(request))
        return True

    def _expect(self, kind: type[_R]) -> _R | None:
        """The agent's next message if it is a `kind` of this window; None on WindowAborted.

        Raises:
            TimeoutError: nothing arrived in time (the agent is gone or stuck).
            RuntimeError: another message arrived (the worker then exits, crash-only).
        """
        if not self._conn.poll(self._timeout_s):
            raise TimeoutError(f"window {self.window}: no {kind.__name__} in {self._timeout_s} s")
        msg = self._conn.recv()
        if isinstance(msg, WindowAborted) and msg.window == self.window:
            log.info("worker_window_refused", window=self.window, reason=msg.reason)
            return None
        if isinstance(msg, kind) and msg.window == self.window:
            return msg
        raise RuntimeError(f"window {self.window}: got {type(msg).__name__}, want {kind.__name__}")
