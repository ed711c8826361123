"""Sparse dictionaries as Equinox modules: SAEs, transcoders (with an optional affine skip)
and cross-layer transcoders, with the activation as a field.

    features       = act(x @ w_enc + b_enc)            [..., latents]
    reconstruction = features @ w_dec + b_dec (+ x @ w_skip)   [..., d_out]

`act` is one of
- `relu`: max(pre, 0) (Anthropic's and SAELens' "standard" SAE);
- `jumprelu`: relu(pre) where pre > threshold (one threshold per latent; Gemma Scope);
- `topk`: the k largest pre-activations of each token, ReLU'd, the rest zero;
- `batchtopk`: at inference, a JumpReLU whose one learned threshold every latent shares
  (stored per latent, all equal).

Where the dictionary reads and writes is a `HookPoint` (a site of `gemma_eqx.model.sites` and a
layer): an SAE reads and writes one point, a transcoder reads one and writes another. Every
array is a leaf (new values do not recompile; gradients reach them); the width axis is named
`latents`, which the default sharding rules split over the mesh's `model` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gemma_eqx.model.base import Module
from gemma_eqx.model.sites import STREAM_SITES

ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """A site of one layer: where a dictionary reads or writes."""

    site: str
    layer: int

    def __post_init__(self):
        if self.site not in STREAM_SITES:
            raise ValueError(f"a dictionary reads and writes one vector per token: site "
                             f"{self.site!r} is not one of {', '.join(STREAM_SITES)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"a hook point's layer must be a non-negative integer; got "
                             f"{self.layer!r}")

    def __str__(self) -> str:
        return f"{self.site} of layer {self.layer}"


def _shape_error(name: str, field: str, got: Any, want: tuple[int, ...], why: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{name}: {field} has shape {tuple(got)}; {why} needs {tuple(want)}")


def activate(pre: Float[Array, "*tokens latents"], activation: str,
             threshold: Float[Array, " latents"] | None, k: int | None
             ) -> Float[Array, "*tokens latents"]:
    """The feature activations from the pre-activations."""
    if activation == "relu":
        return jax.nn.relu(pre)
    if activation in ("jumprelu", "batchtopk"):
        return jnp.where(pre > threshold.astype(pre.dtype), jax.nn.relu(pre), 0)
    if activation == "topk":
        values, indices = jax.lax.top_k(pre, k)
        flat = jnp.zeros_like(pre).reshape(-1, pre.shape[-1])
        rows = jnp.arange(flat.shape[0])[:, None]
        flat = flat.at[rows, indices.reshape(-1, k)].set(jax.nn.relu(values).reshape(-1, k))
        return flat.reshape(pre.shape)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")


def check_arrays(name: str, arrays: dict[str, Any], activation: str, k: int | None = None,
                 subtract_decoder_bias: bool = False, input_norm: str = "none") -> None:
    """A `ValueError` naming the first array of a dictionary whose shape does not fit the
    others, or a setting it cannot run with (called before the module is built)."""
    n = name
    if activation not in ACTIVATIONS:
        raise ValueError(f"{n}: activation must be one of {', '.join(ACTIVATIONS)}; got "
                         f"{activation!r}")
    w_enc, w_dec = arrays["w_enc"], arrays["w_dec"]
    if np.ndim(w_enc) != 2 or np.ndim(w_dec) != 2:
        raise ValueError(f"{n}: w_enc and w_dec must be matrices; got shapes "
                         f"{np.shape(w_enc)} and {np.shape(w_dec)}")
    d_in, latents = np.shape(w_enc)
    d_out = np.shape(w_dec)[1]
    _shape_error(n, "w_dec", np.shape(w_dec), (latents, d_out),
                 f"w_enc {np.shape(w_enc)} (a latent per column)")
    _shape_error(n, "b_enc", np.shape(arrays["b_enc"]), (latents,), f"a width of {latents}")
    _shape_error(n, "b_dec", np.shape(arrays["b_dec"]), (d_out,), f"an output width of {d_out}")
    threshold = arrays.get("threshold")
    if activation in ("jumprelu", "batchtopk"):
        if threshold is None:
            raise ValueError(f"{n}: activation {activation} needs a threshold")
        _shape_error(n, "threshold", np.shape(threshold), (latents,), f"a width of {latents}")
    if activation == "topk" and (isinstance(k, bool) or not isinstance(k, int)
                                 or not 0 < k <= latents):
        raise ValueError(f"{n}: topk needs k in 1..{latents}; got {k!r}")
    if arrays.get("w_skip") is not None:
        _shape_error(n, "w_skip", np.shape(arrays["w_skip"]), (d_in, d_out),
                     "its input and output")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"{n}: input_norm must be one of {', '.join(INPUT_NORMS)}; got "
                         f"{input_norm!r}")
    if subtract_decoder_bias and d_in != d_out:
        raise ValueError(f"{n}: subtracting b_dec from the input needs d_in == d_out; got "
                         f"{d_in} and {d_out}")


class SparseDictionary(Module):
    """An SAE (`reads == writes`), a transcoder (`reads != writes`) or a skip-transcoder
    (`w_skip` set: Gemma Scope 2's affine transcoders).

    `subtract_decoder_bias` subtracts `b_dec` from the input before encoding (SAELens'
    `apply_b_dec_to_input`; Gemma Scope does not). `name` says where it came from."""

    w_enc: Float[Array, "d_in latents"]
    b_enc: Float[Array, " latents"]
    w_dec: Float[Array, "latents d_out"]
    b_dec: Float[Array, " d_out"]
    threshold: Float[Array, " latents"] | None
    w_skip: Float[Array, "d_in d_out"] | None
    activation: str = eqx.field(static=True)
    k: int | None = eqx.field(static=True)
    reads: HookPoint = eqx.field(static=True)
    writes: HookPoint = eqx.field(static=True)
    subtract_decoder_bias: bool = eqx.field(static=True, default=False)
    # SAELens' run-time input normalisation, undone on the output: "none", "layer_norm"
    # (centre, divide by the unbiased std + 1e-5) or "constant_norm_rescale" (to norm
    # sqrt(d_in)).
    input_norm: str = eqx.field(static=True, default="none")
    name: str = eqx.field(static=True, default="dictionary")
    model_name: str | None = eqx.field(static=True, default=None)  # what it was made for

    def __check_init__(self):
        check_arrays(self.name, {f: getattr(self, f) for f in
                                 ("w_enc", "b_enc", "w_dec", "b_dec", "threshold", "w_skip")},
                     self.activation, self.k, self.subtract_decoder_bias, self.input_norm)

    @property
    def d_in(self) -> int:
        return int(self.w_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.w_dec.shape[1])

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[1])

    @property
    def kind(self) -> str:
        if self.w_skip is not None:
            return "skip-transcoder"
        return "sae" if self.reads == self.writes else "transcoder"

    def _normalisation(self, x: Array) -> tuple[Array, Array, Array]:
        """`(shift, into, out_of)`: normalised = (x - shift) * into, and an output y in
        normalised units back to the site's is y * out_of + shift (SAELens' formulas: its
        layer norm divides by std + 1e-5 and multiplies back by std alone)."""
        x = x.astype(jnp.promote_types(x.dtype, self.w_enc.dtype))
        if self.input_norm == "layer_norm":
            mean = x.mean(axis=-1, keepdims=True)
            std = jnp.std(x - mean, axis=-1, keepdims=True, ddof=1)
            return mean, 1 / (std + 1e-5), std
        if self.input_norm == "constant_norm_rescale":
            coefficient = self.d_in ** 0.5 / jnp.linalg.norm(x, axis=-1, keepdims=True)
            return jnp.zeros((), x.dtype), coefficient, 1 / coefficient
        one = jnp.ones((), x.dtype)
        return jnp.zeros((), x.dtype), one, one

    def _input(self, x: Array) -> Array:
        x = x.astype(jnp.promote_types(x.dtype, self.w_enc.dtype))
        if self.input_norm != "none":
            shift, into, _ = self._normalisation(x)
            x = (x - shift) * into
        return x - self.b_dec.astype(x.dtype) if self.subtract_decoder_bias else x

    def pre_activations(self, x: Float[Array, "*tokens d_in"]) -> Float[Array, "*tokens latents"]:
        x = self._input(x)
        return x @ self.w_enc.astype(x.dtype) + self.b_enc.astype(x.dtype)

    def encode(self, x: Float[Array, "*tokens d_in"]) -> Float[Array, "*tokens latents"]:
        """The feature activations of `x`."""
        return activate(self.pre_activations(x), self.activation, self.threshold, self.k)

    def decode(self, features: Float[Array, "*tokens latents"],
               x: Float[Array, "*tokens d_in"] | None = None) -> Float[Array, "*tokens d_out"]:
        """The reconstruction from `features` (plus the skip term of the input `x`, which a
        skip-transcoder needs)."""
        out = features @ self.w_dec.astype(features.dtype) + self.b_dec.astype(features.dtype)
        if x is None and (self.w_skip is not None or self.input_norm != "none"):
            raise ValueError(f"{self.name}: decoding needs the input x (a skip connection or "
                             f"an input normalisation to undo)")
        if self.input_norm != "none":
            shift, _, out_of = self._normalisation(x)
            out = out * out_of.astype(out.dtype) + shift.astype(out.dtype)
        if self.w_skip is not None:
            out = out + x.astype(out.dtype) @ self.w_skip.astype(out.dtype)
        return out

    def decode_change(self, edited: Float[Array, "*tokens latents"],
                      features: Float[Array, "*tokens latents"],
                      x: Float[Array, "*tokens d_in"] | None = None
                      ) -> Float[Array, "*tokens d_out"]:
        """`decode(edited, x) - decode(features, x)` in one matmul (the decoder is linear in
        the features; the decoder bias and the skip term cancel): exactly zero where no
        feature changed."""
        out = (edited - features) @ self.w_dec.astype(features.dtype)
        if self.input_norm != "none":
            if x is None:
                raise ValueError(f"{self.name}: decoding needs the input x (an input "
                                 f"normalisation to undo)")
            out = out * self._normalisation(x)[2].astype(out.dtype)
        return out

    def __call__(self, x: Float[Array, "*tokens d_in"]) -> Float[Array, "*tokens d_out"]:
        """The reconstruction of `x`."""
        return self.decode(self.encode(x), x)

    def logical_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Logical axis names of each array field (`latents` is sharded by default)."""
        return {"w_enc": (None, "latents"), "b_enc": ("latents",), "w_dec": ("latents", None),
                "b_dec": (None,), "threshold": ("latents",), "w_skip": (None, None)}


class CrossLayerTranscoder(Module):
    """One encoder per layer reading that layer's `reads` site; the features of layer `l`
    write, through their own decoder, into the `writes` site of every layer `l' >= l`:

        features[l]   = act(x[l] @ w_enc[l] + b_enc[l])
        output[l']    = sum_{l <= l'} features[l] @ w_dec[l][:, l' - l] + b_dec[l']
    """

    w_enc: Float[Array, "layers d_in latents"]
    b_enc: Float[Array, "layers latents"]
    threshold: Float[Array, "layers latents"] | None
    w_dec: tuple[Float[Array, "latents _later d_out"], ...]  # _later = layers - l, per l
    b_dec: Float[Array, "layers d_out"]
    activation: str = eqx.field(static=True)
    k: int | None = eqx.field(static=True)
    reads: str = eqx.field(static=True)
    writes: str = eqx.field(static=True)
    name: str = eqx.field(static=True, default="cross-layer transcoder")

    def __check_init__(self):
        n = self.name
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{n}: activation must be one of {', '.join(ACTIVATIONS)}; got "
                             f"{self.activation!r}")
        for site in (self.reads, self.writes):
            HookPoint(site, 0)
        if self.w_enc.ndim != 3:
            raise ValueError(f"{n}: w_enc must be [layers, d_in, latents]; got shape "
                             f"{tuple(self.w_enc.shape)}")
        layers, _, latents = self.w_enc.shape
        _shape_error(n, "b_enc", self.b_enc.shape, (layers, latents), "w_enc")
        if len(self.w_dec) != layers:
            raise ValueError(f"{n}: {len(self.w_dec)} decoders for {layers} layers")
        d_out = self.b_dec.shape[-1]
        _shape_error(n, "b_dec", self.b_dec.shape, (layers, d_out), "w_enc")
        for layer, w in enumerate(self.w_dec):
            _shape_error(n, f"w_dec[{layer}]", w.shape, (latents, layers - layer, d_out),
                         f"layer {layer}'s features writing into the {layers - layer} layers "
                         f"from it on")
        if self.activation in ("jumprelu", "batchtopk"):
            if self.threshold is None:
                raise ValueError(f"{n}: activation {self.activation} needs a threshold")
            _shape_error(n, "threshold", self.threshold.shape, (layers, latents), "w_enc")

    @property
    def layers(self) -> int:
        return int(self.w_enc.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.w_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.b_dec.shape[-1])

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[2])

    kind = "cross-layer transcoder"

    def encode(self, x: Float[Array, "*tokens d_in"], layer: int
               ) -> Float[Array, "*tokens latents"]:
        """Layer `layer`'s features of its input `x`."""
        x = x.astype(jnp.promote_types(x.dtype, self.w_enc.dtype))
        pre = x @ self.w_enc[layer].astype(x.dtype) + self.b_enc[layer].astype(x.dtype)
        threshold = None if self.threshold is None else self.threshold[layer]
        return activate(pre, self.activation, threshold, self.k)

    def decode(self, features: list[Float[Array, "*tokens latents"]], layer: int
               ) -> Float[Array, "*tokens d_out"]:
        """The output into layer `layer` from the features of layers 0..layer (in order)."""
        if len(features) != layer + 1:
            raise ValueError(f"{self.name}: the output into layer {layer} needs the features "
                             f"of {layer + 1} layers; got {len(features)}")
        out = self.b_dec[layer].astype(features[0].dtype)
        for source, f in enumerate(features):
            out = out + f @ self.w_dec[source][:, layer - source].astype(f.dtype)
        return out


def shard_dictionary(dictionary: Any, mesh: jax.sharding.Mesh, rules: Any = None) -> Any:
    """`dictionary` with every array placed as the rules name its axes (`latents` over the
    mesh's `model` axis by default; an axis the mesh does not divide stays whole)."""
    from gemma_eqx.parallel.sharding import DEFAULT_RULES, auto_axes

    rules = DEFAULT_RULES if rules is None else rules
    mesh = auto_axes(mesh)
    axes = dictionary.logical_axes() if isinstance(dictionary, SparseDictionary) else {
        "w_enc": (None, None, "latents"), "b_enc": (None, "latents"),
        "threshold": (None, "latents"), "b_dec": (None, None)}

    def place(value: Array, names: tuple[str | None, ...]) -> Array:
        spec = rules.spec(names, tuple(value.shape), mesh)
        return jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))

    out = dictionary
    for field, names in axes.items():
        value = getattr(dictionary, field)
        if value is not None:
            out = eqx.tree_at(lambda d, f=field: getattr(d, f), out, place(value, names))
    if isinstance(dictionary, CrossLayerTranscoder):
        out = eqx.tree_at(lambda d: d.w_dec, out,
                          tuple(place(w, ("latents", None, None)) for w in dictionary.w_dec))
    return out


__all__ = ["ACTIVATIONS", "INPUT_NORMS", "CrossLayerTranscoder", "HookPoint", "SparseDictionary",
           "activate", "shard_dictionary"]
