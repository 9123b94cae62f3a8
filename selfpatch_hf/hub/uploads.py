"""Uploading folders to the Hugging Face Hub: the one upload path of the project, in the foreground or in the
background.

An upload is two calls, written once here: `ensure_repository` (`HfApi.create_repo(exist_ok=True)`, and the branch
when one is named) and `commit_folder` (`HfApi.upload_folder`, one commit). `push_folder` makes both in the
foreground (`selfpatch-push` publishes through it); `AsyncHubUploader` makes them on a background thread, so that
training never waits on the network. Both upload a snapshot of the folder (`snapshot_folder`: hard links, instant,
and immune to the next export replacing the folder, and a place to put files that differ in the upload, such as a
card with the repo id filled in, without touching the user's folder).

`AsyncHubUploader.submit(folder, step)` snapshots the export folder and queues `ensure_repository` (once) and then
`commit_folder` on a background thread (one, so that commits reach the Hub in export order). The training loop calls `poll()` now and then: it never blocks
and never raises; it collects finished uploads, and schedules a retry (exponential back-off) for a failed one unless a
newer export has been queued since (the newer one carries everything the older one had). Errors that a retry cannot
fix (an invalid repo id, a refused token, no permission: see `selfpatch_hf.hub.request_limits.is_permanent_error`) are not
retried. `finish(timeout)` at the end of training waits for the uploads, but at most `timeout` seconds and only until
SIGTERM / Ctrl-C; whatever is not on the Hub by then is reported as `unfinished` with its local copy.

Nothing here waits forever: the requests themselves are bounded by `selfpatch_hf.hub.request_limits.bound_hub_requests`
(the training script installs it), and the background thread is a daemon, so a request still hanging after the
final deadline does not keep the process alive.

Local copies are never lost: the run's export folder is untouched by uploads; a snapshot is deleted once it, or a
newer export, is on the Hub; the snapshots of failed uploads stay under `staging_dir` and are listed in the report,
with the command that pushes them later.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import CommitInfo, HfApi

from selfpatch_hf.hub.request_limits import check_repo_id, describe_hub_error, is_permanent_error
from selfpatch_hf.training.preemption import StopRequest

logger = logging.getLogger(__name__)

UploadStatus = Literal["pending", "uploaded", "failed", "superseded", "unfinished"]


@dataclass
class UploadOutcome:
    """What became of one queued upload."""

    step: int
    folder: Path  # the local snapshot that was (or is being) uploaded
    status: UploadStatus = "pending"
    attempts: int = 0
    commit_url: str | None = None
    errors: list[str] = field(default_factory=list)
    superseded_by: int | None = None  # step of the newer export that made this one unnecessary
    permanent: bool = False  # the last error cannot be fixed by retrying

    def describe(self, repo_id: str) -> str:
        if self.status == "uploaded":
            return f"step {self.step}: uploaded to {repo_id} ({self.commit_url})"
        if self.status == "superseded":
            return (
                f"step {self.step}: not uploaded ({self.errors[-1]}); superseded by the export of step "
                f"{self.superseded_by}"
            )
        if self.status == "failed":
            why = " (not retried: retrying cannot fix this)" if self.permanent else ""
            return (
                f"step {self.step}: FAILED after {self.attempts} attempt(s): {self.errors[-1]}{why}. The export is "
                f"kept at {self.folder}; push it later with `hf upload {repo_id} {self.folder} .`"
            )
        if self.status == "unfinished":
            return (
                f"step {self.step}: NOT uploaded ({self.errors[-1]}). The export is kept at {self.folder}; push it "
                f"later with `hf upload {repo_id} {self.folder} .`"
            )
        return (
            f"step {self.step}: still uploading after {self.attempts} attempt(s); local copy at {self.folder}"
        )


@dataclass
class _Job:
    outcome: UploadOutcome
    commit_message: str
    future: Future | None = (
        None  # the running call: ensure_repository (phase "repo") or commit_folder ("upload")
    )
    phase: Literal["repo", "upload"] = "repo"
    retry_at: float | None = None  # monotonic time of the next attempt


def snapshot_folder(folder: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copies `folder` to `destination` with hard links where possible (exports replace whole files, never edit
    them in place, so a link keeps the old content alive); returns `destination`. To change a file of the snapshot,
    unlink it first: writing through a link would change the original."""
    shutil.copytree(folder, destination, copy_function=_link_or_copy)
    return Path(destination)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def ensure_repository(
    api: HfApi, repo_id: str, *, private: bool | None = None, revision: str | None = None
) -> None:
    """Creates the model repository `repo_id` unless it exists (`private` applies to a new one only), and the
    branch `revision` (from `main`) unless it is `main` or exists. No retries of its own: a dead endpoint fails at
    once."""
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")


def commit_folder(
    api: HfApi,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str,
    path_in_repo: str | None = None,
    revision: str | None = None,
    commit_description: str | None = None,
) -> CommitInfo:
    """Uploads `folder` (into `path_in_repo`, on the branch `revision`) in one commit of an existing repository."""
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        revision=revision,
        commit_message=commit_message,
        commit_description=commit_description,
        repo_type="model",
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str = "Upload folder with selfpatch-hf",
    path_in_repo: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """`ensure_repository` then `commit_folder`, in the foreground; no checks of the folder (publishing a backbone:
    `selfpatch_hf.hub.publishing.push_backbone`; in the background: `AsyncHubUploader`)."""
    api = HfApi(endpoint=endpoint, token=token)
    ensure_repository(api, repo_id, private=private, revision=revision)
    return commit_folder(
        api,
        folder,
        repo_id,
        commit_message=commit_message,
        path_in_repo=path_in_repo,
        revision=revision,
        commit_description=commit_description,
    )


class _DaemonWorker:
    """Runs calls one after the other on a daemon thread and hands back Futures. Unlike a ThreadPoolExecutor (whose
    threads the interpreter joins at exit), a request still hanging when the process ends cannot keep it alive."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args, kwargs = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # noqa: BLE001 -- handed to whoever reads the future
                future.set_exception(error)


class AsyncHubUploader:
    """Uploads export folders to `repo_id` in the background, with retries (see the module docstring).

    Args:
        repo_id: the model repository (created if missing, with `private`); checked at once (ValueError).
        staging_dir: where snapshots of the queued exports live until uploaded.
        token: Hub token (default: `HF_TOKEN` / the cached login).
        private: create the repository private.
        endpoint: Hub endpoint (default: `HF_ENDPOINT` or huggingface.co).
        max_attempts: attempts per upload before giving up.
        retry_delay: seconds before the first retry; doubled for each further one.
    """

    def __init__(
        self,
        repo_id: str,
        staging_dir: str | os.PathLike,
        *,
        token: str | None = None,
        private: bool = False,
        endpoint: str | None = None,
        max_attempts: int = 3,
        retry_delay: float = 10.0,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}.")
        self.repo_id = check_repo_id(repo_id, "hub_model_id")
        self.private = private
        self.staging_dir = Path(staging_dir)
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.api = HfApi(endpoint=endpoint, token=token)
        self.jobs: list[_Job] = []
        self._repo_created = False
        self._worker: _DaemonWorker | None = None
        self.interrupted_by: str | None = None  # the signal that ended `finish` early

    def _run_in_background(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        if self._worker is None:
            self._worker = _DaemonWorker(f"hub-upload-{self.repo_id}")
        return self._worker.submit(fn, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------------- queueing
    def submit(
        self, folder: str | os.PathLike, step: int, commit_message: str | None = None
    ) -> UploadOutcome:
        """Queues an upload of (a snapshot of) `folder`; returns at once."""
        snapshot = self.staging_dir / f"step-{step}"
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot_folder(folder, snapshot)
        job = _Job(
            UploadOutcome(step=step, folder=snapshot), commit_message or f"Backbone at training step {step}"
        )
        self.jobs.append(job)
        self._start(job)
        return job.outcome

    def _start(self, job: _Job) -> None:
        """One attempt: `create_repo` first (until it has succeeded once), then the upload. The repository call has
        no retries of its own, so a dead endpoint fails in a moment instead of going through the upload's backoff."""
        job.outcome.attempts += 1
        job.retry_at = None
        if self._repo_created:
            self._start_upload(job)
        else:
            job.phase = "repo"
            job.future = self._run_in_background(
                ensure_repository, self.api, self.repo_id, private=self.private
            )

    def _start_upload(self, job: _Job) -> None:
        job.phase = "upload"
        job.future = self._run_in_background(
            commit_folder, self.api, job.outcome.folder, self.repo_id, commit_message=job.commit_message
        )

    # ---------------------------------------------------------------------------------------------------- progress
    def poll(self) -> list[UploadOutcome]:
        """Moves finished calls on and starts due retries; never blocks, never raises. Returns the outcomes that
        became final in this call."""
        finished = []
        for index, job in enumerate(self.jobs):
            outcome = job.outcome
            if outcome.status != "pending":
                continue
            if job.future is None:  # waiting for a retry
                if job.retry_at is not None and time.monotonic() >= job.retry_at:
                    self._start(job)
                continue
            if not job.future.done():
                continue
            future, job.future = job.future, None
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 -- any failure is reported, never raised into the loop
                job.outcome.permanent = is_permanent_error(error)
                self._attempt_failed(
                    index, job, describe_hub_error(error, self.api.endpoint, "upload"), finished
                )
                continue
            if job.phase == "repo":
                self._repo_created = True
                self._start_upload(job)
                continue
            outcome.status = "uploaded"
            outcome.commit_url = getattr(result, "commit_url", None) or str(result)
            finished.append(outcome)
            self._after_success(index)
        return finished

    def _attempt_failed(self, index: int, job: _Job, error: str, finished: list[UploadOutcome]) -> None:
        outcome = job.outcome
        outcome.errors.append(error)
        newer = [
            other.outcome
            for other in self.jobs[index + 1 :]
            if other.outcome.status in ("pending", "uploaded")
        ]
        if newer:
            outcome.status = "superseded"
            outcome.superseded_by = newer[-1].step
            finished.append(outcome)
        elif outcome.attempts >= self.max_attempts or outcome.permanent:
            outcome.status = "failed"
            finished.append(outcome)
            logger.error("Hub upload %s", outcome.describe(self.repo_id))
        else:
            delay = self.retry_delay * 2 ** (outcome.attempts - 1)
            job.retry_at = time.monotonic() + delay
            logger.warning(
                "Hub upload of step %d to %s failed (attempt %d of %d): %s. Retrying in %.0f s; training goes on.",
                outcome.step,
                self.repo_id,
                outcome.attempts,
                self.max_attempts,
                error,
                delay,
            )

    def _after_success(self, index: int) -> None:
        """Deletes the snapshot just uploaded and those of older exports that failed or were superseded: the Hub now
        holds newer weights."""
        step = self.jobs[index].outcome.step
        for job in self.jobs[: index + 1]:
            if job.outcome.status == "failed":
                job.outcome.status = "superseded"
                job.outcome.superseded_by = step
            if job.outcome.status in ("uploaded", "superseded"):
                shutil.rmtree(job.outcome.folder, ignore_errors=True)

    @property
    def pending(self) -> bool:
        return any(job.outcome.status == "pending" for job in self.jobs)

    def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = 0.2,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[UploadOutcome]:
        """Blocks until every upload is final, `timeout` seconds passed or `should_stop()` is true; returns all
        outcomes (those still running stay `pending`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending and (deadline is None or time.monotonic() < deadline):
            if should_stop is not None and should_stop():
                break
            self.poll()
            if self.pending:
                time.sleep(
                    poll_interval
                    if deadline is None
                    else max(0, min(poll_interval, deadline - time.monotonic()))
                )
        self.poll()
        return self.outcomes

    def finish(self, timeout: float | None, why_not_waiting: str | None = None) -> list[UploadOutcome]:
        """The end of a run: waits for the uploads at most `timeout` seconds (None: no limit), stopping early on
        SIGTERM / SIGINT, then marks what is not on the Hub as `unfinished` (its local snapshot stays) and returns
        all outcomes. The report is complete however the wait ended. `why_not_waiting` is the reason reported for
        the unfinished uploads when the caller chose not to wait (timeout 0, e.g. a pre-empted run)."""
        with StopRequest(action="ending the wait for the Hub uploads and reporting them") as stop:
            self.wait(timeout, should_stop=lambda: stop.requested)
        if stop.requested:
            reason = f"the wait was interrupted by {stop.signal_name}"
        elif why_not_waiting is not None:
            reason = why_not_waiting
        elif timeout is not None:
            reason = f"not finished within the final wait of {timeout:g} s (--hub_upload_timeout)"
        else:
            reason = (
                "not finished"  # unreachable without a signal: an unlimited wait ends when nothing is pending
            )
        for job in self.jobs:
            if job.outcome.status == "pending":
                job.outcome.status = "unfinished"
                job.outcome.errors.append(
                    reason
                    if job.future is not None or not job.outcome.errors
                    else f"{reason}; last error: {job.outcome.errors[-1]}"
                )
                job.retry_at = None
        self.interrupted_by = stop.signal_name
        return self.outcomes

    @property
    def complete(self) -> bool:
        """Whether the newest export reached the Hub (older ones may have been superseded)."""
        return bool(self.jobs) and self.jobs[-1].outcome.status == "uploaded"

    @property
    def outcomes(self) -> list[UploadOutcome]:
        return [job.outcome for job in self.jobs]

    def report(self) -> list[str]:
        """One line per upload, for the end-of-run summary."""
        return [outcome.describe(self.repo_id) for outcome in self.outcomes]


__all__ = [
    "AsyncHubUploader",
    "UploadOutcome",
    "commit_folder",
    "ensure_repository",
    "push_folder",
    "snapshot_folder",
]
