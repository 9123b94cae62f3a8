"""Two real processes (DDP over gloo on the CPU) against one: training/pretrain.py's step, data split and run.

One `accelerate launch` runs every 2-process check (tests/distributed_training_checks.py); the 1-process reference
is a plain `python` run of the same script.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_images import write_parquet_images
from training_runs import TINY_CROPS

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "distributed_training_checks.py"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{command}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-8000:]}"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_parquet_images(root / "data", num_images=16, num_shards=2)
    two, one = root / "two_processes", root / "one_process"
    two.mkdir()
    one.mkdir()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]  # fmt: skip
    _run([*launcher, str(SCRIPT), str(two), str(data)], cwd=root)
    _run([sys.executable, str(SCRIPT), str(one)], cwd=root)
    return two, one, data


def test_ranks_read_disjoint_parts_of_the_stream(runs):
    two, _, _ = runs
    ranks = json.loads((two / "data_split.json").read_text())
    rank0, rank1 = (rank["decoded"] for rank in ranks)
    assert len(set(rank0)) == len(rank0) and len(set(rank1)) == len(rank1)  # no image twice within a pass
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert len(rank0) + len(rank1) == 16  # together: every example exactly once
    for rank in ranks:
        global_side, local_side = TINY_CROPS["global_crop_size"], TINY_CROPS["local_crop_size"]
        shapes = [
            [2, 2, 3, global_side, global_side],
            [2, TINY_CROPS["num_local_crops"], 3, local_side, local_side],
        ]
        assert rank["shapes"] == [shapes] * (len(rank["decoded"]) // 2)


def test_one_two_process_step_equals_one_process_step_over_both_batches(runs):
    two, one, _ = runs
    distributed = torch.load(two / "fixed_step.pt", weights_only=True)
    reference = torch.load(one / "fixed_step.pt", weights_only=True)
    assert distributed["world"] == 2 and reference["world"] == 1
    assert distributed["rank_difference"] == 0.0  # both ranks hold the same student, teacher and centres
    # the reported losses are the mean over ranks = the loss over A+B
    torch.testing.assert_close(
        torch.tensor(distributed["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6
    )
    state, expected = distributed["state"], reference["state"]
    assert state.keys() == expected.keys()
    learning_rate = 0.05 * 6 / 256
    for name in state:
        # A key bias cannot change a softmax over keys: its true gradient is 0, and Adam scales the float noise
        # (different in a 2 x 3 and a 1 x 6 reduction) up to about one learning rate per step. The same happens to
        # the odd weight whose gradient is nearly 0 (seen: 1 of 2048 in an MLP, 1.2e-5 off): such weights may differ
        # by that bound, and only a few of them may.
        if name.endswith("attn.k.bias"):
            torch.testing.assert_close(
                state[name],
                expected[name],
                rtol=1e-4,
                atol=2 * learning_rate,
                msg=lambda m, n=name: f"{n}: {m}",
            )
            continue
        off = (state[name] - expected[name]).abs() > 1e-6 + 1e-4 * expected[name].abs()
        assert off.float().mean() <= 0.005, f"{name}: {int(off.sum())} of {off.numel()} values differ"
        assert (state[name] - expected[name]).abs().max() <= 2 * learning_rate, name
    # and the steps did something: the student moved, the teacher followed, the centres left zero
    assert (
        expected["objective.image_center"].abs().max() > 0
        and expected["objective.patch_center"].abs().max() > 0
    )
    key = "student.image_head.mlp.0.weight"
    assert not torch.equal(expected[key], expected[key.replace("student", "teacher")])


def test_a_real_two_process_run_keeps_replicas_identical(runs):
    two, _, _ = runs
    report = json.loads((two / "train.json").read_text())
    assert report["num_processes"] == 2 and report["distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["global_step"] == 5
    assert report["differences"] == {"student": 0.0, "teacher": 0.0, "centers": 0.0}
    assert report["moved"]["student_vs_teacher"] > 0 and report["moved"]["image_center"] > 0
    # each rank saved its own data-stream position next to accelerate's state
    checkpoint = two / "run" / "checkpoints" / "checkpoint-5"
    ranks = [json.loads((checkpoint / f"rank_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert [state["rank"] for state in ranks] == [0, 1]
    assert [state["data"]["rank"] for state in ranks] == [0, 1]
    assert all((checkpoint / f"random_states_{rank}.pkl").is_file() for rank in (0, 1))
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (
        trainer_state["num_processes"] == 2 and trainer_state["global_batch_size"] == 8
    )  # 2 x 2 x 2 accumulation
    assert sorted(p.name for p in (two / "run" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert (two / "run" / "backbone" / "model.safetensors").is_file()


def test_a_two_process_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(runs):
    two, _, _ = runs
    for rank in (0, 1):
        result = torch.load(two / f"resume_rank{rank}.pt", weights_only=True)
        assert result["reference_step"] == result["resumed_step"] == 5
        reference, resumed = result["reference"], result["resumed"]
        assert reference.keys() == resumed.keys()
        for name in reference:  # the same data, crops, drop-path masks and updates on each rank: bit for bit
            assert torch.equal(reference[name], resumed[name]), (rank, name)
    # and the second run really continued from the checkpoint instead of starting afresh
    assert (two / "resume_reference" / "checkpoints" / "checkpoint-3").is_dir()
    metrics = [json.loads(line) for line in (two / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert any(record.get("event") == "resumed" for record in metrics)


def test_moby_on_two_processes_fills_the_queues_with_both_ranks_keys_and_resumes_exactly(runs):
    """MoBY + SelfPatch on a tiny Swin through the script with DDP: identical replicas (both networks' parameters,
    queues and pointer), each step's keys of both ranks in the queues, and a run resumed from step 2 bit-identical on
    each rank."""
    two, _, _ = runs
    results = [torch.load(two / f"moby_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["world"] == 2
        # every parameter, queue and pointer is the same on both ranks; only MoBY's BatchNorm running statistics
        # differ: torch's SyncBatchNorm needs GPUs, so on CPUs each process normalises with its own batch
        differing = result["differing_between_ranks"]
        assert differing and all(".linear_hidden.2.running_" in name for name in differing), differing
        assert result["steps"] == [3, 3]
        reference, resumed = result["reference"], result["resumed"]
        assert reference.keys() == resumed.keys()
        different = [name for name in reference if not torch.equal(reference[name], resumed[name])]
        # a checkpoint holds rank 0's model, so rank 1 resumes with rank 0's running statistics (training reads
        # batch statistics, so nothing else changes)
        assert not different if rank == 0 else set(different) <= set(differing), (rank, different)
    state = results[0]["reference"]
    # 3 steps x 2 processes x 2 images: 12 keys per queue (6 if the ranks' keys were not gathered)
    assert state["objective.queue_ptr"].item() == 12
    assert not torch.equal(state["objective.queue1"], state["objective.queue2"])


def test_a_compiled_run_with_activation_checkpointing_under_ddp_ends_where_the_eager_run_ends(runs):
    two, _, _ = runs
    for rank in (0, 1):
        result = torch.load(two / f"compile_rank{rank}.pt", weights_only=True)
        assert result["compiled_modules"] > 0 and result["steps"] == [3, 3]
        assert result["rank_difference"] == 0.0  # DDP kept the compiled replicas identical
        # the same computation traced: float rounding (different op order), which Adam's normalised steps at lr 0.05
        # carry into the weights at ~1e-5 after 3 steps; a wrong gradient or a missed all-reduce is orders larger
        assert result["eager_difference"] < 1e-4, result
