"""Background uploads of exported backbones to the Hugging Face Hub, so that training never waits on the network.

`AsyncHubUploader.submit(folder, step)` snapshots the export folder (hard links: instant, and immune to the next
export replacing the folder) and queues `create_repo` (once) and then `HfApi.upload_folder(..., run_as_future=True)`
on huggingface_hub's background thread. The training loop calls `poll()` now and then: it never blocks and never raises;
it collects finished uploads, and schedules a retry (exponential back-off) for a failed one unless a newer export has
been queued since (the newer one carries everything the older one had). `wait()` at the end of training blocks until
every upload has succeeded or used up its attempts, and returns the outcomes for the final report.

Local copies are never lost: the run's export folder is untouched by uploads; a snapshot is deleted once it, or a
newer export, is on the Hub; the snapshots of failed uploads stay under `staging_dir` and are listed in the report,
with the command that pushes them later.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

UploadStatus = Literal["pending", "uploaded", "failed", "superseded"]


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

    def describe(self, repo_id: str) -> str:
        if self.status == "uploaded":
            return f"step {self.step}: uploaded to {repo_id} ({self.commit_url})"
        if self.status == "superseded":
            return (
                f"step {self.step}: not uploaded ({self.errors[-1]}); superseded by the export of step "
                f"{self.superseded_by}"
            )
        if self.status == "failed":
            return (
                f"step {self.step}: FAILED after {self.attempts} attempt(s): {self.errors[-1]}. The export is kept at "
                f"{self.folder}; push it later with `hf upload {repo_id} {self.folder} .`"
            )
        return (
            f"step {self.step}: still uploading after {self.attempts} attempt(s); local copy at {self.folder}"
        )


@dataclass
class _Job:
    outcome: UploadOutcome
    commit_message: str
    future: Future | None = None  # the running call: create_repo (phase "repo") or upload_folder ("upload")
    phase: Literal["repo", "upload"] = "repo"
    retry_at: float | None = None  # monotonic time of the next attempt


def _snapshot(folder: Path, destination: Path) -> None:
    """Copies `folder` to `destination` with hard links where possible (exports replace whole files, never edit
    them in place, so a link keeps the old content alive)."""
    shutil.copytree(folder, destination, copy_function=_link_or_copy)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


class AsyncHubUploader:
    """Uploads export folders to `repo_id` in the background, with retries (see the module docstring).

    Args:
        repo_id: the model repository (created if missing, with `private`).
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
        self.repo_id = repo_id
        self.private = private
        self.staging_dir = Path(staging_dir)
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.api = HfApi(endpoint=endpoint, token=token)
        self.jobs: list[_Job] = []
        self._repo_created = False

    # ---------------------------------------------------------------------------------------------------- queueing
    def submit(
        self, folder: str | os.PathLike, step: int, commit_message: str | None = None
    ) -> UploadOutcome:
        """Queues an upload of (a snapshot of) `folder`; returns at once."""
        snapshot = self.staging_dir / f"step-{step}"
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        _snapshot(Path(folder), snapshot)
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
            job.future = self.api.run_as_future(
                self.api.create_repo, self.repo_id, private=self.private, exist_ok=True, repo_type="model"
            )

    def _start_upload(self, job: _Job) -> None:
        job.phase = "upload"
        job.future = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=job.outcome.folder,
            commit_message=job.commit_message,
            repo_type="model",
            run_as_future=True,
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
                self._attempt_failed(index, job, f"{type(error).__name__}: {error}".strip(), finished)
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
        elif outcome.attempts >= self.max_attempts:
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

    def wait(self, timeout: float | None = None, poll_interval: float = 0.2) -> list[UploadOutcome]:
        """Blocks until every upload is final (or `timeout` seconds passed); returns all outcomes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending and (deadline is None or time.monotonic() < deadline):
            self.poll()
            if self.pending:
                time.sleep(poll_interval)
        return self.outcomes

    @property
    def outcomes(self) -> list[UploadOutcome]:
        return [job.outcome for job in self.jobs]

    def report(self) -> list[str]:
        """One line per upload, for the end-of-run summary."""
        return [outcome.describe(self.repo_id) for outcome in self.outcomes]


__all__ = ["AsyncHubUploader", "UploadOutcome"]
