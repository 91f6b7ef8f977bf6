"""The code blocks of README.md and docs/*.md, as tests/test_docs.py runs them.

A fenced block's language decides what happens to it:

- ``python``: executed with ``exec`` in a fresh namespace, in an empty temporary folder
  that is the working directory while it runs.
- ``bash`` / ``sh`` / ``shell``: run as they stand by ``bash -e -o pipefail`` in an empty
  temporary folder (the interpreter's ``bin`` folder first on ``PATH``, so ``python`` and
  ``numlora`` are the ones under test). ``console``: the lines that start with ``$ `` are
  the commands, the others are their output (not compared).
- ``text`` or no language: not code (formulas, command synopses, tables of bytes); not run.
- anything else: the test fails, so that a new kind of block is decided on, not ignored.

An HTML comment on the line(s) just before a fence changes that (it does not show on the
rendered page):

- ``<!-- docs-test: continue -->``: the block runs after the previous code block of the
  same page, in its namespace and its folder (the page says so in its text). README.md
  does not use it: each of its blocks runs alone.
- ``<!-- docs-test: peer -->``: the block uses torch / PEFT / bitsandbytes / transformers
  (the other side of docs/for-peft-users.md); it runs where the ``peers`` extra is
  installed (``pip install -e ".[test,peers]"``). Where it is not, the block is left out
  and the rest of its chain still runs; the test then reports a skip that names what is
  missing and the extra that brings it. So no other block may depend on a `peer` block.
- ``<!-- docs-test: gpu -->``: a GPU example; it runs in a subprocess on numba's CUDA
  simulator (``NUMBA_ENABLE_CUDASIM=1``) with tiny launch sizes, so at the page's small
  sizes it takes seconds. The simulator checks that the example is right, not that it is fast.
- ``<!-- docs-test: dask -->``: the chain needs the ``dask`` extra (dask, distributed);
  where it is missing the chain is skipped with a reason naming ``pip install -e '.[dask]'``.
- ``<!-- docs-test: gpu-only REASON -->``: needs a real GPU; counted as not run.
- ``<!-- docs-test: skip REASON -->``: not run, for the reason given (installs, or tools
  that download gigabytes); counted, and tests/test_docs.py caps the count.

Markers may be combined (``<!-- docs-test: gpu continue -->``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN_LANGS = {"python", "bash", "sh", "shell", "console"}
TEXT_LANGS = {"", "text"}
FLAGS = {"continue", "peer", "gpu", "dask"}
REASONED = {"skip", "gpu-only"}
PEERS = ("torch", "peft", "bitsandbytes", "transformers")
PEERS_HINT = "pip install -e '.[test,peers]'"

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    path: str            # relative to the repository root
    line: int            # 1-based line of the opening fence
    lang: str
    code: str
    flags: set = field(default_factory=set)
    skip: str | None = None       # reason, for `skip`
    gpu_only: str | None = None   # reason, for `gpu-only`

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS and self.skip is None and self.gpu_only is None


def _parse_mark(body: str, where: str):
    words = body.split()
    flags, skip, gpu_only = set(), None, None
    i = 0
    while i < len(words):
        w = words[i]
        if w in FLAGS:
            flags.add(w)
            i += 1
        elif w in REASONED:
            reason = " ".join(words[i + 1:])
            if not reason:
                raise ValueError(f"{where}: docs-test: {w} needs a reason")
            if w == "skip":
                skip = reason
            else:
                gpu_only = reason
            break
        else:
            raise ValueError(f"{where}: unknown docs-test marker {w!r} (known: {sorted(FLAGS | REASONED)})")
    return flags, skip, gpu_only


def parse(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the markers just before it."""
    rel = path.resolve().relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), m.group("lang").lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m.group("indent")):] if lines[i].startswith(m.group("indent")) else lines[i])
            i += 1
        i += 1  # the closing fence
        flags, skip, gpu_only = set(), None, None
        j = start - 1
        while j >= 0 and (mk := _MARK.match(lines[j])):
            f, s, g = _parse_mark(mk.group("body"), f"{rel}:{j + 1}")
            flags |= f
            skip = skip or s
            gpu_only = gpu_only or g
            j -= 1
        blocks.append(Block(rel, start + 1, lang, "\n".join(body) + "\n", flags, skip, gpu_only))
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse(p)]


def chains(blocks: list[Block]) -> list[list[Block]]:
    """Runnable blocks grouped: a `continue` block joins the chain of the code block before it
    on the same page."""
    out: list[list[Block]] = []
    prev: Block | None = None
    for b in blocks:
        if b.lang in TEXT_LANGS:
            continue
        if "continue" in b.flags:
            if prev is None or prev.path != b.path or not prev.runs or not out or out[-1][-1] is not prev:
                raise ValueError(f"{b.id}: `continue` after a block that does not run, or on a page's first block")
            out[-1].append(b)
        elif b.runs:
            out.append([b])
        prev = b
    return out


def missing_dask() -> list[str]:
    """The packages of the ``dask`` extra that are not installed (a `dask` chain needs them)."""
    return [p for p in ("dask", "distributed") if importlib.util.find_spec(p) is None]


def missing_peers() -> list[str]:
    """The packages of the ``peers`` extra that are not installed (a `peer` block needs them all)."""
    return [p for p in PEERS if importlib.util.find_spec(p) is None]


def shell_script(b: Block) -> str:
    if b.lang == "console":
        return "\n".join(line[2:] for line in b.code.splitlines() if line.startswith("$ ")) + "\n"
    return b.code


def child_env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("NUMBA_DISABLE_JIT", None)
    return env


def run_shell(b: Block, cwd: Path, timeout: float = 300) -> str:
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", shell_script(b)], cwd=cwd, env=child_env(),
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode:
        raise AssertionError(f"{b.id}: exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}"
                             f"\n--- stderr\n{r.stderr[-4000:]}")
    return r.stdout


# Tiny launch sizes for the simulator (one Python thread per CUDA thread), as
# tests/cuda_sim.py's tiny_blocks fixture sets them for the GPU tests.
SIM_PRELUDE = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from sim_patch import lock_simulator_shared_arrays
lock_simulator_shared_arrays()
from numlora.cuda import kernels as K
K.THREADS, K.REDUCE_THREADS, K.SHRINK_THREADS = 8, 4, 4
K.GEMV_THREADS, K.GEMV_ROWS = 4, 2
K.GEMM_TILES = ((1, (2, 4, 2, 1, 2)), (3, (4, 4, 4, 2, 2)))
K.GEMM_TILE = (4, 8, 2, 2, 2)
K.RNG_CHUNK_LOG2, K.RNG_STAGE = 2, 2
K.MULTI_THREADS, K.MULTI_RANKS = 4, 2
K.DROP_CHUNK_LOG2 = 2
sys.setswitchinterval(5e-5)
"""

_SIM_MAIN = """
import json, sys
exec(compile(PRELUDE, "<simulator prelude>", "exec"), {})
ns = {"__name__": "__main__"}
for name, code in json.load(sys.stdin):
    exec(compile(code, name, "exec"), ns)
"""


def run_on_simulator(chain: list[Block], cwd: Path, timeout: float = 300) -> str:
    import json

    src = "PRELUDE = " + repr(SIM_PRELUDE) + "\n" + _SIM_MAIN
    payload = json.dumps([(b.id, b.code) for b in chain])
    r = subprocess.run([sys.executable, "-c", src], input=payload, cwd=cwd, capture_output=True, text=True,
                       env=child_env(NUMBA_ENABLE_CUDASIM="1"), timeout=timeout)
    if r.returncode:
        raise AssertionError(f"{chain[0].id} (CUDA simulator): exit {r.returncode}\n--- stdout\n"
                             f"{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r.stdout
