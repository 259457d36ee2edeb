"""Templates compiled once: in the process, and in the state folder for the next process
(a restarted daemon, each command). A template whose text changed is compiled again; a
folder that cannot be used, or a file in it that cannot be read, costs only the time."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jinja2 import Environment

from mailrouter.config import load_config
from mailrouter.core import render
from mailrouter.core.checks import template_problems
from mailrouter.core.render import COMPILED_TEMPLATES_FOLDER, Renderer
from tests.conftest import PROJECT


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the templates compiled from now on."""
    names: list[str] = []
    original = Environment.compile

    def counting(self: Environment, source: Any, name: str | None = None, *args: Any) -> Any:
        names.append(str(name))
        return original(self, source, name, *args)

    monkeypatch.setattr(Environment, "compile", counting)
    return names


def a_new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new process starts with: nothing compiled in memory."""
    monkeypatch.setattr(render, "_CODE", {})
    monkeypatch.setattr(render, "_COMPILED", {})


@pytest.fixture
def renderer_of(write_config: Callable[..., Path], tmp_path: Path) -> Callable[..., Renderer]:
    """A renderer of the shipped configuration with its templates in `templates` and its
    state in tmp_path/state."""

    def make(templates: Path = PROJECT / "templates") -> Renderer:
        overrides = {"templates_dir": str(templates), "state_dir": str(tmp_path / "state")}
        return Renderer(load_config(write_config(overrides)))

    return make


def test_the_next_process_reads_the_compiled_templates_from_the_state_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compiled: list[str],
    renderer_of: Callable[..., Renderer],
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(PROJECT / "templates", templates)
    (tmp_path / "state").mkdir()
    count = len(list(templates.glob("*.j2")))
    a_new_process(monkeypatch)
    renderer_of(templates).load_all()
    assert len(compiled) == count
    assert (tmp_path / "state" / COMPILED_TEMPLATES_FOLDER).stat().st_mode & 0o777 == 0o700
    renderer_of(templates).load_all()  # the same process: from memory
    assert len(compiled) == count
    a_new_process(monkeypatch)
    renderer_of(templates).load_all()  # a new process: from disk
    assert len(compiled) == count
    ack = templates / "acknowledgement.j2"
    ack.write_text(ack.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    a_new_process(monkeypatch)
    renderer_of(templates).load_all()
    assert compiled[count:] == ["acknowledgement.j2"]


def test_an_unreadable_compiled_template_is_compiled_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compiled: list[str],
    renderer_of: Callable[..., Renderer],
) -> None:
    (tmp_path / "state").mkdir()
    a_new_process(monkeypatch)
    renderer_of().load_all()
    first = len(compiled)
    files = sorted((tmp_path / "state" / COMPILED_TEMPLATES_FOLDER).iterdir())
    for kept in files[1:]:  # cut short after its header, as a full disk might
        data = kept.read_bytes()
        kept.write_bytes(data[: len(data) // 2])
    # One that cannot even be opened (ENXIO): a socket where the file was.
    files[0].unlink()
    monkeypatch.chdir(files[0].parent)  # a socket's path is limited to 108 bytes
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(files[0].name)
        a_new_process(monkeypatch)
        renderer_of().load_all()
    assert len(compiled) == 2 * first
    assert template_problems(renderer_of().config) == []


def test_a_configuration_without_a_state_folder_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compiled: list[str],
    renderer_of: Callable[..., Renderer],
) -> None:
    """Checking a new configuration (no daemon has run with it) leaves no folder behind."""
    a_new_process(monkeypatch)
    renderer_of().load_all()
    assert compiled
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("how", ["a file", "others may write", "a link"])
def test_a_folder_that_cannot_be_used_costs_only_the_compilation(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compiled: list[str],
    renderer_of: Callable[..., Renderer],
    how: str,
) -> None:
    """What is read there runs as code: only a folder of the router's user alone. Any
    other (a file in its place, a folder others may write in, a link) is left as it is."""
    (tmp_path / "state").mkdir()
    folder = tmp_path / "state" / COMPILED_TEMPLATES_FOLDER
    target = tmp_path / "elsewhere"
    target.mkdir()
    if how == "a file":
        folder.write_text("not a folder")
    elif how == "a link":
        folder.symlink_to(target)
    else:
        folder.mkdir()
        folder.chmod(0o777)
        target = folder
    a_new_process(monkeypatch)
    renderer_of().load_all()
    assert compiled
    assert list(target.iterdir()) == []
    assert template_problems(renderer_of().config) == []
