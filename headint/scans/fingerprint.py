"""What identifies a scan, for its checkpoint: a digest of everything that determines its values.

A checkpoint resumes only the scan that wrote it, so :func:`fingerprint` hashes every input
of the computation, by content:

- the model: every parameter's and buffer's bytes (dtype, shape and values; not a summary such
  as a sum, which weights permuted between heads share), its config (``rope_theta``,
  ``scale_attn_weights``, ...), the code of its module classes that are not part of
  ``torch``/``transformers`` (remote-code models), the forward hooks on its modules and any
  per-instance ``forward`` replacement;
- the metric: its class and code, and its state (the target/contrast tensors of a
  :class:`~headint.metrics.LogitDiff`, the wrapped function of a
  :class:`~headint.metrics.CallableMetric`); a function is hashed by its bytecode and constants
  (not its name: two lambdas, or two functions both named ``metric``, differ), its defaults,
  its closure and the globals it reads, recursively;
- the inputs (every tensor of the clean and corrupt batches, ``mean_inputs``) and the scan's
  settings;
- the versions of Python, torch, numpy and transformers.

Tensors are hashed as raw bytes (sha256, several tensors at once on a thread pool: hashlib
releases the GIL), computed only when a scan is given ``checkpoint=``.

What cannot be hashed reliably is refused with :class:`FingerprintError`, naming it: an object
whose behaviour lives in C state (a tokenizer, a random generator, a lock), a parameter on the
meta device whose offloaded values cannot be found. The scan's ``checkpoint_key=`` (any
non-empty string) then stands in for those parts: the digest covers everything hashable plus
the key, and the user promises that the key changes whenever what could not be hashed does.
A parameter offloaded by ``accelerate`` (on the meta device, its values in the offload hook's
``weights_map``) is hashed from those values.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from .checkpoint import CheckpointError

__all__ = ["fingerprint", "FingerprintError", "tensor_digest"]

_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: not a static C type
_IMMUTABLETYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: a C type (a class statement makes mutable types)
# What C code puts in a type's dict (methods, slots, attributes backed by C state)
_C_DESCRIPTORS = (types.MethodDescriptorType, types.WrapperDescriptorType, types.GetSetDescriptorType,
                  types.MemberDescriptorType, types.ClassMethodDescriptorType, types.BuiltinFunctionType)
# Packages whose code is identified by their version (mixed into every digest) rather than hashed.
_VERSIONED = {"torch", "numpy", "transformers"}
_SKIP_CLASS_ATTRS = {"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__",
                     "__orig_bases__", "__parameters__", "__firstlineno__", "__static_attributes__", "_abc_impl"}


class FingerprintError(CheckpointError):
    """``checkpoint=`` was given, but something that determines the scan's values cannot be hashed;
    the message names it and how to proceed (``checkpoint_key=``)."""


def _trusted_module(name: str | None) -> bool:
    """Code of this module is identified by a version in the digest (stdlib, torch, numpy, transformers)."""
    if not name:
        return False
    top = name.split(".")[0]
    return top in _VERSIONED or top in sys.stdlib_module_names or top == "builtins"


def _python_defined(k: type) -> bool:
    """Whether class ``k`` comes from a ``class`` statement, so that an instance's behaviour is the
    class's code plus the instance's ``__dict__`` / ``__slots__`` (not C state: a lock, a random
    generator, a Rust tokenizer). C types, also heap types made by extension modules, are told
    apart by their flags and by the C descriptors (methods, attributes) in their dict."""
    if k is object:
        return True
    if not k.__flags__ & _HEAPTYPE or k.__flags__ & _IMMUTABLETYPE:
        return False
    slots = vars(k).get("__slots__", ())
    slots = (slots,) if isinstance(slots, str) else tuple(slots)
    for name, v in vars(k).items():
        if isinstance(v, _C_DESCRIPTORS) and name not in ("__dict__", "__weakref__") and not (
                isinstance(v, types.MemberDescriptorType) and name in slots):
            return False
    return True


def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes (the values as stored, row-major)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    x = t.detach()
    if x.numel():
        x = x.reshape(-1)
        if x.device.type != "cpu":
            x = x.cpu()
        x = x.contiguous()
        if x.dtype.is_complex:
            x = torch.view_as_real(x).reshape(-1)
        h.update(memoryview(x.view(torch.uint8).numpy()))
    return h.digest()


class _Encoder:
    """Feeds a canonical, type-tagged encoding of Python values into a sha256.

    ``opaque`` collects the paths of values that cannot be hashed; ``model_modules`` maps the
    model's submodules (by id) to their names, so a reference to one (e.g. from an
    ``accelerate`` forward wrapper) is encoded by name instead of by its contents again."""

    def __init__(self, model_modules: dict[int, str] | None = None):
        self.h = hashlib.sha256()
        self.opaque: list[str] = []
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps memoised objects alive, so their ids stay unique
        self.model_modules = model_modules or {}

    def put(self, tag: str, payload: bytes = b"") -> None:
        self.h.update(tag.encode() + b":" + len(payload).to_bytes(8, "little") + payload)

    def _memo(self, x: Any) -> bool:
        """True (and a back-reference written) if ``x`` was encoded already."""
        i = self.memo.get(id(x))
        if i is not None:
            self.put("ref", str(i).encode())
            return True
        self.memo[id(x)] = len(self.memo)
        self.keep.append(x)
        return False

    def value(self, x: Any, path: str) -> None:  # noqa: C901 - one dispatch over the kinds of value
        t = type(x)
        if x is None or t in (bool, int, complex):
            self.put(t.__name__, repr(x).encode())
            return
        if t is float:
            self.put("float", x.hex().encode())  # exact, and NaN, inf and -0.0 distinct
            return
        if t is str:
            self.put("str", x.encode("utf-8", "surrogatepass"))
            return
        if t is bytes:
            self.put("bytes", x)
            return
        if isinstance(x, torch.Tensor):
            if self._memo(x):
                return
            self.tensor(x, path)
            return
        if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            self.put("torch", str(x).encode())
            return
        if t.__module__ == "numpy" or t.__module__.startswith("numpy."):
            self._numpy(x, path)
            return
        if isinstance(x, enum.Enum):
            self.cls(t, path)
            self.put("enum", x.name.encode())
            return
        if isinstance(x, types.ModuleType):
            self.put("module", x.__name__.encode())
            return
        if isinstance(x, types.CodeType):
            self.code(x, path)
            return
        if isinstance(x, type):
            self.cls(x, path)
            return
        if id(x) in self.model_modules:
            self.put("model-module", self.model_modules[id(x)].encode())
            return
        if t in (list, tuple) or isinstance(x, torch.Size):
            self.put(t.__name__, str(len(x)).encode())
            for i, v in enumerate(x):
                self.value(v, f"{path}[{i}]")
            return
        if t in (dict, types.MappingProxyType) or (isinstance(x, dict) and t.__module__ == "collections"):
            self._mapping(x, path)
            return
        if t in (set, frozenset):
            self._set(x, path)
            return
        if isinstance(x, functools.partial):
            if self._memo(x):
                return
            self.put("partial")
            self.value(x.func, f"{path}.func")
            self.value(x.args, f"{path}.args")
            self.value(x.keywords, f"{path}.keywords")
            return
        if isinstance(x, types.MethodType):
            self.put("method")
            self.value(x.__func__, f"{path}.__func__")
            self.value(x.__self__, f"{path}.__self__")
            return
        if isinstance(x, (staticmethod, classmethod)):
            self.put(t.__name__)
            self.value(x.__func__, path)
            return
        if isinstance(x, property):
            self.put("property")
            for part in ("fget", "fset", "fdel"):
                self.value(getattr(x, part), f"{path}.{part}")
            return
        if isinstance(x, types.FunctionType):
            if self._memo(x):
                return
            self.function(x, path)
            return
        if isinstance(x, (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                          types.MethodDescriptorType, types.MethodWrapperType, types.ClassMethodDescriptorType)):
            owner = getattr(x, "__self__", None)
            if owner is not None and not isinstance(owner, (type, types.ModuleType)):
                self.put("bound-builtin", getattr(x, "__name__", "?").encode())
                self.value(owner, f"{path}.__self__")
                return
            name = f"{getattr(x, '__module__', None) or getattr(owner, '__name__', '?')}.{getattr(x, '__qualname__', getattr(x, '__name__', '?'))}"
            self.put("builtin", name.encode())
            return
        self.obj(x, path)

    # -- kinds --------------------------------------------------------------------------------------------------

    def tensor(self, x: torch.Tensor, path: str) -> None:
        if x.device.type == "meta":
            self.opaque.append(f"{path} (a tensor on the meta device: its values are not in memory)")
            self.put("opaque-tensor", f"{x.dtype}|{tuple(x.shape)}".encode())
            return
        if x.layout != torch.strided:
            self.opaque.append(f"{path} (a {x.layout} tensor)")
            self.put("opaque-tensor")
            return
        if hasattr(x, "full_tensor"):  # a DTensor: the whole tensor, gathered (every rank hashes the same)
            x = x.full_tensor()
        self.put("tensor", tensor_digest(x))
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            self._state(x, path)

    def _numpy(self, x: Any, path: str) -> None:
        import numpy as np

        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                self.opaque.append(f"{path} (a numpy array of Python objects)")
                self.put("opaque")
                return
            self.put("ndarray", f"{x.dtype.str}|{x.shape}".encode())
            self.put("bytes", np.ascontiguousarray(x).tobytes())
        elif isinstance(x, np.generic):
            self.put("npscalar", f"{x.dtype.str}|".encode() + np.asarray(x).tobytes())
        elif isinstance(x, np.dtype):
            self.put("npdtype", x.str.encode())
        else:
            self.obj(x, path)

    def _mapping(self, x, path: str) -> None:
        items = sorted(x.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        self.put("dict", str(len(items)).encode())
        for k, v in items:
            self.value(k, f"{path} key")
            self.value(v, f"{path}[{k!r}]")

    def _set(self, x, path: str) -> None:
        parts = []
        for v in x:
            sub = _Encoder(self.model_modules)
            sub.value(v, path)
            self.opaque += sub.opaque
            parts.append(sub.h.digest())
        self.put("set", b"".join(sorted(parts)))

    def code(self, c: types.CodeType, path: str) -> None:
        """Bytecode, constants (nested code recursively), names and argument layout; not line numbers."""
        self.put("code", c.co_code)
        self.put("names", "|".join(c.co_names).encode())
        self.put("vars", "|".join(c.co_varnames + ("/",) + c.co_freevars + ("/",) + c.co_cellvars).encode())
        self.put("args", f"{c.co_argcount},{c.co_posonlyargcount},{c.co_kwonlyargcount},{c.co_flags}".encode())
        self.put("consts", str(len(c.co_consts)).encode())
        for i, k in enumerate(c.co_consts):
            self.value(k, f"{path} constant {i}")

    def function(self, f: types.FunctionType, path: str) -> None:
        name = f"{f.__module__}.{f.__qualname__}"
        self.put("function", name.encode())
        if _trusted_module(f.__module__):
            return
        self.code(f.__code__, f"{path} ({f.__qualname__})")
        self.value(f.__defaults__, f"{path}.__defaults__")
        self.value(f.__kwdefaults__, f"{path}.__kwdefaults__")
        for name_, cell in zip(f.__code__.co_freevars, f.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
                self.put("empty-cell", name_.encode())
                continue
            self.value(content, f"{path}'s closure variable {name_!r}")
        g = f.__globals__
        for name_ in sorted(_global_names(f.__code__)):
            if name_ in g:
                self.put("global", name_.encode())
                self.value(g[name_], f"global {name_!r} read by {f.__qualname__}")

    def cls(self, c: type, path: str) -> None:
        if self._memo(c):
            return
        self.put("class", f"{c.__module__}.{c.__qualname__}".encode())
        if _trusted_module(c.__module__) or not _python_defined(c):
            return
        for base in c.__bases__:
            self.cls(base, f"{path} base {base.__qualname__}")
        for name, v in sorted(vars(c).items()):
            if name in _SKIP_CLASS_ATTRS:
                continue
            self.put("attr", name.encode())
            self.value(v, f"{c.__qualname__}.{name}")

    def obj(self, x: Any, path: str) -> None:
        """An instance of a class defined in Python: its class (code) and its state."""
        if self._memo(x):
            return
        t = type(x)
        if not all(_python_defined(k) for k in t.__mro__):
            self.opaque.append(f"{path} (a {t.__module__}.{t.__qualname__}, whose state is not visible to Python)")
            self.put("opaque", f"{t.__module__}.{t.__qualname__}".encode())
            return
        self.cls(t, path)
        self._state(x, path)

    def _state(self, x: Any, path: str) -> None:
        state = dict(getattr(x, "__dict__", {}))
        for k in type(x).__mro__:
            for slot in getattr(k, "__slots__", ()):
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(x, slot):
                    state[f"slot {slot}"] = getattr(x, slot)
        self._mapping(state, path)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for k in code.co_consts:
        if isinstance(k, types.CodeType):
            names |= _global_names(k)
    return names


def _offloaded(model, name: str, kind: str) -> torch.Tensor | None:
    """The values of a meta-device parameter/buffer ``name`` kept by an ``accelerate`` offload hook
    (``module._hf_hook.weights_map``), or None."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", ())) or [hook]
    for hk in hooks:
        wm = getattr(hk, "weights_map", None)
        if wm is None:
            continue
        try:
            value = wm[attr]
        except Exception:  # noqa: BLE001 - any failure to read it: not found
            continue
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return value
    return None


def _model_tensors(model, opaque: list[str]) -> list[tuple[str, torch.Tensor | None]]:
    """``(kind name, tensor or None)`` for every parameter and buffer (None: cannot be read)."""
    out = []
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.device.type == "meta":
                real = _offloaded(model, name, kind)
                if real is None:
                    opaque.append(f"{kind} {name} (on the meta device, e.g. offloaded, and no offload hook "
                                  f"holding its values was found)")
                    out.append((f"{kind} {name} (opaque)", None))
                    continue
                if tuple(real.shape) != tuple(t.shape):
                    opaque.append(f"{kind} {name} (its offloaded values have shape {list(real.shape)}, the model's "
                                  f"{list(t.shape)})")
                    out.append((f"{kind} {name} (opaque)", None))
                    continue
                t = real
            out.append((f"{kind} {name}", t))
    return out


def _hash_model(enc: _Encoder, model) -> None:
    opaque: list[str] = []
    tensors = _model_tensors(model, opaque)
    enc.opaque += opaque
    dense = [t for _, t in tensors if t is not None and t.layout == torch.strided and not hasattr(t, "full_tensor")]
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        digests = dict(zip(map(id, dense), pool.map(tensor_digest, dense)))
    for name, t in tensors:
        enc.put("model-tensor", name.encode())
        if t is None:
            continue
        if id(t) in digests:
            enc.put("tensor", digests[id(t)])
        else:
            enc.tensor(t, name)
    config = getattr(model, "config", None)
    if config is not None:
        enc.put("config")
        enc.value(config.to_dict() if hasattr(config, "to_dict") else vars(config), "the model's config")
    for name, module in model.named_modules():
        where = f"module {name or '(the model)'}"
        enc.put("module", name.encode())
        enc.cls(type(module), f"{where}'s class")
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(module, attr, None)
            if hooks:
                enc.put(attr)
                enc.value(list(hooks.values()), f"{where}'s {attr}")
        own_forward = vars(module).get("forward")
        if own_forward is not None:
            enc.put("instance-forward")
            enc.value(own_forward, f"{where}'s replaced forward")


def _versions() -> str:
    import numpy
    import transformers

    return f"python {sys.version_info[:2]}, torch {torch.__version__}, numpy {numpy.__version__}, transformers {transformers.__version__}"


def fingerprint(model, metric, batches: Sequence[dict | None], settings: dict, *, extra: dict | None = None,
                key: str | None = None) -> str:
    """A hex digest of everything that determines a scan's values (see the module docstring).

    Args:
        model: the model scanned.
        metric: the scan's :class:`~headint.metrics.Metric` (class, code and state are hashed).
        batches: the input batches (dicts of tensors; None entries are skipped).
        settings: the scan's settings (JSON-like; tensors in it are hashed by content).
        extra: further inputs by name (e.g. ``{"mean_inputs": ...}``).
        key: the user's ``checkpoint_key``: mixed into the digest, and standing in for what cannot
            be hashed. Without it, anything that cannot be hashed raises :class:`FingerprintError`.
    """
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise TypeError(f"checkpoint_key must be a non-empty string or None, got {key!r}")
    modules = {id(m): (n or "(the model)") for n, m in model.named_modules()}
    enc = _Encoder(modules)
    enc.put("format", b"headint-scan-fingerprint/2")
    enc.put("versions", _versions().encode())
    enc.put("settings")
    enc.value(settings, "settings")
    for i, b in enumerate(batches):
        enc.put("batch", str(i).encode())
        enc.value(b, f"input batch {i}")
    for name, v in sorted((extra or {}).items()):
        enc.put("extra", name.encode())
        enc.value(v, name)
    enc.put("metric")
    enc.value(metric, "the metric")
    _hash_model(enc, model)
    if enc.opaque and key is None:
        shown = "; ".join(enc.opaque[:5]) + (f"; ... ({len(enc.opaque)} in all)" if len(enc.opaque) > 5 else "")
        raise FingerprintError(
            "checkpoint= needs a fingerprint of everything that determines the scan, so that the checkpoint resumes only "
            f"this scan, but these cannot be hashed: {shown}. Pass checkpoint_key='<a name you change whenever any of "
            "them changes>' to vouch for them, or scan without checkpoint=")
    if key is not None:
        enc.put("key", key.encode("utf-8", "surrogatepass"))
    return enc.h.hexdigest()
