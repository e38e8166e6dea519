"""Module hooks on the residual stream of one forward pass: read sender outputs, catch the
gradients at every receiver's input, replace sender outputs, and edit receivers' inputs.

:class:`Taps` is a context manager around one (or more) forward passes of the model. Hooks act
only on the thread that opened it (another thread's forward on the same model sees the plain
model) and are removed on exit, also on error.

What it can do, per forward (see :mod:`headint.circuits.structure` for the parts):

- ``capture``: keep every sender's output: ``embed`` ``[B, T, d]`` (block 0's input), ``z[l]``
  ``[B, T, H, Dv]`` (the input of layer ``l``'s output projection; head ``h`` writes
  ``z[l][..., h, :] @ W_O[h]``), ``mlp[l]`` ``[B, T, d]``;
- ``grads``: a callable ``grads(layer, receivers, G)`` handed, *during* the backward, the
  gradient ``G`` ``[r, B, T, d]`` of the output with respect to each receiver's own copy of its
  input (the pre-norm residual stream) as soon as it is complete, a few receivers at a time
  (:data:`RECEIVER_CHUNK`), without building those copies: the gradient at a projection's output
  channels of one receiver is mapped back through those channels of the projection and then
  through the norm's vector-Jacobian product at the residual stream. Nothing of it is kept: no
  receiver's gradient outlives its call, so the backward holds what a plain backward holds plus
  one chunk of receivers (the consumer scores the chunk at once);
- ``diff_from``: capture ``diff_from[key] - value`` instead of the value (the entry of
  ``diff_from`` is dropped as it is used: the corrupt run's values become the differences
  without the clean values being kept);
- ``replace``: ``{"embed": tensor, ("z", l): tensor, ("mlp", l): tensor}``: sender outputs
  replaced (the interpolation of integrated gradients);
- ``patch``: an :class:`EdgePatch`: receivers' inputs edited per row (exact edge patching).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .graph import EdgeGraph
from .structure import CircuitStructure, LayerParts, _hidden_arg as _hidden


def _swap_hidden(args, kwargs, x):
    if args and isinstance(args[0], torch.Tensor):
        return (x, *args[1:]), kwargs
    for k in ("hidden_states", "x", "input", "inputs"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return args, dict(kwargs, **{k: x})
    raise RuntimeError("headint.circuits: the module was called without a hidden-states tensor")


def _with_first(out, x):
    if isinstance(out, torch.Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    raise RuntimeError(f"headint.circuits: cannot replace the output of type {type(out).__name__}")


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise RuntimeError(f"headint.circuits: unexpected module output of type {type(out).__name__}")


def _as_slice(ch: torch.Tensor):
    """A slice for contiguous channel indices (views, no copies), else the index tensor."""
    first, n = int(ch[0]), len(ch)
    if n and int(ch[-1]) == first + n - 1 and bool((ch[1:] - ch[:-1] == 1).all() if n > 1 else True):
        return slice(first, first + n)
    return ch


RECEIVER_CHUNK = 8  # receivers whose input gradients are built and handed on at once (bounds the temporaries)

GradSink = Callable[[int, list, torch.Tensor], None]


class NormVJP:
    """Vector-Jacobian products of ``norm`` at one residual stream ``[B, T, d]`` (``norm`` None:
    the identity): the norm is run once with a graph, then :meth:`__call__` maps one cotangent
    ``[B, T, d]`` back to the residual (temporaries of one ``[B, T, d]`` at a time, whatever the
    number of receivers)."""

    def __init__(self, norm, residual: torch.Tensor):
        self.norm = norm
        if norm is None:
            return
        with torch.enable_grad():
            self.x = residual.detach().requires_grad_(True)
            y = norm(self.x)
            self.y = y[0] if isinstance(y, tuple) else y

    def __call__(self, cotangent: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return cotangent
        return torch.autograd.grad(self.y, self.x, cotangent.to(self.y.dtype), retain_graph=True)[0]


@dataclass
class EdgePatch:
    """Per-row receiver-input edits of one forward: row ``b`` carries the source value
    ``source`` of every sender ``u`` into every receiver ``v`` with ``mask[b, u, v]`` (bool
    ``[B, S, R]``), in place of ``u``'s value in this forward: ``input_v = live residual +
    sum_u mask[b, u, v] * (source_u - live_u)``. ``source``: ``{"embed": [B, T, d], ("z", l):
    [B, T, H, Dv], ("mlp", l): [B, T, d]}`` (rows aligned with the batch)."""

    mask: torch.Tensor
    source: dict
    patched: torch.Tensor = field(init=False)  # [R] bool: receivers patched in some row

    def __post_init__(self):
        self.patched = self.mask.any(dim=(0, 1))


class StopForward(Exception):
    """Raised after the last block by a :class:`Taps` with ``stop=True`` (the logits are not needed)."""


class Taps:
    """Hooks on the residual stream (see the module docstring). ``stop=True``: end the forward
    (:class:`StopForward`, caught on exit) after the last block, for runs that only capture."""

    def __init__(self, model, st: CircuitStructure, graph: EdgeGraph, *, capture: bool = False, grads: GradSink | None = None,
                 want=None, diff_from: dict | None = None, replace: dict | None = None, patch: EdgePatch | None = None,
                 stop: bool = False):
        self.model, self.st, self.graph = model, st, graph
        self.capture = capture or diff_from is not None
        self.grads, self.diff_from = grads, diff_from
        self.replace, self.patch, self.stop = dict(replace or {}), patch, stop
        self.values: dict[Any, torch.Tensor] = {}  # sender outputs of the last forward (detached), or diff_from - them
        self.live: dict[Any, torch.Tensor] = {}  # sender outputs as computed in this forward (patches only)
        self.resid: dict[Any, torch.Tensor] = {}  # ("attn", l) / ("mlp", l): residual read by the receivers
        self._handles: list = []
        self._owner = None
        self._recv = {(r.kind, r.layer, r.head): i for i, r in enumerate(graph.receivers)}
        self._send = {(s.kind, s.layer, s.head): i for i, s in enumerate(graph.senders)}
        # receivers whose gradients are handed to ``grads`` (default: those with an edge in scope)
        wanted = set(int(r) for r in (graph.mask.any(0).nonzero()[:, 0] if want is None else want))
        self._wanted = wanted
        self._pending: dict[int, int] = {}  # layer -> projections whose gradient has not arrived yet
        self._by_proj: dict[tuple[int, int], list[tuple[int, Any]]] = {}
        for lp in st.layers:
            for which in ("q", "k", "v"):
                for h, (pi, ch) in enumerate(lp.receivers[which]):
                    r = self._recv.get((which, lp.layer, h))
                    if r is not None and r in wanted:
                        self._by_proj.setdefault((lp.layer, pi), []).append((r, _as_slice(ch)))

    # ------------------------------------------------------------------ install / remove
    def __enter__(self):
        self._owner = threading.get_ident()
        st = self.st
        add = self._handles.append
        for lp in st.layers:
            add(lp.block.register_forward_pre_hook(self._guard(self._block_pre, lp), with_kwargs=True))
            for i, p in enumerate(lp.projections):
                add(p.module.register_forward_hook(self._guard(self._proj_post, lp, i)))
            add(lp.out_proj.register_forward_pre_hook(self._guard(self._out_pre, lp), with_kwargs=True))
            if lp.mlp is not None:
                if lp.mlp_norm is not None:
                    add(lp.mlp_norm.register_forward_pre_hook(self._guard(self._mlp_norm_pre, lp), with_kwargs=True))
                add(lp.mlp.register_forward_pre_hook(self._guard(self._mlp_pre, lp), with_kwargs=True))
                add(lp.mlp.register_forward_hook(self._guard(self._mlp_post, lp)))
        add(st.layers[-1].block.register_forward_hook(self._guard(self._last_post, st.layers[-1])))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc_type is StopForward

    def _guard(self, fn, *bound):
        def hook(*args):
            if threading.get_ident() != self._owner:
                return None
            return fn(*bound, *args)
        return hook

    # ------------------------------------------------------------------ hooks
    def _keep(self, key, x):
        if self.patch is not None:
            self.live[key] = x
        if self.diff_from is not None:
            self.values[key] = self.diff_from.pop(key).to(x.dtype) - x.detach()
        elif self.capture:
            self.values[key] = x.detach()

    def _block_pre(self, lp: LayerParts, module, args, kwargs):
        x = _hidden(args, kwargs)
        changed = False
        if lp.layer == 0:
            if "embed" in self.replace:
                x = self.replace["embed"].to(x.dtype)
                changed = True
            if self.grads is not None and not x.requires_grad:  # frozen weights: the graph starts at the embedding
                x = x.detach().requires_grad_(True)
                changed = True
            self._keep("embed", x)
        if self.patch is not None or self.grads is not None:
            self.resid[("attn", lp.layer)] = x
            if lp.parallel:
                self.resid[("mlp", lp.layer)] = x
        return _swap_hidden(args, kwargs, x) if changed else None

    def _proj_post(self, lp: LayerParts, i: int, module, args, out):
        y = out
        if self.patch is not None:
            y = self._patch_projection(lp, i, y)
        if self.grads is not None and (lp.layer, i) in self._by_proj:
            if not y.requires_grad:
                raise RuntimeError("headint.circuits: the q/k/v projections got no gradient (run the forward with grad enabled)")
            y = y.view_as(y)
            self._pending[lp.layer] = self._pending.get(lp.layer, 0) + 1
            y.register_hook(self._on_grad(self._projection_grad, lp, i))
        return y if y is not out else None

    def _out_pre(self, lp: LayerParts, module, args, kwargs):
        z = _hidden(args, kwargs)
        key = ("z", lp.layer)
        changed = False
        if key in self.replace:
            z = self.replace[key].reshape(z.shape).to(z.dtype)
            changed = True
        B, T = z.shape[:2]
        self._keep(key, z.reshape(B, T, self.st.n_heads, -1))
        return _swap_hidden(args, kwargs, z) if changed else None

    def _mlp_norm_pre(self, lp: LayerParts, module, args, kwargs):
        if not lp.parallel and (self.patch is not None or self.grads is not None):
            self.resid[("mlp", lp.layer)] = _hidden(args, kwargs)

    def _mlp_pre(self, lp: LayerParts, module, args, kwargs):
        x = _hidden(args, kwargs)
        if lp.mlp_norm is None and not lp.parallel and (self.patch is not None or self.grads is not None):
            self.resid[("mlp", lp.layer)] = x
        new = x
        if self.patch is not None:
            r = self._recv.get(("mlp", lp.layer, -1))
            if r is not None and bool(self.patch.patched[r]):
                delta, rows = self._delta([r], lp.layer)
                res = self.resid[("mlp", lp.layer)]
                edited = res + delta[0]
                edited = edited if lp.mlp_norm is None else _first(lp.mlp_norm(edited))
                new = torch.where(rows[0][:, None, None], edited.to(x.dtype), x)
        r = self._recv.get(("mlp", lp.layer, -1))
        if self.grads is not None and r in self._wanted:
            new = new.view_as(new)
            new.register_hook(self._on_grad(self._mlp_grad, lp, r))
        return _swap_hidden(args, kwargs, new) if new is not x else None

    def _mlp_post(self, lp: LayerParts, module, args, out):
        m = _first(out)
        key = ("mlp", lp.layer)
        changed = False
        if key in self.replace:
            m = self.replace[key].to(m.dtype)
            changed = True
        self._keep(key, m)
        return _with_first(out, m) if changed else None

    def _last_post(self, lp: LayerParts, module, args, out):
        if self.stop:
            raise StopForward()
        h = _first(out)
        new = h
        if self.patch is not None:
            r = len(self.graph.receivers) - 1
            if bool(self.patch.patched[r]):
                delta, rows = self._delta([r], self.st.n_layers)
                new = torch.where(rows[0][:, None, None], h + delta[0].to(h.dtype), h)
        r = len(self.graph.receivers) - 1
        if self.grads is not None and r in self._wanted:
            new = new.view_as(new)
            new.register_hook(self._on_grad(self._logits_grad, r))
        return _with_first(out, new) if new is not h else None

    # ------------------------------------------------------------------ patching
    def _delta(self, recv: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([len(recv), B, T, d], [len(recv), B] rows patched)``: the per-row input edit of
        receivers ``recv`` (all of one layer, or the logits) from the senders that feed them."""
        p = self.patch
        M = p.mask[:, :, recv].to(self.resid_device)  # [B, S, r]
        st = self.st
        embed = self.live["embed"]
        B, T, d = embed.shape
        delta = torch.zeros(len(recv), B, T, d, dtype=embed.dtype, device=embed.device)
        s_in = self._send[("input", -1, -1)]
        w = M[:, s_in, :].to(embed.dtype)  # [B, r]
        if bool(w.any()):
            delta += w.t()[:, :, None, None] * (p.source["embed"] - embed)[None]
        for l in range(min(layer + 1, st.n_layers)):  # the mask holds real edges only
            lp = st.layers[l]
            heads = [self._send[("head", l, h)] for h in range(st.n_heads)]
            wh = M[:, heads, :].to(embed.dtype)  # [B, H, r]
            if bool(wh.any()):
                dz = p.source[("z", l)].to(embed.dtype) - self.live[("z", l)]  # [B, T, H, Dv]
                writes = torch.einsum("bthe,hed->bhtd", dz, lp.out_matrix.to(embed.dtype))  # each head's change [B, H, T, d]
                delta += torch.einsum("bhr,bhtd->rbtd", wh, writes)
            sm = self._send.get(("mlp", l, -1))
            if sm is not None:
                wm = M[:, sm, :].to(embed.dtype)  # [B, r]
                if bool(wm.any()):
                    delta += wm.t()[:, :, None, None] * (p.source[("mlp", l)] - self.live[("mlp", l)])[None]
        rows = M.any(dim=1).t()  # [r, B]
        return delta, rows

    @property
    def resid_device(self):
        return self.live["embed"].device

    def _patch_projection(self, lp: LayerParts, i: int, y: torch.Tensor) -> torch.Tensor:
        todo = []
        for which in ("q", "k", "v"):
            for h, (pi, ch) in enumerate(lp.receivers[which]):
                if pi != i:
                    continue
                r = self._recv.get((which, lp.layer, h))
                if r is not None and bool(self.patch.patched[r]):
                    todo.append((r, ch))
        if not todo:
            return y
        delta, rows = self._delta([r for r, _ in todo], lp.layer)
        res = self.resid[("attn", lp.layer)]
        proj = lp.projections[i]
        y = y.clone()
        for j, (r, ch) in enumerate(todo):
            x = res + delta[j]
            x = x if lp.attn_norm is None else _first(lp.attn_norm(x))
            ch = _as_slice(ch.to(y.device))
            part = x.to(y.dtype) @ proj.matrix[:, ch]
            if proj.bias is not None:
                part = part + proj.bias[ch]
            y[..., ch] = torch.where(rows[j][:, None, None], part, y[..., ch])
        return y

    # ------------------------------------------------------------------ gradients (during the backward)
    def _on_grad(self, fn, *bound):
        def hook(g):
            with torch.no_grad():
                fn(*bound, g.detach())
        return hook

    def _projection_grad(self, lp: LayerParts, i: int, gy: torch.Tensor) -> None:
        """Projection ``i`` of ``lp``'s gradient is complete: hand on its receivers' input gradients."""
        recv = self._by_proj[(lp.layer, i)]
        W = lp.projections[i].matrix.detach()
        vjp = NormVJP(lp.attn_norm, self.resid[("attn", lp.layer)])
        for c in range(0, len(recv), RECEIVER_CHUNK):
            chunk = recv[c:c + RECEIVER_CHUNK]
            G = None
            for j, (r, ch) in enumerate(chunk):
                g = vjp(gy[..., ch] @ W[:, ch].t().to(gy.dtype))
                if G is None:
                    G = g.new_empty(len(chunk), *g.shape)
                G[j] = g
                del g
            self.grads(lp.layer, [r for r, _ in chunk], G)
            del G
        del vjp
        self._pending[lp.layer] -= 1
        if self._pending[lp.layer] == 0:
            self.resid.pop(("attn", lp.layer), None)

    def _mlp_grad(self, lp: LayerParts, r: int, g: torch.Tensor) -> None:
        res = self.resid.pop(("mlp", lp.layer))
        self.grads(lp.layer, [r], NormVJP(lp.mlp_norm, res)(g)[None])

    def _logits_grad(self, r: int, g: torch.Tensor) -> None:
        self.grads(self.st.n_layers, [r], g[None])
