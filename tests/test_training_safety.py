"""The run's own safety, as users run the scripts (real processes, tiny models): one live run per output folder, a
SIGTERM to the whole process group (SLURM, Kubernetes) checkpointing through the DataLoader workers, final artefacts
that a full disk cannot leave half-written, model-folder swaps that always leave a folder in place, fine-tuning
checkpoints on a full or read-only disk, a fine-tuning upload to a Hub that never answers, and launches that would
not give the processes asked for."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny_images import write_parquet_images
from training_runs import TINY_MODEL_RECIPE, script_env

from selfpatch_hf.training.metrics_log import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = REPO_ROOT / "training" / "pretrain.py"
FINETUNE = REPO_ROOT / "training" / "finetune_segmentation.py"
HOST = socket.gethostname()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny pretraining recipe on 14 images, long enough (400 steps) to be interrupted, with 2 data workers."""
    root = tmp_path_factory.mktemp("safety")
    data = write_parquet_images(root / "data", num_images=14, num_shards=2)
    path = root / "recipe.yaml"
    path.write_text(
        TINY_MODEL_RECIPE
        + f"""
dataset_name: {data}
samples_per_epoch: 12
per_device_train_batch_size: 3
num_workers: 2
shuffle_buffer_size: 0
max_steps: 400
learning_rate: 0.05
warmup_epochs: 1
logging_steps: 1
checkpointing_steps: 0
resume_from_checkpoint: latest
"""
    )
    return path


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A run in its own process group (as a batch scheduler starts a job), its output in `log`."""
    with open(log, "a") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env or script_env(), start_new_session=True
        )


def _wait_for_step(process: subprocess.Popen, metrics: Path, after: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            steps = [r["step"] for r in read_metrics(metrics) if "loss" in r]
            if steps and steps[-1] > after:
                return steps[-1]
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before step {after + 1}")
        time.sleep(0.05)
    raise AssertionError(f"no step after {after} within {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


# ------------------------------------------------------------------------------------------ one run per folder
def test_a_second_run_on_a_live_runs_folder_is_refused_naming_it_and_a_killed_run_leaves_nothing_stuck(
    recipe, tmp_path
):
    output = tmp_path / "run"
    first = _start(
        [sys.executable, str(PRETRAIN), str(recipe), "--output_dir", str(output)], tmp_path / "first.log"
    )
    try:
        _wait_for_step(first, output / "metrics.jsonl", after=1)
        # the same command again, resuming (the recipe says latest), and a fresh start on the same folder
        for extra in ([], ["--overwrite_output_dir"]):
            second = subprocess.run(
                [sys.executable, str(PRETRAIN), str(recipe), "--output_dir", str(output), *extra],
                env=script_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert second.returncode == 2, second.stderr[-3000:]
            line = second.stderr.strip().splitlines()[-1]
            assert line.startswith(
                f"pretrain.py: error: --output_dir {output} is in use by another run (pid "
            )
            assert f"pid {first.pid} on {HOST}" in line and "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, its files untouched
        assert (output / "metrics.jsonl").exists()
    finally:
        _stop(first)  # SIGKILL: no chance to clean up or unlock
    # the kernel released the dead run's lock: the next run takes the folder over and continues it
    resumed = subprocess.run(
        [sys.executable, str(PRETRAIN), str(recipe), "--output_dir", str(output), "--max_steps", "3"],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((output / "run_complete.json").read_text())["step"] == 3


def test_a_fine_tuning_run_on_a_held_folder_is_refused_before_writing_anything(tmp_path, capsys):
    """The fine-tuning script shares the lock: here the test process holds the folder, as another run would."""
    from segmentation_inputs import finetune_arguments, load_finetune_script, segmentation_inputs

    from selfpatch_hf.cli.errors import run_command
    from selfpatch_hf.training.output_folder import OutputFolderLock

    script = load_finetune_script()
    inputs = segmentation_inputs(tmp_path / "inputs")
    output = tmp_path / "finetune"
    output.mkdir()
    lock = OutputFolderLock(output)
    assert lock.acquire() is None
    try:
        assert run_command("finetune_segmentation.py", script.main, finetune_arguments(inputs, output)) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--output_dir {output} is in use by another run (pid {os.getpid()} on {HOST}" in line
        assert sorted(p.name for p in output.iterdir()) == [".run.lock"]  # nothing written
    finally:
        lock.release()
    again = OutputFolderLock(output)
    assert again.acquire() is None  # released: the next run may take it
    again.release()


def test_a_dead_runs_forked_children_do_not_keep_its_folder_locked(tmp_path):
    """A run killed with kill -9 leaves its data workers behind for a moment (they notice their parent is gone only
    later); they were forked while the lock was held, so without care their copy of the lock's file descriptor
    would keep the folder locked, and the resume would be refused as "in use by another run"."""
    output = tmp_path / "run"
    output.mkdir()
    holder = textwrap.dedent(
        f"""
        import os, sys, time
        from selfpatch_hf.training.output_folder import OutputFolderLock
        assert OutputFolderLock({str(output)!r}).acquire() is None
        child = os.fork()
        if child == 0:  # a data worker outliving its parent (off the test's pipes, which it would hold open)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)  # the run dies without releasing anything
        """
    )
    done = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    orphan = int(done.stdout.split()[0])
    try:
        os.kill(orphan, 0)  # still alive: the lock's file is still open in it, had it kept its descriptor
        from selfpatch_hf.training.output_folder import OutputFolderLock

        lock = OutputFolderLock(output)
        assert lock.acquire() is None
        lock.release()
    finally:
        os.kill(orphan, signal.SIGKILL)


# ------------------------------------------------------------------------------ SIGTERM to the process group
def _assert_stopped_with_a_checkpoint(process: subprocess.Popen, output: Path, log: Path, stopped_after: int):
    process.wait(timeout=300)
    text = log.read_text()
    assert "killed by signal" not in text and "Traceback" not in text, text[-4000:]
    assert process.returncode == 128 + signal.SIGTERM, text[-4000:]
    (stopped,) = [r for r in read_metrics(output / "metrics.jsonl") if r.get("event") == "stopped"]
    assert stopped["signal"] == "SIGTERM" and stopped["step"] > stopped_after
    assert Path(stopped["checkpoint"]).name == f"checkpoint-{stopped['step']}"
    assert (Path(stopped["checkpoint"]) / "COMPLETE").is_file()
    return stopped["step"]


def test_sigterm_to_the_process_group_checkpoints_through_the_data_workers(recipe, tmp_path):
    """SLURM / Kubernetes signal every process of the job, the DataLoader workers too: the run still checkpoints
    at the next step and exits 143, and the same command continues from there."""
    output, log = tmp_path / "run", tmp_path / "run.log"
    process = _start([sys.executable, str(PRETRAIN), str(recipe), "--output_dir", str(output)], log)
    try:
        step = _wait_for_step(process, output / "metrics.jsonl", after=2)
        os.killpg(process.pid, signal.SIGTERM)
        stopped = _assert_stopped_with_a_checkpoint(process, output, log, step - 1)
    finally:
        _stop(process)
    resumed = subprocess.run(
        [
            sys.executable,
            str(PRETRAIN),
            str(recipe),
            "--output_dir",
            str(output),
            "--max_steps",
            str(stopped + 2),
        ],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_events = [r for r in read_metrics(output / "metrics.jsonl") if r.get("event") == "resumed"]
    assert resumed_events[-1]["step"] == stopped


def test_sigterm_to_the_process_group_of_a_two_process_run(recipe, tmp_path):
    """`accelerate launch` with 2 CPU processes: the group's SIGTERM reaches the launcher, both ranks and their
    workers. Both ranks stop at the same step, write one checkpoint together and exit 143; the launcher (torch's
    elastic agent) reports the signal as its own failure."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output, log = tmp_path / "ddp", tmp_path / "ddp.log"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]  # fmt: skip
    process = _start([*launcher, str(PRETRAIN), str(recipe), "--output_dir", str(output), "--cpu"], log)
    try:
        step = _wait_for_step(process, output / "metrics.jsonl", after=2, timeout=600)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=300)
    finally:
        _stop(process)
    text = log.read_text()
    assert "killed by signal" not in text, text[-4000:]
    (stopped,) = [r for r in read_metrics(output / "metrics.jsonl") if r.get("event") == "stopped"]
    assert stopped["step"] >= step
    checkpoint = Path(stopped["checkpoint"])
    assert json.loads((checkpoint / "COMPLETE").read_text())["num_processes"] == 2
    assert all((checkpoint / f"rank_state_{rank}.json").is_file() for rank in (0, 1))
    assert "Stopped by SIGTERM" in text
    # the launcher (torch's elastic agent) forwards the signal, waits for the ranks, then fails with it; whether
    # its SignalException traceback reaches the log before it exits depends on timing (CI saw only the agent's
    # "Received 15 death signal" line and exit code 143), so the test asks for the agent's own record of the signal
    assert process.returncode != 0, text[-4000:]
    assert "SignalException" in text or "Received 15 death signal" in text, text[-4000:]


def test_sigterm_to_the_process_group_of_a_fine_tuning_run(tmp_path):
    from segmentation_inputs import finetune_arguments, segmentation_inputs

    inputs = segmentation_inputs(tmp_path / "inputs")
    output, log = tmp_path / "finetune", tmp_path / "finetune.log"
    arguments = finetune_arguments(inputs, output, "--max_steps", "400", "--num_workers", "2")
    process = _start([sys.executable, str(FINETUNE), *arguments], log)
    try:
        step = _wait_for_step(process, output / "metrics.jsonl", after=2)
        os.killpg(process.pid, signal.SIGTERM)
        _assert_stopped_with_a_checkpoint(process, output, log, step - 1)
    finally:
        _stop(process)


# ----------------------------------------------------------------------------------------- final artefacts
def test_a_full_disk_while_writing_the_final_model_keeps_nothing_half_written_and_the_rerun_writes_it(
    recipe, tmp_path, monkeypatch, capsys
):
    """The final pretraining model fails to write (ENOSPC in its weights file): one line naming the folder, no
    `pretraining_model/` with only a config.json, the run not marked complete; the same command with space freed
    writes the final artefacts from the last checkpoint without training again."""
    import transformers.modeling_utils
    from test_training_components import load_pretrain_script

    pretrain = load_pretrain_script()
    output = tmp_path / "run"
    argv = [
        str(recipe),
        "--output_dir",
        str(output),
        "--max_steps",
        "3",
        "--num_workers",
        "0",
        "--cpu_threads",
        "1",
    ]
    real_save = transformers.modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if ".pretraining_model.tmp-" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    assert pretrain.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        f"pretrain.py: error: Writing the pretraining model to {output / 'pretraining_model'}"
    )
    assert f"failed: no space left on {output}" in error and "--resume_from_checkpoint latest" in error
    assert not (output / "pretraining_model").exists() and not (output / "run_complete.json").exists()
    assert not [p for p in output.iterdir() if p.name.startswith(".pretraining_model")]  # no staging left
    steps = [r["step"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r]

    monkeypatch.undo()  # space freed
    assert pretrain.main(argv) == 0
    assert [
        r["step"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r
    ] == steps  # no step again
    assert (output / "pretraining_model" / "model.safetensors").is_file()
    record = json.loads((output / "run_complete.json").read_text())
    assert record["step"] == 3 and set(record["artefacts"]) == {"backbone", "pretraining_model"}
    # complete now: a third run trains nothing and says so; a damaged artefact makes it write them again
    assert pretrain.main(argv) == 0
    weights = output / "pretraining_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert pretrain.main(argv) == 0
    assert json.loads((output / "run_complete.json").read_text()) == record  # rewritten whole, the same files


def test_model_folder_swaps_leave_a_folder_in_place_and_clean_up_after_dead_writers(
    tmp_path, monkeypatch, caplog
):
    from selfpatch_hf import atomic_folders
    from selfpatch_hf.atomic_folders import clean_leftovers, exchange_paths, replace_directory, staged_folder

    target = tmp_path / "model"
    with staged_folder(target) as staging:
        (staging / "weights").write_text("old")
    # the exchange itself: both names exist at every instant
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights").write_text("new")
    assert exchange_paths(other, target)
    assert (target / "weights").read_text() == "new" and (other / "weights").read_text() == "old"

    # a writer killed mid-write (staging left) and one killed between the fallback's two renames (old folder
    # retired, nothing under the target's name): the next writer restores the old folder, then removes both
    dead = 2**22 + 12345  # above any pid in use here
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    tag = f"{atomic_folders._host()}-{dead}"
    (tmp_path / f".model.tmp-{tag}-abcd1234").mkdir()
    os.replace(target, tmp_path / f".model.old-{tag}")
    assert not target.exists()
    clean_leftovers(target)
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other"]
    # leftovers of a live writer or another host are named, not touched
    live = tmp_path / f".model.tmp-{atomic_folders._host()}-{os.getppid()}-live0000"
    foreign = tmp_path / ".model.tmp-otherhost-1-abcd0000"
    live.mkdir()
    foreign.mkdir()
    caplog.set_level("WARNING")
    with staged_folder(target) as staging:
        (staging / "weights").write_text("newer")
    assert live.is_dir() and foreign.is_dir() and (target / "weights").read_text() == "newer"
    assert any(foreign.name in r.getMessage() and "another host" in r.getMessage() for r in caplog.records)
    # where the system cannot exchange two names, the fallback's two renames still end with the new folder
    monkeypatch.setattr(atomic_folders, "exchange_paths", lambda first, second: False)
    newest = tmp_path / "newest"
    newest.mkdir()
    (newest / "weights").write_text("newest")
    replace_directory(newest, target)
    assert (target / "weights").read_text() == "newest" and not newest.exists()
    assert not list(tmp_path.glob(".model.old-*"))


# -------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_a_fine_tuning_checkpoint_on_a_full_or_read_only_disk_fails_in_one_line(
    tmp_path, monkeypatch, capsys, failure
):
    """pretraining's checkpoint code, shared: one line naming the folder, the partial checkpoint removed, the
    earlier one untouched."""
    import accelerate.checkpointing
    from segmentation_inputs import finetune_arguments, load_finetune_script, segmentation_inputs

    script = load_finetune_script()
    inputs = segmentation_inputs(tmp_path / "inputs")
    output = tmp_path / "finetune"
    real_save = accelerate.checkpointing.save
    saves = []

    def failing_save(obj, path, *args, **kwargs):
        saves.append(path)
        if "checkpoint-4" in str(path):
            if failure == "full":
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", failing_save)
    arguments = finetune_arguments(inputs, output, "--max_steps", "6", "--checkpointing_steps", "2")
    from selfpatch_hf.cli.errors import run_command

    assert run_command("finetune_segmentation.py", script.main, arguments) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    reason = f"no space left on {output / 'checkpoints'}" if failure == "full" else "PermissionError"
    assert error.startswith("finetune_segmentation.py: error: Writing checkpoint checkpoint-4 failed: ")
    assert (
        reason in error and f"the last complete checkpoint {output / 'checkpoints' / 'checkpoint-2'}" in error
    )
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-2"]
    from selfpatch_hf.training.checkpointing import verify_checkpoint

    assert verify_checkpoint(output / "checkpoints" / "checkpoint-2") == []


def test_an_unwritable_output_folder_is_refused_in_one_line_before_any_work(tmp_path):
    from segmentation_inputs import finetune_arguments, segmentation_inputs

    inputs = segmentation_inputs(tmp_path / "inputs")
    blocked = "/sys/selfpatch-not-writable/run"  # /sys refuses new folders, even to root
    for command in (
        [sys.executable, str(FINETUNE), *finetune_arguments(inputs, Path(blocked))],
        [sys.executable, str(PRETRAIN), "--output_dir", blocked, "--dataset_name", str(inputs["images"]),
         "--preset", "vit-tiny-patch16", "--max_steps", "1", "--num_workers", "0"],
    ):  # fmt: skip
        result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        line = result.stderr.strip().splitlines()[-1]
        assert f"error: cannot write to --output_dir {blocked}" in line and "Traceback" not in result.stderr


def test_fine_tuning_pushed_to_a_hub_that_never_answers_is_bounded_and_says_what_it_waits_for(
    tmp_path, stalled_hub_endpoint
):
    from segmentation_inputs import finetune_arguments, segmentation_inputs

    inputs = segmentation_inputs(tmp_path / "inputs")
    output = tmp_path / "pushed"
    arguments = finetune_arguments(inputs, output, "--max_steps", "2", "--checkpointing_steps", "0")
    arguments += ["--push_to_hub", "--hub_model_id", "me/tiny-upernet", "--hub_request_timeout", "2",
                  "--hub_upload_timeout", "6", "--hub_upload_attempts", "1"]  # fmt: skip
    env = script_env(
        HF_ENDPOINT=stalled_hub_endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN="hf_x",
        HF_HOME=str(tmp_path / "hf"),
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(FINETUNE), *arguments], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert time.monotonic() - started < 300
    waiting = f"Waiting for the pending Hub upload(s): step 2 to me/tiny-upernet at {stalled_hub_endpoint}, at most 6 s"
    assert waiting in result.stderr
    assert "the fine-tuned model did not reach the Hub" in result.stderr.strip().splitlines()[-1]
    assert (output / "model" / "model.safetensors").is_file()  # the model itself is saved
    snapshots = list((output / ".hub_uploads").iterdir())
    assert snapshots and (snapshots[0] / "model.safetensors").is_file()  # and kept for a later push


# ------------------------------------------------------------------------------------------------ launches
@pytest.mark.parametrize(
    "launch, expected",
    [
        (["--multi_gpu"], "launched as 2 processes (WORLD_SIZE=2) but accelerate set up 1 on cpu"),
        (["--cpu"], "accelerate launch --cpu --num_processes N starts ONE process"),
    ],
    ids=["multi-gpu-without-gpu-or-cpu", "cpu-with-two-processes"],
)
def test_launches_that_would_not_give_two_processes_are_refused_naming_one_that_does(
    recipe, tmp_path, launch, expected
):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(PRETRAIN), str(recipe), "--output_dir", str(output)]  # fmt: skip
    env = {key: value for key, value in script_env().items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain.py: error: ")]
    assert lines and all(expected in line for line in lines), result.stderr[-4000:]
    assert "accelerate launch --multi_gpu --num_processes N" in lines[0] and "--cpu" in lines[0]
    assert not output.exists()  # refused before anything was written
