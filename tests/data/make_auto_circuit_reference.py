"""Reference for tests/test_circuits.py: auto-circuit 1.0.1's edge attribution patching
(`mask_gradient_prune_scores`, log-prob of the answer at the last position, mask 0) on a tiny
transformers GPT-2 with random weights (2 layers, 4 heads, embed 32, vocabulary 61, torch seed
0, biases and LayerNorms random too), loaded into TransformerLens 2 unprocessed. Writes the
weights, the task and every edge's score (auto-circuit's names) to
`auto_circuit_reference.npz`.

    $AUTO_CIRCUIT_PYTHON tests/data/make_auto_circuit_reference.py [OUT.npz]

(auto-circuit lives in its own virtual environment, as `benchmarks/auto_circuit_eap.py` says.)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from auto_circuit_eap import main as auto_circuit_eap  # noqa: E402

CONFIG = dict(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def main(out: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            std = 0.3 if p.ndim == 1 else p.shape[0] ** -0.5
            p.copy_(torch.randn(p.shape, generator=generator) * std
                    + (1.0 if "ln" in name and "weight" in name else 0.0))
    rng = np.random.default_rng(0)
    clean, corrupted = rng.integers(0, 61, (2, 3, 10))
    answers = rng.integers(0, 61, 3)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        np.savez(Path(folder) / "task.npz", clean=clean, corrupted=corrupted, answers=answers)
        auto_circuit_eap(Path(folder), Path(folder) / "scores.json")
        result = json.loads((Path(folder) / "scores.json").read_text())
    state = {f"weight:{k}": v.detach().numpy() for k, v in hf.state_dict().items()
             if not k.endswith(".attn.bias") and not k.endswith("masked_bias")}
    np.savez_compressed(
        out, clean=clean, corrupted=corrupted, answers=answers,
        sources=np.asarray([e[0] for e in result["edges"]]),
        destinations=np.asarray([e[1] for e in result["edges"]]),
        scores=np.asarray([e[2] for e in result["edges"]]),
        hf_vs_tl_logits=result["hf_vs_tl_logits"], config=json.dumps(CONFIG), **state)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else
         Path(__file__).parent / "auto_circuit_reference.npz")
