"""[server] algorithm_profile and [limits] connection_rate_per_address / connection_burst."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest_core.errors import ConfigError
from ingest_core.settings import (
    DEFAULT_CIPHERS,
    DEFAULT_HOST_KEY_ALGS,
    DEFAULT_KEX,
    DEFAULT_MACS,
    Settings,
    load_settings,
)


def settings_from(tmp_path: Path, text: str) -> Settings:
    conf = tmp_path / "ingest.toml"
    conf.write_text(text)
    return load_settings(conf)


def test_compatible_profile_keeps_what_libssh2_needs(tmp_path: Path) -> None:
    s = settings_from(tmp_path, "")
    assert s.server.algorithm_profile == "compatible"
    assert "hmac-sha2-256" in s.server.mac_algs  # libssh2 1.10 has no ETM MAC, no AEAD
    assert "curve25519-sha256" in s.server.kex_algs
    assert "curve25519-sha256@libssh.org" not in s.server.kex_algs  # the same, a 3rd warning
    assert s.server.mac_algs == DEFAULT_MACS


def test_strict_profile_drops_plain_hmac_from_default_lists(tmp_path: Path) -> None:
    s = settings_from(tmp_path, '[server]\nalgorithm_profile = "strict"\n')
    assert "hmac-sha2-256" not in s.server.mac_algs
    assert s.server.mac_algs == [m for m in DEFAULT_MACS if m != "hmac-sha2-256"]
    assert s.server.kex_algs == DEFAULT_KEX
    assert s.server.encryption_algs == DEFAULT_CIPHERS
    assert s.server.host_key_algs == DEFAULT_HOST_KEY_ALGS


def test_strict_profile_applies_to_lists_copied_from_the_example(tmp_path: Path) -> None:
    macs = ", ".join(f'"{m}"' for m in DEFAULT_MACS)
    s = settings_from(tmp_path, f'[server]\nalgorithm_profile = "strict"\nmac_algs = [{macs}]\n')
    assert "hmac-sha2-256" not in s.server.mac_algs


def test_a_list_written_differently_is_used_as_written(tmp_path: Path) -> None:
    s = settings_from(
        tmp_path,
        '[server]\nalgorithm_profile = "strict"\n'
        'mac_algs = ["hmac-sha2-256", "hmac-sha2-256-etm@openssh.com"]\n',
    )
    assert s.server.mac_algs == ["hmac-sha2-256", "hmac-sha2-256-etm@openssh.com"]


def test_rate_defaults_and_zero_turns_it_off(tmp_path: Path) -> None:
    s = settings_from(tmp_path, "")
    assert (s.limits.connection_rate_per_address, s.limits.connection_burst) == (10.0, 10)
    off = settings_from(
        tmp_path, "[limits]\nconnection_rate_per_address = 0\nconnection_burst = 0\n"
    )
    assert off.limits.connection_rate_per_address == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[server]\nalgorithm_profile = "paranoid"\n',
            'server.algorithm_profile: expected "compatible" (works with curl/libssh2 1.10) or '
            '"strict"',
        ),
        (
            "[limits]\nconnection_rate_per_address = inf\n",
            "limits.connection_rate_per_address: expected new connections per second",
        ),
        (
            "[limits]\nconnection_rate_per_address = nan\n",
            "limits.connection_rate_per_address: expected new connections per second",
        ),
        (
            "[limits]\nconnection_rate_per_address = -1\n",
            "limits.connection_rate_per_address: expected a number >= 0",
        ),
        ("[limits]\nconnection_burst = 0\n", "limits.connection_burst: expected at least 1"),
    ],
)
def test_bad_values_are_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from(tmp_path, text)
    assert expected in str(info.value)
