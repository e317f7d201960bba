"""deploy/ingest.example.toml documents every setting, with its default value."""

from __future__ import annotations

import dataclasses
import tomllib

from conftest import REPO

from ingest_core.settings import Settings, load_settings

EXAMPLE = REPO / "deploy" / "ingest.example.toml"


def test_example_config_loads_and_lists_every_setting_with_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = Settings()
    load_settings(EXAMPLE)  # every value in it is valid
    for f in dataclasses.fields(Settings):
        if f.name == "source":
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            table = raw.get(f.name)
            assert isinstance(table, dict), f"[{f.name}] missing from the example"
            for g in dataclasses.fields(value):
                assert g.name in table, f"{f.name}.{g.name} missing from the example"
                assert table[g.name] == getattr(value, g.name) or g.name == "host_key_dir", (
                    f"{f.name}.{g.name}: example says {table[g.name]!r}, "
                    f"default is {getattr(value, g.name)!r}"
                )
        else:
            assert f.name in raw, f"{f.name} missing from the example"
