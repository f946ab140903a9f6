"""Config mistakes through the real `backfill` command: the file, the key and the fix, and nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.support.processes import free_port

BAD_CONFIG = """\
prot = 8080
[[backends]]
name = "gpu-a"
urll = "http://127.0.0.1:8000"
models = ["m"]
"""


def backfill(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if not key.upper().startswith("BACKFILL_")}
    return subprocess.run(
        [sys.executable, "-m", "backfill", *args],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_serve_with_typos_in_the_config_names_each_with_its_fix_and_does_not_start(tmp_path: Path) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text(BAD_CONFIG)

    done = backfill("serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))

    assert 1 == done.returncode
    assert f"{config}: unknown key 'prot'; did you mean 'port'?" in done.stderr
    assert f"{config}: unknown key 'backends[0].urll'; did you mean 'url'?" in done.stderr
    assert "Traceback" not in done.stderr
    assert "pydantic" not in done.stderr


def test_a_misspelt_variable_is_a_warning_and_the_command_still_runs(tmp_path: Path) -> None:
    done = backfill("migrate", "--data-dir", str(tmp_path / "data"), env={"BACKFILL_MAX_LINE": "10"})

    assert 0 == done.returncode
    assert "database is up to date" in done.stdout
    assert "warning: environment variable BACKFILL_MAX_LINE is not a backfill setting" in done.stderr
    assert "did you mean BACKFILL_MAX_LINES?" in done.stderr


def test_serve_says_where_and_what_it_serves_logs_only_json_and_a_taken_port_is_one_clear_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text('[[backends]]\nname = "gpu-a"\nurl = "http://127.0.0.1:9"\nmodels = ["m1", "m0"]\n')
    port = free_port()
    environ = {key: value for key, value in os.environ.items() if not key.upper().startswith("BACKFILL_")}
    command = [sys.executable, "-m", "backfill", "serve", "--port", str(port), "--config", str(config)]
    first = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path / "one")],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert first.stdout is not None
        lines = []
        for line in first.stdout:  # until the banner: every line before it is JSON too
            lines.append(orjson.loads(line))
            if lines[-1]["event"] == "backfill.started":
                break
        banner = lines[-1]

        taken = backfill("serve", "--port", str(port), "--config", str(config), "--data-dir", str(tmp_path / "two"))
    finally:
        first.terminate()
        rest, _ = first.communicate(timeout=60)

    assert f"http://127.0.0.1:{port}" == banner["url"]
    assert ["gpu-a: m0, m1"] == banner["backends"]
    assert banner["access"].startswith("open mode")
    assert all(orjson.loads(line)["event"] for line in rest.splitlines())
    assert 1 == taken.returncode
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in taken.stderr
    assert "Traceback" not in taken.stderr
