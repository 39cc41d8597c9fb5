"""The README's commands, run as a new user runs them: taken from README.md itself, so that the
README cannot change without this test seeing the new command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
INSTALL_AND_RUN_S = 1200             # pip builds the cffi modules: a minute or two; this detects a hang


def readme_commands() -> list[str]:
    """The README's shell commands: its code lines (indented by four spaces), in order."""
    return [line[4:].split("  #", 1)[0].rstrip() for line in README.read_text().splitlines()
            if line.startswith("    ") and line.strip()]


def first_command() -> str:
    command = readme_commands()[0]
    assert "replayvm record" in command, f"README's first command is not a recording: {command!r}"
    return command


def test_command() -> str:
    commands = [c for c in readme_commands() if "pytest" in c]
    assert commands, "README has no test command"
    return commands[0]


test_command.__test__ = False          # a helper, not a test


def fresh_clone(target: Path) -> Path:
    """The tracked files of this checkout (as they are now) in `target`: what a clone holds."""
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout: no list of tracked files to copy")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():                              # a file deleted but not yet committed: gone
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_readme_test_command_is_what_ci_runs():
    assert test_command() in (ROOT / ".ci" / "run").read_text()


def test_readme_first_command_works_in_a_fresh_venv_on_a_fresh_clone(tmp_path):
    """`pip install . && replayvm record --input 'echo hello\\n'`, by bash, exactly as written:
    in a new venv, in a copy of the tracked files, with a new HOME and cache, and no terminal."""
    command = first_command()
    clone = fresh_clone(tmp_path / "replayvm")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV", "REPLAYVM_"))}
    env.update(HOME=str(home), REPLAYVM_CACHE=str(tmp_path / "cache"), VIRTUAL_ENV=str(venv),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               PIP_DISABLE_PIP_VERSION_CHECK="1")           # pip's own flag, as the environment
    result = subprocess.run(["bash", "-c", command], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=INSTALL_AND_RUN_S)
    assert result.returncode == 0, f"{command!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert re.search(r"^\$ echo hello\nhello\n\$ ", result.stdout, re.M), result.stdout[-2000:]
    assert "Traceback" not in result.stderr
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import replayvm; print(replayvm.__file__)"],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert str(venv) in installed.stdout                  # the venv's copy ran, not this checkout
