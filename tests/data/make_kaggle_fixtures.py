"""Writes tests/data/kaggle-*: tiny Kaggle-layout checkpoints.

The committed ones were written by the `save_checkpoint` of commit cd3b7b0, before the
parameter schema (`gemma_eqx.params`) existed; tests/test_checkpoint.py checks that today's
code reads them and writes the same models with byte-identical metadata and leaf bytes.
Run from the repository root: python tests/data/make_kaggle_fixtures.py
"""

import jax

import gemma_eqx
from gemma_eqx.formats.kaggle import save_checkpoint

PRESETS = ("gemma-7b", "gemma2-2b", "gemma3-1b")  # fused qkv; q + kv; q + kv, QK-norm, (2, F, D)


def tiny(preset: str) -> gemma_eqx.GemmaConfig:
    base = gemma_eqx.get_preset(preset)
    multi = base.num_kv_heads == base.num_heads
    return base.replace(
        name=f"tiny-{preset}", num_layers=2, attention_kinds=(base.attention_kinds * 10)[:2],
        embed_dim=16, hidden_dim=24, head_dim=8, vocab_size=32, num_heads=4,
        num_kv_heads=4 if multi else 2, sliding_window=4 if base.sliding_window else None,
    )


def model(preset: str) -> gemma_eqx.Transformer:
    seed = PRESETS.index(preset)
    m = gemma_eqx.Transformer(tiny(preset), key=jax.random.key(seed))
    return jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape, x.dtype)
        if x.ndim == 1 else x, m)


if __name__ == "__main__":
    for preset in PRESETS:
        save_checkpoint(model(preset), f"tests/data/kaggle-{preset}", overwrite=True)
