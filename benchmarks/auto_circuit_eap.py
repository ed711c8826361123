"""auto-circuit 1.0.1's edge attribution patching on the GPT-2-shaped model and task that
`bench_vs_auto_circuit.py` saved, in a side environment (auto-circuit needs TransformerLens 2,
torch; none of them is a dependency of gemma-eqx):

    python -m venv ac && ac/bin/pip install -c c.txt auto-circuit "transformer-lens<3"
    ac/bin/python benchmarks/auto_circuit_eap.py FOLDER OUT.json     # c.txt: torch==2.13.0

The HF model is loaded into a TransformerLens `HookedTransformer` (no weight processing, so
its logits are the HF model's), wrapped by `patchable_model` (factorized, separate q/k/v
inputs, the last position's output), and scored by `mask_gradient_prune_scores` with the
log-prob of each prompt's answer at mask 0: EAP's gradient. Writes every edge's score with
auto-circuit's node names, the cold and warm seconds, and the HF-vs-TL logit difference.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch as t


def main(folder: Path, out: Path) -> None:
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    t.set_grad_enabled(True)
    task = np.load(folder / "task.npz")
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
        normalization_type="LN", positional_embedding_type="standard", eps=c.layer_norm_epsilon)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    clean, corrupt = (t.tensor(task[k], dtype=t.long) for k in ("clean", "corrupted"))
    answers = t.tensor(task["answers"], dtype=t.long)
    with t.no_grad():
        difference = float((model(clean) - hf(clean).logits).abs().max())
    dataset = PromptDataset(clean, corrupt, [a[None] for a in answers],
                            [(a + 1)[None] for a in answers])
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(clean),
                              shuffle=False)
    patchable = patchable_model(model, factorized=True, slice_output="last_seq",
                                separate_qkv=True, device=t.device("cpu"))
    seconds = []
    for _ in range(2):  # cold, warm
        start = time.perf_counter()
        scores = mask_gradient_prune_scores(patchable, loader, None, grad_function="logprob",
                                            answer_function="avg_val", mask_val=0.0)
        seconds.append(time.perf_counter() - start)
    edges = [[e.src.name, e.dest.name, float(e.prune_score(scores))]
             for e in sorted(patchable.edges, key=lambda e: (e.dest.name, e.src.name))]
    out.write_text(json.dumps({"edges": edges, "seconds_cold": seconds[0],
                               "seconds_warm": seconds[1], "hf_vs_tl_logits": difference,
                               "threads": t.get_num_threads()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
