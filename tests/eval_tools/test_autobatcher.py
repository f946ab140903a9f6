"""autobatcher (pinned, its own venv) in its default mode, OpenAI flex: every call is a `background: true,
service_tier: "flex"` Responses call, polled with GET /v1/responses/{id} until it is done (issue 21)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from tests.eval_tools.conftest import MODEL, OFFLINE, tool_venv
from tests.support.processes import Server, child_env

SCRIPT = Path(__file__).with_name("autobatcher_flex.py")
COUNT = 20


def test_autobatcher_flex_gets_every_answer_through_background_responses(server: Server, tmp_path: Path) -> None:
    python = tool_venv(".venv-autobatcher", "python")

    run = subprocess.run(
        [str(python), str(SCRIPT), f"{server.base_url}/v1", MODEL, str(COUNT)],
        cwd=tmp_path, env=child_env(**OFFLINE), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert 0 == run.returncode, run.stdout[-5_000:] + run.stderr[-10_000:]
    assert ["This is a fake reply to 4 words."] * COUNT == json.loads(run.stdout.strip().splitlines()[-1])
    # Background calls are one-line batches of their own: none shows among the batches.
    assert [] == httpx.get(f"{server.base_url}/v1/batches", timeout=10).json()["data"]
