"""Model-level interventions: what to do to which head, and how each kind lowers itself onto
one attention call.

Built-in kinds (one module each): :class:`Ablate`, :class:`Patch`, :class:`Scale`,
:class:`PatchQKV`, :class:`Knockout`. A new kind subclasses :class:`Intervention` and
implements ``lower(call)`` with the edit methods of
:class:`~headint.interventions.call.AttentionCall` (and optionally ``validate(shape)``);
:func:`headint.intervene` takes it like a built-in one.
"""

from .ablate import Ablate
from .base import Intervention
from .call import AttentionCall
from .edits import CallPlan
from .knockout import Knockout
from .patch import Patch
from .patch_qkv import PatchQKV
from .scale import Scale

__all__ = ["Intervention", "Ablate", "Patch", "Scale", "PatchQKV", "Knockout", "AttentionCall", "CallPlan"]
