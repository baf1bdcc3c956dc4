"""Futures of blockemu's worker pool.

Asynchronous operations (``node.read_async``, ``write_async``, ``flush_async``) return a
:class:`Job`: a :class:`concurrent.futures.Future`, so ``result(timeout)``,
``exception(timeout)``, ``done()``, ``cancel()`` and ``add_done_callback(fn)`` behave as the
standard library documents, and ``asyncio.wrap_future(job)`` makes it awaitable.

Callbacks added with ``add_done_callback`` run on the worker thread that completed the job (or
at once in the caller if the job is already done), as with a ThreadPoolExecutor.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Generic, TypeVar

from blockemu._core import JobHandle

T = TypeVar("T")

__all__ = ["Job"]


class Job(concurrent.futures.Future[T], Generic[T]):
    """A job on blockemu's worker pool, as a :class:`concurrent.futures.Future`."""

    def __init__(self, handle: JobHandle) -> None:
        super().__init__()
        self._handle = handle

    @property
    def state(self) -> str:
        """The job's state in the pool: queued, running, done or cancelled."""
        return self._handle.state

    def cancel(self) -> bool:
        """Cancels the job if it has not started running; returns whether it is cancelled."""
        if self.cancelled():
            return True
        if self._handle.cancel():
            # The pool settles the job as cancelled (see _settle); make sure it is.
            return super().cancel() or self.cancelled()
        return False

    def __repr__(self) -> str:
        return f"<blockemu.Job {self._handle.state}: {super().__repr__()}>"


def _settle(job: Job[Any], value: Any, error: BaseException | None) -> None:
    """Called by the worker pool when a job completes."""
    if job.done():
        return
    if isinstance(error, concurrent.futures.CancelledError):
        concurrent.futures.Future.cancel(job)
    elif error is not None:
        job.set_exception(error)
    else:
        job.set_result(value)
