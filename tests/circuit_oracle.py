"""An independent edge-level implementation for the tests: per-receiver residual copies.

Written the way TransformerLens / Hanna et al.'s EAP-IG do it, without headint: the model is
re-run functionally from its weights, the residual stream is an explicit sum of sender outputs,
and *every receiver gets its own copy of its input* (each query, key and value input of every
head, every MLP input, the logits input) built from those outputs. Gradients with respect to
those copies give EAP; replacing senders' values in the sums of chosen receivers gives exact
edge patching. Supports GPT-2 (``GPT2LMHeadModel``), Llama-family (``LlamaForCausalLM`` and its
GQA variants: Qwen2, Mistral without a sliding window) and headint's tracr models; unpadded
inputs.

Node and edge names follow :mod:`headint.circuits.graph` (``input``, ``a{l}.h{h}``, ``m{l}``,
``a{l}.h{h}<q>``, ``a{l}.kv{g}<k>`` under GQA, ``logits``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Oracle:
    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.kind = cfg.model_type
        if self.kind == "gpt2":
            self.L, self.H, self.Hkv = cfg.n_layer, cfg.n_head, cfg.n_head
            self.d = cfg.n_embd
        else:
            self.L, self.H = cfg.num_hidden_layers, cfg.num_attention_heads
            self.Hkv = getattr(cfg, "num_key_value_heads", None) or self.H
            self.d = cfg.hidden_size
        self.grouped = self.Hkv != self.H

    # ---------------------------------------------------------------- names
    def head_name(self, l, h):
        return f"a{l}.h{h}"

    def recv_name(self, l, which, h):
        node = f"a{l}.kv{h}" if which != "q" and self.grouped else f"a{l}.h{h}"
        return f"{node}<{which}>"

    # ---------------------------------------------------------------- model pieces
    def _blocks(self):
        m = self.model
        return m.transformer.h if self.kind == "gpt2" else m.model.layers

    def embed(self, ids):
        m = self.model
        T = ids.shape[1]
        pos = torch.arange(T)[None].expand_as(ids)
        if self.kind == "gpt2":
            return m.transformer.wte(ids) + m.transformer.wpe(pos)
        if self.kind == "headint_tracr":
            return m.model.embed_tokens(ids) + m.model.embed_positions(pos)
        return m.model.embed_tokens(ids)

    def has_mlp(self, l):
        return True

    def attn_norm(self, l, x):
        b = self._blocks()[l]
        if self.kind == "gpt2":
            return b.ln_1(x)
        if self.kind == "headint_tracr":
            return x
        return b.input_layernorm(x)

    def mlp_norm(self, l, x):
        b = self._blocks()[l]
        if self.kind == "gpt2":
            return b.ln_2(x)
        if self.kind == "headint_tracr":
            return x
        return b.post_attention_layernorm(x)

    def mlp(self, l, x):
        return self._blocks()[l].mlp(x)

    def final(self, x):
        m = self.model
        if self.kind == "gpt2":
            return m.lm_head(m.transformer.ln_f(x))
        if self.kind == "headint_tracr":
            return m.lm_head(x)
        return m.lm_head(m.model.norm(x))

    def _qkv_weights(self, l):
        """Per head: (W [d, D], b [D] or None) for q heads, k and v kv heads; W_O [H, Dv, d], b_O."""
        b = self._blocks()[l]
        if self.kind == "gpt2":
            W, bias = b.attn.c_attn.weight, b.attn.c_attn.bias  # [d, 3d]
            D = self.d // self.H
            parts = {}
            for i, w in enumerate("qkv"):
                parts[w] = [(W[:, i * self.d + h * D: i * self.d + (h + 1) * D], bias[i * self.d + h * D: i * self.d + (h + 1) * D])
                            for h in range(self.H)]
            WO = b.attn.c_proj.weight.reshape(self.H, D, self.d)
            return parts, WO, b.attn.c_proj.bias, D
        a = b.self_attn
        D = a.head_dim
        parts = {}
        for w, proj, n in (("q", a.q_proj, self.H), ("k", a.k_proj, self.Hkv), ("v", a.v_proj, self.Hkv)):
            parts[w] = [(proj.weight[h * D:(h + 1) * D].t(), None if proj.bias is None else proj.bias[h * D:(h + 1) * D]) for h in range(n)]
        WO = a.o_proj.weight.t().reshape(self.H, D, self.d)
        return parts, WO, a.o_proj.bias, D

    def _rope(self, x, T):
        if self.kind in ("gpt2", "headint_tracr"):
            return x
        from transformers.models.llama.modeling_llama import rotate_half

        pos = torch.arange(T)[None]
        cos, sin = self.model.model.rotary_emb(x, pos)  # [1, T, D]
        return x * cos[0] + rotate_half(x) * sin[0]

    def _scale(self, D):
        if self.kind == "headint_tracr":
            return self.model.model.layers[0].self_attn.scaling
        return 1 / math.sqrt(D)

    def _causal(self):
        return self.kind != "headint_tracr"

    # ---------------------------------------------------------------- the run
    def run(self, ids, patch=None, source=None, grads=False):
        """Forward over ``ids`` [B, T]. ``patch``: a set of edge names (or a list, one set per row)
        whose receivers read ``source``'s sender value (a dict from a previous run's ``senders``)
        instead of this run's. Returns ``(logits, senders, receiver_inputs)`` (each ``(input, its senders)``); with ``grads`` the
        receiver inputs require grad."""
        B, T = ids.shape
        rows = [set(patch or ())] * B if patch is None or isinstance(patch, (set, frozenset)) else [set(p) for p in patch]
        senders: dict[str, torch.Tensor] = {}
        order: list[str] = []
        inputs: dict[str, torch.Tensor] = {}
        state = {"resid": 0}  # the residual stream: the sum of every sender output so far (and the biases)

        def write(name, value):
            senders[name] = value
            order.append(name)
            state["resid"] = state["resid"] + value

        def resid_for(name):
            # this receiver's own copy of the residual stream (TransformerLens' split q/k/v inputs,
            # hook_mlp_in), with each patched edge's difference added (Hanna et al.'s evaluate_graph)
            x = state["resid"].clone()
            for b in range(B):
                for u in order:
                    if f"{u}->{name}" in rows[b]:
                        x[b] = x[b] + (source[u][b] - senders[u][b])
            if grads:
                x.retain_grad()
            inputs[name] = (x, list(order))
            return x

        emb = self.embed(ids)
        write("input", emb.detach().requires_grad_(True) if grads else emb)
        mask = torch.ones(T, T, dtype=torch.bool).tril() if self._causal() else torch.ones(T, T, dtype=torch.bool)
        for l in range(self.L):
            parts, WO, bO, D = self._qkv_weights(l)

            def proj(which, h):
                x = self.attn_norm(l, resid_for(self.recv_name(l, which, h)))
                W, bias = parts[which][h]
                y = x @ W
                return y if bias is None else y + bias

            qs = [self._rope(proj("q", h), T) for h in range(self.H)]
            ks = [self._rope(proj("k", g), T) for g in range(self.Hkv)]
            vs = [proj("v", g) for g in range(self.Hkv)]
            new = {}
            for h in range(self.H):
                g = h // (self.H // self.Hkv)
                s = qs[h] @ ks[g].transpose(-1, -2) * self._scale(D)
                s = s.masked_fill(~mask, float("-inf"))
                z = s.softmax(-1) @ vs[g]
                new[self.head_name(l, h)] = z @ WO[h]
            for k, v in new.items():
                write(k, v)
            if bO is not None:
                state["resid"] = state["resid"] + bO
            if self.has_mlp(l):
                name = f"m{l}"
                write(name, self.mlp(l, self.mlp_norm(l, resid_for(name))))
        logits = self.final(resid_for("logits"))
        return logits, senders, inputs

    def eap(self, clean, corrupt, metric):
        """``{edge name: mean over examples of sum_t (a_u' - a_u) . dM/dx_v}`` and the clean logits."""
        with torch.no_grad():
            _, src, _ = self.run(corrupt)
        with torch.enable_grad():
            logits, live, inputs = self.run(clean, grads=True)
            metric(logits).sum().backward()
        out = {}
        for v, (x, ups) in inputs.items():
            for u in ups:
                diff = (src[u] - live[u]).detach()
                out[f"{u}->{v}"] = float((diff * x.grad).sum() / clean.shape[0])
        return out

    def patched_metric(self, clean, corrupt, metric, edge_sets):
        """Metric per (edge set, example): ``[K, N]``."""
        with torch.no_grad():
            _, src, _ = self.run(corrupt)
            vals = []
            for es in edge_sets:
                logits, _, _ = self.run(clean, patch=set(es), source=src)
                vals.append(metric(logits))
        return torch.stack(vals)
