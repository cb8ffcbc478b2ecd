"""The doorbell: how idle workers learn that the job store has work for them.

Workers take their jobs from the job store themselves (ipcd.store claims them, in the
store's order, atomically), one after another while there are any.  A worker that finds
none sleeps in ``msgrcv`` on the daemon's private hand-off queue (mode 0600: no client can
ring it), and whoever makes a job runnable rings: the intake after committing a batch,
the master when a delayed job falls due, the control process after ``resume`` or
``retry``.  A ring is a one-byte message; it says only "look again".  At most one ring
per worker waits on the queue, so a burst of jobs costs a few messages, not one each;
a ring nobody needs wakes a worker that finds nothing and sleeps again.

Why this cannot lose a job: a worker sleeps only after a claim found nothing, and every
job is committed before its ring is sent, so either the worker's claim saw the job or
the ring came after it and the worker wakes to claim it (or another worker, still busy,
claims it when it finishes its job).
"""

from __future__ import annotations

from ipcd.errors import NotRunningError
from ipcd.kernel.queues import Queue

#: The ring's message type and text (any would do: workers take any type).
RING_TYPE = 1
RING = b"!"


class Doorbell:
    """Rings the hand-off queue for up to ``workers`` sleeping workers."""

    def __init__(self, queue: Queue, workers: int) -> None:
        self.queue = queue
        self.workers = workers

    def ring(self, jobs: int = 1) -> None:
        """Wake enough workers for ``jobs`` new jobs (no more than there are workers).
        Never blocks; a queue removed meanwhile is made anew by the master, whose
        workers then look at the store at once."""
        try:
            wanted = min(jobs, self.workers) - self.queue.depth()
            for _ in range(wanted):
                if not self.queue.send_nowait(RING, RING_TYPE):
                    return
        except NotRunningError:
            return
