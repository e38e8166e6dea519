"""Everything headint reads or guesses about a ``transformers`` model's structure, in one place.

- which ``transformers`` major version this adapter was written for (:data:`WRITTEN_FOR`; a
  different installed major warns once);
- the geometry a config declares (:func:`config_shape`), every config to switch
  (:func:`model_configs`), the sub-models whose forward starts a sequence (:func:`submodels`);
- the list of transformer blocks, the base model and the unembedding (:func:`model_parts`);
- whether the forward takes ``position_ids`` that padding would otherwise shift
  (:func:`padding_position_ids`);
- the device its inputs go to, also when its weights are offloaded (:func:`input_device`).

What a model's attention looks like (sites, per-layer shapes, whether it is supported) is not
guessed here but observed by a probe forward: :mod:`.structure`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..shape import ModelShape

WRITTEN_FOR = 5  # the transformers major version this adapter follows
_warned: set[str] = set()


class UnsupportedModelError(TypeError):
    """headint cannot intervene in this model; the message names the model and the reason (e.g. its
    attention does not go through ``transformers``' AttentionInterface)."""


def check_transformers_version() -> None:
    """Warn once if the installed ``transformers`` major version is not :data:`WRITTEN_FOR`."""
    import transformers

    installed = str(transformers.__version__)
    try:
        major = int(installed.split(".")[0])
    except ValueError:
        major = None
    if major != WRITTEN_FOR and installed not in _warned:
        _warned.add(installed)
        warnings.warn(
            f"headint's transformers adapter was written for transformers {WRITTEN_FOR}.x, but transformers "
            f"{installed} is installed; model structure guesses (layers, configs, attention registry) may not hold",
            RuntimeWarning, stacklevel=3,
        )


def input_device(model) -> torch.device:
    """The device a model's inputs go to: that of its first parameter, or, for a model whose
    parameters sit on the meta device because they are offloaded (``accelerate``'s
    ``cpu_offload`` / ``disk_offload`` / ``dispatch_model``), the execution device of the
    offload hook that runs its first module (the device its weights are loaded onto)."""
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "meta":
        return first.device if first is not None else torch.device("cpu")
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    raise UnsupportedModelError(
        f"{type(model).__name__}'s parameters are on the meta device (no values) and no offload hook (accelerate's "
        "_hf_hook.execution_device) says where they run; load the weights, or offload them with accelerate")


def text_config(config):
    """The config of the text model (``config.get_text_config()`` where it exists)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_shape(config) -> ModelShape:
    """The attention geometry a config declares, every layer alike: the text config's
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (default: the query
    head count), ``qk_head_dim`` or else ``head_dim`` (default ``hidden_size //
    num_attention_heads``) and ``v_head_dim`` (default: the query/key head dim). DeepSeek's MLA
    configs carry ``qk_head_dim`` (their ``head_dim`` is the rotary part only) and ``v_head_dim``.
    A model's exact per-layer geometry comes from :func:`headint.integration.structure.model_shape`."""
    cfg = text_config(getattr(config, "config", config))
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "qk_head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    v_head_dim = getattr(cfg, "v_head_dim", None) or head_dim
    return ModelShape(int(cfg.num_hidden_layers), int(n_heads), int(n_kv), int(head_dim), int(v_head_dim))


def model_configs(model) -> list:
    """Every distinct config object reachable from the model (its modules and sub-configs)."""
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen[id(c)] = c
        for key in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


def submodels(model) -> list[nn.Module]:
    """The ``PreTrainedModel`` modules inside ``model`` (itself included): each one's forward
    receives the inputs (ids, mask, cache position) that place its queries in the sequence."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def padding_position_ids(model, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``position_ids`` ``[B, T]`` that keep a padded batch's real tokens at the positions they
    would have alone (``mask.cumsum(-1) - 1``, clamped at 0), or None when none are needed: no
    padding, a forward without ``position_ids``, or a model that derives padding-aware positions
    itself (position embeddings with a ``padding_idx``, as in RoBERTa)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or bool(attention_mask.bool().all()):
        return None
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return None
    for name, mod in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            return None
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _is_sharded(weight) -> bool:
    """Whether ``weight`` is a DTensor (split over the ranks by tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(weight, DTensor)


@dataclass
class ModelParts:
    """``blocks``: the ``nn.ModuleList`` of transformer blocks; ``base``: the model without its
    head (returns ``last_hidden_state``); ``unembed``: the output embedding (``Linear``) or None
    (none, or sharded by tensor parallelism)."""

    model: nn.Module
    blocks: nn.ModuleList
    base: nn.Module
    unembed: nn.Module | None
    shape: ModelShape


def model_parts(model, shape: ModelShape, attention_paths: dict[int, str] | None = None) -> ModelParts:
    """The blocks, base model and unembedding of ``model`` (``shape``: its
    :class:`~headint.shape.ModelShape`).

    The blocks are the ``ModuleList`` of ``shape.n_layers`` entries that holds the default attention
    stack's layers: with ``attention_paths`` (``{layer: dotted path}`` of that stack's attention
    modules, from the probe) the list whose entry ``l`` contains layer ``l``'s attention module (an
    encoder-decoder's decoder layers, a vision-language model's language layers, not an encoder or
    a vision tower of the same depth); without, the first such list."""
    blocks = None
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and len(mod) == shape.n_layers):
            continue
        prefix = f"{name}." if name else ""
        if attention_paths is None or all(path.startswith(f"{prefix}{l}.") for l, path in attention_paths.items()):
            blocks = mod
            break
    if blocks is None:
        where = "" if attention_paths is None else f" holding its attention modules {sorted(attention_paths.values())[:2]}..."
        raise TypeError(f"{type(model).__name__}: found no ModuleList of its {shape.n_layers} transformer blocks{where}")
    base = getattr(model, "base_model", model)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is model or not isinstance(unembed, nn.Linear) or _is_sharded(unembed.weight):
        unembed = None  # a tensor-parallel unembedding is read through the model's own (gathered) logits
    return ModelParts(model, blocks, base, unembed, shape)
