"""Writes tests/data/study_reference.json: the study's numbers on the real Gemma 3 270M with the
parameters of `tests/test_study.py`'s fixture (seed 0, residual map at layers 0 and 17).

The committed file was made by the code of commit b200928 (before the study was made faster),
so the test compares the faster code against the numbers it must not change:

    git worktree add /tmp/before b200928
    PYTHONPATH=/tmp/before/src python tests/data/make_study_reference.py
"""

import json
import sys
from pathlib import Path

from gemma_eqx import from_pretrained
from interp.study import run_study

model, tokenizer = from_pretrained()
result = run_study(model, tokenizer, model_name="gemma3-270m", seed=0, residual_stride=17)
numbers = {k: v for k, v in result.to_json().items() if k not in ("timings", "compilation")}
out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "study_reference.json"
out.write_text(json.dumps(numbers, indent=1))
print(f"wrote {out}")
