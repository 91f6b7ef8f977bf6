"""The ``numlora`` command.

Exit status: 0 done, 2 an error (one line ``numlora: error: ...`` on stderr, nothing
written), 130 / 143 interrupted by SIGINT / SIGTERM (nothing written), 1 stdout closed
early (``numlora inspect --json DIR | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numlora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import numlora

        return str(getattr(numlora, "__version__", "unknown (not installed)"))


def _batch_sizes(text: str) -> list[int]:
    """``--batch`` values: one size or a comma list (``1,8,128``), each a positive int."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or a comma list such as 1,8,128, "
                                         f"got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _blocksize(text: str) -> int:
    from .errors import NumloraError
    from .nf4 import check_blocksize

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return check_blocksize(value, "--blocksize")
    except NumloraError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="numlora", description="LoRA and QLoRA kernels over numpy arrays.")
    p.add_argument("--version", action="version", version=f"numlora {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="fine-tune a QLoRA adapter on real data (handwritten digits), end to end",
                       description="Train a small MLP on the 8 x 8 handwritten digits shipped with numlora (UCI's, "
                                   "as scikit-learn distributes them), freeze and quantize it "
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

    b = sub.add_parser("bench", help="time numlora against numpy baselines; print a Markdown table",
                       description="Time numlora's kernels (LoRA forward, QLoRA / NF4 matmul, merge, quantize) "
                                   "against plain numpy and, when installed, torch + PEFT / bitsandbytes, on "
                                   "random weights of the given size; print a Markdown table of the medians. "
                                   "--train times a training step instead, --multi many adapters in one batch.")
    b.add_argument("--size", type=int, default=4096, help="weight is SIZE x SIZE (default 4096)")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    b.add_argument("--repeat", type=int, default=7, help="timed runs per competitor (default 7)")
    b.add_argument("--batch", type=_batch_sizes, action="append",
                   help="batch size; for several, repeat the option or give a comma list (--batch 1 --batch 64, "
                        "or --batch 1,64) (default 1, 8, 128 and 1024)")
    b.add_argument("--no-peers", action="store_true", help="skip torch / PEFT / bitsandbytes even if installed")
    b.add_argument("--compile", action="store_true", help="also measure first-call compile times")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--train", action="store_true",
                   help="time a training step instead (forward + backward + AdamW, dense and NF4 base) against "
                        "hand-written numpy and torch + PEFT / bitsandbytes; one --batch (default 128)")
    b.add_argument("--multi", action="store_true",
                   help="time many adapters in one batch (LoraBank) on Punica's workloads against a numpy "
                        "gather-einsum and PEFT's mixed-batch forward (--no-peers: without PEFT); with --quick "
                        "only batch 64 x 64 adapters; --repeat rounds (default 5)")
    b.add_argument("--pipeline", action="store_true",
                   help="time numlora's layers inside a transformer-block-shaped numpy model run back to back "
                        "(forward and a training step, batches 1, 8, 128): each numlora call inside against "
                        "isolated, each numpy product against a phase without numlora, the whole pass against "
                        "torch + PEFT + bitsandbytes; --size sets d_model (default 1024, d_ff 4 x d_model)")
    b.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"],
                   help="with --pipeline: the QLoraLinear layers' compute dtype (default float32; bitsandbytes' "
                        "Linear4bit computes in bfloat16 in eval mode on CPUs with AVX512-BF16)")
    b.add_argument("--quick", action="store_true",
                   help="a smoke run in every mode (its ratios are not the documented ones): the kernel table "
                        "and --train on SIZE at most 1024 with at most 3 rounds (the table: batches 1 and 128 "
                        "unless --batch); --multi on batch 64 x 64 adapters only")

    m = sub.add_parser("merge", help="merge a PEFT LoRA adapter into a safetensors checkpoint, tensor by tensor",
                       description="Write BASE with the adapter merged (W + s B A) to OUT. BASE is a .safetensors "
                                   "file or a model folder (single or sharded); ADAPTER a PEFT adapter folder.")
    m.add_argument("base", metavar="BASE")
    m.add_argument("adapter", metavar="ADAPTER")
    m.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .safetensors file for a file, a folder for a model folder")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="store every floating tensor in this dtype (default: keep each tensor's dtype)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a previous output at OUT (never an input, nor a path that contains or lies "
                        "inside one)")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    _dask_arguments(m)

    q = sub.add_parser("quantize", help="quantize a checkpoint's Linear weights to NF4 / FP4 (bitsandbytes layout)",
                       description="Quantize 2-D floating *.weight tensors (not embeddings or norms, unless "
                                   "--include says so) to NF4 (or FP4) and copy the rest.")
    q.add_argument("input", metavar="INPUT")
    q.add_argument("-o", "--output", required=True, metavar="OUT")
    q.add_argument("--blocksize", type=_blocksize, default=64,
                   help="elements per NF4 block, 2 ... 2**20 (default 64, as bitsandbytes)")
    q.add_argument("--double-quant", action="store_true", help="also quantize the block scales to 8 bits")
    q.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4",
                   help="the 4-bit code book, as bitsandbytes' bnb_4bit_quant_type (default nf4)")
    q.add_argument("--no-error-stats", dest="error_stats", action="store_false",
                   help="skip the reconstruction-error pass (faster; bf16 weights are then quantized straight "
                        "from their bits); the output is the same")
    q.add_argument("--include", metavar="REGEX", help="quantize only tensors whose name matches (re.search)")
    q.add_argument("--exclude", metavar="REGEX", help="do not quantize tensors whose name matches")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a previous output at OUT (never an input, nor a path that contains or lies "
                        "inside one)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    _dask_arguments(q)

    wu = sub.add_parser("warmup", help="compile every kernel once (in parallel processes), so later programs "
                                       "load them from numba's cache",
                        description="Run every public numlora path once on small inputs, one job per kernel "
                                    "family in parallel processes, so numba's on-disk cache (next to the package, "
                                    "or NUMBA_CACHE_DIR) holds the compiled kernels and a later process pays no "
                                    "compile time. Run it after installing or upgrading numlora or numba.")
    wu.add_argument("--jobs", type=int, default=None, help="parallel processes (default: the CPU count)")
    i = sub.add_parser("inspect", help="describe a PEFT adapter folder or a checkpoint",
                       description="Describe PATH without changing it: for a PEFT adapter folder its modules "
                                   "(rank, alpha, scaling, shapes, parameters); for a .safetensors file or a model "
                                   "folder (single or sharded) its tensors by dtype, size, shards, metadata and "
                                   "the NF4 tensors it holds. Reads the headers and NF4 states, not the weights.")
    i.add_argument("path", metavar="PATH", help="a PEFT adapter folder, a .safetensors file or a model folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of worker processes, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 worker, got {n}")
    return n


def _dask_arguments(p) -> None:
    """--scheduler / --workers of merge and quantize (the optional Dask extra)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="convert the shards of a model folder as tasks on this Dask scheduler (tcp://host:8786); "
                        "its workers must see the input and output paths (needs numlora[dask])")
    g.add_argument("--workers", type=_workers, metavar="N",
                   help="convert the shards of a model folder as Dask tasks on a local cluster of N worker "
                        "processes (needs numlora[dask])")


def _fragile(frame) -> bool:
    """True when ``frame`` (where a signal struck) is inside numba / llvmlite (a compile
    or a cache load: not written to survive an exception at any bytecode; interrupted, it
    leaves half-built objects whose finalizers print tracebacks at exit) or inside a
    finalizer (where Python prints an exception and drops it)."""
    while frame is not None:
        mod = frame.f_globals.get("__name__", "") or ""
        if mod.startswith(("numba", "llvmlite")) or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _job_signals():
    """For the duration of a command: SIGINT and SIGTERM raise
    :class:`numlora.io.atomic.Interrupted` (a KeyboardInterrupt) once, so every abort
    path runs. A signal arriving during a job's final commit or a cleanup is noted and
    does not cut them short; one striking inside numba / llvmlite or a finalizer is noted
    (a job stops at its next check between tensors) and delivered again 20 ms later.
    SIGXFSZ is ignored, so a file-size limit makes ``write`` fail with EFBIG instead of
    killing the process with its temporary files. The previous handlers are restored
    afterwards; signals ignored when numlora started (``nohup``) stay ignored."""
    from .io import atomic

    state = {"late": [], "timers": []}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def again(signum):
        t = threading.Timer(0.02, os.kill, (os.getpid(), signum))
        t.daemon = True
        state["timers"].append(t)
        t.start()

    def handler(signum, frame):
        if state.get("closing") or atomic.interrupt_raised() or atomic.interrupts_deferred():
            state["late"].append(signum)
            return
        atomic.request_interrupt(signum)
        if _fragile(frame):
            again(signum)
            return
        atomic.raise_interrupt(signum)

    old = {}
    atomic.reset_interrupts()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, handler)
        if hasattr(signal, "SIGXFSZ"):
            old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        yield state
    finally:
        state["closing"] = True
        for t in state["timers"]:
            t.cancel()
        for t in state["timers"]:
            t.join()
        _ = [None for _ in range(2)]  # a few bytecodes: a signal a timer just sent runs the handler above
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
        atomic.reset_interrupts()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _stdout_gone() -> None:
    """stdout's reader went away (``| head``): send what is left to /dev/null, so that the
    interpreter's final flush does not fail too (the recipe in Python's signal docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _error(text: str) -> None:
    try:
        print(f"numlora: error: {text}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import NumloraError
    from .io._files import describe_os_error

    if getattr(args, "batch", None):
        args.batch = [b for group in args.batch for b in group]
    writes = args.command in ("merge", "quantize", "demo")
    with _job_signals() as state:
        try:
            rc = _run(parser, args)
            sys.stdout.flush()
        except NumloraError as exc:
            _error(exc)
            return 2
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            tail = "; the partial output was removed, the inputs are untouched" if writes else ""
            _error(f"interrupted by {_signal_name(signum)}{tail}")
            return 128 + int(signum)
        except BrokenPipeError:
            _stdout_gone()
            return 1
        except MemoryError:
            hint = ("; merge / quantize hold one tensor at a time (as float32, a few times over)"
                    if args.command in ("merge", "quantize") else "")
            _error(f"{args.command}: out of memory{hint}")
            return 2
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            _error(f"{args.command} failed:{where} {describe_os_error(exc)}")
            return 2
        if state["late"]:
            names = ", ".join(sorted({_signal_name(s) for s in state["late"]}))
            print(f"numlora: {names} arrived after the output was complete; it was kept", file=sys.stderr)
    return rc


def _run(parser, args) -> int:
    if args.command == "demo":
        if args.epochs < 1 or args.base_epochs < 1 or args.seed < 0:
            parser.error("--epochs must be >= 1 and --seed >= 0")
        if not 1 <= args.rank <= 10:
            parser.error("--rank must be in 1..10 (the last layer has 10 outputs)")
        if args.hidden < 16:
            parser.error("--hidden must be >= 16")
        from .demo import DEFAULT_OUT
        from .demo import main as demo

        return demo(seed=args.seed, out_dir=args.out or DEFAULT_OUT, epochs=args.epochs,
                    base_epochs=args.base_epochs, rank=args.rank, hidden=args.hidden)
    if args.command == "bench":
        if args.size < 64 or args.rank < 1 or args.repeat < 1:
            parser.error("--size must be >= 64, --rank and --repeat >= 1")
        if args.compute_dtype and not args.pipeline:
            parser.error("--compute-dtype applies to --pipeline only (the main table has bf16 / fp16 rows)")
        from .bench.harness import start_threads

        start_threads(peers=not args.no_peers)
        if args.multi:
            from .bench.multi import main as bench_multi

            argv2 = ["--repeats", str(args.repeat if args.repeat != 7 else 5)]
            argv2 += ["--quick"] if args.quick else []
            argv2 += ["--json", args.json] if args.json else []
            argv2 += ["--no-peers"] if args.no_peers else []
            return bench_multi(argv2) or 0
        if args.pipeline:
            from .bench.pipeline import main as bench_pipeline

            return bench_pipeline(args)
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
    if args.command == "warmup":
        if args.jobs is not None and args.jobs < 1:
            parser.error("--jobs must be >= 1")
        return _warmup(args)
    if args.command == "inspect":
        from .convert import format_inspect, inspect_path

        info = inspect_path(args.path)
        print(json.dumps(info, indent=2) if args.json else format_inspect(info))
        return 0
    return 0


def _warmup(args) -> int:
    import time

    from .warmup import warmup

    t0 = time.perf_counter()
    seconds = warmup(jobs=args.jobs)
    slowest = max(seconds, key=seconds.get)
    print(f"compiled {len(seconds)} kernel families in {time.perf_counter() - t0:.1f} s "
          f"(slowest: {slowest}, {seconds[slowest]:.1f} s); later processes load them from numba's cache")
    return 0


def _merge(args) -> int:
    from .convert import merge_checkpoint

    rep = merge_checkpoint(args.base, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite,
                           scheduler=args.scheduler, workers=args.workers)
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
        print(f"quantizing {len(chosen)} tensors to {args.quant_type.upper()}:", *shown, sep="\n  ")
    rep = quantize_checkpoint(args.input, args.output, blocksize=args.blocksize, double_quant=args.double_quant,
                              include=args.include, exclude=args.exclude, overwrite=args.overwrite,
                              scheduler=args.scheduler, workers=args.workers, quant_type=args.quant_type,
                              error_stats=args.error_stats)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
