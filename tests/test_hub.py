"""Model cards and publishing, against the loopback Hub server (tests/hub_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from reference_checkpoints import backbone_state, reference_vit, selfpatch_training_checkpoint
from tiny_models import tiny_config
from transformers import AutoImageProcessor

from selfpatch_hf import SelfPatchForPretraining, export_backbone
from selfpatch_hf.conversion.convert import convert_checkpoint
from selfpatch_hf.hub.cards.backbone import (
    BASE_TAGS,
    REPO_ID_PLACEHOLDER,
    BackboneCardInfo,
    render_backbone_card,
    write_backbone_card,
)
from selfpatch_hf.hub.publishing import PublishError, check_backbone_folder, push_backbone
from selfpatch_hf.hub.uploads import AsyncHubUploader, push_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL = {
    "task": "video-object-segmentation",
    "dataset": "davis-2017",
    "dataset_name": "DAVIS 2017",
    "split": "val",
    "metric": "j_and_f_mean",
    "value": 62.7,
}


def card_info(**overrides) -> BackboneCardInfo:
    values = {
        "architecture": "vit-tiny-patch8 (2 layers, width 32)",
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "datasets": ["imagenet-1k"],
        "epochs": 2,
        "steps": 10,
        "global_batch_size": 8,
        "learning_rate": 1.5e-5,
        "patch_loss_weight": 0.1,
        "num_positives": 4,
        "neighborhood_size": 3,
        "image_representation": "aggregation",
        "global_crop_size": 32,
        "local_crop_size": 16,
        "num_global_crops": 2,
        "num_local_crops": 4,
        "eval_results": [EVAL],
    }
    values.update(overrides)
    return BackboneCardInfo(**values)


@pytest.fixture
def trained(tmp_path):
    """A tiny SelfPatch model, its exported teacher backbone (with card) and its pretraining checkpoint."""
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config()).eval()
    backbone = export_backbone(model, tmp_path / "backbone", card_info=card_info())
    model.save_pretrained(tmp_path / "pretraining")
    return model, backbone, tmp_path / "pretraining"


# ---------------------------------------------------------------------------------------------------- model card
def test_card_metadata_and_content():
    card = render_backbone_card(card_info())
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert (
        set(BASE_TAGS) <= set(data.tags) and data.license == "apache-2.0" and data.datasets == ["imagenet-1k"]
    )
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.metric_type, result.metric_value) == (
        "video-object-segmentation",
        "davis-2017",
        "j_and_f_mean",
        62.7,
    )
    text = card.content
    for expected in (
        "| patch loss weight (lambda) | 0.1 |",
        "| positives per patch (k) | 4 |",
        "| local crops | 4 x 16 px |",
    ):
        assert expected in text
    assert "tokens[:, 1:]" in text and "(H/p, W/p, C)" in text and "yun2022patch" in text
    assert "model-index" in text

    # the usage snippet runs: on a real exported folder it gives the (H/p, W/p, C) map
    snippet = text.split("```python\n")[1].split("```")[0]
    assert REPO_ID_PLACEHOLDER in snippet

    converted = render_backbone_card(
        card_info(
            source="converted",
            converted_from="dino_selfpatch.pth",
            model_class="SiglipVisionModel",
            num_prefix_tokens=0,
            warnings=["pre-norm features"],
            eval_results=[],
        )
    )
    assert "model-index" not in converted.content and "dino_selfpatch.pth" in converted.content
    assert "> **Warning:** pre-norm features" in converted.content
    assert "patch_tokens = tokens  #" in converted.content  # no CLS to drop

    with pytest.raises(ValueError, match="needs a task, a dataset, a metric and a value"):
        render_backbone_card(card_info(eval_results=[{"task": "x", "value": 1}]))


def test_card_usage_snippet_runs_on_an_exported_folder(trained, tmp_path):
    _, backbone, _ = trained
    text = (backbone / "README.md").read_text()
    snippet = text.split("```python\n")[1].split("```")[0].replace(REPO_ID_PLACEHOLDER, str(backbone))
    from PIL import Image

    Image.new("RGB", (40, 56), (120, 30, 200)).save(tmp_path / "image.jpg")
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(snippet, "card-snippet", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert tuple(namespace["feature_map"].shape) == (4, 4, 32)


def test_card_metadata_lists_only_hub_datasets_and_describes_local_data():
    # local data is described in the body; the metadata (which the Hub links to dataset pages) stays empty
    local = render_backbone_card(card_info(datasets=[], training_data="13 local photographs"))
    assert local.data.datasets is None and "| training data | 13 local photographs |" in local.content
    hub = render_backbone_card(card_info(datasets=["ILSVRC/imagenet-1k"]))
    assert hub.data.datasets == ["ILSVRC/imagenet-1k"]
    assert "[ILSVRC/imagenet-1k](https://huggingface.co/datasets/ILSVRC/imagenet-1k)" in hub.content
    for path in ("/data/shards/*.parquet", "./images", "data/**/*.jpg"):
        with pytest.raises(ValueError, match="not a Hub dataset id.*training_data"):
            card_info(datasets=[path])


def test_pretraining_names_only_hub_datasets_in_the_card(tmp_path):
    from selfpatch_hf.training.arguments.pretraining import OFFLINE_SAMPLE, card_training_data

    sample = card_training_data(OFFLINE_SAMPLE)
    assert "datasets" not in sample and "scikit-image" in sample["training_data"]
    assert card_training_data("ILSVRC/imagenet-1k") == {"datasets": ["ILSVRC/imagenet-1k"]}
    (tmp_path / "shards").mkdir()
    for local in (str(tmp_path / "shards"), str(tmp_path / "*.parquet"), "images/train.tar"):
        assert card_training_data(local) == {"training_data": f"local files (`{local}`)"}
    # the demo recipe's card: rendered without any dataset metadata
    card = render_backbone_card(card_info(datasets=[], **sample))
    assert card.data.datasets is None and "offline sample" in card.content


# ------------------------------------------------------------------------------------------------------ checks
def test_unpublishable_folders_are_refused(trained, tmp_path):
    _, backbone, pretraining = trained
    check_backbone_folder(backbone)
    with pytest.raises(PublishError, match="SelfPatchForPretraining checkpoint, not a backbone"):
        check_backbone_folder(pretraining)
    (backbone / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PublishError, match=r"pickle-based files \(pytorch_model.bin\)"):
        check_backbone_folder(backbone)
    (backbone / "pytorch_model.bin").unlink()
    (backbone / "preprocessor_config.json").unlink()
    with pytest.raises(PublishError, match="no preprocessor_config.json"):
        check_backbone_folder(backbone)
    with pytest.raises(PublishError, match="no config.json"):
        check_backbone_folder(tmp_path)


# ----------------------------------------------------------------------------------------------------- pushing
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    repos, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for name, repo in repos.items():
        model = AutoModel.from_pretrained(repo).eval()
        processor = AutoImageProcessor.from_pretrained(repo)
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            features = model(**inputs).last_hidden_state
        piped = pipeline("image-feature-extraction", model=repo)(image, return_tensors=True)
        # a grayscale photograph: the processor converts it to RGB before normalising with 3 channel means
        gray = image.convert("L")
        gray_inputs = processor(images=gray, return_tensors="pt")
        assert torch.equal(gray_inputs["pixel_values"], processor(images=gray.convert("RGB"), return_tensors="pt")["pixel_values"])
        with torch.no_grad():
            assert torch.isfinite(model(**gray_inputs).last_hidden_state).all()
        card = ModelCard.load(repo)
        torch.save(
            {
                "class": type(model).__name__,
                "pixel_values": inputs["pixel_values"],
                "features": features,
                "pipeline": piped,
                "card_data": card.data.to_dict(),
                "card_text": card.text,
            },
            f"{out_dir}/{name}.pt",
        )
    assert "selfpatch_hf" not in sys.modules, "the published backbones must load without selfpatch_hf"
    print("modules ok")
    """
)


def test_push_then_load_in_a_fresh_process(trained, hub_server, tmp_path):
    """Both kinds of published backbone (trained ViT; converted SelfPatch reference -> SigLIP) load with plain
    transformers in a process that never imports selfpatch_hf, and reproduce the local features."""
    model, backbone, pretraining = trained
    reference_path = tmp_path / "selfpatch_checkpoint.pth"
    reference_checkpoint = selfpatch_training_checkpoint()
    torch.save(reference_checkpoint, reference_path)
    converted = convert_checkpoint(reference_path, tmp_path / "converted", num_heads=2).backbone_dir
    local_card = (backbone / "README.md").read_bytes()

    result = push_backbone(
        backbone,
        "me/selfpatch-tiny",
        pretraining_folder=pretraining,
        private=True,
        commit_message="First release",
        token=hub_server.token,
        endpoint=hub_server.endpoint,
    )
    assert result.commit_url.startswith(f"{hub_server.endpoint}/me/selfpatch-tiny/commit/")
    assert (backbone / "README.md").read_bytes() == local_card  # the repo id goes into the uploaded card only
    assert result.pretraining_path_in_repo == "pretraining"
    push_backbone(converted, "me/selfpatch-reference", token=hub_server.token, endpoint=hub_server.endpoint)
    assert (
        hub_server.repo("me/selfpatch-tiny").private and not hub_server.repo("me/selfpatch-reference").private
    )
    files = hub_server.files("me/selfpatch-tiny")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert {"pretraining/config.json", "pretraining/model.safetensors"} <= set(files)
    # private: invisible without the token
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "me/selfpatch-tiny",
            "config.json",
            endpoint=hub_server.endpoint,
            token=False,
            cache_dir=tmp_path / "anon",
        )

    env = {**os.environ, **hub_server.client_env(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ""  # nothing of this repository on the child's path
    repos = {"vit": "me/selfpatch-tiny", "siglip": "me/selfpatch-reference"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(repos), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "modules ok" in done.stdout
    assert hub_server.unhandled == []  # every request of the HF stack was one the server implements

    # trained ViT: the features equal the in-memory teacher backbone's on the child's pixels
    vit = torch.load(tmp_path / "vit.pt", weights_only=True)
    assert vit["class"] == "ViTModel"
    local_processor = AutoImageProcessor.from_pretrained(backbone)
    assert torch.equal(
        vit["pixel_values"], local_processor(images=_child_image(), return_tensors="pt")["pixel_values"]
    )
    with torch.no_grad():
        local = model.teacher.backbone(vit["pixel_values"]).last_hidden_state
    assert vit["features"].shape == (1, 17, 32)
    assert (vit["features"] - local).abs().max() <= 1e-5
    assert (vit["pipeline"] - local).abs().max() <= 1e-5
    data = vit["card_data"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-feature-extraction"
    assert set(BASE_TAGS) <= set(data["tags"]) and data["license"] == "apache-2.0"
    assert data["datasets"] == ["imagenet-1k"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 62.7
    assert (
        'model_id = "me/selfpatch-tiny"' in vit["card_text"] and REPO_ID_PLACEHOLDER not in vit["card_text"]
    )
    assert 'from_pretrained("me/selfpatch-tiny", subfolder="pretraining")' in vit["card_text"]

    # converted SelfPatch reference backbone: the features equal the reference forward pass (no CLS token)
    siglip = torch.load(tmp_path / "siglip.pt", weights_only=True)
    assert siglip["class"] == "SiglipVisionModel"
    teacher = reference_checkpoint["teacher"]
    state = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
    with torch.no_grad():
        raw = reference_vit(state, cls=False, hidden=32, layers=2, heads=2, mlp=64, patch=8, grid=4)(
            siglip["pixel_values"]
        )
    expected = F.layer_norm(raw, (32,), teacher["ca_head.norm.weight"], teacher["ca_head.norm.bias"], 1e-6)
    assert siglip["features"].shape == (1, 16, 32)
    assert (siglip["features"] - expected).abs().max() <= 1e-4
    assert (siglip["pipeline"] - expected).abs().max() <= 1e-4

    # the pretraining checkpoint in the subfolder round-trips
    snapshot = Path(
        snapshot_download(
            "me/selfpatch-tiny",
            endpoint=hub_server.endpoint,
            token=hub_server.token,
            cache_dir=tmp_path / "cache",
        )
    )
    restored = SelfPatchForPretraining.from_pretrained(snapshot / "pretraining")
    original_state = model.state_dict()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, original_state[key]), key


def _child_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def test_command_line_push_to_a_branch_with_token_from_the_environment(trained, hub_server, tmp_path, capsys):
    _, backbone, pretraining = trained
    env = {**os.environ, **hub_server.client_env(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "selfpatch_hf.hub",
        str(backbone),
        "me/cli-model",
        "--revision",
        "experiment/a",
        "--private",
        "--commit-message",
        "Step 10 export",
        "--pretraining-folder",
        str(pretraining),
        "--pretraining-repo-id",
        "me/cli-model-pretraining",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Published" in done.stdout and "commit:" in done.stdout

    repo = hub_server.repo("me/cli-model")
    assert repo.private and set(repo.branches) == {"main", "experiment/a"}
    assert "model.safetensors" not in hub_server.files("me/cli-model", "main")  # only the branch got it
    branch_files = hub_server.files("me/cli-model", "experiment/a")
    assert branch_files["model.safetensors"] == (backbone / "model.safetensors").read_bytes()
    assert repo.commits[repo.branches["experiment/a"]].title == "Step 10 export"
    pretraining_files = hub_server.files("me/cli-model-pretraining", "experiment/a")
    assert pretraining_files["config.json"] == (pretraining / "config.json").read_bytes()

    # in process: a wrong token is refused with a clear message and exit code 1 ...
    from selfpatch_hf.hub.cli import main

    arguments = [str(backbone), "me/cli-model", "--endpoint", hub_server.endpoint]
    assert main([*arguments, "--token", "hf_wrong"]) == 1
    assert "the Hub refused the upload" in capsys.readouterr().err
    # ... and an unpublishable folder before any network call
    assert (
        main([str(pretraining), "me/x", "--endpoint", hub_server.endpoint, "--token", hub_server.token]) == 1
    )
    assert "not a backbone" in capsys.readouterr().err


def test_background_upload_then_a_second_commit_in_the_foreground(trained, hub_server, tmp_path):
    """The project's one upload path: the background uploader's commit and `push_folder`'s land in one history."""
    _, backbone, _ = trained
    uploader = AsyncHubUploader(
        "me/async", tmp_path / "staging", token=hub_server.token, endpoint=hub_server.endpoint
    )
    uploader.submit(backbone, step=1)
    (first,) = uploader.wait(timeout=60)
    assert first.status == "uploaded" and not first.folder.exists()  # the snapshot is gone once on the Hub
    first_oid = first.commit_url.rsplit("/", 1)[-1]
    # a re-export (new weights, same files) becomes a second commit on top of the first
    (backbone / "extra.txt").write_text("training log")
    second = push_folder(backbone, "me/async", token=hub_server.token, endpoint=hub_server.endpoint)
    repo = hub_server.repo("me/async")
    assert repo.commits[second.oid].parent == first_oid
    assert hub_server.files("me/async")["extra.txt"] == b"training log"
    with pytest.raises(HfHubHTTPError):
        push_folder(backbone, "me/async", token="hf_wrong", endpoint=hub_server.endpoint)


def test_loopback_hub_error_codes(hub_server, tmp_path):
    """The server's errors map onto huggingface_hub's typed exceptions (the server is reused by other tests)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("me/errors")
    api.create_repo("me/errors", exist_ok=True)
    with pytest.raises(HfHubHTTPError):
        api.create_repo("me/errors")  # 409 without exist_ok
    kwargs = {"endpoint": hub_server.endpoint, "token": hub_server.token, "cache_dir": tmp_path / "c"}
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("me/errors", "missing.json", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("me/errors", ".gitattributes", revision="nope", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/nothing", "config.json", **kwargs)
    assert api.file_exists("me/errors", ".gitattributes") and not api.file_exists("me/errors", "x")
    assert api.list_repo_files("me/errors") == [".gitattributes"]


def test_write_backbone_card_writes_readme(tmp_path):
    path = write_backbone_card(tmp_path / "folder", card_info())
    assert path == tmp_path / "folder" / "README.md"
    assert ModelCard.load(path).data.pipeline_tag == "image-feature-extraction"


def test_card_info_from_selfpatch_config():
    config = tiny_config()
    info = BackboneCardInfo.from_selfpatch_config(config, datasets=["coco"])
    assert (info.hidden_size, info.patch_size, info.num_attention_heads, info.image_size) == (32, 8, 2, 32)
    assert info.objective == "selfpatch" and info.num_positives == 4 and info.datasets == ["coco"]
    dino = BackboneCardInfo.from_selfpatch_config(
        tiny_config(image_representation="cls", patch_loss_weight=0.0)
    )
    assert dino.objective == "dino" and dino.num_positives is None


def test_converted_dino_backbone_card(tmp_path):
    torch.save(backbone_state(cls=True), tmp_path / "dino.pth")
    folder = convert_checkpoint(
        tmp_path / "dino.pth", tmp_path / "out", num_heads=2, pretraining=False
    ).backbone_dir
    card = ModelCard.load(folder / "README.md")
    assert "Converted with `selfpatch-convert` from `dino.pth`" in card.content
    assert card.data.library_name == "transformers"


def test_export_then_push_from_the_command_line(trained, hub_server, tmp_path, capsys):
    """`selfpatch export` writes the card that `selfpatch push` needs; the push renders the repo id into the card it
    uploads and leaves the local folder as it was."""
    from selfpatch_hf.cli.main import main

    _, _, pretraining = trained
    exported = tmp_path / "exported"
    assert main(["export", str(pretraining), str(exported), "--dataset", "ILSVRC/imagenet-1k"]) == 0
    assert "with its model card" in capsys.readouterr().out
    local_card = (exported / "README.md").read_text()
    assert REPO_ID_PLACEHOLDER in local_card and "| patch loss weight (lambda) | 0.1 |" in local_card
    assert ModelCard(local_card).data.datasets == ["ILSVRC/imagenet-1k"]
    push = [
        "push",
        str(exported),
        "me/exported",
        "--endpoint",
        hub_server.endpoint,
        "--token",
        hub_server.token,
    ]
    assert main(push) == 0
    files = hub_server.files("me/exported")
    published = files["README.md"].decode()
    assert 'model_id = "me/exported"' in published and REPO_ID_PLACEHOLDER not in published
    assert files["model.safetensors"] == (exported / "model.safetensors").read_bytes()
    assert (exported / "README.md").read_text() == local_card  # the user's folder is not changed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no snapshot left

    # a local path is no Hub dataset id: refused before anything loads
    assert main(["export", str(pretraining), str(tmp_path / "x"), "--dataset", "./images"]) == 2
    assert "not a Hub dataset id" in capsys.readouterr().err and not (tmp_path / "x").exists()
