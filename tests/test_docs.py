"""The documentation a newcomer reads: links that resolve inside the repository, and one quick-start command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [REPO_ROOT / "README.md", REPO_ROOT / "BENCHMARKS.md", *(REPO_ROOT / "docs").glob("*.md")]
    + list((REPO_ROOT / "model_cards").glob("*.md"))
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DEMO = "training/pretrain.py training/configs/demo_offline.yaml"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    text = re.sub(
        r"```.*?```", "", path.read_text(), flags=re.S
    )  # a comment line in a code block is no heading
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve_inside_the_repository(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if REPO_ROOT not in resolved.parents and resolved != REPO_ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in headings(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{document.relative_to(REPO_ROOT)}: broken links {broken}"


def test_readme_states_one_demo_command():
    """The quick start's main command and the pretraining section's demo command are the same command."""
    readme = (REPO_ROOT / "README.md").read_text()
    commands = [
        line for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) for line in block.splitlines()
    ]
    demo = {line.split(" && ")[-1] for line in commands if line.rstrip().endswith(DEMO)}
    assert len(demo) == 1, f"the README runs the demo with different commands: {sorted(demo)}"
    quick_start = next(line for line in commands if line.endswith(DEMO))
    assert quick_start.startswith("pip install torch==") and " && pip install -e . && " in quick_start
    (command,) = demo
    assert command.startswith("accelerate launch") and sum(line.endswith(command) for line in commands) >= 2


def test_readme_links_every_document_in_docs():
    linked = {target.partition("#")[0] for target in LINK.findall((REPO_ROOT / "README.md").read_text())}
    missing = sorted(
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "docs").glob("*.md")
        if path.relative_to(REPO_ROOT).as_posix() not in linked
    )
    assert not missing, f"README.md does not link {missing}: a newcomer would not find them"


def test_nothing_points_outside_the_repository():
    """The project stands alone: no file names notes that live outside the repository (the method is docs/method.md)."""
    import subprocess

    # spelled in pieces so that this file does not match itself
    outside = ["SELFPATCH" + "_" + "S" + "PEC", "HF" + "_" + "NOTES", ".." + "/" + "shared"]
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in files:
        path = REPO_ROOT / name
        if not path.is_file() or path.suffix not in {
            ".py",
            ".md",
            ".yaml",
            ".yml",
            ".cfg",
            ".toml",
            ".sh",
            ".txt",
            "",
        }:
            continue
        text = path.read_text(errors="replace")
        found += [f"{name}: {word}" for word in outside if word in text]
    assert not found, f"references to files outside the repository (point at docs/method.md instead): {found}"
