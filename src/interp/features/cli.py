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
    _add_train(actions)
    _add_cache(actions)
    cmd.set_defaults(run=run_features, memory_advice="fewer --windows or a smaller --batch")


TRAINING_FILES = ("training.json", "training.png")


def _add_train(actions: Any) -> None:
    sub = actions.add_parser(
        "train", help="train an SAE or transcoder at any site, into a Gemma Scope 2 folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Activations streamed from the model on the corpus (nothing written to "
        "disk but the result), one jitted training step per batch (SAELens' losses), then "
        "the dictionary in Gemma Scope 2's layout in --out, its training config in "
        "config.json, the run's log and held-out metrics in training.json.")
    sub.add_argument("--out", required=True, metavar="DIR", help="the dictionary's folder")
    sub.add_argument("--model", default="gemma3-270m", help="any model from_pretrained reads")
    sub.add_argument("--site", default="resid_post", help="the site read (and written)")
    sub.add_argument("--layer", type=int, default=6, help="its layer")
    sub.add_argument("--writes", default=None, metavar="SITE",
                     help="a transcoder: the site (same layer) it predicts")
    sub.add_argument("--config", default=None, metavar="FILE",
                     help="a JSON object of TrainConfig fields (flags below override it)")
    for name, kind, help_text in (
            ("architecture", str, "relu, jumprelu, topk or batchtopk"),
            ("width", int, "latents"), ("k", float, "topk/batchtopk: latents per token"),
            ("lr", float, "Adam's learning rate"),
            ("l1-coefficient", float, "relu: the L1 coefficient"),
            ("l0-coefficient", float, "jumprelu: the L0 coefficient"),
            ("normalize-activations", str,
             "none, or expected_average_only_in (inputs scaled to mean norm sqrt(d))")):
        sub.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    sub.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    sub.add_argument("--batch-rows", type=int, default=4096, help="tokens per step")
    sub.add_argument("--corpus", default="shakespeare",
                     help="'shakespeare', a .txt/.jsonl/.parquet file, a folder of .txt files "
                          "or hf:<dataset>")
    sub.add_argument("--length", type=int, default=128, help="tokens per window")
    sub.add_argument("--sequences", type=int, default=8, help="windows per forward pass")
    sub.add_argument("--buffer-rows", type=int, default=2**17,
                     help="the shuffle buffer's rows (memory: rows x d x 4 bytes per site)")
    sub.add_argument("--eval-windows", type=int, default=64, help="held-out windows evaluated")
    sub.add_argument("--checkpoints", default=None, metavar="DIR",
                     help="where checkpoints go (default: DIR.checkpoints beside --out); a "
                          "run with the same arguments resumes from the newest, and they are "
                          "deleted once the dictionary is written")
    sub.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS",
                     help="steps between checkpoints (0: only when interrupted)")
    sub.add_argument("--cache", default=None, metavar="DIR",
                     help="train from an activation cache (`features cache`) made on the same "
                          "corpus windows, instead of running the model")
    sub.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                     help="evaluate on the held-out windows every STEPS steps (0: at the end "
                          "only); the curves go to training.json and training.png")
    sub.add_argument("--mesh", default=None, metavar="DATAxMODEL",
                     help="devices as a data x model mesh, e.g. 2x4: batches split over "
                          "data, latents over model")
    sub.add_argument("--seed", type=int, default=0)


def _add_cache(actions: Any) -> None:
    sub = actions.add_parser(
        "cache", help="store a model's activations at hook points on disk, to train from",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="One forward pass over the corpus' train windows, the activations at "
        "each --points stored as float32 .npy files with a meta.json (the format: "
        "interp.features.activations). Interrupted, it carries on where it stopped when rerun.")
    sub.add_argument("--out", required=True, metavar="DIR", help="the cache's folder")
    sub.add_argument("--model", default="gemma3-270m", help="any model from_pretrained reads")
    sub.add_argument("--points", default="resid_post:6", metavar="SITE:LAYER,...",
                     help="the hook points stored")
    sub.add_argument("--tokens", type=int, default=2_200_000, help="rows stored per point")
    sub.add_argument("--corpus", default="shakespeare",
                     help="'shakespeare', a .txt/.jsonl/.parquet file, a folder of .txt files "
                          "or hf:<dataset>")
    sub.add_argument("--length", type=int, default=128, help="tokens per window")
    sub.add_argument("--sequences", type=int, default=8, help="windows per forward pass")
    sub.add_argument("--seed", type=int, default=0, help="which windows are held out")
    sub.set_defaults(run=run_cache)


def _points(text: str) -> list[Any]:
    from .dictionary import HookPoint

    points = []
    for part in text.split(","):
        site, _, layer = part.strip().partition(":")
        if not layer.strip().isdigit():
            raise ValueError(f"--points: {part.strip()!r} is not SITE:LAYER (e.g. "
                             f"resid_post:6)")
        points.append(HookPoint(site.strip(), int(layer)))
    return points


def run_cache(args: argparse.Namespace) -> int:
    from gemma_eqx.formats.pretrained import from_pretrained

    from ..corpus import read_corpus, token_windows
    from .activations import write_activation_cache

    points = _points(args.points)
    _positive(args, "tokens", "sequences")
    if args.length < 2:
        raise ValueError(f"--length must be >= 2; got {args.length}")
    model, tokenizer = from_pretrained(args.model)
    windows = token_windows(tokenizer, read_corpus(args.corpus), args.length, seed=args.seed)
    cache = write_activation_cache(model, windows, points, args.out, rows=args.tokens,
                                   sequences=args.sequences)
    print(f"activation cache {cache.folder}: {cache.rows:,} rows of "
          f"{', '.join(map(str, cache.points))}")
    return 0


def _mesh(text: str | None) -> Any:
    if text is None:
        return None
    import jax

    data, _, model = text.lower().partition("x")
    if not (data.isdigit() and model.isdigit()) or int(data) < 1 or int(model) < 1:
        raise ValueError(f"--mesh must be DATAxMODEL, e.g. 2x4; got {text!r}")
    if int(data) * int(model) != jax.device_count():
        raise ValueError(f"--mesh {text} needs {int(data) * int(model)} devices; there are "
                         f"{jax.device_count()}")
    return jax.make_mesh((int(data), int(model)), ("data", "model"))


def _train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig of --config and the flags, refused in one sentence if a field is
    unknown or a value wrong."""
    import dataclasses

    from .train import TrainConfig

    fields: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config)
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {path}: not a readable JSON file ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"--config {path}: must hold a JSON object of TrainConfig fields")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"--config {path}: unknown field(s) {', '.join(unknown)}; "
                             f"TrainConfig has {', '.join(sorted(known))}")
    for flag in ("architecture", "width", "k", "lr", "l1_coefficient", "l0_coefficient",
                 "normalize_activations"):
        if getattr(args, flag) is not None:
            fields[flag] = getattr(args, flag)
    if "k" in fields and float(fields["k"]).is_integer():
        fields["k"] = int(fields["k"])
    for name in ("checkpoint_every", "eval_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got "
                             f"{getattr(args, name)}")
    for name in ("batch_rows", "tokens", "length", "sequences", "buffer_rows", "eval_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                             f"{getattr(args, name)}")
    steps = args.tokens // args.batch_rows
    if steps < 1:
        raise ValueError(f"--tokens {args.tokens} is less than one step of --batch-rows "
                         f"{args.batch_rows}")
    fields["total_steps"] = steps
    try:
        return TrainConfig(**fields)
    except TypeError as e:
        raise ValueError(f"--config: {e}") from None


def run_train(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import time

    import jax

    from gemma_eqx.formats.pretrained import from_pretrained

    from ..corpus import read_corpus, token_windows
    from .activations import open_activation_cache, windows_digest
    from .dictionary import HookPoint
    from .evaluate import evaluate
    from .load import (
        GEMMA_SCOPE_2_FILES,
        check_writable_folder,
        hf_hook_point,
        save_gemma_scope_2,
    )
    from .train import check_mesh, fit, remove_checkpoints, to_dictionary, training_curves_png

    config = _train_config(args)
    out = Path(args.out)
    check_writable_folder(out, (*GEMMA_SCOPE_2_FILES, *TRAINING_FILES))  # before any work
    reads = HookPoint(args.site, args.layer)
    writes = reads if args.writes is None else HookPoint(args.writes, args.layer)
    for point in {reads, writes}:
        hf_hook_point(point)  # a site Gemma Scope 2's layout cannot name is refused now
    mesh = _mesh(args.mesh)
    if mesh is not None:
        check_mesh(config, args.batch_rows, mesh)
    cache = None
    if args.cache is not None:
        cache = open_activation_cache(args.cache)
        cache.check_points([reads, writes])
    model, tokenizer = from_pretrained(args.model)
    if not 0 <= args.layer < len(model.blocks):
        raise ValueError(f"--layer {args.layer}: {args.model} has layers 0..."
                         f"{len(model.blocks) - 1}")
    windows = token_windows(tokenizer, read_corpus(args.corpus), args.length, seed=args.seed)
    if cache is not None:
        if cache.meta["model"] != model.config.name or cache.meta["length"] != args.length \
                or cache.meta["windows_sha256"] != windows_digest(windows.train):
            raise ValueError(f"activation cache {cache.folder} was made from other windows or "
                             f"another model ({cache.meta['model']}, length "
                             f"{cache.meta['length']}): pass the --model, --corpus, --length "
                             f"and --seed it was made with")
        if cache.meta["sequences"] != args.sequences:
            raise ValueError(f"--sequences {args.sequences}: the activation cache "
                             f"{cache.folder} was made with {cache.meta['sequences']}")
    held = windows.held_out[:args.eval_windows]
    batches = [held[i:i + args.sequences]
               for i in range(0, len(held) - args.sequences + 1, args.sequences)]
    ignore = [tokenizer.bos_id] + ([tokenizer.pad_id] if tokenizer.pad_id is not None else [])

    def evaluation(state: Any, step: int) -> dict[str, float]:
        # gathered onto the model's device (training may have spread it over a mesh)
        dictionary = jax.device_put(to_dictionary(state, config, reads, writes),
                                    jax.devices()[0])
        m = evaluate(model, dictionary, batches,
                     ignore_tokens=ignore)
        return {"l0": m.l0, "explained_variance": m.explained_variance,
                "ce_loss_recovered": m.ce_loss_recovered,
                "dead_fraction_held_out": m.dead / config.width}

    if args.eval_every and not batches:
        raise ValueError(f"--eval-every needs held-out windows: --eval-windows "
                         f"{args.eval_windows} gives no batch of --sequences {args.sequences}")
    checkpoints = Path(args.checkpoints) if args.checkpoints else out.with_name(
        out.name + ".checkpoints")
    start = time.perf_counter()

    def stop(signum, frame):  # SIGTERM as Ctrl-C: fit saves a checkpoint on its way out
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        state, log = fit(model, windows if cache is None else cache, reads, config,
                         writes=writes, batch_rows=args.batch_rows, sequences=args.sequences,
                         buffer_rows=args.buffer_rows, seed=args.seed, checkpoints=checkpoints,
                         checkpoint_every=args.checkpoint_every, mesh=mesh,
                         evaluation=evaluation if args.eval_every else None,
                         eval_every=args.eval_every)
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - start
    name = f"{args.model}/{args.site}/layer_{args.layer}"
    dictionary = jax.device_put(to_dictionary(state, config, reads, writes, name=name,
                                              model_name=model.config.name), jax.devices()[0])
    metrics = evaluate(model, dictionary, batches, ignore_tokens=ignore).to_json() \
        if batches else {}
    training = dataclasses.asdict(config)
    report = {"config": training, "model": args.model, "reads": str(reads),
              "writes": str(writes), "tokens": config.total_steps * args.batch_rows,
              "seconds": round(seconds, 2), "seconds_model": round(log.seconds_model, 2),
              "seconds_step": round(log.seconds_step, 2),
              "log": dataclasses.asdict(log), "held_out": metrics}
    save_gemma_scope_2(dictionary, out, extra={"training": training},
                       files={"training.json": json.dumps(report, indent=1)},
                       binary={"training.png": training_curves_png(log)})
    remove_checkpoints(checkpoints)
    print(f"trained {config.architecture} x{config.width} at {reads}: "
          f"{report['tokens']:,} tokens in {seconds:.0f} s ("
          f"{'reading the cache' if cache is not None else 'model'} {log.seconds_model:.0f} s, "
          f"steps {log.seconds_step:.0f} s)")
    for key in ("l0", "explained_variance", "ce_loss_recovered", "dead"):
        if key in metrics:
            print(f"  held out {key:<20} {metrics[key]:.4g}" if isinstance(metrics[key], float)
                  else f"  held out {key:<20} {metrics[key]}")
    print(f"dictionary: {out}")
    return 0


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")


def run_features(args: argparse.Namespace) -> int:
    from gemma_eqx.formats.pretrained import from_pretrained

    from .load import load_dictionary

    if args.action == "train":
        return run_train(args)
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
