"""Circuits (`interp.circuits`): the component graph, circuits run exactly, and the edge scores.

The reference for exact edge patching is independent of our forward: transformers' eager
PyTorch Gemma of the same weights, patched with torch hooks (`hf_hooks.edge_patched_metric`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import equinox as eqx
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
