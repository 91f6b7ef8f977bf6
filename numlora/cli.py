"""The ``numlora`` command."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="numlora", description="LoRA and QLoRA kernels over numpy arrays.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="run the LoRA / QLoRA scenario end to end on generated weights")
    d.add_argument("--seed", type=int, default=0, help="seed of the generated weights (default 0)")
    d.add_argument("--size", type=int, default=1024, help="weights are SIZE x SIZE (default 1024)")

    b = sub.add_parser("bench", help="time numlora against numpy baselines; print a Markdown table")
    b.add_argument("--size", type=int, default=4096, help="weight is SIZE x SIZE (default 4096)")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    b.add_argument("--repeat", type=int, default=7, help="timed runs per competitor (default 7)")
    b.add_argument("--batch", type=int, action="append", help="batch size(s) (default 1, 8, 128 and 1024)")
    b.add_argument("--no-peers", action="store_true", help="skip torch / PEFT / bitsandbytes even if installed")
    b.add_argument("--compile", action="store_true", help="also measure first-call compile times")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import NumloraError

    try:
        if args.command == "demo":
            if args.size < 16:
                parser.error("--size must be at least 16")
            from .demo import main as demo

            return demo(seed=args.seed, size=args.size)
        if args.command == "bench":
            if args.size < 64 or args.rank < 1 or args.repeat < 1:
                parser.error("--size must be >= 64, --rank and --repeat >= 1")
            from .bench import main as bench

            return bench(args)
    except NumloraError as exc:
        print(f"numlora: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
