"""Attribution graphs over transcoders (`interp.circuits.attribution_graph`): the replacement
model's linear map reproduces the model's own feature pre-activations and logits exactly
(each target's incoming edges plus its constants equal its value from the forward pass),
edges respect the DAG, influence equals its closed form, pruning keeps what circuit-tracer
keeps, and the JSON is circuit-tracer's schema."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from factories import random_model, tiny_config
from interp.circuits import attribution_graph, draw_graph, graph_json, prune, write_graph_json
from interp.circuits.attribution_graph import _influence, _normalised
from interp.features import HookPoint, SparseDictionary

WIDTH = 24


def _transcoder(model, layer, seed, reads="mlp_in"):
    rng = np.random.default_rng(seed)
    d = model.config.embed_dim
    a = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
        w_enc=rng.normal(size=(d, WIDTH)) * 0.5, b_enc=rng.normal(size=WIDTH) * 0.1,
        w_dec=rng.normal(size=(WIDTH, d)) * 0.3, b_dec=rng.normal(size=d) * 0.1,
        threshold=np.abs(rng.normal(size=WIDTH)) * 0.3).items()}
    return SparseDictionary(a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"], a["threshold"],
                            None, "jumprelu", None, HookPoint(reads, layer),
                            HookPoint("mlp_out_normed", layer), name=f"transcoder-{layer}")


@pytest.fixture(scope="module")
def graph():
    model = random_model(tiny_config("gemma3"))  # GQA, QK-norm, post-norms, local layers
    tokens = np.random.default_rng(0).integers(3, 100, 9)
    return model, attribution_graph(model, tokens, {0: _transcoder(model, 0, 0),
                                                    2: _transcoder(model, 2, 1)})


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
        attribution_graph(model, tokens, {1: _transcoder(model, 1, 0, reads="resid_mid")})
    with pytest.raises(ValueError, match="at least one transcoder"):
        attribution_graph(model, tokens, {})
    with pytest.raises(ValueError, match="the model has layers 0 to 2"):
        attribution_graph(model, tokens, {5: _transcoder(model, 5, 0)})
    with pytest.raises(ValueError, match=r"one prompt: tokens of shape \[seq\]"):
        attribution_graph(model, tokens[None], {0: _transcoder(model, 0, 0)})
