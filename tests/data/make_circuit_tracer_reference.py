"""Reference for tests/test_attribution_graph.py: circuit-tracer 0.5.0's `prune_graph` and
graph file (`benchmarks/circuit_tracer_graph.py`) on the tiny attribution graph of
`factories.tiny_attribution_graph` (random Gemma 3, random transcoders at layers 0 and 2).
Writes the graph as our code computed it and circuit-tracer's output to
`circuit_tracer_reference.npz`.

    CIRCUIT_TRACER_PYTHON=... python tests/data/make_circuit_tracer_reference.py [OUT.npz]

(run with the package's environment; circuit-tracer lives in its own, named by
CIRCUIT_TRACER_PYTHON.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from factories import tiny_attribution_graph  # noqa: E402

NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98


def graph_arrays(graph, *, slug: str, scan: str, prompt: str, prompt_pieces, logit_pieces,
                 node_threshold: float = NODE_THRESHOLD,
                 edge_threshold: float = EDGE_THRESHOLD) -> dict[str, np.ndarray]:
    """What `benchmarks/circuit_tracer_graph.py` reads, for an `AttributionGraph`."""
    return dict(adjacency=graph.adjacency.astype(np.float32), features=graph.features,
                activations=graph.activations, tokens=graph.tokens,
                logit_tokens=graph.logit_tokens,
                logit_probabilities=graph.logit_probabilities, num_layers=graph.num_layers,
                prompt_pieces=np.asarray(prompt_pieces), logit_pieces=np.asarray(logit_pieces),
                slug=slug, scan=scan, prompt=prompt, node_threshold=node_threshold,
                edge_threshold=edge_threshold)


def circuit_tracer(arrays: dict[str, np.ndarray], python: str) -> str:
    """circuit-tracer's output (JSON text) for `graph_arrays`, run by `python`."""
    with tempfile.TemporaryDirectory() as folder:
        np.savez(Path(folder) / "graph.npz", **arrays)
        subprocess.run([python, str(HERE.parents[1] / "benchmarks" / "circuit_tracer_graph.py"),
                        str(Path(folder) / "graph.npz"), str(Path(folder) / "out.json")],
                       check=True)
        return (Path(folder) / "out.json").read_text()


def main(out: Path) -> None:
    python = os.environ.get("CIRCUIT_TRACER_PYTHON")
    if not python:
        sys.exit("set CIRCUIT_TRACER_PYTHON to the python of circuit-tracer's environment")
    _, graph = tiny_attribution_graph()
    arrays = graph_arrays(graph, slug="tiny", scan="tiny-transcoders", prompt="a prompt",
                          prompt_pieces=[f"t{t}" for t in graph.tokens],
                          logit_pieces=[f"t{t}" for t in graph.logit_tokens])
    np.savez_compressed(out, **arrays, circuit_tracer=circuit_tracer(arrays, python))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "circuit_tracer_reference.npz")
