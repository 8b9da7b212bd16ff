"""Worker side of level-1 secure aggregation: one fresh `Participant` per window (fresh keys,
window bound in), driven by the agent's control messages over the worker's Pipe; it masks
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

from echelon.device.control import (
    AbortWindow,
    Advertised,
    RelayAdvertisements,
    RelayShares,
    ReleaseShares,
    SharesReleased,
    SharesSent,
    SignSurvivors,
    StartWindow,
    SurvivorsSigned,
)
from echelon.secagg import EncryptedShare, KeyAdvertisement, Participant

log = structlog.get_logger(__name__)

#: The train loss travels as `loss / LOSS_RANGE * clip`: losses up to 32 nats are carried
#: exactly (up to quantization), larger ones are clipped.
LOSS_RANGE = 32.0

_R = TypeVar("_R", RelayAdvertisements, RelayShares, SignSurvivors, ReleaseShares)


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
    """Worker side of one level-1 window: a fresh `Participant` (fresh keys, window bound in),
    driven by the agent's control messages over the worker's Pipe."""

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
        self._participant = Participant(
            party_id=shard,
            window=start.window,
            cohort=secure.cohort,
            identity=identity,
            peer_identities={
                p: Ed25519PublicKey.from_public_bytes(k) for p, k in secure.identities
            },
            config=secure.config,
            graph_seed=secure.graph_seed,
        )

    def exchange_keys(self) -> bool:
        """Advertise, share keys, receive shares. False when the agent refused the window."""
        ad = self._participant.advertise()
        self._conn.send(Advertised(window=self.window, advertisement=ad.to_bytes()))
        relay = self._expect(RelayAdvertisements)
        if relay is None:
            return False
        ads = [KeyAdvertisement.from_bytes(b) for b in relay.advertisements]
        shares = self._participant.share_keys({a.party: a for a in ads})
        out = tuple(s.to_bytes() for _, s in sorted(shares.items()))
        self._conn.send(SharesSent(window=self.window, shares=out))
        routed = self._expect(RelayShares)
        if routed is None:
            return False
        self._participant.receive_shares([EncryptedShare.from_bytes(b) for b in routed.shares])
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
        masked = self._participant.mask(x, self.weight(tokens), np.random.default_rng())
        return torch.from_numpy(masked.view(np.int32))

    def finish(self) -> bool:
        """Sign the survivor list and release unmasking shares. False when the agent refused
        the window instead (AbortWindow): then no share was released."""
        sign = self._expect(SignSurvivors)
        if sign is None:
            return False
        signature = self._participant.sign_survivors(sign.survivors)
        self._conn.send(SurvivorsSigned(window=self.window, signature=signature))
        release = self._expect(ReleaseShares)
        if release is None:
            return False
        shares = self._participant.unmask(release.survivors, dict(release.signatures))
        self._conn.send(SharesReleased(window=self.window, shares=shares.to_bytes()))
        return True

    def _expect(self, kind: type[_R]) -> _R | None:
        """The agent's next message if it is a `kind` of this window; None on AbortWindow.

        Raises:
            TimeoutError: nothing arrived in time (the agent is gone or stuck).
            RuntimeError: another message arrived (the worker then exits, crash-only).
        """
        if not self._conn.poll(self._timeout_s):
            raise TimeoutError(f"window {self.window}: no {kind.__name__} in {self._timeout_s} s")
        msg = self._conn.recv()
        if isinstance(msg, AbortWindow) and msg.window == self.window:
            log.info("worker_window_refused", window=self.window, reason=msg.reason)
            return None
        if isinstance(msg, kind) and msg.window == self.window:
            return msg
        raise RuntimeError(f"window {self.window}: got {type(msg).__name__}, want {kind.__name__}")
