"""Kaggle orbax checkpoints: layout, round trip, preset detection, sharded restore, errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import gemma_eqx
from factories import random_model, shrink
from gemma_eqx.formats.kaggle import detect_preset, layout_shapes, load_checkpoint, save_checkpoint
from gemma_eqx.model.weights import leaf_paths
from gemma_eqx.parallel.sharding import (
    DEFAULT_RULES,
    LAST_AXIS_RULES,
    ShardingRules,
    default_mesh,
    leaf_sharding,
    shard_model,
)


def official_transposed(preset: str) -> bool:
    """From shared/spec/architecture.md: the official checkpoints store the gating weight as
    (2, F, D) for Gemma 2 9B/27B and Gemma 3, as (2, D, F) otherwise."""
    return preset.startswith("gemma3") or preset in ("gemma2-9b", "gemma2-27b")


def spec_keys(config, transposed: bool) -> dict[str, dict[str, tuple]]:
    """The Kaggle layout written out from the table in shared/spec/architecture.md."""
    d, n, k, h, f, v = (config.embed_dim, config.num_heads, config.num_kv_heads,
                        config.head_dim, config.hidden_dim, config.vocab_size)
    out = {"transformer/embedder": {"input_embedding": (v, d)},
           "transformer/final_norm": {"scale": (d,)}}
    for i in range(config.num_layers):
        p = f"transformer/layer_{i}"
        out[f"{p}/pre_attention_norm"] = {"scale": (d,)}
        out[f"{p}/pre_ffw_norm"] = {"scale": (d,)}
        if config.use_post_norms:
            out[f"{p}/post_attention_norm"] = {"scale": (d,)}
            out[f"{p}/post_ffw_norm"] = {"scale": (d,)}
        if k == n:
            out[f"{p}/attn/qkv_einsum"] = {"w": (3, n, d, h)}
        else:
            out[f"{p}/attn/q_einsum"] = {"w": (n, d, h)}
            out[f"{p}/attn/kv_einsum"] = {"w": (2, k, d, h)}
        out[f"{p}/attn/attn_vec_einsum"] = {"w": (n, h, d)}
        if config.use_qk_norm:
            out[f"{p}/attn/_query_norm"] = {"scale": (h,)}
            out[f"{p}/attn/_key_norm"] = {"scale": (h,)}
        out[f"{p}/mlp/gating_einsum"] = {"w": (2, f, d) if transposed else (2, d, f)}
        out[f"{p}/mlp/linear"] = {"w": (f, d)}
    return out


PRESET_FAMILIES = ["gemma-2b", "gemma-7b", "gemma2-9b", "gemma3-1b"]


@pytest.mark.parametrize("preset", PRESET_FAMILIES)
def test_save_load_round_trip_is_bit_identical(tmp_path, preset):
    config = shrink(preset)
    model = random_model(config, dtype=jnp.bfloat16)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", preset=config)
    before, after = leaf_paths(model), leaf_paths(loaded)
    assert before.keys() == after.keys()
    for path in before:
        assert after[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(before[path]), np.asarray(after[path]), path)
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % config.vocab_size
    np.testing.assert_array_equal(model.with_activation_dtype(jnp.float32)(tokens),
                                  loaded(tokens))


@pytest.mark.parametrize("preset", PRESET_FAMILIES)
def test_checkpoint_on_disk_has_the_kaggle_names_and_shapes(tmp_path, preset):
    import orbax.checkpoint as ocp

    config = shrink(preset)
    transposed = official_transposed(preset)
    save_checkpoint(random_model(config), tmp_path / "ckpt", transposed_gating=transposed)
    tree = ocp.PyTreeCheckpointer().metadata(tmp_path / "ckpt").item_metadata.tree
    found = {key: {leaf: tuple(m.shape) for leaf, m in leaves.items()}
             for key, leaves in tree.items()}
    assert found == spec_keys(config, transposed)
    assert {str(m.dtype) for leaves in tree.values() for m in leaves.values()} == {"bfloat16"}
    assert not list(tmp_path.glob(".*")), "temporary directory left behind"


def test_float32_save_keeps_dtype(tmp_path):
    config = shrink("gemma3-1b")
    model = random_model(config)
    save_checkpoint(model, tmp_path / "c", dtype=None)
    loaded = load_checkpoint(tmp_path / "c", preset=config)
    for path, leaf in leaf_paths(loaded).items():
        assert leaf.dtype == jnp.float32, path
        np.testing.assert_array_equal(leaf, leaf_paths(model)[path])


@pytest.mark.parametrize("name", list(gemma_eqx.PRESETS))
def test_every_preset_is_detected_from_shapes_alone(name):
    config = gemma_eqx.get_preset(name)
    spec = spec_keys(config, official_transposed(name))
    assert detect_preset(spec) == config
    assert detect_preset(spec_keys(config, not official_transposed(name))) == config
    # The layout we write is the one the spec describes.
    assert layout_shapes(config) == spec


def test_detection_ignores_vision_leaves_and_rejects_unknown_shapes(tmp_path):
    shapes = spec_keys(gemma_eqx.get_preset("gemma3-4b"), True)
    bad = {k: dict(v) for k, v in shapes.items()}
    bad["transformer/final_norm"] = {"scale": (1000,)}
    with pytest.raises(ValueError, match="match no Gemma preset.*embed=1000"):
        detect_preset(bad)


def test_load_detects_preset_from_disk(tmp_path, monkeypatch):
    config = shrink("gemma2-9b")
    monkeypatch.setitem(gemma_eqx.PRESETS, config.name, config)
    save_checkpoint(random_model(config), tmp_path / "c")
    assert load_checkpoint(tmp_path / "c").config == config


def test_vision_leaves_are_skipped_without_reading(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    config = shrink("gemma3-4b")
    model = random_model(config)
    from gemma_eqx.formats.kaggle import kaggle_from_arrays

    flat = kaggle_from_arrays(leaf_paths(model), config)
    flat["SigLiPFromPatches_0/siglip_encoder/embedding"] = {"kernel": jnp.ones((4, 4))}
    flat["transformer/embedder"]["mm_input_projection"] = jnp.ones((3, 3))
    ocp.PyTreeCheckpointer().save(tmp_path / "c", args=ocp.args.PyTreeSave(flat))
    # Record which leaves orbax is asked to read.
    restored_keys = []
    real_restore = ocp.PyTreeCheckpointer.restore

    def spy(self, path, args):
        restored_keys.extend(f"{k}/{leaf}" for k, v in args.item.items() for leaf in v)
        return real_restore(self, path, args=args)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    loaded = load_checkpoint(tmp_path / "c", preset=config)
    assert not [k for k in restored_keys if "SigLiP" in k or "mm_" in k]
    np.testing.assert_array_equal(loaded.embedder.embedding, model.embedder.embedding)


def test_missing_path_and_non_orbax_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an orbax checkpoint"):
        load_checkpoint(tmp_path / "junk")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_checkpoint(tmp_path / "f")


def _save_flat(path, flat):
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(flat))


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_bad_leaves_are_named(tmp_path, defect):
    from gemma_eqx.formats.kaggle import kaggle_from_arrays

    config = shrink("gemma3-1b")
    flat = kaggle_from_arrays(leaf_paths(random_model(config)), config)
    if defect == "missing":
        del flat["transformer/layer_1/mlp/linear"]
        match = r"leaf transformer/layer_1/mlp/linear/w is missing \(expected shape \(64, 32\)"
    elif defect == "extra":
        flat["transformer/layer_1/attn/bonus"] = {"w": jnp.ones(3)}
        match = r"unexpected leaf transformer/layer_1/attn/bonus/w with shape \(3,\)"
    else:
        flat["transformer/layer_1/attn/q_einsum"]["w"] = jnp.ones((4, 32, 8))
        match = (r"leaf transformer/layer_1/attn/q_einsum/w has shape \(4, 32, 8\), "
                 r"expected \(4, 32, 16\)")
    _save_flat(tmp_path / "c", flat)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "c", preset=config)


def test_save_refuses_to_overwrite_and_replaces_atomically(tmp_path):
    config = shrink("gemma-2b")
    a, b = random_model(config, seed=0), random_model(config, seed=5)
    save_checkpoint(a, tmp_path / "c")
    with pytest.raises(FileExistsError):
        save_checkpoint(b, tmp_path / "c")
    save_checkpoint(b, tmp_path / "c", overwrite=True)
    loaded = load_checkpoint(tmp_path / "c", preset=config)
    np.testing.assert_array_equal(loaded.embedder.embedding,
                                  b.embedder.embedding.astype(jnp.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("rules", [DEFAULT_RULES, LAST_AXIS_RULES], ids=["default", "last"])
@pytest.mark.parametrize("preset", ["gemma-7b", "gemma3-1b"])
def test_sharded_restore_places_every_leaf_and_matches_unsharded(tmp_path, rules, preset):
    assert len(jax.devices()) == 8
    config = shrink(preset)
    model = random_model(config)
    save_checkpoint(model, tmp_path / "c", dtype=None)
    mesh = default_mesh()
    sharded = load_checkpoint(tmp_path / "c", preset=config, mesh=mesh, rules=rules)
    for path, leaf in leaf_paths(sharded).items():
        expected = leaf_sharding(path, leaf.shape, mesh, rules)
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (path, leaf.sharding)
    leaves = leaf_paths(sharded)
    if rules is LAST_AXIS_RULES:
        # The tutorial's rule: every leaf split over its last axis.
        for path, leaf in leaves.items():
            assert leaf.sharding.spec == PartitionSpec(*([None] * (leaf.ndim - 1)), "model"), path
    else:
        assert leaves["embedder.embedding"].sharding.spec == PartitionSpec("model", None)
        assert leaves["blocks.0.mlp.w_linear"].sharding.spec == PartitionSpec("model", None)
        assert leaves["blocks.0.mlp.w_gating"].sharding.spec == PartitionSpec(None, None, "model")
        assert leaves["final_norm.scale"].sharding.spec == PartitionSpec(None)
    assert len(leaves["blocks.0.mlp.w_linear"].sharding.device_set) == 8
    tokens = (jnp.arange(24, dtype=jnp.int32).reshape(2, 12) * 7) % config.vocab_size
    plain = load_checkpoint(tmp_path / "c", preset=config)
    np.testing.assert_allclose(
        eqx.filter_jit(lambda m, t: m(t))(sharded, tokens), plain(tokens), atol=1e-5
    )


def test_shard_model_in_memory_and_custom_rules():
    config = shrink("gemma3-1b")
    model = random_model(config)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = ShardingRules(axes=(("embed", "data"), ("mlp", "model")))
    sharded = shard_model(model, mesh, rules)
    leaves = leaf_paths(sharded)
    assert leaves["blocks.0.mlp.w_gating"].sharding.spec == PartitionSpec(None, "data", "model")
    assert leaves["blocks.0.attn.w_q"].sharding.spec == PartitionSpec(None, "data", None)
    assert isinstance(leaves["blocks.0.attn.w_q"].sharding, NamedSharding)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    np.testing.assert_allclose(sharded(tokens), model(tokens), atol=1e-5)


def test_undivisible_axes_stay_whole():
    # 100 is not divisible by 8 devices: the vocabulary axis stays whole.
    s = leaf_sharding("embedder.embedding", (100, 32), default_mesh())
    assert s.spec == PartitionSpec(None, None)
    s = leaf_sharding("embedder.embedding", (128, 32), default_mesh())
    assert s.spec == PartitionSpec("model", None)


# ------------------------------------------------ the same bytes as before the parameter schema


def _fixtures():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "data" / "make_kaggle_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_kaggle_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path.parent, module


def _raw(path):
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(path)


@pytest.mark.parametrize("preset", ["gemma-7b", "gemma2-2b", "gemma3-1b"])
def test_checkpoints_of_the_pre_schema_code_round_trip_byte_for_byte(tmp_path, preset):
    """tests/data/kaggle-* were saved by the code before the schema (see the script there):
    they load to the model that wrote them, and saving that model again gives byte-identical
    orbax metadata and the same bytes in every leaf (so either code reads the other's)."""
    data, fixtures = _fixtures()
    old = data / f"kaggle-{preset}"
    written = fixtures.model(preset)
    loaded = load_checkpoint(old, preset=fixtures.tiny(preset))
    for path, leaf in leaf_paths(written).items():
        np.testing.assert_array_equal(np.asarray(leaf_paths(loaded)[path]),
                                      np.asarray(leaf.astype(jnp.bfloat16)), path)
    new = save_checkpoint(written, tmp_path / "new")
    for name in ("_METADATA", "_sharding", "array_metadatas/process_0"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    before, after = _raw(old), _raw(new)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].keys() == after[key].keys(), key
        for leaf in before[key]:
            a, b = np.asarray(before[key][leaf]), np.asarray(after[key][leaf])
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{key}/{leaf}"
