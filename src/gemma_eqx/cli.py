"""The `gemma-eqx` command line: `generate` (and, from `interp`, `induction`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate(args: argparse.Namespace) -> int:
    import jax

    from .generate import generate_text
    from .pretrained import from_pretrained

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
    gen = commands.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="gemma3-270m",
                     help="preset name, Kaggle handle, .gguf file or checkpoint directory")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate)
    from interp.cli import add_induction_command  # interp ships in the same distribution

    add_induction_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pretrained import ModelUnavailableError

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, PermissionError, ModelUnavailableError) as e:
        print(f"gemma-eqx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
