"""The man pages in man/: they render cleanly, name everything the parsers accept, and
``make install`` puts them (and the bash completion) where man and bash look for them.

man-db and groff are needed (.ci/run installs them): these tests fail without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_surface import PARSERS, long_options, subcommands

from ipcd.errors import ExitCode

ROOT = Path(__file__).parent.parent
PAGES = {"ipcctl": ROOT / "man" / "ipcctl.1", "ipcd": ROOT / "man" / "ipcd.8"}
ALL_PAGES = [*PAGES.values(), ROOT / "man" / "ipcd.toml.5"]
#: Statuses of ipcd.errors.ExitCode that one tool never exits with (docs/exit-status.md).
NOT_EXITED_BY = {
    "ipcctl": {ExitCode.NOT_RUNNING, ExitCode.ALREADY_RUNNING},
    "ipcd": {
        ExitCode.DATA,
        ExitCode.NO_RESULT,
        ExitCode.QUEUE_FULL,
        ExitCode.ALREADY_QUEUED,
        ExitCode.NOT_CONFIRMED,
        ExitCode.RESULT_LOST,
    },
}
#: A tag line of an indented paragraph (.TP) in man's text output: the tag starts at
#: column 7, its text at column 14, on the tag's line when the tag is shorter than that.
TAG = re.compile(r"^ {7}(\S.*)$")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (Debian: apt-get install man-db groff-base)"
    return path


def render(page: Path) -> str:
    """The page as man prints it, wide enough that no option is broken across lines."""
    done = subprocess.run(
        [_need("man"), "-l", "-E", "ascii", "-P", "cat", str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "200", "LC_ALL": "C"},
        timeout=60,
        check=True,
    )
    return re.sub(r".\x08", "", done.stdout)


def sections(text: str) -> dict[str, list[str]]:
    """The page's lines by section heading (``OPTIONS``) and subsection (``OPTIONS/submit``)."""
    found: dict[str, list[str]] = {}
    section = sub = ""
    for line in text.splitlines():
        if re.fullmatch(r"[A-Z][A-Z ]*", line):
            section, sub = line, ""
            continue
        heading = re.fullmatch(r" {3}(\S.*)", line)
        if heading:
            sub = heading[1]
            continue
        found.setdefault(section, []).append(line)
        if sub:
            found.setdefault(f"{section}/{sub}", []).append(line)
    return found


def tagged(lines: list[str], word: str) -> bool:
    """Whether ``word`` stands as a whole word in a tag line among ``lines``."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")
    return any(pattern.search(tag) for tag in map(_tag, lines))


def _tag(line: str) -> str:
    if not TAG.match(line):
        return ""
    if len(line) > 14 and line[13] == " " and line[14] != " ":
        return line[7:13].rstrip()  # a short tag, its paragraph on the same line
    return line[7:]


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.name)
def test_page_renders_without_warnings(page: Path) -> None:
    """groff -ww and man --warnings find nothing to complain about."""
    groff = subprocess.run(
        [_need("groff"), "-man", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (groff.returncode, groff.stderr) == (0, "")
    man = subprocess.run(
        [_need("man"), "--warnings", "-l", "-E", "UTF-8", str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80"},
        timeout=60,
        check=False,
    )
    assert (man.returncode, man.stderr) == (0, "")
    assert "NAME" in man.stdout


@pytest.mark.parametrize("prog", sorted(PAGES))
def test_page_names_every_command_and_option(prog: str) -> None:
    """Each subcommand of the parser is a tag under COMMANDS, each of its long options a
    tag in its OPTIONS subsection, and each top-level long option a tag under OPTIONS."""
    parser = PARSERS[prog]
    found = sections(render(PAGES[prog]))
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS",
                    "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"):  # fmt: skip
        assert heading in found, f"{PAGES[prog].name} has no {heading} section"
    missing = [o for o in long_options(parser) if not tagged(found["OPTIONS"], o)]
    for name, sub in subcommands(parser).items():
        if not tagged(found["COMMANDS"], name):
            missing.append(name)
        for option in long_options(sub):
            if option in long_options(parser):
                continue  # -c/--config: every command's, documented once above
            if not tagged(found.get(f"OPTIONS/{name}", []), option):
                missing.append(f"{name} {option}")
    assert not missing, f"{PAGES[prog].name} does not document: {missing}"


def test_environment_and_exit_statuses() -> None:
    """Both pages name IPCD_CONFIG and NO_COLOR, and every status of ipcd.errors.ExitCode
    that the tool can exit with."""
    for prog, page in PAGES.items():
        found = sections(render(page))
        for variable in ("IPCD_CONFIG", "NO_COLOR"):
            assert tagged(found["ENVIRONMENT"], variable), (prog, variable)
        for code in set(ExitCode) - NOT_EXITED_BY[prog]:
            assert tagged(found["EXIT STATUS"], str(int(code))), (prog, code)


def test_make_install_puts_man_pages_and_completion_in_place(tmp_path: Path) -> None:
    """make install DESTDIR=… installs the pages under share/man/manN, where man finds
    them, and the completion for ipcctl and ipcd; make uninstall removes them again."""
    stage = tmp_path / "stage"
    # Everything but the Python package: a virtualenv without pip, and no pip run.
    make = [
        _need("make"), "--no-print-directory", "-C", str(ROOT), f"DESTDIR={stage}",
        f"SYSTEM_PYTHON={sys.executable}", "VENV_FLAGS=--without-pip", "PIP=true",
    ]  # fmt: skip
    done = subprocess.run([*make, "install"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    share = stage / "usr" / "local" / "share"
    lib = stage / "usr" / "local" / "lib" / "ipcd"
    for installed, source in (
        (share / "man" / "man1" / "ipcctl.1", ROOT / "man" / "ipcctl.1"),
        (share / "man" / "man5" / "ipcd.toml.5", ROOT / "man" / "ipcd.toml.5"),
        (share / "man" / "man8" / "ipcd.8", ROOT / "man" / "ipcd.8"),
        (share / "bash-completion" / "completions" / "ipcctl", ROOT / "completion" / "ipcctl.bash"),
        (share / "bash-completion" / "completions" / "ipcd", ROOT / "completion" / "ipcctl.bash"),
        # The clients, where clients/php/README.md and docs/php.md require them from.
        (lib / "ipcd.php", ROOT / "clients" / "php" / "ipcd.php"),
        (lib / "ipcctl.php", ROOT / "clients" / "php" / "ipcctl.php"),
        (lib / "ipcd-submit.c", ROOT / "clients" / "c" / "ipcd-submit.c"),
    ):
        assert installed.read_bytes() == source.read_bytes(), installed
        assert installed.stat().st_mode & 0o777 == 0o644, installed

    env = {**os.environ, "MANPATH": str(share / "man"), "MANWIDTH": "80", "LC_ALL": "C"}
    for args, first_line in (
        (["ipcctl"], "IPCCTL(1)"),
        (["5", "ipcd.toml"], "IPCD.TOML(5)"),
        (["ipcd"], "IPCD(8)"),
    ):
        shown = subprocess.run(
            [_need("man"), "-P", "cat", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.split()[0] == first_line

    done = subprocess.run([*make, "uninstall"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p for p in share.rglob("*") if not p.is_dir()] == []
    assert not lib.exists()


def test_make_run_hints_are_the_readmes() -> None:
    """The commands `make run` prints to try are the ones README.md's Quick start shows."""
    dry = subprocess.run(
        [_need("make"), "--no-print-directory", "-n", "-C", str(ROOT), "run", "BIN=.venv/bin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    printed = [
        line.split('"')[1].strip()
        for line in dry.stdout.splitlines()
        if line.startswith('echo "    ')
    ]
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("## ", 1)[0]
    shown = [line for line in quick.splitlines() if line.startswith(".venv/bin/")]
    assert printed and printed == shown
