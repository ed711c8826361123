"""The library calls the multi-process tests compare with one process: run by every process of
a cluster (`python multihost_checks.py CHECKPOINT OUT_DIR`, under
`gemma_eqx.core.multihost.launch`), and by one process of 8 devices as the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_ARGS = ("gemma3-1b",)  # `factories.shrink` of it: sizes divisible by 8 devices
TOKENS = [[2, 17, 5, 88, 41, 17, 5, 88, 41, 17, 5, 88],
          [2, 9, 63, 12, 100, 9, 63, 12, 100, 9, 63, 12]]
CORRUPTED = [[2, 30, 71, 3, 55, 17, 5, 88, 41, 17, 5, 88],
             [2, 44, 6, 120, 7, 9, 63, 12, 100, 9, 63, 12]]


def config():
    from factories import shrink

    return shrink(*CONFIG_ARGS)


def checks(checkpoint: str | Path) -> dict:
    """Restore the Kaggle-layout checkpoint over all devices and run the library's main calls;
    every result gathered to numpy on every process (`multihost.to_host`)."""
    import interp
    from gemma_eqx import generate, load_checkpoint
    from gemma_eqx.core.multihost import to_host
    from gemma_eqx.model.weights import leaf_paths
    from gemma_eqx.parallel.sharding import default_mesh, leaf_sharding
    from interp import patching

    mesh = default_mesh()
    model = load_checkpoint(checkpoint, preset=config(), mesh=mesh, dtype=jnp.float32)
    out: dict = {"processes": jax.process_count(), "devices": jax.device_count()}
    local = set(jax.local_devices())
    wrong, held = [], {}
    for path, leaf in leaf_paths(model).items():
        if leaf.sharding != leaf_sharding(path, leaf.shape, mesh):
            wrong.append(path)
        shards = leaf.addressable_shards
        assert {s.device for s in shards} <= local
        # What this process holds: each local shard's index and data sum.
        held[path] = sorted([[(sl.start or 0) for sl in s.index], float(np.asarray(s.data,
                            np.float64).sum())] for s in shards if s.replica_id == 0)
    out["wrong_sharding"] = wrong
    out["held"] = held
    tokens, corrupted = jnp.asarray(TOKENS, jnp.int32), jnp.asarray(CORRUPTED, jnp.int32)
    out["logits"] = to_host(model(tokens))
    out["generated"] = to_host(generate(model, tokens, max_new_tokens=6))
    out["patterns"] = to_host(interp.attention_patterns(model, tokens))
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, 6:] = True
    sweep = interp.knockout_sweep(model, tokens, interp.single_head_masks(model), eval_mask)
    out["knockout_logprob"] = to_host(sweep.logprob)
    mask = jnp.ones((model.config.num_layers, model.config.num_heads))
    out["attribution"] = to_host(interp.attribution_gradient(model, tokens, eval_mask, mask))
    metric = patching.mean_logprob([5, 88, 41], [5, 6, 7])
    patched = patching.activation_patching(model, corrupted, tokens, "head_out", metric,
                                           per="layer_head")
    out["patching"] = np.asarray(patched.values)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}


if __name__ == "__main__":
    from gemma_eqx.core import multihost

    multihost.initialize()
    result = checks(sys.argv[1])
    target = Path(sys.argv[2]) / f"process-{jax.process_index()}.json"
    target.write_text(json.dumps(result))
