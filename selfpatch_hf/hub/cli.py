"""`selfpatch-push FOLDER REPO_ID` (also `selfpatch push`, `python -m selfpatch_hf.hub`).

Repo ids are checked before anything is read or sent (exit 2); every request has a connect and a read timeout
(`--timeout`); a refused connection, a silent server or a refusing Hub end in one line naming the endpoint and the
cause (exit 1), and the folder is left as it was.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command
from selfpatch_hf.hub.publishing import PRETRAINING_SUBFOLDER, PublishError, push_backbone
from selfpatch_hf.hub.request_limits import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    bound_hub_requests,
    check_repo_id,
    describe_hub_error,
)

PROG = "selfpatch-push"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish a backbone folder (from `selfpatch export`, the training script or selfpatch-convert) "
        "to the Hugging Face Hub.\nThe uploaded model card names the repo; the folder itself is not changed.",
        epilog="examples:\n"
        "  selfpatch-push outputs/demo/backbone your-name/selfpatch-vit-tiny-demo\n"
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
        help="also publish this SelfPatchForPretraining checkpoint folder",
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


def _push(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for option, repo_id in (("REPO_ID", args.repo_id), ("--pretraining-repo-id", args.pretraining_repo_id)):
        if repo_id is not None:
            try:
                check_repo_id(repo_id, option)
            except ValueError as error:
                raise UsageError(str(error)) from None
    if not args.timeout > 0:  # also NaN
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
    except OSError as error:  # an unreadable folder, no room for the upload's snapshot
        raise CommandFailure(f"publishing {args.folder} to {args.repo_id} failed: {error}") from None
    print(f"Published {args.folder} to {result.repo_url} (revision {result.revision})")
    print(f"  commit: {result.commit_url}")
    if result.pretraining_commit_url is not None:
        where = result.pretraining_repo_id + (
            f" (subfolder {result.pretraining_path_in_repo})" if result.pretraining_path_in_repo else ""
        )
        print(f"Published pretraining checkpoint to {where}")
        print(f"  commit: {result.pretraining_commit_url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, _push, argv)


if __name__ == "__main__":
    sys.exit(main())
