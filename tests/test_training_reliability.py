"""Unlucky moments of a training run, in-process and bounded in time: a full disk during a checkpoint write,
damaged checkpoints, a metrics file cut mid-line, a diverging run, and Hub endpoints that refuse, stall or can never
succeed (loopback sockets only)."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from training_runs import prepared_model, train_a_bit

from selfpatch_hf.training.checkpointing import (
    COMPLETE_MARKER,
    CheckpointManager,
    CheckpointWriteError,
    DamagedCheckpointError,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "failure",
    [
        # what torch's zip writer raises when the disk fills (no errno; the free space tells)
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["torch-short-write", "enospc"],
)
def test_a_full_disk_during_a_checkpoint_write_removes_the_partial_one_and_keeps_the_last(
    tmp_path, accelerator, monkeypatch, failure
):
    import accelerate.checkpointing

    model, optimizer = prepared_model(accelerator)
    manager = CheckpointManager(accelerator, tmp_path, total_limit=1)
    train_a_bit(model, optimizer)
    good = manager.save(1, {"num_processes": 1}, {"data": 1})
    before = _snapshot(good)

    real_save = accelerate.checkpointing.save

    def filling_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.bin"):  # the model file went through; the optimiser's fills the disk
            Path(path).write_bytes(b"\0" * 1000)
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", filling_save)
    if isinstance(failure, RuntimeError):
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    train_a_bit(model, optimizer)
    with pytest.raises(CheckpointWriteError) as error:
        manager.save(2, {"num_processes": 1}, {"data": 2})
    message = str(error.value)
    assert f"no space left on {manager.directory}" in message
    assert "The partial checkpoint was removed" in message and str(good) in message
    assert sorted(p.name for p in manager.directory.iterdir()) == ["checkpoint-1"]  # no .tmp- leftover
    assert _snapshot(good) == before and verify_checkpoint(good) == []  # the earlier one untouched

    monkeypatch.undo()  # space freed: the next save works and rotates as usual
    manager.save(3, {"num_processes": 1}, {"data": 3})
    assert [p.name for p in list_checkpoints(manager.directory)] == ["checkpoint-3"]


def test_other_write_errors_are_named_without_blaming_the_disk(tmp_path, accelerator, monkeypatch):
    import accelerate.checkpointing

    prepared_model(accelerator)
    manager = CheckpointManager(accelerator, tmp_path)

    def failing_save(obj, path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(accelerate.checkpointing, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match="OSError: \\[Errno 5\\] Input/output error") as error:
        manager.save(1, {}, {})
    assert "no space" not in str(error.value)
    assert not any(manager.directory.iterdir())


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_a_byte(file: Path) -> None:
    content = bytearray(file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    file.write_bytes(bytes(content))


@pytest.mark.parametrize(
    "name, damage, expected",
    [
        ("model.safetensors", _truncate, "model.safetensors has"),
        ("optimizer.bin", _truncate, "optimizer.bin has"),
        ("trainer_state.json", _flip_a_byte, "trainer_state.json does not match its sha256"),
        ("rank_state_0.json", lambda f: f.write_text("{not json"), "rank_state_0.json has"),
        ("random_states_0.pkl", _flip_a_byte, "random_states_0.pkl does not match its sha256"),
        ("random_states_0.pkl", Path.unlink, "random_states_0.pkl is missing"),
    ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, accelerator, caplog, name, damage, expected
):
    model, optimizer = prepared_model(accelerator)
    manager = CheckpointManager(accelerator, tmp_path, total_limit=3)
    for step in (1, 2):
        train_a_bit(model, optimizer)
        manager.save(step, {"num_processes": 1, "step": step}, {"data": {"position": step}})
    marker = json.loads((manager.directory / "checkpoint-2" / COMPLETE_MARKER).read_text())
    assert (
        name in marker["files"]
        and marker["files"][name]["size"] > 0
        and len(marker["files"][name]["sha256"]) == 64
    )
    damaged = manager.directory / "checkpoint-2"
    damage(damaged / name)

    with caplog.at_level(logging.WARNING, logger="selfpatch_hf.training.checkpointing"):
        chosen = manager.latest()
    assert chosen == manager.directory / "checkpoint-1"
    assert f"Skipping {damaged}, it is damaged: {expected}" in caplog.text
    trainer_state, rank_state = manager.load(chosen)
    assert trainer_state["step"] == 1 and rank_state == {"data": {"position": 1}}

    # named explicitly: an error naming the file, nothing loaded
    with pytest.raises(DamagedCheckpointError, match=f"{damaged} is damaged: {expected}"):
        resolve_checkpoint(manager.directory, str(damaged))
    with pytest.raises(DamagedCheckpointError, match=expected):
        manager.load(damaged)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, accelerator):
    prepared_model(accelerator)
    manager = CheckpointManager(accelerator, tmp_path)
    path = manager.save(1, {}, {})
    (path / COMPLETE_MARKER).write_text("{")  # the manifest itself
    with pytest.raises(DamagedCheckpointError, match="every checkpoint .* is damaged"):
        manager.latest()
    assert verify_checkpoint(path) and "COMPLETE cannot be read" in verify_checkpoint(path)[0]


# ---------------------------------------------------------------------------------------------------- metrics log
class _MainProcess:
    is_main_process = True
    trackers: list = []


def test_a_metrics_file_cut_mid_line_is_repaired_on_append_and_readable_meanwhile(tmp_path, caplog):
    from selfpatch_hf.training.metrics_log import MetricsLog, last_metrics_per_step, read_metrics

    log = MetricsLog(_MainProcess(), tmp_path)
    for step in (1, 2):
        log.metrics(step, {"loss": 1.0 / step})
    whole = log.path.read_bytes()
    log.path.write_bytes(whole + b'{"step": 3, "time": 17.5, "lo')  # killed mid-write

    # reading the damaged file: the partial last line is skipped, the rest is there
    with caplog.at_level(logging.WARNING):
        records = read_metrics(log.path)
    assert [r["step"] for r in records] == [1, 2] and "skipping a partial last line" in caplog.text

    # the next run appends: the partial line is cut off (noted), the new record is a line of its own
    resumed = MetricsLog(_MainProcess(), tmp_path)
    resumed.event("resumed", 2)
    resumed.metrics(3, {"loss": 0.25})
    text = log.path.read_text()
    assert text.startswith(whole.decode()) and text.endswith("\n")
    records = read_metrics(log.path)
    assert [r.get("event") for r in records] == [None, None, "repaired", "resumed", None]
    assert records[2]["dropped_partial_line"] == '{"step": 3, "time": 17.5, "lo'
    assert records[2]["dropped_bytes"] == len('{"step": 3, "time": 17.5, "lo')
    assert last_metrics_per_step(records)[3]["loss"] == 0.25

    # a damaged line in the middle is an error naming the file and the line, not a silent skip
    log.path.write_text(text.replace('"event": "resumed"', '"event": resumed'))
    with pytest.raises(ValueError, match=f"{log.path}, line 4 is not a JSON record"):
        read_metrics(log.path)


def test_a_failed_metrics_write_leaves_no_partial_line_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import builtins

    from selfpatch_hf.training.metrics_log import MetricsLog, read_metrics

    log = MetricsLog(_MainProcess(), tmp_path)
    log.metrics(1, {"loss": 1.0})
    real_open = builtins.open

    class FillingFile:  # writes half the line, then the disk is full
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        builtins,
        "open",
        lambda path, mode="r", *a, **k: (
            FillingFile(real_open(path, mode, *a, **k))
            if str(path) == str(log.path) and "a" in mode
            else real_open(path, mode, *a, **k)
        ),
    )
    with caplog.at_level(logging.WARNING):
        log.metrics(2, {"loss": 0.5})  # no exception: the run goes on
        log.metrics(3, {"loss": 0.4})
    assert caplog.text.count("metrics are not recorded") == 1
    monkeypatch.undo()
    log.metrics(4, {"loss": 0.3})
    assert [r["step"] for r in read_metrics(log.path)] == [1, 4]


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    from selfpatch_hf.training.metrics_log import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')
    MetricsLog(_MainProcess(), tmp_path).metrics(3, {"loss": 1.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.0), (2, 1.5), (3, 1.0)]


# ---------------------------------------------------------------------------------------------------- divergence
def test_an_exploding_learning_rate_is_stopped_before_damaged_weights_are_saved(tmp_path, accelerator):
    from tiny_models import tiny_config

    from selfpatch_hf import SelfPatchForPretraining
    from selfpatch_hf.training.checkpointing import is_healthy_checkpoint, last_healthy_checkpoint
    from selfpatch_hf.training.divergence import DivergenceMonitor, gradient_norm, weight_norm
    from selfpatch_hf.training.optimization import build_optimizer

    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config())
    optimizer = build_optimizer(model.student)
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CheckpointManager(accelerator, tmp_path, total_limit=None)
    monitor = DivergenceMonitor()
    start_norm = weight_norm(model.student.parameters())
    monitor.start(start_norm)
    inputs = torch.Generator().manual_seed(0)
    healthy_steps, verdicts, saved_norms = 20, {}, {}
    for step in range(1, 61):
        # 20 healthy steps at DINO's learning rate, then the rate triples every step
        for group in optimizer.param_groups:
            group["lr"] = 5e-4 * 3 ** max(0, step - healthy_steps)
        out = model(
            torch.randn(2, 2, 3, 32, 32, generator=inputs), torch.randn(2, 4, 3, 16, 16, generator=inputs)
        )
        out.loss.backward()
        grad_norm = gradient_norm(model.student.parameters())
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.99)
        norm = weight_norm(model.student.parameters())
        verdict = monitor.update(step, out.loss.item(), grad_norm, norm)
        verdicts[step] = verdict.status
        if verdict.status == "diverged":
            break
        manager.save(step, {"num_processes": 1}, {}, health=monitor.health())
        saved_norms[step] = norm
    diverged_at = max(verdicts)
    assert verdicts[diverged_at] == "diverged" and diverged_at < 40, verdicts
    assert "weight norm" in monitor.last.reasons[0] and "limit 4x" in monitor.last.reasons[0]
    # the healthy part of the run raised nothing, not even a suspicion
    assert all(verdicts[step] == "ok" for step in range(1, healthy_steps + 1))
    # every checkpoint marked healthy holds sane weights; the named one is the newest of them
    for path in list_checkpoints(manager.directory):
        step = int(path.name.split("-")[1])
        assert is_healthy_checkpoint(path) == (saved_norms[step] <= 1.25 * start_norm), (
            step,
            saved_norms[step],
        )
    best = last_healthy_checkpoint(manager.directory)
    best_step = int(best.name.split("-")[1])
    assert healthy_steps <= best_step < diverged_at - 1
    assert not is_healthy_checkpoint(manager.directory / f"checkpoint-{diverged_at - 1}")
    assert f"checkpoint-{diverged_at}" not in {p.name for p in manager.directory.iterdir()}  # never saved


def test_divergence_rules_on_synthetic_series():
    from selfpatch_hf.training.divergence import DivergenceMonitor, DivergenceThresholds

    rng = torch.Generator().manual_seed(0)
    monitor = DivergenceMonitor()
    monitor.start(100.0)
    # a noisy but healthy run: losses fall with noise, gradient norms vary 10x, weights drift slowly
    for step in range(1, 301):
        noise = torch.rand(3, generator=rng).tolist()
        loss = 11.0 * 0.995**step + 0.5 * noise[0]
        grad = 10 ** (2 * noise[1])
        assert monitor.update(step, loss, grad, 100.0 + 0.05 * step).status == "ok", step
    assert monitor.update(301, 5.0, 1e6, 115.0).status == "diverged"  # gradient spike > 1000x median
    assert monitor.update(301, 5.0, 1e4, 115.0).status == "suspect"  # > 100x: marked, not stopped
    # the loss jumped far out of its spread
    assert monitor.update(302, 20.0, 10.0, 115.0).status == "diverged"
    assert monitor.update(302, float("nan"), 10.0, 115.0).reasons == ["loss is nan"]
    assert monitor.update(302, 2.0, 10.0, float("inf")).status == "diverged"
    with pytest.raises(ValueError, match="grad_spike must be > 1"):
        DivergenceThresholds(grad_spike=0.5)
    # state round trip (for resuming): the same verdicts afterwards
    restored = DivergenceMonitor()
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.update(303, 5.0, 1e6, 115.0).status == "diverged"
