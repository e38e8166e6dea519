"""A private replica of a model's module tree: how scans (and the probe) run a model without
anyone else seeing it.

A scan needs more than interventions: it replays cached block outputs instead of running
blocks, runs the final block for the last query only, replays an attention module's q/k/v
projections, captures blocks' outputs with hooks, puts the model in eval mode and switches its
attention implementation. Done to the user's model, each of these is seen by every other thread
using it (wrong outputs there) and can be left behind (a corrupted model). So scans do them to a
:class:`Replica` instead:

- every module of the model gets a new module object of the same class, with its own
  ``__dict__``: its own submodule, parameter, buffer and hook dicts (and every other dict, list
  and set attribute, copied one level deep), its own ``training`` flag (eval unless asked);
- the replica's modules hold the model's **parameter and buffer tensors themselves** (the same
  objects, never written: no copy of the weights; a parameter that requires grad is held as a
  parameter without ``requires_grad`` over the same storage, so nothing run in the replica reaches the model's
  ``.grad`` or needs its ``requires_grad`` flags changed) and its other attributes (functions,
  numbers);
- references between modules (submodules, bound methods and ``functools.partial`` forwards as
  ``accelerate`` installs them, modules kept as plain attributes) point into the replica;
- configs are private copies, holding the model's own attention implementation (the one saved by
  an ``intervene`` block another thread may have open), so switching the replica to headint's
  attention (:meth:`Replica.session`) switches nothing of the model's; a copy of a config whose
  masks are built in full (:mod:`.masks`) is marked so too;
- hooks on the model when the replica is made run in the replica too (they ran in scans before),
  except headint's own session hooks (marked ``_headint_hook``).

The model itself is only read: its module tree, parameters, buffers, flags, configs and hooks
are the same during a replica's use (as any other thread sees them) and after, also when that
use raises. A replica belongs to the thread that uses it; it is cheap (no tensor is copied) and
is simply dropped when done.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from dataclasses import replace
from typing import Any, Iterator

from torch import nn

from . import masks
from .adapter import ModelParts, model_parts
from .attention_function import register
from .session import Session, close_session, model_attn_implementation, open_session

MARK = "_headint_replica"  # in each replica module's __dict__


def is_replica_module(module: Any) -> bool:
    """Whether ``module`` belongs to a :class:`Replica` (never a user's model)."""
    return isinstance(module, nn.Module) and bool(module.__dict__.get(MARK))


def require_replica(module: nn.Module, what: str) -> None:
    """Refuse to change ``module`` unless it belongs to a :class:`Replica`."""
    if not is_replica_module(module):
        raise RuntimeError(f"{what}: headint changes only a private Replica of a model (headint.integration.replica), "
                           f"never the model itself; got {type(module).__name__} of a user's model")


class Replica:
    """Private module objects standing for every module of ``model`` (see the module docstring).

    ``root``: the replica of ``model``; ``structure``: ``structure`` (the model's
    :class:`~headint.integration.structure.ModelStructure`, or None) with its sites keyed by the
    replica's attention modules; ``training``: the replica's modules' training flag;
    ``foreign``: the paths of modules with submodules carrying an instance-level ``forward`` that
    is code of its own (neither a bound method nor a ``functools.partial`` of a module, which are
    rebound to the replica): it may run the model's own submodules, so the replica cannot vouch
    for it (a leaf's, e.g. the wrappers ``transformers``' tensor parallelism puts on projections,
    computes from its inputs and the model's own tensors, as the replica's would).
    """

    def __init__(self, model: nn.Module, structure=None, *, training: bool = False):
        self.model = model
        self._clones: dict[int, nn.Module] = {}  # id(model's module) -> its replica
        self._origins: dict[int, nn.Module] = {}  # id(replica module) -> the model's
        self._configs: dict[int, Any] = {}  # id(model's config) -> private copy
        named = list(model.named_modules())
        originals = [m for _, m in named]
        for m in originals:
            c = object.__new__(type(m))
            self._clones[id(m)] = c
            self._origins[id(c)] = m
        # modules with submodules whose instance-level forward is code of its own (not a method or
        # partial of a module, which are rebound): it may run the model's submodules instead of the
        # replica's. A leaf's (transformers' tensor parallelism wraps projections so) computes its
        # output from its inputs and the model's own tensors, as the replica's would.
        self.foreign: list[str] = []
        for name, m in named:
            c = self._clones[id(m)]
            own = {k: self._own(v) for k, v in m.__dict__.items()}
            fw = own.get("forward")
            if fw is not None and fw is m.__dict__["forward"] and any(x is not None for x in m._modules.values()):
                self.foreign.append(name or "(the model)")
            own["training"] = training
            own[MARK] = True
            if own.get("_compiled_call_impl") is not None:  # torch.compile'd: bound to the model's module; run eagerly
                own["_compiled_call_impl"] = None
            params = own.get("_parameters")
            if isinstance(params, dict):  # the same tensors, without a way back to the model's gradients
                for k, p in params.items():
                    if type(p) is nn.Parameter and p.requires_grad:
                        # still a Parameter (accelerate's offload hooks rebuild a parameter through its class)
                        params[k] = nn.Parameter(p.detach(), requires_grad=False)
            c.__dict__.update(own)
        self.root: nn.Module = self._clones[id(model)]
        self.structure = None
        if structure is not None:
            self.structure = replace(structure, sites={id(self._clones[mid]): s for mid, s in structure.sites.items() if mid in self._clones})

    # -- making the replica ------------------------------------------------------------------------

    def _own(self, v: Any) -> Any:
        """``v`` as a replica module's attribute: containers copied (one level), references into
        the model mapped to the replica, configs to private copies."""
        if isinstance(v, dict):
            out = v.copy()  # same type (OrderedDict hook dicts stay ordered)
            for k in list(out):
                x = out[k]
                if getattr(x, "_headint_hook", False):  # another session's hooks are not this replica's
                    del out[k]
                else:
                    out[k] = self._item(x)
            return out
        if isinstance(v, list):
            return [self._item(x) for x in v]
        if isinstance(v, set):
            return {self._item(x) for x in v}
        return self._item(v)

    def _item(self, x: Any) -> Any:
        if isinstance(x, nn.Module):
            return self._clones.get(id(x), x)
        if isinstance(x, types.MethodType) and id(x.__self__) in self._clones:
            return types.MethodType(x.__func__, self._clones[id(x.__self__)])
        if isinstance(x, functools.partial) and x.args and id(x.args[0]) in self._clones:
            p = functools.partial(x.func, self._clones[id(x.args[0])], *x.args[1:], **x.keywords)
            return functools.update_wrapper(p, x.__wrapped__) if hasattr(x, "__wrapped__") else p
        if _is_config(x):
            return self._config(x)
        return x

    def _config(self, cfg):
        own = self._configs.get(id(cfg))
        if own is None:
            own = self._configs[id(cfg)] = copy.copy(cfg)
            if masks.is_marked(cfg):  # the probe found the model needs its masks built in full
                masks.mark([own])
            impl = model_attn_implementation(cfg)  # the model's own, even while another thread's block switched it
            if impl is not None:
                had, value = impl
                if had:
                    own.__dict__["_attn_implementation_internal"] = value
                else:
                    own.__dict__.pop("_attn_implementation_internal", None)
            for k, v in list(own.__dict__.items()):
                if _is_config(v):
                    own.__dict__[k] = self._config(v)
        return own

    # -- using it -----------------------------------------------------------------------------------

    def replica_of(self, module: nn.Module) -> nn.Module:
        """The replica of one of the model's modules."""
        return self._clones[id(module)]

    def original_of(self, module: nn.Module) -> nn.Module:
        """The model's module a replica module stands for."""
        return self._origins[id(module)]

    def original_id(self, module_id: int) -> int | None:
        m = self._origins.get(module_id)
        return None if m is None else id(m)

    @functools.cached_property
    def parts(self) -> ModelParts:
        """The replica's blocks, base model and unembedding (needs the model's structure)."""
        if self.structure is None:
            raise ValueError("Replica.parts needs the model's structure (Replica(model, structure))")
        paths = {s.layer: s.path for s in self.structure.sites.values() if s.stack == self.structure.shape.default_stack}
        return model_parts(self.root, self.structure.shape, paths)

    @contextlib.contextmanager
    def session(self, plan=None, backend: str = "auto", recorder=None) -> Iterator[Session]:
        """Inside: the replica runs headint's attention with ``plan`` (a :class:`~headint.plan.Plan`
        or None) and ``recorder``, in the calling thread (as ``intervene`` on the model would,
        with the model untouched)."""
        register()
        session = Session(self.root, plan, backend, recorder, self.structure)
        open_session(session)
        try:
            yield session
        finally:
            close_session(session)


_CONFIG_TYPE: list = []


def _is_config(x: Any) -> bool:
    if not _CONFIG_TYPE:
        from transformers import PretrainedConfig

        _CONFIG_TYPE.append(PretrainedConfig)
    return isinstance(x, _CONFIG_TYPE[0])
