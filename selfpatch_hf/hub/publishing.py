"""Publishing exported backbones (and, optionally, full pretraining checkpoints) to the Hugging Face Hub.

A published backbone is a folder written by `selfpatch export`, `selfpatch_hf.export_backbone`, the training
script or `selfpatch-convert`: `config.json` of a model type plain `transformers` knows, `model.safetensors`,
`preprocessor_config.json` and a model card. `check_backbone_folder` refuses anything else (pickles above all).

`push_backbone` uploads a snapshot of the folder (`selfpatch_hf.hub.uploads`, the project's one upload path) in
which the card's usage snippet names the repo it is published to and, with a pretraining checkpoint, says where
that is: the card is rendered into the upload, and the user's folder is never changed, whether the upload
succeeds or not. The token comes from the usual places (`HF_TOKEN`, or the one stored by `hf auth login`) and the
endpoint from `HF_ENDPOINT` unless given. The command line is `selfpatch-push` (`selfpatch_hf.hub.cli`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Pickle-based weight formats: loading them can run arbitrary code, so they are never published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PRETRAINING_SUBFOLDER = "pretraining"
_PRETRAINING_SECTION = "## Pretraining checkpoint"


class PublishError(ValueError):
    """The folder cannot be published as it is (the message says what is wrong and how to fix it)."""


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    revision: str
    commit_url: str
    commit_oid: str
    pretraining_repo_id: str | None = None
    pretraining_path_in_repo: str | None = None
    pretraining_commit_url: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PublishError(
            f"{folder} has no config.json: export the model with save_pretrained / selfpatch-convert first."
        )
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PublishError(f"{config_path} is not valid JSON: {error}") from error


def _check_weights(folder: Path) -> None:
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PublishError(
            f"{folder} contains pickle-based files ({', '.join(pickles)}); only safetensors weights are published. "
            "Remove them, or re-save the model with save_pretrained (safetensors is the default)."
        )
    if (
        not (folder / "model.safetensors").is_file()
        and not (folder / "model.safetensors.index.json").is_file()
    ):
        raise PublishError(f"{folder} has no model.safetensors (or model.safetensors.index.json).")
    from safetensors import SafetensorError, safe_open

    from selfpatch_hf.export.backbone import non_finite_tensors

    bad = []
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                bad += non_finite_tensors({name: handle.get_tensor(name) for name in handle.keys()})
        except SafetensorError as error:
            raise PublishError(f"{weights} cannot be read ({error}): export the backbone again.") from None
    if bad:
        raise PublishError(
            f"{folder}'s weights hold NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}): a diverged run's export is not published. Export a checkpoint from "
            "before the values went bad."
        )


def pretraining_model_types() -> tuple[str, ...]:
    """The model types of `SelfPatchForPretraining.save_pretrained` folders: "selfpatch", and those of folders saved
    by earlier versions of this package ("selfpatch_vit")."""
    from selfpatch_hf.models.selfpatch.configuration import LEGACY_MODEL_TYPES, SelfPatchConfig

    return (SelfPatchConfig.model_type, *LEGACY_MODEL_TYPES)


def check_backbone_folder(folder: str | Path) -> dict:
    """Checks that `folder` is a publishable backbone; returns its config. Raises `PublishError` otherwise."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a directory.")
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type in pretraining_model_types():
        raise PublishError(
            f"{folder} holds a SelfPatchForPretraining checkpoint, not a backbone: export the backbone with "
            f"`selfpatch export {folder} BACKBONE_DIR` (a plain ViTModel / SwinModel folder with its card), and "
            "publish the checkpoint with --pretraining-folder."
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise PublishError(
            f"{folder}/config.json has model_type {model_type!r}, which plain transformers cannot load without "
            "remote code; a published backbone must be a native model (e.g. 'vit')."
        )
    _check_weights(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise PublishError(
            f"{folder} has no preprocessor_config.json: users would not know the resize/normalisation the backbone "
            "expects. Export with `selfpatch export` or selfpatch-convert, which write it."
        )
    if not (folder / "README.md").is_file():
        raise PublishError(
            f"{folder} has no model card (README.md): export it again with `selfpatch export PRETRAINING_DIR "
            f"{folder}` (or selfpatch-convert), which writes one, or write one with "
            "selfpatch_hf.hub.cards.backbone.write_backbone_card."
        )
    return config


def check_pretraining_folder(folder: str | Path) -> dict:
    """Checks that `folder` is a `SelfPatchForPretraining.save_pretrained` folder; returns its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a directory.")
    config = _read_config(folder)
    if config.get("model_type") not in pretraining_model_types():
        raise PublishError(
            f"{folder}/config.json has model_type {config.get('model_type')!r}; a pretraining checkpoint is a "
            f"SelfPatchForPretraining.save_pretrained folder (model_type "
            f"{' or '.join(repr(name) for name in pretraining_model_types())})."
        )
    _check_weights(folder)
    return config


# ---------------------------------------------------------------------------------------------------------------
# The card as published
# ---------------------------------------------------------------------------------------------------------------


def published_card(text: str, repo_id: str, pretraining: tuple[str, str | None] | None = None) -> str:
    """The card `text` as it is published to `repo_id`: the repo id in its usage snippet and, for `pretraining`
    = `(repo_id, subfolder or None)`, a section saying where the pretraining checkpoint is."""
    from selfpatch_hf.hub.cards.shared import REPO_ID_PLACEHOLDER

    published = text.replace(REPO_ID_PLACEHOLDER, repo_id)
    if pretraining is not None and _PRETRAINING_SECTION not in published:
        target, subfolder = pretraining
        where = f"`{target}`" + (f", subfolder `{subfolder}/`" if subfolder else "")
        load_args = f'"{target}"' + (f', subfolder="{subfolder}"' if subfolder else "")
        published = published.rstrip("\n") + (
            f"\n\n{_PRETRAINING_SECTION}\n\nThe full `SelfPatchForPretraining` checkpoint (student, EMA teacher, "
            f"heads, centres) for continued training is published at {where}:\n\n"
            "```python\nfrom selfpatch_hf import SelfPatchForPretraining  # pip install selfpatch-hf\n\n"
            f"model = SelfPatchForPretraining.from_pretrained({load_args})\n```\n"
        )
    return published


@contextmanager
def _upload_snapshot(folder: Path, card: str) -> Iterator[Path]:
    """A snapshot of `folder` (hard links) whose README.md is `card`; beside `folder` where its parent is writable
    (links need the same file system), else in the system's temporary folder (copies)."""
    from selfpatch_hf.atomic_folders import private_folder_beside

    try:  # named like a staging folder: the next push or export removes it if this process is killed
        staging = private_folder_beside(folder)
    except OSError:  # a read-only parent
        staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.publishing-"))
    try:
        from selfpatch_hf.hub.uploads import snapshot_folder

        snapshot = snapshot_folder(folder, staging / folder.name)
        (snapshot / "README.md").unlink()  # a link to the user's card: replaced, never written through
        (snapshot / "README.md").write_text(card, encoding="utf-8")
        yield snapshot
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------------


def push_backbone(
    folder: str | Path,
    repo_id: str,
    *,
    pretraining_folder: str | Path | None = None,
    pretraining_repo_id: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Publishes an exported backbone folder, and optionally a full pretraining checkpoint.

    Args:
        folder: backbone folder (config, safetensors weights, image processor, model card); never changed.
        repo_id: target model repo ("namespace/name"); created if missing.
        pretraining_folder: a `SelfPatchForPretraining.save_pretrained` folder to publish too: to
            `pretraining_repo_id` if given, else into the `pretraining/` subfolder of `repo_id`.
        private: create the repo(s) private (ignored for existing repos).
        revision: branch to commit to (created from `main` if missing); default `main`.
        token / endpoint: default to the usual places (`HF_TOKEN` / stored login, `HF_ENDPOINT`).
    """
    from huggingface_hub import HfApi

    from selfpatch_hf.atomic_folders import clean_leftovers
    from selfpatch_hf.hub.uploads import commit_folder, ensure_repository

    folder = Path(folder)
    check_backbone_folder(folder)
    clean_leftovers(folder)  # snapshots of pushes that were killed, before anything can fail
    pretraining = None
    if pretraining_folder is not None:
        check_pretraining_folder(pretraining_folder)
        pretraining = (pretraining_repo_id, None) if pretraining_repo_id else (repo_id, PRETRAINING_SUBFOLDER)
    card = published_card((folder / "README.md").read_text(encoding="utf-8"), repo_id, pretraining)
    api = HfApi(endpoint=endpoint, token=token)
    commit = {"revision": revision, "commit_description": commit_description}
    ensure_repository(api, repo_id, private=private, revision=revision)
    with _upload_snapshot(folder, card) as snapshot:
        info = commit_folder(
            api, snapshot, repo_id, commit_message=commit_message or "Upload SelfPatch backbone", **commit
        )
    result = PushResult(
        repo_id=repo_id,
        repo_url=f"{api.endpoint}/{repo_id}",
        revision=revision or "main",
        commit_url=info.commit_url,
        commit_oid=info.oid,
    )
    if pretraining_folder is not None:
        target = pretraining_repo_id or repo_id
        path_in_repo = None if pretraining_repo_id else PRETRAINING_SUBFOLDER
        if target != repo_id:
            ensure_repository(api, target, private=private, revision=revision)
        pretraining_info = commit_folder(
            api,
            pretraining_folder,
            target,
            path_in_repo=path_in_repo,
            commit_message=f"{commit_message} (pretraining checkpoint)"
            if commit_message
            else "Upload SelfPatch pretraining checkpoint",
            **commit,
        )
        result.pretraining_repo_id = target
        result.pretraining_path_in_repo = path_in_repo
        result.pretraining_commit_url = pretraining_info.commit_url
    return result


__all__ = [
    "pretraining_model_types",
    "PublishError",
    "PushResult",
    "check_backbone_folder",
    "check_pretraining_folder",
    "published_card",
    "push_backbone",
]
