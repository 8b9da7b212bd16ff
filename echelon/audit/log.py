"""The transparency log: checks and appends signed records, signs tree heads, serves proofs.

`TransparencyLog` is what the audit log service wraps and what tests and the
simulator run in-process (`LocalSink`). It refuses a record that does not parse,
whose signature does not verify against its signer's registered key (a party's
first record is its self-signed KEY_REGISTRATION), or whose counter does not
exceed the signer's last one. Tree heads are signed lazily (docs/audit.md section 4):
when asked for, every `checkpoint_every` entries, on open and on close.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from .checkpoint import LogSigner, SignedTreeHead
from .errors import (
    CounterReplay,
    KeyConflict,
    NotAParty,
    RecordError,
    StoreCorrupted,
    UnknownSigner,
)
from .merkle import EMPTY_ROOT, MerkleTree, leaf_hash
from .record import (
    LOG_PARTY,
    SIGNATURE_BYTES,
    AuditRecord,
    Direction,
    KeyRegistration,
    Role,
    leaf_data,
)
from .signing import VerifyKey
from .store import LogEntry, LogStore, StoredEntry

log = structlog.get_logger(__name__)

# Entries a log appends before it signs a tree head unasked. Asking (`tree_head`) always
# signs one that covers every entry, so this bounds only what a crash can leave uncovered.
DEFAULT_CHECKPOINT_EVERY = 64
PENDING = -1  # the index of an append the log has not answered yet


@dataclass(frozen=True, kw_only=True)
class AppendResult:
    """Where a record landed: its index, its leaf hash and the latest signed tree head.

    Heads are signed lazily, so `tree_head` covers the record only when
    `tree_head.size > index`; `TransparencyLog.tree_head()` (the service's
    GetTreeHead) returns one that does. `record` is the decoded record when the log
    itself produced the result (None when it came over the wire). A pipelined append
    (`services.common.pipelined`) answers before the log does: index -1 (`PENDING`) and
    no tree head.
    """

    index: int
    leaf_hash: bytes
    tree_head: SignedTreeHead | None
    record: AuditRecord | None = None


@dataclass(frozen=True, kw_only=True)
class Accepted:
    """A record that passed the log's checks, ready to be stored."""

    record: AuditRecord
    entry: LogEntry
    key: VerifyKey  # the signer's key, parsed (its registration's when it registers one)


def registration_key(record: AuditRecord) -> bytes | None:
    """The signing key a record registers for its signer, or None when it registers none:
    only a KEY_REGISTRATION sent to the log itself registers one. (A boundary's record of
    its registration with the coordinator carries its identity key, which signs its
    secure-aggregation messages, not its audit records.)"""
    attrs = record.attributes
    if (
        isinstance(attrs, KeyRegistration)
        and record.direction == Direction.SENT
        and record.receiver == LOG_PARTY
    ):
        return attrs.signing_key
    return None


@dataclass(frozen=True)
class PinnedParty:
    """A party the log knows before it registers (from the federation manifest)."""

    signing_key: bytes
    role: Role


class Registry:
    """Signers' registered keys and last counters, replayed from the log in index order.

    `pinned` (a manifest's parties): only they may sign records, each registering exactly
    the key and role pinned for it. None: first come, first served (an insecure run)."""

    def __init__(self, pinned: Mapping[str, PinnedParty] | None = None) -> None:
        self.keys: dict[str, VerifyKey] = {}
        self.counters: dict[str, int] = {}
        self.pinned = pinned

    def copy(self) -> Registry:
        """A registry to stage records on without touching this one."""
        staged = Registry(self.pinned)
        staged.keys = dict(self.keys)
        staged.counters = dict(self.counters)
        return staged

    def check(
        self, data: bytes, signature: bytes, caller: str | None = None, *, pin: bool = True
    ) -> Accepted:
        """Decodes and checks one record against the registry (without recording it);
        `caller`, when the transport authenticated one, must be the record's signer.

        Raises RecordError, SignatureError, UnknownSigner, KeyConflict, NotAParty,
        CounterReplay.
        """
        if len(signature) != SIGNATURE_BYTES:
            raise RecordError(
                "signature", expected=f"{SIGNATURE_BYTES} bytes", found=len(signature)
            )
        record = AuditRecord.decode(data)
        party = record.signer
        if caller is not None and caller != party:
            raise NotAParty(
                f"record signed as {party!r} appended by {caller!r}: a party appends only "
                "its own records",
                expected=caller,
                found=party,
            )
        key = self.keys.get(party)
        offered = registration_key(record)
        if self.pinned is not None and pin:
            self._check_pinned(record, offered)
        if offered is not None:
            if key is None:
                key = VerifyKey(offered)
            elif offered != key.raw:
                raise KeyConflict(
                    f"party {party!r} already registered another signing key",
                    expected=key.raw.hex(),
                    found=offered.hex(),
                )
        if key is None:
            raise UnknownSigner(
                f"party {party!r} has no registered key; its first record must be its "
                "KEY_REGISTRATION",
                expected="KEY_REGISTRATION",
                found=record.payload_type.name,
            )
        key.verify(data, signature, what=f"record of {party}")
        last = self.counters.get(party, 0)
        if record.counter <= last:
            raise CounterReplay(
                f"counter {record.counter} of {party!r} is not above its last counter {last}",
                expected=f"> {last}",
                found=record.counter,
            )
        entry = LogEntry(
            record=data,
            signature=signature,
            party=party,
            counter=record.counter,
            leaf_hash=leaf_hash(leaf_data(data, signature)),
        )
        return Accepted(record=record, entry=entry, key=key)

    def _check_pinned(self, record: AuditRecord, offered: bytes | None) -> None:
        assert self.pinned is not None
        pin = self.pinned.get(record.signer)
        if pin is None:
            raise NotAParty(
                f"party {record.signer!r} is not a party of the run's manifest",
                expected=sorted(self.pinned),
                found=record.signer,
            )
        attrs = record.attributes
        if (
            offered is not None
            and isinstance(attrs, KeyRegistration)
            and (offered != pin.signing_key or attrs.role != pin.role)
        ):
            raise NotAParty(
                f"party {record.signer!r} registers a key or role the manifest does not "
                "name for it",
                expected=(pin.signing_key.hex(), str(pin.role)),
                found=(offered.hex(), str(attrs.role)),
            )

    def add(self, accepted: Accepted) -> None:
        party = accepted.entry.party
        self.keys[party] = accepted.key
        self.counters[party] = accepted.entry.counter


class TransparencyLog:
    """An append-only Merkle log over a `LogStore`, signing tree heads lazily. Thread-safe.

    A head is signed and stored when `tree_head()` is asked while entries are
    uncovered, in the transaction that brings the uncovered entries to
    `checkpoint_every` (1: a head per append), on open over entries a crash left
    uncovered (after replaying and verifying them), and on close.
    """

    def __init__(
        self,
        *,
        store: LogStore,
        signer: LogSigner,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        pinned: Mapping[str, PinnedParty] | None = None,
    ) -> None:
        """`pinned`: the manifest's parties (`Registry`); None: first come, first served."""
        if checkpoint_every < 1:
            raise ValueError(f"TransparencyLog.checkpoint_every: got {checkpoint_every}, want >= 1")
        self._store = store
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self._registry = Registry(pinned)
        self._unstored: SignedTreeHead | None = None  # the latest head signed for a proof
        self._tree = MerkleTree()
        size = store.size()
        for start in range(0, size, 4096):
            for stored in store.get(start, min(size, start + 4096)):
                self._replay(stored)
        heads = store.tree_heads()
        if heads:
            latest = heads[-1]
            if latest.size > size or self._tree.root(latest.size) != latest.root_hash:
                raise StoreCorrupted(
                    "stored log does not match its latest signed tree head",
                    expected=(latest.size, latest.root_hash.hex()),
                    found=(size, self._tree.root(min(size, latest.size)).hex()),
                )
        self._head = heads[-1] if heads else signer.sign(0, EMPTY_ROOT)
        if self._head.size < size:  # a crash between checkpoints; every entry was replayed
            self._checkpoint_locked()
        log.info("audit_log_opened", tree_size=size, origin=signer.origin)

    def _replay(self, stored: StoredEntry) -> None:
        if stored.index != self._tree.size:
            raise StoreCorrupted("entry index gap", expected=self._tree.size, found=stored.index)
        # Stored entries were accepted when appended, under the manifest version of that
        # time: replayed without the pins (a party a later version removed keeps its past).
        accepted = self._registry.check(stored.record, stored.signature, pin=False)
        if accepted.entry.leaf_hash != stored.leaf_hash:
            raise StoreCorrupted(
                f"leaf hash of entry {stored.index}",
                expected=accepted.entry.leaf_hash.hex(),
                found=stored.leaf_hash.hex(),
            )
        self._registry.add(accepted)
        self._tree.append(stored.leaf_hash)

    @property
    def size(self) -> int:
        with self._lock:
            return self._tree.size

    @property
    def signer(self) -> LogSigner:
        return self._signer

    def append(self, record: bytes, signature: bytes, caller: str | None = None) -> AppendResult:
        """Checks and appends one signed record; `caller` is the authenticated party that
        appends it (None: plaintext). Raises what `Registry.check` raises."""
        with self._lock:
            accepted = self._registry.check(record, signature, caller)
            result = self._store_locked([accepted])[0]
            self._registry.add(accepted)
            return result

    def append_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[AppendResult]:
        """Checks and appends records in one transaction: all are appended or none.

        Raises what `Registry.check` raises (for the first record refused).
        """
        with self._lock:
            staged = self._registry.copy()
            accepted = []
            for record, signature in items:
                one = staged.check(record, signature)
                staged.add(one)
                accepted.append(one)
            results = self._store_locked(accepted)
            self._registry = staged
            return results

    def _store_locked(self, accepted: Sequence[Accepted]) -> list[AppendResult]:
        """Adds checked records to the tree and stores them (with a head when one is due)."""
        first = self._tree.size
        for one in accepted:
            self._tree.append(one.entry.leaf_hash)
        head = None
        if self._tree.size - self._head.size >= self._checkpoint_every:
            head = self._signer.sign(self._tree.size, self._tree.root())
        try:
            stored = self._store.append([a.entry for a in accepted], head)
        except BaseException:
            self._tree.truncate(first)
            raise
        if stored != first:  # the store took another index: someone else writes to it
            self._tree.truncate(first)
            raise StoreCorrupted("store index of an append", expected=first, found=stored)
        if head is not None:
            self._head = head
        return [
            AppendResult(
                index=first + i, leaf_hash=a.entry.leaf_hash, tree_head=self._head, record=a.record
            )
            for i, a in enumerate(accepted)
        ]

    def tree_head(self) -> SignedTreeHead:
        """A signed head of the whole log: signed and stored now if entries are uncovered."""
        with self._lock:
            return self._checkpoint_locked()

    def proof_head(self) -> SignedTreeHead:
        """A head signed over the whole log for an append's proof: signed now when entries
        are uncovered, but not stored (a stored head costs a transaction; the entries it
        covers are durable, so the log signs the same root again after a restart). The
        stored heads follow `checkpoint_every`, requests (`tree_head`) and the tail timer."""
        with self._lock:
            size = self._tree.size
            if self._head.size == size:
                return self._head
            latest = self._unstored
            if latest is None or latest.size != size:
                latest = self._signer.sign(size, self._tree.root())
                self._unstored = latest
            return latest

    def _checkpoint_locked(self) -> SignedTreeHead:
        if self._head.size < self._tree.size:
            head = self._signer.sign(self._tree.size, self._tree.root())
            self._store.add_tree_head(head)
            self._head = head
        return self._head

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Raises LogRangeError when index >= size or size exceeds the log."""
        with self._lock:
            return self._tree.inclusion_proof(index, size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """Raises LogRangeError when first > second or second exceeds the log."""
        with self._lock:
            return self._tree.consistency_proof(first, second)

    def entries(self, start: int, end: int) -> list[StoredEntry]:
        """Raises LogRangeError outside [0, size]."""
        return self._store.get(start, end)

    def close(self) -> None:
        """Signs a head over uncovered entries, then closes the store."""
        with self._lock:
            try:
                self._checkpoint_locked()
            finally:
                self._store.close()


class LocalSink:
    """The gate's sink over an in-process `TransparencyLog` (tests, simulator)."""

    def __init__(self, log: TransparencyLog) -> None:
        self._log = log

    def append(self, record: bytes, signature: bytes) -> AppendResult:
        return self._log.append(record, signature)
