"""Test support for the crop recipes: recording every apply / skip decision of the albumentations pipelines."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import pytest


def record_decisions(
    monkeypatch: pytest.MonkeyPatch, labelled_pipelines: Iterable[tuple[Hashable, object]]
) -> list[tuple[Hashable, str, bool]]:
    """Wraps `should_apply` of every transform of the given `(label, Compose)` pairs so that each decision is
    appended as `(label, transform class name, applied)` to the returned list (which grows as crops are drawn)."""
    decisions: list[tuple[Hashable, str, bool]] = []
    for label, pipeline in labelled_pipelines:
        for transform in pipeline.transforms:
            original, name = transform.should_apply, type(transform).__name__

            def record(force_apply=False, _original=original, _label=label, _name=name):
                applied = _original(force_apply)
                decisions.append((_label, _name, applied))
                return applied

            monkeypatch.setattr(transform, "should_apply", record)
    return decisions
