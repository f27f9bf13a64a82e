"""The story corpus: ``stories/<concept>.txt`` and ``paired/<scenario>/{<concept>,baseline}.txt``.

Every file holds one or more stories separated by blank lines. ``stories/<concept>.txt`` gives a
concept's positives; ``paired/<scenario>/`` holds the same scenario told once per concept
(``<concept>.txt``, more positives of that concept) and once neutrally (``baseline.txt``, a neutral
baseline that joins every concept's negatives). Concept names are lowercase identifiers
(``[a-z][a-z0-9_]*``); ``baseline`` is reserved.

:func:`preflight` checks the layout without touching any model and raises :class:`CorpusError`
listing every problem (missing folders, empty files, misnamed files, paired files naming unknown
concepts, scenarios without a baseline), so a bad corpus fails in milliseconds, not after a model load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

BASELINE = "baseline"
NAME = re.compile(r"[a-z][a-z0-9_]*")


class CorpusError(ValueError):
    """The corpus layout is wrong; ``problems`` lists every issue found."""

    def __init__(self, root: Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"story corpus {root} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class StoryCorpus:
    """Stories per concept (``stories/`` then ``paired/`` ones) and neutral baselines, in file order."""

    root: Path
    concepts: list[str]
    stories: dict[str, list[str]]
    baselines: list[str]

    def examples(self) -> tuple[list[str], list[str]]:
        """``(texts, labels)``: every concept's stories labelled by concept, then baselines labelled ``"baseline"``."""
        texts = [s for c in self.concepts for s in self.stories[c]] + self.baselines
        labels = [c for c in self.concepts for _ in self.stories[c]] + [BASELINE] * len(self.baselines)
        return texts, labels


def split_stories(text: str) -> list[str]:
    """Stories of a file: blocks separated by blank lines, whitespace-normalised within lines' ends."""
    return [" ".join(line.strip() for line in block.strip().splitlines())
            for block in re.split(r"\n\s*\n", text) if block.strip()]


def _read(path: Path, problems: list[str], root: Path) -> list[str]:
    try:
        stories = split_stories(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{path.relative_to(root)}: not UTF-8 text")
        return []
    if not stories:
        problems.append(f"{path.relative_to(root)}: empty (no story)")
    return stories


def _check_name(path: Path, root: Path, problems: list[str]) -> bool:
    rel = path.relative_to(root)
    if path.is_dir():
        problems.append(f"{rel}: unexpected folder (expected <concept>.txt files)")
        return False
    if path.suffix != ".txt":
        problems.append(f"{rel}: misnamed, expected a .txt file")
        return False
    if not NAME.fullmatch(path.stem):
        problems.append(f"{rel}: misnamed, {path.stem!r} is not a lowercase identifier [a-z][a-z0-9_]*")
        return False
    return True


def preflight(root: str | os.PathLike, concepts: list[str] | None = None, min_stories: int = 2) -> StoryCorpus:
    """Check the corpus at ``root`` and load it; raise :class:`CorpusError` listing every problem.

    ``concepts`` (optional) must all be present; each concept needs ``min_stories`` stories in all.
    Hidden files (``.name``) are ignored.
    """
    root = Path(root)
    problems: list[str] = []
    stories_dir, paired_dir = root / "stories", root / "paired"
    if not root.is_dir():
        raise CorpusError(root, ["the corpus folder does not exist"])
    if not stories_dir.is_dir():
        problems.append("stories/: missing (expected stories/<concept>.txt)")
    unexpected = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in ("stories", "paired")]
    if unexpected:
        problems.append(f"unexpected entries at the top level: {', '.join(sorted(unexpected))} "
                        "(expected stories/ and optionally paired/)")
    stories: dict[str, list[str]] = {}
    if stories_dir.is_dir():
        for path in sorted(p for p in stories_dir.iterdir() if not p.name.startswith(".")):
            if not _check_name(path, root, problems):
                continue
            if path.stem == BASELINE:
                problems.append(f"{path.relative_to(root)}: 'baseline' is reserved for paired/<scenario>/baseline.txt")
                continue
            stories[path.stem] = _read(path, problems, root)
        if not stories and not problems:
            problems.append("stories/: no <concept>.txt files")
    baselines: list[str] = []
    if paired_dir.is_dir():
        scenarios = sorted(p for p in paired_dir.iterdir() if not p.name.startswith("."))
        if not scenarios:
            problems.append("paired/: empty (remove it or add paired/<scenario>/ folders)")
        for scen in scenarios:
            rel = scen.relative_to(root)
            if not scen.is_dir():
                problems.append(f"{rel}: expected a scenario folder")
                continue
            files = sorted(p for p in scen.iterdir() if not p.name.startswith("."))
            valid = [p for p in files if _check_name(p, root, problems)]
            if not any(p.stem == BASELINE for p in valid):
                problems.append(f"{rel}: no baseline.txt")
            for path in valid:
                if path.stem == BASELINE:
                    baselines += _read(path, problems, root)
                elif path.stem not in stories:
                    problems.append(f"{path.relative_to(root)}: misnamed, {path.stem!r} is not a concept of "
                                    f"stories/ ({', '.join(sorted(stories)) or 'none'})")
                else:
                    stories[path.stem] = stories[path.stem] + _read(path, problems, root)
    for c in concepts or []:
        if c not in stories:
            problems.append(f"concept {c!r} requested but stories/{c}.txt does not exist")
    for c, s in stories.items():
        if 0 < len(s) < min_stories:
            problems.append(f"concept {c!r}: {len(s)} story(ies), need at least {min_stories}")
    if len(stories) + (1 if baselines else 0) < 2 and not problems:
        problems.append("a contrast needs at least two concepts, or one concept and paired baselines")
    if problems:
        raise CorpusError(root, problems)
    names = list(concepts) if concepts else sorted(stories)
    return StoryCorpus(root, names, {c: stories[c] for c in names}, baselines)


load_corpus = preflight
