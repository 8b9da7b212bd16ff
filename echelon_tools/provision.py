"""`echelon provision`, `echelon keygen` and `echelon manifest show|verify`: development
federations written as one kit directory per party, an organization's own keys, and the
signed manifest for people to read and check.

This module reads flags and writes files; the manifest, certificates and enrolments are
`echelon.trust`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.record import LOG_PARTY
from echelon.declaration import DeclarationError, ModelIdentity, RunDeclaration
from echelon.trust.enrolment import PartyKeys, PublicEnrolment
from echelon.trust.errors import TrustError
from echelon.trust.kit import (
    AUDIT_KEY,
    CA_CERT,
    IDENTITY_KEY,
    MANIFEST,
    ROOT_PUB,
    TLS_CERT,
    TLS_KEY,
    Kit,
    load_kit,
    make_private_dir,
    write_file,
)
from echelon.trust.manifest import (
    FederationManifest,
    Party,
    PartyRole,
    SignedManifest,
    root_public_bytes,
)
from echelon.trust.pki import (
    DEFAULT_VALIDITY,
    CertificateAuthority,
    certificate_pem,
    ed25519_public_pem,
    key_sha256,
    load_ed25519_private,
    load_ed25519_public,
    private_key_pem,
)
from services.global_coordinator.config import CoordinatorConfig

COORDINATOR = "coordinator"
ROOT_DIR = "root"
ROOT_KEY = "root.key"
CA_KEY = "ca.key"


@dataclass(frozen=True, kw_only=True)
class FederationSpec:
    """What `provision` makes: the parties by id (the id is also the certificate identity),
    the run's declaration, and the public enrolments of parties that keep their own keys."""

    declaration: RunDeclaration
    boundaries: tuple[str, ...]
    auditors: tuple[str, ...] = ()
    enrolments: Mapping[str, PublicEnrolment] = field(default_factory=dict)
    validity: timedelta = DEFAULT_VALIDITY

    def roles(self) -> dict[str, PartyRole]:
        """Party id -> role; raises ValueError for an id given twice or an unknown enrolment."""
        named = [(COORDINATOR, PartyRole.COORDINATOR), (LOG_PARTY, PartyRole.AUDIT_LOG)]
        named += [(b, PartyRole.BOUNDARY) for b in self.boundaries]
        named += [(a, PartyRole.AUDITOR) for a in self.auditors]
        roles: dict[str, PartyRole] = {}
        for party_id, role in named:
            if party_id in roles:
                raise ValueError(f"party {party_id!r}: given twice, want each party once")
            roles[party_id] = role
        for party_id, enrolment in self.enrolments.items():
            if party_id not in roles:
                raise ValueError(
                    f"--public {party_id}: not a party of this federation, want one of "
                    f"{sorted(roles)}"
                )
            if enrolment.party_id != party_id:
                raise ValueError(
                    f"--public {party_id}: the file enrols {enrolment.party_id!r}, want "
                    f"{party_id!r}"
                )
        return roles


def provision(spec: FederationSpec, out: Path, *, now: datetime) -> SignedManifest:
    """Writes the root (root key, CA) to `out/root/` and one kit per party to `out/<id>/`;
    returns the signed manifest. Raises FileExistsError when `out` already holds a
    federation, TrustError or ValueError when a party or enrolment is not valid."""
    if (out / ROOT_DIR).exists():
        raise FileExistsError(f"{out / ROOT_DIR}: exists, want a new --out (never overwrite keys)")
    roles = spec.roles()
    root_key = Ed25519PrivateKey.generate()
    ca = CertificateAuthority.create(f"echelon {spec.declaration.run_id} root", now=now)
    parties: list[Party] = []
    kits: dict[str, dict[str, tuple[bytes, bool]]] = {}
    for party_id, role in roles.items():
        enrolment = spec.enrolments.get(party_id)
        files: dict[str, tuple[bytes, bool]] = {}
        if enrolment is None:
            keys = PartyKeys.generate()
            enrolment = keys.enrolment(party_id, party_id)
            files[TLS_KEY] = (private_key_pem(keys.tls_key), True)
            files[AUDIT_KEY] = (private_key_pem(keys.audit_key), True)
            files[IDENTITY_KEY] = (private_key_pem(keys.identity_key), True)
        request = enrolment.request
        cert = ca.issue(request, identity=party_id, role=role, now=now, validity=spec.validity)
        files[TLS_CERT] = (certificate_pem(cert), False)
        kits[party_id] = files
        parties.append(
            Party(
                party_id=party_id,
                role=role,
                certificate_identity=party_id,
                tls_key_sha256=key_sha256(cert),
                audit_key=enrolment.audit_key,
                identity_key=enrolment.identity_key,
            )
        )
    manifest = FederationManifest(
        version=1,
        root_key=root_public_bytes(root_key),
        parties=tuple(parties),
        declaration=spec.declaration,
    )
    signed = manifest.sign(root_key)
    root_dir = out / ROOT_DIR
    make_private_dir(root_dir)
    write_file(root_dir / ROOT_KEY, private_key_pem(root_key), private=True)
    write_file(root_dir / CA_KEY, private_key_pem(ca.key), private=True)
    root_pub = ed25519_public_pem(manifest.root_key)
    shared = {
        ROOT_PUB: root_pub,
        CA_CERT: certificate_pem(ca.certificate),
        MANIFEST: signed.to_bytes(),
    }
    for name, data in shared.items():
        write_file(root_dir / name, data, private=False)
    for party_id, files in kits.items():
        kit_dir = out / party_id
        make_private_dir(kit_dir)
        for name, data in shared.items():
            write_file(kit_dir / name, data, private=False)
        for name, (data, private) in files.items():
            write_file(kit_dir / name, data, private=private)
    return signed


def rotate(federation: Path, remove: Sequence[str]) -> SignedManifest:
    """Signs the next version of the federation in `federation` (what `provision` wrote)
    without the parties in `remove` (a boundary leaving, a revoked party), and writes it to
    `root/` and to every remaining party's kit; the removed parties' kits keep the old
    version, which the services of the new one refuse. Raises ValueError or TrustError."""
    root_dir = federation / ROOT_DIR
    root_key = load_ed25519_private((root_dir / ROOT_KEY).read_bytes(), ROOT_KEY)
    previous = SignedManifest.from_bytes((root_dir / MANIFEST).read_bytes())
    previous.verify(root_public_bytes(root_key))
    current = previous.manifest
    unknown = sorted(set(remove) - {p.party_id for p in current.parties})
    if unknown:
        raise ValueError(f"--remove: {unknown} are not parties of version {current.version}")
    kept = tuple(p for p in current.parties if p.party_id not in set(remove))
    if any(p.role in (PartyRole.COORDINATOR, PartyRole.AUDIT_LOG) for p in current.parties
           if p.party_id in set(remove)):  # fmt: skip
        raise ValueError("--remove: the coordinator and the audit log cannot leave their run")
    signed = dataclasses.replace(current, version=current.version + 1, parties=kept).sign(root_key)
    signed.check_successor(previous)
    write_file(root_dir / MANIFEST, signed.to_bytes(), private=False)
    for party in kept:
        kit_dir = federation / party.party_id
        if kit_dir.is_dir():
            write_file(kit_dir / MANIFEST, signed.to_bytes(), private=False)
    return signed


KIT_FILES = (TLS_KEY, AUDIT_KEY, IDENTITY_KEY, TLS_CERT, CA_CERT, MANIFEST, ROOT_PUB)


def install_kit(source: Path, target: Path) -> Kit:
    """Copies a kit from where it was delivered (e.g. a Kubernetes Secret volume: read-only,
    its own modes and symlinks) into `target`, a private directory (0700, keys 0600) that
    `load_kit` accepts; returns the loaded kit. Raises KitError when the copy is not a
    consistent kit, OSError when a file is missing."""
    make_private_dir(target)
    for name in KIT_FILES:
        data = (source / name).read_bytes()  # through the Secret's symlinks
        write_file(target / name, data, private=name in (TLS_KEY, AUDIT_KEY, IDENTITY_KEY))
    return load_kit(target)


def main_kit(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echelon kit",
        description="Install a delivered kit into a private directory the services accept.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="copy SOURCE's kit into TARGET (0700, keys 0600)")
    install.add_argument("source", type=Path)
    install.add_argument("target", type=Path)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        kit = install_kit(args.source, args.target)
    except (OSError, TrustError) as exc:
        print(f"echelon kit install: {exc}", file=sys.stderr)
        return 2
    manifest = kit.manifest
    print(
        f"kit {kit.party.party_id} ({kit.party.role}) installed in {args.target}: run "
        f"{manifest.run_id} version {manifest.version}"
    )
    return 0


def keygen(party_id: str, out: Path) -> Path:
    """Generates a party's keys into `out` (0700, keys 0600) and writes the public enrolment
    next to them; returns the enrolment's path. Raises FileExistsError rather than overwrite
    a key, TrustError for a party id that cannot be a certificate identity."""
    make_private_dir(out)
    for name in (TLS_KEY, AUDIT_KEY, IDENTITY_KEY):
        if (out / name).exists():
            raise FileExistsError(f"{out / name}: exists, want a directory without keys")
    keys = PartyKeys.generate()
    enrolment = keys.enrolment(party_id, party_id)
    enrolment.verify()
    write_file(out / TLS_KEY, private_key_pem(keys.tls_key), private=True)
    write_file(out / AUDIT_KEY, private_key_pem(keys.audit_key), private=True)
    write_file(out / IDENTITY_KEY, private_key_pem(keys.identity_key), private=True)
    path = out / f"{party_id}.enrolment.json"
    write_file(path, enrolment.to_bytes(), private=False)
    return path


# --- command lines ------------------------------------------------------------------------


def main_provision(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echelon provision",
        description="Write a development federation: a root key and CA in OUT/root/, one "
        "kit directory per party in OUT/<party>/, and the signed manifest in each.",
    )
    parser.add_argument("--out", type=Path, required=True, help="a new directory")
    parser.add_argument("--run-id", required=True, help="the run's id")
    parser.add_argument("--boundary", action="append", default=[], help="repeatable")
    parser.add_argument("--auditor", action="append", default=[], help="repeatable")
    parser.add_argument(
        "--declaration", type=Path, help="the run declaration (canonical JSON bytes)"
    )
    parser.add_argument(
        "--model",
        help="LAYOUT:BASE:TOKENIZER:DIM (three SHA-256 hex digests and the adapter length): "
        "the declaration is then the default coordinator config's for this model",
    )
    parser.add_argument(
        "--public",
        action="append",
        default=[],
        metavar="PARTY=FILE",
        help="the party's enrolment from `echelon keygen`: its kit gets no private key",
    )
    parser.add_argument("--validity-days", type=int, default=DEFAULT_VALIDITY.days)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        spec = FederationSpec(
            declaration=_declaration(args.run_id, args.declaration, args.model),
            boundaries=tuple(args.boundary),
            auditors=tuple(args.auditor),
            enrolments=_enrolments(args.public),
            validity=timedelta(days=args.validity_days),
        )
        signed = provision(spec, args.out, now=datetime.now(UTC))
    except (OSError, ValueError, TrustError) as exc:
        print(f"echelon provision: {exc}", file=sys.stderr)
        return 2
    digest = hashlib.sha256(signed.to_bytes()).hexdigest()
    print(f"manifest: run {signed.run_id} version {signed.version} sha256 {digest}")
    print(f"root: {args.out / ROOT_DIR} ({ROOT_KEY} and {CA_KEY}: keep them offline)")
    for party in signed.manifest.parties:
        own = " (enrolled: holds no private key)" if party.party_id in spec.enrolments else ""
        print(f"kit {party.party_id}: {args.out / party.party_id} [{party.role}]{own}")
    return 0


def main_keygen(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echelon keygen",
        description="Generate a party's private keys locally and write the public enrolment "
        "(certificate request and public keys) to send to the provisioner.",
    )
    parser.add_argument("--party", required=True, help="the party's id, e.g. org-a")
    parser.add_argument("--out", type=Path, required=True, help="where the keys stay")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        path = keygen(args.party, args.out)
    except (OSError, ValueError, TrustError) as exc:
        print(f"echelon keygen: {exc}", file=sys.stderr)
        return 2
    print(f"keys: {args.out} ({TLS_KEY}, {AUDIT_KEY}, {IDENTITY_KEY}: they stay here)")
    print(f"send: {path}")
    return 0


def main_manifest(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echelon manifest", description="Show or verify a signed federation manifest."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a manifest (its signature is not checked)")
    show.add_argument("manifest", type=Path, help="manifest.json or a kit directory")
    show.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    verify = sub.add_parser("verify", help="verify a manifest against a root; exit 1 if not")
    verify.add_argument("manifest", type=Path, help="manifest.json or a kit directory")
    verify.add_argument("--root", type=Path, required=True, help="the root's root.pub")
    verify.add_argument("--previous", type=Path, help="the version it replaces")
    rotate_cmd = sub.add_parser(
        "rotate",
        help="sign the next version of a development federation (a party leaving or "
        "revoked) into its root/ and the remaining parties' kits",
    )
    rotate_cmd.add_argument("federation", type=Path, help="what `echelon provision --out` wrote")
    rotate_cmd.add_argument(
        "--remove", action="append", default=[], metavar="PARTY", help="repeatable"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "rotate":
        try:
            signed = rotate(args.federation, args.remove)
        except (OSError, ValueError, TrustError) as exc:
            print(f"echelon manifest rotate: {exc}", file=sys.stderr)
            return 2
        digest = hashlib.sha256(signed.to_bytes()).hexdigest()
        print(f"manifest: run {signed.run_id} version {signed.version} sha256 {digest}")
        print("parties: " + ", ".join(p.party_id for p in signed.manifest.parties))
        return 0
    try:
        signed = _read_manifest(args.manifest)
        if args.command == "show":
            print(_show_json(signed) if args.json else _show(signed))
            return 0
        root = load_ed25519_public(args.root.read_bytes(), str(args.root))
        previous = _read_manifest(args.previous) if args.previous else None
    except (OSError, ValueError, TrustError) as exc:
        print(f"echelon manifest {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        if previous is not None:
            previous.verify(root)
            signed.check_successor(previous)
        else:
            signed.verify(root)
    except TrustError as exc:
        print(f"echelon manifest verify: refused: {exc}", file=sys.stderr)
        return 1
    succeeds = f", succeeds version {previous.version}" if previous else ""
    print(
        f"ok: run {signed.run_id} version {signed.version}, signed by root "
        f"{root.hex()[:16]}...{succeeds}"
    )
    return 0


def _declaration(run_id: str, path: Path | None, model: str | None) -> RunDeclaration:
    if path is not None and model is not None:
        raise ValueError("--declaration and --model: got both, want one")
    if path is not None:
        declaration = RunDeclaration.from_canonical_bytes(path.read_bytes())
        if declaration.run_id != run_id:
            raise ValueError(
                f"--declaration: its run id is {declaration.run_id!r}, want {run_id!r}"
            )
        return declaration
    if model is None:
        raise ValueError(
            "got neither --declaration nor --model, want one (the manifest carries the "
            "model's identity by digest)"
        )
    identity = parse_model(model, "--model")
    try:
        return CoordinatorConfig(run_id=run_id).declaration(identity)
    except DeclarationError as exc:
        raise ValueError(f"--run-id: {exc}") from None


def parse_model(text: str, what: str) -> ModelIdentity:
    """A model identity as `echelon-boundary-agent --print-model` prints it and `--model`
    takes it: LAYOUT:BASE:TOKENIZER:DIM. Raises ValueError naming `what`."""
    parts = text.strip().split(":")
    if len(parts) != 4:
        raise ValueError(f"{what}: got {text!r}, want LAYOUT:BASE:TOKENIZER:DIM")
    try:
        digests = [bytes.fromhex(p) for p in parts[:3]]
        return ModelIdentity(digests[0], digests[1], digests[2], int(parts[3]))
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}; want three 64-digit hex digests and an int") from None


def agent_model(agent_config: Path, *, timeout_s: float = 300.0) -> ModelIdentity:
    """The model identity a boundary agent computes from `agent_config` (its base model,
    adapter layout and tokenizer), by running `--print-model` with no ECHELON_* variables.
    Raises RuntimeError with the agent's error output when it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHELON_")}
    command = [sys.executable, "-m", "services.boundary_agent", "--config", str(agent_config)]
    try:
        done = subprocess.run(
            [*command, "--print-model"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{agent_config}: --print-model took over {timeout_s:.0f}s") from None
    if done.returncode != 0:
        raise RuntimeError(
            f"{agent_config}: --print-model exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    lines = done.stdout.strip().splitlines()
    try:
        return parse_model(lines[-1] if lines else "", f"{agent_config} --print-model")
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None


def coordinator_declaration(coordinator_config: Path, model: ModelIdentity) -> RunDeclaration:
    """The run declaration a coordinator started with `coordinator_config` (and no ECHELON_*
    variables) runs for `model`: what the manifest it runs under must carry."""
    from services.common.settings import COORDINATOR, add_arguments, resolve
    from services.global_coordinator.__main__ import load_config

    parser = argparse.ArgumentParser()
    add_arguments(parser, COORDINATOR)
    args = parser.parse_args(["--config", str(coordinator_config)])
    return load_config(resolve(COORDINATOR, args, {})).declaration(model)


def _enrolments(values: Sequence[str]) -> dict[str, PublicEnrolment]:
    out: dict[str, PublicEnrolment] = {}
    for value in values:
        party_id, sep, path = value.partition("=")
        if not sep or not party_id or not path:
            raise ValueError(f"--public: got {value!r}, want PARTY=FILE")
        out[party_id] = PublicEnrolment.from_bytes(Path(path).read_bytes())
    return out


def _read_manifest(path: Path) -> SignedManifest:
    file = path / MANIFEST if path.is_dir() else path
    return SignedManifest.from_bytes(file.read_bytes())


def _show(signed: SignedManifest) -> str:
    m = signed.manifest
    d = m.declaration
    lines = [
        f"run {m.run_id}, manifest version {m.version} (schema {m.schema_version})",
        f"root key   {m.root_key.hex()}",
        "signature  not checked here: echelon manifest verify --root ROOT_PUB MANIFEST",
        f"declaration sha256 {d.digest().hex()}",
        f"  model      layout {d.model.layout_digest.hex()[:16]}... base "
        f"{d.model.base_model_digest.hex()[:16]}... tokenizer "
        f"{d.model.tokenizer_digest.hex()[:16]}... dim {d.model.dim}",
        f"  secagg     level1 {d.secagg.level1} level2 {d.secagg.level2} threshold "
        f"{d.secagg.threshold_fraction} degree {d.secagg.neighbours or 'auto'} frac_bits "
        f"{d.secagg.frac_bits} clip {d.secagg.clip}",
        f"  cohorts    m_min {d.window.m_min} k_min {d.secagg.k_min}",
        f"parties ({len(m.parties)}):",
        f"  {'id':<14} {'role':<12} {'certificate':<14} {'tls key sha256':<18} "
        f"{'audit key':<18} identity key",
    ]
    for p in m.parties:
        lines.append(
            f"  {p.party_id:<14} {p.role:<12} {p.certificate_identity:<14} "
            f"{p.tls_key_sha256.hex()[:16]:<18} {p.audit_key.hex()[:16]:<18} "
            f"{p.identity_key.hex()[:16]}"
        )
    return "\n".join(lines)


def _show_json(signed: SignedManifest) -> str:
    return json.dumps(json.loads(signed.to_bytes()), indent=2, sort_keys=True)
