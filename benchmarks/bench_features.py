"""Sparse dictionaries on the real Gemma 3 270M, measured in one run:

1. the forward with one 16k-latent JumpReLU SAE spliced at resid_post of layer 6, against
   the plain forward, at 41 and 512 tokens (goal: splicing costs at most 10% of the forward):
   spliced with the error term and untouched, with its features recorded, with them edited,
   and without the error term;
2. evaluation throughput on the same activations (encode, decode and the per-token metrics,
   tokens/s): ours (jitted) against SAELens 6.x in PyTorch, run by the interpreter named in
   SAELENS_PYTHON (a side environment with sae-lens==6.54.12; skipped without it).

    python benchmarks/bench_features.py [--width 16384] [--eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import table, timed

SAELENS_TIMING = textwrap.dedent("""
    import json, sys, time, numpy as np, torch
    from sae_lens import SAE
    torch.set_num_threads({threads})
    sae = SAE.load_from_disk(sys.argv[1])
    x = torch.tensor(np.load(sys.argv[2]))
    def run():
        with torch.no_grad():
            f = sae.encode(x)
            out = sae.decode(f)
            l0 = (f != 0).sum(-1).float().mean()
            mse = (x - out).pow(2).sum(-1).mean()
            cos = torch.nn.functional.cosine_similarity(x, out, dim=-1).mean()
        return float(l0 + mse + cos)
    run()
    times = []
    for _ in range(5):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    print(json.dumps(sorted(times)[2]))
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()

    import interp
    from gemma_eqx.formats.pretrained import from_pretrained
    from gemma_eqx.model.sites import feature_site
    from interp.features import HookPoint, SparseDictionary, splice
    from interp.interventions import Record

    model, tokenizer = from_pretrained()
    d, width = model.config.embed_dim, args.width
    rng = np.random.default_rng(0)
    point = HookPoint("resid_post", args.layer)
    # Random weights, thresholds set so that about 64 latents fire per token (Gemma Scope's
    # "medium" L0 range): the cost of dense encoding and decoding does not depend on them.
    w_enc = rng.normal(size=(d, width)).astype(np.float32) * d ** -0.5
    sample = rng.normal(size=(1024, d)).astype(np.float32) * 3
    threshold = np.quantile(sample @ w_enc, 1 - 64 / width, axis=0).astype(np.float32)
    sae = SparseDictionary(
        jnp.asarray(w_enc), jnp.zeros(width),
        jnp.asarray(rng.normal(size=(width, d)) * 0.05, jnp.float32), jnp.zeros(d),
        jnp.asarray(threshold), None, "jumprelu", None, point, point)
    forward = jax.jit(_logits_and_records)
    site = feature_site("resid_post")
    spliced = splice(model, sae)
    variants = {
        # nothing bound to the features: the error term makes the site x, nothing is computed
        "spliced": spliced,
        # what a user does: the features recorded (the encoder runs)
        "features recorded": interp.add_interventions(spliced, {args.layer: Record(site)}),
        # an edit (by 1): the encoder and one decoder matmul run
        "features edited": interp.scale(spliced, site, 1.0, layers=[args.layer]),
        # the model on the reconstruction alone (no error term)
        "no error term": splice(model, sae, error=False),
    }
    rows, results = [], {"width": width, "layer": args.layer}
    for length in (41, 512):
        t = jnp.asarray(rng.integers(2, model.config.vocab_size, (1, length)))
        plain = timed(lambda t=t: forward(model, t), repeats=7)
        results[str(length)] = {"plain": plain}
        row = [str(length), f"{plain * 1e3:.1f}"]
        for name, m in variants.items():
            seconds = timed(lambda t=t, m=m: forward(m, t), repeats=7)
            results[str(length)][name] = seconds
            row.append(f"{seconds / plain - 1:+.1%}")
        rows.append(tuple(row))
    print(f"forward with one {width}-latent SAE at resid_post {args.layer} (median of 7): "
          f"overhead against the plain forward")
    print(table(rows, ("tokens", "plain ms", *variants)))

    # Evaluation throughput on the same activations.
    x = rng.normal(size=(args.eval_tokens, d)).astype(np.float32) * 3

    @jax.jit
    def evaluate(dictionary, x):
        f = dictionary.encode(x)
        out = dictionary.decode(f, x)
        l0 = (f != 0).sum(-1).mean()
        mse = ((x - out) ** 2).sum(-1).mean()
        cos = ((x * out).sum(-1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(out, axis=-1)))
        return l0 + mse + cos.mean()

    ours = timed(lambda: evaluate(sae, jnp.asarray(x)), repeats=5)
    results["eval_tokens_per_s"] = {"ours": args.eval_tokens / ours}
    line = [("gemma-eqx (jit)", f"{args.eval_tokens / ours:,.0f}", "")]
    python = os.environ.get("SAELENS_PYTHON")
    if python:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "sae"
            _save_saelens(sae, folder, args.layer)
            np.save(Path(tmp) / "x.npy", x)
            script = SAELENS_TIMING.format(threads=os.cpu_count())
            done = subprocess.run([python, "-c", script, str(folder), str(Path(tmp) / "x.npy")],
                                  capture_output=True, text=True, check=True)
            theirs = json.loads(done.stdout.strip().splitlines()[-1])
        results["eval_tokens_per_s"]["saelens"] = args.eval_tokens / theirs
        line.append(("SAELens 6.x (torch)", f"{args.eval_tokens / theirs:,.0f}",
                     f"ours {theirs / ours:.2f}x faster"))
    print(f"\nevaluation of {args.eval_tokens} activations (encode, decode, L0, MSE, cosine)")
    print(table(line, ("implementation", "tokens/s", "ratio")))
    if not python:
        print("(SAELens not measured: set SAELENS_PYTHON to an interpreter with sae-lens)")
    out = Path(__file__).parent / "results" / "features.json"
    out.write_text(json.dumps({**results, "machine": f"{os.cpu_count()} cores, "
                               f"{jax.devices()[0].platform}"}, indent=1) + "\n")


def _logits_and_records(model, tokens):
    out = model.forward(tokens, check_ids=False)
    return out.logits, out.records


def _save_saelens(sae, folder: Path, layer: int) -> None:
    """The dictionary in SAELens' saved layout (what `interp.features.load_saelens` reads)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    save_file({"W_enc": np.asarray(sae.w_enc), "b_enc": np.asarray(sae.b_enc),
               "W_dec": np.asarray(sae.w_dec), "b_dec": np.asarray(sae.b_dec),
               "threshold": np.asarray(sae.threshold)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": sae.d_in, "d_sae": sae.width, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}))


if __name__ == "__main__":
    sys.exit(main())
