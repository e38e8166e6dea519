"""Edge-level circuits: EAP / EAP-IG, exact edge patching and ACDC against an independent
per-receiver-copy implementation (tests/circuit_oracle.py), the graph, extraction and files."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

import headint
from headint import circuits
from headint.circuits.evaluate import curve_auc, roc_auc, roc_points
from headint.circuits.extract import connect, select
from headint.integration.adapter import UnsupportedModelError

from circuit_oracle import Oracle
import tiny_models as tm

ARCHS = ("gpt2", "llama")  # llama: grouped-query attention (4 query heads, 2 key/value heads)
N, T = 3, 7


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    torch.manual_seed(0)
    model = tm.FACTORIES[request.param]().model.double()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, tm.VOCAB, (N, T), generator=g)
    corrupt = torch.randint(3, tm.VOCAB, (N, T), generator=g)
    tgt = torch.randint(3, tm.VOCAB, (N,), generator=g)
    con = torch.randint(3, tm.VOCAB, (N,), generator=g)

    def metric(logits):
        last = logits[:, -1]
        return last.gather(1, tgt[:, None])[:, 0] - last.gather(1, con[:, None])[:, 0]

    batch = {"input_ids": clean, "target": tgt, "contrast": con}
    return request.param, model, batch, {"input_ids": corrupt}, metric


def _close(mine: dict, ref: dict):
    assert set(mine) == set(ref), set(mine) ^ set(ref)
    scale = max(abs(v) for v in ref.values())
    err = max(abs(mine[k] - ref[k]) for k in ref)
    assert err <= 1e-4 * scale, (err, scale)


def test_names_and_counts(case):
    name, model, *_ = case
    g = circuits.graph_of(model)
    H, Hkv, L = 4, (4 if name == "gpt2" else 2), 2
    assert len(g.senders) == 1 + L * (H + 1)
    assert len(g.receivers) == L * (H + 2 * Hkv + 1) + 1
    assert g.names[0] == "input->a0.h0<q>"
    kv = "a0.kv1<k>" if name == "llama" else "a0.h1<k>"
    assert f"input->{kv}" in g.names and "a0.h2->m0" in g.names and "a1.h3->logits" in g.names
    assert "a1.h0->a0.h0<q>" not in g.names and "m1->m1" not in g.names
    with pytest.raises(KeyError, match="does not exist"):
        g.index("a1.h0->m0")
    with pytest.raises(KeyError, match="unknown receiver"):
        g.index("input->a9.h0<q>")


def test_eap_equals_oracle(case):
    _, model, clean, corrupt, metric = case
    ref = Oracle(model).eap(clean["input_ids"], corrupt["input_ids"], metric)
    r = circuits.attribute(model, clean, corrupt, "logit_diff", method="eap", batch_size=2)
    _close(dict(zip(r.edges, r.scores.double().tolist())), ref)


def test_eap_ig_equals_oracle_on_interpolated_gradients(case):
    """EAP-IG (inputs) = the oracle's EAP gradients averaged over the interpolated embeddings."""
    _, model, clean, corrupt, metric = case
    o = Oracle(model)
    steps = 3
    with torch.no_grad():
        _, src, _ = o.run(corrupt["input_ids"])
        _, live, _ = o.run(clean["input_ids"])
    ref: dict = {}
    for k in range(steps):
        a = k / steps
        emb = src["input"] + a * (live["input"] - src["input"])
        orig = o.embed
        o.embed = lambda ids, emb=emb: emb
        try:
            with torch.enable_grad():
                logits, _, inputs = o.run(clean["input_ids"], grads=True)
                metric(logits).sum().backward()
        finally:
            o.embed = orig
        for v, (x, ups) in inputs.items():
            for u in ups:
                ref[f"{u}->{v}"] = ref.get(f"{u}->{v}", 0.0) + float(((src[u] - live[u]) * x.grad).sum()) / (N * steps)
    r = circuits.attribute(model, clean, corrupt, "logit_diff", method="eap-ig", steps=steps, batch_size=2)
    _close(dict(zip(r.edges, r.scores.double().tolist())), ref)


def test_patching_equals_oracle(case):
    _, model, clean, corrupt, metric = case
    g = circuits.graph_of(model)
    rnd = random.Random(0)
    sets = [[], [g.names[0]], [g.names[-1]], rnd.sample(g.names, 5), rnd.sample(g.names, 40), list(g.names)]
    sets += [[n] for n in rnd.sample(g.names, 8)]
    ref = Oracle(model).patched_metric(clean["input_ids"], corrupt["input_ids"], metric, sets)
    got = circuits.patch_edges(model, clean, sets, "logit_diff", corrupt=corrupt, batch_size=5)
    assert torch.allclose(got.double(), ref, atol=1e-5 * ref.abs().max())
    with torch.no_grad():  # every edge patched is the corrupt run; none is the clean run
        assert torch.allclose(got[5].double(), metric(model(corrupt["input_ids"]).logits), atol=1e-5)
        assert torch.allclose(got[0].double(), metric(model(clean["input_ids"]).logits), atol=1e-6)


def _derivative_check(model, clean, corrupt):
    """EAP scores = the central difference of exact patching with the source clean + eps * (corrupt - clean)."""
    g = circuits.graph_of(model)
    eap = circuits.attribute(model, clean, corrupt, "logit_diff", method="eap")
    from headint.circuits.inputs import paired
    from headint.circuits.patching import SourceValues, patch_edges

    st = circuits.circuit_structure(model)
    cb, xb = paired(clean, corrupt)
    src = SourceValues(model, st, g, cb, xb, "corrupt", 8, torch.device("cpu"))
    base = SourceValues(model, st, g, cb, cb, "corrupt", 8, torch.device("cpu"))
    corr = dict(src.values)
    eps = 1e-3  # a central difference (the metrics are float32)
    edges = [g.names[i] for i in torch.sort(-eap.scores.abs()).indices[:6].tolist()]
    vals = []
    for sign in (1.0, -1.0):
        src.values = {k: base.values[k] + sign * eps * (v - base.values[k]) for k, v in corr.items()}
        out = patch_edges(model, cb, [[e] for e in edges], "logit_diff", corrupt=xb, graph=g, _sources=src)
        vals.append(out["values"].double().mean(1))
    fd = (vals[0] - vals[1]) / (2 * eps)
    want = torch.tensor([eap.score(e) for e in edges], dtype=torch.float64)
    assert torch.allclose(fd, want, rtol=2e-2, atol=1e-3 * want.abs().max())


def test_eap_is_the_derivative_of_patching(case):
    """A model-agnostic check between the two code paths (gradients vs patched forwards)."""
    _, model, clean, corrupt, _ = case
    _derivative_check(model, clean, corrupt)


def _more_models():
    import transformers as tf

    small = dict(vocab_size=tm.VOCAB, max_position_embeddings=64)
    return {
        "gptj (parallel)": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=tm.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                    rotary_dim=4, bos_token_id=1, eos_token_id=2)),
        "neox (parallel)": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                          intermediate_size=64, use_parallel_residual=True,
                                                                          bos_token_id=1, eos_token_id=2, **small)),
        "neox (sequential)": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                            intermediate_size=64, use_parallel_residual=False,
                                                                            bos_token_id=1, eos_token_id=2, **small)),
        "qwen3 (per-head q/k norms, GQA)": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                                      num_key_value_heads=2, head_dim=8, intermediate_size=64, **small)),
    }


@pytest.mark.parametrize("name", list(_more_models()))
def test_more_architectures(name):
    """Parallel attention/MLP (GPT-J, NeoX) and per-head norms (Qwen3): patching every edge is the
    corrupt run (so no path is missing from the graph), none is the clean run, and EAP is the
    derivative of patching."""
    torch.manual_seed(0)
    model = _more_models()[name]().eval().double()
    parallel = circuits.circuit_structure(model).parallel
    assert parallel == [("parallel" in name)] * 2
    g = torch.Generator().manual_seed(5)
    ids, cor = torch.randint(3, tm.VOCAB, (2, 6), generator=g), torch.randint(3, tm.VOCAB, (2, 6), generator=g)
    clean = {"input_ids": ids, "target": torch.tensor([4, 5]), "contrast": torch.tensor([6, 7])}
    corrupt = {"input_ids": cor}
    graph = circuits.graph_of(model)
    if "parallel" in name:
        assert "a0.h0->m0" not in graph.names and "a0.h0->m1" in graph.names
    vals = circuits.patch_edges(model, clean, [[], list(graph.names)], "logit_diff", corrupt=corrupt).double()
    with torch.no_grad():
        for row, ids_ in ((0, ids), (1, cor)):
            lg = model(ids_).logits[:, -1]
            want = lg.gather(1, torch.tensor([[4], [5]]))[:, 0] - lg.gather(1, torch.tensor([[6], [7]]))[:, 0]
            assert torch.allclose(vals[row], want, atol=1e-5)
    _derivative_check(model, clean, corrupt)


def test_acdc_batched_equals_one_at_a_time(case):
    _, model, clean, corrupt, _ = case
    a = circuits.acdc(model, clean, corrupt, threshold=0.05, criterion="logit_diff", batch_size=N)  # one candidate per batch
    b = circuits.acdc(model, clean, corrupt, threshold=0.05, criterion="logit_diff", batch_size=16 * N)
    assert torch.equal(a.in_circuit, b.in_circuit)
    assert torch.allclose(a.scores, b.scores, equal_nan=True, atol=1e-5)
    assert 0 < int(a.in_circuit.sum()) < a.graph.n_edges
    assert b.settings["cost"]["batches"] < a.settings["cost"]["batches"]
    # the circuit's value is what patching every removed edge gives
    removed = (~a.in_circuit).nonzero().flatten().tolist()
    v = circuits.patch_edges(model, clean, [removed], "logit_diff", corrupt=corrupt)
    assert abs(float(v.double().mean()) - a.settings["circuit_value"]) < 1e-5


def test_padding_changes_nothing():
    model = tm.FACTORIES["llama"]().model.double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, tm.VOCAB, (2, 6), generator=g)
    cor = torch.randint(3, tm.VOCAB, (2, 6), generator=g)
    one = circuits.attribute(model, {"input_ids": ids[:1], "target": torch.tensor([5]), "contrast": torch.tensor([6])},
                             {"input_ids": cor[:1]}, method="eap")
    pad = torch.full((2, 8), 0)
    pad[0, 2:] = ids[0]
    pad[1, 2:] = ids[1]
    padc = pad.clone()
    padc[0, 2:] = cor[0]
    padc[1, 2:] = cor[1]
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[:, 2:] = 1
    two = circuits.attribute(model, {"input_ids": pad, "attention_mask": mask, "target": torch.tensor([5, 5]),
                                     "contrast": torch.tensor([6, 6])},
                             {"input_ids": padc, "attention_mask": mask}, method="eap", batch_size=1)
    # mean over two examples; example 0 alone equals its padded row: compare via per-row runs
    two0 = circuits.attribute(model, {"input_ids": pad[:1], "attention_mask": mask[:1], "target": torch.tensor([5]),
                                      "contrast": torch.tensor([6])}, {"input_ids": padc[:1], "attention_mask": mask[:1]}, method="eap")
    assert torch.allclose(one.scores, two0.scores, atol=1e-5 * one.scores.abs().max())
    assert two.scores.shape == one.scores.shape


def test_per_position_sums_to_total(case):
    _, model, clean, corrupt, _ = case
    r = circuits.attribute(model, clean, corrupt, method="eap", per_position=True)
    assert r.positions.shape == (r.graph.n_edges, T)
    assert torch.allclose(r.positions.sum(1), r.scores, atol=1e-5 * r.scores.abs().max())


def test_restricted_graph_scores_match_full(case):
    _, model, clean, corrupt, _ = case
    g = circuits.graph_of(model)
    k = g.restrict(qkv="k", mlp=False, layers=[1])
    assert all(n.endswith("<k>") or n.endswith("->logits") for n in k.names)
    assert all(not n.startswith("m") for n in k.names)
    full = circuits.attribute(model, clean, corrupt, method="eap")
    part = circuits.attribute(model, clean, corrupt, method="eap", graph=k)
    for e, s in zip(part.edges, part.scores.tolist()):
        assert abs(s - full.score(e)) <= 1e-6 * full.scores.abs().max()
    with pytest.raises(ValueError, match="qkv"):
        g.restrict(qkv="x")


def test_sources_mean_and_resample(case):
    _, model, clean, _, _ = case
    g = circuits.graph_of(model)
    e = g.names[3]
    m = circuits.patch_edges(model, clean, [[e], list(g.names)], source="mean")
    r = circuits.patch_edges(model, clean, [[e]], source="resample", seed=1)
    assert torch.isfinite(m).all() and torch.isfinite(r).all()
    with pytest.raises(ValueError, match="needs corrupt"):
        circuits.patch_edges(model, clean, [[e]])
    with pytest.raises(ValueError, match="source must be"):
        circuits.patch_edges(model, clean, [[e]], source="zero")


def test_extraction_and_connectivity():
    model = tm.get("gpt2").model
    g = circuits.graph_of(model)
    scores = torch.zeros(g.n_edges)
    scores[g.index("a0.h1->a1.h2<k>")] = 5.0  # feeds a head that reaches nothing: pruned
    scores[g.index("input->a0.h3<v>")] = 4.0
    scores[g.index("a0.h3->logits")] = 3.0
    scores[g.index("input->m1")] = -2.0
    scores[g.index("m1->logits")] = 1.0
    r = circuits.CircuitResult(g, scores, method="test", metric_name="m")
    c = r.circuit(top_n=5)
    assert set(c.circuit_edges) == {"input->a0.h3<v>", "a0.h3->logits", "input->m1", "m1->logits"}
    assert set(r.circuit(top_n=5, connected=None).circuit_edges) >= {"a0.h1->a1.h2<k>"}
    assert set(r.circuit(threshold=2.5, absolute=False).circuit_edges) == {"input->a0.h3<v>", "a0.h3->logits"}
    both = select(scores, top_n=2)
    assert connect(g, both, "both").sum() == 0  # a0.h1 has no input edge; a0.h3->logits without its input: kept
    with pytest.raises(ValueError, match="exactly one"):
        r.circuit()


def test_roc_auc():
    truth = torch.tensor([True, False, True, False])
    assert roc_auc(torch.tensor([4.0, 1.0, 3.0, 2.0]), truth) == 1.0
    assert roc_auc(torch.tensor([1.0, 1.0, 1.0, 1.0]), truth) == 0.5
    assert curve_auc(roc_points([truth], truth)) == 1.0


def test_save_load_and_safety(tmp_path, case):
    _, model, clean, corrupt, _ = case
    r = circuits.attribute(model, clean, corrupt, method="eap", per_position=True).circuit(top_n=4)
    r.settings["nan"] = float("nan")
    stem = r.save(tmp_path / "res")
    back = circuits.CircuitResult.load(tmp_path / "res.json")
    assert back.edges == r.edges and torch.equal(back.scores, r.scores) and torch.equal(back.in_circuit, r.in_circuit)
    assert torch.equal(back.positions, r.positions) and back.settings["nan"] != back.settings["nan"]
    assert back.to_frame().equals(r.to_frame())
    other = circuits.attribute(model, clean, corrupt, method="eap")
    other.save(tmp_path / "other")
    (tmp_path / "res.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not hold the tensors"):
        circuits.CircuitResult.load(stem)
    meta = json.loads((tmp_path / "other.json").read_text())
    meta["edges"] = meta["edges"][::-1]
    (tmp_path / "other.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edge names"):
        circuits.CircuitResult.load(tmp_path / "other")
    (tmp_path / "bad.json").write_text('{"format": "headint.ScanResult"}')
    with pytest.raises(ValueError, match="not a saved CircuitResult"):
        circuits.CircuitResult.load(tmp_path / "bad.json")
    r.save(str(tmp_path / "d") + "/")
    assert (tmp_path / "d" / "circuit.json").exists()
    assert circuits.CircuitResult.load(tmp_path / "d").edges == r.edges  # a folder without the slash
    # untrusted files: a tensor file larger than the sidecar's edges allow, a FIFO sidecar
    stem = r.save(tmp_path / "big")
    with open(f"{stem}.safetensors", "ab") as f:
        f.write(b"\0" * (2 * 2**20))
    with pytest.raises(ValueError, match="over the"):
        circuits.CircuitResult.load(stem)
    import os

    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ValueError, match="FIFO"):
        circuits.CircuitResult.load(tmp_path / "fifo.json")


def test_drawing(tmp_path, case):
    _, model, clean, corrupt, _ = case
    r = circuits.attribute(model, clean, corrupt, method="eap").circuit(top_n=6)
    svg = r.to_svg()
    assert svg.startswith("<svg") and svg.count("<line") == len(r.circuit_edges)
    page = r.to_html(tmp_path / "c.html")
    assert page == (tmp_path / "c.html").read_text() and 'class="hi-report"' in page
    r.plot(tmp_path / "c.svg")
    with pytest.raises(ValueError, match="svg"):
        r.plot(tmp_path / "c.png")


def test_circuit_graph_for_the_report(tmp_path, case):
    """What the report draws of a CircuitResult: each drawn edge is one edge of the result, with
    its score as the weight and its q/k/v input as the kind; grouped key/value receivers are
    nodes a{l}.kv{g}; the circuit, else the top edges; max_edges keeps the largest."""
    from headint.results.circuit_graph import CircuitGraph
    from headint.results.report_data import circuit_of
    from report_checks import assert_self_contained, report_data

    name, model, clean, corrupt, _ = case
    r = circuits.attribute(model, clean, corrupt, method="eap")
    frame = r.to_frame().set_index("edge")

    def as_edge(e):
        recv = e.target if e.kind is None else f"{e.target}<{e.kind}>"
        return f"{e.source}->{recv}"

    top = r.to_circuit_graph(top=7)
    assert [as_edge(e) for e in top.edges] == list(r.top(7)["edge"])  # the 7 largest |score|, in rank order
    for e in top.edges:
        assert e.weight == pytest.approx(frame.loc[as_edge(e), "score"], rel=1e-6)
    c = r.circuit(top_n=10)
    g = c.to_circuit_graph()
    assert sorted(as_edge(e) for e in g.edges) == sorted(c.circuit_edges)
    assert g.note.startswith(f"eap (logit_diff): the circuit: {len(c.circuit_edges)} of {r.graph.n_edges} edges")
    names = {n.name: n for n in g.nodes}
    assert names["logits"].kind == "output" and all(e.source in names and e.target in names for e in g.edges)
    kinds = {n.kind for n in g.nodes}
    full = r.to_circuit_graph(edges="top", top=r.graph.n_edges)
    kv = [n for n in full.nodes if ".kv" in n.name]
    if name == "llama":  # 4 query heads, 2 key/value heads: a1.kv0 serves h0-1
        assert {n.name for n in kv} == {f"a{l}.kv{g}" for l in range(2) for g in range(2)}
        a1kv0 = next(n for n in kv if n.name == "a1.kv0")
        assert a1kv0.kind == "other" and a1kv0.layer == 1 and a1kv0.label == "a1.kv0 (h0-1)"
        assert {e.kind for e in full.edges if e.target.startswith("a1.kv")} == {"k", "v"}
    else:
        assert kv == [] and "other" not in kinds
    assert len(full.edges) == r.graph.n_edges
    few = r.to_circuit_graph(edges="top", top=r.graph.n_edges, max_edges=5)
    assert [as_edge(e) for e in few.edges] == list(r.top(5)["edge"]) and f"{r.graph.n_edges - 5} edges with the smallest" in few.note
    with pytest.raises(ValueError, match="edges must be"):
        r.to_circuit_graph(edges="all")
    with pytest.raises(ValueError, match="max_edges"):
        r.to_circuit_graph(max_edges=0)
    # into a scan's report (the same graph) and its own report
    assert isinstance(circuit_of(c), CircuitGraph) and circuit_of(c).to_json() == g.to_json()
    with pytest.raises(TypeError, match="CircuitGraph"):
        circuit_of("a0.h0->logits")
    page = c.to_html(tmp_path / "own.html")
    assert_self_contained(page)
    data = report_data(page)
    assert data["scans"] == [] and data["table"] is None and data["circuit"] == g.to_json()
    scan = headint.scan(model, clean, "logit_diff", method="patch", corrupt=dict(corrupt, target=clean["target"], contrast=clean["contrast"]),
                        backend="reference", progress=False)
    both = report_data(scan.to_html(tmp_path / "scan.html", circuit=c).read_text())
    assert both["circuit"] == g.to_json() and both["scans"][0]["key"] == "main"


def test_model_left_as_it_was_and_threads(case):
    _, model, clean, corrupt, _ = case
    flags = [p.requires_grad for p in model.parameters()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    ids = clean["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    seen = []

    def other():  # another thread's forward during a run sees the plain model
        with torch.no_grad():
            seen.append(model(ids).logits)

    t = threading.Thread(target=other)
    from headint.circuits.taps import Taps

    st = circuits.circuit_structure(model)
    g = circuits.graph_of(model)
    patch_all = circuits.patch_edges  # noqa: F841
    from headint.circuits.taps import EdgePatch
    from headint.circuits.patching import SourceValues
    from headint.circuits.inputs import paired

    cb, xb = paired(clean, corrupt)
    src = SourceValues(model, st, g, cb, xb, "corrupt", 8, torch.device("cpu"))
    with Taps(model, st, g, patch=EdgePatch(g.matrix(torch.ones(N, g.n_edges, dtype=torch.bool)), src.rows(torch.arange(N)))):
        t.start()
        t.join()
        with torch.no_grad():
            mine = model(ids).logits
    assert torch.equal(seen[0], before)
    assert not torch.allclose(mine, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_unsupported_models_refused():
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        circuits.graph_of(tm.get("bert").model)


def test_bad_arguments(case):
    _, model, clean, corrupt, _ = case
    with pytest.raises(ValueError, match="method must be"):
        circuits.attribute(model, clean, corrupt, method="ig")
    with pytest.raises(ValueError, match="steps"):
        circuits.attribute(model, clean, corrupt, steps=0)
    with pytest.raises(ValueError, match="shape"):
        circuits.attribute(model, clean, {"input_ids": corrupt["input_ids"][:, :-1]})
    with pytest.raises(ValueError, match="needs corrupt"):
        circuits.attribute(model, clean, None)


# ------------------------------------------------------------------ ground truths


@pytest.fixture(scope="module")
def induction():
    from headint.tasks.induction import induction_prompts

    model = headint.models.load("induction-2l")
    p = induction_prompts(24, seq_len=32, vocab=model.config.vocab_size, seed=1)
    return model, {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}, {"input_ids": p.corrupted}


PREV, IND = (0,), (0, 2, 3)  # induction-2l's previous-token head L0H0 and induction heads (training.json)
K_COMPOSITION = [f"a0.h{p}->a1.h{i}<k>" for p in PREV for i in IND]
OUTPUTS = [f"a1.h{i}->logits" for i in IND]
# the rest of the induction circuit: token identities into the previous-token heads' values and
# the induction heads' queries and values, and the backup previous-token head L0H1
CIRCUIT = set(K_COMPOSITION + OUTPUTS + [f"input->a0.h{p}<v>" for p in (0, 1)]
              + [f"input->a1.h{i}<{w}>" for i in IND for w in "qv"] + [f"a0.h1->a1.h{i}<k>" for i in IND])


@pytest.mark.parametrize("method", ["patch", "eap-ig"])
def test_induction_ground_truth(induction, method):
    """K-composition edges (previous-token head -> induction heads' keys) and the induction heads'
    output edges rank above every edge outside the induction circuit."""
    model, clean, corrupt = induction
    if method == "patch":
        r = circuits.edge_patching(model, clean, "logit_diff", corrupt=corrupt, batch_size=256)
    else:
        r = circuits.attribute(model, clean, corrupt, "logit_diff", method=method, steps=8)
    s = r.scores.abs()
    named = torch.tensor([s[r.graph.index(e)] for e in K_COMPOSITION + OUTPUTS])
    outside = torch.tensor([v for e, v in zip(r.edges, s.tolist()) if e not in CIRCUIT])
    assert float(named.min()) > float(outside.max()), (named, outside.max())


def test_induction_patching_values_equal_oracle(induction):
    model, clean, corrupt = induction
    sub = {k: v[:6] for k, v in clean.items()}
    subc = {k: v[:6] for k, v in corrupt.items()}
    tgt, con = sub["target"], sub["contrast"]

    def metric(logits):
        return logits[:, -1].gather(1, tgt[:, None])[:, 0] - logits[:, -1].gather(1, con[:, None])[:, 0]

    edges = [[e] for e in K_COMPOSITION + OUTPUTS]
    ref = Oracle(model).patched_metric(sub["input_ids"], subc["input_ids"], metric, edges)
    got = circuits.patch_edges(model, sub, edges, "logit_diff", corrupt=subc)
    assert torch.allclose(got, ref.float(), atol=1e-4 * ref.abs().max())


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-xproportion"])
def test_tracr_ground_truth(name):
    """Miller et al.'s resample-ablation ground truth holds exactly, and EAP-IG (both kinds) and
    ACDC recover it with ROC AUC 1.0 (EAP too, with the projection metric)."""
    from headint.tasks.tracr import l2_to_clean, projection, tracr_task

    task = tracr_task(name, n=16, seed=0)
    g = circuits.graph_of(task.model)
    truth = g.edge_mask(task.truth)
    ex = circuits.edge_patching(task.model, task.clean, l2_to_clean(), corrupt=task.corrupt)
    assert (ex.scores[truth] > 1e-3).all() and (ex.scores[~truth].abs() < 1e-6).all()
    rest = circuits.patch_edges(task.model, task.clean, [(~truth).nonzero().flatten().tolist()], l2_to_clean(), corrupt=task.corrupt)
    assert float(rest.abs().max()) < 1e-6  # the true edges alone reproduce the model
    for method in ("eap-ig", "eap-ig-activations"):
        r = circuits.attribute(task.model, task.clean, task.corrupt, l2_to_clean(), method=method, steps=5)
        assert roc_auc(r.scores.abs(), truth) == 1.0, method
    r = circuits.attribute(task.model, task.clean, task.corrupt, projection(), method="eap")
    assert roc_auc(r.scores.abs(), truth) == 1.0
    a = circuits.acdc(task.model, task.clean, task.corrupt, threshold=1e-3, criterion=l2_to_clean(), maximize=False)
    assert set(a.circuit_edges) == set(task.truth)
    assert curve_auc(roc_points([a.in_circuit], truth)) == 1.0


def test_tracr_model_is_a_headint_model():
    """Every headint method applies: a head scan runs through the attention registry."""
    from headint.tasks.tracr import projection, tracr_task

    task = tracr_task("tracr-reverse", n=4, seed=1)
    res = headint.scan(task.model, task.clean, projection(), method="zero", progress=False)
    assert res.per_example.shape[:2] == (4, 1)


def test_cli_circuit(tmp_path, capsys):
    from headint.cli import main
    from headint.tasks.induction import induction_prompts

    p = induction_prompts(4, seq_len=32, vocab=128, seed=0)
    for name, ids in (("p.jsonl", p.clean), ("c.jsonl", p.corrupted)):
        (tmp_path / name).write_text("".join(json.dumps({"input_ids": ids[i].tolist(), "target": int(p.target[i]),
                                                         "contrast": int(p.contrast[i])}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    args = ["circuit", "induction-2l", "--prompts", str(tmp_path / "p.jsonl"), "--corrupt", str(tmp_path / "c.jsonl"),
            "--method", "eap", "--top", "6", "--out", str(out)]
    assert main(args) == 0
    for f in ("edges.csv", "circuit.json", "circuit.safetensors", "circuit.svg", "circuit.html"):
        assert (out / f).exists(), f
    back = circuits.CircuitResult.load(out / "circuit")
    assert 0 < int(back.in_circuit.sum()) <= 6
    assert main(args[:-2] + ["--method", "acdc", "--out", str(out)]) == 2
    assert "needs --threshold" in capsys.readouterr().err
    assert main(["circuit", "induction-2l", "--prompts", str(tmp_path / "missing.jsonl"), "--corrupt", str(tmp_path / "c.jsonl"),
                 "--out", str(out)]) == 2
