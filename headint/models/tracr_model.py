"""A small ``transformers`` model for programs compiled by tracr (Lindner et al. 2023).

tracr compiles a RASP program into a transformer without layer norm: token + position
embeddings, blocks of (multi-head attention, ReLU MLP) with plain residual adds, bidirectional
attention, and an unembedding that reads the program's output space of the residual stream
(one logit per output value of a categorical program; the value itself for a numerical one).
:class:`TracrForCausalLM` is exactly that as a ``PreTrainedModel``, its attention dispatched
through ``transformers``' attention registry (so every headint method applies); it is
registered with the Auto classes under the model type ``"headint_tracr"``.

The shipped models are built by ``python -m headint.models.tracr_build`` (needs the optional
extra ``tracr``: tracr-pypi, jax, dm-haiku; nothing else imports jax).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

MODEL_TYPE = "headint_tracr"


class TracrConfig(PretrainedConfig):
    """``vocab_size`` input tokens (BOS and pad included), ``n_outputs`` logits,
    ``hidden_size`` residual width, ``num_hidden_layers`` blocks of ``num_attention_heads`` heads of
    ``head_dim``, ``intermediate_size`` MLP width, ``max_position_embeddings`` (BOS included),
    ``attention_scale`` (tracr does not divide scores by ``sqrt(head_dim)``: 1.0), and the
    program's ``input_encoding`` / ``output_encoding`` (value -> id) and ``output_kind``."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size=5, n_outputs=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, head_dim=4,
                 intermediate_size=4, max_position_embeddings=6, attention_scale=1.0, input_encoding=None,
                 output_encoding=None, output_kind="categorical", program="", **kwargs):
        self.vocab_size, self.n_outputs, self.hidden_size = vocab_size, n_outputs, hidden_size
        self.num_hidden_layers, self.num_attention_heads, self.head_dim = num_hidden_layers, num_attention_heads, head_dim
        self.num_key_value_heads = num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.attention_scale = attention_scale
        self.input_encoding, self.output_encoding = input_encoding or {}, output_encoding or {}
        self.output_kind, self.program = output_kind, program
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def _eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class TracrAttention(nn.Module):
    def __init__(self, config: TracrConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, D, d = config.num_attention_heads, config.head_dim, config.hidden_size
        self.num_heads, self.head_dim, self.num_key_value_groups = H, D, 1
        self.scaling, self.is_causal = float(config.attention_scale), False
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, H * D), nn.Linear(d, H * D), nn.Linear(d, H * D)
        self.o_proj = nn.Linear(H * D, d)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager)
        out, probs = attn(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(B, T, -1)), probs


class TracrMLP(nn.Module):
    def __init__(self, config: TracrConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc_out(torch.relu(self.fc_in(x)))


class TracrBlock(nn.Module):
    def __init__(self, config: TracrConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TracrAttention(config, layer_idx)
        self.mlp = TracrMLP(config)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        a, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = hidden_states + a
        return hidden_states + self.mlp(hidden_states)


class TracrPreTrainedModel(PreTrainedModel):
    config_class = TracrConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.zeros_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class TracrModel(TracrPreTrainedModel):
    def __init__(self, config: TracrConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TracrBlock(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        x = self.embed_tokens(input_ids) + self.embed_positions(position_ids)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask)
        for block in self.layers:
            x = block(x, attention_mask=mask)
        return x


class TracrForCausalLM(TracrPreTrainedModel):
    """:class:`TracrModel` and the unembedding (``lm_head``: residual -> ``n_outputs`` logits)."""

    def __init__(self, config: TracrConfig):
        super().__init__(config)
        self.model = TracrModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.n_outputs, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return CausalLMOutput(logits=self.lm_head(h))


AutoConfig.register(MODEL_TYPE, TracrConfig, exist_ok=True)
AutoModelForCausalLM.register(TracrConfig, TracrForCausalLM, exist_ok=True)
