"""The `gemma-eqx` command line: `generate`, `launch`, and the subcommands other packages
register (`interp`: `induction`, `tutorial`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any


def _generate(args: argparse.Namespace) -> int:
    import jax

    from .formats.pretrained import from_pretrained
    from .model.generate import check_sampling, generate_text

    # Checked before the model loads, so a typo costs nothing.
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    check_seed(args.seed)
    model, tokenizer = from_pretrained(args.model)
    key = jax.random.key(args.seed) if args.temperature > 0 else None
    (text,) = generate_text(
        model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key,
    )
    print(text)
    return 0


def check_seed(seed: int, name: str = "--seed") -> None:
    """A seed JAX's and numpy's generators both take: a 64-bit non-negative integer."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63); got {seed}")


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
    add_registered_commands(commands)
    launch = commands.add_parser(
        "launch", help="run a gemma-eqx command as several processes of one JAX cluster",
        description="Start the command after `--` (e.g. `induction --out report`) as "
        "--processes local processes joined into one JAX cluster, as on several hosts; process "
        "0 writes and prints. If one process dies, the others stop within "
        "GEMMA_EQX_HEARTBEAT_SECONDS (10). On a real multi-host cluster, run the command itself "
        "on every host with --distributed instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    launch.add_argument("--processes", type=int, default=2)
    launch.add_argument("--devices-per-process", type=int, default=None, metavar="N",
                        help="simulate N CPU devices in each process (default: the real ones)")
    launch.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    launch.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    launch.set_defaults(run=_launch, memory_advice="fewer processes or devices")
    return parser


COMMANDS_GROUP = "gemma_eqx.commands"


def add_registered_commands(commands: Any) -> None:
    """The subcommands other packages register under the entry-point group
    `gemma_eqx.commands` (`interp` registers `induction` and `tutorial`), each entry a function
    that adds its parser to `commands`. This package imports none of them by name, so it
    stands without the packages built on it; one that cannot be imported still shows, and
    says why when run."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            add = entry.load()
        except ImportError as e:
            reason = f"{entry.value} cannot be imported ({e})"
            stub = commands.add_parser(entry.name, help=f"unavailable: {reason}")
            stub.set_defaults(run=lambda args, reason=reason: _unavailable(reason),
                              memory_advice="")
            continue
        add(commands)


def _unavailable(reason: str) -> int:
    raise ValueError(f"this command is not available here: {reason}")


def _launch(args: argparse.Namespace) -> int:
    from .core.multihost import launch

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if not rest or rest[0] == "launch":
        raise ValueError("give the command to run after --, e.g. `gemma-eqx launch -- "
                         "induction --out report`")
    result = launch([sys.executable, "-m", "gemma_eqx.cli", *rest], args.processes,
                    devices_per_process=args.devices_per_process, timeout=args.timeout)
    if result.ok:
        return 0
    print(f"gemma-eqx launch: {result.describe()}", file=sys.stderr)
    if result.stopped_by is not None:
        return 128 + result.stopped_by
    return 124 if result.timed_out else 1


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
    import logging
    import os

    def fail(message: object) -> int:
        print(f"gemma-eqx {args.command}: error: {message}", file=sys.stderr)
        return 2

    level = os.environ.get("GEMMA_EQX_LOG_LEVEL", "WARNING").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        return fail(f"GEMMA_EQX_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL; "
                    f"got {os.environ['GEMMA_EQX_LOG_LEVEL']!r}")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from .core.runtime import tune_cpu_flags

    tune_cpu_flags()  # before JAX starts its backend
    import jax

    from .core import multihost
    from .formats.pretrained import ModelUnavailableError

    try:
        if args.command != "launch" and (multihost.requested()
                                         or getattr(args, "distributed", False)):
            multihost.initialize()  # before any computation: every process runs this command
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
