"""Every option is declared once and validated: bad numbers are usage errors naming the option."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import values
from sidecar.cli import options
from sidecar.cli.main import SUBCOMMANDS, build_parser
from sidecar.config import Config, ConfigError

BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "-1", "0", "abc", "²", ""]
# Past about 31 years, socket and thread timeouts overflow instead of waiting.
BAD_SECONDS = [*BAD_NUMBERS, "1e20"]
BAD_WHOLE_NUMBERS = ["nan", "inf", "-1", "1.5", "1e3", "²", "١٢", "+5", " 7", ""]
BAD_COUNTS = [*BAD_WHOLE_NUMBERS, "0"]


def all_options() -> list[tuple[str, options.Option]]:
    found: list[tuple[str, options.Option]] = []
    for sub in SUBCOMMANDS:
        for group in sub.groups:
            for item in group.options:
                members = item.options if isinstance(item, options.Exclusive) else (item,)
                found.extend((sub.name, option) for option in members)
    return found


def numeric_options() -> list[tuple[str, options.Option, list[str]]]:
    bad = {
        values.seconds: BAD_SECONDS,
        values.positive_number: BAD_NUMBERS,
        values.count: BAD_COUNTS,
        values.whole_number: BAD_WHOLE_NUMBERS,
    }
    return [
        (command, option, bad[option.parse])  # type: ignore[index]
        for command, option in all_options()
        if option.parse in bad
    ]


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def required_args(command: str) -> list[str]:
    return {"call": ["ping"], "run": ["--", "true"]}.get(command, [])


@pytest.mark.parametrize(
    ("command", "option", "bad"),
    numeric_options(),
    ids=lambda v: v.flags[0] if isinstance(v, options.Option) else None,
)
def test_every_numeric_option_refuses_bad_numbers_by_name(
    command: str, option: options.Option, bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for text in bad:
        argv = [command, f"{option.flags[0]}={text}", *required_args(command)]
        if not option.flags[0].startswith("-"):
            continue
        err = usage_error(argv, capsys)
        assert f"argument {option.flags[0]}" in err, (text, err)
        assert "must be" in err, (text, err)


def test_every_numeric_config_field_has_a_validating_option() -> None:
    """An option that sets a number goes through one of the validators, never float()/int()."""
    numeric = {
        f.name for f in dataclasses.fields(Config) if f.type in ("int", "float", "float | None")
    }
    mapped = {o.field: o for _, o in all_options() if o.field is not None}
    for name in numeric & set(mapped):
        assert mapped[name].parse in (values.seconds, values.positive_number, values.count), name
    # Fields set from options the mapping shapes (max_call_timeout via --call-timeout too).
    assert "grace" in mapped and "max_frame" in mapped and "dump_max_bytes" in mapped


def test_each_flag_is_declared_once_per_command() -> None:
    for sub in SUBCOMMANDS:
        flags = [flag for command, o in all_options() if command == sub.name for flag in o.flags]
        assert len(flags) == len(set(flags)), sub.name


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e20, -1.0, 0.0])
def test_config_refuses_bad_seconds_whoever_builds_it(value: float) -> None:
    with pytest.raises(ConfigError, match="grace must be a positive number of seconds"):
        Config(socket_path="/tmp/s.sock", grace=value)


def test_config_is_frozen() -> None:
    config = Config(socket_path="/tmp/s.sock")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grace = 1.0  # type: ignore[misc]


def test_a_bad_environment_value_is_a_usage_error_naming_its_option(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--socket", str(tmp_path / "s.sock")],
        env={"RANKSIDE_LISTEN": "127.0.0.1:http", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "argument --listen" in result.stderr


def test_serve_with_nan_grace_and_infinite_timeout_does_not_start(tmp_path: Path) -> None:
    socket = tmp_path / "s.sock"
    for bad in (["--grace", "nan"], ["--call-timeout", "inf"], ["--max-frame", "²"]):
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--socket", str(socket), *bad],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (bad, result.stderr)
        assert f"argument {bad[0]}" in result.stderr
        assert not socket.exists()


@pytest.mark.parametrize("bad", ["-node", "node a", "<b>", "n" * 254, "nöde"])
def test_node_name_must_be_a_host_or_pod_name(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["serve", "--socket", "/tmp/s.sock", f"--node-name={bad}"], capsys)
    assert "--node-name" in err and "is not a node name" in err
    with pytest.raises(ConfigError, match="is not a node name"):
        Config(socket_path="/tmp/s.sock", node_name=bad)
    assert Config(socket_path="/tmp/s.sock", node_name="train-ddp-worker-0.x").node == (
        "train-ddp-worker-0.x"
    )
