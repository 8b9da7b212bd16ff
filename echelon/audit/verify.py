"""The offline verifier behind `echelon audit verify`: an fsck for the audit log.

It recomputes the Merkle tree from the stored records, checks every signature
against the keys the log itself registered, compares the stored and witnessed
signed tree heads with the recomputed roots, reconciles double entries, and
checks the whole history against the policy of the run declaration in the RUN_CONFIG
record (read by the one parser, `RunDeclaration.from_canonical_bytes`).
Every problem becomes a `Finding` that names the entry and what is wrong.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from echelon.declaration import DeclarationError, RunDeclaration

from .checkpoint import NoteVerifier, SignedTreeHead, TreeHead
from .errors import (
    AuditError,
    CounterReplay,
    KeyConflict,
    NotAParty,
    RecordError,
    SignatureError,
    UnknownSigner,
)
from .log import PinnedParty, Registry
from .merkle import MerkleTree, leaf_hash
from .policy import Policy
from .record import (
    LOG_PARTY,
    TRANSPORT_MTLS,
    AuditRecord,
    Direction,
    KeyRegistration,
    ManifestAttributes,
    PayloadType,
    Role,
    RunConfig,
    leaf_data,
)
from .store import APPEND_ONLY_TRIGGERS, StoredEntry


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One problem: the check that failed, the entry it concerns (if any) and what is wrong."""

    check: str
    index: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "index": self.index, "message": self.message}


@dataclass(kw_only=True)
class Report:
    """The verifier's result: findings, payload counts and the declared configuration."""

    size: int = 0
    root_hash: bytes = b""
    tree_heads: int = 0
    uncovered: int = 0  # entries after the last signed tree head (a live or crashed log)
    findings: list[Finding] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    parties: dict[str, str] = field(default_factory=dict)
    policy: Policy | None = None
    transports: dict[str, str] = field(default_factory=dict)  # party -> mtls / insecure
    manifest: str = ""  # "run R version N": the manifest whose keys the log was checked by
    witnessed: bool = False  # some party's witness state was given
    refusals: list[str] = field(default_factory=list)  # payloads refused on receipt
    manifest_versions: list[int] = field(default_factory=list)  # recorded on the log

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, check: str, index: int | None, message: str) -> None:
        self.findings.append(Finding(check=check, index=index, message=message))

    def verdict(self) -> str:
        marking = ""
        if self.policy is not None and self.policy.levels.baseline:
            off = [
                n
                for n, on in (("level 1", self.policy.level1), ("level 2", self.policy.level2))
                if not on
            ]
            marking = f"; BASELINE run: secure aggregation {' and '.join(off)} off"
        insecure = sorted(p for p, t in self.transports.items() if t != TRANSPORT_MTLS)
        if insecure:
            marking += f"; INSECURE run: plaintext transport ({', '.join(insecure)})"
        if not self.manifest:
            marking += "; keys from the log itself (no --manifest)"
        if not self.witnessed:
            marking += (
                "; UNWITNESSED: no party's witness state given, so a log its operator "
                "rewrote consistently cannot be told apart"
            )
        if self.ok:
            return f"PASS: {self.size} entries verified, no findings{marking}"
        return f"FAIL: {len(self.findings)} finding(s) in {self.size} entries{marking}"

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "PASS" if self.ok else "FAIL",
            "summary": self.verdict(),
            "size": self.size,
            "root_hash": self.root_hash.hex(),
            "tree_heads": self.tree_heads,
            "uncovered_entries": self.uncovered,
            "parties": self.parties,
            "transports": self.transports,
            "manifest": self.manifest or None,
            "witnessed": self.witnessed,
            "refusals": self.refusals,
            "manifest_versions": self.manifest_versions,
            "declared_policy": self.policy.to_json() if self.policy else None,
            "baseline": self.policy.levels.baseline if self.policy else None,
            "counts": [
                {"payload_type": t, "column": c, "count": n}
                for (t, c), n in sorted(self.counts.items())
            ],
            "findings": [f.to_json() for f in self.findings],
        }

    def render(self) -> str:
        lines = [
            f"audit log: {self.size} entries, root {self.root_hash.hex()}",
            f"signed tree heads checked: {self.tree_heads}",
        ]
        if self.uncovered:
            lines.append(
                f"entries after the last signed tree head: {self.uncovered} (not yet covered by"
                " one: heads are signed on request, every few appends and on close)"
            )
        lines += [
            "parties: " + (", ".join(f"{p} ({r})" for p, r in sorted(self.parties.items())) or "-"),
            "keys: "
            + (
                f"the manifest's (run {self.manifest})" if self.manifest else "as the log registers"
            ),
            "manifest versions recorded: "
            + (", ".join(map(str, self.manifest_versions)) or "none"),
        ]
        if self.policy is not None:
            p = self.policy
            lines.append(
                f"declared: m_min={p.m_min} k_min={p.k_min} "
                f"level1={'on' if p.level1 else 'OFF'} level2={'on' if p.level2 else 'OFF'}"
            )
        columns = ("sent", "received", "refused")
        types = sorted({t for t, _ in self.counts}, key=lambda n: PayloadType[n])
        lines.append(f"{'payload type':<22}" + "".join(f"{c:>10}" for c in columns))
        for t in types:
            lines.append(f"{t:<22}" + "".join(f"{self.counts[(t, c)]:>10}" for c in columns))
        if self.refusals:
            lines.append(f"refused on receipt: {len(self.refusals)}")
            lines += [f"  {r}" for r in self.refusals]
        lines.append(f"findings: {len(self.findings)}")
        for f in self.findings:
            where = f"#{f.index}" if f.index is not None else "log"
            lines.append(f"  [{f.check}] {where}: {f.message}")
        lines.append(self.verdict())
        return "\n".join(lines)


_REFUSAL_CHECK: tuple[tuple[type[AuditError], str], ...] = (
    (RecordError, "decode"),
    (SignatureError, "signature"),
    (UnknownSigner, "registration"),
    (KeyConflict, "registration"),
    (NotAParty, "manifest"),
    (CounterReplay, "counter"),
)


def verify_log(
    entries: Sequence[StoredEntry],
    tree_heads: Sequence[SignedTreeHead],
    *,
    verifier: NoteVerifier | None,
    witnessed: Iterable[bytes] = (),
    triggers: frozenset[str] | None = None,
    signers: Mapping[str, PinnedParty] | None = None,
    declared: bytes | None = None,
    manifest: str = "",
    manifest_sha256: bytes | None = None,
) -> Report:
    """Verifies a whole log as read from its store (plus checkpoints kept by witnesses).
    With a manifest (`signers`, its `declared` run declaration, `manifest` naming it), a
    record by any other party or key, or another declared run, is a finding."""
    witnessed = list(witnessed)
    report = Report(size=len(entries), manifest=manifest, witnessed=bool(witnessed))
    tree = MerkleTree()
    registry = Registry(signers)
    records: list[tuple[int, AuditRecord]] = []
    for position, stored in enumerate(entries):
        if stored.index != position:
            report.add(
                "index",
                stored.index,
                f"entry at position {position} has index "
                f"{stored.index}: entries are missing or out of order",
            )
        try:
            accepted = registry.check(stored.record, stored.signature)
        except AuditError as exc:
            check = next((c for cls, c in _REFUSAL_CHECK if isinstance(exc, cls)), "entry")
            report.add(check, stored.index, str(exc))
            tree.append(_leaf(stored))
            continue
        if accepted.entry.leaf_hash != stored.leaf_hash:
            report.add("leaf_hash", stored.index, "stored leaf hash does not match the record")
        party, counter = accepted.entry.party, accepted.entry.counter
        last = registry.counters.get(party, 0)
        if counter != last + 1:  # a party retries a failed append with the same counter
            report.add(
                "counter_gap",
                stored.index,
                f"{party}'s counter {counter} follows {last}: its records "
                f"{last + 1}..{counter - 1} are not on the log (dropped, or never appended)",
            )
        registry.add(accepted)
        tree.append(accepted.entry.leaf_hash)
        records.append((stored.index, accepted.record))
    report.root_hash = tree.root()
    if triggers is not None and not triggers >= APPEND_ONLY_TRIGGERS:
        missing = sorted(APPEND_ONLY_TRIGGERS - triggers)
        report.add("triggers", None, f"append-only triggers missing: {missing}")
    _check_tree_heads(report, tree, tree_heads, verifier)
    _check_witnessed(report, tree, witnessed, verifier)
    _check_policy(report, records, declared)
    _check_manifests(report, records, manifest_sha256)
    _reconcile(report, records)
    return report


def _leaf(stored: StoredEntry) -> bytes:
    try:
        return leaf_hash(leaf_data(stored.record, stored.signature))
    except RecordError:
        return leaf_hash(stored.record + stored.signature)


def _check_tree_heads(
    report: Report, tree: MerkleTree, heads: Sequence[SignedTreeHead], verifier: NoteVerifier | None
) -> None:
    """Each stored head must be signed by the log and match the recomputed root at its size.

    Heads after the first mismatch are counted in one finding rather than one each: the
    first mismatching head brackets where the log was changed.
    """
    good = 0
    bad: list[TreeHead] = []
    beyond: list[int] = []
    for stored in heads:
        report.tree_heads += 1
        head = TreeHead(origin="", size=stored.size, root_hash=stored.root_hash)
        if verifier is not None:
            try:
                head = verifier.verify(stored.checkpoint)
            except AuditError as exc:
                report.add("tree_head_signature", None, f"tree head {stored.size}: {exc}")
                continue
            if (head.size, head.root_hash) != (stored.size, stored.root_hash):
                report.add(
                    "tree_head",
                    None,
                    f"stored tree head {stored.size} differs from its own checkpoint",
                )
        if head.size > tree.size:
            beyond.append(head.size)
        elif tree.root(head.size) == head.root_hash:
            good = max(good, head.size) if not bad else good
        else:
            bad.append(head)
    if bad:
        first = bad[0]
        report.add(
            "tree_head",
            good,
            f"signed tree head {first.size} has root "
            f"{first.root_hash.hex()[:16]}..., the log recomputes "
            f"{tree.root(first.size).hex()[:16]}...: an entry in [{good}, {first.size}) "
            f"was changed, removed or reordered ({len(bad)} signed heads disagree)",
        )
    if beyond:
        report.add(
            "truncation",
            tree.size,
            f"{len(beyond)} signed tree heads (up to size "
            f"{max(beyond)}) cover more than the {tree.size} entries the log holds: "
            "entries were removed from its end",
        )
    # Heads are signed lazily, so a live log, or one that crashed between checkpoints, ends
    # with entries no head covers yet; they are checked like every other entry, and reported.
    report.uncovered = max(0, tree.size - max((h.size for h in heads), default=0))


def _check_witnessed(
    report: Report, tree: MerkleTree, checkpoints: Iterable[bytes], verifier: NoteVerifier | None
) -> None:
    for checkpoint in checkpoints:
        if verifier is None:
            report.add("witness", None, "witnessed checkpoints need the log key to be checked")
            return
        try:
            head = verifier.verify(checkpoint)
        except AuditError as exc:
            report.add("witness", None, f"witnessed checkpoint: {exc}")
            continue
        if head.size > tree.size:
            report.add(
                "witness",
                None,
                f"a party witnessed size {head.size} but the log holds "
                f"{tree.size} entries: the log was rolled back",
            )
        elif tree.root(head.size) != head.root_hash:
            report.add(
                "witness",
                None,
                f"a party witnessed a different root at size {head.size}:"
                " the log was forked or rewritten",
            )


def _check_policy(
    report: Report, records: Sequence[tuple[int, AuditRecord]], declared: bytes | None
) -> None:
    roles: dict[str, Role] = {}
    config: bytes | None = None
    policy: Policy | None = None
    for index, record in records:
        attrs = record.attributes
        if isinstance(attrs, KeyRegistration) and record.direction == Direction.SENT:
            roles[record.sender] = attrs.role
            report.transports[record.sender] = attrs.transport
        column = record.direction.value if record.verdict.accepted else "refused"
        report.counts[(record.payload_type.name, column)] += 1
        if isinstance(attrs, RunConfig) and record.verdict.accepted:
            if roles.get(record.sender) != Role.COORDINATOR:
                report.add(
                    "run_config", index, f"RUN_CONFIG from {record.sender}, not a coordinator"
                )
            elif config is None and declared is not None and attrs.config != declared:
                report.add(
                    "run_config", index, "RUN_CONFIG differs from the manifest's declaration"
                )
            elif config is None:
                try:
                    policy = RunDeclaration.from_canonical_bytes(attrs.config).policy()
                except DeclarationError as exc:
                    report.add("run_config", index, f"declared configuration: {exc}")
                    continue
                config, report.policy = attrs.config, policy
            elif attrs.config != config:
                report.add("run_config", index, "RUN_CONFIG differs from the first declared one")
            continue
        if record.payload_type in (PayloadType.KEY_REGISTRATION, PayloadType.MANIFEST):
            continue  # (they come before the run declares itself)
        if not record.verdict.accepted:
            continue
        if policy is None:
            report.add(
                "policy", index, f"{record.payload_type.name} before any declared RUN_CONFIG"
            )
            continue
        if record.levels != policy.levels:
            report.add(
                "levels",
                index,
                f"record marks levels {record.levels}, the run declared {policy.levels}",
            )
        role = roles.get(record.sender)
        if role is None:
            report.add("policy", index, f"sender {record.sender} never registered a role")
            continue
        reason = policy.check(
            role=role,
            payload_type=record.payload_type,
            schema_version=record.schema_version,
            size=record.payload_size,
            attributes=attrs,
        )
        if reason is not None:
            report.add(
                "policy",
                index,
                f"{record.direction.value} {record.payload_type.name} "
                f"{record.sender}->{record.receiver} in window {record.window}: {reason}",
            )
    report.parties = {party: role.value for party, role in roles.items()}


def _check_manifests(
    report: Report, records: Sequence[tuple[int, AuditRecord]], given: bytes | None
) -> None:
    """The manifest versions the coordinator recorded go up, one body per version, and
    the latest is the manifest the auditor was given (`given`: its SHA-256)."""
    seen: dict[int, bytes] = {}
    latest: tuple[int, bytes, int] | None = None  # (version, sha256, index)
    for index, record in records:
        attrs = record.attributes
        if not isinstance(attrs, ManifestAttributes) or record.direction != Direction.SENT:
            continue
        if not record.verdict.accepted:
            continue
        version, digest = attrs.version, record.payload_sha256
        if version in seen and seen[version] != digest:
            report.add("manifest", index, f"manifest version {version} recorded with two bodies")
        elif latest is not None and version < latest[0]:
            report.add("manifest", index, f"manifest version {version} recorded after {latest[0]}")
        seen[version] = digest
        if latest is None or version >= latest[0]:
            latest = (version, digest, index)
    report.manifest_versions = sorted(seen)
    if given is None:
        return
    if latest is None:
        report.add("manifest", None, "the run's manifest was never recorded on the log")
    elif latest[1] != given:
        report.add(
            "manifest",
            latest[2],
            f"the latest manifest on the log (version {latest[0]}, sha256 "
            f"{latest[1].hex()[:16]}...) is not the one given ({given.hex()[:16]}...)",
        )


def _reconcile(report: Report, records: Sequence[tuple[int, AuditRecord]]) -> None:
    sent: defaultdict[tuple[Any, ...], list[int]] = defaultdict(list)
    refused: set[tuple[Any, ...]] = set()
    received: defaultdict[tuple[Any, ...], list[int]] = defaultdict(list)
    logging = {r.sender for _, r in records if r.receiver == LOG_PARTY}  # parties that log
    for index, r in records:
        if r.receiver == LOG_PARTY:
            continue
        if r.direction == Direction.SENT and r.receiver not in logging:
            continue  # to a party that keeps no records (an auditor's download): one-sided
        key = (r.sender, r.receiver, r.window, r.payload_type, r.payload_sha256)
        if r.direction == Direction.RECEIVED and not r.verdict.accepted:
            # refused on receipt (an impersonated registration, a weaker run): a refusal,
            # counted and listed; what was offered was not taken
            report.refusals.append(
                f"#{index} {r.payload_type.name} from {r.sender} refused by {r.receiver}: "
                f"{r.verdict.reason}"
            )
            continue
        if r.direction == Direction.RECEIVED:
            received[key].append(index)
        elif r.verdict.accepted:
            sent[key].append(index)
        else:
            refused.add(key)
    for key in sorted(set(sent) | set(received), key=lambda k: min(sent[k] + received[k])):
        out, got = sent[key], received[key]
        sender, receiver, window, ptype, digest = key
        what = f"{ptype.name} {sender}->{receiver} window {window} sha256 {digest.hex()[:12]}"
        for index in out[len(got) :]:
            report.add("double_entry", index, f"{what} logged as sent, never as received")
        for index in got[len(out) :]:
            why = "which its sender refused to send" if key in refused else "never logged as sent"
            report.add("double_entry", index, f"{what} logged as received, {why}")
