"""training/pretrain.py in unlucky moments, as users run it (plain `python`, one process, tiny model): a learning
rate that makes the weights explode, a damaged latest checkpoint, and a Hub that accepts connections but never
answers (a loopback socket). Each run is bounded in time; the old behaviours were a hang, a traceback or damaged
checkpoints called "good"."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_images import write_parquet_images
from training_runs import TINY_MODEL_RECIPE, script_env

from selfpatch_hf.training.metrics_log import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training" / "pretrain.py"
UPLOADS_INCOMPLETE = (
    3  # the exit status of a run that trained to the end but could not publish its last export
)

pytestmark = pytest.mark.slow

RECIPE = (
    TINY_MODEL_RECIPE
    + """
samples_per_epoch: 12
per_device_train_batch_size: 3
num_workers: 1
shuffle_buffer_size: 0
learning_rate: 0.05
warmup_epochs: 1
logging_steps: 1
"""
)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("failures")
    data = write_parquet_images(root / "data", num_images=14, num_shards=2)
    path = root / "recipe.yaml"
    path.write_text(RECIPE + f"dataset_name: {data}\n")
    return path


def _run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env or script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.fixture
def stalled_hub(tmp_path, stalled_hub_endpoint):
    """The environment of a run whose Hub endpoint accepts connections and never answers."""
    return script_env(
        HF_ENDPOINT=stalled_hub_endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN="hf_x",
        HF_HOME=str(tmp_path / "hf_home"),
    )


# ---------------------------------------------------------------------------------------------------------- divergence
def test_exploding_weights_stop_the_run_before_they_are_saved_naming_the_last_healthy_checkpoint(
    recipe, tmp_path
):
    """A learning rate 800x too high: the loss stays finite (DINO's losses are bounded) while the weight norm grows
    step after step. The old script trained on and wrote every checkpoint with those weights, exit 0."""
    output = tmp_path / "run"
    result = _run(
        [str(recipe), "--output_dir", str(output), "--learning_rate", "40", "--warmup_epochs", "20",
         "--clip_grad", "0", "--max_steps", "12", "--checkpointing_steps", "1", "--checkpoints_total_limit", "20"]
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    message = _last_line(result.stderr)
    records = read_metrics(output / "metrics.jsonl")
    (event,) = [r for r in records if r.get("event") == "diverged"]
    step = event["step"]
    assert f"training diverged at optimiser step {step}" in message and "weight norm" in message
    checkpoints = output / "checkpoints"
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and max(saved) == step - 1  # the diverged state itself was never saved
    health = {
        s: json.loads((checkpoints / f"checkpoint-{s}" / "COMPLETE").read_text())["health"] for s in saved
    }
    healthy = [s for s in saved if health[s]["healthy"]]
    assert healthy and healthy == saved[: len(healthy)]  # healthy first, then suspect
    assert f"the last healthy checkpoint is {checkpoints / f'checkpoint-{healthy[-1]}'}" in message
    assert all(health[s]["status"] == "suspect" for s in saved[len(healthy) :])
    # the named checkpoint holds weights close to the start; the diverging ones grew far beyond
    first = health[saved[0]]["weight_norm"]
    assert health[healthy[-1]]["weight_norm"] < 1.25 * first
    assert health[saved[-1]]["weight_norm"] > 2 * first


# ---------------------------------------------------------------------------------------------------------- damage
def test_a_damaged_latest_checkpoint_is_skipped_by_latest_and_refused_by_name(recipe, tmp_path):
    output = tmp_path / "run"
    args = [
        str(recipe),
        "--output_dir",
        str(output),
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "3",
    ]
    first = _run([*args, "--max_steps", "4"])
    assert first.returncode == 0, first.stderr[-4000:]
    damaged = output / "checkpoints" / "checkpoint-4"
    optimizer = damaged / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a truncated copy, a disk error

    # named explicitly: exit 1 naming the file, nothing trained
    named = _run([*args, "--max_steps", "6", "--resume_from_checkpoint", str(damaged)])
    assert named.returncode == 1, named.stderr[-4000:]
    assert f"{damaged} is damaged: optimizer.bin has 100 bytes" in _last_line(named.stderr)
    assert "Traceback" not in named.stderr

    # `latest`: falls back to checkpoint-2 and says which file was wrong
    latest = _run([*args, "--max_steps", "6", "--resume_from_checkpoint", "latest"])
    assert latest.returncode == 0, latest.stderr[-4000:]
    assert f"Skipping {damaged}, it is damaged: optimizer.bin has 100 bytes" in latest.stderr
    resumed = [r for r in read_metrics(output / "metrics.jsonl") if r.get("event") == "resumed"]
    assert resumed[-1]["checkpoint"].endswith("checkpoint-2") and resumed[-1]["step"] == 2


# ---------------------------------------------------------------------------------------------------------- the Hub
def test_a_silent_hub_ends_the_final_wait_at_its_deadline(recipe, tmp_path, stalled_hub):
    output = tmp_path / "run"
    started = time.monotonic()
    result = _run(
        [str(recipe), "--output_dir", str(output), "--max_steps", "2", "--push_to_hub", "--hub_model_id",
         "me/tiny", "--hub_upload_timeout", "3", "--hub_request_timeout", "120"],
        env=stalled_hub,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == UPLOADS_INCOMPLETE, result.stderr[-4000:]
    assert time.monotonic() - started < 300
    kept = output / ".hub_uploads" / "step-2"
    assert "step 2: NOT uploaded (not finished within the final wait of 3 s" in result.stderr
    assert f"The export is kept at {kept}" in result.stderr
    assert (kept / "model.safetensors").read_bytes() == (
        output / "backbone" / "model.safetensors"
    ).read_bytes()
    assert "training finished, but its last export did not reach the Hub" in _last_line(result.stderr)
    upload = [r for r in read_metrics(output / "metrics.jsonl") if r.get("event") == "upload"]
    assert upload[-1]["status"] == "unfinished"


def test_sigterm_during_the_final_wait_still_reports_the_uploads(recipe, tmp_path, stalled_hub):
    output = tmp_path / "run"
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(recipe), "--output_dir", str(output), "--max_steps", "2",
             "--push_to_hub", "--hub_model_id", "me/tiny", "--hub_upload_timeout", "600"],
            env=stalled_hub, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "Waiting for the pending Hub upload" not in log.read_text():
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached its final wait"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == UPLOADS_INCOMPLETE, log.read_text()[-4000:]
    finally:
        process.kill()
    text = log.read_text()
    assert "step 2: NOT uploaded (the wait was interrupted by SIGTERM)" in text
    assert (output / ".hub_uploads" / "step-2" / "model.safetensors").is_file()
