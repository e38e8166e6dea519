"""Synthetic in-context copying task used to train and probe the ``induction-2l`` model.

Every sequence is made of *distinct* random background tokens (sampled without
replacement from the vocabulary) into which one segment of random length is copied
at a random later offset.  Because the background tokens never repeat, the only way
to predict the next token inside the second occurrence of the segment is to look up
the earlier occurrence of the current token and copy what followed it, i.e. to run
an induction circuit.  Segment lengths, source offsets and destination offsets all
vary from sequence to sequence, so absolute position carries no information about
where the copy happens.

All randomness comes from an explicit ``torch.Generator`` seeded by the caller, so
batches are exactly reproducible and independent of the global RNG state.

Public helpers
--------------
``copy_task_batch``          training / evaluation batches with a mask of the
                             positions whose next token is predictable by induction.
``repeated_random_tokens``   the standard ``[random half | same half]`` sequences
                             used for attention-pattern scores.
``copy_accuracy``            argmax next-token accuracy on predictable positions.
``induction_prompts``        clean / corrupted prompt pairs for causal scans, ending
                             in the middle of a repeated segment, with the correct
                             ``target`` and a ``contrast`` (wrong) token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integration.modes import eval_mode

__all__ = [
    "CopyBatch",
    "InductionPrompts",
    "make_generator",
    "copy_task_batch",
    "repeated_random_tokens",
    "copy_accuracy",
    "induction_prompts",
]

# Defaults shared by the training script, the demo and the tests.
DEFAULT_VOCAB = 128
DEFAULT_SEQ_LEN = 48
DEFAULT_MIN_SEG = 4
DEFAULT_MAX_SEG = 16


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _resolve_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either `seed` or `generator`, not both")
        return generator
    return make_generator(0 if seed is None else seed)


def _distinct_tokens(batch: int, n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """[batch, n] int64; each row holds ``n`` distinct tokens drawn uniformly from ``range(vocab)``."""
    if n > vocab:
        raise ValueError(f"cannot draw {n} distinct tokens from a vocabulary of {vocab}")
    return torch.rand(batch, vocab, generator=g).argsort(dim=1)[:, :n]


def _uniform_int(low: torch.Tensor, high: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Elementwise uniform integers in ``[low, high]`` (inclusive); ``low``/``high`` int64 tensors."""
    u = torch.rand(low.shape, generator=g)
    span = (high - low + 1).to(torch.float64)
    return low + torch.clamp((u.to(torch.float64) * span).floor().long(), max=(high - low))


# ---------------------------------------------------------------------------------
# copying task
# ---------------------------------------------------------------------------------


@dataclass
class CopyBatch:
    """A batch of the in-context copying task.

    Attributes:
        input_ids: [batch, seq_len] int64 token ids.
        repeat_mask: [batch, seq_len] bool. ``True`` at position ``p`` when ``p`` lies in
            the second occurrence of the segment and ``input_ids[:, p + 1]`` is its
            continuation, i.e. the next token is predictable by induction
            (positions ``dst .. dst + seg_len - 2``).  The last column is always ``False``.
        seg_len: [batch] int64 length of the repeated segment.
        src: [batch] int64 start of the first occurrence.
        dst: [batch] int64 start of the second occurrence (``dst >= src + seg_len``).
    """

    input_ids: torch.Tensor
    repeat_mask: torch.Tensor
    seg_len: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def copy_task_batch(
    batch: int,
    seq_len: int = DEFAULT_SEQ_LEN,
    vocab: int = DEFAULT_VOCAB,
    min_seg: int = DEFAULT_MIN_SEG,
    max_seg: int = DEFAULT_MAX_SEG,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> CopyBatch:
    """Random sequences in which a segment of random length reappears at a random offset.

    For each row: ``seg_len ~ U[min_seg, max_seg]``, the second occurrence starts at
    ``dst ~ U[seg_len, seq_len - seg_len]`` and the first at ``src ~ U[0, dst - seg_len]``
    (the two occurrences never overlap and may be adjacent).  All other positions hold
    distinct random tokens, so the segment is the only repetition in the sequence.

    Args:
        batch: number of sequences.
        seq_len: tokens per sequence (must be ``>= 2 * max_seg``).
        vocab: vocabulary size (must be ``>= seq_len``).
        min_seg, max_seg: inclusive range of segment lengths (``min_seg >= 2``).
        seed: seed for a fresh generator (default 0) -- or pass ``generator`` instead
            to draw successive batches from one stream.

    Returns:
        A :class:`CopyBatch`; ``input_ids`` and ``repeat_mask`` are ``[batch, seq_len]``.
    """
    if not 2 <= min_seg <= max_seg:
        raise ValueError(f"need 2 <= min_seg <= max_seg, got {min_seg}, {max_seg}")
    if seq_len < 2 * max_seg:
        raise ValueError(f"seq_len={seq_len} too short for two segments of length {max_seg}")
    g = _resolve_generator(seed, generator)

    base = _distinct_tokens(batch, seq_len, vocab, g)
    seg_len = torch.randint(min_seg, max_seg + 1, (batch,), generator=g)
    dst = _uniform_int(seg_len, seq_len - seg_len, g)
    src = _uniform_int(torch.zeros_like(dst), dst - seg_len, g)

    pos = torch.arange(seq_len).unsqueeze(0)  # [1, T]
    in_copy = (pos >= dst[:, None]) & (pos < (dst + seg_len)[:, None])
    source_index = torch.where(in_copy, pos - dst[:, None] + src[:, None], pos)
    input_ids = base.gather(1, source_index)
    repeat_mask = (pos >= dst[:, None]) & (pos < (dst + seg_len - 1)[:, None])
    return CopyBatch(input_ids=input_ids, repeat_mask=repeat_mask, seg_len=seg_len, src=src, dst=dst)


def repeated_random_tokens(
    batch: int,
    half_len: int,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
    distinct: bool = True,
) -> torch.Tensor:
    """Standard induction probe: ``[r_0 .. r_{h-1} | r_0 .. r_{h-1}]``.

    Args:
        batch: number of sequences.
        half_len: length ``h`` of the random half.
        vocab: vocabulary size.
        seed: generator seed (deterministic output).
        distinct: draw the half without replacement (default), so every token of the
            first half occurs exactly once there and the induction target is unique.

    Returns:
        [batch, 2 * half_len] int64 token ids.
    """
    g = make_generator(seed)
    if distinct:
        half = _distinct_tokens(batch, half_len, vocab, g)
    else:
        half = torch.randint(0, vocab, (batch, half_len), generator=g)
    return torch.cat([half, half], dim=1)


# ---------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------


def _vocab_of(model) -> int:
    return int(model.config.vocab_size)


@torch.no_grad()
def copy_accuracy(
    model,
    batch: int = 256,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 1234,
    min_seg: int = DEFAULT_MIN_SEG,
    max_seg: int = DEFAULT_MAX_SEG,
    vocab: int | None = None,
) -> tuple[float, float]:
    """In-context copy accuracy of ``model`` on fresh seeded copy-task sequences.

    Runs the model on :func:`copy_task_batch` sequences and measures how often the
    argmax next-token prediction is correct at the positions whose next token is
    predictable by induction (``repeat_mask``).

    Returns:
        ``(accuracy, chance)`` where ``chance = 1 / vocab``.
    """
    vocab = _vocab_of(model) if vocab is None else vocab
    data = copy_task_batch(batch, seq_len, vocab, min_seg, max_seg, seed=seed)
    device = next(model.parameters()).device
    with eval_mode(model):
        logits = model(input_ids=data.input_ids.to(device)).logits
    pred = logits[:, :-1].argmax(-1).cpu()
    correct = pred == data.input_ids[:, 1:]
    mask = data.repeat_mask[:, :-1]
    accuracy = correct[mask].float().mean().item()
    return accuracy, 1.0 / vocab


# ---------------------------------------------------------------------------------
# prompts for causal scans
# ---------------------------------------------------------------------------------


@dataclass
class InductionPrompts:
    """Clean / corrupted prompt pairs whose final next token is predictable by induction.

    Attributes:
        clean: [batch, seq_len] int64. ``... A_0 .. A_{L-1} ... A_0 .. A_{k-1}``: the
            prompt ends ``k`` tokens into the second occurrence of segment ``A``.
        corrupted: [batch, seq_len] int64, identical to ``clean`` except that the first
            occurrence of ``A`` is replaced by fresh tokens that appear nowhere in the
            clean prompt, so induction has nothing to copy from (``target`` does not
            occur in the corrupted prompt at all).
        target: [batch] int64, the correct next token ``A_k``.
        contrast: [batch] int64, a plausible wrong answer: a background token of the
            same prompt (neither in ``A`` nor the target; present in both versions).
        src: [batch] int64 start of the first occurrence of ``A``.
        dst: [batch] int64 start of the second occurrence of ``A``.
        seg_len: [batch] int64 length ``L`` of ``A`` (``L > k``).
        n_repeated: [batch] int64 number ``k`` of repeated tokens at the end of the prompt.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    target: torch.Tensor
    contrast: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    seg_len: torch.Tensor
    n_repeated: torch.Tensor


def induction_prompts(
    batch: int,
    seq_len: int = 32,
    vocab: int = DEFAULT_VOCAB,
    min_seg: int = DEFAULT_MIN_SEG,
    max_seg: int = DEFAULT_MAX_SEG,
    min_repeated: int = 2,
    seed: int = 0,
) -> InductionPrompts:
    """Prompt pairs for causal scans (activation patching, head knockout, ...).

    Each clean prompt contains a segment ``A`` of random length ``L`` at a random
    offset, then more background tokens, and ends after the first ``k`` tokens of a
    second occurrence of ``A`` (``min_repeated <= k <= L - 1``), so the correct next
    token is ``A_k``.  All prompts of a batch have the same length ``seq_len`` and the
    final position is always the one to read logits from.

    Args:
        batch: number of prompts.
        seq_len: prompt length (``>= 2 * max_seg``).
        vocab: vocabulary size (needs room for ``seq_len + max_seg`` distinct tokens).
        min_seg, max_seg: inclusive range of segment lengths.
        min_repeated: minimum number ``k`` of repeated tokens shown (``>= 1``).
        seed: generator seed (deterministic output).

    Returns:
        An :class:`InductionPrompts`.
    """
    if not 1 <= min_repeated < min_seg <= max_seg:
        raise ValueError("need 1 <= min_repeated < min_seg <= max_seg")
    if seq_len < 2 * max_seg:
        raise ValueError(f"seq_len={seq_len} too short for segments up to {max_seg}")
    if vocab < seq_len + max_seg + 1:
        raise ValueError(f"vocab={vocab} too small for seq_len={seq_len}, max_seg={max_seg}")
    g = make_generator(seed)

    # seq_len background tokens, plus max_seg fresh replacement tokens for the corruption.
    pool = _distinct_tokens(batch, seq_len + max_seg, vocab, g)
    base, fresh = pool[:, :seq_len], pool[:, seq_len:]

    seg_len = torch.randint(min_seg, max_seg + 1, (batch,), generator=g)
    k = _uniform_int(torch.full_like(seg_len, min_repeated), seg_len - 1, g)
    dst = seq_len - k  # second occurrence starts here and runs to the end of the prompt
    src = _uniform_int(torch.zeros_like(dst), dst - seg_len, g)

    pos = torch.arange(seq_len).unsqueeze(0)
    in_copy = pos >= dst[:, None]
    source_index = torch.where(in_copy, pos - dst[:, None] + src[:, None], pos)
    clean = base.gather(1, source_index)
    target = base.gather(1, (src + k)[:, None]).squeeze(1)

    in_first = (pos >= src[:, None]) & (pos < (src + seg_len)[:, None])
    fresh_index = (pos - src[:, None]).clamp(0, max_seg - 1)
    corrupted = torch.where(in_first, fresh.gather(1, fresh_index), clean)

    # contrast: a uniformly chosen background position (outside both occurrences)
    background = ~in_first & ~in_copy
    scores = torch.rand(batch, seq_len, generator=g).masked_fill(~background, -1.0)
    contrast = clean.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)

    return InductionPrompts(
        clean=clean,
        corrupted=corrupted,
        target=target,
        contrast=contrast,
        src=src,
        dst=dst,
        seg_len=seg_len,
        n_repeated=k,
    )
