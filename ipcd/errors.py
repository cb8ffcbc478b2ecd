"""ipcd's exceptions and the exit statuses they map to.

Every error ipcd raises on purpose is an :class:`IpcdError`.  Subclasses also inherit the
fitting builtin (a config error is a ``ValueError``, a timeout a ``TimeoutError``) so that
callers who only know the builtins still catch them.  Each class carries the exit status the
command-line tools turn it into; only the CLI modules call ``sys.exit``.

The statuses follow ``sysexits.h`` where it has a fitting code, so a cron script can branch
on them; ``docs/exit-status.md`` is the table users read.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit statuses of ``ipcd`` and ``ipcctl``."""

    OK = 0
    #: The job ran and its handler failed (or the job was rejected by the daemon).
    JOB_FAILED = 1
    #: ``ipcd status``: not running (LSB convention for status actions).
    NOT_RUNNING = 3
    #: ``ipcctl submit --unique KEY``: a job with that key is already waiting or running;
    #: nothing was queued (not a failure: the work is already on its way).
    ALREADY_QUEUED = 4
    #: ``ipcctl submit``: the job was sent to the kernel queue, but the daemon did not
    #: confirm that it is in the job store (not running, or its store not writable): it
    #: waits in the kernel queue, and is lost only if the machine goes down first.
    NOT_CONFIRMED = 5
    #: Bad command line (EX_USAGE).
    USAGE = 64
    #: Bad input data: payload too large, unreadable stdin (EX_DATAERR).
    DATA = 65
    #: No result is known for that job id; no log file to read (EX_NOINPUT).
    NO_RESULT = 66
    #: The daemon or its queue is not there (EX_UNAVAILABLE).
    UNAVAILABLE = 69
    #: Internal error: a bug in ipcd (EX_SOFTWARE).
    SOFTWARE = 70
    #: ``ipcd start``: another instance holds the PID file (EX_CANTCREAT).
    ALREADY_RUNNING = 73
    #: ``ipcctl stats --output``: the file cannot be written (EX_CANTCREAT).
    CANT_CREATE = 73
    #: The job store (``[store] path``) is missing, unreadable, read-only, corrupt or full
    #: (EX_IOERR).
    STORE = 74
    #: The queue stayed full for the whole timeout; the job was not accepted (EX_TEMPFAIL).
    QUEUE_FULL = 75
    #: ``--wait``: the daemon said the job ended, but its result could not be kept (the
    #: result segment was removed or overwritten meanwhile): the job ran, do not simply
    #: submit it again (EX_PROTOCOL).
    RESULT_LOST = 76
    #: Permission denied on the IPC objects or files (EX_NOPERM).
    NO_PERMISSION = 77
    #: The configuration is invalid (EX_CONFIG).
    CONFIG = 78
    #: Waiting timed out (the convention of timeout(1)).
    TIMEOUT = 124


class IpcdError(Exception):
    """Base of every error ipcd raises on purpose."""

    exit_code: ExitCode = ExitCode.SOFTWARE


class ConfigError(IpcdError, ValueError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = ExitCode.CONFIG


class UsageError(IpcdError, ValueError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = ExitCode.USAGE


class PayloadError(IpcdError, ValueError):
    """A payload or result cannot be encoded, or is too large for its carrier."""

    exit_code = ExitCode.DATA


class NotRunningError(IpcdError, ConnectionError):
    """The daemon, its queue or its result segment is not there."""

    exit_code = ExitCode.UNAVAILABLE


class OverwrittenError(NotRunningError):
    """A segment at ipcd's key holds another program's header (PHP's ``shm_attach()``
    writes its own); the daemon writes its own back within seconds."""


class ResultLostError(IpcdError, LookupError):
    """The daemon said the job ended, but its result is not in the result segment."""

    exit_code = ExitCode.RESULT_LOST


class AlreadyRunningError(IpcdError, RuntimeError):
    """Another daemon instance holds the PID file."""

    exit_code = ExitCode.ALREADY_RUNNING


class OutputError(IpcdError, OSError):
    """An output file (``ipcctl stats --output``) cannot be written."""

    exit_code = ExitCode.CANT_CREATE


class IpcPermissionError(IpcdError, PermissionError):
    """The kernel refused access to an IPC object or a file."""

    exit_code = ExitCode.NO_PERMISSION


class UnsafeObjectError(IpcdError, PermissionError):
    """An IPC object at ipcd's key has an owner or mode the daemon must not trust."""

    exit_code = ExitCode.NO_PERMISSION


class QueueFullError(IpcdError, BlockingIOError):
    """The queue stayed full until the timeout: the job was not accepted."""

    exit_code = ExitCode.QUEUE_FULL


class NotConfirmedError(IpcdError, RuntimeError):
    """The job was sent, but its commit to the job store was not confirmed in time."""

    exit_code = ExitCode.NOT_CONFIRMED

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(
            f"job {job_id} sent but not confirmed: {why}; it waits in the kernel queue"
        )
        self.job_id = job_id


class AlreadyQueuedError(IpcdError, RuntimeError):
    """A job with the same unique key is waiting or running, so this one was not queued."""

    exit_code = ExitCode.ALREADY_QUEUED

    def __init__(self, job_id: str, key: str) -> None:
        super().__init__(f"already queued as job {job_id} (unique key {key})")
        #: The job that holds the key: ``ipcctl result ID --wait`` waits for it.
        self.job_id = job_id
        self.key = key


class WaitTimeoutError(IpcdError, TimeoutError):
    """No result arrived before the timeout."""

    exit_code = ExitCode.TIMEOUT


class LockTimeoutError(WaitTimeoutError):
    """One of ipcd's lock semaphores stayed taken for the whole wait.

    A client gives up (124); the daemon's processes log it and wait again
    (ipcd.daemon.lockwaits), so that a stopped client or a stray ``semctl`` delays jobs
    without ever stopping the daemon.
    """

    def __init__(self, message: str, *, key: int, waited: float) -> None:
        super().__init__(message)
        self.key = key
        self.waited = waited


class NoResultError(IpcdError, LookupError):
    """The result segment holds no result for that job id."""

    exit_code = ExitCode.NO_RESULT


class LogFileError(IpcdError, OSError):
    """The log file ``ipcctl logs`` should read is not there or cannot be read."""

    exit_code = ExitCode.NO_RESULT


class JobFailedError(IpcdError, RuntimeError):
    """The job ran (or was rejected) and ended with an error result."""

    exit_code = ExitCode.JOB_FAILED


class StartupError(IpcdError, RuntimeError):
    """The daemon detached but could not become ready; the message says why."""

    exit_code = ExitCode.JOB_FAILED


class ReloadFailedError(IpcdError, RuntimeError):
    """The daemon could not reload and keeps its old configuration; the status is that of
    the daemon's own error (78 for a configuration or handler it refused)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code) if exit_code in set(ExitCode) else ExitCode.SOFTWARE


class ControlError(IpcdError, RuntimeError):
    """The daemon answered a control request (ipcd.wire.control) with an error of a status
    this ipcd has no class for, or with an answer that cannot be read (70)."""

    def __init__(self, message: str, status: int, holder: tuple[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: With status 4 (ALREADY_QUEUED): the job holding the unique key, and the key.
        self.holder = holder
        self.exit_code = ExitCode(status) if status in set(ExitCode) else ExitCode.SOFTWARE


class InternalError(IpcdError, RuntimeError):
    """A bug in ipcd: an exception nobody expected reached the command line."""

    exit_code = ExitCode.SOFTWARE


class StoreError(IpcdError, OSError):
    """The job store cannot do what was asked; the message names its path, the cause and
    what the operator can do."""

    exit_code = ExitCode.STORE


class StoreUnavailableError(StoreError):
    """The job store cannot be opened or written: its directory is missing, permission is
    denied, the file or its directory is read-only, or another process holds it locked."""


class StoreCorruptError(StoreError):
    """The job store's file is not a database, is malformed, or has a newer schema than
    this ipcd knows."""


class StoreFullError(StoreError):
    """The job store's file system (or its size limit) is full."""


class MessageError(IpcdError, ValueError):
    """A message taken from the queue cannot be turned into a job.

    The daemon answers it with an error result (when it knows the job id) and a log event;
    it never stops for one.
    """

    exit_code = ExitCode.DATA
    #: The job id, when the message was an envelope whose id could be read.
    job_id: str | None = None
    #: The reply type the envelope asked for, when it could be read (to wake the waiter).
    reply_to: int | None = None
    #: The envelope's unique key, when it could be read (to release it).
    unique: str | None = None
    #: The envelope's spilled payload (an ipcd.wire.protocol.SpillRef), when it could be read
    #: (to remove its segment: a rejected job never runs, so nothing else would).
    spill: object = None


class RefusedPayloadError(MessageError):
    """The message is well formed but carries something ipcd refuses (a PHP object)."""
