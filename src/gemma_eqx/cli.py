"""The `gemma-eqx` command line: `generate` (and, from `interp`, `induction`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence


def _generate(args: argparse.Namespace) -> int:
    import jax

    from .generate import check_sampling, generate_text
    from .pretrained import from_pretrained

    # Checked before the model loads, so a typo costs nothing.
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    model, tokenizer = from_pretrained(args.model)
    key = jax.random.key(args.seed) if args.temperature > 0 else None
    (text,) = generate_text(
        model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key,
    )
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-eqx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("prompt")
    gen.add_argument("--model", default="gemma3-270m",
                     help="preset name, Kaggle handle, Hugging Face repo id, .gguf file, or "
                          "checkpoint or Hugging Face directory")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate,
                     memory_advice="a shorter prompt or a smaller --max-new-tokens")
    from interp.cli import add_induction_command, add_tutorial_command  # the same distribution

    add_induction_command(commands)
    add_tutorial_command(commands)
    return parser


def out_of_memory_message(error: BaseException, advice: str) -> str | None:
    """One line for XLA's out-of-memory error (how much was asked, what to try), else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return None
    asked = re.search(r"allocat\w* (\d+) bytes", text)
    size = f" {int(asked[1]) / 2**30:.1f} GiB at once" if asked else " more than there is"
    return (f"out of memory: the computation asked for{size}; try {advice}, or a machine "
            f"with more memory")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a bad argument, a missing or corrupted file, a full disk or an
    out-of-memory prints one line and exits 2 (an interrupt exits 130)."""
    args = build_parser().parse_args(argv)
    from .runtime import tune_cpu_flags

    tune_cpu_flags()  # before JAX starts its backend
    import jax

    from .pretrained import ModelUnavailableError

    def fail(message: object) -> int:
        print(f"gemma-eqx {args.command}: error: {message}", file=sys.stderr)
        return 2

    try:
        return args.run(args)
    except ModelUnavailableError as e:  # no network or credentials: a directory is the way out
        return fail(str(e).replace("pass its directory to from_pretrained",
                                   "pass its directory with --model DIR")
                    .replace("and pass the directory", "and pass it with --model DIR"))
    except (ValueError, OSError) as e:  # bad input, files, cache
        return fail(e)
    except jax.errors.JaxRuntimeError as e:
        message = out_of_memory_message(e, args.memory_advice)
        if message is None:
            raise
        return fail(message)
    except KeyboardInterrupt:
        print(f"gemma-eqx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
