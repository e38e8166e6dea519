"""Triton kernels of headint's intervened attention (imported as ``headint_kernels``).

- :mod:`.attention_fwd`: the forward kernel (online softmax, interventions in the score loop
  and the epilogue).
- :mod:`.attention_bwd`: the backward kernels (preprocess, dQ, dK/dV).
- :mod:`.config`: tile configurations (autotuned on GPU, one fixed config when interpreting).
- :mod:`.tuning`: the autotuner, keyed on bucketed sequence lengths (no re-tuning per decode step).
- :mod:`.launch`: launchers taking tensors (+ strides) and returning fresh outputs.
- :mod:`.compile_check`: ahead-of-time compilation of kernel variants for a GPU target
  (no GPU needed), reporting shared memory.

Kernels know tensors and strides only, never models. Importing this package imports triton;
set ``TRITON_INTERPRET=1`` before that to run on CPU tensors.
"""

from .launch import attention_backward, attention_forward

__all__ = ["attention_forward", "attention_backward"]
