"""SIGTERM stops a pack where it can continue: a checkpoint now, then out as Ctrl-C.

Floor: workers (standard library only: the training loop imports it).

SLURM warns a job before its time limit or a preemption with SIGTERM (``--signal
B:TERM@120``); a plain ``kill`` sends it too. A runner that should survive that calls
:func:`sigterm_stops` around its packs. The signal only sets a process-wide request (a signal handler may run between any two
bytecodes, so it changes nothing else). The training loop (``workers.engine.train_stage``)
asks :func:`checkpoint_due` at the end of each chunk: with a stop requested, a checkpoint
is due there whatever ``checkpoint_every`` says, and the one checkpoint writer
(``workers.checkpoint.CheckpointFile.write``) raises :class:`Preempted`, a
``KeyboardInterrupt``, once it has written it. Everything after is the Ctrl-C path the
runner already has: nothing of the pack is stored, its lease is released, the runner says
"interrupted" and exits 130. The next run of the same store continues the pack from that
checkpoint. After a stage's last chunk no checkpoint is due and the pack goes on
(evaluation, latent statistics, the write: stopping there would throw the stage's training
away); the runner stops before the next stage's first chunk ends or the next pack starts
(``sweep.local``). A second SIGTERM raises at once, as a second Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = threading.Event()


class Preempted(KeyboardInterrupt):
    """SIGTERM stopped the pack (after its checkpoint); handled wherever Ctrl-C is."""


def request_stop() -> None:
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


def clear_stop() -> None:
    _requested.clear()


def checkpoint_due(iteration: int, checkpoint_every: int) -> bool:
    """A checkpoint is due after ``iteration`` (one that is not a stage's last): every
    ``checkpoint_every`` iterations (0: never), and at once when a stop is requested."""
    return _requested.is_set() or (checkpoint_every > 0 and iteration % checkpoint_every == 0)


def _on_sigterm(signum: int, frame: object) -> None:
    if _requested.is_set():
        raise Preempted("SIGTERM again: stopping at once")
    _requested.set()


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM requests a stop while inside (module doc); the previous handler and no
    request afterwards. Outside the main thread (where signals cannot be caught) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        clear_stop()
