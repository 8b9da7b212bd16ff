"""`echelon audit verify` and `echelon audit show`: the audit log for auditors and operators.

`echelon_tools.cli` dispatches `echelon audit ...` here (`main(argv)`); this module
reads files and flags, the checking itself lives in `echelon.audit.verify`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from echelon.audit.checkpoint import VERIFIER_KEY_FILE, NoteVerifier, load_verifier
from echelon.audit.errors import AuditError, ConfigError, RecordError
from echelon.audit.record import (
    AuditRecord,
    DeltaAttributes,
    DroppedAttributes,
    KeyRegistration,
    MetadataAttributes,
    PayloadType,
    RunConfig,
)
from echelon.audit.store import SqliteLogStore, StoredEntry
from echelon.audit.verify import verify_log
from echelon.audit.witness import read_checkpoint
from echelon.trust.errors import TrustError
from echelon.trust.kit import MANIFEST, ROOT_PUB
from echelon.trust.manifest import SignedManifest
from echelon.trust.pki import load_ed25519_public


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echelon audit",
        description="Verify an Echelon audit log, or list its records.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify a whole audit log; exit 1 on any finding")
    verify.add_argument("--db", type=Path, required=True, help="the log's SQLite file")
    verify.add_argument(
        "--log-key",
        help="the log's verifier key (name+hash+key) or a file holding it; "
        f"default: {VERIFIER_KEY_FILE} next to --db (get it out of band for a real audit)",
    )
    verify.add_argument(
        "--witness",
        type=Path,
        action="append",
        default=[],
        help="a party's witness file (latest tree head it verified); repeatable",
    )
    verify.add_argument(
        "--manifest",
        type=Path,
        help="the run's signed manifest (or a kit directory): the log's key and every "
        "party's key are taken from it, and a log under any other key is refused",
    )
    verify.add_argument(
        "--root",
        type=Path,
        help="the federation root's root.pub (out of band) the manifest must verify against; "
        "default: root.pub beside the manifest",
    )
    verify.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    show = sub.add_parser("show", help="list records as a table")
    show.add_argument("--db", type=Path, required=True)
    show.add_argument("--window", type=int, help="only this window")
    show.add_argument("--boundary", help="only records with this party as sender or receiver")
    show.add_argument(
        "--type", dest="payload_type", help="only this payload type, e.g. MASKED_DELTA"
    )
    show.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `verify` or `show`; returns the exit status (0 ok, 1 findings, 2 usage or I/O)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "verify":
            return _verify(args)
        return _show(args)
    except (OSError, ConfigError, AuditError) as exc:
        print(f"echelon audit {args.command}: {exc}", file=sys.stderr)
        return 2


def _open(db: Path) -> SqliteLogStore:
    if not db.is_file():
        raise ConfigError(f"--db: got {db}, want an existing SQLite file of the audit log")
    return SqliteLogStore(db, readonly=True)


def _all_entries(store: SqliteLogStore) -> list[StoredEntry]:
    return store.get(0, store.size())


def _load_key(args: argparse.Namespace) -> NoteVerifier | None:
    text = args.log_key
    if text is None:
        default = args.db.parent / VERIFIER_KEY_FILE
        if not default.is_file():
            return None
        text = str(default)
    return load_verifier(text)


def _manifest(args: argparse.Namespace) -> SignedManifest | None:
    """The manifest given with --manifest, verified against --root (or its root.pub)."""
    if args.manifest is None:
        if args.root is not None:
            raise ConfigError("--root: given without --manifest, want both or neither")
        return None
    path: Path = args.manifest
    folder = path if path.is_dir() else path.parent
    file = path / MANIFEST if path.is_dir() else path
    root_path: Path = args.root or folder / ROOT_PUB
    try:
        root = load_ed25519_public(root_path.read_bytes(), str(root_path))
        signed = SignedManifest.from_bytes(file.read_bytes())
        signed.verify(root)
        return signed
    except TrustError as exc:
        raise ConfigError(f"--manifest {file}: {exc}") from None


def _verify(args: argparse.Namespace) -> int:
    signed = _manifest(args)
    manifest = None if signed is None else signed.manifest
    store = _open(args.db)
    try:
        verifier = _load_key(args)
        if manifest is not None:
            named = load_verifier(manifest.log_verifier_key())
            given = verifier if args.log_key is not None else None
            if given is not None and (given.name, given.public_key) != (
                named.name,
                named.public_key,
            ):
                raise ConfigError(
                    "--log-key: differs from the audit log key the manifest names; want that "
                    "key (or leave --log-key out)"
                )
            verifier = named  # never the key file beside the log: the operator wrote that
        witnessed = [read_checkpoint(p) for p in args.witness]
        report = verify_log(
            _all_entries(store),
            store.tree_heads(),
            verifier=verifier,
            witnessed=witnessed,
            triggers=store.triggers(),
            signers=None if manifest is None else manifest.audit_signers(),
            declared=None if manifest is None else manifest.declaration.to_canonical_bytes(),
            manifest="" if manifest is None else f"{manifest.run_id} version {manifest.version}",
            manifest_sha256=None if signed is None else hashlib.sha256(signed.to_bytes()).digest(),
        )
    finally:
        store.close()
    if verifier is None:
        report.add("tree_head_signature", None, "no log key given: checkpoint signatures unchecked")
    print(report.render())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


def _type_filter(name: str | None) -> PayloadType | None:
    if name is None:
        return None
    key = name.upper().removeprefix("PAYLOAD_TYPE_")
    if key not in PayloadType.__members__:
        raise ConfigError(f"--type: got {name!r}, want one of {', '.join(PayloadType.__members__)}")
    return PayloadType[key]


def _details(record: AuditRecord) -> str:
    attrs = record.attributes
    parts: list[str] = []
    if isinstance(attrs, DeltaAttributes):
        parts.append(f"m={attrs.cohort_size} k={attrs.devices}")
    elif isinstance(attrs, MetadataAttributes):
        parts.append("fields=" + ",".join(attrs.fields))
    elif isinstance(attrs, KeyRegistration):
        parts.append(f"{attrs.role.value} key={attrs.signing_key.hex()[:12]}")
    elif isinstance(attrs, RunConfig):
        parts.append(f"config {len(attrs.config)} bytes")
    elif isinstance(attrs, DroppedAttributes):
        parts.append(f"staleness={attrs.staleness}")
    if record.levels.baseline:
        parts.append("BASELINE")
    if not record.verdict.accepted:
        parts.append(f"refused: {record.verdict.reason}")
    return " ".join(parts)


def _show(args: argparse.Namespace) -> int:
    wanted_type = _type_filter(args.payload_type)
    store = _open(args.db)
    try:
        entries = _all_entries(store)
    finally:
        store.close()
    header = (
        f"{'index':>6}  {'time (UTC)':<19}  {'win':>4}  {'payload type':<20} {'dir':<4} "
        f"{'sender -> receiver':<30} {'bytes':>10}  {'sha256':<12}  details"
    )
    print(header)
    shown = 0
    for stored in entries:
        try:
            record = AuditRecord.decode(stored.record)
        except RecordError as exc:
            print(f"{stored.index:>6}  undecodable record: {exc}")
            continue
        if args.window is not None and record.window != args.window:
            continue
        if args.boundary is not None and args.boundary not in (record.sender, record.receiver):
            continue
        if wanted_type is not None and record.payload_type != wanted_type:
            continue
        when = datetime.fromtimestamp(record.time_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        flow = f"{record.sender} -> {record.receiver}"
        print(
            f"{stored.index:>6}  {when:<19}  {record.window:>4}  {record.payload_type.name:<20} "
            f"{'out' if record.direction.value == 'sent' else 'in':<4} {flow:<30} "
            f"{record.payload_size:>10}  {record.payload_sha256.hex()[:12]}  {_details(record)}"
        )
        shown += 1
        if args.limit and shown >= args.limit:
            break
    print(f"{shown} record(s) of {len(entries)}")
    return 0
