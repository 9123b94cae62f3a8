"""SelfPatchForPretraining against independent, loop-based implementations of docs/method.md sections 3-8."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_config, tiny_dino_config
from transformers import AutoConfig, AutoModelForPreTraining
from transformers.models.vit.modeling_vit import ViTLayer

from selfpatch_hf import (
    SelfPatchConfig,
    SelfPatchForPretraining,
    build_neighbor_table,
    select_positive_neighbors,
)
from selfpatch_hf.models.selfpatch.aggregation import SelfPatchAggregation

# ----------------------------------------------------------------------------- independent reference implementations


def brute_force_neighbors(height: int, width: int, window: int | str) -> list[list[int]]:
    table = []
    for row in range(height):
        for col in range(width):
            p = row * width + col
            if window == "all":
                table.append([q for q in range(height * width) if q != p])
                continue
            radius = window // 2
            cells = []
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    if dr == 0 and dc == 0:
                        continue
                    cells.append(((row + dr) % height) * width + (col + dc) % width)
            table.append(cells)
    return table


def reference_positives(
    features: torch.Tensor, height: int, width: int, k: int, window
) -> list[list[list[int]]]:
    """For each (b, i): the k neighbours j of i with the largest cos(f_i, f_j), by explicit loops, sorted.

    On grids smaller than the window the torus visits a cell more than once; such a cell counts once per visit."""
    neighbors = brute_force_neighbors(height, width, window)
    result = []
    for b in range(features.shape[0]):
        per_patch = []
        for i in range(height * width):
            sims = [
                (F.cosine_similarity(features[b, i], features[b, j], dim=0).item(), j) for j in neighbors[i]
            ]
            sims.sort(reverse=True)
            per_patch.append(sorted(j for _, j in sims[:k]))
        result.append(per_patch)
    return result


def reference_class_attention(aggregation: SelfPatchAggregation, tokens: torch.Tensor) -> torch.Tensor:
    """h(tokens) for ONE sequence `(T, D)`, from the formulas of docs/method.md section 5: u = [cls; tokens], cls += Attn(LN1(u))[cls], ..."""
    cls = aggregation.cls_token[0, 0]
    dim = cls.shape[0]
    for block in aggregation.blocks:
        heads = block.attn.num_heads
        head_dim = dim // heads
        u = torch.cat([cls[None], tokens])  # (1 + T, D)
        un = F.layer_norm(u, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        q = un[0] @ block.attn.q.weight.T + block.attn.q.bias  # query: the class position only
        keys = un @ block.attn.k.weight.T + block.attn.k.bias
        values = un @ block.attn.v.weight.T + block.attn.v.bias
        head_outputs = []
        for h in range(heads):
            sl = slice(h * head_dim, (h + 1) * head_dim)
            scores = torch.stack([(q[sl] * keys[t, sl]).sum() for t in range(u.shape[0])]) * head_dim**-0.5
            weights = torch.softmax(scores, dim=0)
            head_outputs.append(sum(weights[t] * values[t, sl] for t in range(u.shape[0])))
        attn = torch.cat(head_outputs) @ block.attn.proj.weight.T + block.attn.proj.bias
        cls = cls + attn
        normed = F.layer_norm(cls, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        hidden = F.gelu(normed @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        cls = cls + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return cls


def reference_head(head, x: torch.Tensor) -> torch.Tensor:
    """MLP (Linear-GELU-...-Linear) -> L2 normalise -> x @ (g * v / ||v||)^T."""
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    for n, linear in enumerate(linears):
        x = x @ linear.weight.T + linear.bias
        if n < len(linears) - 1:
            x = F.gelu(x)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    params = head.last_layer.parametrizations.weight
    g, v = params.original0, params.original1
    weight = g * v / v.norm(dim=1, keepdim=True)
    return x @ weight.T


def reference_view_outputs(network, view: torch.Tensor, config: SelfPatchConfig, teacher: bool):
    """Runs ONE view through a network with the reference pieces above."""
    out = network.backbone(view, interpolate_pos_encoding=True, output_hidden_states=True)
    raw = out.hidden_states[-1][:, 1:]  # f: last encoder layer, before the final norm
    normed = out.last_hidden_state
    norm = network.backbone.layernorm
    batch, num_patches, _ = raw.shape
    if config.image_representation == "cls":
        image_rep = normed[:, 0]
    else:
        image_rep = torch.stack(
            [norm(reference_class_attention(network.aggregation, raw[b])) for b in range(batch)]
        )
    result = {"image": reference_head(network.image_head, image_rep)}
    if config.patch_loss_weight > 0:
        if teacher:
            grid = (view.shape[-2] // config.patch_size, view.shape[-1] // config.patch_size)
            positives = reference_positives(raw, *grid, config.num_positives, config.neighborhood_size)
            if config.neighbor_aggregation == "mean":  # the paper's average-pooling ablation

                def summarise(tokens):
                    return tokens.mean(0)
            else:

                def summarise(tokens):
                    return reference_class_attention(network.aggregation, tokens)

            summaries = torch.stack(
                [
                    torch.stack([norm(summarise(raw[b, positives[b][i]])) for i in range(num_patches)])
                    for b in range(batch)
                ]
            )
            result["patch"] = reference_head(network.patch_head, summaries)
        else:
            result["patch"] = reference_head(network.patch_head, normed[:, 1:])
    return result


def cross_entropy(teacher_logits, center, teacher_temp, student_logits, student_temp) -> torch.Tensor:
    p = torch.softmax((teacher_logits - center) / teacher_temp, dim=-1)
    return -(p * torch.log_softmax(student_logits / student_temp, dim=-1)).sum()


# ----------------------------------------------------------------------------- helpers


def make_model(
    config: SelfPatchConfig, seed: int = 0, perturb_teacher: bool = True
) -> SelfPatchForPretraining:
    torch.manual_seed(seed)
    model = SelfPatchForPretraining(config)
    with torch.no_grad():
        if perturb_teacher:  # student and teacher must differ for the tests to see which one is used where
            for p in model.teacher.parameters():
                if p.ndim > 1 and p.shape[-1] != 1:
                    p.add_(0.01 * torch.randn_like(p))
        model.objective.image_center.normal_(0, 0.1)
        if model.objective.patch_center.numel():
            model.objective.patch_center.normal_(0, 0.1)
    return model


def crops(
    batch: int, num_global: int = 2, num_local: int = 4, global_size=(32, 32), local_size=(16, 16), seed=1
):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, num_global, 3, *global_size, generator=generator)
    loc = torch.randn(batch, num_local, 3, *local_size, generator=generator)
    return g, loc


# ----------------------------------------------------------------------------- 3. neighbourhood table


@pytest.mark.parametrize(
    "height,width,window",
    [
        (14, 14, 3),
        (6, 6, 3),
        (5, 7, 3),
        (14, 14, 5),
        (6, 6, 5),
        (5, 7, 5),
        (6, 6, "all"),
        (5, 7, "all"),
        (28, 28, 3),
    ],
)
def test_neighbor_table_matches_brute_force(height, width, window):
    table = build_neighbor_table(height, width, window)
    expected = brute_force_neighbors(height, width, window)
    num_neighbors = height * width - 1 if window == "all" else window * window - 1
    assert table.shape == (height * width, num_neighbors)
    assert table.dtype == torch.long
    for p, row in enumerate(table.tolist()):
        assert sorted(row) == sorted(expected[p])


def test_neighbor_table_wraps_around_like_the_spec_example():
    table = build_neighbor_table(14, 14, 3)
    assert set(table[0].tolist()) == {1, 13, 14, 15, 27, 182, 183, 195}
    assert all(len(set(row)) == 8 for row in table.tolist())  # every patch has exactly 8 distinct neighbours


@pytest.mark.parametrize("window", [4, 1, "some"])
def test_neighbor_table_rejects_bad_windows(window):
    with pytest.raises(ValueError, match="odd"):
        build_neighbor_table(6, 6, window)


# ----------------------------------------------------------------------------- 4. positive matching


@pytest.mark.parametrize(
    "height,width,window,k", [(6, 6, 3, 4), (5, 7, 3, 1), (5, 7, 5, 8), (4, 5, "all", 3), (2, 3, 3, 4)]
)
def test_positive_selection_matches_loops(height, width, window, k):
    torch.manual_seed(0)
    features = torch.randn(2, height * width, 16)
    selected = select_positive_neighbors(features, (height, width), k, window)
    assert selected.shape == (2, height * width, k)
    expected = reference_positives(features, height, width, k, window)
    for b in range(2):
        for i in range(height * width):
            assert sorted(selected[b, i].tolist()) == expected[b][i]


def test_positive_selection_uses_cosine_not_dot_product():
    # patch 1 is parallel to patch 0 but tiny; patch 2 is large but at an angle: cosine must prefer patch 1
    features = torch.zeros(1, 9, 2)
    features[0, :, 0] = -1.0  # everything else points away
    features[0, 0] = torch.tensor([1.0, 0.0])
    features[0, 1] = torch.tensor([1e-3, 0.0])
    features[0, 2] = torch.tensor([100.0, 100.0])
    assert select_positive_neighbors(features, (3, 3), 1)[0, 0].item() == 1


def test_positive_selection_over_all_patches_is_fp32_under_autocast():
    """With `"all"` the similarities are one matrix product, which autocast would run in bf16: near-ties (patches
    close to one of a few prototypes) would then be ranked by rounding."""
    torch.manual_seed(0)
    prototypes = torch.randn(3, 16)
    features = prototypes[torch.randint(0, 3, (2, 30))] + 1e-3 * torch.randn(2, 30, 16)
    exact = select_positive_neighbors(features, (5, 6), 4, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(select_positive_neighbors(features, (5, 6), 4, "all"), exact)


# ----------------------------------------------------------------------------- 5. aggregation module


def test_aggregation_module_matches_spec_formulas():
    config = tiny_config()
    model = make_model(config)
    aggregation = model.student.aggregation
    torch.manual_seed(3)
    tokens = torch.randn(3, 7, config.hidden_size)
    with torch.no_grad():
        batched = aggregation(tokens)
        for b in range(3):
            torch.testing.assert_close(
                batched[b], reference_class_attention(aggregation, tokens[b]), atol=1e-5, rtol=1e-5
            )


def test_neighbor_aggregation_equals_one_sequence_per_patch():
    config = tiny_config()
    model = make_model(config)
    aggregation = model.teacher.aggregation
    torch.manual_seed(4)
    tokens = torch.randn(2, 12, config.hidden_size)
    index = torch.randint(0, 12, (2, 12, 4))
    with torch.no_grad():
        fast = aggregation.aggregate_neighbors(tokens, index)
        for b in range(2):
            for i in range(12):
                expected = reference_class_attention(aggregation, tokens[b, index[b, i]])
                torch.testing.assert_close(fast[b, i], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 6-7. heads, losses, centres


def reference_losses(model: SelfPatchForPretraining, global_crops, local_crops, teacher_temp):
    """Image loss, patch loss and the new centres by loops over views, pairs, images and patches."""
    config = model.config
    views = list(global_crops.unbind(1)) + list(local_crops.unbind(1))
    num_global, batch = global_crops.shape[1], global_crops.shape[0]
    with torch.no_grad():
        student = [reference_view_outputs(model.student, v, config, teacher=False) for v in views]
        teacher_views = views if config.patch_loss_weight > 0 else views[:num_global]
        teacher = [reference_view_outputs(model.teacher, v, config, teacher=True) for v in teacher_views]
    center, patch_center = model.objective.image_center.clone(), model.objective.patch_center.clone()
    t_s = config.student_temperature

    terms = []
    for q in range(num_global):
        for v in range(len(views)):
            if v == q:
                continue
            per_image = [
                cross_entropy(teacher[q]["image"][b], center[0], teacher_temp, student[v]["image"][b], t_s)
                for b in range(batch)
            ]
            terms.append(sum(per_image) / batch)
    image_loss = sum(terms) / len(terms)

    patch_loss = None
    if config.patch_loss_weight > 0:
        view_terms = []
        for v in range(len(views)):
            n = student[v]["patch"].shape[1]
            total = sum(
                cross_entropy(
                    teacher[v]["patch"][b, i], patch_center[0], teacher_temp, student[v]["patch"][b, i], t_s
                )
                for b in range(batch)
                for i in range(n)
            )
            view_terms.append(total / (batch * n))
        patch_loss = sum(view_terms) / len(view_terms)

    m = config.center_momentum
    rows = [t["image"][b] for t in teacher for b in range(batch)]
    new_center = m * center + (1 - m) * torch.stack(rows).mean(0, keepdim=True)
    new_patch_center = None
    if config.patch_loss_weight > 0:
        patch_rows = [
            t["patch"][b, i] for t in teacher for b in range(batch) for i in range(t["patch"].shape[1])
        ]
        new_patch_center = m * patch_center + (1 - m) * torch.stack(patch_rows).mean(0, keepdim=True)
    return image_loss, patch_loss, new_center, new_patch_center


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"neighbor_aggregation": "mean"},
        {"neighborhood_size": "all", "num_positives": 2},
        {"patch_loss_weight": 1.0, "num_positives": 1},
    ],
    ids=["selfpatch", "mean-ablation", "all-patches", "lambda1-k1"],
)
def test_losses_and_centres_match_loop_reference(overrides):
    config = tiny_config(drop_path_rate=0.0, **overrides)
    model = make_model(config).train()
    global_crops, local_crops = crops(batch=2, num_local=3)
    expected_image, expected_patch, expected_center, expected_patch_center = reference_losses(
        model, global_crops, local_crops, teacher_temp=0.05
    )
    out = model(global_crops, local_crops, teacher_temperature=0.05)
    torch.testing.assert_close(out.image_loss, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch_loss, expected_patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.loss, expected_image + config.patch_loss_weight * expected_patch, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(model.objective.image_center, expected_center, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.objective.patch_center, expected_patch_center, atol=1e-6, rtol=1e-5)


def test_cls_representation_with_lambda_zero_is_plain_dino():
    config = tiny_dino_config(drop_path_rate=0.0)
    model = make_model(config).train()
    assert model.student.aggregation is None and model.student.patch_head is None
    assert model.objective.patch_center.numel() == 0
    global_crops, local_crops = crops(batch=3, num_local=2)
    expected_image, _, expected_center, _ = reference_losses(
        model, global_crops, local_crops, teacher_temp=0.07
    )

    teacher_batches = []
    model.teacher.backbone.register_forward_hook(
        lambda mod, args, kwargs_out: teacher_batches.append(args[0].shape)
    )
    out = model(global_crops, local_crops, teacher_temperature=0.07)
    torch.testing.assert_close(out.loss, expected_image, atol=1e-5, rtol=1e-5)
    assert out.patch_loss is None and out.teacher_positive_indices is None
    # the teacher saw only the global crops, in a single batched call
    assert teacher_batches == [torch.Size([2 * 3, 3, 32, 32])]
    # DINO's centre: mean over the teacher outputs of the global crops only
    torch.testing.assert_close(model.objective.image_center, expected_center, atol=1e-6, rtol=1e-5)


def test_dino_loss_against_formula_with_manual_logits():
    from selfpatch_hf.models.selfpatch.objectives.dino import DINOImageLoss

    torch.manual_seed(0)
    student, teacher, center = torch.randn(5, 3, 11), torch.randn(2, 3, 11), torch.randn(1, 11)
    total, count = 0.0, 0
    for q in range(2):
        for v in range(5):
            if v != q:
                total += (
                    sum(cross_entropy(teacher[q, b], center[0], 0.04, student[v, b], 0.1) for b in range(3))
                    / 3
                )
                count += 1
    torch.testing.assert_close(DINOImageLoss(0.1)(student, teacher, center, 0.04), total / count)


# ----------------------------------------------------------------------------- 8. teacher, gradients, EMA


def test_teacher_gets_no_gradient_and_student_does():
    model = make_model(tiny_config()).train()
    out = model(*crops(batch=2))
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    grads = {name: p.grad for name, p in model.student.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # the frozen weight-norm magnitudes stay out of the optimiser
    assert not model.student.image_head.last_layer.parametrizations.weight.original0.requires_grad


def test_update_teacher_is_an_ema_of_every_parameter():
    model = make_model(tiny_config())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * student[name])
    model.update_teacher(1.0)  # momentum 1 leaves the teacher alone
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * student[name])
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


def test_fresh_teacher_is_a_copy_of_the_student():
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config())
    for (name, s), t in zip(model.student.named_parameters(), model.teacher.parameters()):
        assert torch.equal(s, t), name


def test_heads_last_layers_start_as_dino_builds_them_and_keep_a_loaded_magnitude(tmp_path):
    """DINO's DINOHead: weight_g filled with 1 (frozen with norm_last_layer), weight_v as nn.Linear draws it. So every
    output row of the last layer has unit norm, and a loaded checkpoint keeps its own magnitudes."""
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config())
    for network in (model.student, model.teacher):
        for head in (network.image_head, network.patch_head):
            weight = head.last_layer.parametrizations.weight
            assert torch.equal(weight.original0, torch.ones_like(weight.original0))
            assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(weight.original0.shape[0]))
            # the direction is torch's default Linear draw (kaiming uniform: |v| <= 1/sqrt(fan_in)), not rescaled
            assert weight.original1.abs().max() <= weight.original1.shape[1] ** -0.5
    with torch.no_grad():
        model.student.image_head.last_layer.parametrizations.weight.original0.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = SelfPatchForPretraining.from_pretrained(tmp_path)
    magnitude = loaded.student.image_head.last_layer.parametrizations.weight.original0
    assert torch.equal(magnitude, torch.full_like(magnitude, 0.5))


def test_drop_path_only_in_student_and_only_in_training():
    model = make_model(tiny_config(drop_path_rate=0.5))
    rates = [layer.drop_path.drop_prob for layer in model.student.backbone.layers]
    assert rates == pytest.approx([0.0, 0.5])
    assert all(type(layer) is ViTLayer for layer in model.teacher.backbone.layers)  # no stochastic depth
    view = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model.student.encode(view)[0], model.student.encode(view)[0]
    assert torch.equal(a, b)
    model.train()
    assert model.teacher.training is False  # the teacher stays in eval mode
    with torch.no_grad():
        outs = [model.student.encode(view)[0] for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ----------------------------------------------------------------------------- shapes, batch size 1, inputs


def test_mixed_and_non_square_crop_sizes():
    config = tiny_config(num_positives=3)
    model = make_model(config).train()
    global_crops = torch.randn(2, 2, 3, 32, 48)  # 4x6 grid, not square
    local_crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 24, 16)]
    out = model(global_crops, local_crops, teacher_temperature=0.04)
    assert out.patch_grids == ((4, 6), (4, 6), (2, 2), (2, 2), (3, 2))
    assert [r.shape for r in out.student_patch_representations] == [
        (2, 24, 32),
        (2, 24, 32),
        (2, 4, 32),
        (2, 4, 32),
        (2, 6, 32),
    ]
    assert [i.shape for i in out.teacher_positive_indices] == [
        (2, 24, 3),
        (2, 24, 3),
        (2, 4, 3),
        (2, 4, 3),
        (2, 6, 3),
    ]
    assert all(r.shape == (2, 32) for r in out.student_image_representations)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_batch_size_one_and_no_local_crops():
    model = make_model(tiny_config()).train()
    global_crops, local_crops = crops(batch=1)
    out = model(global_crops, local_crops)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    out.loss.backward()
    out = model(global_crops)  # 0 local crops
    assert len(out.student_patch_representations) == 2 and torch.isfinite(out.loss)
    out = model(global_crops, torch.zeros(1, 0, 3, 16, 16))  # an empty local tensor is 0 local crops
    assert len(out.student_patch_representations) == 2


def test_bad_inputs_give_clear_errors():
    model = make_model(tiny_config())
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 2, 3, 30, 32))
    with pytest.raises(ValueError, match="at least two views"):
        model(torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randn(2, 2, 3, 32, 32), torch.randn(3, 2, 3, 16, 16))


def test_eval_mode_does_not_move_centres():
    model = make_model(tiny_config()).eval()
    center, patch_center = model.objective.image_center.clone(), model.objective.patch_center.clone()
    with torch.no_grad():
        model(*crops(batch=2))
    assert torch.equal(center, model.objective.image_center) and torch.equal(
        patch_center, model.objective.patch_center
    )


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_positives": 9}, "between 1 and the 8 neighbours"),
        ({"neighborhood_size": 5, "num_positives": 25}, "between 1 and the 24 neighbours"),
        ({"neighborhood_size": 4}, "odd"),
        ({"neighborhood_size": "every"}, "odd int"),
        ({"num_attention_heads": 3}, "divisible by num_attention_heads"),
        # the crop recipe is a training setting (tests/test_training_recipes.py checks it there)
        (
            {"global_crop_size": 36},
            "global_crop_size is no SelfPatchConfig field any more: .* --global_crop_size",
        ),
        ({"patch_loss_weight": -1.0}, "lambda"),
        ({"center_momentum": 1.0}, "center_momentum"),
        ({"student_temperature": 0.0}, "student_temperature"),
        ({"image_representation": "cls"}, "untrained"),
        ({"image_representation": "mean"}, "image_representation"),
    ],
)
def test_invalid_configs_raise(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="Unknown preset 'vit-huge'.*vit-small-patch16"):
        SelfPatchConfig.from_preset("vit-huge")
    with pytest.raises(ValueError, match="Unknown config field 'lambda_'"):
        SelfPatchConfig.from_preset("vit-small-patch16", lambda_=0.1)


def test_presets_match_the_paper():
    expected = {
        "vit-tiny-patch16": (192, 12, 3, 768, 16),
        "vit-small-patch16": (384, 12, 6, 1536, 16),
        "vit-small-patch8": (384, 12, 6, 1536, 8),
        "vit-base-patch16": (768, 12, 12, 3072, 16),
    }
    for name, dims in expected.items():
        backbone = SelfPatchConfig.from_preset(name).backbone_config
        got = (
            backbone.hidden_size,
            backbone.num_hidden_layers,
            backbone.num_attention_heads,
            backbone.intermediate_size,
            backbone.patch_size,
        )
        assert got == dims, name
        assert backbone.layer_norm_eps == 1e-6 and backbone.hidden_act == "gelu" and backbone.qkv_bias
    default = SelfPatchConfig()
    assert (
        default.image_out_dim,
        default.patch_out_dim,
        default.num_positives,
        default.patch_loss_weight,
    ) == (
        65536,
        4096,
        4,
        0.1,
    )
    assert default.backbone_config.hidden_size == 384 and default.backbone_config.model_type == "vit"


# ----------------------------------------------------------------------------- save / load, Auto classes


def test_save_load_round_trip_reproduces_the_loss_bit_for_bit(tmp_path):
    model = make_model(tiny_config()).eval()
    global_crops, local_crops = crops(batch=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(loaded) is SelfPatchForPretraining
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    assert {name: p.requires_grad for name, p in loaded.named_parameters()} == trainable
    assert not any(p.requires_grad for p in loaded.teacher.parameters())
    assert not loaded.student.image_head.last_layer.parametrizations.weight.original0.requires_grad
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SelfPatchConfig)
    assert torch.equal(loaded.objective.image_center, model.objective.image_center)
    assert torch.equal(loaded.objective.patch_center, model.objective.patch_center)
    with torch.no_grad():
        a = model(global_crops, local_crops, teacher_temperature=0.06)
        b = loaded(global_crops, local_crops, teacher_temperature=0.06)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.patch_loss, b.patch_loss)
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name


def test_loss_is_finite_and_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config(drop_path_rate=0.0)).train()
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    global_crops, local_crops = crops(batch=4)
    losses = []
    for _ in range(8):
        loss = model(global_crops, local_crops, teacher_temperature=0.04).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(0.9)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
