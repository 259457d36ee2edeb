"""config.yaml and providers/*.yaml: valid as shipped, broken ones named by file:line: field."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest

from mailrouter.cli import main
from mailrouter.config import ConfigError, load_config
from mailrouter.core.checks import template_problems
from mailrouter.service import load_checked
from tests.conftest import PROJECT


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_shipped_config_is_valid() -> None:
    config = load_config(PROJECT / "config.yaml")
    assert set(config.providers) == {"hibot", "panda", "operaciones", "tech"}
    assert config.providers["hibot"].address == "soporte@hibot.us"
    assert config.providers["panda"].address == "soporte_revendedores@clickpanda.com"
    assert config.settings.intake.source == "smtp"
    assert config.settings.intake.listen.port == 2525
    assert config.settings.outbound.transport == "file"
    assert config.database_url == f"sqlite:///{PROJECT / 'var' / 'mailrouter.db'}"
    assert config.outbox_dir == PROJECT / "var" / "outbox"


def test_environment_interpolation(
    write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MR_TEST_PASSWORD", "s3cret")
    monkeypatch.delenv("MR_TEST_UNSET", raising=False)
    path = write_config(
        {
            "intake": {
                "imap": {"password": "${MR_TEST_PASSWORD}", "username": "${MR_TEST_UNSET:-bot}"}
            },
        }
    )
    config = load_config(path)
    assert config.settings.intake.imap.password == "s3cret"
    assert config.settings.intake.imap.username == "bot"


def test_missing_environment_variable_is_named(
    write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MR_TEST_UNSET", raising=False)
    path = write_config({"outbound": {"smtp": {"password": "${MR_TEST_UNSET}"}}})
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:")
    assert "outbound.smtp.password: environment variable ${MR_TEST_UNSET} is not set" in problem


def line_of(path: Path, text: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def test_broken_config_names_file_line_and_field(write_config: Callable[..., Path]) -> None:
    path = write_config(
        {
            "intake": {"listen": {"port": "not-a-port"}},
            "outbound": {"transport": "pigeon"},
        }
    )
    found = problems_of(path)
    assert f"{path}:{line_of(path, 'port: not-a-port')}: intake.listen.port:" in found[0]
    assert any(
        p.startswith(f"{path}:{line_of(path, 'transport: pigeon')}: outbound.transport:")
        for p in found
    )


def test_unknown_provider_in_route(write_config: Callable[..., Path]) -> None:
    path = write_config(
        {
            "routes": [
                {"name": "x", "when": {"subject": "a"}, "to": "nobody"},
                {"name": "d", "to": "hibot"},
            ]
        }
    )
    (problem,) = problems_of(path)
    assert problem.startswith(
        f"{path}:{line_of(path, 'to: nobody')}: routes[0].to: unknown provider"
    )


def test_default_route_must_be_last(write_config: Callable[..., Path]) -> None:
    path = write_config(
        {
            "routes": [
                {"name": "catch-all", "to": "hibot"},
                {"name": "never", "when": {"subject": "x"}, "to": "panda"},
            ]
        }
    )
    found = problems_of(path)
    assert any("routes" in p and "catch-all" in p for p in found)


def test_bad_condition_and_regex(write_config: Callable[..., Path]) -> None:
    path = write_config(
        {
            "routes": [
                {"name": "r", "when": {"subject": "(unclosed"}, "to": "hibot"},
                {"name": "d", "to": "hibot"},
            ]
        }
    )
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:{line_of(path, 'when:')}: routes[0].when: ")
    assert "bad regular expression '(unclosed'" in problem


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("intake:\n  address: a@b.example\n  listen: [unclosed\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4: (syntax): ")  # where the list was left open
    path.write_text("intake:\n  address: a@b.example\n bad: x\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3: (syntax): ")


def test_broken_provider_file_is_named(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    providers = tmp_path / "providers"
    shutil.copytree(PROJECT / "providers", providers)
    (providers / "panda.yaml").write_text(
        "name: PANDA\naddress: not-an-address\nrequired: [cliente]\ntemplate: forward_panda.j2\n"
    )
    path = write_config({"providers_dir": str(providers)})
    found = problems_of(path)
    assert f"{providers / 'panda.yaml'}:2: address:" in found[0]


def test_unknown_required_field_and_missing_template(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    providers = tmp_path / "providers"
    shutil.copytree(PROJECT / "providers", providers)
    (providers / "panda.yaml").write_text(
        "name: PANDA\naddress: a@b.example\nrequired: [cliente, sabor]\ntemplate: nope.j2\n"
    )
    found = problems_of(write_config({"providers_dir": str(providers)}))
    assert any(
        f"{providers / 'panda.yaml'}:3: required[1]: unknown field 'sabor'" in p for p in found
    )
    assert any(f"{providers / 'panda.yaml'}:4: template: no such template" in p for p in found)


def test_unknown_key_is_an_error(write_config: Callable[..., Path]) -> None:
    path = write_config({"intake": {"adress": "typo@example.com"}})
    found = problems_of(path)
    assert any("intake.adress: Extra inputs are not permitted" in p for p in found)


def test_check_config_command(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write_config()), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "4 providers" in out

    broken = write_config({"intake": {"listen": {"port": 99999}}}, name="broken.yaml")
    assert main(["--config", str(broken), "check-config"]) == 1
    err = capsys.readouterr().err
    assert f"{broken}:{line_of(broken, 'port: 99999')}: intake.listen.port:" in err


def test_check_config_warns_while_from_is_believed_as_written(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write_config()), "check-config"]) == 0
    assert "warning: authentication.require is none" in capsys.readouterr().err
    trusted = {"trusted_authserv_ids": ["mx.example.com"], "require": "dmarc"}
    assert main(["--config", str(write_config({"authentication": trusted})), "check-config"]) == 0
    assert "warning" not in capsys.readouterr().err
    exposed = write_config(
        {"authentication": trusted, "intake": {"source": "smtp", "listen": {"host": "0.0.0.0"}}}
    )
    assert main(["--config", str(exposed), "check-config"]) == 0
    assert "the SMTP listener on 0.0.0.0 trusts Authentication-Results" in capsys.readouterr().err


def test_a_requirement_without_a_trusted_host_is_refused(write_config: Callable[..., Path]) -> None:
    path = write_config({"authentication": {"require": "dkim-or-spf"}})
    found = problems_of(path)
    assert any(
        f"{path}:" in p and "authentication: require: dkim-or-spf needs trusted_authserv_ids" in p
        for p in found
    ), found


# --- templates are rendered on a sample case at check time (issue 18, item 8) ----------------


def broken_templates(tmp_path: Path, **changes: tuple[str, str] | None) -> Path:
    """A copy of the shipped templates with `name=(old, new)` replaced (None: removed)."""
    folder = tmp_path / "templates"
    shutil.copytree(PROJECT / "templates", folder)
    for name, change in changes.items():
        path = folder / f"{name}.j2"
        if change is None:
            path.unlink()
            continue
        text = path.read_text(encoding="utf-8")
        assert change[0] in text
        path.write_text(text.replace(change[0], change[1], 1), encoding="utf-8")
    return folder


def template_errors(write_config: Callable[..., Path], folder: Path) -> list[str]:
    path = write_config({"templates_dir": str(folder)})
    load_config(path)  # the files' shape is fine: only the templates are wrong
    with pytest.raises(ConfigError) as caught:
        load_checked(path)
    return [str(p) for p in caught.value.problems]


def test_the_shipped_templates_render_on_a_sample(write_config: Callable[..., Path]) -> None:
    assert template_problems(load_config(write_config())) == []


def test_a_template_syntax_error_is_reported_with_its_line(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    folder = broken_templates(
        tmp_path, acknowledgement=("{{ case.priority }}", "{{ case.priority }")
    )
    (problem,) = template_errors(write_config, folder)
    path = folder / "acknowledgement.j2"
    line = line_of(path, "{{ case.priority }")
    assert problem.startswith(f"{path}:{line}: template: ")


def test_an_unknown_variable_is_reported_with_its_line(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    folder = broken_templates(
        tmp_path,
        undeliverable=("{{ error }}", "{{ eror }}"),
        urgent_alert=("{{ fields.cliente }}", "{{ fields.clinte }}"),
    )
    found = template_errors(write_config, folder)
    assert len(found) == 2, found
    undeliverable, urgent = folder / "undeliverable.j2", folder / "urgent_alert.j2"
    assert any(
        p.startswith(f"{undeliverable}:{line_of(undeliverable, '{{ eror }}')}: template: ")
        and "'eror' is undefined" in p
        for p in found
    ), found
    assert any(
        p.startswith(f"{urgent}:{line_of(urgent, 'fields.clinte')}:") and "clinte" in p
        for p in found
    ), found


def test_templates_are_compiled_once_and_again_when_changed(
    write_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = broken_templates(tmp_path)
    path = write_config({"templates_dir": str(folder)})
    compiled: list[str | None] = []
    compile_ = jinja2.Environment.compile

    def counted(env: jinja2.Environment, source: str, name: str | None = None, *a: Any) -> Any:
        compiled.append(name)
        return compile_(env, source, name, *a)

    monkeypatch.setattr(jinja2.Environment, "compile", counted)
    load_checked(path)
    assert "acknowledgement.j2" in compiled
    compiled.clear()
    load_checked(path)  # a reload of the same files, and the daemon's own renderers
    assert compiled == []
    # Changed in place, as an admin edits a template before a reload: compiled again.
    ack = folder / "acknowledgement.j2"
    ack.write_text(ack.read_text("utf-8").replace("{{ case.priority }}", "{{ case.prio }}", 1))
    (problem,) = template_errors(write_config, folder)
    assert problem.startswith(f"{ack}:") and "prio" in problem
    assert compiled == ["acknowledgement.j2"]


def test_a_missing_template_is_reported(write_config: Callable[..., Path], tmp_path: Path) -> None:
    folder = broken_templates(tmp_path, commands_refused=None)
    assert template_errors(write_config, folder) == [
        f"{folder / 'commands_refused.j2'}:1: template: no such template"
    ]


def test_check_config_exits_1_on_a_broken_template(
    write_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = broken_templates(tmp_path, digest=("{{ digest.subject }}", "{{ digest.subjet }}"))
    path = write_config({"templates_dir": str(folder)})
    assert main(["--config", str(path), "check-config"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'digest.j2'}:1: template:" in err and "subjet" in err
    assert "Traceback" not in err


def test_check_config_warns_of_a_secret_written_in_the_file(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config({"outbound": {"smtp": {"password": "hunter2"}}})
    assert main(["--config", str(path), "check-config"]) == 0
    err = capsys.readouterr().err
    line = line_of(path, "password: hunter2")
    assert f"{path}:{line}: outbound.smtp.password: warning: a secret written in the file" in err
    assert "hunter2" not in err  # nor is it repeated where the output may be pasted
    from_env = write_config({"outbound": {"smtp": {"password": "${SMTP_PASSWORD:-}"}}})
    assert main(["--config", str(from_env), "check-config"]) == 0
    assert "a secret written" not in capsys.readouterr().err


def test_check_config_warns_when_a_vendor_s_replies_would_match_the_agents(
    write_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    providers = tmp_path / "providers"
    shutil.copytree(PROJECT / "providers", providers)
    tech = providers / "tech.yaml"
    tech.write_text(
        "\n".join(line for line in tech.read_text().splitlines() if "senders" not in line)
    )
    assert (
        main(["--config", str(write_config({"providers_dir": str(providers)})), "check-config"])
        == 0
    )
    err = capsys.readouterr().err
    assert "provider tech: its replies are recognised by *@example.com" in err
    assert main(["--config", str(write_config()), "check-config"]) == 0
    assert "provider tech" not in capsys.readouterr().err
