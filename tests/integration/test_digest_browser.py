"""The digest's HTML in a real browser: Debian's chromium, headless, at a phone's width
(360 px) and a desktop's (1280 px). The screenshots stay in var/ (`digest-360.png`,
`digest-1280.png`, of `digest.html`) for a person to look at; the test checks that they
are not blank, that the page never scrolls sideways, and that the rendered text lists the
cases in the digest's order, the most pressing case's tag first, visible without scrolling.

What the browser rendered is read without a debugging protocol: the digest is laid out in
an iframe of the exact width (headless chromium's own window is never under 500 px wide),
a script in the page around it writes what it measured into an attribute, and
`--dump-dom` prints the page.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import replace
from html.parser import HTMLParser
from itertools import accumulate
from operator import add
from pathlib import Path
from typing import Any

import pytest

from mailrouter.core.digests import Digest, build_digests, render_digest
from mailrouter.core.render import Renderer
from tests.unit.test_digest_order import HOUR, NOW, URGENCY, case, config

PROJECT = Path(__file__).resolve().parents[2]
VAR = PROJECT / "var"
PHONE_SCREEN = 640  # px of a 360 px wide phone's screen: what is read before scrolling


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    return binary


@pytest.fixture(scope="module")
def digest() -> Digest:
    """The team's digest of every kind of line, with words too long for a phone's line."""
    cases = [
        *URGENCY,
        case(
            13,
            "ALTA",
            NOW + 50 * HOUR,
            agent="coordinacion.soporte.tecnico.regional.norte@example.com",
            provider="hibot",
            status="undeliverable",
            created=NOW - 2 * HOUR,
        ),
    ]
    client = "Distribuidora Internacional de Productos Farmacéuticos y Veterinarios S.A.S."
    cases[0] = replace(cases[0], status="undeliverable")
    cases[4] = replace(cases[4], provider="hibot", vendor_ticket=None, status="open")
    cases[7] = replace(cases[7], client=client)
    last = {lead.lower(): NOW - 24 * HOUR for lead in config().settings.team.leads}
    (team,) = [d for d in build_digests(cases, config(), NOW, last) if d.for_lead]
    return team


@pytest.fixture(scope="module")
def page(digest: Digest) -> Path:
    """The digest's HTML as it leaves in the mail, in var/ beside its screenshots."""
    cfg = config()
    mail = email.message_from_bytes(
        render_digest(Renderer(cfg), digest, cfg, NOW).data, policy=email.policy.default
    )
    part = mail.get_body(preferencelist=("html",))  # type: ignore[attr-defined]
    assert part is not None
    VAR.mkdir(exist_ok=True)
    path = VAR / "digest.html"
    path.write_text(str(part.get_content()), encoding="utf-8")
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    # A profile and a HOME of its own: chromium writes to both, and must not to root's.
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",  # as root, chromium runs only without its sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(profile)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# Runs in the page around the iframe, once the digest is laid out in it.
PROBE = """
addEventListener("load", () => {
  const doc = document.getElementById("digest").contentDocument;
  const tag = document.body.dataset.tag;
  const walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  let rect = null, visible = false;
  while (walker.nextNode()) {
    const node = walker.currentNode, at = node.data.indexOf(tag);
    if (at < 0) continue;
    const range = doc.createRange();
    range.setStart(node, at);
    range.setEnd(node, at + tag.length);
    const box = range.getBoundingClientRect();
    rect = {left: box.left, right: box.right, top: box.top, bottom: box.bottom};
    visible = node.parentElement.checkVisibility({opacityProperty: true, visibilityProperty: true});
    break;
  }
  document.body.dataset.probe = JSON.stringify({
    text: doc.body.innerText,
    scrollWidth: doc.documentElement.scrollWidth,
    scrollHeight: doc.documentElement.scrollHeight,
    rect: rect,
    visible: visible,
  });
});
"""


def probe(binary: str, profile: Path, page: Path, width: int, tag: str) -> dict[str, Any]:
    """What chromium rendered of `page` at `width` px: its text, its size, and where the
    first `tag` is."""
    frame = html.escape(page.read_text(encoding="utf-8"), quote=True)
    around = profile.parent / f"probe-{width}.html"
    around.write_text(
        f'<!DOCTYPE html><html><body style="margin:0" data-tag="{html.escape(tag)}">'
        f'<iframe id="digest" width="{width}" height="{PHONE_SCREEN}" style="border:0" '
        f'srcdoc="{frame}">'
        f"</iframe><script>{PROBE}</script></body></html>",
        encoding="utf-8",
    )
    dom = run_chromium(binary, profile, "--dump-dom", f"--window-size={width},800", around.as_uri())
    found = _Attribute("body", "data-probe")
    found.feed(dom)
    assert found.value, f"the probe did not run:\n{dom[:2000]}"
    measured: dict[str, Any] = json.loads(found.value)
    return measured


class _Attribute(HTMLParser):
    def __init__(self, element: str, name: str) -> None:
        super().__init__()
        self.element, self.name, self.value = element, name, ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == self.element:
            self.value = dict(attrs).get(self.name) or self.value


def png_colours(data: bytes) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct colours of an 8-bit RGB(A), non-interlaced PNG (what
    chromium writes), decoded with zlib alone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks: dict[bytes, bytes] = {}
    at = 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        chunks[kind] = chunks.get(kind, b"") + data[at + 8 : at + 8 + length]
        at += 12 + length
    width, height, depth, colour_type, _, _, interlaced = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, interlaced) == (8, 0) and colour_type in (2, 6), "an unexpected PNG format"
    step = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(chunks[b"IDAT"]), width * step
    previous, colours = bytes(stride), set[bytes]()
    for row in range(height):
        start = row * (stride + 1)
        line = _unfilter(raw[start], raw[start + 1 : start + 1 + stride], previous, step)
        colours.update(line[x : x + 3] for x in range(0, stride, step))
        previous = line
    return width, height, colours


_BYTE = (255).__and__


def _unfilter(kind: int, line: bytes, previous: bytes, step: int) -> bytes:
    """One scanline without its PNG filter (None, Sub, Up, Average, Paeth); the common
    ones in C-speed builtins, the rest byte by byte."""
    if kind == 0:
        return line
    if kind == 2:
        return bytes(map(_BYTE, map(add, line, previous)))
    out = bytearray(line)
    if kind == 1:
        for channel in range(step):
            out[channel::step] = bytes(map(_BYTE, accumulate(line[channel::step])))
        return bytes(out)
    for x in range(len(out)):
        left = out[x - step] if x >= step else 0
        up, up_left = previous[x], previous[x - step] if x >= step else 0
        if kind == 3:
            out[x] = (out[x] + (left + up) // 2) & 255
            continue
        guess = left + up - up_left
        near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up))
        near = min(near, (abs(guess - up_left), 2, up_left))
        out[x] = (out[x] + near[2]) & 255
    return bytes(out)


def _rgb(hex_colour: str) -> bytes:
    return bytes.fromhex(hex_colour.lstrip("#"))


@pytest.mark.parametrize("width", [360, 1280])
def test_digest_renders_in_a_browser(
    chromium: str, digest: Digest, page: Path, width: int, tmp_path: Path
) -> None:
    lines = [line for group in digest.groups for line in group.lines]
    first = lines[0]
    profile = tmp_path / "profile"
    seen = probe(chromium, profile, page, width, first.tag)

    text: str = seen["text"]
    at = [text.find(line.tag) for line in lines]
    assert -1 not in at and at == sorted(at), "the rendered text has the cases in another order"
    assert seen["visible"], f"{first.tag} is in the page but hidden"
    rect = seen["rect"]
    assert rect["right"] > rect["left"] >= 0 and rect["right"] <= width, rect
    assert rect["bottom"] <= PHONE_SCREEN, f"the first case is below the first screen: {rect}"
    assert seen["scrollWidth"] <= width, "the digest scrolls sideways"
    for flag in ("NO ENTREGADO", "SIN ACUSE DEL PROVEEDOR", "NUEVO"):
        assert flag in text, flag

    screenshot = VAR / f"digest-{width}.png"
    screenshot.unlink(missing_ok=True)
    height = min(seen["scrollHeight"], 8000)
    run_chromium(
        chromium,
        profile,
        f"--screenshot={screenshot}",
        f"--window-size={width},{height}",
        page.as_uri(),
    )
    shot_width, shot_height, colours = png_colours(screenshot.read_bytes())
    assert (shot_width, shot_height) == (width, height)
    assert len(colours) > 1, "the screenshot is blank"
    # The first line's priority bar is painted, in its own colour.
    assert _rgb(first.color) in colours, "the first case's colour is not in the screenshot"
