"""A graceful stop for ``zofo-train``: SIGINT (Ctrl-C) or SIGTERM finishes the current step,
writes a resumable checkpoint and exits with :data:`EXIT_STOPPED`; a second signal stops at
once (as KeyboardInterrupt: an optimizer step under way restores the weights it had
perturbed; the last checkpoint stays as it was).

The handlers are installed only in the main thread and only for the run's duration; a SIGINT
that was ignored when the process started (a background job, ``nohup``) stays ignored.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

# exit status of a run stopped by a signal after writing a resumable checkpoint
# (EX_TEMPFAIL: a temporary failure, the user is invited to retry, here with --resume)
EXIT_STOPPED = 75
SIGNALS = ("SIGINT", "SIGTERM")


class StopRequest:
    """The stop signal received so far (``signum``: None until one arrives)."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            _restore_defaults()
            print(f"zofo-train: second {signal.Signals(signum).name}: stopping at once",
                  file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.signum = signum
        print(f"zofo-train: {signal.Signals(signum).name} received: finishing this step, then "
              "writing a checkpoint (send it again to stop at once)", file=sys.stderr,
              flush=True)


_DEFAULTS = {"SIGINT": signal.default_int_handler, "SIGTERM": signal.SIG_DFL}


def _restore_defaults() -> None:
    for name in SIGNALS:
        sig = getattr(signal, name)
        if callable(signal.getsignal(sig)):
            signal.signal(sig, _DEFAULTS[name])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Inside: SIGINT and SIGTERM set the yielded :class:`StopRequest` instead of ending the
    process (main thread only; an ignored SIGINT stays ignored)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}
    for name in SIGNALS:
        sig = getattr(signal, name)
        old = signal.getsignal(sig)
        if old == signal.SIG_IGN and name == "SIGINT":
            continue
        previous[sig] = old
        signal.signal(sig, request.handle)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
