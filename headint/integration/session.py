"""Session state: which intervention block applies to which forward, and the config switch.

Rules (see README "Threads and nested blocks"):

- A :class:`Session` (one ``intervene`` block) belongs to the thread that opened it. Each thread
  keeps its own stack of open sessions; an attention call uses the calling thread's innermost
  session that contains the calling module. Another thread's interventions never apply; a
  thread with no session on a model that another thread has switched gets plain (unintervened)
  attention.
- The switch of a model's configs to headint's attention is reference-counted per model: the
  first open session saves every config's attention implementation and switches it, the last
  session to close restores them exactly, whatever order sessions close in and whichever
  thread closes them.
- A session is opened at most once.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch

from . import checkpointing
from .adapter import UnsupportedModelError, model_configs, submodels
from .positions import cache_kv_offsets

ATTN_NAME = "headint"
_IMPL = "_attn_implementation_internal"

_LOCK = threading.RLock()
_SWITCHES: dict[int, "_Switch"] = {}  # id(model) -> the switch while any session on it is open
_LOCAL = threading.local()  # .stack: this thread's open sessions, innermost last


def _stack() -> list["Session"]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


class Session:
    """One ``intervene`` block: the plan, backend and recorder that apply to ``model``'s forwards
    in the thread that opened it. ``q_start`` is where the current forward's first query sits.

    ``structure`` (a :class:`~headint.integration.structure.ModelStructure`, or None) tells each
    attention module's site ``(stack, layer)``; without it no call has a site (the probe's own
    session). ``observer``, if set, is called as ``observer(module, query, key, value, out,
    kwargs)`` after every attention call (``out`` ``[B, Tq, H, Dv]``).
    """

    def __init__(self, model, plan, backend: str, recorder=None, structure=None):
        self.model = model
        self.plan = plan
        self.backend = backend
        self.recorder = recorder
        self.module_ids = {id(m) for m in model.modules()}
        self.structure = structure
        self.observer = None
        self.q_start: int | None = None
        self.kv_offsets: dict[int, tuple[int, int]] = {}  # this forward's static KV-cache layers: (first key position, slots)
        self.self_q_start: int | None = None  # the last self-attention call's q_start (cross-attention's queries)
        self.masked_columns: dict = {}  # per forward: whether a mask hides a static cache's empty slots
        self.calls = 0  # attention calls handled for this session
        self._forward_starts: list[int] = []
        self._stack: list | None = None
        self.state = "new"

    def position_state(self) -> tuple:
        """Where the current forward sits (see :mod:`.positions`), to resume it later."""
        return (self.q_start, dict(self.kv_offsets), self.self_q_start)

    def set_position_state(self, state: tuple) -> None:
        self.q_start, kv_offsets, self.self_q_start = state
        self.kv_offsets = dict(kv_offsets)
        self.masked_columns = {}

    def site_of(self, module) -> tuple[str, int] | None:
        """``(stack, layer)`` of an attention module, or None (no interventions or recording apply)."""
        return None if self.structure is None else self.structure.site_of(module)


class _Switch:
    """A model switched to headint's attention: saved configs, hooks, and how many sessions hold it."""

    def __init__(self, model):
        self.model = model
        self.count = 0
        self.module_ids = {id(m) for m in model.modules()}
        self.saved = [(c, c.__dict__.get(_IMPL, None), _IMPL in c.__dict__) for c in model_configs(model)]
        self.handles: list = []
        self.checkpointing: list = []
        try:
            self.checkpointing = checkpointing.wrap(model, current_session, resumed)
            for c, _, _ in self.saved:
                setattr(c, _IMPL, ATTN_NAME)
            self.handles.append(model.register_forward_pre_hook(self._before_forward))
            self.handles.append(model.register_forward_hook(self._after_forward))
            for m in submodels(model):
                self.handles.append(m.register_forward_pre_hook(_set_q_start, with_kwargs=True))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        checkpointing.unwrap(self.checkpointing)
        self.checkpointing = []
        for c, value, had in self.saved:
            if had:
                setattr(c, _IMPL, value)
            else:
                c.__dict__.pop(_IMPL, None)

    # A forward of the model that makes no call to the registered attention function bypasses it.
    def _before_forward(self, _module, _args) -> None:
        s = current_session(self.model)
        if s is not None:
            s._forward_starts.append(s.calls)
        if self.model.training:  # checkpointing turned on inside the block (it only acts in train mode)
            with _LOCK:
                self.checkpointing += checkpointing.wrap(self.model, current_session, resumed)

    def _after_forward(self, _module, _args, _output) -> None:
        s = current_session(self.model)
        if s is not None and s._forward_starts and s._forward_starts.pop() == s.calls:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ran a forward pass without calling the registered attention function; "
                "it bypasses transformers' AttentionInterface, so headint cannot intervene in it"
            )


def _set_q_start(module, args, kwargs) -> None:  # marked below: a session hook
    """Forward pre-hook: where this forward's queries sit in the whole sequence.

    Read from ``cache_position``, else the 2D attention mask (which covers past and new
    tokens in ``generate``), else the KV cache's length; a sliding-window cache may hold
    fewer keys than that, so the attention call alone cannot tell. Also where each KV-cache
    layer's keys start (see :mod:`.positions`).
    """
    session = current_session(module)
    if session is None:
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    emb = kwargs.get("inputs_embeds")
    n_new = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else (emb.shape[1] if isinstance(emb, torch.Tensor) else None)
    cp = kwargs.get("cache_position")
    mask = kwargs.get("attention_mask")
    past = kwargs.get("past_key_values")
    past = kwargs.get("cache") if past is None else past
    session.kv_offsets = cache_kv_offsets(past)
    session.self_q_start = None
    session.masked_columns = {}
    if isinstance(cp, torch.Tensor) and cp.numel():
        session.q_start = int(cp.reshape(-1)[0])
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and n_new is not None:
        session.q_start = mask.shape[1] - n_new
    elif past is not None and hasattr(past, "get_seq_length"):
        session.q_start = int(past.get_seq_length())
    else:
        session.q_start = None


# Hooks headint's sessions register carry this mark (a Replica made meanwhile leaves them out).
_Switch._before_forward._headint_hook = True
_Switch._after_forward._headint_hook = True
_set_q_start._headint_hook = True


def model_attn_implementation(config) -> tuple[bool, Any] | None:
    """``(had, value)``: ``config``'s own ``_attn_implementation_internal`` (whether its
    ``__dict__`` had one, and which) as saved by an open session's switch, or None when no
    session has switched it (the config holds its own)."""
    with _LOCK:
        for sw in _SWITCHES.values():
            for c, value, had in sw.saved:
                if c is config:
                    return had, value
    return None


def current_session(module) -> Session | None:
    """The calling thread's innermost open session whose model contains ``module``."""
    key = id(module)
    for s in reversed(_stack()):
        if key in s.module_ids:
            return s
    return None


def switched_by_any_session(module) -> bool:
    """Whether some open session (in any thread) has switched a model containing ``module``."""
    key = id(module)
    with _LOCK:
        return any(key in sw.module_ids for sw in _SWITCHES.values())


def open_session(session: Session) -> None:
    """Switch the model (first session on it) and push ``session`` on this thread's stack."""
    if session.state != "new":
        raise RuntimeError(
            "this headint.intervene(...) block was already entered once; a block cannot be re-entered: "
            "call headint.intervene(model, ...) again for a new block"
        )
    session.state = "open"
    _acquire(session.model)
    session._stack = _stack()
    session._stack.append(session)


def close_session(session: Session) -> None:
    """Remove ``session`` (wherever it is in its thread's stack); the last session on the model
    restores its configs and removes the hooks."""
    if session.state != "open":
        return
    session.state = "closed"
    if session._stack is not None and session in session._stack:
        session._stack.remove(session)
    _release(session.model)


def _acquire(model) -> None:
    """Switch ``model`` to headint's attention (the first holder) and count one more holder."""
    with _LOCK:
        key = id(model)
        switch = _SWITCHES.get(key)
        if switch is None:
            switch = _SWITCHES[key] = _Switch(model)
        switch.count += 1


def _release(model) -> None:
    """One holder fewer; the last one restores the model."""
    with _LOCK:
        key = id(model)
        switch = _SWITCHES.get(key)
        if switch is not None:
            switch.count -= 1
            if switch.count == 0:
                del _SWITCHES[key]
                switch.restore()


@contextlib.contextmanager
def resumed(session: Session, state: tuple) -> Iterator[None]:
    """Within the block, ``session`` applies again in the calling thread with the forward
    positions ``state`` (:meth:`Session.position_state`) and no recorder or observer: a
    checkpointed layer recomputed during ``backward`` (see :mod:`.checkpointing`), also after
    the ``intervene`` block has exited (the model is switched again meanwhile)."""
    saved = (session.position_state(), session.recorder, session.observer)
    stack = _stack()
    _acquire(session.model)
    stack.append(session)
    session.recorder = session.observer = None
    session.set_position_state(state)
    try:
        yield
    finally:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is session:
                del stack[i]
                break
        session.set_position_state(saved[0])
        session.recorder, session.observer = saved[1], saved[2]
        _release(session.model)


def open_sessions() -> list[Any]:
    """The models currently switched, with how many sessions hold each (for tests and debugging)."""
    with _LOCK:
        return [(sw.model, sw.count) for sw in _SWITCHES.values()]
