"""The issue's real training runs, ours against SAELens on the same activations:

- a TopK SAE (width 4096, k = 32) on the 270M's `resid_post` at layer 6;
- a JumpReLU transcoder (width 4096) from layer 6's `mlp_in` to its `mlp_out_normed`;

each on >= 2 M training tokens of the default corpus (Shakespeare, windows of 128), two seeds
each, evaluated on the held-out split with `interp.features.evaluate` (L0, explained variance,
CE loss recovered, dead fraction), and the training tokens/s of both trainers.

    python benchmarks/bench_train_run.py --cache DIR [--tokens 2000000] [--seeds 0 1]
        [--runs topk transcoder] [--eval-windows 128] [--json OUT] [--save DIR]

The activations are cached once in DIR (`interp.features.activations`, ~17 GB for 2.2 M rows of
three points); a rerun reuses them (the forward's time printed is the cache's own run).
Both trainers then read the same rows in the same order (our shuffle buffer's), start from the
same parameters (ours, `initial_state`) and use the same hyperparameters; inputs are
normalised to mean norm sqrt(d) (SAELens' `expected_average_only_in`, the factor folded into
the weights at the end). SAELens 6.54.12 (`SAELENS_PYTHON`) drives its own
`SAETrainer._train_step`; it trains no transcoders, so for the transcoder its JumpReLU
training SAE takes its MSE against the MLP's output instead of its input (one function
swapped; every other term is its own). tokens/s counts the training step alone for both
(ours: `fit`'s `seconds_step`, which includes the per-step sync; SAELens: its `_train_step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from common import table

SAELENS_RUN = textwrap.dedent("""
    import json, sys, time, numpy as np, torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    torch.set_num_threads({threads})
    spec = json.loads(open(sys.argv[1]).read())
    x_all = np.load(spec["x"], mmap_mode="r")
    t_all = np.load(spec["target"], mmap_mode="r")
    order = np.load(spec["order"])
    init = np.load(spec["init"])
    c = spec["config"]
    if c["architecture"] == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE as S, TopKTrainingSAEConfig as C
        sae = S(C(d_in=x_all.shape[1], d_sae=c["width"], k=c["k"],
                  aux_loss_coefficient=c["aux_coefficient"], apply_b_dec_to_input=False))
    else:
        from sae_lens.saes.jumprelu_sae import (JumpReLUTrainingSAE as S,
                                                JumpReLUTrainingSAEConfig as C)
        sae = S(C(d_in=x_all.shape[1], d_sae=c["width"], l0_coefficient=c["l0_coefficient"],
                  l0_warm_up_steps=c["sparsity_warm_up_steps"],
                  jumprelu_bandwidth=c["jumprelu_bandwidth"],
                  jumprelu_init_threshold=c["jumprelu_init_threshold"],
                  apply_b_dec_to_input=False))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.tensor(init[name]))
    holder = {{}}
    if spec["transcoder"]:  # its MSE against the target rows, not the input
        mse = sae.mse_loss_fn
        sae.mse_loss_fn = lambda out, sae_in: mse(out, holder["target"])
    steps, batch = len(order), order.shape[1]
    trainer = SAETrainer(SAETrainerConfig(
        total_training_samples=batch * steps, train_batch_size_samples=batch, lr=c["lr"],
        lr_end=c["lr"],  # its constant schedule ignores lr_end: the decay runs from lr to 0
        lr_warm_up_steps=c["lr_warm_up_steps"], lr_decay_steps=c["lr_decay_steps"],
        dead_feature_window=c["dead_feature_window"]), sae, data_provider=iter(()))
    seconds = 0.0
    for step in range(steps):
        rows = np.sort(order[step])  # reading in file order is faster; the rows are the same
        keep = np.argsort(np.argsort(order[step]))
        x = torch.from_numpy(np.asarray(x_all[rows])[keep] * spec["input_scale"])
        holder["target"] = torch.from_numpy(np.asarray(t_all[rows])[keep]
                                            * spec["target_scale"])
        start = time.perf_counter()
        out = trainer._train_step(sae, x)
        trainer.n_training_steps += 1
        seconds += time.perf_counter() - start
        if not torch.isfinite(out.loss):
            sys.exit(f"SAELens' loss is {{float(out.loss)}} at step {{step}}")
    np.savez(spec["out"], **{{n: p.detach().numpy() for n, p in sae.named_parameters()}})
    print(json.dumps({{"seconds_step": seconds}}))
""")


def batch_order(cache, batch_rows: int, buffer_rows: int, seed: int, steps: int):
    """The row indices of each of `fit`'s batches (our shuffle buffer run on row numbers: its
    permutations depend only on the row counts), and of the sample `initial_state` saw."""
    from interp.features.train import ShuffleBuffer

    size = int(cache.meta["rows_per_batch"])
    stream = ((np.arange(b * size, (b + 1) * size),) for b in range(cache.meta["batches"]))
    buffer = ShuffleBuffer(stream, max(buffer_rows, 2 * batch_rows), seed)
    first = buffer.next_batch(batch_rows)
    sample = buffer.held[0] if buffer.held and len(buffer.held[0]) else first[0]
    order = [first[0]] + [buffer.next_batch(batch_rows)[0] for _ in range(steps - 1)]
    return np.stack(order), sample.copy()


def run(name, spec, cache, model, tokenizer, windows, args, seed, python):
    from interp.features import evaluate
    from interp.features.train import TrainParams, fit, initial_state, to_dictionary

    config, reads, writes = spec["config"], spec["reads"], spec["writes"]
    transcoder = writes != reads
    start = time.perf_counter()
    state, log = fit(None, cache, reads, config, writes=writes if transcoder else None,
                     batch_rows=args.batch_rows, buffer_rows=args.buffer_rows, seed=seed,
                     show_progress=False)
    seconds = time.perf_counter() - start
    held = windows.held_out[:args.eval_windows]
    batches = [held[i:i + 8] for i in range(0, len(held) - 7, 8)]
    ignore = [tokenizer.bos_id]
    results = {}

    def metrics(trained):
        dictionary = to_dictionary(trained, config, reads, writes)
        m = evaluate(model, dictionary, batches, ignore_tokens=ignore)
        return {"l0": m.l0, "explained_variance": m.explained_variance,
                "ce_loss_recovered": m.ce_loss_recovered,
                "dead_fraction_held_out": m.dead / config.width}

    tokens = config.total_steps * args.batch_rows
    if args.save and seed == args.seeds[0]:
        from interp.features.load import save_gemma_scope_2

        save_gemma_scope_2(to_dictionary(state, config, reads, writes, name=name,
                                         model_name="gemma3-270m"),
                           Path(args.save) / name,
                           extra={"training": dataclasses.asdict(config)})
    results["ours"] = {**metrics(state), "tokens": tokens, "seconds": seconds,
                       "seconds_step": log.seconds_step, "seconds_read": log.seconds_model,
                       "tokens_per_s_step": tokens / log.seconds_step}
    if python:
        order, sample_rows = batch_order(cache, args.batch_rows, args.buffer_rows, seed,
                                         config.total_steps)
        points = [reads, writes] if transcoder else [reads]
        sample = tuple(np.asarray(cache.arrays[p][np.sort(sample_rows)]) for p in points)
        init = initial_state(config, sample, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            np.save(tmp / "order.npy", order)
            p = init.params
            arrays = {"W_enc": p.w_enc, "b_enc": p.b_enc, "W_dec": p.w_dec, "b_dec": p.b_dec}
            if p.threshold is not None:
                arrays["threshold"] = p.threshold
            np.savez(tmp / "init.npz", **{k: np.asarray(v) for k, v in arrays.items()})
            from interp.features.activations import point_file
            (tmp / "spec.json").write_text(json.dumps({
                "x": str(cache.folder / point_file(reads)),
                "target": str(cache.folder / point_file(writes)), "order": str(tmp / "order.npy"),
                "init": str(tmp / "init.npz"), "out": str(tmp / "out.npz"),
                "config": dataclasses.asdict(config), "transcoder": transcoder,
                "input_scale": float(init.input_scale), "target_scale": float(init.target_scale)}))
            start = time.perf_counter()
            done = subprocess.run([python, "-c", SAELENS_RUN.format(threads=os.cpu_count()),
                                   str(tmp / "spec.json")], capture_output=True, text=True)
            theirs_seconds = time.perf_counter() - start
            if done.returncode:
                sys.exit(f"SAELens failed:\n{done.stderr[-3000:]}")
            step_seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds_step"]
            out = np.load(tmp / "out.npz")
            threshold = jnp.asarray(out["threshold"]) if "threshold" in out else None
            params = TrainParams(jnp.asarray(out["W_enc"]), jnp.asarray(out["b_enc"]),
                                 jnp.asarray(out["W_dec"]), jnp.asarray(out["b_dec"]),
                                 threshold)
        trained = eqx.tree_at(lambda s: s.params, init, params)
        results["saelens"] = {**metrics(trained), "tokens": tokens, "seconds": theirs_seconds,
                              "seconds_step": step_seconds,
                              "tokens_per_s_step": tokens / step_seconds}
    return results


def main(argv=None) -> None:
    from gemma_eqx import from_pretrained
    from interp.corpus import read_corpus, token_windows
    from interp.features import HookPoint
    from interp.features.activations import write_activation_cache
    from interp.features.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="the activation cache's folder")
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--cache-rows", type=int, default=2_200_000)
    p.add_argument("--batch-rows", type=int, default=4096)
    p.add_argument("--buffer-rows", type=int, default=2**17)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", nargs="+", default=["topk", "transcoder"])
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write our first seed's dictionaries here (DIR/topk, DIR/transcoder)")
    args = p.parse_args(argv)
    steps = -(-args.tokens // args.batch_rows)
    configs = Path(__file__).with_name("configs")  # what `gemma-eqx features train --config` reads

    def config(name: str) -> TrainConfig:
        return TrainConfig(**json.loads((configs / f"{name}.json").read_text()),
                           total_steps=steps)

    specs = {
        "topk": dict(reads=HookPoint("resid_post", 6), writes=HookPoint("resid_post", 6),
                     config=config("topk_resid_post_6")),
        # JumpReLU's threshold starts where about 1% fire: Adam moves it about lr a step, and a
        # short run cannot walk it far.
        "transcoder": dict(reads=HookPoint("mlp_in", 6), writes=HookPoint("mlp_out_normed", 6),
                           config=config("jumprelu_transcoder_6")),
    }
    model, tokenizer = from_pretrained()
    windows = token_windows(tokenizer, read_corpus("shakespeare"), 128, seed=0)
    start = time.perf_counter()
    points = [HookPoint("resid_post", 6), HookPoint("mlp_in", 6), HookPoint("mlp_out_normed", 6)]
    cache = write_activation_cache(model, windows, points, args.cache, rows=args.cache_rows)
    print(f"activation cache {args.cache}: {cache.rows:,} rows of {len(points)} points "
          f"({time.perf_counter() - start:.0f} s this run)")
    # The forward a streamed run pays per row (the cache's own run may have shared the
    # machine): measured here on 32 passes after the compile.
    from interp.features.train import stream_activations

    stream = stream_activations(model, windows, points, sequences=8)
    next(stream)
    start, rows = time.perf_counter(), 0
    for _ in range(32):
        rows += len(next(stream)[0])
    forward_rate = rows / (time.perf_counter() - start)
    print(f"the model's forward to layer 6: {forward_rate:,.0f} tokens/s")
    python = os.environ.get("SAELENS_PYTHON")
    figures = {"forward_tokens_per_s": forward_rate}
    for name in args.runs:
        for seed in args.seeds:
            figures[f"{name}/seed{seed}"] = run(name, specs[name], cache, model, tokenizer,
                                                windows, args, seed, python)
            print(name, seed, json.dumps(figures[f"{name}/seed{seed}"]), flush=True)
    rows = []
    for key, results in figures.items():
        if key == "forward_tokens_per_s":
            continue
        for trainer, m in results.items():
            rows.append((key, trainer, f"{m['l0']:.1f}", f"{m['explained_variance']:.3f}",
                         f"{m['ce_loss_recovered']:.3f}", f"{m['dead_fraction_held_out']:.3f}",
                         f"{m['tokens_per_s_step']:,.0f}"))
    print(table(rows, ("run", "trainer", "L0", "explained var", "CE recovered", "dead",
                       "step tokens/s")))
    for name in args.runs:
        ours = [figures[f"{name}/seed{s}"]["ours"]["tokens_per_s_step"] for s in args.seeds]
        if python:
            theirs = [figures[f"{name}/seed{s}"]["saelens"]["tokens_per_s_step"]
                      for s in args.seeds]
            print(f"{name}: ours / SAELens tokens/s {np.mean(ours) / np.mean(theirs):.2f}x "
                  f"(goal >= 2x)")
        first = figures[f"{name}/seed{args.seeds[0]}"]["ours"]
        forward = first["tokens"] / forward_rate
        print(f"{name}: a streamed run of {first['tokens']:,} tokens: the model's forward "
              f"{forward:.0f} s + the dictionary's steps {first['seconds_step']:.0f} s "
              f"({100 * forward / (forward + first['seconds_step']):.0f}% forward)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": figures}, indent=1))


if __name__ == "__main__":
    main()
