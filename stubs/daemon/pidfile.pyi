from lockfile.pidlockfile import PIDLockFile

class TimeoutPIDLockFile(PIDLockFile):
    def __init__(self, path: str, acquire_timeout: float | None = ...) -> None: ...
