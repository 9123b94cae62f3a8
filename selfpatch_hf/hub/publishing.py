"""Publishing exported backbones (and, optionally, full pretraining checkpoints) to the Hugging Face Hub.

A published backbone is a folder written by `selfpatch_hf.export.backbone.export_backbone` or `selfpatch-convert`:
`config.json` of a model type plain `transformers` knows, `model.safetensors`, `preprocessor_config.json` and a
model card. It goes to the Hub with `HfApi.create_repo(exist_ok=True)` + `HfApi.upload_folder`. The token comes
from the usual places (`--token`, `HF_TOKEN`, or the one stored by `hf auth login`) and the endpoint from
`HF_ENDPOINT` unless given.

`selfpatch-push FOLDER REPO_ID` runs it from the command line: repo ids are checked before anything is read or
sent (exit 2), every request has a connect and a read timeout (`--timeout`), and a refused connection, a silent
server or a refusing Hub end in one line naming the endpoint and the cause (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command
from selfpatch_hf.hub.request_limits import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    bound_hub_requests,
    check_repo_id,
    describe_hub_error,
)

# huggingface_hub is imported where used, so `selfpatch-push --help` answers without loading it.
if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

# Pickle-based weight formats: loading them can run arbitrary code, so they are never published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PRETRAINING_MODEL_TYPE = "selfpatch"
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


def _pretraining_model_types() -> tuple[str, ...]:
    """The pretraining model's type and those of folders saved by older versions (e.g. "selfpatch_vit")."""
    from selfpatch_hf.models.selfpatch.configuration import LEGACY_MODEL_TYPES

    return (PRETRAINING_MODEL_TYPE, *LEGACY_MODEL_TYPES)


def check_backbone_folder(folder: str | Path) -> dict:
    """Checks that `folder` is a publishable backbone; returns its config. Raises `PublishError` otherwise."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a directory.")
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type in _pretraining_model_types():
        raise PublishError(
            f"{folder} holds a SelfPatchViTForPretraining checkpoint, not a backbone: export the backbone with "
            "selfpatch_hf.export_backbone (plain ViTModel), and publish the checkpoint with --pretraining-folder."
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
            "expects. Export with selfpatch_hf.export_backbone or selfpatch-convert, which write it."
        )
    if not (folder / "README.md").is_file():
        raise PublishError(
            f"{folder} has no model card (README.md): export with card_info=BackboneCardInfo(...) or write one with "
            "selfpatch_hf.hub.cards.backbone.write_backbone_card."
        )
    return config


def check_pretraining_folder(folder: str | Path) -> dict:
    """Checks that `folder` is a `SelfPatchViTForPretraining.save_pretrained` folder; returns its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a directory.")
    config = _read_config(folder)
    if config.get("model_type") not in _pretraining_model_types():
        raise PublishError(
            f"{folder}/config.json has model_type {config.get('model_type')!r}; a pretraining checkpoint is a "
            f"SelfPatchViTForPretraining.save_pretrained folder (model_type {PRETRAINING_MODEL_TYPE!r})."
        )
    _check_weights(folder)
    return config


def _prepare_card(folder: Path, repo_id: str, pretraining: tuple[str, str | None] | None) -> None:
    """Fills the published repo id into the card's usage snippet and says where the pretraining checkpoint is.

    The card is written at export time, before anyone knows where it will be published; the folder is an export
    artefact, so updating its README in place keeps the local copy identical to the published one.
    `pretraining` is `(repo_id, subfolder or None)`.
    """
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8")
    from selfpatch_hf.hub.cards.backbone import REPO_ID_PLACEHOLDER

    updated = text.replace(REPO_ID_PLACEHOLDER, repo_id)
    if pretraining is not None and _PRETRAINING_SECTION not in updated:
        target, subfolder = pretraining
        where = f"`{target}`" + (f", subfolder `{subfolder}/`" if subfolder else "")
        load_args = f'"{target}"' + (f', subfolder="{subfolder}"' if subfolder else "")
        updated = updated.rstrip("\n") + (
            f"\n\n{_PRETRAINING_SECTION}\n\nThe full `SelfPatchViTForPretraining` checkpoint (student, EMA teacher, "
            f"heads, centres) for continued training is published at {where}:\n\n"
            "```python\nfrom selfpatch_hf import SelfPatchViTForPretraining  # pip install selfpatch-hf\n\n"
            f"model = SelfPatchViTForPretraining.from_pretrained({load_args})\n```\n"
        )
    if updated != text:
        card.write_text(updated, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------------


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    run_as_future: bool = False,
) -> CommitInfo | Future[CommitInfo]:
    """Creates `repo_id` if needed (and the branch `revision`), then uploads `folder` in one commit.

    No checks: use `push_backbone` for backbones. `run_as_future=True` returns a `Future` (non-blocking push, e.g.
    during training); wait for it and surface its exception before the process exits.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        revision=revision,
        commit_message=commit_message or "Upload folder with selfpatch-hf",
        commit_description=commit_description,
        run_as_future=run_as_future,
    )


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
        folder: backbone folder (config, safetensors weights, image processor, model card).
        repo_id: target model repo ("namespace/name"); created if missing.
        pretraining_folder: a `SelfPatchViTForPretraining.save_pretrained` folder to publish too: to
            `pretraining_repo_id` if given, else into the `pretraining/` subfolder of `repo_id`.
        private: create the repo(s) private (ignored for existing repos).
        revision: branch to commit to (created from `main` if missing); default `main`.
        token / endpoint: default to the usual places (`HF_TOKEN` / stored login, `HF_ENDPOINT`).
    """
    folder = Path(folder)
    check_backbone_folder(folder)
    pretraining = None
    if pretraining_folder is not None:
        check_pretraining_folder(pretraining_folder)
        pretraining = (pretraining_repo_id, None) if pretraining_repo_id else (repo_id, PRETRAINING_SUBFOLDER)
    _prepare_card(folder, repo_id, pretraining)
    commit_kwargs = {
        "private": private,
        "revision": revision,
        "commit_description": commit_description,
        "token": token,
        "endpoint": endpoint,
    }
    info = push_folder(
        folder, repo_id, commit_message=commit_message or "Upload SelfPatch backbone", **commit_kwargs
    )
    from huggingface_hub import HfApi

    result = PushResult(
        repo_id=repo_id,
        repo_url=f"{HfApi(endpoint=endpoint).endpoint}/{repo_id}",
        revision=revision or "main",
        commit_url=info.commit_url,
        commit_oid=info.oid,
    )
    if pretraining_folder is not None:
        target = pretraining_repo_id or repo_id
        pretraining_info = push_folder(
            pretraining_folder,
            target,
            path_in_repo=None if pretraining_repo_id else PRETRAINING_SUBFOLDER,
            commit_message=(commit_message + " (pretraining checkpoint)")
            if commit_message
            else "Upload SelfPatch pretraining checkpoint",
            **commit_kwargs,
        )
        result.pretraining_repo_id = target
        result.pretraining_path_in_repo = None if pretraining_repo_id else PRETRAINING_SUBFOLDER
        result.pretraining_commit_url = pretraining_info.commit_url
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfpatch-push",
        description="Publish a backbone folder (from training's export or selfpatch-convert) to the Hugging Face Hub.",
        epilog="examples:\n"
        "  selfpatch-push output/demo/backbone your-name/selfpatch-vit-small-demo\n"
        "  selfpatch-push converted/dino-vits16/backbone your-name/dino-vits16 \\\n"
        "      --pretraining-folder converted/dino-vits16/pretraining --private",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "folder",
        type=Path,
        help="backbone folder: config.json, model.safetensors, preprocessor_config.json, README.md",
    )
    parser.add_argument("repo_id", help="target model repo, namespace/name (created if missing)")
    parser.add_argument(
        "--pretraining-folder",
        type=Path,
        metavar="FOLDER",
        help="also publish this SelfPatchViTForPretraining checkpoint folder",
    )
    parser.add_argument(
        "--pretraining-repo-id",
        help=f"repo for --pretraining-folder (default: subfolder {PRETRAINING_SUBFOLDER}/ of REPO_ID)",
    )
    parser.add_argument("--private", action="store_true", default=None, help="create the repo(s) private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit-message", help="first line of the commit (default: a generic message)")
    parser.add_argument("--commit-description", help="longer description of the commit")
    parser.add_argument(
        "--token", help="Hub token (default: HF_TOKEN or the token stored by `hf auth login`)"
    )
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds to wait for the Hub to answer (or to accept more data) before giving up; "
        f"connecting waits at most {DEFAULT_CONNECT_TIMEOUT:g} s (default: %(default)g)",
    )
    return parser


def _push_command(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    for option, repo_id in (("REPO_ID", args.repo_id), ("--pretraining-repo-id", args.pretraining_repo_id)):
        if repo_id is not None:
            try:
                check_repo_id(repo_id, option)
            except ValueError as error:
                raise UsageError(str(error)) from None
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout:g}.")
    bound_hub_requests(min(DEFAULT_CONNECT_TIMEOUT, args.timeout), args.timeout)
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        result = push_backbone(
            args.folder,
            args.repo_id,
            pretraining_folder=args.pretraining_folder,
            pretraining_repo_id=args.pretraining_repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            token=args.token,
            endpoint=args.endpoint,
        )
    except PublishError as error:
        raise CommandFailure(str(error)) from None
    except (HfHubHTTPError, httpx2.TransportError) as error:
        endpoint = HfApi(endpoint=args.endpoint).endpoint
        raise CommandFailure(
            f"publishing {args.folder} to {args.repo_id} failed: {describe_hub_error(error, endpoint, 'upload')}"
        ) from None
    print(f"Published {args.folder} to {result.repo_url} (revision {result.revision})")
    print(f"  commit: {result.commit_url}")
    if result.pretraining_commit_url is not None:
        where = result.pretraining_repo_id + (
            f" (subfolder {result.pretraining_path_in_repo})" if result.pretraining_path_in_repo else ""
        )
        print(f"Published pretraining checkpoint to {where}")
        print(f"  commit: {result.pretraining_commit_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("selfpatch-push", _push_command, argv)


if __name__ == "__main__":
    sys.exit(main())
