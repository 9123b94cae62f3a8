"""MoBY as the image-level objective and Swin as the backbone, against independent computations written here from
the formulas (docs/moby_swin.md): MoBY's InfoNCE with queues, the queue update (also across two processes), the
momentum step before the keys, the MoBY patch loss with and without negatives, Swin's last-stage grids and the
aggregation over them, the Swin export in a process that never imports selfpatch_hf, and checkpoint round trips.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_modeling import reference_class_attention, reference_positives
from tiny_models import TINY_BACKBONE
from transformers import AutoModelForPreTraining, SwinModel

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining, SelfPatchViTForPretraining, export_backbone
from selfpatch_hf.models.selfpatch.objectives.moby import (
    MoBYContrastiveLoss,
    MoBYPatchCosineLoss,
    MoBYPatchInfoNCELoss,
    gather_across_processes,
    sync_batch_norm,
)

# A tiny Swin: patch 2, three stages (last-stage stride 8, width 32, 4 heads), window 2.
TINY_SWIN = {"embed_dim": 8, "depths": [1, 1, 2], "num_heads": [1, 2, 4], "patch_size": 2, "window_size": 2}
TINY_MOBY = {
    "moby_projection_dim": 8,
    "moby_projector_hidden_dim": 16,
    "moby_predictor_hidden_dim": 12,
    "moby_queue_size": 12,
}
TINY_DINO = {
    "image_out_dim": 64,
    "patch_out_dim": 32,
    "head_hidden_dim": 48,
    "head_bottleneck_dim": 16,
}


def tiny(backbone: str, objective: str, patch: bool = True, **overrides) -> SelfPatchConfig:
    kwargs = dict(TINY_SWIN if backbone == "swin" else TINY_BACKBONE)
    kwargs.update(TINY_MOBY if objective == "moby" else TINY_DINO)
    kwargs["image_size"] = 32
    if not patch:
        kwargs["patch_loss_weight"] = 0.0
        kwargs["image_representation"] = "average_pool" if backbone == "swin" else "cls"
    kwargs.update(overrides)
    preset = "swin-tiny-patch4-window7" if backbone == "swin" else "vit-tiny-patch16"
    return SelfPatchConfig.from_preset(preset, image_objective=objective, **kwargs)


def make_model(config: SelfPatchConfig, seed: int = 0) -> SelfPatchForPretraining:
    torch.manual_seed(seed)
    model = SelfPatchForPretraining(config).train()
    with torch.no_grad():  # student and teacher must differ for the tests to see which one is used where
        for p in model.teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- independent pieces


def reference_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """Linear -> BatchNorm with this batch's statistics (biased variance) -> ReLU -> Linear, from the formulas."""
    linear, norm = mlp.linear_hidden[1], mlp.linear_hidden[2]
    h = x @ linear.weight.T + linear.bias
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    h = h.clamp_min(0)
    return h @ mlp.linear_out.weight.T + mlp.linear_out.bias


def info_nce(
    query: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], t: float
) -> torch.Tensor:
    """-log(exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t))) for ONE query, all vectors unit length."""
    pos = torch.exp(query @ positive / t)
    return -torch.log(pos / (pos + sum(torch.exp(query @ n / t) for n in negatives)))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def backbone_tokens(network, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw f, normed patch tokens, normed CLS or None) of one view, straight from the transformers backbone."""
    backbone = network.backbone
    if isinstance(backbone, SwinModel):
        embeddings, grid = backbone.embeddings(view)
        raw = backbone.encoder(
            embeddings, grid
        ).last_hidden_state  # its layers keep their window on small grids
        return raw, backbone.layernorm(raw), None
    out = backbone(view, interpolate_pos_encoding=True, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:], out.last_hidden_state[:, 1:], out.last_hidden_state[:, 0]


def reference_image_representation(network, config, view):
    raw, normed, cls = backbone_tokens(network, view)
    if config.image_representation == "cls":
        return cls
    if config.image_representation == "average_pool":
        return normed.mean(1)
    norm = network.backbone.layernorm
    return torch.stack(
        [norm(reference_class_attention(network.aggregation, raw[b])) for b in range(len(raw))]
    )


# ----------------------------------------------------------------------------- MoBY image level


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_moby_loss_queue_update_and_momentum_step_match_the_formulas(backbone):
    config = tiny(backbone, "moby", patch=False, drop_path_rate=0.0)
    model = make_model(config)
    with (
        torch.no_grad()
    ):  # the queues hold earlier keys; the pointer is near the end: the update wraps around
        model.objective.queue1.copy_(F.normalize(torch.randn_like(model.objective.queue1), dim=0))
        model.objective.queue2.copy_(F.normalize(torch.randn_like(model.objective.queue2), dim=0))
        model.objective.queue_ptr.fill_(10)
    views = torch.randn(3, 2, 3, 32, 32)
    student_before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    queues_before = model.objective.queue1.clone(), model.objective.queue2.clone()
    m, t = 0.9, config.moby_temperature

    out = model(views, None, teacher_momentum=m)

    # momentum step: every target parameter, from the weights before this step (the student has predictors too)
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, m * teacher_before[name] + (1 - m) * student_before[name])
    assert {n for n, _ in model.student.named_parameters()} - set(teacher_before) == {
        n for n, _ in model.student.named_parameters() if n.startswith("predictor.")
    }
    # the loss, with keys from the UPDATED target (the update comes before the key forward)
    with torch.no_grad():
        q = [
            unit(reference_mlp(model.student.predictor, reference_mlp(model.student.projector, rep)))
            for rep in (reference_image_representation(model.student, config, views[:, v]) for v in range(2))
        ]
        k = [
            unit(
                reference_mlp(
                    model.teacher.projector,
                    reference_image_representation(model.teacher, config, views[:, v]),
                )
            )
            for v in range(2)
        ]
    queue1, queue2 = queues_before
    expected = (
        sum(info_nce(q[0][b], k[1][b], list(queue2.T), t) for b in range(3)) / 3
        + sum(info_nce(q[1][b], k[0][b], list(queue1.T), t) for b in range(3)) / 3
    )
    torch.testing.assert_close(out.image_loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.patch_loss is None
    # the queue update: the oldest columns (10, 11, then 0) take this step's keys, after the loss used the queues
    expected1, expected2 = queue1.clone(), queue2.clone()
    for b, column in enumerate((10, 11, 0)):
        expected1[:, column], expected2[:, column] = k[0][b], k[1][b]
    torch.testing.assert_close(model.objective.queue1, expected1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.objective.queue2, expected2, atol=1e-6, rtol=1e-6)
    assert model.objective.queue_ptr.item() == 1
    out.loss.backward()  # the in-place queue update must not break the backward pass


def test_moby_eval_mode_leaves_queues_and_dino_refuses_a_momentum():
    model = make_model(tiny("vit", "moby")).eval()
    queue, pointer = model.objective.queue1.clone(), model.objective.queue_ptr.clone()
    with torch.no_grad():
        model(torch.randn(2, 2, 3, 32, 32))
    assert torch.equal(queue, model.objective.queue1) and torch.equal(pointer, model.objective.queue_ptr)
    with pytest.raises(ValueError, match="exactly two views"):
        model(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="update_teacher"):
        make_model(tiny("vit", "dino"))(torch.randn(2, 2, 3, 32, 32), teacher_momentum=0.99)


# ----------------------------------------------------------------------------- MoBY patch level


@pytest.mark.parametrize("negatives", [False, True])
def test_moby_patch_loss_matches_loops(negatives):
    torch.manual_seed(0)
    online = [torch.randn(2, 3, 5, 8), torch.randn(1, 3, 2, 8)]  # groups: (n_views, B, N, d)
    target = [torch.randn(2, 3, 5, 8), torch.randn(1, 3, 2, 8)]
    image_negatives = [torch.randn(2, 3, 8), torch.randn(1, 3, 8)]  # (n_views, B, d)
    if negatives:
        loss = MoBYPatchInfoNCELoss(0.2)(online, target, image_negatives)
    else:
        loss = MoBYPatchCosineLoss()(online, target)
    view_losses = []
    for o, z, n in zip(online, target, image_negatives):
        for v in range(o.shape[0]):
            terms = []
            for b in range(3):
                for i in range(o.shape[2]):
                    p, y = unit(o[v, b, i]), unit(z[v, b, i])
                    if negatives:
                        others = [unit(n[v, c]) for c in range(3) if c != b]
                        terms.append(info_nce(p, y, others, 0.2))
                    else:
                        terms.append(2 - 2 * (p @ y))
            view_losses.append(sum(terms) / len(terms))
    torch.testing.assert_close(loss, sum(view_losses) / len(view_losses), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("negatives", [False, True])
def test_moby_selfpatch_model_loss_matches_loops(negatives):
    config = tiny("vit", "moby", patch_negatives=negatives, drop_path_rate=0.0, num_positives=3)
    model = make_model(config)
    views = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad():
        out = model(views, None, update_state=False)
        norm, t = model.teacher.backbone.layernorm, config.moby_temperature
        view_losses = []
        for v in range(2):
            _, student_tokens, _ = backbone_tokens(model.student, views[:, v])
            raw, _, _ = backbone_tokens(model.teacher, views[:, v])
            batch, num_patches, dim = raw.shape
            online = reference_mlp(
                model.student.patch_predictor,
                reference_mlp(model.student.patch_projector, student_tokens.reshape(-1, dim)),
            )
            online = unit(online).view(batch, num_patches, -1)
            positives = reference_positives(raw, 4, 4, config.num_positives, 3)
            summaries = torch.stack(
                [
                    torch.stack(
                        [
                            norm(
                                reference_class_attention(model.teacher.aggregation, raw[b, positives[b][i]])
                            )
                            for i in range(num_patches)
                        ]
                    )
                    for b in range(batch)
                ]
            )
            target = unit(reference_mlp(model.teacher.patch_projector, summaries.reshape(-1, dim))).view(
                batch, num_patches, -1
            )
            image_reps = reference_image_representation(model.teacher, config, views[:, v])
            image_negatives = unit(reference_mlp(model.teacher.patch_projector, image_reps))
            terms = []
            for b in range(batch):
                for i in range(num_patches):
                    if negatives:
                        others = [image_negatives[c] for c in range(batch) if c != b]
                        terms.append(info_nce(online[b, i], target[b, i], others, t))
                    else:
                        terms.append(2 - 2 * online[b, i] @ target[b, i])
            view_losses.append(sum(terms) / len(terms))
        expected_patch = sum(view_losses) / 2
    torch.testing.assert_close(out.patch_loss, expected_patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.image_loss + 0.1 * expected_patch, atol=1e-5, rtol=1e-5)


def test_moby_needs_two_images_per_process_in_training():
    model = make_model(tiny("vit", "moby"))
    with pytest.raises(ValueError, match="at least 2 images per process"):
        model(torch.randn(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 2 images per process, or patch_negatives=False"):
        MoBYPatchInfoNCELoss(0.2)(
            [torch.randn(1, 1, 4, 8)], [torch.randn(1, 1, 4, 8)], [torch.randn(1, 1, 8)]
        )


# ----------------------------------------------------------------------------- two processes: the queue gather


def _queue_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        model = SelfPatchForPretraining(tiny("vit", "moby", patch=False))
        keys1 = torch.full((2, 8), float(rank + 1)) + torch.arange(2.0)[:, None] / 10  # (B=2, d=8), per rank
        keys2 = -keys1
        gathered = gather_across_processes(keys1)
        model.objective.enqueue_keys(keys1, keys2)
        torch.save(
            {
                "gathered": gathered,
                "queue1": model.objective.queue1,
                "queue2": model.objective.queue2,
                "ptr": model.objective.queue_ptr,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_enqueue_the_keys_of_both_ranks_in_rank_order(tmp_path):
    mp.spawn(_queue_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    keys = [torch.full((2, 8), float(r + 1)) + torch.arange(2.0)[:, None] / 10 for r in range(2)]
    in_rank_order = torch.cat(keys)  # rank 0's two keys, then rank 1's
    for result in results:
        torch.testing.assert_close(result["gathered"], in_rank_order, atol=0, rtol=0)
        torch.testing.assert_close(result["queue1"][:, :4], in_rank_order.T, atol=0, rtol=0)
        torch.testing.assert_close(result["queue2"][:, :4], -in_rank_order.T, atol=0, rtol=0)
        assert result["ptr"].item() == 4
    # both ranks hold the same queues (also in the columns nobody wrote: the same seed made them)
    assert torch.equal(results[0]["queue1"], results[1]["queue1"])
    assert torch.equal(results[0]["queue2"], results[1]["queue2"])


def test_sync_batch_norm_converts_moby_mlps_for_gpu_runs_only():
    model = SelfPatchForPretraining(tiny("vit", "moby"))
    assert sync_batch_norm(model, "cpu") is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = sync_batch_norm(model, torch.device("cuda"))  # a module swap: needs no GPU
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())


# ----------------------------------------------------------------------------- Swin: grids, aggregation


@pytest.mark.parametrize(
    "size,grid",
    [((32, 32), (4, 4)), ((24, 40), (3, 5)), ((24, 24), (3, 3)), ((16, 48), (2, 6)), ((40, 24), (5, 3))],
)
def test_swin_last_stage_grid_neighbours_and_features(size, grid):
    config = tiny("swin", "dino", num_positives=3, drop_path_rate=0.0)
    model = make_model(config)
    views = torch.randn(2, 2, 3, *size)
    with torch.no_grad():
        out = model(views, None, update_state=False)
    h, w = grid
    assert out.patch_grids == (grid, grid)
    for v in range(2):
        assert out.student_patch_representations[v].shape == (2, h * w, config.hidden_size)
        # the student's tokens are a plain SwinModel's last_hidden_state (its last stage, after the output norm)
        plain = SwinModel(config.backbone_config, add_pooling_layer=False).eval()
        plain.load_state_dict(model.student.backbone.state_dict())
        with torch.no_grad():
            expected = plain(views[:, v]).last_hidden_state
        torch.testing.assert_close(out.student_patch_representations[v], expected, atol=1e-6, rtol=1e-6)
        # positives: the 3 most similar of the 8 wrap-around neighbours on the last stage's grid
        with torch.no_grad():
            raw, _, _ = backbone_tokens(model.teacher, views[:, v])
        assert raw.shape[1] == h * w
        expected_positives = reference_positives(raw, h, w, 3, 3)
        selected = out.teacher_positive_indices[v]
        for b in range(2):
            for i in range(h * w):
                assert sorted(selected[b, i].tolist()) == expected_positives[b][i]


def test_swin_crops_smaller_than_the_window_are_padded_not_broken():
    # window 4 on a last stage of 2x2 (16 px crops) and 3x3 (24 px): transformers' Swin would fail here
    config = tiny("swin", "dino", window_size=4, drop_path_rate=0.0)
    model = make_model(config)
    out = model(torch.randn(2, 2, 3, 32, 32), [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 24, 24)])
    assert out.patch_grids == ((4, 4), (4, 4), (2, 2), (3, 3)) and torch.isfinite(out.loss)
    out.loss.backward()
    # the full-size crops are unaffected by the smaller ones before them
    view = torch.randn(1, 3, 32, 32)
    plain = SwinModel(config.backbone_config, add_pooling_layer=False).eval()
    plain.load_state_dict(model.teacher.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            model.teacher.encode(view)[1], plain(view).last_hidden_state, atol=1e-6, rtol=0
        )


def test_aggregation_over_swin_tokens_is_the_image_representation():
    config = tiny("swin", "moby", drop_path_rate=0.0)
    model = make_model(config)
    assert model.student.aggregation.blocks[0].attn.num_heads == 4  # the last stage's heads
    views = torch.randn(3, 2, 3, 32, 40)
    with torch.no_grad():
        out = model(views, None, update_state=False)
        for v in range(2):
            raw, _, _ = backbone_tokens(model.student, views[:, v])
            assert raw.shape == (3, 4 * 5, 32)
            norm = model.student.backbone.layernorm
            expected = torch.stack(
                [norm(reference_class_attention(model.student.aggregation, raw[b])) for b in range(3)]
            )
            torch.testing.assert_close(out.student_image_representations[v], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- export, checkpoints, every combination

CHILD = """
import sys, torch
from transformers import AutoModel
folder, inputs, out = sys.argv[1:4]
model = AutoModel.from_pretrained(folder).eval()
with torch.no_grad():
    result = model(torch.load(inputs, weights_only=True))
assert "selfpatch_hf" not in sys.modules
torch.save({"tokens": result.last_hidden_state, "pooled": result.pooler_output, "type": type(model).__name__}, out)
"""


def test_swin_export_round_trip_in_a_process_that_never_imports_selfpatch(tmp_path):
    config = tiny("swin", "moby", drop_path_rate=0.0)
    model = make_model(config)
    model(torch.randn(2, 2, 3, 32, 32), teacher_momentum=0.5)  # a step: queues, BatchNorm statistics move
    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo

    folder = export_backbone(
        model, tmp_path / "backbone", card_info=BackboneCardInfo.from_selfpatch_config(config)
    )
    card = (folder / "README.md").read_text()
    assert "SelfPatch (MoBY + patch-level loss)" in card and "`SwinModel`" in card and "no CLS token" in card
    saved = json.loads((folder / "config.json").read_text())
    assert (
        saved["model_type"] == "swin" and saved["architectures"] == ["SwinModel"] and "auto_map" not in saved
    )
    assert saved["drop_path_rate"] == 0.0
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"].startswith("ViTImageProcessor") and processor["resample"] == 3
    pixels = torch.randn(2, 3, 32, 48)
    torch.save(pixels, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["type"] == "SwinModel"
    with torch.no_grad():
        expected = model.teacher.encode(pixels)[1]
    torch.testing.assert_close(out["tokens"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["pooled"], expected.mean(1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("objective", ["dino", "moby"])
@pytest.mark.parametrize("backbone", ["vit", "swin"])
@pytest.mark.parametrize("patch", [False, True], ids=["plain", "selfpatch"])
def test_every_combination_trains_saves_resumes_exactly_and_exports(tmp_path, backbone, objective, patch):
    config = tiny(backbone, objective, patch=patch, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = SelfPatchForPretraining(config).train()
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def batch():
        views = torch.randn(3, 2, 3, 32, 32, generator=generator)
        local = torch.randn(3, 2, 3, 16, 16, generator=generator) if objective == "dino" else None
        return views, local

    def step(model, optimizer, views, local):
        kwargs = {"teacher_momentum": 0.9} if objective == "moby" else {"teacher_temperature": 0.05}
        loss = model(views, local, **kwargs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if objective == "dino":
            model.update_teacher(0.9)
        return loss.item()

    losses = [step(model, optimizer, *batch()) for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path / "checkpoint")
    assert type(loaded) is SelfPatchForPretraining is SelfPatchViTForPretraining
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    # resume as a training loop does (accelerate's load_state): the saved state copied into a fresh model. Tensors
    # loaded from a file may sit at other memory alignments, which changes the last bits of some CPU kernels.
    resumed = SelfPatchForPretraining(config).train()
    resumed.load_state_dict(loaded.state_dict())
    resumed_optimizer = torch.optim.AdamW(
        [p for p in resumed.student.parameters() if p.requires_grad], lr=1e-3
    )
    resumed_optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    views, local = batch()
    assert step(model, optimizer, views, local) == step(resumed, resumed_optimizer, views, local)
    for name, value in model.state_dict().items():  # queues, pointers, centres, BatchNorm statistics included
        assert torch.equal(value, resumed.state_dict()[name]), name
    folder = export_backbone(resumed, tmp_path / "backbone")
    assert json.loads((folder / "config.json").read_text())["model_type"] == backbone


# ----------------------------------------------------------------------------- configuration


def test_preset_overrides_go_to_the_backbone_or_the_selfpatch_config():
    config = SelfPatchConfig.from_preset(
        "swin-tiny-patch4-window7", image_objective="moby", depths=[1, 1, 1, 1]
    )
    assert (
        type(config.backbone_config).__name__ == "SwinConfig"
        and list(config.backbone_config.depths) == [1] * 4
    )
    assert config.image_objective == "moby" and config.patch_size == 32 and config.hidden_size == 768
    # MoBY's own defaults: online drop-path 0.2 (its crops and momentum: the training recipe, recipes.py)
    assert config.drop_path_rate == 0.2
    assert (config.moby_temperature, config.moby_queue_size) == (0.2, 4096)
    assert (config.moby_projector_hidden_dim, config.moby_projection_dim, config.patch_negatives) == (
        4096,
        256,
        True,
    )
    dino = SelfPatchConfig.from_preset("swin-tiny-patch4-window7")
    assert (dino.image_objective, dino.drop_path_rate) == ("dino", 0.1)
    vit_moby = SelfPatchConfig.from_preset(
        "vit-small-patch16", image_objective="moby", image_representation="cls", patch_loss_weight=0
    )
    assert vit_moby.backbone_config.model_type == "vit"


@pytest.mark.parametrize(
    "preset,overrides,message",
    [
        (
            "vit-tiny-patch16",
            {"image_objective": "moby", "image_out_dim": 128},
            "image_out_dim=128 is a DINO setting",
        ),
        ("vit-tiny-patch16", {"image_objective": "moby", "student_temperature": 0.2}, "DINO setting"),
        ("vit-tiny-patch16", {"moby_queue_size": 1024}, "moby_queue_size=1024 is a MoBY setting"),
        ("vit-tiny-patch16", {"patch_negatives": False}, "patch_negatives=False is a MoBY setting"),
        ("vit-tiny-patch16", {"image_objective": "moby", "num_local_crops": 6}, "a training setting"),
        ("vit-tiny-patch16", {"image_objective": "byol"}, "image_objective must be one of"),
        ("swin-tiny-patch4-window7", {"image_representation": "cls"}, "A Swin has no CLS token"),
        ("swin-tiny-patch4-window7", {"num_heads": [3, 6, 12, 25]}, "not divisible by its 25 heads"),
        (
            "swin-tiny-patch4-window7",
            {"global_crop_size": 200},
            "global_crop_size is no SelfPatchConfig field",
        ),
        (
            "swin-tiny-patch4-window7",
            {"num_hidden_layers": 4},
            "neither a SelfPatchConfig nor a SwinConfig field",
        ),
    ],
)
def test_settings_of_the_other_objective_and_bad_swin_settings_are_refused(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        SelfPatchConfig.from_preset(preset, **overrides)


# ----------------------------------------------------------------------------- mixed precision


def test_moby_losses_run_in_fp32_under_autocast():
    """The products against the queue and against the other images' negatives leave autocast: under bf16 they give
    exactly the fp32 values (autocast would otherwise run them as bf16 matrix products)."""
    torch.manual_seed(0)
    queries, keys = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(8, 12), dim=0)
    online, target, negatives = [torch.randn(2, 4, 5, 8)], [torch.randn(2, 4, 5, 8)], [torch.randn(2, 4, 8)]
    image_loss, patch_loss = MoBYContrastiveLoss(0.2), MoBYPatchInfoNCELoss(0.2)
    fp32 = image_loss(queries, keys, queue), patch_loss(online, target, negatives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = image_loss(queries, keys, queue), patch_loss(online, target, negatives)
    for value, expected in zip(mixed, fp32):
        assert value.dtype == torch.float32 and torch.equal(value, expected)


@pytest.mark.parametrize("backbone", ["vit", "swin"])
@pytest.mark.parametrize("negatives", [True, False])
def test_moby_bf16_autocast_loss_and_gradients_match_fp32(backbone, negatives):
    """Backbone, aggregation and MLPs under bf16 autocast; the contrasted vectors, their products, the losses and
    the queues in fp32 (as DINO's test in test_gpu_training.py).

    Tolerance: losses within 2% (relative) of fp32 on the same weights and views, the online network's gradient
    direction within cosine 0.8 of fp32's (measured: losses at most 1.0% off; cosine at least 0.944 on one CPU and
    0.88 on another, whose bf16 kernels round differently). MoBY's tiny model is far
    more sensitive to the bf16 features than DINO's (InfoNCE at temperature 0.2 over 8-d unit vectors, BatchNorm
    over 4 images): that error is the features' (running the MLPs in fp32 does not reduce it); the losses' own
    part is gone (`test_moby_losses_run_in_fp32_under_autocast`). The keys enter the fp32 queues as unit vectors."""
    config = tiny(backbone, "moby", patch_negatives=negatives, drop_path_rate=0.0)
    model = make_model(config)
    views = torch.randn(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reference = model(views, None, update_state=False)
    reference.loss.backward()
    reference_grads = torch.cat([p.grad.flatten() for p in model.student.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    pointer = int(model.objective.queue_ptr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(views, None)
    mixed.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters() if p.grad is not None])

    assert mixed.loss.dtype == torch.float32
    for name in ("loss", "image_loss", "patch_loss"):
        torch.testing.assert_close(getattr(mixed, name), getattr(reference, name), rtol=0.02, atol=0)
    assert F.cosine_similarity(grads, reference_grads, dim=0) > 0.8
    for queue in (model.objective.queue1, model.objective.queue2):
        assert queue.dtype == torch.float32
        written = queue[:, [(pointer + i) % queue.shape[1] for i in range(4)]]
        torch.testing.assert_close(written.norm(dim=0), torch.ones(4), rtol=0, atol=1e-6)
