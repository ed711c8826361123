"""`gemma-eqx induction`: run the induction-head study and write its report."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any


def add_induction_command(commands: Any) -> None:
    cmd = commands.add_parser(
        "induction", help="run the induction-head study and write a report",
        description="Run the induction-head study (behaviour, attention, head scores, "
        "knock-out, attribution, minimal head set, path analysis, patching between inputs, "
        "activation patching maps) and write report.json, figures and report.html into --out. "
        "The first run converts the model into ~/.cache/gemma-eqx (about 0.7 GB for the "
        "default; GEMMA_EQX_CACHE moves it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cmd.add_argument("--model", default="gemma3-270m",
                     help="preset name, Kaggle handle, Hugging Face repo id, .gguf file, or "
                          "checkpoint or Hugging Face directory")
    cmd.add_argument("--text", default=None, metavar="DIGITS",
                     help="the digit string to repeat; without it, random strings of --period "
                          "digits drawn with --seed")
    cmd.add_argument("--period", type=int, default=20, help="length of random digit strings")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the random digit strings")
    cmd.add_argument("--top", type=int, default=10, metavar="K", help="heads to knock out")
    cmd.add_argument("--strings", type=int, default=8,
                     help="how many digit strings to score (the first is shown)")
    cmd.add_argument("--residual-stride", type=int, default=3, metavar="N",
                     help="patch the residual stream at every N-th layer and the last "
                     "(1: every layer; each layer costs one forward per position)")
    cmd.add_argument("--dictionary", default=None, metavar="SOURCE",
                     help="adds experiment 8: an SAE (a local Gemma Scope 1/2 or SAELens folder, "
                     "or a Hugging Face repo id with --dictionary-folder) spliced into the model; "
                     "which of its latents fire on the second occurrence of a repeated digit, "
                     "and what ablating them costs")
    cmd.add_argument("--dictionary-folder", default=None, metavar="FOLDER",
                     help="the folder inside the --dictionary repo; '{layer}' in it is replaced "
                     "by the top induction head's layer (e.g. "
                     "'attn_out/layer_{layer}_width_16k_l0_small')")
    cmd.add_argument("--latents", type=int, default=10, metavar="N",
                     help="how many latents experiment 8 ranks and ablates")
    cmd.add_argument("--circuit", action="store_true",
                     help="experiment 9: find the copying circuit automatically (EAP-IG over "
                     "every edge of the component graph, ACDC, its key edges checked by path "
                     "patching); about 6 minutes more on the 270M with 2 cores")
    cmd.add_argument("--transcoder", default=None, metavar="DIR",
                     help="with --circuit: a transcoder folder (reading mlp_in and writing "
                     "mlp_out_normed of one layer); experiment 9 adds the attribution graph of "
                     "the repeated digits over it (graph.png, and graph.json in "
                     "circuit-tracer's format)")
    cmd.add_argument("--out", default="induction-report", metavar="DIR",
                     help="the report's directory (created; the program's own files replaced)")
    cmd.add_argument("--distributed", action="store_true",
                     help="join a multi-host JAX cluster first (jax.distributed.initialize(): "
                     "start the same command on every host; detected on TPU slices and "
                     "SLURM); `gemma-eqx launch` does this for local processes")
    cmd.set_defaults(run=run_induction,
                     memory_advice="fewer --strings or a shorter --period (or --text)")


def _check_out(out: Path) -> None:
    """Fail before any work if the report could not be written there: the directory rules of
    `check_report_directory`, a dangling symlink, and a real write (a probe directory made and
    removed where the report's directory would be created). Nothing is left behind."""
    import tempfile

    from .report import check_report_directory

    try:
        check_report_directory(out)
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does "
                         f"not exist; create that directory or choose another --out")
    resolved = Path(os.path.realpath(out))
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out} is not writable ({existing} is a file, not a "
                         f"directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gemma-eqx-probe-", dir=existing))
    except OSError as e:
        raise PermissionError(f"--out {out} is not writable ({existing}: "
                              f"{e.strerror or e})") from None


def _enable_compilation_cache() -> None:
    """Keep XLA's compiled programs next to the converted models (or in
    GEMMA_EQX_COMPILE_CACHE), so a second run skips compilation (set
    GEMMA_EQX_NO_COMPILE_CACHE=1 to turn this off)."""
    if os.environ.get("GEMMA_EQX_NO_COMPILE_CACHE"):
        return
    from gemma_eqx.core.runtime import enable_compilation_cache
    from gemma_eqx.formats.pretrained import cache_dir

    chosen = os.environ.get("GEMMA_EQX_COMPILE_CACHE")
    if chosen and os.path.exists(chosen) and not os.path.isdir(chosen):
        raise ValueError(f"GEMMA_EQX_COMPILE_CACHE={chosen} is not a directory")
    enable_compilation_cache(Path(chosen or cache_dir() / "xla"))


def _check_dictionary_options(args: argparse.Namespace) -> bool:
    """Whether --dictionary-folder is a template (holds '{layer}'); its errors before any work."""
    import string

    folder = args.dictionary_folder
    if folder is None:
        return False
    if args.dictionary is None:
        raise ValueError("--dictionary-folder needs --dictionary (the repo id it is inside)")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(folder) if name is not None}
    except ValueError as e:
        raise ValueError(f"--dictionary-folder {folder!r}: {e}") from None
    if fields - {"layer"}:
        raise ValueError(f"--dictionary-folder {folder!r}: only '{{layer}}' is replaced; got "
                         f"{', '.join(sorted('{' + f + '}' for f in fields - {'layer'}))}")
    return "layer" in fields


def run_induction(args: argparse.Namespace) -> int:
    from gemma_eqx.cli import check_seed
    from gemma_eqx.core.checks import check_length
    from gemma_eqx.core.multihost import is_lead
    from gemma_eqx.formats.pretrained import from_pretrained

    from .report import summary_rows, write_report
    from .study import check_digits, check_top, elapsed_printer, run_study

    start = time.perf_counter()
    say = elapsed_printer()

    if args.text is not None:
        check_digits(args.text, 1 << 30, name="--text")
    for option, value, least in (("--period", args.period, 2), ("--top", args.top, 1),
                                 ("--strings", args.strings, 1),
                                 ("--residual-stride", args.residual_stride, 1),
                                 ("--latents", args.latents, 1)):
        if value < least:
            raise ValueError(f"{option} must be >= {least}; got {value}")
    check_seed(args.seed)
    template = _check_dictionary_options(args)
    if args.transcoder is not None and not args.circuit:
        raise ValueError("--transcoder draws experiment 9's attribution graph: it needs "
                         "--circuit")
    out = Path(args.out)
    _check_out(out)
    _enable_compilation_cache()
    say(f"loading {args.model}")
    model, tokenizer = from_pretrained(args.model)
    check_top(args.top, model, name="--top")
    if args.text is not None:
        check_digits(args.text, model.config.context_length, name="--text")
    else:
        check_length(1 + 2 * args.period, model.config.context_length,
                     f"--period {args.period} (BOS and two repetitions)")
    dictionary = None
    if args.dictionary is not None:
        from .features import load_dictionary

        def load_at(layer: int) -> Any:
            say(f"loading the dictionary {args.dictionary} "
                f"{args.dictionary_folder.format(layer=layer)}")
            return load_dictionary(args.dictionary, args.dictionary_folder.format(layer=layer))

        if args.dictionary_folder is None:
            say(f"loading the dictionary {args.dictionary}")
            dictionary = load_dictionary(args.dictionary)
        elif template:
            dictionary = load_at  # loaded once the top induction head's layer is known
        else:
            dictionary = load_at(0)  # loaded and checked before the study's work
    transcoder = None
    if args.transcoder is not None:
        from .features import load_dictionary

        say(f"loading the transcoder {args.transcoder}")
        transcoder = load_dictionary(args.transcoder)
    result = run_study(
        model, tokenizer, digits=args.text, period=args.period, seed=args.seed, top=args.top,
        strings=args.strings, model_name=os.fspath(args.model), progress=say,
        residual_stride=args.residual_stride, dictionary=dictionary, latents=args.latents,
        circuit=args.circuit, transcoder=transcoder,
    )
    say("writing the report")
    path = write_report(result, out)  # by process 0 alone in a multi-process cluster
    if not is_lead():
        return 0
    original, knocked = result.behaviour.repetitions, result.knockout.repetitions
    print(f"\nInduction heads in {result.preset} ({args.model})")
    print(f"  copying accuracy, repetition 1 -> 2: {original.accuracy[0]:.2f} -> "
          f"{original.accuracy[1]:.2f}; top {args.top} heads knocked out: "
          f"{knocked.accuracy[1]:.2f}")
    print("  top heads (layer, head, induction score): " + ", ".join(
        f"({h.layer}, {h.head}, {h.score:.2f})" for h in result.scores.ranked[:5]))
    minimal = result.minimal_set
    verdict = "broken" if minimal.broken else "not broken"
    print(f"  smallest breaking set: {list(minimal.heads)} (accuracy {minimal.accuracy:.2f}, "
          f"{verdict})")
    print(f"  {'example':<20} {'original':>9} {'top out':>9} {'control':>9}")
    for name, *cells in summary_rows(result):
        print(f"  {name:<20} " + " ".join(f"{c:>9}" for c in cells))
    print("  path analysis, relative logit of the correct digit: " + ", ".join(
        f"{w.world} {w.relative_logit:.2f}" for w in result.path_analysis.worlds))
    print("  patched between inputs (argmax = the digit copied under the patch, vs unpatched): "
          + ", ".join(f"{p.name} {p.copy_accuracy:.2f} vs {p.baseline_copy_accuracy:.2f}"
                      for p in result.counterfactual.patches))
    if result.features is not None:
        f = result.features
        print(f"  features ({f.site} of layer {f.layer}): latents " + ", ".join(
            str(x.latent) for x in f.latents[:5]) + f"; all {len(f.latents)} ablated: log-prob "
            f"{f.baseline_logprob:.2f} -> {f.all_ablated_logprob:.2f}")
    if result.circuit is not None:
        c = result.circuit
        print(f"  circuit: {len(c.circuit)} edges (faithfulness {c.circuit_faithfulness:.2f}); "
              + "; ".join(f"{x.edge} {'holds' if x.holds else 'not confirmed'} by path "
                          f"patching ({x.path_fraction:.2f})" for x in c.claims))
    print(f"  report: {path / 'report.html'}  ({time.perf_counter() - start:.1f}s in all)")
    return 0


TUTORIAL = "induction_heads.ipynb"


def tutorial_path() -> Path:
    """The tutorial notebook shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("interp").joinpath("tutorial", TUTORIAL)))


def add_tutorial_command(commands: Any) -> None:
    cmd = commands.add_parser(
        "tutorial", help="copy the step-by-step induction-heads notebook into DIR",
        description="Copy the tutorial notebook (the induction-head study step by step on the "
        "real Gemma 3 270M) into DIR; open it with Jupyter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cmd.add_argument("dir", nargs="?", default=".", help="where to put " + TUTORIAL)
    cmd.set_defaults(run=run_tutorial, memory_advice="")


def run_tutorial(args: Any) -> int:
    from gemma_eqx.core.atomic import replace_file

    source = tutorial_path()
    target = Path(args.dir) / TUTORIAL
    if target.exists() and target.read_bytes() != source.read_bytes():
        raise FileExistsError(f"{target} exists and differs from the tutorial (your edits?); "
                              f"move it away or choose another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    with replace_file(target) as tmp:
        tmp.write_bytes(source.read_bytes())
    print(f"wrote {target}; open it with `jupyter lab {target}` (pip install jupyterlab)")
    return 0
