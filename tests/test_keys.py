"""Key derivation: ipcd's ftok matches the C library's, and the derived keys are stable."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import sysv_ipc

from ipcd.config import IpcConfig
from ipcd.errors import NotRunningError
from ipcd.kernel import keys


def _ipc(key_path: Path | None = None, key: int | None = None, proj_id: int = 0x49) -> IpcConfig:
    return IpcConfig(key_path=key_path, proj_id=proj_id, key=key, mode=0o660, send_timeout=1.0)


@pytest.mark.parametrize("proj_id", [1, 0x49, 0x7F, 0x80, 0xFD])
def test_ftok_matches_libc(tmp_path: Path, proj_id: int) -> None:
    """keys.ftok gives the same key as glibc's ftok() (through sysv_ipc) for any proj_id."""
    path = tmp_path / "key"
    path.touch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sysv_ipc warns that ftok is not recommended
        expected = sysv_ipc.ftok(str(path), proj_id, silence_warning=True) & 0xFFFFFFFF
    assert keys.ftok(path, proj_id) == expected


def test_derived_keys_follow_ftok_of_next_proj_ids(tmp_path: Path) -> None:
    """The reply queue and gate keys equal ftok(path, proj_id + 1) and ftok(path, proj_id + 2)."""
    path = tmp_path / "key"
    derived = keys.derive(_ipc(path), create_key_file=True)
    assert derived.jobs == keys.ftok(path, 0x49)
    assert derived.replies == keys.ftok(path, 0x4A)
    assert derived.gate == keys.ftok(path, 0x4B)
    assert derived.results == derived.jobs
    assert derived.how == f"ftok({str(path)!r}, 0x49)"


def test_key_file_created_once_and_key_stable(tmp_path: Path) -> None:
    """The daemon's derive() creates the key file once; later calls reuse it unchanged."""
    path = tmp_path / "key"
    first = keys.derive(_ipc(path), create_key_file=True)
    path.write_text("an editor wrote here")  # same inode: the key does not move
    assert keys.derive(_ipc(path), create_key_file=True) == first
    assert keys.derive(_ipc(path)) == first


def test_missing_key_file_means_not_running(tmp_path: Path) -> None:
    """A client whose key file does not exist is told the daemon never started."""
    with pytest.raises(NotRunningError, match="does not exist"):
        keys.derive(_ipc(tmp_path / "absent"))


def test_explicit_key_wraps_at_32_bits() -> None:
    """An explicit key is used as is; the derived keys wrap within 32 bits."""
    derived = keys.derive(_ipc(key=0xFF000001))
    assert (derived.jobs, derived.replies, derived.gate) == (0xFF000001, 0x00000001, 0x01000001)
    assert keys.as_key_t(0xFFFFFFFF) == -1 and keys.as_key_t(0x49000001) == 0x49000001
