"""Times as the team reads them: the memo of written times never changes what is written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from babel.dates import format_date, format_time

from mailrouter.config import Config, load_config
from mailrouter.core.render import local_time
from tests.conftest import PROJECT


def _config(folder: Path, timezone: str, locale: str) -> Config:
    data = yaml.safe_load((PROJECT / "config.yaml").read_text("utf-8"))
    data |= {"timezone": timezone, "locale": locale}
    data |= {
        "providers_dir": str(PROJECT / "providers"),
        "templates_dir": str(PROJECT / "templates"),
    }
    path = folder / f"{timezone.replace('/', '-')}-{locale}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")
    return load_config(path)


def _babel(moment: datetime, config: Config) -> str:
    zone, locale = config.calendar().zone, config.settings.locale
    day = format_date(moment.astimezone(zone), format="full", locale=locale)
    return f"{day}, {format_time(moment, format='short', tzinfo=zone, locale=locale)}"


@pytest.mark.parametrize(
    ("timezone", "locale"),
    [("America/Bogota", "es_CO"), ("Europe/Madrid", "es_ES"), ("America/New_York", "en_US")],
)
def test_a_moment_is_written_as_babel_writes_it_in_each_zone(
    tmp_path: Path, timezone: str, locale: str
) -> None:
    config = _config(tmp_path, timezone, locale)
    # Every 97 minutes and 11 seconds over a year: both DST changes of the zones that have them.
    start = datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC)
    for step in range(0, 365 * 24 * 60, 97):
        moment = start + timedelta(minutes=step, seconds=11 * step)
        assert local_time(moment, config) == _babel(moment, config), moment


def test_one_instant_is_written_in_the_zone_of_each_configuration(tmp_path: Path) -> None:
    moment = datetime(2026, 11, 17, 19, 5, tzinfo=UTC)
    bogota = _config(tmp_path, "America/Bogota", "es_CO")
    madrid = _config(tmp_path, "Europe/Madrid", "es_CO")
    assert local_time(moment, bogota) != local_time(moment, madrid)
    assert local_time(moment, madrid) == _babel(moment, madrid)
