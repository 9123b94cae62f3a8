"""Hub endpoints that refuse, stall or can never succeed: `selfpatch-push` answers in one line and the background
uploader neither retries what cannot work nor waits forever (loopback sockets only, bounded in time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hub_server import closed_port
from safetensors.numpy import save as safetensors_save

from selfpatch_hf.hub.cli import main as push_main
from selfpatch_hf.hub.request_limits import bound_hub_requests, is_permanent_error, unbound_hub_requests
from selfpatch_hf.hub.uploads import AsyncHubUploader

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _default_hub_client():
    yield
    unbound_hub_requests()  # bound_hub_requests changes the process-wide client


# a readable safetensors file of finite weights: what the push checks before the network
WEIGHTS = safetensors_save({"weight": np.zeros(2, np.float32)})


def _backbone_folder(path: Path) -> Path:
    """The files `check_backbone_folder` asks for, with weights the push can read (nothing else is looked at
    before the network)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "vit"}')
    (path / "model.safetensors").write_bytes(WEIGHTS)
    (path / "preprocessor_config.json").write_text("{}")
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err  # no traceback, no retry chatter
    return lines[0]


# ------------------------------------------------------------------------------------------------- selfpatch-push
def test_push_refuses_an_invalid_repo_id_before_any_request(tmp_path, hub_server, capsys):
    folder = _backbone_folder(tmp_path / "backbone")
    argv = [str(folder), "not a/valid/id", "--endpoint", hub_server.endpoint, "--token", hub_server.token]
    assert push_main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("selfpatch-push: error: REPO_ID 'not a/valid/id' is not a valid Hub repository id")
    assert "namespace/name" in line
    assert hub_server.requests == []
    assert (
        push_main([str(folder), "me/ok", "--pretraining-repo-id", "a//b", "--endpoint", hub_server.endpoint])
        == 2
    )
    assert "--pretraining-repo-id 'a//b'" in capsys.readouterr().err
    assert hub_server.requests == []


def test_push_to_a_refused_connection_is_one_line(tmp_path, capsys):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: F401 -- import outside the clock

    folder = _backbone_folder(tmp_path / "backbone")
    (folder / "README.md").write_text(
        '---\nlicense: apache-2.0\n---\n# card\n\nmodel_id = "<repo-id-or-local-folder>"\n'
    )
    before = _files(tmp_path)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    assert push_main([str(folder), "me/model", "--endpoint", endpoint, "--token", "hf_x"]) == 1
    assert time.monotonic() - started < 30  # no retries with back-off
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"selfpatch-push: error: publishing {folder} to me/model failed: ")
    assert f"cannot connect to the Hub at {endpoint}" in line
    assert _files(tmp_path) == before  # the card was not rewritten, no snapshot is left behind


def test_push_to_a_silent_server_gives_up_after_its_timeout(tmp_path, stalled_hub_endpoint, capsys):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: F401 -- import outside the clock

    folder = _backbone_folder(tmp_path / "backbone")
    started = time.monotonic()
    argv = [str(folder), "me/model", "--endpoint", stalled_hub_endpoint, "--token", "hf_x", "--timeout", "1"]
    assert push_main(argv) == 1
    assert time.monotonic() - started < 30
    line = _one_error_line(capsys.readouterr().err)
    assert f"the Hub at {stalled_hub_endpoint} stopped answering (no data within 1 s)" in line


def test_push_as_a_program_hangs_never(tmp_path, stalled_hub_endpoint):
    folder = _backbone_folder(tmp_path / "backbone")
    done = subprocess.run(
        [sys.executable, "-m", "selfpatch_hf.hub", str(folder), "me/model", "--timeout", "1"],
        env={
            **os.environ,
            "HF_ENDPOINT": stalled_hub_endpoint,
            "HF_TOKEN": "hf_x",
            "HF_HOME": str(tmp_path / "hf"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "stopped answering" in _one_error_line(done.stderr)


KILLED_WHILE_UPLOADING = """
import os, signal, sys
from pathlib import Path
from selfpatch_hf.hub.publishing import _upload_snapshot

with _upload_snapshot(Path(sys.argv[1]), "card being uploaded"):
    os.kill(os.getpid(), signal.SIGKILL)  # as a scheduler's kill -9 in the middle of the upload
"""


def test_the_snapshot_of_a_killed_push_is_removed_by_the_next_push(tmp_path, capsys):
    folder = _backbone_folder(tmp_path / "backbone")
    before = _files(folder)
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_UPLOADING, str(folder)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left = [path.name for path in tmp_path.glob(".backbone.tmp-*")]
    assert len(left) == 1, sorted(p.name for p in tmp_path.iterdir())
    endpoint = f"http://127.0.0.1:{closed_port()}"
    assert push_main([str(folder), "me/model", "--endpoint", endpoint, "--token", "hf_x"]) == 1
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]
    assert _files(folder) == before


def test_a_killed_build_of_the_offline_scenes_is_cleaned_by_the_next_build(tmp_path):
    from selfpatch_hf.data.segmentation.loading import offline_scenes_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname().replace("-", "_") or "localhost"
    leftover = tmp_path / f".segmentation.tmp-{host}-{dead.pid}-abcd"
    (leftover / "data").mkdir(parents=True)
    target = offline_scenes_path(tmp_path, num_train=2, num_eval=1, image_size=32)
    assert (target / "data").is_dir() and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmentation"]


# ---------------------------------------------------------------------------------------------- background uploads
def test_permanent_errors_are_not_retried(tmp_path, hub_server):
    uploader = AsyncHubUploader(
        "me/tiny",
        tmp_path / "staging",
        endpoint=hub_server.endpoint,
        token="hf_wrong",  # refused (401): retrying cannot help
        max_attempts=3,
        retry_delay=0.01,
    )
    uploader.submit(_backbone_folder(tmp_path / "backbone"), step=4)
    (outcome,) = uploader.wait(timeout=30)
    assert outcome.status == "failed" and outcome.attempts == 1 and outcome.permanent
    assert [r for r in hub_server.requests if r[1] == "/api/repos/create"] == [("POST", "/api/repos/create")]
    (line,) = uploader.report()
    assert "the Hub refused the upload (HTTP 401)" in line and "not retried" in line
    assert (outcome.folder / "model.safetensors").read_bytes() == WEIGHTS

    with pytest.raises(ValueError, match="hub_model_id 'not a/valid/id' is not a valid Hub repository id"):
        AsyncHubUploader("not a/valid/id", tmp_path / "staging")


def test_error_classes():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    def http_error(code: int) -> HfHubHTTPError:
        request = httpx2.Request("POST", "http://hub/api/repos/create")
        return HfHubHTTPError("x", response=httpx2.Response(code, request=request))

    assert all(is_permanent_error(http_error(code)) for code in (400, 401, 403, 404, 422))
    assert not any(is_permanent_error(http_error(code)) for code in (408, 409, 429, 500, 502, 503, 504))
    assert is_permanent_error(HFValidationError("bad id"))
    assert not is_permanent_error(httpx2.ConnectError("refused"))
    assert not is_permanent_error(httpx2.ReadTimeout("silent"))


def test_a_silent_server_fails_each_attempt_after_the_request_timeout(tmp_path, stalled_hub_endpoint):
    bound_hub_requests(connect_timeout=1, read_timeout=0.5)
    uploader = AsyncHubUploader(
        "me/tiny",
        tmp_path / "staging",
        endpoint=stalled_hub_endpoint,
        token="hf_x",
        max_attempts=2,
        retry_delay=0.05,
    )
    uploader.submit(_backbone_folder(tmp_path / "backbone"), step=2)
    started = time.monotonic()
    (outcome,) = uploader.wait(timeout=30)
    assert time.monotonic() - started < 10
    assert outcome.status == "failed" and outcome.attempts == 2 and not outcome.permanent
    assert all("stopped answering (no data within 0.5 s)" in error for error in outcome.errors)


_FINAL_WAIT = textwrap.dedent(
    """
    import sys
    from selfpatch_hf.hub.uploads import AsyncHubUploader

    endpoint, staging, folder, timeout = sys.argv[1:5]
    uploader = AsyncHubUploader("me/tiny", staging, endpoint=endpoint, token="hf_x")
    uploader.submit(folder, step=7)
    print("waiting", flush=True)
    uploader.finish(float(timeout))
    for line in uploader.report():
        print("REPORT", line, flush=True)
    print("interrupted by", uploader.interrupted_by, flush=True)
    """
)


def _final_wait(tmp_path: Path, endpoint: str, timeout: float) -> subprocess.Popen:
    folder = _backbone_folder(tmp_path / "backbone")
    return subprocess.Popen(
        [sys.executable, "-c", _FINAL_WAIT, endpoint, str(tmp_path / "staging"), str(folder), str(timeout)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_final_wait_has_a_deadline_and_the_process_exits(tmp_path, stalled_hub_endpoint):
    """No request timeout at all (the library's default): the deadline alone ends the wait, and the request still
    hanging on its thread does not keep the process alive."""
    process = _final_wait(tmp_path, stalled_hub_endpoint, timeout=2)
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert (
        "REPORT step 7: NOT uploaded (not finished within the final wait of 2 s (--hub_upload_timeout))"
        in output
    )
    kept = tmp_path / "staging" / "step-7"
    assert f"The export is kept at {kept}" in output and (kept / "model.safetensors").read_bytes() == WEIGHTS


def test_sigterm_during_the_final_wait_still_reports(tmp_path, stalled_hub_endpoint):
    process = _final_wait(tmp_path, stalled_hub_endpoint, timeout=300)
    try:
        assert process.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert "REPORT step 7: NOT uploaded (the wait was interrupted by SIGTERM)" in output, output
    assert "interrupted by SIGTERM" in output


def test_a_preempted_run_reports_its_uploads_at_once(tmp_path, stalled_hub_endpoint):
    uploader = AsyncHubUploader("me/tiny", tmp_path / "staging", endpoint=stalled_hub_endpoint, token="hf_x")
    uploader.submit(_backbone_folder(tmp_path / "backbone"), step=9)
    started = time.monotonic()
    (outcome,) = uploader.finish(0, why_not_waiting="not waited for: the run was stopped by SIGTERM")
    assert time.monotonic() - started < 5
    assert outcome.status == "unfinished" and not uploader.complete
    assert uploader.report() == [
        f"step 9: NOT uploaded (not waited for: the run was stopped by SIGTERM). The export is kept at "
        f"{outcome.folder}; push it later with `hf upload me/tiny {outcome.folder} .`"
    ]
