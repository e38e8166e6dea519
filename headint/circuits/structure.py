"""What the residual stream of a model looks like, found by running it once (the circuit probe).

Edge-level methods need more than headint's attention probe (:mod:`headint.integration.structure`):
for every transformer block they need the modules that read and write the residual stream. One
small forward pass (the attention probe's inputs, with gradients, eval mode, the model left as
it was) watches every module of every block and learns, per block ``l``:

- ``R_l``, the block's input (the residual stream; for ``l = 0`` the input embedding);
- the block's *attention sub-layer*: the direct child of the block that holds the attention
  module headint's probe found; its output ``A_l`` must be the output projection's output (the
  sum of the heads' writes ``z_h @ W_O[h]`` plus the projection's bias);
- the attention module's input ``x = norm(R_l)`` and the module computing it (``attn_norm``,
  None where the input is ``R_l`` itself); the q/k/v *projections*: ``nn.Linear`` or
  ``transformers``' ``Conv1D`` modules inside the attention module applied to ``x``;
- which output channels of the projections feed each receiver: the query input of every query
  head and the key and value inputs of every key/value head (under grouped-query attention the
  key/value heads as they are). Found from the probe's gradients (rotary embeddings and
  per-head norms mix channels within a head only); a channel feeding two receivers (e.g. a
  norm over all heads' queries) is refused;
- the MLP: the direct child of the block whose output ``M_l`` completes the residual identity
  ``block output = R_l + A_l + M_l``, the module computing its input (``mlp_norm``), and whether
  that input is read from ``R_l + A_l`` (sequential, GPT-2, Llama) or from ``R_l`` (parallel
  attention and MLP: GPT-J, GPT-NeoX with ``use_parallel_residual``); a block without an MLP
  must satisfy ``block output = R_l + A_l``.

It refuses (:class:`~headint.integration.adapter.UnsupportedModelError`, naming the model, the
block and what failed) a model whose residual stream is not a sum of those writes: norms after
a sub-layer (post-LN BERT, Gemma 2's post-attention norms), per-layer extra inputs, layers
without attention, several attention stacks (encoder-decoder models).

The result is cached per model (:func:`circuit_structure`).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..integration.adapter import UnsupportedModelError, model_parts
from ..integration.hf import intervene
from ..integration.record import Recorder
from ..integration.structure import check_supported, probe_inputs

__all__ = ["Projection", "LayerParts", "CircuitStructure", "circuit_structure"]

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
HALF_TOLERANCE = 2e-2

_CACHE: "weakref.WeakKeyDictionary[nn.Module, CircuitStructure]" = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


@dataclass
class Projection:
    """A q/k/v projection ``y = x @ matrix + bias`` of the attention input ``x`` (``matrix``
    ``[d_model, C]``; an ``nn.Linear``'s ``weight.T`` or a ``Conv1D``'s ``weight``, both views)."""

    module: nn.Module
    path: str

    @property
    def matrix(self) -> torch.Tensor:
        w = self.module.weight
        return w.t() if isinstance(self.module, nn.Linear) else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias


@dataclass
class LayerParts:
    """The residual-stream parts of block ``layer`` (see the module docstring).

    ``receivers[which][h]``: ``(projection index, channel indices)`` of the q (query heads) or
    k/v (key/value heads) input of head ``h``. ``out_matrix`` ``[H, Dv, d_model]``: each head's
    write matrix (``A = sum_h z_h @ out_matrix[h] + bias``).
    """

    layer: int
    block: nn.Module
    attn_child: nn.Module
    attn: nn.Module
    attn_norm: nn.Module | None
    projections: list[Projection]
    receivers: dict[str, list[tuple[int, torch.Tensor]]]
    out_proj: nn.Module
    mlp: nn.Module | None = None
    mlp_norm: nn.Module | None = None
    parallel: bool = False

    @property
    def out_matrix(self) -> torch.Tensor:
        w = self.out_proj.weight
        m = w.t() if isinstance(self.out_proj, nn.Linear) else w  # [H * Dv, d]
        H = len(self.receivers["q"])
        return m.reshape(H, m.shape[0] // H, m.shape[1])


@dataclass
class CircuitStructure:
    """The probe's findings: one :class:`LayerParts` per block, the head counts, ``d_model``."""

    model_type: str
    layers: list[LayerParts] = field(default_factory=list)
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    d_model: int = 0
    blocks: nn.ModuleList | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def has_mlp(self) -> list[bool]:
        return [p.mlp is not None for p in self.layers]

    @property
    def parallel(self) -> list[bool]:
        return [p.parallel for p in self.layers]


class _GraphRecorder(Recorder):
    """A recorder that keeps the autograd graph of what it records (the probe differentiates q/k/v)."""

    def add(self, layer, what, x, concat_dim):
        if what in self.what:
            self.tensors[(what, layer)] = x


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if hasattr(x, "to_tuple"):
        return _first_tensor(x.to_tuple())
    return None


def _hidden_arg(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for k in ("hidden_states", "x", "input", "inputs"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return kwargs[k]
    return None


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) if a.numel() else 0.0


def _fail(model, layer: int | None, why: str) -> UnsupportedModelError:
    where = f" (block {layer})" if layer is not None else ""
    return UnsupportedModelError(f"headint.circuits cannot build the edge graph of {type(model).__name__}{where}: {why}")


class _Watch:
    """Forward hooks on every module of the blocks: each call's first input and first output."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.owner = threading.get_ident()  # another thread's forward meanwhile is not watched
        self.calls: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
        self.handles = []
        for m in modules.values():
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs, out):
        if threading.get_ident() != self.owner:
            return
        self.calls.setdefault(id(module), []).append((_hidden_arg(args, kwargs), _first_tensor(out)))

    def remove(self):
        for h in self.handles:
            h.remove()


def _probe(model) -> CircuitStructure:
    st = check_supported(model)
    shape = st.shape
    if len(shape.stacks) != 1:
        raise _fail(model, None, f"it has several attention stacks ({sorted(shape.stacks)}); edge graphs cover one residual stream")
    if shape.attention_layers != list(range(shape.n_layers)):
        raise _fail(model, None, f"layers {sorted(set(range(shape.n_layers)) - set(shape.attention_layers))} have no attention")
    parts = model_parts(model, shape)
    blocks = parts.blocks
    names = {id(m): n for n, m in model.named_modules()}
    out = CircuitStructure(type(model).__name__, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                           head_dim=shape.head_dim, v_head_dim=shape.v_head_dim, blocks=blocks)
    sites = {s.layer: (mid, s) for mid, s in st.sites.items()}
    modules = dict(model.named_modules())
    attn_of = {}
    for l in range(shape.n_layers):
        mid, site = sites[l]
        attn = modules[site.path]
        block_path = names[id(blocks[l])]
        if not site.path.startswith(block_path + "."):
            raise _fail(model, l, f"its attention module {site.path} is not inside the block {block_path}")
        child_name = site.path[len(block_path) + 1:].split(".")[0]
        if site.out_proj is None:
            raise _fail(model, l, "the probe found no output projection receiving the head outputs")
        attn_of[l] = (attn, getattr(blocks[l], child_name), modules[site.out_proj])

    block_io: dict[int, list] = {}
    handles = []

    owner = threading.get_ident()

    def block_pre(l):
        def hook(module, args, kwargs):
            if threading.get_ident() != owner:
                return None
            x = _hidden_arg(args, kwargs)
            if l == 0 and x is not None and not x.requires_grad:
                x = x.detach().requires_grad_(True)
                block_io[l] = [x, None]
                if args and isinstance(args[0], torch.Tensor):
                    return (x, *args[1:]), kwargs
                kwargs = dict(kwargs, hidden_states=x)
                return args, kwargs
            block_io[l] = [x, None]
            return None
        return hook

    def block_post(l):
        def hook(module, args, output):
            if threading.get_ident() == owner:
                block_io[l][1] = _first_tensor(output)
        return hook

    watched = {}
    for l, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(block_pre(l), with_kwargs=True))
        handles.append(b.register_forward_hook(block_post(l)))
        for n, m in b.named_modules():
            if m is not b:
                watched[f"{l}.{n}"] = m
    attn_inputs: dict[int, torch.Tensor] = {}

    def attn_pre(l):
        def hook(module, args, kwargs):
            if threading.get_ident() == owner:
                attn_inputs[l] = _hidden_arg(args, kwargs)
        return hook

    for l, (attn, _, _) in attn_of.items():
        handles.append(attn.register_forward_pre_hook(attn_pre(l), with_kwargs=True))
    watch = _Watch(watched)
    rec = _GraphRecorder(("q", "k", "v"))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad(), intervene(model, [], recorder=rec):
            model(**probe_inputs(model))
    finally:
        watch.remove()
        for h in handles:
            h.remove()
        for m, t in flags:
            m.training = t
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, HALF_TOLERANCE)
    for l in range(shape.n_layers):
        out.layers.append(_analyse_layer(model, l, blocks[l], attn_of[l], block_io.get(l), attn_inputs.get(l), watch, rec, names, tol, shape))
    out.d_model = int(block_io[0][0].shape[-1])
    return out


def _call(watch: _Watch, module) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    calls = watch.calls.get(id(module))
    return calls[0] if calls and len(calls) == 1 else None


def _analyse_layer(model, l, block, attn_parts, io, x_attn, watch, rec, names, tol, shape) -> LayerParts:
    attn, attn_child, out_proj = attn_parts
    if io is None or io[0] is None or io[1] is None:
        raise _fail(model, l, "the block did not run on a hidden-states tensor in the probe forward")
    R, Y = io
    child_call = _call(watch, attn_child)
    proj_call = _call(watch, out_proj)
    if child_call is None or proj_call is None:
        raise _fail(model, l, "its attention sub-layer or output projection ran more than once (or never) in one forward")
    A = child_call[1]
    if A is None or A.shape != R.shape or _diff(A, proj_call[1]) > tol:
        raise _fail(model, l, f"the output of its attention sub-layer {names.get(id(attn_child))} is not the output of the "
                    f"projection {names.get(id(out_proj))} that receives the head outputs (something acts between them)")
    if x_attn is None:
        raise _fail(model, l, "its attention module was not called with a hidden-states tensor")
    # the q/k/v projections: Linear / Conv1D modules inside the attention module applied to x_attn
    from transformers.pytorch_utils import Conv1D

    projections: list[Projection] = []
    outputs: list[torch.Tensor] = []
    for n, m in attn.named_modules():
        if m is out_proj or not isinstance(m, (nn.Linear, Conv1D)):
            continue
        c = watch.calls.get(id(m))
        if not c:
            continue
        if len(c) != 1:
            raise _fail(model, l, f"projection {names.get(id(m))} ran {len(c)} times in one forward")
        x_in, y = c[0]
        if x_in is x_attn or (x_in is not None and x_in.shape == x_attn.shape and torch.equal(x_in, x_attn)):
            projections.append(Projection(m, names.get(id(m), n)))
            outputs.append(y)
    if not projections:
        raise _fail(model, l, "no nn.Linear / Conv1D inside its attention module projects the attention input to q/k/v")
    # which projection channels feed each receiver
    H, Hkv = shape.layer(l).n_heads, shape.layer(l).n_kv_heads
    receivers: dict[str, list[tuple[int, torch.Tensor]]] = {}
    owner: dict[tuple[int, int], str] = {}
    g = torch.Generator().manual_seed(l)
    for which, n_heads in (("q", H), ("k", Hkv), ("v", Hkv)):
        t = rec.tensors.get((which, l))
        if t is None or not t.requires_grad:
            raise _fail(model, l, f"its attention {which} does not depend on the attention input differentiably")
        found = []
        for h in range(n_heads):
            sel = t[:, h]
            cot = torch.randn(sel.shape, generator=g, dtype=torch.float64).to(sel.dtype)
            grads = torch.autograd.grad(sel, outputs, grad_outputs=cot, retain_graph=True, allow_unused=True)
            hits = [(i, (gr.abs().flatten(0, -2).sum(0) > 0).nonzero().flatten()) for i, gr in enumerate(grads) if gr is not None]
            hits = [(i, ch) for i, ch in hits if len(ch)]
            if len(hits) != 1:
                raise _fail(model, l, f"the {which} input of head {h} is read from {len(hits)} projections (expected exactly one)")
            i, ch = hits[0]
            for c in ch.tolist():
                other = owner.get((i, c))
                if other is not None:
                    raise _fail(model, l, f"channel {c} of {projections[i].path} feeds both {other} and the {which} of head {h} "
                                "(e.g. a norm over several heads' queries), so the heads' inputs cannot be separated")
                owner[(i, c)] = f"the {which} of head {h}"
            found.append((i, ch))
        receivers[which] = found
    # x_attn must reach q/k/v only through these projections (and they must be linear in it)
    cots = [torch.randn(rec.tensors[(w, l)].shape, generator=g, dtype=torch.float64).to(x_attn.dtype) for w in "qkv"]
    total = torch.autograd.grad([rec.tensors[(w, l)] for w in "qkv"], x_attn, grad_outputs=cots, retain_graph=True, allow_unused=True)[0]
    gys = torch.autograd.grad([rec.tensors[(w, l)] for w in "qkv"], outputs, grad_outputs=cots, retain_graph=True, allow_unused=True)
    rebuilt = torch.zeros_like(x_attn)
    for p, gy in zip(projections, gys):
        if gy is not None:
            rebuilt = rebuilt + gy @ p.matrix.detach().t()
    if total is None or _diff(rebuilt, total) > tol * 10:
        raise _fail(model, l, "its attention's q/k/v depend on the attention input other than through the q/k/v projections")
    attn_norm = _producer(watch, block, attn_child, x_attn, R, tol)
    if attn_norm is False:
        raise _fail(model, l, f"no module of the block computes the attention input from the block input alone "
                    f"(expected a norm of the residual stream before attention)")
    # the MLP completes the residual identity
    mlp = mlp_norm = None
    parallel = False
    norms = {id(attn_norm)} if attn_norm is not None else set()
    for n, child in block.named_children():  # an MLP whose output is ~0 (e.g. zero weights) is still a node
        if child is attn_child or id(child) in norms:
            continue
        c = _call(watch, child)
        if c is None or c[1] is None or c[1].shape != R.shape or c[0] is None or c[0].shape != R.shape:
            continue
        if c[1] is c[0] or not any(True for _ in child.parameters()):  # dropout, identity: not an MLP
            continue
        if _diff(R + A + c[1], Y) <= tol and _producer(watch, block, child, c[0], None, tol, exclude=attn_child) is not False:
            mlp = child
            break
    if mlp is not None or _diff(R + A, Y) > tol:
        if mlp is None:
            raise _fail(model, l, "its output is not its input plus the outputs of its attention and MLP sub-layers "
                        "(a norm after a sub-layer, as in post-LN BERT or Gemma 2, or another input to the residual stream)")
        x_m = _call(watch, mlp)[0]
        seq_in = R + A
        mlp_norm = _producer(watch, block, mlp, x_m, None, tol, exclude=attn_child)
        if mlp_norm is None:
            src = x_m
        elif mlp_norm is False:
            raise _fail(model, l, "no module of the block computes the MLP input from the residual stream")
        else:
            src = _call(watch, mlp_norm)[0]
        if src is R or (_diff(src, seq_in) > tol and _diff(src, R) <= tol):
            parallel = True
        elif _diff(src, seq_in) > tol:
            raise _fail(model, l, "the MLP input is computed from neither the block input nor the block input plus the attention output")
        if mlp_norm is not None and _diff(mlp_norm(src.detach()), x_m) > tol:
            raise _fail(model, l, f"{names.get(id(mlp_norm))} does not reproduce the MLP input from the residual stream")
    return LayerParts(l, block, attn_child, attn, attn_norm, projections, receivers, out_proj, mlp, mlp_norm, parallel)


def _producer(watch: _Watch, block, skip, x, source, tol, exclude=None):
    """The module of ``block`` (outside ``skip`` and ``exclude``) whose output is ``x``; None
    when ``x`` is ``source`` itself (no module between them); False when none is found (or its
    input is not ``source``, when ``source`` is given)."""
    if source is not None and (x is source or _diff(x, source) == 0.0):
        return None
    inside = {id(m) for m in skip.modules()}
    if exclude is not None:
        inside |= {id(m) for m in exclude.modules()}
    for n, m in block.named_modules():
        if m is block or id(m) in inside:
            continue
        c = _call(watch, m)
        if c is None or c[1] is None or c[0] is None:
            continue
        if c[1] is x or (c[1].shape == x.shape and torch.equal(c[1], x)):
            if source is not None and _diff(c[0], source) > tol:
                continue
            with torch.no_grad():
                again = m(c[0].detach())
            if _diff(_first_tensor(again), x) > tol:
                continue
            return m
    if source is None and x is not None:
        return None
    return False


def circuit_structure(model) -> CircuitStructure:
    """The circuit probe's findings for ``model`` (probed once, cached while the model lives);
    raises :class:`~headint.integration.adapter.UnsupportedModelError` naming why not."""
    with _LOCK:
        st = _CACHE.get(model)
        if st is None:
            st = _CACHE[model] = _probe(model)
        return st
