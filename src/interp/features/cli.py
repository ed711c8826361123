"""`gemma-eqx features eval|dashboard|attribute`: a dictionary (local folder or Hub repo id
plus `--folder`) on a model and a corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_features_command(commands: Any) -> None:
    cmd = commands.add_parser(
        "features", help="evaluate a sparse dictionary, draw its feature dashboards, or "
        "attribute a prediction to its features",
        description="Sparse dictionaries (Gemma Scope 1/2, SAELens folders) on a model: "
        "`eval` (SAELens' metrics on held-out windows of the corpus), `dashboard` (top "
        "contexts, histograms, logit effects), `attribute` (activation x gradient per "
        "feature for one prediction).")
    actions = cmd.add_subparsers(dest="action", required=True)
    for name, help_text in (("eval", "SAELens' metrics on held-out token windows"),
                            ("dashboard", "feature dashboards into --out"),
                            ("attribute", "which features carry a prediction")):
        sub = actions.add_parser(name, help=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("dictionary", help="a dictionary folder, or a Hub repo id with --folder")
        sub.add_argument("--folder", default=None, help="the dictionary's folder in the repo")
        sub.add_argument("--model", default="gemma3-270m", help="any model from_pretrained reads")
        if name == "attribute":
            sub.add_argument("--text", required=True, help="the prompt")
            sub.add_argument("--target", required=True,
                             help="the next token whose log-probability is attributed")
            sub.add_argument("--top", type=int, default=10, help="features listed")
        else:
            sub.add_argument("--corpus", default="shakespeare",
                             help="'shakespeare', a .txt/.jsonl/.parquet file, a folder of "
                                  ".txt files or hf:<dataset>")
            sub.add_argument("--windows", type=int, default=64, help="token windows read")
            sub.add_argument("--length", type=int, default=128, help="tokens per window")
            sub.add_argument("--batch", type=int, default=8, help="windows per forward pass")
            sub.add_argument("--seed", type=int, default=0, help="which windows")
        if name == "dashboard":
            sub.add_argument("--latents", default=None,
                             help="comma-separated latents (default: the 8 most active)")
        sub.add_argument("--out", default=None, metavar="DIR",
                         help="where to write the JSON (and the dashboard page)")
    cmd.set_defaults(run=run_features, memory_advice="fewer --windows or a smaller --batch")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")


def run_features(args: argparse.Namespace) -> int:
    from gemma_eqx.formats.pretrained import from_pretrained

    from .load import load_dictionary

    if args.action != "attribute":
        _positive(args, "windows", "length", "batch")
    dictionary = load_dictionary(args.dictionary, args.folder)
    model, tokenizer = from_pretrained(args.model)
    from .splice import check_fits

    check_fits(model, dictionary)
    out = None if args.out is None else Path(args.out)
    if args.action == "attribute":
        return _attribute(args, model, tokenizer, dictionary, out)
    from tqdm import tqdm

    from ..corpus import read_corpus, token_windows

    windows = token_windows(tokenizer, read_corpus(args.corpus), args.length, seed=args.seed)
    split = windows.held_out if args.action == "eval" else windows.train
    split = split[:args.windows]
    if len(split) < args.batch:
        raise ValueError(f"the corpus gives {len(split)} windows of {args.length} tokens; "
                         f"--batch {args.batch} needs more (a longer corpus or shorter "
                         f"--length)")
    batches = [split[i:i + args.batch] for i in range(0, len(split) - args.batch + 1,
                                                      args.batch)]
    progress = tqdm(batches, desc=f"{args.action} {Path(str(dictionary.name)).parent.name}",
                    unit="batch")
    if args.action == "eval":
        from .evaluate import evaluate

        ignore = [tokenizer.bos_id] + ([tokenizer.pad_id] if tokenizer.pad_id is not None
                                       else [])
        metrics = evaluate(model, dictionary, progress, ignore_tokens=ignore)
        report = metrics.to_json()
        for key in ("l0", "explained_variance", "mse", "cossim", "ce_loss_recovered",
                    "kl_score", "dead", "dense"):
            print(f"  {key:<20} {report[key]:.4g}" if isinstance(report[key], float)
                  else f"  {key:<20} {report[key]}")
        if out is not None:
            from gemma_eqx.core.atomic import replace_file

            out.mkdir(parents=True, exist_ok=True)
            with replace_file(out / "metrics.json") as tmp:
                tmp.write_text(json.dumps(report, indent=1))
        return 0
    from .dashboard import build_cards, write_dashboard

    latents = _latents(args.latents, dictionary, model, batches[:2])
    cards = build_cards(model, tokenizer, dictionary, progress, latents)
    page = write_dashboard(cards, out or Path("features-dashboard"),
                           title=f"{dictionary.name} on {args.model}")
    print(f"dashboard: {page}")
    return 0


def _latents(text: str | None, dictionary: Any, model: Any, batches: list) -> list[int]:
    import jax.numpy as jnp
    import numpy as np

    from ..capture import run_with_records
    from ..install import add_interventions
    from ..interventions import Record

    if text is not None:
        try:
            return [int(t) for t in text.split(",")]
        except ValueError:
            raise ValueError(f"--latents must be comma-separated integers; got {text!r}") \
                from None
    recorded = add_interventions(model, {dictionary.reads.layer: Record(dictionary.reads.site)})
    _, cache = run_with_records(recorded, jnp.asarray(np.concatenate(batches)))
    features = dictionary.encode(cache[dictionary.reads.site, dictionary.reads.layer])
    return [int(i) for i in np.argsort(np.asarray((features[:, 1:] != 0).mean((0, 1))))[::-1][:8]]


def _attribute(args, model, tokenizer, dictionary, out) -> int:
    import numpy as np

    from ..patching import mean_logprob
    from .splice import feature_gradients, splice

    ids = tokenizer.encode(args.target)
    if len(ids) != 1:
        raise ValueError(f"--target {args.target!r} is {len(ids)} tokens; give one token")
    tokens, _ = tokenizer.encode_batch([args.text])
    last = int(tokens.shape[1]) - 1
    total, features, grads = feature_gradients(splice(model, dictionary), tokens,
                                               mean_logprob(ids, [last]))
    (key,) = features
    attribution = np.array(features[key] * grads[key])[0]
    attribution[np.asarray(tokens[0]) == tokenizer.bos_id] = 0  # BOS left out, as SAELens does
    order = np.argsort(np.abs(attribution), axis=None)[::-1][:args.top]
    rows = []
    print(f"log p({args.target!r}) = {float(total):.3f}; features by activation x gradient:")
    for index in order:
        position, latent = np.unravel_index(index, attribution.shape)
        token = tokenizer.decode([int(tokens[0, position])])
        rows.append(dict(position=int(position), token=token, latent=int(latent),
                         activation=float(features[key][0, position, latent]),
                         attribution=float(attribution[position, latent])))
        print(f"  position {position:>3} {token!r:>12}  latent {latent:>6}  "
              f"{rows[-1]['attribution']:+.4f}")
    if out is not None:
        from gemma_eqx.core.atomic import replace_file

        out.mkdir(parents=True, exist_ok=True)
        with replace_file(out / "attribution.json") as tmp:
            tmp.write_text(json.dumps({"logprob": float(total), "features": rows}, indent=1))
    return 0
