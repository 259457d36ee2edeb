"""Installed like a service: the wheel, run from a fresh virtual environment outside the
checkout (`--version`, `init`, `check-config`, `route`), and what deploy/ ships.

Nothing is downloaded: the wheel is built with the setuptools of the project's venv (no
build isolation, no index) and installed without its dependencies; the new venv sees the
project venv's third-party packages through a .pth file, and the test proves that the
`mailrouter` it imports is the wheel's, not the checkout's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from mailrouter.cli import build_parser
from tests.conftest import ESCALATIONS, PROJECT

pytestmark = [pytest.mark.install, pytest.mark.sqlite_only]

UNIT = PROJECT / "deploy" / "mailrouter.service"
ENV_EXAMPLE = PROJECT / "deploy" / "mailrouter.env.example"
EXEC_START = "ExecStart=/opt/mailrouter/bin/mailrouter --config /etc/mailrouter/config.yaml run"
# Not part of the source a wheel is built from (and written to by other runs meanwhile).
NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "var", "build", "dist", "*.egg-info", ".*_cache", ".hypothesis", "__pycache__"
)


@dataclass
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]  # no MAILROUTER_*, no PYTHONPATH: only what the venv itself gives

    @property
    def mailrouter(self) -> Path:
        return self.venv / "bin" / "mailrouter"

    def run(self, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _call(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"


def _clean_env(venv: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MAILROUTER_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.defpath}"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if int(version("setuptools").split(".")[0]) < 77:
        pytest.fail(
            f"setuptools {version('setuptools')} cannot build the wheel (77 or later needed): "
            "`make test` installs the dev extras, which pin it"
        )
    work = tmp_path_factory.mktemp("install")
    # A copy, so the build writes no build/ or egg-info into the checkout, and no file of
    # an earlier build left in build/lib can slip into the wheel.
    source = work / "source"
    shutil.copytree(PROJECT, source, ignore=NOT_SOURCE)
    dist = work / "dist"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")
    _call(
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        dist,
        source,
        cwd=work,
    )
    (wheel,) = dist.glob("mailrouter-*.whl")
    venv = work / "venv"
    _call(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    _call(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=work)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Paths in a .pth are added to sys.path; .pth files inside them are not read, so the
    # checkout's editable-install finder never loads in the new venv.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_project_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    yield Installed(wheel, venv, _clean_env(venv))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    assert not tmp_path.resolve().is_relative_to(PROJECT)
    return tmp_path


def test_wheel_ships_the_repo_defaults_and_the_license(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        shipped = {
            name.removeprefix("mailrouter/defaults/")
            for name in names
            if name.startswith("mailrouter/defaults/") and not name.endswith(".py")
        }
        checkout = {"config.yaml"} | {
            str(path.relative_to(PROJECT))
            for folder in ("providers", "templates")
            for path in (PROJECT / folder).iterdir()
            if path.is_file() and not path.name.startswith(".")
        }
        assert shipped == checkout
        for name in shipped:  # copies of the one source, not a second set that drifts
            assert wheel.read(f"mailrouter/defaults/{name}") == (PROJECT / name).read_bytes()
        (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        assert "License-Expression: MIT" in wheel.read(metadata).decode()
        license_file = metadata.replace("METADATA", "licenses/LICENSE")
        assert wheel.read(license_file) == (PROJECT / "LICENSE").read_bytes()
        migrations = "mailrouter/store/migrations/versions/"
        assert any(name.startswith(migrations) and name.endswith(".py") for name in names)


def test_the_installed_wheel_is_what_runs(installed: Installed, outside: Path) -> None:
    found = installed.run(
        installed.venv / "bin" / "python",
        "-c",
        "import mailrouter, mailrouter.defaults; "
        "print(mailrouter.__file__); print(mailrouter.defaults.source())",
        cwd=outside,
    )
    assert found.returncode == 0, found.stderr
    for line in found.stdout.split():
        assert Path(line).resolve().is_relative_to(installed.venv.resolve()), found.stdout
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    shown = installed.run(installed.mailrouter, "--version", cwd=outside)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"mailrouter {pyproject['project']['version']}"


def test_init_writes_a_config_that_checks_and_routes(installed: Installed, outside: Path) -> None:
    site = outside / "etc-mailrouter"
    first = installed.run(installed.mailrouter, "init", site, cwd=outside)
    assert first.returncode == 0, first.stderr
    config = site / "config.yaml"
    assert f"wrote   {config}" in first.stdout
    assert "skipped" not in first.stdout
    assert f"mailrouter --config {config} check-config" in first.stdout
    assert f"mailrouter --config {config} run" in first.stdout
    assert sorted(p.name for p in (site / "providers").iterdir()) == sorted(
        p.name for p in (PROJECT / "providers").glob("*.yaml")
    )
    assert (site / "templates" / "acknowledgement.j2").is_file()

    checked = installed.run(installed.mailrouter, "--config", config, "check-config", cwd=outside)
    assert checked.returncode == 0, checked.stderr
    assert f"{config}: OK" in checked.stdout

    sample = ESCALATIONS / "01-hibot-basic.eml"
    routed = installed.run(installed.mailrouter, "--config", config, "route", sample, cwd=outside)
    assert routed.returncode == 0, routed.stderr
    assert "Outcome:     route" in routed.stdout
    assert "Destination: HIBOT <soporte@hibot.us>" in routed.stdout
    assert "Dry run: nothing was sent or written." in routed.stdout
    assert not (site / "var").exists()  # a dry run: no database, no outbox

    # Again, over an admin's edits: nothing is replaced, and it says what it left alone.
    edited = config.read_text(encoding="utf-8") + "# edited by the admin\n"
    config.write_text(edited, encoding="utf-8")
    (site / "templates" / "digest.j2").unlink()
    second = installed.run(installed.mailrouter, "init", site, cwd=outside)
    assert second.returncode == 0, second.stderr
    assert f"skipped {config}" in second.stdout
    assert f"wrote   {site / 'templates' / 'digest.j2'}" in second.stdout
    assert config.read_text(encoding="utf-8") == edited

    # The default DIR is the current one.
    here = outside / "here"
    here.mkdir()
    assert installed.run(installed.mailrouter, "init", cwd=here).returncode == 0
    assert (here / "config.yaml").is_file()


def _settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(analyze).exists():
        pytest.fail("systemd-analyze is not installed: `make test` installs systemd (as root)")
    text = UNIT.read_text(encoding="utf-8")
    settings = _settings(text)
    for key, value in {
        "Type": "simple",
        "User": "mailrouter",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/mailrouter/mailrouter.env",
        "StateDirectory": "mailrouter",
        "WorkingDirectory": "/var/lib/mailrouter",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert settings.get(key) == [value], key
    # The command line is one the CLI takes.
    assert text.count(EXEC_START + "\n") == 1
    args = build_parser().parse_args(EXEC_START.split()[1:])
    assert (args.config, args.command) == ("/etc/mailrouter/config.yaml", "run")
    # The one adjustment for verify: ExecStart must name an existing executable, so the copy
    # points at this venv's `mailrouter` (the unit's /opt/mailrouter is where the README
    # installs it). User=mailrouter need not exist for verify.
    here = Path(sys.executable).with_name("mailrouter")
    assert here.exists()
    copy = tmp_path / "mailrouter.service"
    executable = EXEC_START.replace("/opt/mailrouter/bin/mailrouter", str(here))
    copy.write_text(text.replace(EXEC_START, executable), encoding="utf-8")
    done = subprocess.run(
        [analyze, "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    # verify exits 0 on an unknown key or a bad value, only saying so: any line about the
    # unit fails the test.
    assert done.returncode == 0, output
    assert "mailrouter.service" not in output, output


def test_env_example_lists_every_variable_the_config_reads() -> None:
    read = set()
    for path in [PROJECT / "config.yaml", *sorted((PROJECT / "providers").glob("*.yaml"))]:
        read |= set(re.findall(r"\$\{(MAILROUTER_[A-Z0-9_]+)", path.read_text(encoding="utf-8")))
    listed = set(
        re.findall(r"^#?(MAILROUTER_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    )
    assert read, "no ${MAILROUTER_...} in config.yaml and providers/"
    assert read <= listed, f"add to deploy/mailrouter.env.example: {sorted(read - listed)}"
