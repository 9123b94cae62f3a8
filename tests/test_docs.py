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


# Tracked files whose text is read as prose: Markdown, configuration and scripts whole; Python through its comments
# and string literals only (code such as `importlib.util.spec_from_file_location` is no prose).
PROSE_SUFFIXES = {".md", ".yaml", ".yml", ".cfg", ".toml", ".sh", ".txt", ""}
# Words and names of notes that live outside the repository; spelled in pieces so that this file does not match
# itself.
OUTSIDE = re.compile(
    "|".join(
        [
            r"\b" + "sp" + r"ec(?:s|'s)?\b",  # "the sp-ec", "sp-ec section 4", "sp-ec formulas"
            "SELFPATCH" + "_" + "S" + "PEC",
            "HF" + "_" + "NOTES",
            "ARCHITECTURE" + r"\.md",
            r"\.\./" + "shared",
        ]
    ),
    re.IGNORECASE,
)
SECTION = re.compile(r"\b[Ss]ections?\s+(\d+(?:\s*(?:-|–|,|and)\s*\d+)*)")
DOCUMENT = re.compile(r"([\w./-]*[\w-]+\.md)\b")
GOAL = re.compile(r"\bgoals?\b", re.IGNORECASE)
GOAL_TARGET = re.compile(r"\d+\.\d+|\d+\s*(?:x|%|s\b|cores?\b)")


def tracked_files() -> list[Path]:
    import subprocess

    names = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # LICENSE is legal text with sections of its own; this file holds examples of what the rules refuse
    skipped = {"LICENSE", "tests/test_docs.py"}
    return [
        REPO_ROOT / name
        for name in names
        if name not in skipped
        and (REPO_ROOT / name).is_file()
        and (REPO_ROOT / name).suffix in PROSE_SUFFIXES | {".py"}
    ]


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the prose of a file: every line, or a Python file's comments and strings."""
    import io
    import tokenize

    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), start=1))
    lines = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in (tokenize.COMMENT, tokenize.STRING):
                body = re.sub(r"\{[^{}]*\}", "", token.string)  # f-string fields are code
                lines += [(token.start[0] + i, line) for i, line in enumerate(body.splitlines())]
    except (tokenize.TokenError, SyntaxError):
        return list(enumerate(text.splitlines(), start=1))
    return lines


def _numbered_sections(text: str, lists: bool = False) -> set[int]:
    """The numbers of a document's numbered headings (`## 12. ...`), and of its numbered list items with `lists`
    (a file pointing at its own list: "sections 3 and 4 need ...")."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    pattern = r"^\s*(?:#+\s+)?(\d+)\.\s" if lists else r"^#+\s+(\d+)\.\s"
    return {int(number) for number in re.findall(pattern, text, flags=re.M)}


def _resolve_document(name: str, mentioned_in: Path) -> Path | None:
    for candidate in (mentioned_in.parent / name, REPO_ROOT / name, REPO_ROOT / "docs" / Path(name).name):
        if candidate.resolve().is_file() and REPO_ROOT in candidate.resolve().parents:
            return candidate.resolve()
    return None


def pointer_problems(name: str, lines: list[tuple[int, str]], folder: Path) -> list[str]:
    """Every pointer in the prose `lines` of the file `name` (in `folder`) that the repository cannot satisfy (see
    the test below)."""
    problems = [f"{name}:{n}: {m.group(0)!r}" for n, line in lines for m in OUTSIDE.finditer(line)]
    own_text = "\n".join(text for _, text in lines)
    benchmarks = REPO_ROOT / "BENCHMARKS.md"
    goals = benchmarks.read_text().split("\n## Goals", 1)[-1].split("\n## ", 1)[0].replace(" ", "")
    in_goals_section = False
    for index, (number, line) in enumerate(lines):
        if line.startswith("## "):
            in_goals_section = line.strip() == "## Goals"
        # what the line and the 6 lines of prose before it say (a list often names its document once, above)
        before = " ".join(text for _, text in lines[max(0, index - 6) : index])
        for match in SECTION.finditer(line):
            context = before + " " + line[: match.start()]
            cited = list(DOCUMENT.finditer(context))
            paper = [m.end() for m in re.finditer(r"\bpaper", context, re.IGNORECASE)]
            if paper and (not cited or paper[-1] > cited[-1].end()):
                continue  # a section of the paper
            wanted = {int(n) for n in re.findall(r"\d+", match.group(1))}
            if "-" in match.group(1) or "–" in match.group(1):
                wanted = set(range(min(wanted), max(wanted) + 1))
            if cited:  # a section of the nearest document named before it
                document = _resolve_document(cited[-1].group(1), folder)
                if document is None:
                    problems.append(
                        f"{name}:{number}: {match.group(0)!r} of {cited[-1].group(1)}, not in the repository"
                    )
                    continue
                missing = sorted(wanted - _numbered_sections(document.read_text()))
                where = document.relative_to(REPO_ROOT)
            else:  # a section of this file itself: a numbered heading or list item of its own
                missing, where = sorted(wanted - _numbered_sections(own_text, lists=True)), name
            if missing:
                problems.append(f"{name}:{number}: {match.group(0)!r}: {where} has no section {missing}")
        if not GOAL.search(line):
            continue
        if name == "BENCHMARKS.md":
            targets = [target.replace(" ", "") for target in GOAL_TARGET.findall(line)]
            if in_goals_section or "#goals" in line or any(target in goals for target in targets):
                continue
            problems.append(f"{name}:{number}: a goal not listed in BENCHMARKS.md's Goals: {line.strip()!r}")
        elif "BENCHMARKS.md" not in before[-200:] + " " + line + " " + (
            lines[index + 1][1] if index + 1 < len(lines) else ""
        ):
            problems.append(f"{name}:{number}: a goal that does not point at BENCHMARKS.md: {line.strip()!r}")
    return problems


def test_nothing_points_outside_the_repository():
    """The project stands alone: no file names notes that live outside the repository (the method is docs/method.md),
    every "section N" is a numbered section of a document in the repository (or of the paper), and every goal is
    one that BENCHMARKS.md states in its Goals section."""
    problems = [
        problem
        for path in tracked_files()
        for problem in pointer_problems(path.relative_to(REPO_ROOT).as_posix(), prose(path), path.parent)
    ]
    assert not problems, "pointers the repository cannot satisfy:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("The student never runs the neighbour path (" + "sp" + "ec section 4).", True),
        ("from the " + "sp" + "ec formulas", True),
        ("see HF" + "_NOTES.md", True),
        ("the layout of ARCHITECTURE" + ".md", True),
        ("reads `docs/method.md` section 12 for the protocol", False),
        ("reads `docs/method.md` section 42 for the protocol", True),
        ("the protocol of section 12", True),
        ("sections 3 and 4 need `datasets`", True),  # this probe file has no numbered list
        ("the paper's section 4.2", False),
        ("docs/method.md sections 4-7", False),
        ("a 1.7x goal", True),
        ("under BENCHMARKS.md's 1.5 s goal", False),
    ],
)
def test_pointer_rules_catch_what_they_should(tmp_path, text, found):
    """The rules above on a comment of a Python file (each must be able to fail)."""
    source = tmp_path / "probe.py"
    source.write_text(f"value = 1  # {text}\n")
    problems = pointer_problems("selfpatch_hf/probe.py", prose(source), REPO_ROOT / "selfpatch_hf")
    assert bool(problems) is found, problems


def test_the_floors_the_evaluation_prints_are_the_ones_benchmarks_records():
    from selfpatch_hf.evaluation.offline_reference import (
        ARCHITECTURE,
        PROBE_SEED_SPREAD,
        RANDOM_INIT_FLOOR,
        RANDOM_INIT_RUNS,
    )

    text = (REPO_ROOT / "BENCHMARKS.md").read_text()
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith(f"| random-init {ARCHITECTURE} |"))
    header = lines[lines.index(row) - 2]
    names = [cell.strip() for cell in header.strip("|").split("|")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    recorded = dict(zip(names, cells, strict=True))
    assert int(recorded["runs"]) == RANDOM_INIT_RUNS
    for metric, (mean, std) in RANDOM_INIT_FLOOR.items():
        assert recorded[metric] == f"{mean} ± {std}", metric
    assert f"moves mIoU of one backbone by up to {PROBE_SEED_SPREAD}" in " ".join(text.split())
