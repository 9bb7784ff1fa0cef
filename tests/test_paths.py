"""Every repository-relative path that the repository's own text names exists: a moved or
deleted file leaves no pointer behind in the README, the docs, comments or configs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("gateway", "policies", "backends", "bench", "tests", "docs", "examples", "grafana",
       "deploy")
# a top-level folder, then path characters; not preceded by a character that would make it
# part of another path (`/x/tests/y`, `.venv/...`, a URL)
PATH = re.compile(r"(?<![\w./\-~$])((?:" + "|".join(TOP) + r")/[\w.\-/]*[\w/])")
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".sh", ".cfg", ".ini", ".tpl",
        ".j2", ""}
GENERATED_OR_RUNTIME = ("bench/results/", "tests/e2e/clients/node/node_modules")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    files = [ROOT / p for p in out]
    return [p for p in files if "node_modules" not in p.parts and p.is_file() and (p.suffix in TEXT or p.name == "Makefile")
            and "lock" not in p.name and p.stat().st_size < 2_000_000]


def named_paths(text: str) -> set[str]:
    found = set()
    for m in PATH.finditer(text):
        path = m.group(1).rstrip("/.")
        after = text[m.end():m.end() + 1]
        if after and after in "*{<$":  # a glob or a template
            continue
        if after == ":" and "." not in path.rpartition("/")[2]:  # an image (grafana/grafana:11)
            continue
        found.add(path)
    return found


def exists(path: str) -> bool:
    """A file or folder; a module named without `.py` (`policies/routing`); or a name inside
    a module (`gateway/core/kv.kv_output_tokens`, `backends/local/grammar.Constraint`)."""
    head, _, tail = path.rpartition("/")
    stem = tail.split(".")[0]
    candidates = [path, f"{path}.py", f"{head}/{stem}.py", f"{head}/{stem}"]
    return any((ROOT / c).exists() for c in candidates)


def test_every_named_path_exists() -> None:
    missing: list[str] = []
    for file in tracked_text_files():
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for path in sorted(named_paths(text)):
            if path.startswith(GENERATED_OR_RUNTIME):
                continue
            if not exists(path):
                missing.append(f"{file.relative_to(ROOT)}: {path}")
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


ISSUE_MARK = re.compile(r"\bissue #?\d+", re.IGNORECASE)


def test_the_source_carries_no_issue_markers() -> None:
    """Code says what it does, not which tracker entry brought it (the history has that)."""
    found = []
    for file in tracked_text_files():
        if file.suffix in (".md", ".json", ".txt"):
            continue
        for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if ISSUE_MARK.search(line):
                found.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "issue markers:\n" + "\n".join(found)
