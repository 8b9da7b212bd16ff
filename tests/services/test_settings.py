"""The services' one configuration precedence (defaults < file < ECHELON_* < flags), the
one [service] schema, its error messages, and default ports that meet."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from echelon.tomlconfig import ConfigFileError
from services.boundary_agent.config import AgentConfig
from services.common.settings import (
    AUDIT_LOG,
    BOUNDARY_AGENT,
    COORDINATOR,
    SPECS,
    ServiceConfig,
    ServiceSpec,
    add_arguments,
    resolve,
)

ROOT = Path(__file__).resolve().parents[2]


def _service(
    spec: ServiceSpec, argv: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[ServiceConfig, dict[str, str]]:
    parser = argparse.ArgumentParser(prog=spec.prog)
    add_arguments(parser, spec)
    resolved = resolve(spec, parser.parse_args(argv or []), env or {})
    return resolved.service(), resolved.sources


def _error(spec: ServiceSpec, argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigFileError) as caught:
        _service(spec, argv, env)
    return str(caught.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- precedence ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.prog)
def test_file_overrides_default_env_overrides_file_flag_overrides_env(
    spec: ServiceSpec, tmp_path: Path
) -> None:
    config = _write(tmp_path / "s.toml", "[service]\nport = 1111\nlog_level = 'debug'\n")
    env = {"ECHELON_PORT": "2222"}

    default, _ = _service(spec)
    from_file, sources = _service(spec, ["--config", str(config)])
    from_env, env_sources = _service(spec, ["--config", str(config)], env)
    from_flag, flag_sources = _service(spec, ["--config", str(config), "--port", "3333"], env)

    assert default.port == spec.defaults["port"] and default.log_level == "info"
    assert (from_file.port, sources["service.port"]) == (1111, str(config))
    assert (from_env.port, env_sources["service.port"]) == (2222, "ECHELON_PORT")
    assert (from_flag.port, flag_sources["service.port"]) == (3333, "--port")
    # What a higher layer does not set keeps the lower layer's value.
    assert from_flag.log_level == "debug" and flag_sources["service.log_level"] == str(config)


def test_every_shared_setting_has_one_env_variable_and_one_flag(tmp_path: Path) -> None:
    env = {
        "ECHELON_HOST": "10.0.0.7",
        "ECHELON_METRICS_HOST": "10.0.0.8",
        "ECHELON_METRICS_PORT": "-1",
        "ECHELON_DATA_DIR": str(tmp_path / "state"),
        "ECHELON_LOG_LEVEL": "warning",
        "ECHELON_MAX_WORKERS": "4",
        "ECHELON_GRACE_S": "1.5",
        "ECHELON_AUDIT_LOG": "log.example:1",
        "ECHELON_AUDIT_KEY": "key-text",
        "ECHELON_WITNESS_S": "2",
        "ECHELON_COORDINATOR": "coord.example:2",
    }
    service, _ = _service(BOUNDARY_AGENT, [], env)
    assert service == ServiceConfig(
        host="10.0.0.7",
        port=BOUNDARY_AGENT.defaults["port"],
        metrics_host="10.0.0.8",
        metrics_port=-1,
        data_dir=tmp_path / "state",
        log_level="warning",
        max_workers=4,
        grace_s=1.5,
        audit_log="log.example:1",
        audit_key="key-text",
        witness_s=2.0,
        coordinator="coord.example:2",
    )
    flags, _ = _service(BOUNDARY_AGENT, ["--host", "::", "--grace-s", "0", "--data-dir", "d"])
    assert (flags.host, flags.grace_s, flags.data_dir) == ("::", 0.0, Path("d"))


def test_own_settings_follow_the_same_precedence(tmp_path: Path) -> None:
    config = _write(tmp_path / "a.toml", "[agent]\nboundary = 'org-file'\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, BOUNDARY_AGENT)
    args = parser.parse_args(["--config", str(config)])
    env = {"ECHELON_BOUNDARY": "org-env"}

    from_file = resolve(BOUNDARY_AGENT, args, {})
    from_env = resolve(BOUNDARY_AGENT, args, env)
    args.boundary = "org-flag"
    from_flag = resolve(BOUNDARY_AGENT, args, env)

    built = [
        r.build(AgentConfig, r.tables["agent"], "agent") for r in (from_file, from_env, from_flag)
    ]
    assert [a.boundary for a in built] == ["org-file", "org-env", "org-flag"]


def test_relative_paths_in_the_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "log.vkey").write_text("echelon-audit-log+00+AA==\n")
    config = _write(
        tmp_path / "conf" / "c.toml", "[service]\ndata_dir = 'state'\naudit_key = 'log.vkey'\n"
    )
    monkeypatch.chdir(tmp_path)

    from_file, _ = _service(COORDINATOR, ["--config", str(config)])
    from_flag, _ = _service(COORDINATOR, ["--config", str(config), "--data-dir", "here"])

    assert from_file.data_dir == tmp_path / "conf" / "state"
    assert from_file.audit_key == str(tmp_path / "conf" / "log.vkey")
    assert from_flag.data_dir == Path("here")  # from a flag: the working directory's


def test_a_variable_of_another_service_is_ignored_an_unknown_one_refused() -> None:
    service, sources = _service(AUDIT_LOG, [], {"ECHELON_COORDINATOR": "c:1", "HOME": "/x"})
    assert "service.coordinator" not in sources and service.port == AUDIT_LOG.defaults["port"]

    message = _error(AUDIT_LOG, [], {"ECHELON_MERTICS_PORT": "9000"})
    assert message.startswith("ECHELON_MERTICS_PORT=9000: unknown variable; want one of")
    assert "ECHELON_METRICS_PORT" in message


# -- errors name the key, the value, what was expected and where it came from -------------


def test_a_bad_value_names_key_value_expectation_and_source(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "[service]\nport = 70000\n")
    assert _error(COORDINATOR, ["--config", str(config)]) == (
        f"[service].port: got 70000, want 0..65535 (0 = ephemeral) (in {config})"
    )
    assert _error(COORDINATOR, [], {"ECHELON_PORT": "70000"}) == (
        "[service].port: got 70000, want 0..65535 (0 = ephemeral) (set by ECHELON_PORT=70000)"
    )
    assert _error(COORDINATOR, ["--log-level", "loud"]) == (
        "[service].log_level: got 'loud', want one of debug, info, warning, error"
        " (set by --log-level=loud)"
    )
    assert _error(COORDINATOR, [], {"ECHELON_AUDIT_LOG": "no-port"}) == (
        "[service].audit_log: got 'no-port', want HOST:PORT with a port in 1..65535, "
        "e.g. 10.0.0.5:50051 (set by ECHELON_AUDIT_LOG=no-port)"
    )
    assert _error(COORDINATOR, ["--port", "9000", "--metrics-port", "9000"]).startswith(
        "[service].metrics_port: got 9000, want a port other than port=9000"
    )


def test_a_value_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    assert _error(COORDINATOR, [], {"ECHELON_PORT": "fifty"}) == (
        "ECHELON_PORT='fifty': want an integer ([service].port)"
    )
    config = _write(tmp_path / "c.toml", "[service]\nport = true\n")
    assert _error(COORDINATOR, ["--config", str(config)]) == (
        f"[service].port: got True, want an integer (in {config})"
    )
    config = _write(tmp_path / "c.toml", "[service]\nwitness_s = 'often'\n")
    assert _error(COORDINATOR, ["--config", str(config)]) == (
        f"[service].witness_s: got 'often', want a number (in {config})"
    )


def test_unknown_and_moved_keys_and_tables_are_refused(tmp_path: Path) -> None:
    def error(text: str, spec: ServiceSpec = COORDINATOR) -> str:
        return _error(spec, ["--config", str(_write(tmp_path / "c.toml", text))])

    where = tmp_path / "c.toml"
    assert error("[service]\nprot = 1\n") == (
        f"{where}: [service].prot = 1: not a setting of echelon-coordinator; want one of "
        "audit_key, audit_log, data_dir, grace_s, health_port, host, insecure, kit, log_level, "
        "max_workers, metrics_host, metrics_port, port, root_key, witness_s"
    )
    # [service].coordinator is the agent's: the audit log dials nobody.
    assert "not a setting of echelon-audit-log" in error(
        "[service]\ncoordinator = 'c:1'\n", AUDIT_LOG
    )
    assert error("[agent]\nboundary = 'a'\n") == (
        f"{where}: [agent]: unknown table for echelon-coordinator; want one of [service], "
        "[coordinator], [inner], [window], [outer], [secagg], [staleness], [controller], [stats]"
    )
    assert error("[server]\nport = 1\n") == (
        f"{where}: [server]: unknown table for echelon-coordinator; "
        "moved to [service] (host, port, max_workers, grace_s)"
    )
    assert error("[service]\naudit = 'a:1'\n") == (
        f"{where}: [service].audit moved to [service].audit_log"
    )
    assert error("[agent]\nboundary = 'a'\ncoordinator = 'c:1'\n", BOUNDARY_AGENT) == (
        f"{where}: [agent].coordinator moved to [service].coordinator"
    )


def test_an_unknown_key_of_a_service_table_names_it_and_the_file(tmp_path: Path) -> None:
    from services.global_coordinator.__main__ import load_config

    config = _write(tmp_path / "c.toml", "[window]\ndeadline = 5\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, COORDINATOR)
    resolved = resolve(COORDINATOR, parser.parse_args(["--config", str(config)]), {})
    with pytest.raises(ConfigFileError) as caught:
        load_config(resolved)
    assert str(caught.value) == (
        "[window].deadline = 5: unknown key; want one of buffer_k, deadline_s, inner_steps, "
        f"liveness_s, m_min, min_cohort (in {config})"
    )
    args = parser.parse_args(["--windows", "-1"])
    with pytest.raises(ConfigFileError) as caught:
        load_config(resolve(COORDINATOR, args, {}))
    assert str(caught.value) == (
        "[coordinator]: CoordinatorConfig.windows: got -1, want >= 0 (set by --windows=-1)"
    )


# -- defaults that meet --------------------------------------------------------------------


def test_an_agent_with_default_config_dials_the_default_ports_of_coordinator_and_log() -> None:
    agent, _ = _service(BOUNDARY_AGENT)
    coordinator, _ = _service(COORDINATOR)
    audit_log, _ = _service(AUDIT_LOG)

    assert agent.coordinator == f"127.0.0.1:{coordinator.port}"
    assert agent.audit_log == f"127.0.0.1:{audit_log.port}"
    assert coordinator.audit_log == agent.audit_log
    # The global plane listens on every interface; an agent's endpoints stay on loopback.
    assert coordinator.host == audit_log.host == "0.0.0.0"
    assert agent.host == agent.metrics_host == "127.0.0.1"
    ports = [s.port for s in (agent, coordinator, audit_log)]
    ports += [s.metrics_port for s in (agent, coordinator, audit_log)]
    assert len(set(ports)) == 6 and min(ports) > 1024
    data_dirs = {s.data_dir for s in (agent, coordinator, audit_log)}
    assert len(data_dirs) == 3  # three services started in one directory do not share state


@pytest.mark.parametrize(
    ("module", "config", "expected"),
    [
        ("services.audit_log.__main__", "audit-log.toml", 'origin = "echelon.audit/example"'),
        ("services.global_coordinator.__main__", "coordinator.toml", "windows = 0"),
    ],
)
def test_example_configs_resolve_and_print(
    module: str,
    config: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    monkeypatch.setenv("ECHELON_METRICS_PORT", "9999")
    main = importlib.import_module(module).main
    path = ROOT / "configs" / "services" / config
    assert main(["--config", str(path), "--print-config", "--log-level", "debug"]) == 0
    out = capsys.readouterr().out
    assert expected in out
    assert "metrics_port = 9999" in out and "# ECHELON_METRICS_PORT" in out
    assert 'log_level = "debug"' in out and "# --log-level" in out


def test_the_agent_example_config_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    from services.boundary_agent.__main__ import main

    path = ROOT / "configs" / "services" / "agent.toml"
    assert main(["--config", str(path), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'coordinator = "coordinator.example.org:50051"' in out
    assert 'boundary = "org-a"' in out and 'host = "127.0.0.1"' in out


def test_a_configuration_error_exits_2_with_the_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.audit_log.__main__ import main

    monkeypatch.setenv("ECHELON_METRICS_PORT", "-2")
    assert main(["--print-config"]) == 2
    assert capsys.readouterr().err == (
        "echelon-audit-log: configuration error: [service].metrics_port: got -2, want -1..65535 "
        "(0 = ephemeral, -1 = off) (set by ECHELON_METRICS_PORT=-2)\n"
    )


def test_docs_list_every_setting_with_its_variable_and_flag() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for spec in SPECS:
        for setting in spec.settings:
            assert f"`{setting.env}`" in text, setting.env
            assert f"`{setting.flag}`" in text, setting.flag
