"""Running test code in several threads at once."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import headint


def in_threads(*targets: Callable[[], None], timeout: float = 600) -> None:
    """Run each target in its own thread and wait for all; the first error any raised is raised here."""
    errors: list = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # reported in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@contextlib.contextmanager
def block_held_elsewhere(model, interventions, backend: str = "reference", on_enter: Callable | None = None,
                         timeout: float = 60) -> Iterator[dict]:
    """Inside: another thread holds ``headint.intervene(model, interventions)`` open (the model's
    config is switched meanwhile); the yielded dict gets ``"inside"``: ``on_enter(model)`` run by
    that thread inside its block."""
    entered, release = threading.Event(), threading.Event()
    held: dict = {}

    def holder():
        with headint.intervene(model, interventions, backend=backend):
            if on_enter is not None:
                held["inside"] = on_enter(model)
            entered.set()
            release.wait(timeout)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert entered.wait(timeout), "the other thread did not enter its block"
        yield held
    finally:
        release.set()
        t.join(timeout)
