"""Every command README.md shows runs, in a cheap form.

The commands are the lines of the README's ```bash blocks (``\\`` continuations joined, ``# comments``
dropped, split with shlex) and the command column of its pipeline table. Each is classified by what it
runs and exercised without doing the work:

* ``python launch/pipeline.py ...`` runs in-process with ``--dry-run`` added (``--help-config`` and
  ``--emit-sbatch`` run as they are): the config is built and the plan made, nothing is written;
* any other Python entry point (``python SCRIPT.py``, ``python -m MODULE``, ``accelerate launch SCRIPT.py``)
  parses the README's arguments with its own parser, in-process, and stops there;
* ``python -m pytest``: its ``-m`` expressions name registered markers only, its paths exist;
* ``scripts/*.sh``, ``.ci/run``, ``slurm/*.sh``: exist, are executable and know the options shown;
  ``slurm/stage.sh STAGE ...`` also prints its job script in-process (``--emit-sbatch``).

A line no rule knows fails ``test_every_readme_command_is_classified``, naming it: a new README command
needs a rule here. Placeholders are replaced by real temporary paths: ``RUN_DIR`` (a run directory with a
tiny config), ``C`` (its config.json), ``IMAGES_DIR`` and ``LABELS_CSV`` (two images and their HAM10000
CSV), ``I``/``N`` (task 0 of 1). The slow test starts each entry point once as a real process
(``--help``) and checks each shell script's syntax with ``bash -n``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import runpy
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from helpers import REPO, assert_ok, run_cli, run_quiet, stage_env, tiny_config
from PIL import Image

README = REPO / "README.md"
PYTHONS = {"python", "python3", ".venv/bin/python"}
SHELL_DIRS = ("scripts/", ".ci/", "slurm/")
PLACEHOLDERS = ("RUN_DIR", "IMAGES_DIR", "LABELS_CSV")
WHOLE_WORD_PLACEHOLDERS = {"C": "RUN_DIR/config.json", "I": "0", "N": "1"}


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def bash_commands(markdown: str) -> list[Command]:
    """The command lines of the ```bash blocks, output redirections (``> FILE``) left out."""
    commands, fence, pending, start = [], False, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.strip().startswith("```"):
            fence = line.strip() == "```bash" if not fence else False
            continue
        if not fence:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = (pending + line).strip(), ""
        argv = shlex.split(text, comments=True)
        if argv:
            commands.append(Command(start, text, tuple(_without_redirection(argv))))
    return commands


def _without_redirection(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in (">", ">>"):
            skip = True
        else:
            out.append(token)
    return out


def table_commands(markdown: str) -> list[Command]:
    """The first code span of the second column of the table under "## The pipeline"."""
    commands, section = [], ""
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("## "):
            section = line
        cells = line.split("|")
        if section == "## The pipeline" and len(cells) > 3 and (code := re.search(r"`([^`]+)`", cells[2])):
            commands.append(Command(number, code.group(1), tuple(shlex.split(code.group(1)))))
    return commands


def readme_commands() -> list[Command]:
    text = README.read_text()
    return bash_commands(text) + table_commands(text)


def classify(argv: tuple[str, ...]) -> str | None:
    """What a command runs: pipeline, entry (a Python entry point), pytest, shell; None if no rule knows it."""
    if any(token in ("|", "&&", "||", ";") for token in argv):
        return None  # one command per line: a pipe or list would hide all but one from these checks
    if argv[0] in PYTHONS and len(argv) > 1:
        if argv[1] == "launch/pipeline.py":
            return "pipeline"
        if argv[1:3] == ("-m", "pytest"):
            return "pytest"
        if argv[1] == "-m" and len(argv) > 2 and _is_project_module(argv[2]):
            return "entry"
        if argv[1].endswith(".py") and (REPO / argv[1]).is_file():
            return "entry"
        return None
    if argv[:2] == ("accelerate", "launch"):
        return "entry" if _accelerate_script(argv) is not None else None
    if argv[0].startswith(SHELL_DIRS):
        return "shell"
    return None


def _is_project_module(name: str) -> bool:
    path = REPO / name.replace(".", "/")
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def _accelerate_script(argv: tuple[str, ...]) -> int | None:
    """Index of the script accelerate launch runs (the first ``*.py`` argument), if it is in the repository."""
    for index, token in enumerate(argv[2:], 2):
        if token.endswith(".py"):
            return index if (REPO / token).is_file() else None
    return None


def entry_point(argv: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """(``("-m", module)`` or ``(script,)``, its arguments) of an ``entry`` or ``pipeline`` command."""
    if argv[0] == "accelerate":
        index = _accelerate_script(argv)
        assert index is not None
        return (argv[index],), list(argv[index + 1:])
    if argv[1] == "-m":
        return ("-m", argv[2]), list(argv[3:])
    return (argv[1],), list(argv[2:])


COMMANDS = readme_commands()
IN_PROCESS = [c for c in COMMANDS if classify(c.argv) in ("pipeline", "entry")
              or (classify(c.argv) == "shell" and c.argv[0] == "slurm/stage.sh")]


def _ids(commands: list[Command]) -> list[str]:
    return [f"line{c.line}-{c.argv[1] if c.argv[0] in PYTHONS else c.argv[0]}" for c in commands]


# ----- the parsing and the rules themselves ------------------------------------------------------------
def test_bash_blocks_join_continuations_drop_comments_and_redirections() -> None:
    markdown = ("text `python not/a/command.py`\n```bash\n"
                "python launch/pipeline.py --preset seed \\\n    run_dir=runs/x   # a comment\n"
                "# only a comment\n\n"
                "python launch/pipeline.py --help-config --markdown > docs/config.md\n```\n"
                "```\nnot bash\n```\n")
    assert [(c.line, c.argv) for c in bash_commands(markdown)] == [
        (3, ("python", "launch/pipeline.py", "--preset", "seed", "run_dir=runs/x")),
        (7, ("python", "launch/pipeline.py", "--help-config", "--markdown")),
    ]


def test_unknown_and_compound_commands_are_not_classified() -> None:
    for line in ("rm -rf runs", "python -m nosuchmodule", "python vqvae/nosuch.py", "accelerate launch nosuch.py",
                 "python launch/pipeline.py && rm -rf runs", "squeue -u me", "python"):
        assert classify(tuple(shlex.split(line))) is None, line
    assert classify(("python", "-m", "shards", "inspect", "x")) == "entry"
    assert classify(("accelerate", "launch", "--num_processes", "2", "vqvae/train.py")) == "entry"


def test_readme_shows_the_two_commands_and_the_pipeline_table() -> None:
    shown = {c.argv[0] for c in COMMANDS}
    assert {"scripts/demo.sh", "scripts/test.sh"} <= shown
    table = table_commands(README.read_text())
    assert len(table) >= 8, "the pipeline table lost its one-stage commands"
    assert any(c.argv[0] == "python" and c.argv[1] == "launch/pipeline.py" for c in COMMANDS)


def test_every_readme_command_is_classified() -> None:
    unknown = [str(c) for c in COMMANDS if classify(c.argv) is None]
    assert not unknown, ("README commands that tests/test_readme.py cannot exercise (add a rule for them):\n"
                         + "\n".join(unknown))


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if line.startswith("#")}


def test_readme_and_docs_links_resolve() -> None:
    """Relative links (and their #anchors) of README.md and docs/*.md point at what exists."""
    problems = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = page.parent / path if path else page
            if not target.exists():
                problems.append(f"{page.relative_to(REPO)}: {link}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
                problems.append(f"{page.relative_to(REPO)}: {link}: no such heading")
    assert not problems, "\n".join(problems)


# ----- exercising the commands -------------------------------------------------------------------------
def test_readme_shell_scripts_exist_are_executable_and_know_their_options() -> None:
    problems = []
    for command in (c for c in COMMANDS if classify(c.argv) == "shell"):
        script = REPO / command.argv[0]
        if not script.is_file() or not os.access(script, os.X_OK):
            problems.append(f"{command}: {script} is not an executable file")
            continue
        text = script.read_text()
        problems += [f"{command}: {script.name} never mentions {option}"
                     for option in command.argv[1:] if option.startswith("-") and option not in text]
    assert not problems, "\n".join(problems)


def test_readme_pytest_commands_use_registered_markers_and_real_paths() -> None:
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {marker.split(":")[0].strip() for marker in pytest_options["markers"]}
    problems, seen = [], 0
    for command in (c for c in COMMANDS if classify(c.argv) == "pytest"):
        seen += 1
        args = list(command.argv[3:])
        for flag, value in itertools.pairwise(args):
            if flag == "-m":
                words = set(re.findall(r"[A-Za-z_]\w*", value)) - {"not", "and", "or"}
                problems += [f"{command}: marker {w!r} is not registered in pyproject.toml" for w in words - registered]
        problems += [f"{command}: {path} does not exist"
                     for path in args if path.startswith("tests") and not (REPO / path).exists()]
    assert seen, "the README shows no pytest command"
    assert not problems, "\n".join(problems)


@pytest.fixture
def placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Real paths for the README's placeholders; the working directory is a temporary folder, so relative
    run directories (runs/...) land there."""
    run_dir = tmp_path / "run"
    tiny_config(run_dir)
    images = tmp_path / "images"
    images.mkdir()
    rows = ["lesion_id,image_id,dx"]
    for index, dx in enumerate(("mel", "nv")):
        Image.new("RGB", (40, 30), (120 + 40 * index, 80, 60)).save(images / f"ISIC_{index:07d}.jpg")
        rows.append(f"HAM_{index:07d},ISIC_{index:07d},{dx}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return {"RUN_DIR": str(run_dir), "IMAGES_DIR": str(images), "LABELS_CSV": str(tmp_path / "labels.csv")}


def _substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for token in argv:
        token = WHOLE_WORD_PLACEHOLDERS.get(token, token)
        for name in PLACEHOLDERS:
            token = token.replace(name, values[name])
        out.append(token)
    return out


def _configs_exist(argv: list[str]) -> None:
    """A ``--config PATH`` the README names (runs/improved/config.json, ...) made as a tiny run's config."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--config" and not Path(value).exists():
            tiny_config(Path(value).parent)


class _Parsed(Exception):
    """Raised by the patched parser once an entry point has parsed its arguments: nothing after runs."""


def _parse_only(entry: tuple[str, ...], args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run an entry point as ``__main__`` in this process until it has parsed ``args`` with its own parser."""
    parsed: list[argparse.Namespace] = []
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: list[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed.append(original(self, args, namespace))
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [entry[-1], *args])
    try:
        if entry[0] == "-m":
            runpy.run_module(entry[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO / entry[0]), run_name="__main__")
    except _Parsed:
        return parsed[0]
    raise AssertionError(f"{' '.join(entry)} finished without parsing its arguments")


def _run_pipeline(args: list[str]) -> None:
    """``launch/pipeline.py ARGS`` in-process, as a dry run. ``--from``/``--only`` re-make stages of an earlier
    run; in the fresh run directory here the plan must refuse them in the documented way (naming the stage
    that has not completed and the command that makes it)."""
    from launch import pipeline
    from launch.plan import PlanError

    namespace = pipeline.parser().parse_args(args)
    if not (namespace.help_config or namespace.emit_sbatch):
        namespace.dry_run = True
    try:
        assert pipeline.main(namespace) == 0
    except PlanError as refusal:
        if not (namespace.from_stage or namespace.only) or "has not completed" not in str(refusal):
            raise
        assert "python launch/pipeline.py --from" in str(refusal)


@pytest.mark.parametrize("command", IN_PROCESS, ids=_ids(IN_PROCESS))
def test_readme_command_runs_in_process(command: Command, placeholders: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kind = classify(command.argv)
    if kind == "shell":  # slurm/stage.sh STAGE ARGS submits what `pipeline.py --emit-sbatch STAGE ARGS` prints
        args = _substitute(list(command.argv[1:]), placeholders)
        _configs_exist(args)
        _run_pipeline(["--emit-sbatch", *args])
        assert "#SBATCH" in capsys.readouterr().out, command
        return
    entry, args = entry_point(command.argv)
    args = _substitute(args, placeholders)
    _configs_exist(args)
    try:
        if kind == "pipeline":
            _run_pipeline(args)
        else:
            _parse_only(entry, args, monkeypatch)
    except SystemExit as stop:
        raise AssertionError(f"{command}: exit {stop.code}: {capsys.readouterr().err.strip()}") from None
    except Exception as error:  # a refused config or plan: name the README line it came from
        raise AssertionError(f"{command}: {type(error).__name__}: {error}") from error


@pytest.mark.slow
def test_readme_entry_points_start_as_processes_and_scripts_parse() -> None:
    """Each distinct entry point answers ``--help`` as a real process from the repository root (what the
    in-process runs cannot show: imports and sys.path of a script started by path); each shell script
    passes ``bash -n``."""
    entries = sorted({entry_point(c.argv)[0] for c in COMMANDS if classify(c.argv) in ("pipeline", "entry")})
    env = stage_env(PYTHONPATH=str(REPO))  # this checkout's packages, whichever checkout the venv was installed from
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # each start is mostly importing torch
        results = list(pool.map(lambda entry: run_cli(*entry, "--help", timeout=300, env=env), entries))
    for result in results:
        assert_ok(result)
    scripts = {c.argv[0] for c in COMMANDS if classify(c.argv) == "shell"}
    assert scripts
    for script in sorted(scripts):
        result = run_quiet(["bash", "-n", str(REPO / script)], cwd=REPO)
        assert result.returncode == 0, f"{script}: {result.stderr}"
