"""Throughput on a device mesh: prefill, decode and train steps of any preset, with analytic
FLOP and byte counts, per-device peaks, model FLOPs utilisation and rooflines.

`benchmarks/bench_throughput.py` is the command line over this module. Everything here also
works on abstract inputs (`jax.ShapeDtypeStruct` with shardings): `plan` lowers and compiles a
step without allocating a parameter, which is how a 27B run is sized on a machine that could
not hold it.

FLOPs count matmuls (2 per multiply-add) as the program computes them: every query against
every key of its sequence or cache (a sliding window is a mask, not fewer products), logits at
the rows the step reads out. A train step is three forwards (the backward pass is two).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, DTypeLike, Float, Int, PRNGKeyArray

from ..core.config import GemmaConfig
from ..core.multihost import to_host
from ..model.generate import _decode_step, _prefill, cache_slots, init_cache
from ..model.modules import LayerCache, Transformer
from ..model.scanned import ScannedTransformer, scan_layers, scanned_paths, unscan_layers
from ..model.weights import abstract_model, map_leaves_with_path
from .sharding import ShardingRules, leaf_sharding

MODES = ("prefill", "decode", "train")


# ------------------------------------------------------------------------------ the hardware


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """One accelerator's dense bf16 matmul peak (FLOP/s), memory bandwidth (bytes/s) and
    memory (bytes), from its vendor's data sheet."""

    name: str
    flops: float
    bandwidth: float
    memory: int


# Matched against `jax.Device.device_kind` (first hit wins, so the longer names come first).
DEVICE_PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    ("TPU v6 lite", DevicePeak("TPU v6e", 918e12, 1640e9, 32 * 2**30)),
    ("TPU v6e", DevicePeak("TPU v6e", 918e12, 1640e9, 32 * 2**30)),
    ("TPU v5 lite", DevicePeak("TPU v5e", 197e12, 819e9, 16 * 2**30)),
    ("TPU v5e", DevicePeak("TPU v5e", 197e12, 819e9, 16 * 2**30)),
    ("TPU v5p", DevicePeak("TPU v5p", 459e12, 2765e9, 95 * 2**30)),
    ("TPU v5", DevicePeak("TPU v5p", 459e12, 2765e9, 95 * 2**30)),
    ("TPU v4", DevicePeak("TPU v4", 275e12, 1200e9, 32 * 2**30)),
    ("H200", DevicePeak("H200", 989e12, 4800e9, 141 * 2**30)),
    ("H100", DevicePeak("H100 SXM", 989e12, 3350e9, 80 * 2**30)),
    ("A100", DevicePeak("A100 SXM 80GB", 312e12, 2039e9, 80 * 2**30)),
)


def _words(name: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", name.lower())
    return words[1:] if words[:1] == ["tpu"] else words


def device_peak(kind: str) -> DevicePeak | None:
    """The table's entry for a device kind: `jax.Device.device_kind` (`"TPU v5 lite"`,
    `"NVIDIA H100 80GB HBM3"`) or a short name (`v5e`, `h100`). A name matches when the words
    of a table entry appear in it, whole and in order (`h` matches nothing); None for a kind
    not in the table (a CPU: measure it)."""
    words = _words(kind)
    for key, peak in DEVICE_PEAKS:
        for name in (key, peak.name):
            want = _words(name)
            if any(words[i:i + len(want)] == want for i in range(len(words))):
                return peak
    return None


DEVICE_KINDS = ("v4", "v5e", "v5p", "v6e", "a100", "h100", "h200")  # short names for the CLI


def measure_host_peak(dtype: DTypeLike = jnp.float32) -> DevicePeak:
    """This host's matmul peak in `dtype` (best of square matmuls) and copy bandwidth (read +
    write of 256 MiB), measured now: the CPU's line of the table."""
    peak = 0.0
    square = jax.jit(lambda a: a @ a)
    for n in (1024, 2048):
        a = jnp.ones((n, n), dtype)
        jax.block_until_ready(square(a))
        best = min(_seconds(lambda a=a: square(a)) for _ in range(3))
        peak = max(peak, 2 * n**3 / best)
    src = np.ones(2**26, np.float32)
    dst = np.empty_like(src)
    copy = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(5))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DevicePeak("cpu (measured)", peak, 2 * src.nbytes / copy, int(memory))


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def parse_mesh(text: str, devices: Any = None) -> Mesh:
    """A mesh with axes `data` and `model` from `"data=2,model=4"` (an axis left out has size
    1; `"model=-1"` takes every remaining device) over `devices` (default: all of them).
    Every refusal is one sentence naming the part of `text` at fault."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": 1, "model": 1}
    given: set[str] = set()
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ValueError(f"mesh {text!r}: expected axes data=N,model=M")
    for part in parts:
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in sizes or not sep or not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"mesh {text!r}: expected axes data=N,model=M; got {part!r}")
        if name in given:
            raise ValueError(f"mesh {text!r}: axis {name} is given twice")
        given.add(name)
        sizes[name] = int(value)
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh {text!r}: axis {name} must have a positive size (or -1 "
                             f"for the remaining devices); got {sizes[name]}")
    free = [n for n, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {text!r}: only one axis may be -1")
    if free:
        rest = math.prod(size for size in sizes.values() if size != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh {text!r}: {len(devices)} devices do not split into "
                             f"{free[0]} x {rest}")
        sizes[free[0]] = len(devices) // rest
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {text!r} has {math.prod(sizes.values())} devices; there are "
                         f"{len(devices)} ({devices[0].device_kind})")
    grid = np.asarray(devices).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, ("data", "model"))


# ------------------------------------------------------------------------------ the counts


def _layer_flops(config: GemmaConfig, tokens: int, keys: int) -> int:
    d, n, kv, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    projections = 2 * tokens * d * h * (2 * n + 2 * kv)  # q and o, k and v
    attention = 2 * 2 * tokens * keys * n * h  # scores, then the mix of values
    mlp = 2 * tokens * 3 * d * config.hidden_dim
    return projections + attention + mlp


def forward_flops(
    config: GemmaConfig, batch: int, seq: int, *, logits: int | None = None
) -> int:
    """A forward over `batch x seq` tokens, logits at `logits` rows per sequence (default:
    every position)."""
    rows = seq if logits is None else logits
    layers = config.num_layers * _layer_flops(config, seq, seq)
    return batch * (layers + 2 * rows * config.embed_dim * config.vocab_size)


def decode_keys(config: GemmaConfig, layer: int, cache_length: int, *, ring: bool = True) -> int:
    """Keys one decode step of `layer` attends over: the cache, or a ring and the new token."""
    slots = cache_slots(config, layer, cache_length, ring=ring)
    return slots if slots == cache_length else slots + 1


def decode_flops(config: GemmaConfig, batch: int, cache_length: int, *, ring: bool = True) -> int:
    """One decode step: one token per sequence against a cache of `cache_length` slots."""
    layers = sum(_layer_flops(config, 1, decode_keys(config, i, cache_length, ring=ring))
                 for i in range(config.num_layers))
    return batch * (layers + 2 * config.embed_dim * config.vocab_size)


def train_flops(config: GemmaConfig, batch: int, seq: int) -> int:
    """Loss, gradient (twice the forward) and update (negligible) over `batch x seq`."""
    return 3 * forward_flops(config, batch, seq)


def param_count(config: GemmaConfig) -> int:
    leaves = jax.tree_util.tree_leaves(abstract_model(config))
    return int(sum(math.prod(x.shape) for x in leaves))


def cache_bytes(config: GemmaConfig, batch: int, cache_length: int, dtype: DTypeLike, *,
                ring: bool = True) -> int:
    """Keys and values a decode step reads: every layer's cache (a ring's window)."""
    slots = sum(cache_slots(config, i, cache_length, ring=ring) for i in range(config.num_layers))
    per_slot = 2 * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return batch * slots * per_slot


# ------------------------------------------------------------------------------ the model


def _abstract(config: GemmaConfig, dtype: DTypeLike, scan: bool, remat: bool = False) -> Any:
    model = abstract_model(config, dtype)
    return eqx.filter_eval_shape(lambda m: scan_layers(m, remat=remat), model) if scan else model


def _shardings(config: GemmaConfig, mesh: Mesh, rules: ShardingRules | None,
               dtype: DTypeLike, scan: bool = False, remat: bool = False) -> Any:
    abstract = _abstract(config, dtype, scan, remat)
    if not scan:
        return map_leaves_with_path(lambda p, x: leaf_sharding(p, x.shape, mesh, rules),
                                    abstract)
    # A stacked leaf is split like the layer it stands for, its leading (layer) axis whole.
    stands_for = scanned_paths(abstract)

    def sharding(path, x):
        layer_path, stacked = stands_for[path]
        shape = x.shape[1:] if stacked else x.shape
        spec = leaf_sharding(layer_path, shape, mesh, rules).spec
        return NamedSharding(mesh, PartitionSpec(None, *spec) if stacked else spec)

    return map_leaves_with_path(sharding, abstract)


def random_model(
    config: GemmaConfig,
    mesh: Mesh,
    *,
    rules: ShardingRules | None = None,
    dtype: DTypeLike = jnp.bfloat16,
    key: PRNGKeyArray | None = None,
    scan: bool = False,
    remat: bool = False,
) -> Transformer | ScannedTransformer:
    """Random weights created on the devices, each leaf directly in its rule's sharding (no
    host copy: each device draws its own shard); with `scan`, as a `ScannedTransformer`."""
    key = jax.random.key(0) if key is None else key
    shardings = _shardings(config, mesh, rules, dtype, scan, remat)
    params_shardings, _ = eqx.partition(shardings, lambda x: isinstance(x, NamedSharding))
    _, static = eqx.partition(_abstract(config, dtype, scan, remat),
                              lambda x: isinstance(x, jax.ShapeDtypeStruct))

    @jax.jit
    def init(key):
        model = Transformer(config, key=key, dtype=dtype)
        params, _ = eqx.partition(scan_layers(model, remat=remat) if scan else model,
                                  eqx.is_array)
        return jax.lax.with_sharding_constraint(params, params_shardings)

    return eqx.combine(init(key), static)


def abstract_sharded_model(
    config: GemmaConfig, mesh: Mesh, *, rules: ShardingRules | None = None,
    dtype: DTypeLike = jnp.bfloat16, scan: bool = False, remat: bool = False,
) -> Any:
    """The model as `jax.ShapeDtypeStruct` leaves carrying their shardings: for `plan`."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _abstract(config, dtype, scan, remat),
        _shardings(config, mesh, rules, dtype, scan, remat),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over the mesh's `data` axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def _cache_sharding(mesh: Mesh, cache: Any) -> Any:
    """Rows over `data`; keys and values also over `model` by kv head where it divides."""

    def place(x):
        if x.ndim == 4:
            heads = "model" if x.shape[2] % mesh.shape["model"] == 0 else None
            return NamedSharding(mesh, PartitionSpec("data", None, heads, None))
        return batch_sharding(mesh, x.ndim)

    return jax.tree_util.tree_map(place, cache)


# ------------------------------------------------------------------------------ the steps


def next_token_loss(
    model: Transformer | ScannedTransformer, tokens: Int[Array, "batch seq"]
) -> Float[Array, ""]:
    """Mean cross-entropy of each token given the ones before it (float32)."""
    logits = model(tokens[:, :-1], check_ids=False).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def prefill_step(
    model: Transformer | ScannedTransformer, tokens: Int[Array, "batch seq"]
) -> Float[Array, "batch vocab"]:
    """A forward over the prompt with the next-token logits of its last position (serving's
    prefill, without writing a cache)."""
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
    return model.forward(tokens, logits_at=last, check_ids=False).logits[:, 0]


def train_step(optimizer: Any) -> Callable:
    """`(model, opt_state, tokens) -> (model, opt_state, loss)`: one step of `optimizer` (an
    optax transformation) on `next_token_loss`."""

    def step(model, opt_state, tokens):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        loss, grads = jax.value_and_grad(
            lambda p: next_token_loss(eqx.combine(p, static), tokens))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.combine(eqx.apply_updates(params, updates), static), opt_state, loss

    return step


def decode_steps(
    model: Transformer, cache: tuple[LayerCache, ...], token: Int[Array, " batch"],
    start: Int[Array, ""], steps: int,
) -> tuple[Int[Array, "batch steps"], tuple[LayerCache, ...]]:
    """`steps` greedy tokens, fed back one at a time from cache slot `start` (every row at the
    same position: the benchmark's prompts are unpadded)."""
    batch = token.shape[0]

    def body(i, carry):
        out, cache, token = carry
        position = jnp.full((batch,), start + i, jnp.int32)
        logits, cache = _decode_step(model, token, position, jnp.ones((batch,), bool), cache,
                                     start + i)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return out.at[:, i].set(token), cache, token

    out = jnp.zeros((batch, steps), jnp.int32)
    out, cache, _ = jax.lax.fori_loop(0, steps, body, (out, cache, token))
    return out, cache


# ------------------------------------------------------------------------------ running them


@dataclasses.dataclass(frozen=True)
class Figures:
    """One mode's measurement (or, from `plan`, its prediction at the device peak)."""

    mode: str
    preset: str
    mesh: Mapping[str, int]
    devices: int
    device: str
    batch: int
    seq: int  # prompt / training length; for decode, the context before the new tokens
    dtype: str
    step_seconds: float  # measured, or predicted at the peak by `plan`
    tokens_per_second: float
    flops_per_step: int  # analytic
    mfu: float  # flops_per_step / step_seconds / (peak FLOP/s x devices)
    bandwidth_fraction: float | None  # decode: bytes per step / bandwidth, over step time
    bytes_per_step: int  # weights (and for decode, the cache) read once per step
    memory_per_device: int  # XLA's memory analysis of the compiled step (bytes)
    compile_seconds: float
    xla_flops: float | None = None  # XLA's cost analysis of the step (whole program)
    decode_steps: int | None = None
    loss: float | None = None
    predicted: bool = False
    scanned: bool = False  # XLA's cost analysis then counts one period of the layer loop

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _memory(compiled: Any) -> int:
    stats = compiled.memory_analysis()
    if stats is None:
        return 0
    peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    return int(max(peak, total))


def _xla_flops(lowered: Any) -> float | None:
    try:
        cost = lowered.cost_analysis()
    except Exception:  # some backends cannot analyse: the analytic count stands alone
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return None if not cost else float(cost.get("flops", 0.0)) or None


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every mode shares: the preset, the mesh, the dtype and the sizes."""

    config: GemmaConfig
    mesh: Mesh
    batch: int
    seq: int
    dtype: Any = jnp.bfloat16
    decode_steps: int = 32
    rules: ShardingRules | None = None
    learning_rate: float = 1e-4
    scan: bool = False  # prefill and train on a `ScannedTransformer` (decode stays unrolled)
    remat: bool = False  # with `scan`: training recomputes each period's activations

    def scanned(self, mode: str) -> bool:
        return self.scan and mode != "decode"

    @property
    def devices(self) -> int:
        return self.mesh.size

    def tokens(self, seq: int | None = None, *, abstract: bool = False, key: int = 0) -> Any:
        shape = (self.batch, self.seq if seq is None else seq)
        sharding = batch_sharding(self.mesh, 2)
        if abstract:
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        ids = np.random.default_rng(key).integers(0, self.config.vocab_size, shape)
        return jax.device_put(ids.astype(np.int32), sharding)  # the same on every host

    def check(self) -> None:
        data = self.mesh.shape["data"]
        if self.batch % data:
            raise ValueError(f"batch {self.batch} does not split over the mesh's data axis of "
                             f"{data}; use a multiple of {data}")
        if self.seq + self.decode_steps > self.config.context_length:
            raise ValueError(f"seq {self.seq} (+ {self.decode_steps} decode steps) exceeds "
                             f"{self.config.name}'s context of {self.config.context_length}")


def _optimizer(setup: Setup) -> Any:
    import optax

    return optax.adamw(setup.learning_rate)


def _programs(setup: Setup, mode: str) -> tuple[Callable, tuple]:
    """The jitted step of `mode` and its abstract arguments (model, ...), each leaf with the
    sharding the step is compiled for."""
    model = abstract_sharded_model(setup.config, setup.mesh, rules=setup.rules,
                                   dtype=setup.dtype, scan=setup.scanned(mode),
                                   remat=setup.remat)
    if mode == "prefill":
        return jax.jit(prefill_step), (model, setup.tokens(abstract=True))
    if mode == "train":
        optimizer = _optimizer(setup)
        params = eqx.filter(model, lambda x: jnp.issubdtype(x.dtype, jnp.inexact))
        opt_state = _state_shardings(jax.eval_shape(optimizer.init, params), params,
                                     setup.mesh)
        step = jax.jit(train_step(optimizer), donate_argnums=(0, 1))
        return step, (model, opt_state, setup.tokens(abstract=True))
    if mode == "decode":
        length = setup.seq + setup.decode_steps
        cache = jax.eval_shape(lambda: init_cache(abstract_model(setup.config, setup.dtype),
                                                  setup.batch, length, setup.dtype))
        cache = _with_shardings(cache, _cache_sharding(setup.mesh, cache))
        token = jax.ShapeDtypeStruct((setup.batch,), jnp.int32,
                                     sharding=batch_sharding(setup.mesh, 1))
        start = jax.ShapeDtypeStruct((), jnp.int32,
                                     sharding=NamedSharding(setup.mesh, PartitionSpec()))
        step = jax.jit(decode_steps, static_argnums=4, donate_argnums=1)
        return step, (model, cache, token, start, setup.decode_steps)
    raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")


def _state_shardings(opt_state: Any, params: Any, mesh: Mesh) -> Any:
    """Abstract optimizer state: parts shaped like the parameters (moments) take their
    shardings, the rest (step counts) is replicated."""
    structure = jax.tree_util.tree_structure(params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(part):
        if jax.tree_util.tree_structure(part) == structure:
            return jax.tree_util.tree_map(
                lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding),
                params, part)
        return jax.ShapeDtypeStruct(part.shape, part.dtype, sharding=replicated)

    return jax.tree_util.tree_map(
        place, opt_state, is_leaf=lambda x: jax.tree_util.tree_structure(x) == structure)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _place(abstract: Any, actual: Any) -> Any:
    """`actual` moved to the shardings of `abstract` (a no-op where they already agree)."""
    return jax.tree_util.tree_map(lambda a, x: jax.device_put(x, a.sharding), abstract, actual,
                                  is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _flops_and_bytes(setup: Setup, mode: str) -> tuple[int, int, int]:
    """(FLOPs per step, bytes per step, tokens per step) from the analytic counts."""
    c, b, s = setup.config, setup.batch, setup.seq
    weights = param_count(c) * jnp.dtype(setup.dtype).itemsize
    if mode == "prefill":
        return forward_flops(c, b, s, logits=1), weights, b * s
    if mode == "train":
        return train_flops(c, b, s - 1), 3 * weights, b * (s - 1)
    length = s + setup.decode_steps
    # Each step reads the weights and its cache once; the mean over the steps' cache fill is
    # what the cache-length count below approximates (the cache is allocated full).
    return (decode_flops(c, b, length) * setup.decode_steps,
            (weights + cache_bytes(c, b, length, setup.dtype)) * setup.decode_steps,
            b * setup.decode_steps)


def plan(setup: Setup, mode: str, peak: DevicePeak) -> Figures:
    """Lower and compile `mode` on abstract inputs (nothing allocated) and predict its step
    time on devices with `peak`: the larger of FLOPs and bytes over the mesh's peak."""
    setup.check()
    step, args = _programs(setup, mode)
    start = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    flops, nbytes, tokens = _flops_and_bytes(setup, mode)
    n = setup.devices
    seconds = max(flops / (peak.flops * n), nbytes / (peak.bandwidth * n))
    return _figures(setup, mode, peak, seconds, flops, nbytes, tokens, _memory(compiled),
                    compile_seconds, _xla_flops(lowered), predicted=True)


def _figures(setup, mode, peak, seconds, flops, nbytes, tokens, memory, compile_seconds,
             xla_flops, *, predicted=False, loss=None) -> Figures:
    n = setup.devices
    return Figures(
        mode=mode, preset=setup.config.name, mesh=dict(setup.mesh.shape), devices=n,
        device=peak.name, batch=setup.batch, seq=setup.seq, dtype=jnp.dtype(setup.dtype).name,
        step_seconds=seconds, tokens_per_second=tokens / seconds, flops_per_step=flops,
        mfu=flops / seconds / (peak.flops * n),
        bandwidth_fraction=(nbytes / (peak.bandwidth * n)) / seconds if mode == "decode"
        else None,
        bytes_per_step=nbytes, memory_per_device=memory, compile_seconds=compile_seconds,
        xla_flops=xla_flops, decode_steps=setup.decode_steps if mode == "decode" else None,
        loss=loss, predicted=predicted, scanned=setup.scanned(mode),
    )


def measure(
    setup: Setup, mode: str, peak: DevicePeak, *,
    model: Transformer | ScannedTransformer | None = None,
    repeats: int = 3,
) -> tuple[Figures, Any]:
    """Run `mode` on real (random, or the given) weights: compile, one warm-up, then the
    median of `repeats` timed steps. Returns the figures and the step's output (logits,
    decoded tokens or the losses, one per step) for comparing runs. A train step donates its
    parameters: a given `model` is copied first."""
    setup.check()
    if model is None:
        model = random_model(setup.config, setup.mesh, rules=setup.rules, dtype=setup.dtype,
                             scan=setup.scanned(mode), remat=setup.remat)
    elif setup.scanned(mode) and isinstance(model, Transformer):
        model = scan_layers(model, remat=setup.remat)
    elif not setup.scanned(mode) and isinstance(model, ScannedTransformer):
        model = unscan_layers(model)
    elif mode == "train":
        model = jax.tree_util.tree_map(lambda x: x.copy() if eqx.is_array(x) else x, model)
    step, abstract = _programs(setup, mode)
    start = time.perf_counter()
    lowered = step.lower(*abstract)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    model = _place(abstract[0], model)
    flops, nbytes, tokens = _flops_and_bytes(setup, mode)
    times, outputs = [], []
    for i in range(repeats + 1):
        if mode == "prefill":
            prompt = _place(abstract[1], setup.tokens())
            begin = time.perf_counter()
            result = jax.block_until_ready(compiled(model, prompt))
        elif mode == "train":
            if i == 0:
                params = eqx.filter(model, eqx.is_inexact_array)
                opt_state = _place(abstract[1], jax.jit(_optimizer(setup).init)(params))
            batch_tokens = _place(abstract[2], setup.tokens(key=i))
            begin = time.perf_counter()
            model, opt_state, result = jax.block_until_ready(
                compiled(model, opt_state, batch_tokens))
        else:
            prompt = setup.tokens()
            cache = init_cache(model, setup.batch, setup.seq + setup.decode_steps, setup.dtype)
            logits, cache = _prefill(model, prompt, jnp.ones(prompt.shape, bool), cache)
            cache = _place(abstract[1], cache)
            first = _place(abstract[2], jnp.argmax(logits, axis=-1).astype(jnp.int32))
            here = _place(abstract[3], jnp.asarray(setup.seq, jnp.int32))
            jax.block_until_ready((cache, first))
            begin = time.perf_counter()
            result = jax.block_until_ready(compiled(model, cache, first, here)[0])
        times.append(time.perf_counter() - begin)
        # Fetched after the clock stops: across processes this gathers from all of them.
        outputs.append(to_host(result))
    seconds = float(np.median(times[1:]))
    output = np.asarray(outputs) if mode == "train" else outputs[-1]
    loss = float(outputs[-1]) if mode == "train" else None
    return _figures(setup, mode, peak, seconds, flops, nbytes, tokens, _memory(compiled),
                    compile_seconds, _xla_flops(lowered), loss=loss), output


__all__ = [
    "DEVICE_PEAKS", "DevicePeak", "Figures", "MODES", "Setup", "abstract_sharded_model",
    "batch_sharding", "cache_bytes", "decode_flops", "decode_steps", "device_peak",
    "forward_flops", "measure", "measure_host_peak", "next_token_loss", "param_count",
    "parse_mesh", "plan", "prefill_step", "random_model", "train_flops", "train_step",
]
