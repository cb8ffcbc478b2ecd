# Type stubs for the parts of python-daemon (which ships none) that ipcd uses.
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, TextIO

_Handler = Callable[[int, FrameType | None], Any] | str | None

class DaemonContext:
    def __init__(
        self,
        chroot_directory: str | None = ...,
        working_directory: str = ...,
        umask: int = ...,
        uid: int | None = ...,
        gid: int | None = ...,
        initgroups: bool = ...,
        prevent_core: bool = ...,
        detach_process: bool | None = ...,
        files_preserve: Sequence[int | TextIO] | None = ...,
        pidfile: Any = ...,
        stdin: TextIO | None = ...,
        stdout: TextIO | None = ...,
        stderr: TextIO | None = ...,
        signal_map: Mapping[int, _Handler] | None = ...,
    ) -> None: ...
    def open(self) -> None: ...
    def close(self) -> None: ...
    @property
    def is_open(self) -> bool: ...
