"""The run declaration: canonical bytes round-trip, the strict parser's refusals, a known answer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from echelon.audit.policy import PayloadAllowList, Policy
from echelon.audit.record import PayloadType, Role
from echelon.controller import SyncControllerConfig
from echelon.declaration import (
    DeclarationError,
    InnerHyper,
    ModelIdentity,
    RunDeclaration,
    SecureAggregationConfig,
)
from echelon.outer import OuterConfig
from echelon.protocol.stats import StatRanges
from echelon.staleness import StalenessConfig, StalenessKind
from echelon.window import WindowConfig
from services.global_coordinator.config import CoordinatorConfig

MODEL = ModelIdentity(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 4096)
NAMED_TYPES = [t for t in PayloadType if t != PayloadType.UNSPECIFIED]


def _floats(
    low: float, high: float, *, exclude_min: bool = False, exclude_max: bool = False
) -> st.SearchStrategy[float]:
    return st.floats(
        low,
        high,
        allow_nan=False,
        allow_infinity=False,
        exclude_min=exclude_min,
        exclude_max=exclude_max,
    )


def _positive(high: float = 1e12) -> st.SearchStrategy[float]:
    return _floats(0.0, high, exclude_min=True)


def _built(cls: Callable[..., Any], **parts: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`cls` from drawn parts; draws that the config itself refuses are discarded."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kwargs = {name: draw(part) for name, part in parts.items()}
        try:
            return cls(**kwargs)
        except ValueError:
            assume(False)

    return build()


@st.composite
def windows(draw: st.DrawFn) -> WindowConfig:
    m_min = draw(st.integers(2, 64))
    return WindowConfig(
        inner_steps=draw(st.integers(1, 10**6)),
        deadline_s=draw(_positive()),
        buffer_k=draw(st.just(0) | st.integers(m_min, 10**4)),
        m_min=m_min,
        min_cohort=draw(st.integers(m_min, 10**4)),
        liveness_s=draw(_positive()),
    )


@st.composite
def controllers(draw: st.DrawFn) -> SyncControllerConfig:
    h = sorted(draw(st.lists(st.integers(1, 10**4), min_size=2, max_size=2)))
    agreement = sorted(draw(st.lists(_floats(0.0, 1.0), min_size=2, max_size=2)))
    cosine = sorted(draw(st.lists(_floats(-1.0, 1.0), min_size=2, max_size=2)))
    mu = sorted(draw(st.lists(_positive(1.0), min_size=2, max_size=2)))
    return SyncControllerConfig(
        h_min=h[0],
        h_max=h[1],
        grow=draw(_floats(1.0, 100.0, exclude_min=True)),
        shrink=draw(_floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
        patience=draw(st.integers(1, 100)),
        drift_high=draw(_positive()),
        agreement_low=agreement[0],
        agreement_high=agreement[1],
        cosine_low=cosine[0],
        cosine_high=cosine[1],
        loss_beta=draw(_floats(0.0, 1.0, exclude_max=True)),
        loss_rise=draw(_floats(0.0, 1e6)),
        adapt_mu=draw(st.booleans()),
        mu_min=mu[0],
        mu_max=mu[1],
    )


def payload_lists() -> st.SearchStrategy[PayloadAllowList]:
    return st.builds(
        PayloadAllowList,
        schema_versions=st.frozensets(st.integers(1, 2**31), min_size=1, max_size=4),
        max_bytes=st.fixed_dictionaries({t: st.integers(0, 2**40) for t in NAMED_TYPES}),
        allowed=st.fixed_dictionaries(
            {role: st.frozensets(st.sampled_from(NAMED_TYPES)) for role in Role}
        ),
    )


def declarations() -> st.SearchStrategy[RunDeclaration]:
    return _built(
        RunDeclaration,
        run_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
        model=st.builds(
            ModelIdentity,
            st.binary(min_size=32, max_size=32),
            st.binary(min_size=32, max_size=32),
            st.binary(min_size=32, max_size=32),
            st.integers(1, 2**40),
        ),
        secagg=_built(
            SecureAggregationConfig,
            level1=st.booleans(),
            level2=st.booleans(),
            threshold_fraction=_floats(0.5, 1.0, exclude_max=True),
            neighbours=st.just(0) | st.integers(2, 1000),
            clip=_positive(4.0),
            frac_bits=st.integers(0, 20),
            max_weight=_positive(16.0),
            k_min=st.integers(1, 1000),
        ),
        payloads=payload_lists(),
        window=windows(),
        staleness=st.builds(
            StalenessConfig,
            kind=st.sampled_from(StalenessKind),
            a=_floats(0.0, 1e6),
            b=st.integers(0, 10**6),
            tau_max=st.integers(0, 10**6),
        ),
        outer=_built(
            OuterConfig,
            lr=_floats(0.0, 10.0, exclude_min=True),
            momentum=_floats(0.0, 1.0, exclude_max=True),
            nesterov=st.booleans(),
        ),
        inner=st.builds(
            InnerHyper,
            lr=_positive(),
            mu=_floats(0.0, 1e6),
            batch_size=st.integers(1, 10**6),
            seq_len=st.integers(2, 10**6),
        ),
        adaptive_h=st.booleans(),
        controller=controllers(),
        delay_aware=st.booleans(),
        rebase_carry=_floats(0.0, 1.0, exclude_min=True),
        buffered=st.booleans(),
        prekey=st.booleans(),
        token_unit=_positive(1e300),
        clip_norm=_positive(),
        stats=_built(
            StatRanges,
            drift=_positive(1e6),
            train_loss=_positive(1e6),
            delta_norm=_positive(1e6),
            tokens=_positive(1e12),
        ),
        round_timeout_s=_positive(1e6),
    )


@settings(max_examples=200, deadline=None)
@given(declarations())
def test_a_declaration_round_trips_through_its_canonical_bytes(decl: RunDeclaration) -> None:
    data = decl.to_canonical_bytes()

    back = RunDeclaration.from_canonical_bytes(data)

    assert back == decl
    assert back.to_canonical_bytes() == data  # re-encoding gives the same bytes
    assert back.digest() == hashlib.sha256(data).digest()
    # canonical by an independent writer: sorted keys, no whitespace, UTF-8
    canonical = json.dumps(
        json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert canonical.encode("utf-8") == data


@given(_positive(1e308) | st.sampled_from([5e-324, 1e16, 1e-5, 0.1, 1 / 3, 2.0**53 + 2]))
def test_floats_survive_the_encoding_bit_for_bit(value: float) -> None:
    decl = RunDeclaration(run_id="r", model=MODEL, token_unit=value)

    back = RunDeclaration.from_canonical_bytes(decl.to_canonical_bytes())

    assert back.token_unit.hex() == value.hex()


# --- the strict parser: every refusal names the field -------------------------------------


def _default_json() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(RunDeclaration(run_id="r", model=MODEL).to_canonical_bytes())
    return obj


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(obj: dict[str, Any]) -> None:
        for key in parents:
            obj = obj[key]
        obj[last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(obj: dict[str, Any]) -> None:
        for key in parents:
            obj = obj[key]
        del obj[last]

    return change


REFUSALS = [
    # (change, path named, words of the message)
    (_set("extra", 1), "declaration.extra", "unknown key"),
    (_set("window.extra", 1), "declaration.window.extra", "unknown key"),
    (_drop("token_unit"), "declaration.token_unit", "missing"),
    (_drop("window.m_min"), "declaration.window.m_min", "missing"),
    (_drop("model.dim"), "declaration.model.dim", "missing"),
    (_set("window.m_min", "x"), "declaration.window.m_min", 'got "x", want an integer'),
    (_set("window.m_min", True), "declaration.window.m_min", "want an integer"),
    (_set("window.m_min", 2.0), "declaration.window.m_min", "want an integer"),
    (_set("window.m_min", 0), "declaration.window.m_min", "got 0, want >= 1"),
    (_set("window.m_min", 1), "declaration.window.m_min", "want >= 2"),
    (_set("secagg.level2", 1), "declaration.secagg.level2", "want true or false"),
    (_set("secagg.k_min", 0), "declaration.secagg.k_min", "want >= 1"),
    (_set("secagg.frac_bits", 31), "declaration.secagg", "frac_bits"),
    (_set("run_id", 7), "declaration.run_id", "want a string"),
    (_set("run_id", "has space"), "declaration.run_id", "want [A-Za-z0-9]"),
    (_set("run_id", "r\n"), "declaration.run_id", "want [A-Za-z0-9]"),
    (_set("model.dim", "ab\n"), "declaration.model.dim", "want an integer"),
    (_set("model.layout_digest", "ab" * 32 + "\n"), "declaration.model.layout_digest", "hex"),
    (_set("outer.lr", 0.7), "declaration.outer.lr", "want a finite float as its shortest"),
    (_set("outer.lr", "0.70"), "declaration.outer.lr", "shortest decimal string"),
    (_set("outer.lr", "7e-1"), "declaration.outer.lr", "shortest decimal string"),
    (_set("outer.lr", "11.0"), "declaration.outer.lr", "want 0 < lr <= 10"),
    (_set("inner.mu", "nan"), "declaration.inner.mu", "finite float"),
    (_set("token_unit", "inf"), "declaration.token_unit", "finite float"),
    (_set("staleness.kind", "linear"), "declaration.staleness.kind", "want one of"),
    (_set("staleness.kind", "POLYNOMIAL"), "declaration.staleness.kind", "want one of"),
    (_set("model.layout_digest", "AB" * 32), "declaration.model.layout_digest", "lowercase hex"),
    (_set("model.layout_digest", "ab" * 31), "declaration.model.layout_digest", "want 32"),
    (_set("model.dim", 0), "declaration.model.dim", "want >= 1"),
    (_set("payloads.allowed.boundary", ["BOGUS"]), "declaration.payloads.allowed.boundary[0]", ""),
    (_set("payloads.allowed.auditor", []), "declaration.payloads.allowed.auditor", "want one of"),
    (_set("payloads.max_bytes.BOGUS", 1), "declaration.payloads.max_bytes.BOGUS", "want one of"),
    (_drop("payloads.max_bytes.RUN_CONFIG"), "declaration.payloads.max_bytes", "RUN_CONFIG"),
    (_set("payloads.schema_versions", 1), "declaration.payloads.schema_versions", "want a list"),
    (_set("payloads.schema_versions", []), "declaration.payloads.schema_versions", "got none"),
    (_set("schema_version", 1), "declaration.schema_version", "got 1, want 3"),
    (_set("schema_version", True), "declaration.schema_version", "got true, want 3"),
    (_set("window", []), "declaration.window", "want an object"),
]


@pytest.mark.parametrize(("change", "path", "words"), REFUSALS)
def test_the_parser_refuses_and_names_the_field(
    change: Callable[[dict[str, Any]], None], path: str, words: str
) -> None:
    obj = _default_json()
    change(obj)

    with pytest.raises(DeclarationError) as caught:
        RunDeclaration.from_canonical_bytes(_canonical(obj))

    assert caught.value.path == path, str(caught.value)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xff", "want canonical JSON"),
        (b"{", "want canonical JSON"),
        (b"[]", "got [], want an object"),
        (b'{"run_id":"a","run_id":"b"}', "twice"),
    ],
)
def test_the_parser_refuses_what_is_not_a_json_object(data: bytes, words: str) -> None:
    with pytest.raises(DeclarationError) as caught:
        RunDeclaration.from_canonical_bytes(data)
    assert caught.value.path == "declaration"
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda obj: json.dumps(obj, sort_keys=True).encode(),  # whitespace
        lambda obj: json.dumps(obj, separators=(",", ":")).encode(),  # keys unsorted
        lambda obj: _canonical(obj) + b"\n",
        lambda obj: _canonical(obj).replace(b'"r"', b'"\\u0072"'),  # an escape not needed
    ],
)
def test_the_parser_refuses_another_encoding_of_a_valid_declaration(
    rewrite: Callable[[dict[str, Any]], bytes],
) -> None:
    obj = _default_json()
    obj = {k: obj[k] for k in reversed(sorted(obj))}

    with pytest.raises(DeclarationError, match="want the canonical one"):
        RunDeclaration.from_canonical_bytes(rewrite(obj))


# --- what parties derive -----------------------------------------------------------------


def test_the_declaration_states_the_policy_once() -> None:
    decl = RunDeclaration(
        run_id="r",
        model=MODEL,
        window=WindowConfig(m_min=3, min_cohort=3),
        secagg=SecureAggregationConfig(level2=False, k_min=5),
    )

    assert decl.policy() == Policy(m_min=3, k_min=5, level1=True, level2=False)
    assert b'"policy"' not in decl.to_canonical_bytes()


def test_the_coordinator_declares_its_own_components() -> None:
    config = CoordinatorConfig(run_id="r", delay_aware=True, window=WindowConfig(inner_steps=3))

    decl = config.declaration(MODEL)

    assert decl.policy() == config.policy()
    assert (decl.window, decl.delay_aware, decl.token_unit) == (config.window, True, 8192.0)
    # Pre-keying is on wherever level 2 is, unless the coordinator's file says otherwise.
    assert CoordinatorConfig().declaration(MODEL) == RunDeclaration(
        run_id="echelon", model=MODEL, prekey=True
    )
    plain = SecureAggregationConfig(level2=False)
    assert not CoordinatorConfig(secagg=plain).declaration(MODEL).prekey
    assert not CoordinatorConfig(prekey=False).declaration(MODEL).prekey


def test_the_default_declaration_has_a_known_digest() -> None:
    # The default declaration with the test model above. Reproduce with:
    #   python -c "from echelon.declaration import *; m = ModelIdentity(bytes([1]) * 32,
    #     bytes([2]) * 32, bytes([3]) * 32, 4096); d = RunDeclaration(run_id='echelon', model=m);
    #     open('d.json', 'wb').write(d.to_canonical_bytes())"  &&  sha256sum d.json
    # A change of this value changes what every party signs: bump DECLARATION_SCHEMA_VERSION
    # (and docs/audit.md, "The run declaration") when the layout changes.
    decl = RunDeclaration(run_id="echelon", model=MODEL)
    data = decl.to_canonical_bytes()

    assert data.startswith(b'{"adaptive_h":false,"buffered":false,"clip_norm":"10.0",')
    assert b'"outer":{"lr":"0.7","momentum":"0.9","nesterov":true}' in data
    assert b'"staleness":{"a":"0.5","b":4,"kind":"polynomial","tau_max":16}' in data
    # (The layout is unchanged since schema 3; the value last changed when the default
    # payload allow-list gained MANIFEST, which the coordinator may send to the log.)
    assert decl.digest().hex() == "cc8103c696eb1cbc011599f383689fd7b54838273e975b5891ec722f979f7b97"
