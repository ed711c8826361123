"""Circuits (`interp.circuits`): the component graph, circuits run exactly, and the edge scores.

The reference for exact edge patching is independent of our forward: transformers' eager
PyTorch Gemma of the same weights, patched with torch hooks (`hf_hooks.edge_patched_metric`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from hf_hooks import edge_patched_metric
from interp import circuits
from interp.circuits.scores import edge_attribution, edge_patching
from interp.patching import mean_logprob

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gemma_eqx.formats.hf import from_hf  # noqa: E402

VOCAB, SEQ = 97, 11
POSITIONS, TARGETS = (7, 8, 9, 10), (3, 5, 8, 13)
TOL = 1e-4  # float32 on both sides

CASES = {
    # Gemma 1 multi-query: no post-norms, one key head for four query heads.
    "gemma1-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_key_value_heads=2, sliding_window=5, query_pre_attn_scalar=16,
                    attn_logit_softcapping=4.0, final_logit_softcapping=8.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_key_value_heads=2, sliding_window=5, query_pre_attn_scalar=16)),
}
EDGES = [("input", "a1.h0<q>"), ("a0.h2", "a2.kv0<k>"), ("a1.h1", "a2.kv0<v>"), ("a0.h1", "m0<in>"),
         ("m0", "a1.kv0<v>"), ("a1.h3", "logits"), ("m1", "logits"), ("input", "m2<in>"),
         ("a2.h1", "m2<in>")]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config_cls, model_cls, overrides = CASES[request.param]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        head_dim=16, num_hidden_layers=3, attn_implementation="eager", **overrides)
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            std = 0.5 if p.ndim == 1 else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    rng = np.random.default_rng(0)
    clean, corrupted = rng.integers(0, VOCAB, (2, 2, SEQ))
    return request.param, hf, from_hf(hf), clean, corrupted


def _metric(logits) -> float:
    lp = torch.log_softmax(logits.double(), -1)[:, list(POSITIONS)]
    return float(lp.gather(-1, torch.tensor(TARGETS).expand(lp.shape[0], -1)[..., None]).mean())


def hf_edge_patched(hf, clean, corrupted, sender, receiver):
    return edge_patched_metric(hf, clean, corrupted, sender, receiver,
                               lambda model, tokens: _metric(model(tokens).logits))


def test_single_edges_patched_equal_transformers_with_hooks(case):
    """Each edge of `EDGES` patched alone, and every edge (the corrupted run) or none (the
    clean run), against HF."""
    name, hf, ours, clean, corrupted = case
    graph = circuits.component_graph(ours)
    metric = mean_logprob(TARGETS, POSITIONS)
    scores = edge_patching(ours, clean, corrupted, metric, edges=EDGES)
    with torch.no_grad():
        hf_clean = _metric(hf(torch.tensor(clean)).logits)
        hf_corrupted = _metric(hf(torch.tensor(corrupted)).logits)
    np.testing.assert_allclose([scores.clean, scores.corrupted], [hf_clean, hf_corrupted],
                               atol=TOL, err_msg=name)
    moved = []
    for sender, receiver in EDGES:
        reference = hf_edge_patched(hf, clean, corrupted, sender, receiver)
        ours_value = scores.clean + scores.scores[graph.edge_index(sender, receiver)]
        assert abs(ours_value - reference) < TOL, (name, sender, receiver, ours_value, reference)
        moved.append(abs(reference - hf_clean))
    # The reference is not trivially the clean run: most edges move the metric.
    assert sum(m > 10 * TOL for m in moved) >= len(EDGES) - 2, (name, moved)


def test_the_graph_of_a_grouped_query_model(case):
    name, _, ours, *_ = case
    graph = circuits.component_graph(ours)
    heads, kv = 4, 1 if name == "gemma1-mqa" else 2
    assert len(graph.senders) == 1 + 3 * (heads + 1)
    assert len(graph.receivers) == 3 * (heads + 2 * kv + 1) + 1
    # Per layer l a receiver of attention hears 1 + 5 l senders, the MLP one more layer of
    # heads, the logits all 16.
    per_layer = [(heads + 2 * kv) * (1 + 5 * la) + (1 + 5 * la + heads) for la in range(3)]
    assert graph.num_edges == sum(per_layer) + 16
    assert graph.edge_name(graph.edge_index("a0.h1", "m0<in>")) == "a0.h1->m0<in>"


@pytest.fixture(scope="module")
def gemma3_scores():
    from factories import random_model, tiny_config

    model = random_model(tiny_config("gemma3"))
    rng = np.random.default_rng(1)
    clean, corrupted = rng.integers(3, 128, (2, 2, 12))
    metric = mean_logprob([5, 6], [10, 11])
    return model, clean, corrupted, metric, edge_patching(model, clean, corrupted, metric)


def test_eap_is_the_first_order_term_by_finite_differences(gemma3_scores):
    """EAP's score of each edge is -d metric / d w_e: the central difference of the metric
    in that edge's weight around 1 (eps 1e-2: its error, eps^2 times the third derivative, and
    float32 rounding over eps, are both below the tolerance). Every 3rd edge (all kinds of
    senders and receivers among them) and the 16 of largest score."""
    model, clean, corrupted, metric, _ = gemma3_scores
    eap = edge_attribution(model, clean, corrupted, metric, method="eap")
    graph, eps = eap.graph, 1e-2
    edges = np.union1d(np.arange(0, graph.num_edges, 3), np.argsort(-np.abs(eap.scores))[:16])
    weights = np.ones((2 * len(edges), graph.num_edges), np.float32)
    for i, e in enumerate(edges):
        weights[2 * i, e], weights[2 * i + 1, e] = 1 + eps, 1 - eps
    values = circuits.circuit_metrics(model, clean, corrupted, metric, weights)
    difference = -(values[0::2] - values[1::2]) / (2 * eps)
    np.testing.assert_allclose(eap.scores[edges], difference, rtol=2e-2, atol=2e-4)
    assert np.abs(eap.scores).max() > 0.1


def test_eap_ig_converges_to_the_path_integral(gemma3_scores):
    """EAP-IG along the edge weights with k midpoints approaches the integral of the
    gradient from all-patched to clean (32-point composite Gauss-Legendre of the same
    gradient), and the integral's scores sum to metric(corrupted) - metric(clean) (two plain
    forwards)."""
    import jax.numpy as jnp

    from interp.circuits.edges import as_scalar_metric, check_pair, patch_outputs
    from interp.circuits.scores import _gradient_jit

    model, clean, corrupted, metric, exact = gemma3_scores
    tokens, _, mask = check_pair(model, clean, corrupted)
    scalar = as_scalar_metric(model, metric, tokens)
    patch = patch_outputs(model, corrupted, tokens)
    # Composite Gauss-Legendre: 2 panels of 16 points.
    nodes, quad = np.polynomial.legendre.leggauss(16)
    e = exact.graph.num_edges
    integral = -sum(q / 4 * np.asarray(_gradient_jit(model, tokens, mask,
                                                       jnp.full((e,), (panel + (n + 1) / 2) / 2),
                                                       patch, False, scalar, None), np.float64)
                    for panel in range(2) for n, q in zip(nodes, quad, strict=True))
    assert abs(integral.sum() - (exact.corrupted - exact.clean)) < 1e-4
    errors = [np.abs(edge_attribution(model, clean, corrupted, metric, steps=k).scores
                     - integral).max() for k in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.02 * np.abs(integral).max(), errors


def test_bad_input_is_refused_in_one_sentence(gemma3_scores):
    model, clean, corrupted, metric, exact = gemma3_scores
    graph = exact.graph
    with pytest.raises(ValueError, match=r"a2\.h0 \(layer 2\) cannot send to a1\.h0<q> "
                                         r"\(layer 1\)"):
        graph.edge_index("a2.h0", "a1.h0<q>")
    with pytest.raises(ValueError, match="m1 .* cannot send to m1<in>"):
        graph.circuit_weights(["m1->m1<in>"])
    with pytest.raises(ValueError, match="at least one edge; got none"):
        graph.circuit_weights([])
    with pytest.raises(ValueError, match="no receiver named 'a1.h9<q>'"):
        graph.edge_index("input", "a1.h9<q>")
    with pytest.raises(ValueError, match=r"must return one number .* returns shape \(2,\)"):
        edge_attribution(model, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match=r"same shape .* \(2, 12\) and \(2, 11\)"):
        edge_patching(model, clean, corrupted[:, :11], metric)


def test_acdc_removes_what_cannot_matter_and_its_circuit_runs_to_its_objective(gemma3_scores):
    """Head a1.h2 and MLP m0 are made silent (their output matrices zero): ACDC removes every
    edge out of them and, as they send nothing, every edge into them, without running those.
    The kept circuit, run afresh, gives the objective ACDC ended with; a threshold above the
    corrupted run's KL removes everything."""
    import jax.numpy as jnp

    from interp.circuits.acdc import acdc, kl_from_clean

    model, clean, corrupted, metric, _ = gemma3_scores
    model = eqx.tree_at(lambda m: (m.blocks[1].attn.w_o, m.blocks[0].mlp.w_linear), model,
                        (model.blocks[1].attn.w_o.at[2].set(0),
                         jnp.zeros_like(model.blocks[0].mlp.w_linear)))
    graph = circuits.component_graph(model)
    result = acdc(model, clean, corrupted, threshold=1e-3, positions=[10, 11])
    silent = {graph.sender_index("a1.h2"), graph.sender_index("m0")}
    for e in np.flatnonzero(result.kept):
        s, r = graph.edges[e]
        assert s not in silent, graph.edge_name(e)
        assert graph.receivers[r].name not in ("a1.h2<q>", "m0<in>"), graph.edge_name(e)
    assert 0 < result.kept.sum() < graph.num_edges
    assert result.runs < graph.num_edges + 1
    assert np.all(np.diff(result.trajectory) < 1e-3)
    kl = kl_from_clean(model, clean, [10, 11])
    rerun = circuits.circuit_metrics(model, clean, corrupted, kl,
                                     result.kept[None].astype(np.float32))[0]
    assert abs(rerun - result.trajectory[-1]) < 1e-5
    everything = circuits.circuit_metrics(model, clean, corrupted, kl,
                                          np.zeros((1, graph.num_edges), np.float32))[0]
    assert acdc(model, clean, corrupted, threshold=float(everything) + 1,
                positions=[10, 11]).kept.sum() == 0


TL_REFERENCE = Path(__file__).parent / "data" / "tl_composition_reference.npz"
TL_SCRIPT = Path(__file__).parent / "data" / "make_tl_composition_reference.py"


def test_composition_scores_equal_transformer_lens(tmp_path):
    """Our Q-, K- and V-composition equal TransformerLens 4.3.0's `all_composition_scores` on
    the same weights (grouped-query: 4 query heads, 2 key heads), to 1e-5. Our model holds TL's
    weights divided by random norm scales (pre-attention, post-attention, QK-norm), which the
    scores fold back in: a fold done wrong changes them."""
    import jax
    import jax.numpy as jnp

    from gemma_eqx.model.modules import Transformer
    from interp.circuits.composition import composition_scores

    python = os.environ.get("TL_PYTHON")
    if python:
        subprocess.run([python, str(TL_SCRIPT), str(tmp_path / "tl.npz")], check=True,
                       capture_output=True)
        ref = dict(np.load(tmp_path / "tl.npz"))
        for key, value in np.load(TL_REFERENCE).items():
            np.testing.assert_allclose(ref[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    else:
        ref = dict(np.load(TL_REFERENCE))
    layers, heads, d, hd = ref["W_Q"].shape
    kv = ref["W_K"].shape[1]
    from factories import tiny

    config = tiny(("global",) * layers, embed_dim=d, num_heads=heads, num_kv_heads=kv,
                  head_dim=hd, use_post_norms=True, use_qk_norm=True)
    model = Transformer(config, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    for i in range(layers):
        pre, post = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
        qn, kn = rng.uniform(0.5, 2, hd), rng.uniform(0.5, 2, hd)
        block = model.blocks[i]
        offset = block.pre_attention_norm.offset
        model = eqx.tree_at(
            lambda m, i=i: (m.blocks[i].attn.w_q, m.blocks[i].attn.w_k, m.blocks[i].attn.w_v,
                            m.blocks[i].attn.w_o, m.blocks[i].pre_attention_norm.scale,
                            m.blocks[i].post_attention_norm.scale,
                            m.blocks[i].attn.query_norm.scale, m.blocks[i].attn.key_norm.scale),
            model,
            tuple(jnp.asarray(a, jnp.float32) for a in (
                ref["W_Q"][i] / pre[:, None] / qn, ref["W_K"][i] / pre[:, None] / kn,
                ref["W_V"][i] / pre[:, None], ref["W_O"][i] / post, pre - offset,
                post - offset, qn - offset, kn - offset)))
    for mode in ("Q", "K", "V"):
        ours = np.asarray(composition_scores(model, mode))
        assert ours.shape == ref[f"scores_{mode}"].shape == (layers, heads, layers, heads)
        np.testing.assert_allclose(ours, ref[f"scores_{mode}"], atol=1e-5, err_msg=mode)
        assert ref[f"scores_{mode}"].max() > 0.1


def test_node_patching_is_activation_patching_of_the_node(gemma3_scores):
    """Every edge out of a node patched is the node's output patched: each head's score
    equals `patching.activation_patching` of `head_out` (clean run, corrupted values), and
    each MLP's a patch of `mlp_out_normed` (an independent path: interventions on the model's
    own forward). AtP's node scores (EAP summed over a node's edges) estimate them."""
    from interp import patching
    from interp.circuits.scores import node_patching

    model, clean, corrupted, metric, exact = gemma3_scores
    graph = exact.graph
    nodes = node_patching(model, clean, corrupted, metric)
    heads = patching.activation_patching(model, clean, corrupted, "head_out", metric,
                                         per="layer_head")
    mlps = patching.activation_patching(model, clean, corrupted, "mlp_out_normed", metric,
                                        per="layer")
    for s, sender in enumerate(graph.senders):
        if sender.kind == "head":
            expected = heads.values[sender.layer, sender.index] - heads.target
        elif sender.kind == "mlp":
            expected = mlps.values[sender.layer] - mlps.target
        else:
            expected = exact.corrupted - exact.clean  # the input patched: the corrupted run
        assert abs(nodes[s] - expected) < 1e-5, (sender.name, nodes[s], expected)
    assert np.abs(nodes).max() > 0.05


def _plain(model, tokens, metric, interventions) -> float:
    """`metric` of the model's own forward with `interventions` ({layer: [...]})."""
    from interp.install import add_interventions
    from interp.patching import evaluate

    return float(np.mean(np.asarray(evaluate(add_interventions(model, interventions), tokens,
                                             metric))))


def _receiver_patch(receiver, cache):
    """The intervention on the model's own forward that gives `receiver` the corrupted run's
    input: its q, k or v (one head) or the MLP's normed input, from the corrupted run."""
    from interp.interventions import Replace

    if receiver.kind == "mlp":
        return Replace("mlp_in", value=cache["mlp_in", receiver.layer])
    return Replace(receiver.kind, value=cache[receiver.kind, receiver.layer],
                   heads=(receiver.index,))


def test_receiver_patching_is_patching_the_receivers_input(gemma3_scores):
    """Every edge into a receiver patched is its input taken from the corrupted run: each
    query, key, value and MLP receiver's exact score equals `patching.activation_patching`
    of that head's q (k, v) or the MLP's `mlp_in` from the corrupted run (an independent
    path: interventions on the model's own forward); the logits' is the corrupted run's."""
    from interp import patching
    from interp.circuits.scores import node_patching

    model, clean, corrupted, metric, exact = gemma3_scores
    graph = exact.graph
    nodes = node_patching(model, clean, corrupted, metric, nodes="receivers")
    sweeps = {site: patching.activation_patching(
        model, clean, corrupted, site, metric, per="layer" if site == "mlp_in" else "layer_head")
        for site in ("q", "k", "v", "mlp_in")}
    for r, receiver in enumerate(graph.receivers):
        if receiver.kind == "logits":
            expected = exact.corrupted - exact.clean
        else:
            sweep = sweeps["mlp_in" if receiver.kind == "mlp" else receiver.kind]
            at = (receiver.layer,) if receiver.kind == "mlp" else (receiver.layer,
                                                                     receiver.index)
            expected = sweep.values[at] - sweep.target
        assert abs(nodes[r] - expected) < 1e-5, (receiver.name, nodes[r], expected)
    assert np.abs(nodes).max() > 0.05


def test_atp_qk_fix_is_the_exact_patched_pattern_then_linear(gemma3_scores):
    """AtP's QK fix for a query (key) receiver: the attention weights recomputed exactly with
    the corrupted query (keys), then their effect to first order. Checked on the model's own
    forward: the patched weights recorded with that q (k) replaced, and the central finite
    difference of the metric along (patched - clean) weights added at that layer's pattern
    (eps 1e-2), for a query and a key receiver of each layer. AtP's plain estimate of the same
    nodes is different (its softmax is linear)."""
    from interp.capture import capture
    from interp.circuits.scores import node_attribution
    from interp.install import add_interventions
    from interp.interventions import Add, Record

    model, clean, corrupted, metric, exact = gemma3_scores
    graph, eps = exact.graph, 1e-2
    fixed = node_attribution(model, clean, corrupted, metric, method="atp+qk")
    plain = node_attribution(model, clean, corrupted, metric, method="atp")
    _, cache = capture(model, corrupted, sites=["q", "k"])
    _, base = capture(model, clean, sites=["pattern"])
    checked = 0
    for r, receiver in enumerate(graph.receivers):
        if receiver.kind not in ("q", "k"):
            assert fixed.scores[r] == pytest.approx(plain.scores[r], abs=1e-9), receiver.name
            continue
        if receiver.index != receiver.layer % 2:
            continue  # a query head and a key head of each layer (the test's time)
        la = receiver.layer
        recorded = add_interventions(model, {la: [_receiver_patch(receiver, cache),
                                                  Record("pattern")]})
        out = recorded.forward(jnp.asarray(clean)).records[f"blocks.{la}.pattern"]
        delta = jnp.asarray(out) - base["pattern", la]
        values = [_plain(model, clean, metric, {la: [Add("pattern", value=sign * eps * delta)]})
                  for sign in (1, -1)]
        difference = (values[0] - values[1]) / (2 * eps)
        assert fixed.scores[r] == pytest.approx(difference, rel=2e-2, abs=2e-4), receiver.name
        checked += 1
    assert checked == 2 * graph.num_layers
    qk = [r for r, rec in enumerate(graph.receivers) if rec.kind in ("q", "k")]
    assert np.abs(fixed.scores[qk] - plain.scores[qk]).max() > 1e-3


def test_grad_drop_of_atp_star(gemma3_scores):
    """GradDrop drops the gradient through one layer's outputs at a time: a node of the last
    layer is unchanged by every drop but its own layer's (which zeroes it), so its AtP* score
    is |its estimate| (L - 1 of L terms, over L - 1); the logits' L / (L - 1) times it; a node
    of the first layer differs (its gradient crosses the later layers). Scores are >= 0."""
    from interp.circuits.scores import node_attribution

    model, clean, corrupted, metric, exact = gemma3_scores
    graph, layers = exact.graph, exact.graph.num_layers
    for nodes, fix in (("receivers", "atp+qk"), ("senders", "atp")):
        star = node_attribution(model, clean, corrupted, metric, nodes=nodes, method="atp*")
        one = node_attribution(model, clean, corrupted, metric, nodes=nodes, method=fix)
        items = graph.receivers if nodes == "receivers" else graph.senders
        assert (star.scores >= 0).all()
        last = [i for i, n in enumerate(items) if n.layer == layers - 1]
        first = [i for i, n in enumerate(items) if n.layer == 0]
        np.testing.assert_allclose(star.scores[last], np.abs(one.scores[last]), rtol=1e-4,
                                   atol=1e-7, err_msg=nodes)
        assert np.abs(star.scores[first] - np.abs(one.scores[first])).max() > 1e-3, nodes
        if nodes == "receivers":
            assert star.scores[-1] == pytest.approx(
                layers / (layers - 1) * abs(one.scores[-1]), rel=1e-4)
    with pytest.raises(ValueError, match="method must be one of atp, atp\\+qk, atp\\*; got 'eap'"):
        node_attribution(model, clean, corrupted, metric, method="eap")
    with pytest.raises(ValueError, match="nodes must be 'senders' or 'receivers'; got 'heads'"):
        node_attribution(model, clean, corrupted, metric, nodes="heads")


def test_a_circuits_faithfulness_minimality_and_completeness(gemma3_scores):
    """The whole graph as a circuit: faithfulness 1, complete (0 for every half removed),
    and each edge's minimality is minus its exact edge-patching score over the model's
    effect. Without its most important edge, a circuit's faithfulness drops by that edge's
    share, and some half of it, removed, tells the circuit from the model (incomplete)."""
    model, clean, corrupted, metric, exact = gemma3_scores
    graph = exact.graph
    gap = exact.clean - exact.corrupted
    whole = circuits.evaluate_circuit(model, clean, corrupted, metric,
                                      np.ones(graph.num_edges, bool), subsets=3)
    assert whole.faithfulness == pytest.approx(1, abs=1e-5)
    assert whole.completeness.max() < 1e-5
    np.testing.assert_allclose(whole.minimality, -exact.scores / gap, atol=1e-4)
    best = int(np.argmax(np.abs(exact.scores)))
    mask = np.ones(graph.num_edges, bool)
    mask[best] = False
    part = circuits.evaluate_circuit(model, clean, corrupted, metric, mask, subsets=4)
    assert part.faithfulness == pytest.approx(1 + exact.scores[best] / gap, abs=1e-4)
    assert part.completeness.max() > 1e-2
    assert all(best not in half and set(half) <= set(part.edges) for half in part.subsets)
    with pytest.raises(ValueError, match="at least one edge"):
        circuits.evaluate_circuit(model, clean, corrupted, metric, np.zeros(graph.num_edges,
                                                                            bool))


def test_eap_equals_auto_circuits_on_gpt2(tmp_path):
    """EAP of every edge of a tiny GPT-2 (LayerNorms and biases, all random) equals
    auto-circuit 1.0.1's `mask_gradient_prune_scores` on the same weights, negated (its mask
    is 1 where an edge is patched, ours 0), to 1e-5 (fixture from
    `tests/data/make_auto_circuit_reference.py`; with `AUTO_CIRCUIT_PYTHON` set, rerun)."""
    import json as _json
    import sys

    import jax.numpy as jnp_

    from gemma_eqx.formats.hf import from_hf
    from interp.patching import Metric
    from interp.study.circuit import copied_logprob

    data_dir = Path(__file__).parent / "data"
    path = data_dir / "auto_circuit_reference.npz"
    if os.environ.get("AUTO_CIRCUIT_PYTHON"):
        path = tmp_path / "reference.npz"
        subprocess.run([os.environ["AUTO_CIRCUIT_PYTHON"],
                        str(data_dir / "make_auto_circuit_reference.py"), str(path)], check=True)
    ref = np.load(path)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **_json.loads(str(ref["config"])), attn_implementation="eager")).eval()
    state = {k.split(":", 1)[1]: torch.tensor(ref[k]) for k in ref.files
             if k.startswith("weight:")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), missing
    model = from_hf(hf)
    seq = ref["clean"].shape[1]
    metric = Metric((seq - 1,), copied_logprob, jnp_.asarray(ref["answers"][:, None]),
                    "log-prob of the answer", data_are_token_ids=True)
    ours = edge_attribution(model, ref["clean"], ref["corrupted"], metric, method="eap")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_vs_auto_circuit import ours_name

    names = [f"{ours_name(s)}->{ours_name(d, receiver=True)}"
             for s, d in zip(ref["sources"], ref["destinations"], strict=True)]
    assert sorted(names) == sorted(ours.graph.edge_names())
    index = {n: i for i, n in enumerate(ours.graph.edge_names())}
    np.testing.assert_allclose(ours.scores[[index[n] for n in names]], -ref["scores"],
                               atol=1e-5)
    assert np.abs(ref["scores"]).max() > 0.05 and float(ref["hf_vs_tl_logits"]) < 1e-4
