"""The master process: keeps its processes alive, hands out jobs, and loses none.

The master handles no job itself.  It forks the intake (ipcd.daemon.intake), which drains
the kernel's job queue into the job store, the control process (ipcd.daemon.control),
which answers ipcctl's operator commands, and ``[daemon] workers`` workers, each blocking
in ``msgrcv`` on the private hand-off queue.  It then sleeps in ``select()`` on a
self-pipe that the signal handlers, the intake (new jobs), the control process (jobs
resumed or retried) and the workers (a job finished, or one with a deadline started)
write to.  It wakes to:

- hand jobs from the store to idle workers, as many as are idle, in the order the store
  decides (ipcd.store: type, then priority, then age), once their due time has come, and
  as the handlers' limits let them (ipcd.daemon.pacing), cancelling those that expired;

- reap dead workers (``waitpid(-1, WNOHANG)``), decode why they died, finish or re-run the
  job each one held (ipcd.tables.inflight), and fork a replacement, backing off when workers die
  young so that a broken handler cannot fork-bomb the host;
- kill a worker (its whole process group) whose job ran past its deadline;
- every minute, delete finished jobs past ``[store]`` retention;
- every few seconds, sweep the spill table (ipcd.tables.spill.table) for segments whose maker died
  before handing them on;
- reload (SIGHUP): fork a new generation of workers with the new configuration, then ask
  the old ones to finish their current job and exit, so jobs keep flowing;
- stop (SIGTERM/SIGINT): ask every worker to finish its job, wait up to
  ``graceful_timeout``, then kill the rest and keep their jobs for the next start;
- under systemd's watchdog, send a keep-alive every half ``WatchdogSec=`` (ipcd.daemon.sdnotify),
  so that a master that stops turning is restarted.

After each reload it publishes the outcome for ``ipcd reload`` (ipcd.daemon.reloading).

Signal handlers only record (ipcd.daemon.signals.Flags) and the C-level handler writes to the
self-pipe (``signal.set_wakeup_fd``); everything else happens in this loop.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

from ipcd import config as config_mod
from ipcd.daemon import control, lockwaits, objectwatch, reloading, startup
from ipcd.daemon import log as log_mod
from ipcd.daemon.capture import RunDir, RunFiles
from ipcd.daemon.doorbell import Doorbell
from ipcd.daemon.intake import Intake
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.pacing import Pacer
from ipcd.daemon.pidlock import PidLock
from ipcd.daemon.recovery import CANCELLED, DAEMON_KILLED, Recovery
from ipcd.daemon.schedules import Scheduler, compile_schedules
from ipcd.daemon.sdnotify import Watchdog
from ipcd.daemon.signals import Flags
from ipcd.daemon.startup import Prepared, hooks_of
from ipcd.daemon.sweep import Sweeper
from ipcd.daemon.worker import (
    Exit,
    describe_exit,
    parent_death_signal,
    worker_process,
)
from ipcd.errors import IpcdError, LockTimeoutError, MessageError, StoreError
from ipcd.handlers import registry as registry_mod
from ipcd.kernel.procs import alive, signal_worker
from ipcd.store import EXPIRED, JobRecord, JobStore, Retention
from ipcd.store.model import limits_of
from ipcd.tables import stats as stats_mod
from ipcd.tables.inflight import Held, InflightTable, Peek, State
from ipcd.tables.unique import Claim
from ipcd.wire import protocol

#: A worker that lived shorter than this "died young".
YOUNG = 1.0
#: How often the master looks around even when nothing woke it.
TICK = 1.0
#: How often the master sweeps the spill table for segments of dead makers.
SPILL_SWEEP = 3.0
#: How often the master applies the store's retention ([store] keep_*).
RETENTION = 60.0
#: How soon after a helper process (intake, control) died the master forks another.
HELPER_RESTART = 0.5


#: Back-off bounds for respawning workers that die soon after they start.
MIN_BACKOFF, MAX_BACKOFF = 0.1, 30.0


@dataclass
class WorkerInfo:
    pid: int
    slot: int
    generation: int
    spawned: float
    retiring: bool = False
    kill_reason: str | None = None


@dataclass
class Helper:
    """A process of the master's besides the workers: the intake or the control process."""

    role: str
    pid: int = 0
    spawned: float = 0.0
    #: Not before this (a helper that died young is not forked again at once).
    next_spawn: float = 0.0


@dataclass
class Pool:
    """The master's view of its workers (pid -> info) and their free slots, and the
    back-off that keeps a broken handler from making the master fork without end."""

    workers: dict[int, WorkerInfo] = field(default_factory=dict)
    free_slots: list[int] = field(default_factory=list)
    generation: int = 0
    backoff: float = MIN_BACKOFF
    next_spawn: float = 0.0
    restarts: int = 0

    def active(self) -> list[WorkerInfo]:
        """The workers of the current generation (not retiring)."""
        return [w for w in self.workers.values() if not w.retiring]

    def to_spawn(self, wanted: int, now: float) -> int:
        """How many workers to fork now: up to ``wanted`` active ones, as free slots
        allow, and none while the back-off holds spawning off."""
        if now < self.next_spawn:
            return 0
        return max(0, min(wanted - len(self.active()), len(self.free_slots)))

    def died_unexpectedly(self, lived: float, now: float) -> float | None:
        """Note a worker that died on its own, holding no job: one that lived under
        YOUNG doubles the back-off (up to MAX_BACKOFF) and holds the next spawn off that
        long, and the back-off is returned; a longer life resets it (None)."""
        self.restarts += 1
        if lived < YOUNG:
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            self.next_spawn = now + self.backoff
            return self.backoff
        self.backoff = MIN_BACKOFF
        return None

    def new_generation(self) -> list[WorkerInfo]:
        """Start a generation (a reload, objects made anew): it may spawn at once; the
        returned workers of the old one are to retire once the new one is forked."""
        old = self.active()
        self.generation += 1
        self.next_spawn = 0.0
        return old


def overdue(info: WorkerInfo, peek: Peek, now: float) -> float | None:
    """How long the job in ``info``'s slot has run, when it runs past its deadline and its
    worker is not being killed already; else None (no job, parked, no deadline)."""
    if info.kill_reason or not peek.holds_job or peek.state is not State.RUNNING:
        return None
    if peek.deadline and now >= peek.deadline:
        return now - peek.started
    return None


class Arbiter:
    """The master: the loop above, and the composition root of the master's side.

    It alone keeps the whole of :class:`~ipcd.daemon.startup.Prepared`, because it binds
    its parts anew: after a reload (configuration, registry) and when objects are made
    anew (every kernel object).  What it builds from the bag gets only the collaborators
    it uses (Outcomes, Recovery, the Sweeper, the locks made patient, the objects
    ipcd.daemon.objectwatch checks); a worker's side of the fork is the other root
    (ipcd.daemon.worker.worker_process).
    """

    def __init__(
        self,
        prepared: Prepared,
        flags: Flags,
        *,
        lock: PidLock | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.p = prepared
        self.flags = flags
        #: The configuration the IPC objects were made with: objects made anew keep its
        #: mode and sizes, whatever a reload changed (those need a restart).
        self.made_with = prepared.config
        #: The one-master lock (ipcd.daemon.pidlock): workers close their copy, so that only the
        #: master's life decides how long it is held.
        self.lock = lock
        self.watchdog = watchdog
        #: Where reload outcomes go: beside the PID file the daemon started with (a
        #: reload does not move it).
        self.pid_file = prepared.config.daemon.pid_file
        self.reloads = 0
        self.log = log_mod.get_logger(role="master")
        self.pool = Pool(free_slots=list(range(prepared.table.workers)))
        #: The master's connection to the job store (opened here, in the daemon process).
        self.jobs = prepared.open_jobs()
        #: Queues the [schedules.NAME] runs (ipcd.daemon.schedules); synced in run().
        self.scheduler = Scheduler(self.jobs, prepared.schedules, self.log)
        self._bind(prepared)
        self.drop_notice = log_mod.DropNotice(prepared.sink.path)
        self.watch = objectwatch.Watch()
        self.started = time.time()
        self._next_sweep = 0.0
        self._ready = False
        #: In-flight tables made anew while workers of older generations still use the
        #: removed one (ipcd.objectwatch.Retired).
        self._retired: list[objectwatch.Retired] = []
        self.master_pid = os.getpid()
        self.helpers = {role: Helper(role) for role in ("intake", "control")}
        self._next_retention = 0.0
        self._next_due: float | None = None
        self._due_checked = 0.0
        self._store_failing = False
        self._schedules_synced = False
        #: Dead workers whose claimed jobs are not all settled yet (the store refused):
        #: pid -> the id of the job its slot held (recovery's), tried again each turn.
        self._unsettled: dict[int, str | None] = {}
        self._unsettled_tried = 0.0
        self._wake_r, self._wake_w = os.pipe()
        self._notify_r, self._notify_w = os.pipe()
        for fd in (self._wake_r, self._wake_w, self._notify_r, self._notify_w):
            os.set_blocking(fd, False)

    def _bind(self, prepared: Prepared) -> None:
        """Use these objects: at start, and again when some were made anew."""
        self.p = prepared
        self.stats = prepared.stats.for_master()
        self.outcomes = Outcomes(
            store=prepared.store,
            failed=prepared.failed,
            replies=prepared.replies,
            log=self.log,
            events=log_mod.Events(prepared.sink, prepared.config.log.level, role="master"),
            unique=prepared.unique,
            stats=self.stats,
            jobs=self.jobs,
            doorbell=Doorbell(prepared.handoff, prepared.config.daemon.workers),
        )
        self.recovery = Recovery(
            outcomes=self.outcomes,
            store=prepared.store,
            jobs=self.jobs,
            registry=prepared.registry,
            config=prepared.config.jobs,
            stats=self.stats,
            log=self.log,
        )
        # A spilled payload's envelope is in the job queue or in the intake's slots: the
        # intake reads the payload into the store, so workers' slots never name one.
        self.spill_sweeper = Sweeper(prepared.spills, prepared.queue, prepared.intake)
        self.doorbell = Doorbell(prepared.handoff, prepared.config.daemon.workers)
        self.pacer = Pacer(
            self.jobs, self.doorbell, limited=bool(limits_of(prepared.config.handlers)),
            idle=self._idle, expired=self._expired,
        )  # fmt: skip

    # --- the main loop ------------------------------------------------------------------

    def run(self, ready: Callable[[], None] = lambda: None) -> None:
        p = self.p
        self.master_pid = os.getpid()  # after detaching, this is the daemon's own PID
        self.flags.install()
        lockwaits.be_patient(p.objects().locks(), self.log, self._give_up_lock)
        signal.signal(signal.SIGCHLD, _wake_only)
        previous_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        p.store.set_daemon(os.getpid(), self.started)
        p.table.set_master(os.getpid())
        self._recover_leftovers()
        self._requeue_running()
        self._sweep_spills(at_start=True)
        self._raise_queue_bytes()
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            config=str(p.config.path),
            key=f"{p.keys.jobs:#010x}",
            key_from=p.keys.how,
            workers=p.config.daemon.workers,
            handlers={r.name: r.type for r in p.registry.by_type.values()},
        )
        self._maintain()
        self._sync_schedules()
        self._run_schedules()
        self._ring_due()
        self._count_noticed()
        self._ready = True
        ready()
        try:
            while not self.flags.stopping:
                self._keep_alive()
                self._sleep()
                self._reap()
                self._watch_objects()
                if self.flags.stopping:
                    break
                if self.flags.reload:
                    self.flags.reload = False
                    self._reload()
                self._enforce_deadlines()
                self._nudge_retiring()
                if self._unsettled:
                    self._settle_unsettled()
                self._maintain()
                self._run_schedules()
                self._ring_due()
                self._pace()
                self._retain()
                self._sweep_spills()
                self._notice_dropped_log()
            self._shutdown()
        except LockTimeoutError:
            if not self.flags.stopping:
                raise
            self._shutdown()  # asked to stop while waiting for a lock another process held
        except Exception:
            self.log.critical("daemon.crashed", exc_info=True)
            for pid in self._all_children():
                signal_worker(pid, signal.SIGKILL)
            raise
        finally:
            signal.set_wakeup_fd(previous_fd)
            with contextlib.suppress(IpcdError):
                p.store.set_daemon(0, 0.0)
            p.table.set_master(0)
            reloading.forget(self.pid_file)
            if self.watchdog is not None:
                self.watchdog.close()
            self.log.info(
                "daemon.stopped",
                pid=os.getpid(),
                signal=self.flags.signal,
                restarts=self.pool.restarts,
                uptime_s=round(time.time() - self.started, 3),
            )
            self._count_noticed()
            p.sink.close()
            self.jobs.close()
            self._remove_socket()

    def _remove_socket(self) -> None:
        """The control socket goes with the daemon (a killed one's is replaced at the
        next start: nothing listens on it, ipcd.daemon.control.bind_socket)."""
        with contextlib.suppress(OSError):
            if (
                os.stat(self.p.config.control_socket).st_ino
                == os.fstat(self.p.listener.fileno()).st_ino
            ):
                os.unlink(self.p.config.control_socket)
        self.p.listener.close()

    def _watch_objects(self) -> None:
        """Make anew any object of ours that was removed or overwritten (daemon.objectwatch)."""
        wrong = self.watch.problems(self.p.keys, self.p.objects())
        if wrong:
            self._renew_objects(wrong)

    def _renew_objects(self, wrong: list[str]) -> None:
        """Open every object again as at start, making the missing ones and mending the
        overwritten ones, carry over what removed segments held, then start a new
        generation of workers on them.  Raises (the master exits non-zero, for systemd
        to restart it) when that fails: an object another user planted meanwhile."""
        old = self.p
        self.watch.rewrite_headers(old.objects())
        try:
            fresh = startup.reopen(old, self.made_with)
        except LockTimeoutError as exc:  # taken meanwhile: waited out at the next turns
            self.log.warning(
                "lock.timeout", lock="making objects anew", key=f"{exc.key:#010x}",
                waited_s=round(exc.waited, 3), then="try again", objects=wrong,
            )  # fmt: skip
            return
        except IpcdError as exc:
            self.log.critical("ipc.unrecoverable", objects=wrong, error=str(exc))
            raise
        self._count_noticed()  # what the objects about to be replaced noticed
        # Patient before carry_over, which takes the fresh locks too.
        lockwaits.be_patient(fresh.objects().locks(), self.log, self._give_up_lock)
        retired = None
        if fresh.table.segment.id != old.table.segment.id and self.pool.workers:
            # Its workers go on in the removed table until they leave (taken before the copy).
            retired = objectwatch.Retired.of(old.table, set(self.pool.workers))
            self._retired.append(retired)
        copied = objectwatch.carry_over(old.objects(), fresh.objects())
        if fresh.queue.id != old.queue.id:  # the jobs it held are gone, and their keys
            startup.free_lost_keys(fresh.unique, fresh.queue, fresh.table, self.jobs)
        self._bind(fresh)
        fresh.store.set_daemon(self.master_pid, self.started)
        fresh.table.set_master(self.master_pid)
        kept, lost = fresh.store.repaired or (None, 0)
        if lost:
            for _ in range(lost):
                self.stats.bump(stats_mod.RESULTS_LOST)
        current = self.pool.new_generation()
        objectwatch.close(old.objects(), keep=None if retired is None else old.table.segment)
        self._maintain()  # workers on the new objects first, as at a reload...
        for info in current:  # ...then those on the old ones finish their job and leave
            info.retiring = True
            signal_worker(info.pid, signal.SIGTERM, group=False)
        for helper in self.helpers.values():  # they start again on the new objects
            if helper.pid:
                signal_worker(helper.pid, signal.SIGTERM, group=False)
        self.log.warning(
            "ipc.recreated",
            objects=wrong,
            carried_over=copied or None,
            results_kept=kept,
            results_lost=lost,
            replaced_workers=len(current),
        )

    def _give_up_lock(self, waited: float) -> bool:
        """A lock held by another process: once ready, the master waits for as long as
        it takes (ipcd.daemon.lockwaits) unless asked to stop; while starting, up to
        START_PATIENCE, then start-up fails with a message naming the lock.  Between its
        waits it keeps systemd's watchdog fed: this wait is on purpose, not a hang."""
        self._keep_alive()
        if self.flags.stopping:
            return True  # a stop must not wait for a client that may never let go
        return not self._ready and waited >= lockwaits.START_PATIENCE

    def _sweep_spills(self, *, at_start: bool = False) -> None:
        """Remove spill segments whose maker died before handing them on; at start also
        those of results the ring no longer holds (a ring made anew)."""
        now = time.monotonic()
        if not at_start and now < self._next_sweep:
            return
        self._next_sweep = now + SPILL_SWEEP
        try:
            swept = self.spill_sweeper.sweep(self.p.store if at_start else None)
        except IpcdError as exc:
            self.log.error("spill.sweep_failed", error=str(exc))
            return
        if swept.freed or swept.removed:
            self.log.info("spill.swept", entries=swept.freed, segments=swept.removed)
        if swept.evicted:  # by clients' payload claims, which cannot log
            self.log.info("spill.evicted", results=swept.evicted, by="payloads")

    def _count_noticed(self) -> None:
        """Count the log lines the master dropped (ipcd.daemon.log) and say which ring
        headers it mended (Outcomes.report_mends) since the last call: the sink and the
        stores, shared by recovery, the sweep and the rest, report to their owner here."""
        dropped = self.p.sink.take_dropped()
        if dropped:
            self.stats.bump(stats_mod.LOG_DROPPED, dropped)
        self.outcomes.report_mends()

    def _notice_dropped_log(self) -> None:
        """Count what the master noticed this turn, then say on stderr (the journal) that
        log lines were dropped, at most once a minute."""
        self._count_noticed()
        dropped = self.p.stats.total(stats_mod.LOG_DROPPED)
        if dropped:
            self.drop_notice.update(dropped, self.p.sink.drop_reason)

    def _raise_queue_bytes(self) -> None:
        """[ipc] queue_bytes: a deeper queue, where the kernel lets us (CAP_SYS_RESOURCE)."""
        wanted = self.p.config.ipc.queue_bytes
        if wanted is None:
            return
        if self.p.queue.set_max_bytes(wanted):
            self.log.info("queue.max_bytes", bytes=self.p.queue.stats().max_bytes)
        else:
            self.log.warning(
                "queue.max_bytes_refused",
                wanted=wanted,
                bytes=self.p.queue.stats().max_bytes,
                reason="raising msg_qbytes above msgmnb needs CAP_SYS_RESOURCE",
            )

    def _keep_alive(self) -> None:
        """systemd's watchdog: the master still turns (sent when due, ipcd.daemon.sdnotify)."""
        if self.watchdog is None:
            return
        try:
            self.watchdog.keepalive(time.monotonic())
        except OSError as exc:
            self.log.warning("watchdog.notify_failed", error=exc.strerror)

    def _sleep(self) -> None:
        timeout = max(0.0, min(self._next_event() - time.time(), TICK))
        if self.watchdog is not None:
            timeout = min(timeout, self.watchdog.until_due(time.monotonic()))
        select.select([self._wake_r, self._notify_r], [], [], timeout)
        for fd in (self._wake_r, self._notify_r):
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):
                    pass

    def _next_event(self) -> float:
        now = time.time()
        times = [now + TICK]
        for info in self.pool.workers.values():
            peek = self.p.table.peek(info.slot)
            if peek.holds_job and peek.state is State.RUNNING and peek.deadline:
                times.append(peek.deadline)
        if self._next_due is not None:
            times.append(self._next_due)
        scheduled = self.scheduler.next_due()
        if scheduled is not None:
            times.append(scheduled)
        times.append(self.pacer.next_event())
        if len(self.pool.workers) < self.p.config.daemon.workers:
            times.append(self.pool.next_spawn)
        times.extend(h.next_spawn for h in self.helpers.values() if not h.pid)
        return min(times)

    # --- workers --------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Fork the intake and control processes when they are not running, and workers up
        to the configured number, respecting the back-off."""
        now = time.time()
        if not self.flags.stopping:
            for helper in self.helpers.values():
                if not helper.pid and now >= helper.next_spawn:
                    self._spawn_helper(helper)
        for _ in range(self.pool.to_spawn(self.p.config.daemon.workers, now)):
            self._spawn()

    def _close_in_child(self) -> list[int]:
        """The master's descriptors a child must not keep."""
        return [self._wake_r, self._wake_w, self._notify_r, self.p.listener.fileno()] + (
            [] if self.lock is None else [self.lock.fd]
        )

    def _spawn_helper(self, helper: Helper) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(self._helper_process(helper.role))
        helper.pid, helper.spawned = pid, time.time()
        self.log.info(f"{helper.role}.started", pid=pid)

    def _helper_process(self, role: str) -> int:  # pragma: no cover - runs in the child
        """The child's side of a helper's fork: reset what belongs to the master, serve."""
        code = 70
        try:
            parent_death_signal(signal.SIGTERM)
            if os.getppid() != self.master_pid:
                return 0
            signal.set_wakeup_fd(-1)
            for fd in self._close_in_child():
                if role != "control" or fd != self.p.listener.fileno():
                    os.close(fd)
            flags = Flags()
            flags.install()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            with contextlib.suppress(OSError):
                self.p.sink.reopen()
            log = log_mod.get_logger(role=role, pid=os.getpid())
            lockwaits.be_patient(self.p.objects().locks(), log)
            self.p.sink.take_dropped()
            self.p.store.take_mends()
            self.p.failed.store.take_mends()
            notify = self._notify_w

            def wake_master() -> None:
                with contextlib.suppress(OSError):
                    os.write(notify, b"!")

            p = self.p
            slot = p.table.workers + (0 if role == "intake" else 1)
            recorder = p.stats.for_worker(slot)
            jobs = p.open_jobs()
            outcomes = Outcomes(
                store=p.store, failed=p.failed, replies=p.replies, log=log,
                events=log_mod.Events(p.sink, p.config.log.level, role=role),
                unique=p.unique, stats=recorder, jobs=jobs,
                doorbell=Doorbell(p.handoff, p.config.daemon.workers), wake_master=wake_master,
            )  # fmt: skip
            if role == "intake":
                code = Intake(
                    queue=p.queue, slots=p.intake, jobs=jobs, registry=p.registry,
                    config=p.config, outcomes=outcomes, spills=p.spills, flags=flags,
                    log=log, stats=recorder, wake_master=wake_master,
                    doorbell=Doorbell(p.handoff, p.config.daemon.workers),
                ).serve()  # fmt: skip
            else:
                code = self._serve_control(jobs, outcomes, flags, log)
        except BaseException:
            with contextlib.suppress(Exception):
                log_mod.get_logger(role=role).critical(f"{role}.crashed", exc_info=True)
        return code

    def _serve_control(  # pragma: no cover - runs in the control process
        self, jobs: JobStore, outcomes: Outcomes, flags: Flags, log: log_mod.Logger
    ) -> int:
        """The control process: ipcctl's operator commands (ipcd.daemon.control).  Jobs
        it makes runnable (resume, retry) ring the workers' doorbell; a queued job it
        cancels ends as its waiter and unique key expect (an error result)."""
        p = self.p
        doorbell = Doorbell(p.handoff, p.config.daemon.workers)

        def cancelled(record: JobRecord) -> None:
            # A dependent cancelled with the job it waited for says why (ipcd.store.chains).
            outcomes.unstarted(record, record.error or CANCELLED, cancelled=True)

        @contextlib.contextmanager
        def retrying(record: JobRecord) -> Iterator[None]:
            """Around a retry: the job's unique key claimed again (AlreadyQueuedError
            while another job holds it; freed again when the retry fails), and its old
            result taken out of the ring, so that a waiter waits for the new outcome."""
            claim: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
            if record.unique is not None:
                claim = Claim(
                    p.unique, record.unique, record.id, alive=alive,
                    finished=lambda job_id: getattr(p.store.get(job_id), "finished", None),
                )  # fmt: skip
            with claim:
                p.store.clear(record.id)
                yield

        return control.serve(
            p.listener, jobs, p.table, lambda: doorbell.ring(p.config.daemon.workers), log,
            flags, on_cancelled=cancelled, retrying=retrying,
            runs=self._run_files(),
        )  # fmt: skip

    def _run_files(self) -> RunFiles:
        """The workers' run files (ipcd.daemon.capture) as the configuration places them."""
        p = self.p
        return RunFiles(
            RunDir.beside(p.config.store.path), p.table.workers, p.config.jobs.max_output
        )

    def _restart_helpers(self, timeout: float = 5.0) -> None:
        """Stop the intake and the control process and wait for them (the intake commits
        what it holds first), so that the next ones, forked at once, use the reloaded
        configuration and handlers: a job submitted after ``ipcd reload`` returned is
        vetted against the new handlers."""
        deadline = time.monotonic() + timeout
        for helper in self.helpers.values():
            if helper.pid:
                signal_worker(helper.pid, signal.SIGTERM, group=False)
        while self._helpers_alive() and time.monotonic() < deadline:
            for helper in self.helpers.values():
                if not helper.pid:
                    continue
                pid, status = os.waitpid(helper.pid, os.WNOHANG)
                if pid:
                    self._helper_died(pid, status)
                    helper.next_spawn = 0.0
                else:  # idle in msgrcv, a SIGTERM just before the call is lost: repeat
                    signal_worker(helper.pid, signal.SIGTERM, group=False)
            time.sleep(0.01)

    def _helpers_alive(self) -> bool:
        return any(h.pid for h in self.helpers.values())

    def _all_children(self) -> list[int]:
        return list(self.pool.workers) + [h.pid for h in self.helpers.values() if h.pid]

    def _spawn(self) -> None:
        slot = self.pool.free_slots.pop(0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker
            os._exit(
                worker_process(
                    self.p,
                    slot,
                    master_pid=self.master_pid,
                    close=self._close_in_child(),
                    notify_master=self._notify_w,
                )
            )
        self.pool.workers[pid] = WorkerInfo(pid, slot, self.pool.generation, time.time())
        self.stats.bump(stats_mod.WORKERS_STARTED)
        self.log.info("worker.started", pid=pid, slot=slot, generation=self.pool.generation)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = self.pool.workers.pop(pid, None)
            if info is None:
                self._helper_died(pid, status)
                continue
            self._worker_died(info, status)

    def _helper_died(self, pid: int, status: int) -> None:
        """The intake or the control process exited: another is forked (the intake
        commits what its predecessor's slots hold before it takes more)."""
        for helper in self.helpers.values():
            if helper.pid != pid:
                continue
            lived = time.time() - helper.spawned
            helper.pid = 0
            helper.next_spawn = time.time() + (HELPER_RESTART if lived < YOUNG else 0.0)
            expected = self.flags.stopping or (
                os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, Exit.QUEUE_GONE)
            )
            log = self.log.info if expected else self.log.warning
            log(f"{helper.role}.exited", pid=pid, cause=describe_exit(status, holding=False),
                lived_s=round(lived, 3))  # fmt: skip
            if not expected:
                self.stats.bump(stats_mod.WORKER_RESTARTS)

    def _table_of(self, pid: int) -> InflightTable:
        """The in-flight table worker ``pid`` records its jobs in."""
        return next((r.table for r in self._retired if pid in r.pids), self.p.table)

    def _left(self, info: WorkerInfo) -> Held | None:
        """The job a worker that exited left in its slot; a removed in-flight table it
        was the last to use is handed over."""
        held = self._table_of(info.pid).held(info.slot)
        for retired in list(self._retired):
            retired.pids.discard(info.pid)
            if not retired.pids:
                retired.hand_over(self.p.table, self.p.queue)
                self._retired.remove(retired)
        return held

    def _worker_died(self, info: WorkerInfo, status: int) -> None:
        held = self._left(info)
        if held is not None and held.state is State.PARKED:
            held = None
        # A worker that leaves while holding a job did not stop or recycle, whatever its
        # exit status says: a handler called exit() (or os._exit) with that status.
        cause = describe_exit(status, holding=held is not None)
        if held is not None:
            self.recovery.recover(
                held, cause=info.kill_reason or cause, timed_out=bool(info.kill_reason),
                captured=self._run_files().left(held.job_id) if held.job_id else None,
            )  # fmt: skip
        self._requeue_claimed(info.pid, held.job_id if held is not None else None)
        self._release_slot(info.slot)
        lived = time.time() - info.spawned
        expected = held is None and (
            info.retiring
            or self.flags.stopping
            or (os.WIFEXITED(status) and os.WEXITSTATUS(status) in (Exit.RECYCLED, Exit.QUEUE_GONE))
        )
        log = self.log.info if expected else self.log.warning
        log("worker.exited", pid=info.pid, slot=info.slot, cause=cause, lived_s=round(lived, 3))
        if expected:
            return
        self.stats.bump(stats_mod.WORKER_RESTARTS)
        if held is not None:
            # The job killed its worker, not the worker itself: the job runs again or fails
            # with the cause once its attempts are spent (ipcd.daemon.recovery), and the worker's
            # replacement starts at once.  A flood of such jobs must not hold the rest back.
            self.pool.restarts += 1
            return
        backoff = self.pool.died_unexpectedly(lived, time.time())
        if backoff is not None:
            self.log.warning("worker.backoff", seconds=backoff)

    # --- jobs whose worker died -------------------------------------------------------------

    def _release_slot(self, slot: int) -> None:
        """A worker's slot is free again, unless the master parked its job in it."""
        if self.p.table.peek(slot).state is State.PARKED:
            return
        self.p.table.clear(slot)
        if slot not in self.pool.free_slots:
            self.pool.free_slots.append(slot)

    def _recover_leftovers(self) -> None:
        """At start: jobs held by workers of a daemon that was killed are run again; jobs
        an ipcd older than the job store parked in the table go through the intake (one
        of a type no queue message can have is rejected)."""
        table = self.p.table
        for slot in range(table.workers + table.parked):
            held = table.held(slot)
            if held is not None and held.state is State.PARKED:
                if not 1 <= held.type <= protocol.MAX_TYPE:
                    self._reject_parked(held)
                elif self.p.queue.send_nowait(held.body, held.type):
                    table.clear(slot)
                elif slot < table.workers:
                    self.pool.free_slots.remove(slot)  # kept until the queue has room
                continue
            if held is not None:
                self.recovery.recover(held, cause=DAEMON_KILLED, timed_out=False)
            if slot < table.workers:
                table.clear(slot)

    def _reject_parked(self, held: Held) -> None:
        """A parked job of a type no queue message can have (any group member could write
        a parked slot, as ``submit --delay`` did): rejected, never sent, its slot freed."""
        try:
            protocol.decode(held.body, held.type)  # raises, with the id when it is readable
        except MessageError as exc:
            self.outcomes.reject(exc, held.body, held.type, parked=True)
        self.p.table.clear(held.slot)

    def _requeue_claimed(self, pid: int, held_id: str | None, *, again: bool = False) -> None:
        """A worker that died with jobs claimed in the store besides the one in its slot
        (``held_id``, recovery's): those it finished are recorded from the result ring
        (ipcd.daemon.ledger keeps outcomes for the next claim); those it never started
        go back without an attempt counted.  Whatever the store refused is tried again
        at the next turn of the loop (_settle_unsettled, ``again``), the slot's job
        included when recovery could not settle it: it ran, so its attempt counts."""
        try:
            for record in self.jobs.running():
                if record.worker_pid != pid or (record.id == held_id and not again):
                    continue
                if self.recovery.recorded_from_ring(record):
                    continue
                ran = record.id == held_id
                attempts = record.attempts if ran else max(record.attempts - 1, 0)
                if self.jobs.requeue(record.id, due=0.0, attempts=attempts):
                    cause = "its worker died" if ran else "claimed, never started"
                    self.log.warning("job.requeued", job_id=record.id, cause=cause)
                    self.doorbell.ring()
            # Recovery has settled the slot's job by now, unless the store refused it.
            left = any(r.worker_pid == pid for r in self.jobs.running())
        except StoreError as exc:
            self._store_failed(exc)
            left = True
        if left:
            self._unsettled[pid] = held_id
        else:
            self._unsettled.pop(pid, None)

    def _settle_unsettled(self) -> None:
        """Dead workers' claimed jobs the store refused to settle, tried again (once a
        second at most: each refusal is logged)."""
        now = time.monotonic()
        if now - self._unsettled_tried < 1.0:
            return
        self._unsettled_tried = now
        for pid, held_id in list(self._unsettled.items()):
            self._requeue_claimed(pid, held_id, again=True)

    def _requeue_running(self) -> None:
        """At start, after the jobs in the workers' slots were recovered: every job the
        store still says is running was running when the daemon (or the machine) died,
        its slot gone with a reboot.  It runs again as its next attempt (the store keeps
        the attempts it counted), unless the result ring shows it finished (its worker
        died before it recorded the outcome, ipcd.daemon.ledger).  What the hand-off
        queue holds is only rings: dropped."""
        while self.p.handoff.receive_nowait(0) is not None:
            pass
        try:
            for record in self.jobs.running():
                self.recovery.recorded_from_ring(record)  # finished, not yet recorded
            running = self.jobs.reset_running()
        except StoreError as exc:
            self.log.error("store.requeue_failed", error=str(exc))
            return
        for record in running:
            self.log.warning(
                "job.requeued", job_id=record.id, type=record.type,
                attempt=record.attempts + 1, cause=DAEMON_KILLED, delay_s=0.0,
            )  # fmt: skip
        if running:
            self.stats.bump(stats_mod.JOBS_REQUEUED, len(running))

    def _ring_due(self) -> None:
        """Jobs whose due time came (``--delay``, a retry's back-off) become queued in the
        store, and the doorbell wakes workers for them (ipcd.daemon.doorbell).  Workers
        take queued jobs from the store themselves, in the store's order."""
        now = time.time()
        try:
            if self._due_stale(now):
                self._next_due = self.jobs.next_due()
                self._due_checked = now
            if self._next_due is None or self._next_due > now:
                return
            due = self.jobs.promote_due(now)
            self._next_due = self.jobs.next_due()
        except StoreError as exc:
            self._store_failed(exc)
            return
        self._store_failing = False
        if due:
            self.doorbell.ring(due)

    def _sync_schedules(self) -> None:
        """The configured schedules into the store (at start and after a reload)."""
        try:
            self.scheduler.sync(self.p.schedules)
        except StoreError as exc:
            self._store_failed(exc)
            self._schedules_synced = False
            return
        self._schedules_synced = True

    def _run_schedules(self) -> None:
        """Queue the schedules' runs that are due (ipcd.daemon.schedules), and wake
        workers for them."""
        try:
            if not self._schedules_synced:
                self._sync_schedules()
                if not self._schedules_synced:
                    return
            fired = self.scheduler.tick()
        except StoreError as exc:
            self._store_failed(exc)
            return
        if fired:
            self.doorbell.ring(fired)

    def _pace(self) -> None:
        """Jobs held back by a handler's limits are rung for once they may start, and
        jobs past their expiry are cancelled (ipcd.daemon.pacing)."""
        try:
            self.pacer.turn()
        except StoreError as exc:
            self._store_failed(exc)
        # The dependents of expired jobs, cancelled in the same transaction (--after).
        self.outcomes.follow_chains()

    def _idle(self) -> bool:
        """Whether a worker of the current generation waits for work."""
        return any(
            not self._table_of(info.pid).peek(info.slot).holds_job for info in self.pool.active()
        )

    def _expired(self, record: JobRecord) -> None:
        """A job cancelled as expired: its waiter and unique key as for a cancel, one event."""
        self.outcomes.unstarted(record, EXPIRED, logged=False)
        self.log.info(
            "job.expired", job_id=record.id, type=record.type, handler=record.handler,
            waited_s=round(time.time() - record.accepted, 3),
        )  # fmt: skip

    def _due_stale(self, now: float) -> bool:
        """The earliest due time is looked up again at most every 50 ms: the intake may
        have stored a job due sooner."""
        return now - self._due_checked >= 0.05

    def _store_failed(self, exc: StoreError) -> None:
        self.stats.bump(stats_mod.STORE_ERRORS)
        if not self._store_failing:
            self._store_failing = True
            self.log.error("store.unreadable", error=str(exc), then="try again")

    def _retain(self) -> None:
        """Delete finished jobs past [store] retention: at start, after a reload, and every
        RETENTION seconds."""
        now = time.time()
        if now < self._next_retention:
            return
        self._next_retention = now + RETENTION
        cfg = self.p.config.store
        policy = Retention(cfg.keep_done, cfg.keep_done_age, cfg.keep_failed, cfg.keep_failed_age)
        try:
            deleted = self.jobs.retain(policy, now)
        except StoreError as exc:
            self._store_failed(exc)
            return
        if deleted:
            self.log.info("store.retained", deleted=deleted)

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for info in self.pool.workers.values():
            peek = self._table_of(info.pid).peek(info.slot)
            ran = overdue(info, peek, now)
            if ran is None:
                continue
            info.kill_reason = f"timeout: killed after {ran:.3g}s"
            self.log.warning("job.timeout", job_id=peek.job_id, pid=info.pid, ran_s=round(ran, 3))
            signal_worker(info.pid, signal.SIGKILL)

    def _nudge_retiring(self) -> None:
        """Repeat SIGTERM to retired workers still idle in msgrcv (a lost first signal)."""
        for info in self.pool.workers.values():
            if info.retiring and not self._table_of(info.pid).peek(info.slot).holds_job:
                signal_worker(info.pid, signal.SIGTERM, group=False)

    # --- reload and stop ------------------------------------------------------------------

    def _reload(self) -> None:
        p = self.p
        self.reloads += 1
        outcome = reloading.Outcome(os.getpid(), self.reloads, time.monotonic())
        try:
            p.sink.reopen()
        except OSError as exc:
            # The old file stays open: events keep going to the rotated-away file rather
            # than the daemon stopping over its log (a directory it may no longer write).
            self.log.error("log.reopen_failed", file=str(p.sink.path), error=exc.strerror)
        try:
            fresh = config_mod.load(p.config.path)
            registry = registry_mod.build(fresh)
            compiled = compile_schedules(fresh)
        except IpcdError as exc:
            self.log.error("daemon.reload_failed", error=str(exc), config=str(p.config.path))
            self._publish(outcome._replace(error=str(exc), exit_code=int(exc.exit_code)))
            return
        fresh, restart_needed = reloading.apply(p.config, fresh, max_workers=p.table.workers // 2)
        p.config, p.registry, p.schedules = fresh, registry, compiled
        self._sync_schedules()  # removed ones stop, changed ones count anew
        limits = limits_of(fresh.handlers)
        self.jobs.set_limits(limits)  # the new workers open their stores with them
        self.jobs.set_hooks(hooks_of(fresh))  # for the outcomes of dead workers' jobs
        self.pacer.limited = bool(limits)
        self._next_retention = 0.0  # [store] keep_* as reloaded apply now, not in a minute
        self._count_reload(registry)
        old = self.pool.new_generation()
        self._restart_helpers()  # the intake vets with the new handlers from now on
        self._maintain()  # the new generation starts taking jobs first...
        for info in old:  # ...then the old one finishes what it holds and exits
            info.retiring = True
            signal_worker(info.pid, signal.SIGTERM, group=False)
        self.log.info(
            "daemon.reloaded",
            handlers={r.name: r.type for r in registry.by_type.values()},
            replaced=len(old),
            restart_needed=list(restart_needed) or None,
        )
        self._publish(outcome)

    def _publish(self, outcome: reloading.Outcome) -> None:
        """Tell ``ipcd reload`` how its reload went (ipcd.daemon.reloading)."""
        try:
            reloading.publish(self.pid_file, outcome)
        except OSError as exc:
            self.log.error("daemon.reload_unreported", error=exc.strerror)

    def _count_reload(self, registry: registry_mod.Registry) -> None:
        """Give new handlers their stats columns before the new workers start."""
        full = self.p.stats.register((r.name, r.type) for r in registry.by_type.values())
        if full:
            self.log.warning("stats.columns_full", uncounted_as="-", handlers=full)
        self.stats.refresh()
        self.stats.bump(stats_mod.RELOADS)

    def _shutdown(self) -> None:
        """Let every worker finish its job, up to graceful_timeout; kill the rest."""
        graceful = self.p.config.daemon.graceful_timeout
        busy = sum(
            1 for info in self.pool.workers.values() if self.p.table.peek(info.slot).holds_job
        )
        self.log.info(
            "daemon.stopping",
            pid=os.getpid(),
            signal=self.flags.signal,
            busy_workers=busy,
            graceful_timeout_s=graceful,
        )
        deadline = time.time() + graceful
        for pid in self._all_children():
            signal_worker(pid, signal.SIGTERM, group=False)
        while (self.pool.workers or self._helpers_alive()) and time.time() < deadline:
            self._keep_alive()  # a stop by `ipcd stop` leaves the unit's watchdog running
            select.select([self._wake_r], [], [], min(0.2, max(deadline - time.time(), 0)))
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            self._reap()
            for info in self.pool.workers.values():
                if not self._table_of(info.pid).peek(info.slot).holds_job:
                    # Idle in msgrcv: a SIGTERM that landed just before the call was lost.
                    signal_worker(info.pid, signal.SIGTERM, group=False)
            for helper in self.helpers.values():
                if helper.pid:  # the intake, idle in msgrcv, may have lost one too
                    signal_worker(helper.pid, signal.SIGTERM, group=False)
        for info in list(self.pool.workers.values()):
            info.kill_reason = None
            self.log.warning("worker.killed_at_stop", pid=info.pid)
            signal_worker(info.pid, signal.SIGKILL)
        for helper in self.helpers.values():
            if helper.pid:  # the intake's slots keep what it took: the next one commits it
                self.log.warning(f"{helper.role}.killed_at_stop", pid=helper.pid)
                signal_worker(helper.pid, signal.SIGKILL)
        while self.pool.workers or self._helpers_alive():
            pid, _ = os.waitpid(-1, 0)
            for helper in self.helpers.values():
                if helper.pid == pid:
                    helper.pid = 0
            gone = self.pool.workers.pop(pid, None)
            if gone is not None:
                held = self._left(gone)
                if held is not None and held.state is not State.PARKED:
                    self.recovery.keep_for_next_start(held, "killed at stop after graceful_timeout")
                self._requeue_claimed(gone.pid, held.job_id if held is not None else None)
                self._release_slot(gone.slot)
        try:  # every worker is gone: no result takes a spare now
            self.spill_sweeper.drop_pool()
        except IpcdError as exc:
            self.log.error("spill.sweep_failed", error=str(exc))


def _wake_only(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD: the C-level handler's write to the self-pipe is all the master needs."""
