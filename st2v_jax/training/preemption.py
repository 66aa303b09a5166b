"""Stop requests (SIGTERM from a preempted VM, Ctrl-C) turned into a flag the training loop
checks between steps, so the last finished step is always the one that gets saved."""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGTERM and the first Ctrl-C set the flag; a second Ctrl-C interrupts at once.
    Must be entered from the main thread (Python's rule for signal handlers)."""
    request = StopRequest()
    previous = {}

    def handle(signum: int, frame: Any) -> None:
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.reason = signal.Signals(signum).name
        print(f"\n{request.reason}: saving a checkpoint after the current step (Ctrl-C again to abort)", flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
