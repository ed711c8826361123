"""Training speed from cached activations: our jitted step (`interp.features.train`) against
SAELens 6.54.12's own `SAETrainer._train_step` in PyTorch, on the same activations, initial
parameters and hyperparameters (a TopK SAE; the issue's run: width 4096, k = 32, d = 640).

    python benchmarks/bench_train.py [--width 4096] [--k 32] [--batch 4096] [--steps 20]

The activations are the real 270M's `resid_post` at layer 6 on Shakespeare windows (BOS left
out), computed once here (their time is not counted). SAELens runs in the interpreter named by
SAELENS_PYTHON (a side environment with sae-lens==6.54.12); without it only ours is timed.
Prints tokens/s of each and their ratio (goal: ours >= 2x), and checks that after the timed
steps the two runs' parameters still agree (both float32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import table

SAELENS_STEPS = textwrap.dedent("""
    import json, sys, time, numpy as np, torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    torch.set_num_threads({threads})
    x = torch.tensor(np.load(sys.argv[1]))
    init = np.load(sys.argv[2])
    steps, batch = {steps}, {batch}
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae={width}, k={k},
                                                apply_b_dec_to_input=False))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.tensor(init[name]))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=batch * (steps + 1),
                                          train_batch_size_samples=batch, lr=3e-4,
                                          lr_end=3e-4), sae, data_provider=iter(()))
    trainer._train_step(sae, x[:batch])  # warm-up, as ours compiles first
    start = time.perf_counter()
    for step in range(steps):
        rows = x[(step + 1) * batch:(step + 2) * batch]
        trainer._train_step(sae, rows)
    seconds = time.perf_counter() - start
    np.save(sys.argv[3], sae.W_dec.detach().numpy())
    print(json.dumps({{"seconds": seconds}}))
""")


def activations(rows: int) -> np.ndarray:
    from gemma_eqx import from_pretrained
    from interp.corpus import read_corpus, token_windows
    from interp.features import HookPoint
    from interp.features.train import stream_activations

    model, tokenizer = from_pretrained()
    windows = token_windows(tokenizer, read_corpus("shakespeare"), 128, seed=0)
    parts, have = [], 0
    for (x,) in stream_activations(model, windows, [HookPoint("resid_post", 6)], sequences=8):
        parts.append(x)
        have += len(x)
        if have >= rows:
            break
    return np.concatenate(parts)[:rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    from interp.features import train

    x = activations(args.batch * (args.steps + 1))
    config = train.TrainConfig(architecture="topk", width=args.width, k=args.k, lr=3e-4,
                               total_steps=args.steps + 1)
    params = train.init_params(config, x.shape[1], key=jax.random.key(0))
    state = train.init_state(config, params)
    batches = [jnp.asarray(x[i * args.batch:(i + 1) * args.batch])
               for i in range(args.steps + 1)]
    state, _ = train.train_step(state, batches[0], None, config)  # compiles
    jax.block_until_ready(state)
    start = time.perf_counter()
    for step in range(args.steps):
        state, out = train.train_step(state, batches[step + 1], None, config)
        float(out.loss)  # the per-step sync `fit` makes (its NaN check)
    ours = time.perf_counter() - start
    tokens = args.steps * args.batch
    rows = [("ours (JAX, jitted step)", f"{ours:.2f}", f"{tokens / ours:,.0f}")]
    python = os.environ.get("SAELENS_PYTHON")
    if python:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "x.npy", x)
            np.savez(Path(tmp) / "init.npz", W_enc=np.asarray(params.w_enc),
                     b_enc=np.asarray(params.b_enc), W_dec=np.asarray(params.w_dec),
                     b_dec=np.asarray(params.b_dec))
            script = SAELENS_STEPS.format(threads=os.cpu_count(), steps=args.steps,
                                          batch=args.batch, width=args.width, k=args.k)
            done = subprocess.run([python, "-c", script, str(Path(tmp) / "x.npy"),
                                   str(Path(tmp) / "init.npz"), str(Path(tmp) / "w_dec.npy")],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"SAELens failed:\n{done.stderr[-3000:]}")
            theirs = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            w_dec = np.load(Path(tmp) / "w_dec.npy")
        rows.append(("SAELens 6.54.12 (torch, SAETrainer._train_step)", f"{theirs:.2f}",
                     f"{tokens / theirs:,.0f}"))
        drift = float(np.abs(w_dec - np.asarray(state.params.w_dec)).max())
        print(table(rows, ("trainer", "seconds", "tokens/s")))
        print(f"ours / SAELens: {theirs / ours:.2f}x tokens/s (goal >= 2x); decoders after "
              f"{args.steps + 1} steps differ by at most {drift:.2g}")
    else:
        print(table(rows, ("trainer", "seconds", "tokens/s")))
        print("(SAELens not measured: set SAELENS_PYTHON to an interpreter with sae-lens)")


if __name__ == "__main__":
    main()
