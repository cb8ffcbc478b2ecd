"""ipcctl's lean path (ipcd.lean): the same outcomes as the full CLI, a compiled
configuration that is never stale and never another user's, and a start that imports
none of the full CLI's modules."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IPCCTL, TESTS, Instance

import ipcd
from ipcd.kernel import bare
from ipcd.lean import cache
from ipcd.lean.ipcctl import parse
from ipcd.tables.results import ResultStore

#: Modules the lean path must not load (the full CLI's and the daemon's).
HEAVY = ("argparse", "tomllib", "structlog", "sqlite3", "ipcd.config", "ipcd.cli", "ipcd.client")
#: Runs the full CLI's entry point, as ipcctl did before the lean path.
FULL = "import sys; sys.argv[0] = 'ipcctl'; from ipcd.cli.ipcctl import entry; entry()"
#: Runs ipcctl's entry point and writes the heavy modules it loaded to $LEAN_PROBE.
PROBE = (
    "import atexit, os, sys\n"
    "def probe():\n"
    f"    loaded = sorted(set({HEAVY!r}) & set(sys.modules))\n"
    "    open(os.environ['LEAN_PROBE'], 'w').write(' '.join(loaded))\n"
    "atexit.register(probe)\n"
    "sys.argv[0] = 'ipcctl'\n"
    "from ipcd.lean.ipcctl import entry\n"
    "entry()\n"
)
_ID = re.compile(r"\b[0-9a-f]{16}\b")


def _compile(inst: Instance) -> None:
    """Compile the instance's configuration into the run's cache, as a later ipcctl
    would once the file has settled (the clock is moved past SETTLE instead)."""
    done = cache.refresh(
        str(inst.config_path), _cache_dir(), ipcd.__version__, now=time.time() + 10
    )
    assert done


def _cache_dir() -> str:
    found = cache.directory(os.environ)
    assert found is not None
    return found


def _run(
    argv: list[str], *, stdin: str | None = None, probe: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS / "plugins")}
    if probe is not None:
        env["LEAN_PROBE"] = str(probe)
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _both(
    inst: Instance, args: list[str], tmp_path: Path, stdin: str | None = None
) -> tuple[tuple[int, str, str], tuple[int, str, str], str]:
    """(status, stdout, stderr) of the lean and the full CLI, job ids masked, and the
    heavy modules the lean run loaded."""
    probe = tmp_path / "probe"
    argv = ["-c", str(inst.config_path), *args]
    lean = _run([sys.executable, "-c", PROBE, *argv], stdin=stdin, probe=probe)
    full = _run([sys.executable, "-c", FULL, *argv], stdin=stdin)

    def masked(done: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
        return done.returncode, _ID.sub("ID", done.stdout), _ID.sub("ID", done.stderr)

    return masked(lean), masked(full), probe.read_text()


#: (arguments, stdin, whether the lean path runs it to its end without the full CLI).
CASES = [
    (["submit", "echo", "hello"], None, True),
    (["submit", "echo", "hello", "--wait"], None, True),
    (["submit", "echo", "-", "--wait"], "from stdin", True),
    (["submit", "echo", "hello", "--no-confirm"], None, True),
    (["submit", "fail", "boom", "--wait"], None, False),
    (["submit", "sleep", "5", "--wait", "--timeout", "0.3"], None, False),
    (["submit", "nope", "x"], None, False),
    (["submit", "99", "x", "--no-confirm"], None, False),
    (["submit", "echo", '{"a": [1, 2]}', "--json", "--wait"], None, False),
    (["submit", "echo", "k", "--unique", "lean-test"], None, False),
    (["submit", "echo", "--wait", "split", "positionals"], None, False),
    (["submit", "echo", "x", "--timeout", "3"], None, False),
    (["result", "0123456789abcdef"], None, False),
    (["result", "not/an/id"], None, False),
]


@pytest.mark.parametrize(("args", "stdin", "lean"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_lean_and_full_cli_agree(
    daemon: Instance, tmp_path: Path, args: list[str], stdin: str | None, lean: bool
) -> None:
    """The lean path and the full CLI print the same and exit the same for one command
    line, and the lean one loads none of the full CLI's modules when it runs it alone."""
    _compile(daemon)
    got, want, loaded = _both(daemon, args, tmp_path, stdin)
    assert got == want
    assert (loaded == "") is lean, loaded


def test_result_of_finished_job_agrees(daemon: Instance, tmp_path: Path) -> None:
    """``result ID`` of a finished job: the lean path prints what the full CLI prints."""
    _compile(daemon)
    done = daemon.ipcctl("submit", "echo", "stored", "--wait")
    assert done.returncode == 0
    job_id = daemon.ipcctl("submit", "echo", "again").stdout.strip()
    daemon.ipcctl("wait", job_id, check=True)
    got, want, loaded = _both(daemon, ["result", job_id], tmp_path)
    assert got == want == (0, "again\n", "")
    assert loaded == ""


def test_daemon_down_agrees(daemon: Instance, tmp_path: Path) -> None:
    """With the daemon stopped (its queue left): --no-confirm warns and exits 0, a
    confirmed submit prints the id and exits 5, the lean path exactly as the full CLI."""
    _compile(daemon)
    assert daemon.ipcd("stop").returncode == 0
    for args, status in (
        (["submit", "echo", "x", "--no-confirm"], 0),
        (["submit", "echo", "x"], 5),
    ):
        got, want, _ = _both(daemon, args, tmp_path)
        assert got == want
        assert got[0] == status and got[1] == "ID\n" and got[2], got


def test_real_ipcctl_submit_imports_nothing_heavy(daemon: Instance, tmp_path: Path) -> None:
    """The installed ``ipcctl submit`` (its console script) loads no argparse, tomllib,
    structlog, sqlite3 nor ipcd's config, CLI or client modules."""
    _compile(daemon)
    code = (
        "import runpy, sys, atexit\n"
        f"atexit.register(lambda: print(sorted(set({HEAVY!r}) & set(sys.modules)),"
        " file=sys.stderr))\n"
        f"sys.argv = [{IPCCTL!r}] + sys.argv[1:]\n"
        f"runpy.run_path({IPCCTL!r}, run_name='__main__')\n"
    )
    done = _run([sys.executable, "-c", code, "-c", str(daemon.config_path), "submit", "echo", "x"])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "[]"


def test_lean_reader_reads_what_the_ring_holds(daemon: Instance) -> None:
    """ipcd.kernel.bare reads each record as ipcd.tables.results does (text, JSON, error)."""
    ids = [
        daemon.ipcctl("submit", "echo", "text", "--wait").stdout,
        daemon.ipcctl("submit", "echo", '{"n": 1}', "--json", "--wait").stdout,
    ]
    assert all(ids)
    failed = daemon.ipcctl("submit", "fail", "boom", "--no-confirm").stdout.strip()
    sent = [daemon.ipcctl("submit", "echo", "t", "--no-confirm").stdout.strip(), failed]
    for job_id in sent:
        daemon.ipcctl("wait", job_id)
    key = daemon.keys.jobs
    store = ResultStore.open(key)
    ring = bare.Ring.open(key)
    assert ring is not None
    try:
        records = store.records()
        assert len(records) >= 4
        for record in records:
            assert ring.find(record.job_id) == (
                record.type,
                int(record.status),
                int(record.kind),
                record.data,
            )
        assert ring.find("0000000000000000") is None
    finally:
        ring.close()
        store.segment.close()


# --- the compiled configuration -------------------------------------------------------------


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    inst = Instance(tmp_path, tmp_path / "ipcd.toml")
    inst.write()
    return inst.config_path


def _fresh(tmp_path: Path, toml: Path) -> str:
    cache_dir = str(tmp_path / "cache" / "ipcd")
    assert cache.refresh(str(toml), cache_dir, "v", now=time.time() + 10)
    return cache_dir


def test_compiled_configuration_is_read_back(tmp_path: Path, toml: Path) -> None:
    """A compiled configuration holds the handlers and the key settings, in a 0700
    directory and a 0600 file."""
    cache_dir = _fresh(tmp_path, toml)
    doc = cache.read(str(toml), cache_dir, "v")
    assert doc is not None
    assert doc["handlers"] == {"echo": 2, "sleep": 3, "fail": 4}
    assert doc["key_path"] == str(toml.parent / "ipcd.key") and doc["send_timeout"] == 2.0
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700
    (entry,) = os.listdir(cache_dir)
    assert os.stat(f"{cache_dir}/{entry}").st_mode & 0o777 == 0o600
    assert cache.read(str(toml), cache_dir, "another version") is None


def test_edit_in_place_with_same_size_and_old_mtime_is_stale(tmp_path: Path, toml: Path) -> None:
    """An edit that keeps the size and even sets the old mtime back is never read from
    the cache (ctime changes)."""
    cache_dir = _fresh(tmp_path, toml)
    st = toml.stat()
    text = toml.read_text()
    toml.write_text(text.replace("type = 2", "type = 5"))
    assert toml.stat().st_size == st.st_size
    os.utime(toml, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.read(str(toml), cache_dir, "v") is None


def test_replaced_file_is_stale(tmp_path: Path, toml: Path) -> None:
    """A file replaced by another (a new inode, as an editor's save-by-rename makes) is
    never read from the cache."""
    cache_dir = _fresh(tmp_path, toml)
    new = toml.with_suffix(".new")
    new.write_text(toml.read_text())
    new.replace(toml)
    assert cache.read(str(toml), cache_dir, "v") is None


def test_unsettled_file_is_not_compiled(tmp_path: Path, toml: Path) -> None:
    """A file changed less than SETTLE seconds ago is not compiled (a second edit within
    one clock tick could keep every stat field)."""
    cache_dir = str(tmp_path / "cache")
    assert not cache.refresh(str(toml), cache_dir, "v", now=time.time())
    assert cache.read(str(toml), cache_dir, "v") is None


@pytest.mark.parametrize("how", ["other owner", "group-writable", "world-writable", "symlink"])
def test_foreign_cache_file_is_ignored(tmp_path: Path, toml: Path, how: str) -> None:
    """A cache file owned by another user, writable by group or others, or a symlink, is
    never read."""
    cache_dir = _fresh(tmp_path, toml)
    (name,) = os.listdir(cache_dir)
    path = Path(cache_dir, name)
    if how == "other owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file to another user")
        os.chown(path, 54321, -1)
    elif how == "symlink":
        real = tmp_path / "elsewhere"
        path.rename(real)
        path.symlink_to(real)
    else:
        path.chmod(0o620 if how == "group-writable" else 0o602)
    assert cache.read(str(toml), cache_dir, "v") is None


@pytest.mark.parametrize("how", ["other owner", "world-writable", "group-writable"])
def test_cache_in_a_directory_others_can_write_is_ignored(
    tmp_path: Path, toml: Path, how: str
) -> None:
    """A cache directory another user owns or others may write is neither read nor
    written."""
    cache_dir = _fresh(tmp_path, toml)
    if how == "other owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory to another user")
        os.chown(cache_dir, 54321, -1)
    else:
        os.chmod(cache_dir, 0o777 if how == "world-writable" else 0o770)
    assert cache.read(str(toml), cache_dir, "v") is None
    for name in os.listdir(cache_dir):
        os.unlink(f"{cache_dir}/{name}")
    assert not cache.refresh(str(toml), cache_dir, "v", now=time.time() + 10)
    assert os.listdir(cache_dir) == []


def test_cache_directory_without_home_is_the_callers_own_in_var_tmp() -> None:
    """No $HOME and no $XDG_CACHE_HOME (a bare cron job): ipcd-EUID in /var/tmp; else
    theirs."""
    own = f"/var/tmp/ipcd-{os.geteuid()}"
    assert cache.directory({}) == own
    assert cache.directory({"HOME": "relative"}) == own
    assert cache.directory({}, "/srv/tmp/") == f"/srv/tmp/ipcd-{os.geteuid()}"
    assert cache.directory({"HOME": "/root/"}) == "/root/.cache/ipcd"
    assert cache.directory({"HOME": "/h", "XDG_CACHE_HOME": "/x"}) == "/x/ipcd"
    assert cache.directory({"HOME": "/h", "XDG_CACHE_HOME": "rel"}) == "/h/.cache/ipcd"


def test_without_home_ipcctl_keeps_its_cache_in_var_tmp(daemon: Instance) -> None:
    """A cron job with no $HOME: the first run compiles into /var/tmp/ipcd-EUID (made
    0700) and submits through the full CLI, the next ones read that cache.  (A directory
    there that is not the caller's own is refused as any other: the foreign-directory
    tests below.  What this test made in /var/tmp goes again.)"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(TESTS / "plugins")}
    shared = cache.directory({})
    assert shared is not None
    made = not os.path.exists(shared)
    name = str(daemon.config_path).replace("%", "%25").replace("/", "%2F") + ".marshal"
    st = os.stat(daemon.config_path)  # a file changed within SETTLE is not compiled
    time.sleep(max(0.0, max(st.st_mtime, st.st_ctime) + cache.SETTLE + 0.1 - time.time()))
    try:
        for _ in range(2):
            done = subprocess.run(
                [IPCCTL, "-c", str(daemon.config_path), "submit", "echo", "cron", "--wait"],
                capture_output=True, text=True, env=env, timeout=60, check=False,
            )  # fmt: skip
            assert (done.returncode, done.stdout, done.stderr) == (0, "cron\n", "")
        assert os.stat(shared).st_mode & 0o777 == 0o700
        compiled = cache.read(str(daemon.config_path), shared, ipcd.__version__)
        assert compiled is not None and compiled["handlers"]["echo"] == 2
    finally:
        with contextlib.suppress(OSError):
            os.unlink(f"{shared}/{name}")
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(shared)


def test_stale_cache_is_not_used_by_ipcctl(daemon: Instance) -> None:
    """After an edit that keeps the file's size, ipcctl reads the new file, not the
    compiled old one: here the edit gives echo the fail handler's type, which the new
    file's validation refuses (78) where the old settings would have run the job."""
    _compile(daemon)
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("type = 2", "type = 4", 1))
    done = daemon.ipcctl("submit", "echo", "hi", "--wait")
    assert done.returncode == 78, done
    assert "handlers.fail.type 4 is already used by handler 'echo'" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "echo", "--wait", "x"],  # argparse refuses positionals split by an option
        ["submit", "echo", "x", "--wai"],  # an abbreviation argparse would accept
        ["submit", "--", "echo"],
        ["submit", "-h"],
        ["submit", "echo", "-x"],
        ["submit", "echo", "x", "--json"],
        ["result", "abc", "--json"],
        ["result", "abc", "--timeout", "1"],
        ["-c", "--wait", "submit", "echo"],
        ["status"],
    ],
)
def test_lean_path_leaves_other_command_lines_to_the_full_cli(argv: list[str]) -> None:
    """Command lines the lean path does not run exactly as argparse would go to the full CLI."""
    assert parse(argv) is None


def test_lean_path_reads_its_command_lines() -> None:
    """The forms it runs: -c before or after the command, --timeout=S, stdin."""
    line = parse(["submit", "-c", "x.toml", "echo", "-", "--wait", "--timeout=2.5"])
    assert line is not None
    assert (line.config, line.positionals, line.wait, line.timeout) == (
        "x.toml", ["echo", "-"], True, 2.5,
    )  # fmt: skip
