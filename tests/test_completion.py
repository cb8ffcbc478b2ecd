"""The bash completion (completion/ipcctl.bash), run in a real bash.

Each test sources the script, sets COMP_WORDS and COMP_CWORD as bash does for a Tab at
the end of the line, calls the completion function and reads COMPREPLY back.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from cli_surface import PARSERS, options, subcommands
from conftest import IPCCTL, Instance

SCRIPT = Path(__file__).parent.parent / "completion" / "ipcctl.bash"
#: bash-completion itself, when the machine has it: the script must work under it too.
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def complete(*words: str, env: dict[str, str] | None = None) -> list[str]:
    """COMPREPLY for a Tab after ``words`` (the last one is the word being completed)."""
    func = "_ipcd" if Path(words[0]).name == "ipcd" else "_ipcctl"
    preamble = f"source {BASH_COMPLETION}\n" if BASH_COMPLETION.exists() else ""
    script = (
        f"{preamble}source {shlex.quote(str(SCRIPT))}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        f"{func}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    base = {k: v for k, v in os.environ.items() if k != "IPCD_CONFIG"}
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def test_offers_every_subcommand_of_both_parsers() -> None:
    """A Tab after the command offers each subcommand its parser has."""
    for prog, parser in PARSERS.items():
        offered = complete(prog, "")
        missing = set(subcommands(parser)) - set(offered)
        assert not missing, f"{prog}: subcommands not completed: {sorted(missing)}"


def test_offers_every_option_of_every_subcommand() -> None:
    """A Tab after ``SUB -`` offers every option of that subcommand's parser."""
    for prog, parser in PARSERS.items():
        missing = set(options(parser)) - set(complete(prog, "-"))
        assert not missing, f"{prog}: options not completed: {sorted(missing)}"
        for name, sub in subcommands(parser).items():
            missing = set(options(sub)) - set(complete(prog, name, "-"))
            assert not missing, f"{prog} {name}: options not completed: {sorted(missing)}"


def test_completes_a_prefix() -> None:
    """Only the words that start with what was typed are offered."""
    assert complete("ipcctl", "su") == ["submit"]
    assert complete("ipcctl", "submit", "--time") == ["--timeout", "--timeout-job"]
    assert sorted(complete("ipcd", "st")) == ["start", "status", "stop"]


def test_handler_names_from_the_config(tmp_path: Path) -> None:
    """After ``submit`` come the handler names of the configuration -c names, in order."""
    config = tmp_path / "ipcd.toml"
    config.write_text(
        '[ipc]\nkey_path = "k"\n\n'
        "[handlers.echo]\ntype = 2\n\n"
        '  [ handlers."word-count" ]  # spaces, quotes and a comment\ntype = 10\n\n'
        "[handlers.resize]\ntype = 11\n"
        "# [handlers.commented_out]\n"
    )
    assert complete("ipcctl", "-c", str(config), "submit", "") == ["echo", "word-count", "resize"]
    assert complete("ipcctl", "--config", "=", str(config), "submit", "w") == ["word-count"]
    assert complete("ipcctl", "-c", str(config), "logs", "--type", "r") == ["resize"]
    assert complete("ipcctl", "submit", "e", env={"IPCD_CONFIG": str(config)}) == ["echo"]
    # The payload after the handler name, and a value after --delay, are the user's own.
    assert complete("ipcctl", "-c", str(config), "submit", "echo", "") == []
    assert complete("ipcctl", "-c", str(config), "submit", "--delay", "") == []


def test_handler_names_after_options_before_the_type(tmp_path: Path) -> None:
    """Options (and their values) between ``submit`` and the type do not count as the type."""
    config = tmp_path / "ipcd.toml"
    config.write_text("[handlers.echo]\ntype = 2\n")
    words = ("ipcctl", "-c", str(config), "submit", "--wait", "--timeout", "5", "")
    assert complete(*words) == ["echo"]


def test_files_after_config_option(tmp_path: Path) -> None:
    """-c and --config complete file names."""
    (tmp_path / "ipcd.toml").write_text("")
    (tmp_path / "ipcd-other.toml").write_text("")
    (tmp_path / "unrelated").write_text("")
    prefix = str(tmp_path / "ipcd")
    want = sorted([prefix + ".toml", prefix + "-other.toml"])
    assert sorted(complete("ipcctl", "-c", prefix)) == want
    assert sorted(complete("ipcd", "--config", prefix)) == want


def test_files_after_output_and_config_as_one_word(tmp_path: Path) -> None:
    """stats -o/--output completes file names and does not count as a positional;
    --config=FILE as one word (COMP_WORDBREAKS without "=") completes the file and is the
    configuration the handler names come from."""
    (tmp_path / "ipcd.prom").write_text("")
    (tmp_path / "ipcd.toml").write_text("[handlers.echo]\ntype = 2\n")
    prefix = str(tmp_path / "ipcd.p")
    for option in ("-o", "--output"):
        assert complete("ipcctl", "stats", option, prefix) == [prefix + "rom"]
    assert complete("ipcctl", "stats", "--output", "=", prefix) == [prefix + "rom"]
    assert complete("ipcctl", "stats", "-o", "x", "--j") == ["--json"]
    config = str(tmp_path / "ipcd.toml")
    assert complete("ipcctl", "--config=" + config[:-2]) == ["--config=" + config]
    assert complete("ipcd", "--config=" + config[:-2]) == ["--config=" + config]
    assert complete("ipcctl", "--config=" + config, "submit", "") == ["echo"]
    assert complete("ipcctl", "--config=" + config, "logs", "--type", "") == ["echo"]


def test_option_values() -> None:
    """--level and --color offer their fixed values."""
    levels = ["debug", "info", "warning", "error", "critical"]
    assert complete("ipcctl", "logs", "--level", "") == levels
    assert complete("ipcctl", "logs", "--color", "a") == ["auto", "always"]


def test_store_commands(tmp_path: Path) -> None:
    """--state offers the states its command takes; pause and resume take handler names
    (any number of them); --older-than and -n take the user's own values."""
    config = tmp_path / "ipcd.toml"
    config.write_text("[handlers.echo]\ntype = 2\n\n[handlers.sleep]\ntype = 3\n")
    assert complete("ipcctl", "list", "--state", "") == [
        "queued", "scheduled", "running", "done", "failed", "cancelled",
    ]  # fmt: skip
    assert complete("ipcctl", "cancel", "--type", "echo", "--state", "") == ["queued", "scheduled"]
    assert complete("ipcctl", "purge", "--state", "") == ["done", "failed", "cancelled"]
    assert complete("ipcctl", "-c", str(config), "pause", "echo", "") == ["echo", "sleep"]
    assert complete("ipcctl", "-c", str(config), "resume", "--json", "s") == ["sleep"]
    assert complete("ipcctl", "-c", str(config), "pause", "--timeout", "") == []
    assert complete("ipcctl", "purge", "--older-than", "") == []
    assert complete("ipcctl", "list", "-n", "") == []


def test_no_config_no_names() -> None:
    """Without a readable configuration, ``submit`` offers nothing rather than failing."""
    assert complete("ipcctl", "submit", "", env={"IPCD_CONFIG": "/nonexistent/ipcd.toml"}) == []


@pytest.mark.timeout(60)
def test_retry_offers_the_failed_jobs(daemon: Instance) -> None:
    """After ``retry`` come the ids of the jobs on the failed list."""
    failed = daemon.ipcctl("submit", "fail", "on purpose", "--wait")
    assert failed.returncode == 1, failed.stderr
    job_id = daemon.ipcctl("submit", "fail", "again")
    assert job_id.returncode == 0, job_id.stderr
    daemon.wait_events(lambda e: e.get("event") == "job.done", 2)
    offered = complete(IPCCTL, "-c", str(daemon.config_path), "retry", "")
    listed = daemon.ipcctl("failed").stdout.split("\n")
    assert len(offered) == 2, listed
    assert job_id.stdout.strip() in offered
    assert all(any(line.startswith(i) for line in listed) for i in offered)


def test_registers_both_commands() -> None:
    """Sourcing the script registers a completion function for ipcctl and for ipcd."""
    done = subprocess.run(
        ["bash", "--norc", "-c", f"source {shlex.quote(str(SCRIPT))}; complete -p ipcctl ipcd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.splitlines() == ["complete -F _ipcctl ipcctl", "complete -F _ipcd ipcd"]
