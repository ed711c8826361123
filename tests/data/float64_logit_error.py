"""How far the float32 forward of the real 270M is from a float64 run of the same weights, on
the long prompt of tests/test_gguf.py (the bound behind its TOLERANCE).

    python tests/data/float64_logit_error.py
"""

import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).parent.parent))

import test_gguf  # noqa: E402
from gemma_eqx import from_pretrained  # noqa: E402

model, tokenizer = from_pretrained()
ids = [tokenizer.bos_id] + tokenizer.encode(test_gguf.PROMPTS["longer-than-window"])
tokens = jnp.asarray([ids], jnp.int32)
f32 = np.asarray(model(tokens))
f64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                             model).with_activation_dtype(jnp.float64)
error = np.abs(f32 - np.asarray(f64(tokens))).max(-1)[0]
print(f"{len(ids)} tokens: max |float32 - float64| logit {error.max():.3g}, median over "
      f"positions {np.median(error):.3g}")
