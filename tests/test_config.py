"""Tests of ipcd.config: defaults, path resolution, locating the file, and every refusal."""

from __future__ import annotations

import re
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import IPCCTL

from ipcd import config
from ipcd.config import (
    Config,
    DaemonConfig,
    HandlerConfig,
    IpcConfig,
    LogConfig,
    ResultsConfig,
)
from ipcd.errors import ConfigError, ExitCode, UsageError

MINIMAL = '[ipc]\nkey_path = "ipcd.key"\n'

HANDLERS = """
[handlers.echo]
type = 2

[handlers.resize]
type = 0x20
target = "shop.images:resize"
"""


def write(directory: Path, text: str, name: str = "ipcd.toml") -> Path:
    """Write a config file (dedented) into ``directory`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return config.load(write(tmp_path, text))


# --- defaults and values ---------------------------------------------------------------------


def test_defaults_fill_every_setting_but_the_key(tmp_path: Path) -> None:
    """A file naming only ``ipc.key_path`` gets the documented default for every other setting."""
    path = write(tmp_path, MINIMAL)
    assert config.load(path) == Config(
        path=path,
        ipc=IpcConfig(
            key_path=tmp_path / "ipcd.key", proj_id=0x49, key=None, mode=0o660, send_timeout=5.0
        ),
        daemon=DaemonConfig(
            pid_file=Path("/run/ipcd/ipcd.pid"), workdir=Path("/"), umask=0o027, stop_timeout=30.0
        ),
        log=LogConfig(file=None, level="info"),
        results=ResultsConfig(size=1 << 20, slot_size=4096),
        handlers=(),
    )


def test_every_setting_is_read_as_written(tmp_path: Path) -> None:
    """Every setting in the file reaches the dataclasses, integers become floats for timeouts
    and the log level is lower-cased."""
    path = write(
        tmp_path,
        """
        [ipc]
        key = 0x1234
        proj_id = 7
        mode = 0o640
        send_timeout = 2

        [daemon]
        pid_file = "/var/run/x.pid"
        workdir = "/srv"
        umask = 0o077
        stop_timeout = 1.5

        [log]
        file = "/var/log/ipcd.log"
        level = "DEBUG"

        [results]
        size = 65536
        slot_size = 1024
        """
        + HANDLERS,
    )
    assert config.load(path) == Config(
        path=path,
        ipc=IpcConfig(key_path=None, proj_id=7, key=0x1234, mode=0o640, send_timeout=2.0),
        daemon=DaemonConfig(
            pid_file=Path("/var/run/x.pid"), workdir=Path("/srv"), umask=0o077, stop_timeout=1.5
        ),
        log=LogConfig(file=Path("/var/log/ipcd.log"), level="debug"),
        results=ResultsConfig(size=65536, slot_size=1024),
        handlers=(
            HandlerConfig(name="echo", type=2, target=None),
            HandlerConfig(name="resize", type=0x20, target="shop.images:resize"),
        ),
    )


@pytest.mark.parametrize(
    ("text", "read", "value"),
    [
        ("[ipc]\nkey = 1", lambda c: c.ipc.key, 1),
        ("[ipc]\nkey = 0xffffffff", lambda c: c.ipc.key, 0xFFFFFFFF),
        ('[ipc]\nkey_path = "k"\nproj_id = 1', lambda c: c.ipc.proj_id, 1),
        ('[ipc]\nkey_path = "k"\nproj_id = 246', lambda c: c.ipc.proj_id, 246),
        ('[ipc]\nkey_path = "k"\nmode = 0o775', lambda c: c.ipc.mode, 0o775),
        ('[ipc]\nkey_path = "k"\nmode = 0', lambda c: c.ipc.mode, 0),
        (MINIMAL + "[results]\nslot_size = 256\nsize = 576", lambda c: c.results.slot_size, 256),
        (
            MINIMAL + "[results]\nslot_size = 16777216\nsize = 33554496",
            lambda c: c.results.slot_size,
            1 << 24,
        ),
        (MINIMAL + "[results]\nslot_size = 256\nsize = 576", lambda c: c.results.size, 576),
        (MINIMAL + "[jobs]\nspill_slots = 2", lambda c: c.results.spill_reserved, 1),
        (MINIMAL + "[jobs]\nspill_slots = 100", lambda c: c.results.spill_reserved, 25),
        (
            MINIMAL + "[results]\nspill_reserved = 9\n[jobs]\nspill_slots = 10",
            lambda c: c.results.spill_reserved,
            9,
        ),
        (MINIMAL + "[handlers.a]\ntype = 2", lambda c: c.handlers[0].type, 2),
        (MINIMAL + "[handlers.a]\ntype = 2147483647", lambda c: c.handlers[0].type, 2**31 - 1),
    ],
)
def test_boundary_values_are_accepted(
    tmp_path: Path, text: str, read: Callable[[Config], object], value: int
) -> None:
    """The first and last allowed value of each ranged setting loads as written."""
    assert read(load_text(tmp_path, text)) == value


# --- paths -----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are joined to the config file's directory, whatever the working
    directory, and normalized (no ``..`` in them, nor in the messages that show them);
    absolute paths are kept and ``~`` is expanded."""
    etc = tmp_path / "etc"
    write(
        etc,
        """
        [ipc]
        key_path = "ipcd.key"

        [daemon]
        pid_file = "../run/ipcd.pid"
        workdir = "/srv/jobs"

        [log]
        file = "~/ipcd.log"
        """,
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    loaded = config.load(Path("etc/ipcd.toml"))
    assert loaded.path == etc / "ipcd.toml"
    assert loaded.ipc.key_path == etc / "ipcd.key"
    assert str(loaded.daemon.pid_file) == str(tmp_path / "run" / "ipcd.pid")
    assert loaded.daemon.workdir == Path("/srv/jobs")
    assert loaded.log.file == tmp_path / "home" / "ipcd.log"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert config.load(etc / "ipcd.toml") == loaded
    assert config.load(Path("../etc/./ipcd.toml")) == loaded

    # What ipcctl says names the file as it is, not as the configuration spelled it.
    (etc / "ipcd.toml").write_text('[ipc]\nkey_path = "../run/../run/./ipcd.key"\n')
    said = subprocess.run(
        [IPCCTL, "-c", "../etc/ipcd.toml", "submit", "2", "x"], capture_output=True, text=True
    )
    assert said.returncode == ExitCode.UNAVAILABLE
    assert f"{tmp_path / 'run' / 'ipcd.key'}" in said.stderr and ".." not in said.stderr


# --- locate() --------------------------------------------------------------------------------


def test_locate_prefers_the_explicit_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-c PATH`` wins over ``$IPCD_CONFIG``."""
    monkeypatch.setenv("IPCD_CONFIG", "/from/env.toml")
    assert config.locate("/from/option.toml") == Path("/from/option.toml")
    assert config.locate(Path("rel/option.toml")) == Path("rel/option.toml")


def test_locate_uses_the_environment_without_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``-c``, ``$IPCD_CONFIG`` names the file."""
    monkeypatch.setenv("IPCD_CONFIG", "/from/env.toml")
    assert config.locate(None) == Path("/from/env.toml")


@pytest.mark.parametrize("env", [None, ""])
def test_locate_falls_back_to_etc(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    """With neither ``-c`` nor a non-empty ``$IPCD_CONFIG`` the path is /etc/ipcd/ipcd.toml."""
    if env is None:
        monkeypatch.delenv("IPCD_CONFIG", raising=False)
    else:
        monkeypatch.setenv("IPCD_CONFIG", env)
    assert config.locate(None) == Path("/etc/ipcd/ipcd.toml")


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown sections and keys: typos are refused, not ignored
        (MINIMAL + "[ipcx]\n", "unknown setting ipcx"),
        ('[ipc]\nkeypath = "k"\n', "unknown setting ipc.keypath"),
        (MINIMAL + "[daemon]\npidfile = 'x'\n", "unknown setting daemon.pidfile"),
        (MINIMAL + "[log]\nlevl = 'info'\n", "unknown setting log.levl"),
        (MINIMAL + "[results]\nslots = 4\n", "unknown setting results.slots"),
        (MINIMAL + "[handlers.a]\ntype = 2\ntaget = 'm:f'\n", "unknown setting handlers.a.taget"),
        # sections that are not tables
        ("ipc = 1\n", "[ipc] must be a table"),
        ("handlers = 'echo'\n" + MINIMAL, "[handlers] must be a table"),
        (MINIMAL + "[handlers]\necho = 2\n", "[handlers.echo] must be a table"),
        # wrong types, including a bool where an int belongs
        ("[ipc]\nkey_path = 5\n", "ipc.key_path must be str, not int"),
        ('[ipc]\nkey = "0x1234"\n', "ipc.key must be int, not str"),
        ("[ipc]\nkey = true\n", "ipc.key must be int, not bool"),
        ('[ipc]\nkey_path = "k"\nproj_id = "73"\n', "ipc.proj_id must be int, not str"),
        ('[ipc]\nkey_path = "k"\nproj_id = 73.0\n', "ipc.proj_id must be int, not float"),
        ('[ipc]\nkey_path = "k"\nmode = true\n', "ipc.mode must be int, not bool"),
        ('[ipc]\nkey_path = "k"\nsend_timeout = "5"\n', "ipc.send_timeout must be float, not str"),
        (
            '[ipc]\nkey_path = "k"\nsend_timeout = true\n',
            "ipc.send_timeout must be float, not bool",
        ),
        (MINIMAL + "[daemon]\numask = false\n", "daemon.umask must be int, not bool"),
        (MINIMAL + "[daemon]\nworkdir = ['/']\n", "daemon.workdir must be str, not list"),
        (MINIMAL + "[log]\nlevel = 1\n", "log.level must be str, not int"),
        (MINIMAL + "[results]\nsize = 1.5\n", "results.size must be int, not float"),
        (MINIMAL + "[results]\nslot_size = true\n", "results.slot_size must be int, not bool"),
        (MINIMAL + "[handlers.a]\ntype = '2'\n", "handlers.a.type must be int, not str"),
        (MINIMAL + "[handlers.a]\ntype = true\n", "handlers.a.type must be int, not bool"),
        (
            MINIMAL + "[handlers.a]\ntype = 2\ntarget = 1\n",
            "handlers.a.target must be str, not int",
        ),
        # neither key_path nor key
        ("", "[ipc] needs key_path (for ftok) or an explicit numeric key"),
        ("[ipc]\nmode = 0o600\n", "[ipc] needs key_path (for ftok) or an explicit numeric key"),
        # ranges
        ("[ipc]\nkey = 0\n", "ipc.key must be between 1 and 0xffffffff"),
        ("[ipc]\nkey = -1\n", "ipc.key must be between 1 and 0xffffffff"),
        ("[ipc]\nkey = 0x100000000\n", "ipc.key must be between 1 and 0xffffffff"),
        ('[ipc]\nkey_path = "k"\nproj_id = 0\n', "ipc.proj_id must be between 1 and 246"),
        ('[ipc]\nkey_path = "k"\nproj_id = 247\n', "ipc.proj_id must be between 1 and 246"),
        (
            '[ipc]\nkey_path = "k"\nmode = 0o1660\n',
            "ipc.mode must be a permission mode such as 0o660",
        ),
        ('[ipc]\nkey_path = "k"\nmode = -1\n', "ipc.mode must be a permission mode such as 0o660"),
        (
            '[ipc]\nkey_path = "k"\nsend_timeout = 0\n',
            "ipc.send_timeout must be a positive number of seconds",
        ),
        (
            MINIMAL + "[daemon]\nstop_timeout = -1.0\n",
            "daemon.stop_timeout must be a positive number of seconds",
        ),
        (
            '[ipc]\nkey_path = "k"\nsend_timeout = nan\n',
            "ipc.send_timeout must be a positive number of seconds",
        ),
        (
            MINIMAL + "[daemon]\nstop_timeout = inf\n",
            "daemon.stop_timeout must be a positive number of seconds",
        ),
        (MINIMAL + "[daemon]\numask = 0o1000\n", "daemon.umask must be a mode such as 0o027"),
        (
            MINIMAL + "[log]\nlevel = 'verbose'\n",
            "log.level must be one of debug, info, warning, error",
        ),
        (
            MINIMAL + "[results]\nslot_size = 255\n",
            "results.slot_size must be between 256 bytes and 16 MiB",
        ),
        (
            MINIMAL + "[results]\nslot_size = 16777217\n",
            "results.slot_size must be between 256 bytes and 16 MiB",
        ),
        (
            MINIMAL + "[results]\nslot_size = 1024\nsize = 2111\n",
            "results.size must hold at least two slots (64 + 2 * slot_size)",
        ),
        (MINIMAL + "[jobs]\nspill_slots = 1\n", "jobs.spill_slots must be between 2 and 65536"),
        (
            MINIMAL + "[results]\nspill_reserved = 0\n",
            "results.spill_reserved must be between 1 and 63",
        ),
        (
            MINIMAL + "[results]\nspill_reserved = 4\n[jobs]\nspill_slots = 4\n",
            "results.spill_reserved must be between 1 and 3",
        ),
        # world-writable objects would let anyone forge jobs
        (
            '[ipc]\nkey_path = "k"\nmode = 0o662\n',
            "ipc.mode 0o662 is world-writable: anyone could forge jobs",
        ),
        (
            '[ipc]\nkey_path = "k"\nmode = 0o666\n',
            "ipc.mode 0o666 is world-writable: anyone could forge jobs",
        ),
        # handlers
        (MINIMAL + "[handlers.a]\n", "[handlers.a] needs a message type: type = N"),
        (
            MINIMAL + "[handlers.a]\ntype = 3\n[handlers.b]\ntype = 3\n",
            "handlers.b.type 3 is already used by handler 'a'",
        ),
        (
            MINIMAL + "[handlers.a]\ntype = 0\n",
            "handlers.a.type must be between 1 and 2147483647",
        ),
        (
            MINIMAL + "[handlers.a]\ntype = -2\n",
            "handlers.a.type must be between 1 and 2147483647",
        ),
        (
            MINIMAL + "[handlers.a]\ntype = 2147483648\n",
            "handlers.a.type must be between 1 and 2147483647",
        ),
        (
            MINIMAL + "[handlers.a]\ntype = 2\ntarget = 'shop.images.resize'\n",
            "handlers.a.target must look like 'package.module:function'",
        ),
    ],
)
def test_invalid_settings_are_refused_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    """Each invalid setting raises ConfigError whose message is the file's path, then the
    offending key and what is wrong with it."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == f"{path}: {message}"


def test_config_error_is_a_value_error_with_the_config_exit_status(tmp_path: Path) -> None:
    """ConfigError is also a ValueError and maps to exit status 78 (EX_CONFIG)."""
    with pytest.raises(ValueError) as caught:
        load_text(tmp_path, "[ipcx]\n")
    assert isinstance(caught.value, ConfigError)
    assert caught.value.exit_code is ExitCode.CONFIG
    assert int(caught.value.exit_code) == 78


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A config path that does not exist raises ConfigError naming that path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == f"{path}: configuration file not found"


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b'[ipc]\nkey_path = "unterminated\n', "(at line 2, column 25)"),
        (b'[ipc]\nkey_path = "a"\nkey_path = "b"\n', "(at line 3, column 15)"),
        (b"[ipc\n", "(at line 1, column 5)"),
    ],
)
def test_invalid_toml_is_refused(tmp_path: Path, content: bytes, where: str) -> None:
    """A file that is not TOML raises ConfigError naming the file and where parsing failed."""
    path = tmp_path / "ipcd.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert message.endswith(where)


def test_text_that_is_not_utf8_is_invalid_toml(tmp_path: Path) -> None:
    """A file that is not UTF-8 (which TOML requires) raises ConfigError naming the file."""
    path = tmp_path / "ipcd.toml"
    path.write_bytes(b'[ipc]\nkey_path = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == (
        f"{path}: invalid TOML: 'utf-8' codec can't decode byte 0xe9 in position 21: "
        "invalid continuation byte"
    )


# --- handler lookups -------------------------------------------------------------------------


@pytest.fixture
def with_handlers(tmp_path: Path) -> Config:
    """A configuration with the handlers echo (type 2) and resize (type 0x20)."""
    return load_text(tmp_path, MINIMAL + HANDLERS)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("echo", 2),
        ("resize", 0x20),
        ("2", 2),
        ("32", 32),
        ("7", 7),
        ("0x7", 7),
        ("0x20", 32),
        ("2147483647", 2147483647),
        ("0x7fffffff", 2147483647),
    ],
)
def test_handler_type_accepts_names_and_numbers(
    with_handlers: Config, typed: str, expected: int
) -> None:
    """A configured name gives its type; a decimal or 0x number gives itself, configured or
    not."""
    assert with_handlers.handler_type(typed) == expected


def test_handler_type_refuses_an_unknown_name(with_handlers: Config) -> None:
    """An unknown name raises UsageError listing the configured names."""
    with pytest.raises(UsageError) as caught:
        with_handlers.handler_type("ehco")
    assert str(caught.value) == "unknown handler 'ehco' (configured: echo, resize)"


def test_handler_type_without_handlers_says_none_configured(tmp_path: Path) -> None:
    """With no handlers configured, an unknown name's error says so."""
    with pytest.raises(UsageError) as caught:
        load_text(tmp_path, MINIMAL).handler_type("echo")
    assert str(caught.value) == "unknown handler 'echo' (configured: none configured)"


@pytest.mark.parametrize(
    ("typed", "number"),
    [("0", 0), ("-5", -5), ("2147483648", 2147483648), ("0x80000000", 2**31)],
)
def test_handler_type_refuses_out_of_range_numbers(
    with_handlers: Config, typed: str, number: int
) -> None:
    """Zero, negatives and numbers past 2**31-1 raise UsageError (exit 64)."""
    with pytest.raises(UsageError) as caught:
        with_handlers.handler_type(typed)
    assert str(caught.value) == f"message type {number} is out of range 1..2147483647"


def test_type_one_is_a_handler_type(tmp_path: Path) -> None:
    """Type 1 is an ordinary job type: a handler may have it and ipcctl may send it."""
    config = load_text(tmp_path, MINIMAL + "[handlers.first]\ntype = 1\n")
    assert config.handler_type("first") == config.handler_type("1") == 1
    assert config.handler_type("0x1") == 1


def test_handler_for_type_finds_the_configured_handler(with_handlers: Config) -> None:
    """handler_for_type returns the handler serving a type, and None for an unserved type."""
    assert with_handlers.handler_for_type(0x20) == HandlerConfig(
        name="resize", type=0x20, target="shop.images:resize"
    )
    assert with_handlers.handler_for_type(2) == HandlerConfig(name="echo", type=2, target=None)
    assert with_handlers.handler_for_type(3) is None
    assert with_handlers.handler_for_type(1) is None


@pytest.mark.parametrize(
    ("limits", "concurrency", "per_second", "burst"),
    [
        ("concurrency = 1", 1, None, 1),
        ('rate = "10/s"', None, 10.0, 10),
        ('rate = "30/min"', None, 0.5, 1),
        ('rate = "7200/h"\nburst = 5', None, 2.0, 5),
        ('rate = "2.5/s"\nconcurrency = 3', 3, 2.5, 3),
    ],
)
def test_handler_limits_are_read_with_the_burst_they_imply(
    tmp_path: Path, limits: str, concurrency: int | None, per_second: float | None, burst: int
) -> None:
    """concurrency as written; rate in starts per second; the burst as written, else one
    second's worth of starts, at least one."""
    cfg = load_text(tmp_path, MINIMAL + f"[handlers.a]\ntype = 2\n{limits}\n")
    [handler] = cfg.handlers
    assert (handler.concurrency, handler.rate_per_second, handler.burst_size) == (
        concurrency,
        per_second,
        burst,
    )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ("concurrency = 0", "handlers.a.concurrency must be between 1 and 65536"),
        ('rate = "10"', "handlers.a.rate: '10' is not a rate"),
        ('rate = "0/s"', "is not a rate"),
        ('rate = "5/day"', "is not a rate"),
        ('rate = "200000/s"', "is over 100000/s"),
        ('rate = "1/s"\nburst = 0', "handlers.a.burst must be between 1 and 100000"),
        ("burst = 3", "handlers.a.burst needs a rate"),
    ],
)
def test_bad_handler_limits_are_refused_naming_the_key(
    tmp_path: Path, limits: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_text(tmp_path, MINIMAL + f"[handlers.a]\ntype = 2\n{limits}\n")


# --- completion hooks ------------------------------------------------------------------------

HOOKED = (
    MINIMAL
    + """
[handlers.backup]
type = 30
on_failure = "notify"
on_success = "log"

[handlers.notify]
type = 31

[handlers.log]
type = 32
"""
)


def test_hooks_name_configured_handlers(tmp_path: Path) -> None:
    """on_success and on_failure are kept by handler name; absent ones are None."""
    loaded = load_text(tmp_path, HOOKED)
    hooks = {h.name: (h.on_success, h.on_failure) for h in loaded.handlers}
    assert hooks == {"backup": ("log", "notify"), "notify": (None, None), "log": (None, None)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('\n[handlers.x]\ntype = 40\non_failure = "nosuch"\n', "no handler 'nosuch'"),
        ('\n[handlers.x]\ntype = 40\non_failure = "x"\n', "handlers.x is a completion hook"),
        ('\n[handlers.x]\ntype = 40\non_failure = "backup"\n', "handlers.backup is a completion"),
        ("\n[handlers.x]\ntype = 40\non_success = 3\n", "on_success"),
    ],
    ids=["unknown", "itself", "a-hook-with-hooks", "not-a-name"],
)
def test_a_hook_that_could_chain_or_names_nothing_is_refused(
    tmp_path: Path, extra: str, message: str
) -> None:
    """A hook must name a handler, and a handler named as a hook has no hooks of its own
    (so follow-up jobs never have follow-ups, and hooks cannot loop)."""
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, HOOKED + extra)


def test_exec_notify_names_a_listed_command(tmp_path: Path) -> None:
    """[exec] notify names one of [exec.commands]; another name is refused."""
    ok = load_text(tmp_path, MINIMAL + '[exec]\nnotify = "a"\n[exec.commands]\na = ["/bin/true"]\n')
    assert ok.exec.notify == "a"
    with pytest.raises(ConfigError, match=r"exec\.notify 'b' is not in"):
        load_text(tmp_path, MINIMAL + '[exec]\nnotify = "b"\n[exec.commands]\na = ["/bin/true"]\n')
