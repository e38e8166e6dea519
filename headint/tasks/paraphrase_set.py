"""A larger, templated paraphrase set for the MiniLM paraphrase task (:mod:`.paraphrase`).

``templated_triples()`` builds ``len(SUBJECTS) * len(EVENTS)`` triples (20 x 16 = 320 by
default) ``(sentence, paraphrase, unrelated)`` from two lists written for this project (not
taken from a data set):

- ``SUBJECTS``: 20 noun phrases ("The teacher", "My neighbour", ...).
- ``EVENTS``: 16 pairs of templates that say the same thing in different words
  (``"{s} bought a new car."`` / ``"{s} purchased a new automobile."``), each with a ``{s}``
  slot for the subject.

A triple is ``(event_j(subject_i), paraphrase_j(subject_i), event_k(subject_i))`` with
``k = (j + 1 + i) mod 16 != j``: the unrelated sentence has the *same subject* and a different
event (a hard negative), so the paraphrase margin ``cos(e, paraphrase) - cos(e, unrelated)``
measures the event's meaning, not the shared subject words. ``subjects`` / ``events`` /
``limit`` change the lists or take the first ``limit`` triples (ordered subject-major).
Deterministic: no randomness.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["SUBJECTS", "EVENTS", "templated_triples"]

SUBJECTS = [
    "The teacher", "My neighbour", "The doctor", "A young boy", "Our manager", "The old farmer", "Her sister",
    "The pilot", "My grandfather", "The new student", "His mother", "The chef", "A tired nurse", "The mayor",
    "Our driver", "The artist", "My cousin", "The engineer", "A quiet girl", "The coach",
]

EVENTS = [
    ("{s} bought a new car.", "{s} purchased a new automobile."),
    ("{s} is sleeping on the sofa.", "{s} is napping on the couch."),
    ("{s} fixed the broken chair.", "{s} repaired the damaged chair."),
    ("{s} arrived late to the meeting.", "{s} came to the meeting after it had started."),
    ("{s} is learning to speak Spanish.", "{s} is studying the Spanish language."),
    ("{s} forgot the keys at home.", "{s} left the keys in the house."),
    ("{s} cooked dinner for the family.", "{s} made the evening meal for the family."),
    ("{s} won the race easily.", "{s} finished first in the race without difficulty."),
    ("{s} is reading a long novel.", "{s} is going through a lengthy book."),
    ("{s} started a small business.", "{s} founded a little company."),
    ("{s} cleaned the whole kitchen.", "{s} tidied up the entire kitchen."),
    ("{s} lost a wallet on the train.", "{s} misplaced a wallet while riding the train."),
    ("{s} painted the fence white.", "{s} gave the fence a coat of white paint."),
    ("{s} called the bank this morning.", "{s} phoned the bank earlier today."),
    ("{s} planted tomatoes in the garden.", "{s} put tomato plants in the garden."),
    ("{s} is afraid of big dogs.", "{s} fears large dogs."),
]


def templated_triples(subjects: Sequence[str] = SUBJECTS, events: Sequence[tuple[str, str]] = EVENTS,
                      limit: int | None = None) -> list[tuple[str, str, str]]:
    """The templated ``(sentence, paraphrase, unrelated)`` triples (see the module docstring)."""
    if len(events) < 2:
        raise ValueError(f"templated_triples: need at least 2 events (the unrelated sentence is another event), got {len(events)}")
    for e in events:
        if not (isinstance(e, tuple) and len(e) == 2 and all("{s}" in x for x in e)):
            raise ValueError(f"templated_triples: each event must be a (sentence, paraphrase) pair of templates with a "
                             f"{{s}} slot, got {e!r}")
    E = len(events)
    out = []
    for i, s in enumerate(subjects):
        for j, (a, p) in enumerate(events):
            k = (j + 1 + i % (E - 1)) % E
            out.append((a.format(s=s), p.format(s=s), events[k][0].format(s=s)))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"templated_triples: limit must be a positive int or None, got {limit!r}")
        out = out[:limit]
    return out
