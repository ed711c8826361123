"""Attribution graphs over transcoders (`interp.circuits.attribution_graph`): the replacement
model's linear map reproduces the model's own feature pre-activations and logits exactly
(each target's incoming edges plus its constants equal its value from the forward pass),
edges respect the DAG, influence equals its closed form, pruning keeps what circuit-tracer
keeps, and the JSON is circuit-tracer's schema."""

from __future__ import annotations

import json

import numpy as np
import pytest

from factories import tiny_attribution_graph, tiny_transcoder
from interp.circuits import attribution_graph, draw_graph, graph_json, prune, write_graph_json
from interp.circuits.attribution_graph import _influence, _normalised


@pytest.fixture(scope="module")
def graph():
    return tiny_attribution_graph()


def test_edges_plus_constants_are_the_models_own_values(graph):
    """Every feature's pre-activation and every logit target's demeaned logit, from the
    model's forward, equals the sum of its incoming edges plus its unattributed constants
    (b_enc, the transcoders' b_dec carried to it): the frozen linear map is the model's."""
    _, g = graph
    rows = np.flatnonzero(~np.isnan(g.values))
    assert len(rows) == len(g.features) + len(g.logit_tokens) and len(g.features) > 20
    reconstructed = g.adjacency[rows].sum(1) + g.constants[rows]
    np.testing.assert_allclose(reconstructed, g.values[rows], atol=1e-5 * np.abs(
        g.values[rows]).max())
    # The transcoders' activations are the pre-activations above threshold.
    f = len(g.features)
    assert (g.activations > 0).all() and (g.values[:f] > 0).all()


def test_edges_follow_layers_and_positions(graph):
    model, g = graph
    f, s, layers = len(g.features), g.positions, g.num_layers
    e = layers * s
    a = g.adjacency
    assert not a[f:f + e + s].any()                     # errors and tokens receive nothing
    for n, (layer, pos, _) in enumerate(g.features):
        later_feature = (g.features[:, 0] >= layer) | (g.features[:, 1] > pos)
        assert not a[n, :f][later_feature].any()
        err_layer, err_pos = np.divmod(np.arange(e), s)
        assert not a[n, f:f + e][(err_layer >= layer) | (err_pos > pos)].any()
        assert not a[n, f + e + pos + 1:f + e + s].any()
    assert np.abs(a[-len(g.logit_tokens):, f + e:f + e + s]).max() > 0
    probs = g.logit_probabilities
    assert (np.diff(probs) <= 0).all() and (len(probs) == 10 or probs.sum() >= 0.95)


def test_influence_and_pruning_as_circuit_tracer(graph):
    """Influence is `w ((I - A)^-1 - I)` of the row-normalised |adjacency|; pruning keeps the
    tokens and logits, and every kept feature both receives and sends a kept edge."""
    _, g = graph
    k, s, f = len(g.logit_tokens), g.positions, len(g.features)
    weights = np.zeros(len(g.adjacency))
    weights[-k:] = g.logit_probabilities
    a = _normalised(g.adjacency)
    closed = weights @ (np.linalg.inv(np.eye(len(a)) - a) - np.eye(len(a)))
    np.testing.assert_allclose(_influence(a, weights), closed, atol=1e-10)
    pruned = prune(g, 0.8, 0.98)
    nodes, edges = pruned.node_mask, pruned.edge_mask
    assert nodes[-k - s:].all() and 0 < nodes[:f].sum() < f
    assert not edges[~nodes].any() and not edges[:, ~nodes].any()
    for i in np.flatnonzero(nodes[:f]):
        assert edges[i].any() and edges[:, i].any()
    assert pruned.cumulative.max() == pytest.approx(1) and (pruned.cumulative > 0).all()
    everything = prune(g, 1.0, 1.0)
    assert everything.node_mask.sum() >= nodes.sum()
    with pytest.raises(ValueError, match="node_threshold must be between 0 and 1; got 1.5"):
        prune(g, 1.5)


def test_the_json_is_circuit_tracers_schema(graph, tmp_path):
    model, g = graph
    pruned = prune(g)
    pieces = [f"t{t}" for t in g.tokens]
    data = graph_json(pruned, slug="tiny", scan="tiny-transcoders", prompt="a prompt",
                      prompt_tokens=pieces, logit_pieces=[f"t{t}" for t in g.logit_tokens])
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert {link["source"] for link in data["links"]} | {
        link["target"] for link in data["links"]} <= set(ids)
    keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
            "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
            "activation"}
    assert all(set(n) == keys for n in data["nodes"])
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == g.positions and kinds.count("logit") == len(
        g.logit_tokens)
    target = [n for n in data["nodes"] if n["is_target_logit"]]
    assert len(target) == 1 and target[0]["feature"] == int(g.logit_tokens[0])
    assert target[0]["layer"] == str(g.num_layers + 1)
    path = write_graph_json(data, tmp_path / "tiny.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    png = draw_graph(pruned, tmp_path / "tiny.png", prompt_tokens=pieces)
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="a piece per prompt token"):
        graph_json(pruned, slug="x", scan="x", prompt="", prompt_tokens=pieces[:-1],
                   logit_pieces=[])


def test_bad_input_is_refused_in_one_sentence(graph):
    model, _ = graph
    tokens = np.arange(3, 12)
    with pytest.raises(ValueError, match="must read mlp_in and write mlp_out_normed of layer "
                       "1; it reads resid_mid of layer 1"):
        attribution_graph(model, tokens, {1: tiny_transcoder(model, 1, 0, reads="resid_mid")})
    with pytest.raises(ValueError, match="at least one transcoder"):
        attribution_graph(model, tokens, {})
    with pytest.raises(ValueError, match="the model has layers 0 to 2"):
        attribution_graph(model, tokens, {5: tiny_transcoder(model, 5, 0)})
    with pytest.raises(ValueError, match=r"one prompt: tokens of shape \[seq\]"):
        attribution_graph(model, tokens[None], {0: tiny_transcoder(model, 0, 0)})


def test_pruning_and_graph_file_are_circuit_tracers(graph, tmp_path):
    """circuit-tracer 0.5.0's own `prune_graph` and graph-file builder, on this graph (fixture
    from `tests/data/make_circuit_tracer_reference.py`; with CIRCUIT_TRACER_PYTHON set, rerun):
    the same nodes and edges kept, the same cumulative influence, the same file."""
    import dataclasses
    import os
    import sys
    from pathlib import Path

    data_dir = Path(__file__).parent / "data"
    sys.path.insert(0, str(data_dir))
    from make_circuit_tracer_reference import circuit_tracer, graph_arrays

    _, g = graph
    ref = dict(np.load(data_dir / "circuit_tracer_reference.npz"))
    if os.environ.get("CIRCUIT_TRACER_PYTHON"):
        ref["circuit_tracer"] = circuit_tracer(graph_arrays(
            g, slug="tiny", scan="tiny-transcoders", prompt="a prompt",
            prompt_pieces=[f"t{t}" for t in g.tokens],
            logit_pieces=[f"t{t}" for t in g.logit_tokens]), os.environ["CIRCUIT_TRACER_PYTHON"])
    # The fixture's graph is the one this code builds (its adjacency stored as float32).
    np.testing.assert_array_equal(ref["features"], g.features)
    np.testing.assert_array_equal(ref["logit_tokens"], g.logit_tokens)
    np.testing.assert_allclose(ref["adjacency"], g.adjacency, rtol=1e-6, atol=1e-7)
    expected = json.loads(str(ref["circuit_tracer"]))
    # circuit-tracer prunes in float32 and keeps a node at influence >= a threshold: compare
    # on its float32 adjacency, so that no node sits on the other side of a rounding.
    g32 = dataclasses.replace(g, adjacency=ref["adjacency"].astype(np.float64))
    pruned = prune(g32, 0.8, 0.98)
    np.testing.assert_array_equal(pruned.node_mask, expected["node_mask"])
    assert sorted(map(tuple, np.argwhere(pruned.edge_mask).tolist())) == sorted(
        map(tuple, expected["edge_mask"]))
    np.testing.assert_allclose(pruned.cumulative, expected["cumulative"], atol=1e-5)
    ours = graph_json(pruned, slug="tiny", scan="tiny-transcoders", prompt="a prompt",
                      prompt_tokens=[f"t{t}" for t in g.tokens],
                      logit_pieces=[f"t{t}" for t in g.logit_tokens])
    theirs = expected["graph"]
    assert ours["metadata"] == theirs["metadata"] and ours["qParams"] == theirs["qParams"]
    # One deliberate difference: circuit-tracer names the error node of layer l at position p
    # "0_l_p", the id of feature l of layer 0 at p; here it is "l_-1_p", so ids stay unique
    # (the viewer keys nodes by id). On this graph theirs collide.
    def theirs_id(node_id: str) -> str:
        layer, feature, pos = node_id.split("_")
        return f"0_{layer}_{pos}" if feature == "-1" else node_id

    ids = [n["node_id"] for n in ours["nodes"]]
    assert len(set(ids)) == len(ids)
    assert len({n["node_id"] for n in theirs["nodes"]}) < len(theirs["nodes"])
    assert [theirs_id(i) for i in ids] == [n["node_id"] for n in theirs["nodes"]]
    for node, other in zip(ours["nodes"], theirs["nodes"], strict=True):
        node = {**node, "node_id": theirs_id(node["node_id"])}
        assert set(node) == set(other), node["node_id"]
        for key, value in node.items():
            if isinstance(value, float):  # float32 there (influence, activation, prob)
                assert value == pytest.approx(other[key], rel=1e-5, abs=1e-6), (node, key)
            else:
                assert value == other[key], (node["node_id"], key, value, other[key])
    assert [(theirs_id(x["source"]), theirs_id(x["target"])) for x in ours["links"]] == [
        (x["source"], x["target"]) for x in theirs["links"]]
    np.testing.assert_allclose([x["weight"] for x in ours["links"]],
                               [x["weight"] for x in theirs["links"]], rtol=1e-6, atol=1e-7)
    assert len(ours["links"]) > 100 and 10 < len(ours["nodes"]) < len(g.adjacency)
