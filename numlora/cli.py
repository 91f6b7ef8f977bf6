"""The ``numlora`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="numlora", description="LoRA and QLoRA kernels over numpy arrays.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="fine-tune a QLoRA adapter on real data (scikit-learn's digits), end to end",
                       description="Train a small MLP on scikit-learn's bundled digits images, freeze and quantize it "
                                   "to NF4, train LoRA adapters on its layers to read the digits rotated by 90 "
                                   "degrees (a task the base does not solve), merge, and save the adapter as a PEFT "
                                   "folder. No network needed; deterministic for a given --seed.")
    d.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and the shuffling "
                                                       "(default 0)")
    d.add_argument("--out", default=None, metavar="DIR",
                   help="PEFT folder for the trained adapter (default ./numlora-demo-adapter; an adapter saved "
                        "there before is replaced, and the demo says so)")
    d.add_argument("--epochs", type=int, default=20, help="epochs of adapter training (default 20)")
    d.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    d.add_argument("--base-epochs", type=int, default=20, help=argparse.SUPPRESS)
    d.add_argument("--hidden", type=int, default=256, help=argparse.SUPPRESS)

    b = sub.add_parser("bench", help="time numlora against numpy baselines; print a Markdown table")
    b.add_argument("--size", type=int, default=4096, help="weight is SIZE x SIZE (default 4096)")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    b.add_argument("--repeat", type=int, default=7, help="timed runs per competitor (default 7)")
    b.add_argument("--batch", type=int, action="append", help="batch size(s) (default 1, 8, 128 and 1024)")
    b.add_argument("--no-peers", action="store_true", help="skip torch / PEFT / bitsandbytes even if installed")
    b.add_argument("--compile", action="store_true", help="also measure first-call compile times")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--train", action="store_true",
                   help="time a training step instead (forward + backward + AdamW, dense and NF4 base) against "
                        "hand-written numpy and torch + PEFT / bitsandbytes; one --batch (default 128)")
    b.add_argument("--multi", action="store_true",
                   help="time many adapters in one batch (LoraBank) on Punica's workloads against a numpy "
                        "gather-einsum and PEFT's mixed-batch forward; with --quick only batch 64 x 64 "
                        "adapters; --repeat rounds (default 5)")
    b.add_argument("--quick", action="store_true", help="with --multi: the issue's figures only")

    m = sub.add_parser("merge", help="merge a PEFT LoRA adapter into a safetensors checkpoint, tensor by tensor",
                       description="Write BASE with the adapter merged (W + s B A) to OUT. BASE is a .safetensors "
                                   "file or a model folder (single or sharded); ADAPTER a PEFT adapter folder.")
    m.add_argument("base", metavar="BASE")
    m.add_argument("adapter", metavar="ADAPTER")
    m.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .safetensors file for a file, a folder for a model folder")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="store every floating tensor in this dtype (default: keep each tensor's dtype)")
    m.add_argument("--overwrite", action="store_true", help="replace a previous output at OUT (never an input, nor a path that contains or lies inside one)")
    m.add_argument("--json", action="store_true", help="print the report as JSON")

    q = sub.add_parser("quantize", help="quantize a checkpoint's Linear weights to NF4 (bitsandbytes layout)",
                       description="Quantize 2-D floating *.weight tensors (not embeddings or norms, unless "
                                   "--include says so) to NF4 and copy the rest.")
    q.add_argument("input", metavar="INPUT")
    q.add_argument("-o", "--output", required=True, metavar="OUT")
    q.add_argument("--blocksize", type=int, default=64, help="elements per NF4 block (default 64)")
    q.add_argument("--double-quant", action="store_true", help="also quantize the block scales to 8 bits")
    q.add_argument("--include", metavar="REGEX", help="quantize only tensors whose name matches (re.search)")
    q.add_argument("--exclude", metavar="REGEX", help="do not quantize tensors whose name matches")
    q.add_argument("--overwrite", action="store_true", help="replace a previous output at OUT (never an input, nor a path that contains or lies inside one)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")

    i = sub.add_parser("inspect", help="describe a PEFT adapter folder or a checkpoint")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
            if args.epochs < 1 or args.base_epochs < 1 or args.seed < 0:
                parser.error("--epochs must be >= 1 and --seed >= 0")
            if not 1 <= args.rank <= 10:
                parser.error("--rank must be in 1..10 (the last layer has 10 outputs)")
            if args.hidden < 16:
                parser.error("--hidden must be >= 16")
            from .demo import DEFAULT_OUT, main as demo

            return demo(seed=args.seed, out_dir=args.out or DEFAULT_OUT, epochs=args.epochs,
                        base_epochs=args.base_epochs, rank=args.rank, hidden=args.hidden)
        if args.command == "bench":
            if args.size < 64 or args.rank < 1 or args.repeat < 1:
                parser.error("--size must be >= 64, --rank and --repeat >= 1")
            if args.multi:
                from .bench.multi import main as bench_multi

                argv2 = ["--repeats", str(args.repeat if args.repeat != 7 else 5)]
                argv2 += ["--quick"] if args.quick else []
                argv2 += ["--json", args.json] if args.json else []
                return bench_multi(argv2) or 0
            if args.train:
                if args.batch and len(args.batch) > 1:
                    parser.error("--train takes one --batch")
                from .bench import main_train

                return main_train(args)
            from .bench import main as bench

            return bench(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "inspect":
            from .convert import format_inspect, inspect_path

            info = inspect_path(args.path)
            print(json.dumps(info, indent=2) if args.json else format_inspect(info))
            return 0
    except NumloraError as exc:
        print(f"numlora: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _merge(args) -> int:
    from .convert import merge_checkpoint

    rep = merge_checkpoint(args.base, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(f"merged {len(rep.merged)} LoRA modules, copied {rep.copied} tensors unchanged"
              f"{f', converted {rep.converted}' if rep.converted else ''} in {rep.seconds:.2f} s -> {rep.output}")
    return 0


def _quantize(args) -> int:
    from .convert import quantize_checkpoint, select_for_quantization
    from .io.checkpoint import Checkpoint

    if not args.json:
        with Checkpoint(args.input) as ck:
            chosen = select_for_quantization(ck.infos(), args.include, args.exclude)
        shown = chosen if len(chosen) <= 12 else chosen[:6] + [f"... ({len(chosen) - 12} more) ..."] + chosen[-6:]
        print(f"quantizing {len(chosen)} tensors to NF4:", *shown, sep="\n  ")
    rep = quantize_checkpoint(args.input, args.output, blocksize=args.blocksize, double_quant=args.double_quant,
                              include=args.include, exclude=args.exclude, overwrite=args.overwrite)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
