"""Background ROSA updates: one worker thread per session, and on CUDA one side stream.

``session.update(..., non_blocking=True)`` hands its job to the session's
:class:`BackgroundRunner` and returns an :class:`UpdateHandle`. The next use of the head
waits for it (the session's hook calls :meth:`BackgroundRunner.wait`), so an update is never
half-visible, and an update that failed raises its error there, once.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch


class UpdateHandle:
    """A background update in flight.

    ``wait()`` returns the job's result (a :class:`~rosa_ext.core.op.RosaStep`) or raises its
    error. The session waits automatically before its next forward, update, reset or save.
    """

    def __init__(self, future: Future, event: Optional["torch.cuda.Event"], runner: "BackgroundRunner") -> None:
        self._future = future
        self._event = event
        self._runner = runner

    def done(self) -> bool:
        """True when the host part finished (the GPU may still be working)."""
        return self._future.done()

    def wait(self) -> Any:
        """Block until the update is applied; orders the current CUDA stream after it."""
        if self._runner.pending is self:  # its error (if any) surfaces here, once
            self._runner.pending = None
        result = self._future.result()
        if self._event is not None:
            torch.cuda.current_stream(self._event.device).wait_event(self._event)
        return result


class BackgroundRunner:
    """Runs jobs one at a time on a worker thread; on CUDA inside one side stream per runner.

    Args:
        device: the device the jobs compute on (the model's lm_head device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: Optional[UpdateHandle] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._worker: Optional[threading.Thread] = None
        self._stream: Optional["torch.cuda.Stream"] = None

    def submit(self, job: Callable[[], Any], borrowed: Sequence[torch.Tensor] = ()) -> UpdateHandle:
        """Start ``job`` in the background and return its handle (also kept as ``pending``).

        ``borrowed``: the caller's CUDA tensors the job reads; they are recorded on the side
        stream so that the caching allocator does not reuse their memory while the job runs.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosa-update")
        cuda = self.device.type == "cuda"
        event = None
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            for t in borrowed:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(self._stream)
            event = torch.cuda.Event()
        side = self._stream

        def work() -> Any:
            self._worker = threading.current_thread()
            if not cuda:
                return job()
            with torch.cuda.stream(side):
                result = job()
                event.record(side)
            return result

        handle = UpdateHandle(self._executor.submit(work), event, self)
        self.pending = handle
        return handle

    def in_worker(self) -> bool:
        """True on the worker thread (the job's own forward must not wait for itself)."""
        return threading.current_thread() is self._worker

    def wait(self) -> Any:
        """Wait for the pending job, if any; returns its result (raises its error)."""
        pending = self.pending
        if pending is None or self.in_worker():
            return None
        self.pending = None
        return pending.wait()

    def shutdown(self) -> None:
        """Stop the worker thread (after the pending job)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
