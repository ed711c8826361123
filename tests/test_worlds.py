"""Worlds on the batch axis: knock-outs in some worlds, rewiring, linearisation, on a tiny
grouped-query model. References: the same computations without worlds (a knocked-out model, a
patch from a separate capture, the plain model)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import interp
from factories import random_model, tiny_config
from interp.worlds import Worlds, knock_out_in, linearize, rewire

MODEL = random_model(tiny_config("gemma3"))  # 3 layers, 4 query heads on 2 key/value heads
RNG = np.random.RandomState(5)
A = np.concatenate([[[2], [2]], RNG.randint(3, 128, (2, 9))], axis=1).astype(np.int32)
B = np.concatenate([[[2], [2]], RNG.randint(3, 128, (2, 9))], axis=1).astype(np.int32)
WORLDS = Worlds(("first", "second", "third"), batch=2)


def _logits(model, tokens):
    return np.asarray(interp.run(model, tokens))


def test_worlds_tables_and_errors():
    assert WORLDS.rows == 6
    np.testing.assert_array_equal(WORLDS.sources({"third": "first"}), [0, 1, 2, 3, 0, 1])
    stacked = WORLDS.tokens({"first": A, "second": B, "third": A})
    np.testing.assert_array_equal(WORLDS.split(stacked)[1], B)
    with pytest.raises(ValueError, match="unknown world 'fourth'; the worlds are first, second"):
        WORLDS.sources({"fourth": "first"})
    with pytest.raises(ValueError, match=r"missing \['third'\]"):
        WORLDS.tokens({"first": A, "second": B})
    with pytest.raises(ValueError, match="must have shape"):
        WORLDS.tokens(A[:1])
    with pytest.raises(ValueError, match="distinct"):
        Worlds(("a", "a"))


def test_knock_out_in_one_world_equals_the_knocked_out_model():
    heads = [(1, 2), (2, 0)]
    model = knock_out_in(MODEL, WORLDS, heads, ["second"])
    got = WORLDS.split(_logits(model, WORLDS.tokens(A)))
    knocked = interp.knock_out(MODEL, interp.knockout_mask(MODEL, heads))
    np.testing.assert_allclose(got[1], _logits(knocked, A), atol=1e-5)
    np.testing.assert_allclose(got[0], _logits(MODEL, A), atol=1e-5)
    np.testing.assert_allclose(got[2], _logits(MODEL, A), atol=1e-5)


def test_rewiring_one_query_heads_values_equals_a_patch_from_another_input():
    """World `third` (input A) reads head 1's values of layer 2 from world `second` (input B):
    the same as patching `v_per_head` from a capture of B; head 0 of the group is untouched."""
    model = rewire(MODEL, WORLDS, "v_per_head", {"third": "second"}, layers=[2], heads=[1])
    got = WORLDS.split(_logits(model, WORLDS.tokens({"first": A, "second": B, "third": A})))
    _, cache = interp.capture(MODEL, B, sites=["v_per_head"], layers=[2])
    patched = interp.patch(MODEL, cache, "v_per_head", layers=[2], heads=[1])
    np.testing.assert_allclose(got[2], _logits(patched, A), atol=1e-5)
    np.testing.assert_allclose(got[0], _logits(MODEL, A), atol=1e-5)
    assert np.abs(got[2] - got[0]).max() > 1e-3  # the rewiring did something


def test_new_wiring_values_do_not_recompile_and_linearisation_at_home_is_exact():
    traces = []

    @eqx.filter_jit
    def forward(model, tokens):
        traces.append(1)
        return model(tokens)

    tokens = WORLDS.tokens({"first": A, "second": B, "third": A})
    one = rewire(MODEL, WORLDS, "resid_mid", {"third": "second"}, layers=[0])
    two = rewire(MODEL, WORLDS, "resid_mid", {"third": "first", "second": "first"}, layers=[0])
    a, b = np.asarray(forward(one, tokens)), np.asarray(forward(two, tokens))
    assert len(traces) == 1
    # Row i reads row source[i]: rewired worlds equal the world they read from (same input
    # from layer 0's middle on, the stream after it is the source world's).
    np.testing.assert_allclose(WORLDS.split(a)[2], WORLDS.split(a)[1], atol=1e-5)
    np.testing.assert_allclose(WORLDS.split(b)[1], WORLDS.split(b)[0], atol=1e-5)
    # Linearised around each world's own input, MLPs and the final norm are exact.
    exact = linearize(linearize(MODEL, WORLDS, "mlp", {}), WORLDS, "final_norm", {})
    np.testing.assert_allclose(_logits(exact, tokens), _logits(MODEL, tokens), atol=1e-5)
    # Around another world's input they are not (the model is not linear).
    around = linearize(MODEL, WORLDS, "mlp", {"second": "first"})
    got = WORLDS.split(_logits(around, tokens))
    plain = WORLDS.split(_logits(MODEL, tokens))
    np.testing.assert_allclose(got[0], plain[0], atol=1e-5)
    assert np.abs(got[1] - plain[1]).max() > 1e-3
    with pytest.raises(ValueError, match="sublayer must be 'mlp' or 'final_norm'"):
        linearize(MODEL, WORLDS, "attention", {})


def test_rewire_checks_its_table_against_the_batch():
    model = rewire(MODEL, WORLDS, "resid_pre", {"second": "first"}, layers=[1])
    with pytest.raises(ValueError, match=r"source must have shape \[batch\] = \(2,\); got \(6,\)"):
        interp.run(model, jnp.asarray(A))
