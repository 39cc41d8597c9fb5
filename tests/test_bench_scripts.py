"""The bench tooling works end to end (bench/compare_revisions.py in its --quick mode).

No verdict here depends on host timing: the figures are only checked to be there, one per tree
and metric, never compared with each other or with a bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "bench" / "compare_revisions.py"


def git_checkout() -> bool:
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", "HEAD"],
                           capture_output=True, stdin=subprocess.DEVNULL)
    return found.returncode == 0


needs_git = pytest.mark.skipif(not git_checkout(), reason="compare_revisions.py needs a git checkout")


def run_compare(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run the tool with its temporary files (worktree, traces) under tmp_path."""
    environment = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, str(COMPARE), *arguments], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=600)


def worktrees_under(folder: Path) -> list[str]:
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
                            capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines()
            if line.startswith("worktree ") and line.removeprefix("worktree ").startswith(str(folder))]


@needs_git
def test_compare_revisions_quick_compares_head_with_itself_and_cleans_up(tmp_path):
    report = tmp_path / "comparison.json"
    result = run_compare(tmp_path, "--quick", "--rounds", "1", "--base", "HEAD", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = json.loads(report.read_text())["rows"]
    metrics = {row["metric"] for row in rows}
    assert "replay demo: echo hello" in metrics                           # bench_replay.py ran on both
    assert "seek demo: echo hello: seek back to the middle" in metrics    # bench_seek.py ran on both
    for row in rows:
        assert len(row["base_runs"]) == len(row["current_runs"]) == 1, row
        assert row["unit"] in ("wall_s", "cpu_s")
    assert "current/base" in result.stdout and "replay demo: echo hello" in result.stdout
    # The temporary worktree of the base is gone, and so is everything else the run made.
    assert worktrees_under(tmp_path) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["comparison.json"]


@needs_git
def test_compare_revisions_refuses_an_unknown_revision_in_one_line(tmp_path):
    result = run_compare(tmp_path, "--base", "no-such-revision-anywhere", "--quick")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no-such-revision-anywhere" in result.stderr
    assert list(tmp_path.iterdir()) == []
