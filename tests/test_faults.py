"""Fault injection for ``numlora merge`` / ``numlora quantize`` as real processes.

A ~100 MB model folder (two shards, a config, a carried sub-folder) and a PEFT adapter
are generated once. Then the CLI runs in subprocesses and is hit, at random points of
its job, by SIGINT and SIGTERM; run under a random file-size limit (RLIMIT_FSIZE, set in
the child before it execs the CLI); and killed with SIGKILL, after which the next run
must remove the stale temporary files. After every run: the inputs are unchanged, no
output (or a complete one, identical to an uninterrupted run's, when the signal came
after the final rename) and no temporary file remains, and stderr holds at most one
line and no traceback. A summary line reports the counts and the time.

NUMLORA_FAULT_SEED picks another random schedule (default 0).
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from numlora.io.safetensors import save_file

from conftest import JIT_DISABLED

pytestmark = [
    pytest.mark.skipif(JIT_DISABLED, reason="runs the compiled CLI in subprocesses; minutes without the JIT"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and RLIMIT_FSIZE"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, H = 24, 512  # 24 x 4 float32 512 x 512 weights: 96 MiB, plus norms
N_SIGNALS = 40  # SIGINT / SIGTERM, merge and quantize
N_LIMITS = 12  # RLIMIT_FSIZE
N_KILLS = 3  # SIGKILL, then a clean run

# The child sets the file-size limit (and default SIGINT, whatever the runner ignores)
# itself and then execs the CLI: the same as a preexec_fn, without running Python code
# between fork and exec in a test process that may have threads.
LAUNCH = """
import os, resource, signal, sys
limit = int(sys.argv[1])
if limit >= 0:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, "-m", "numlora.cli"] + sys.argv[2:])
"""


def _make_inputs(root):
    rng = np.random.default_rng(0)
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    os.makedirs(os.path.join(base, "tokenizer"))
    tensors = {}
    for i in range(LAYERS):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{m}.weight"] = rng.standard_normal((H, H), np.float32) * 0.02
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(H, np.float32)
    names = list(tensors)
    wmap = {}
    for s, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(os.path.join(base, fname), {k: tensors[k] for k in part}, {"format": "pt"})
        wmap.update({k: fname for k in part})
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "torch_dtype": "float32"}, f)
    with open(os.path.join(base, "tokenizer", "vocab.txt"), "w") as f:
        f.write("a b c\n")
    os.makedirs(adapter)
    lora = {}
    for i in range(LAYERS):
        for m in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            lora[key + ".lora_A.weight"] = rng.standard_normal((8, H), np.float32) * 0.1
            lora[key + ".lora_B.weight"] = rng.standard_normal((H, 8), np.float32) * 0.1
    save_file(os.path.join(adapter, "adapter_model.safetensors"), lora, {"format": "pt"})
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, f)
    return base, adapter


def _tree(root, content=True):
    """{relative path: sha256 (or (size, mtime_ns))} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            if content:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
                out[os.path.relpath(p, root)] = h.hexdigest()
            else:
                st = os.stat(p)
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("NUMBA_DISABLE_JIT", None)
    env["NUMBA_NUM_THREADS"] = "1"  # two jobs at a time on two cores: no oversubscribed spinning
    return env


def _start(args, limit=-1):
    return subprocess.Popen([sys.executable, "-c", LAUNCH, str(limit)] + args, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _temps(folder):
    return [n for n in os.listdir(folder) if n.startswith(".numlora-")]


def _wait_for_job(p, folder, timeout=60.0):
    """Until the job has created its temporary output (the CLI's handlers are installed by
    then) or the process has ended."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if _temps(folder) or p.poll() is not None:
            return
        time.sleep(0.002)
    raise AssertionError("the job did not start")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults"))
    base, adapter = _make_inputs(os.path.join(root, "in"))
    inputs = _tree(os.path.join(root, "in"))
    size = sum(os.path.getsize(os.path.join(base, n)) for n in os.listdir(base) if n.endswith(".safetensors"))
    assert size > 95 * 2 ** 20
    commands = {"merge": ["merge", base, adapter], "quantize": ["quantize", base]}
    ref, duration = {}, {}
    for name, args in commands.items():  # uninterrupted runs: the reference outputs; warm numba's cache
        folder = os.path.join(root, "ref-" + name)
        os.makedirs(folder)
        p = _start(args + ["-o", os.path.join(folder, "out")])
        _wait_for_job(p, folder, timeout=300)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=300)
        duration[name] = time.monotonic() - t0
        assert p.returncode == 0, err.decode()
        ref[name] = _tree(os.path.join(folder, "out"))
    return {"root": root, "commands": commands, "inputs": inputs, "ref": ref, "duration": duration,
            "input_stats": _tree(os.path.join(root, "in"), content=False)}


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []

    def add(self, key):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def fail(self, what):
        with self.lock:
            self.failures.append(what)


def _check_run(job, tally, kind, command, folder, p, stderr, allow_efbig=False,
               completed="completed before the fault (output identical to the reference)"):
    """Classify one finished run and check everything it must leave as it was."""
    out = os.path.join(folder, "out")
    rc = p.returncode
    err = stderr.decode(errors="replace")
    lines = err.strip().splitlines()
    where = f"{kind} {command} rc={rc} stderr={err[-2000:]!r}"
    if "Traceback" in err or len(lines) > 1:
        tally.fail(f"traceback or several lines: {where}")
    if _tree(os.path.join(job["root"], "in"), content=False) != job["input_stats"]:
        tally.fail(f"an input changed: {where}")
    if _temps(folder):
        tally.fail(f"temporary files left: {_temps(folder)}: {where}")
    if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        name = signal.Signals(rc - 128).name
        want = f"numlora: error: interrupted by {name}; the partial output was removed, the inputs are untouched"
        if lines != [want]:
            tally.fail(f"unexpected message: {where}")
        if os.path.lexists(out):
            tally.fail(f"output left after an interrupt: {where}")
        tally.add("interrupted cleanly")
    elif rc == 2 and allow_efbig:
        if len(lines) != 1 or "File too large (EFBIG)" not in lines[0] or "nothing was written" not in lines[0]:
            tally.fail(f"unexpected message: {where}")
        if os.path.lexists(out):
            tally.fail(f"output left after EFBIG: {where}")
        tally.add("refused at the file-size limit (EFBIG)")
    elif rc == 0:
        if _tree(out) != job["ref"][command]:
            tally.fail(f"a completed output differs from the uninterrupted run's: {where}")
        if lines and not (len(lines) == 1 and lines[0].endswith("arrived after the output was complete; it was kept")):
            tally.fail(f"unexpected message: {where}")
        tally.add(completed)
    elif rc in (-signal.SIGINT, -signal.SIGTERM) and not lines:
        # the signal came after main() had returned (the handlers restored): the job was done
        if _tree(out) != job["ref"][command]:
            tally.fail(f"killed after the job, but the output is not the complete one: {where}")
        tally.add("completed, then the signal ended the exiting process (output identical to the reference)")
    else:
        tally.fail(f"unexpected exit: {where}")
    if os.path.lexists(out):
        import shutil

        shutil.rmtree(out)


def _signal_run(job, tally, rnd, folder, command, sig):
    p = _start(job["commands"][command] + ["-o", os.path.join(folder, "out")])
    _wait_for_job(p, folder)
    time.sleep(rnd.uniform(0.0, 1.15 * job["duration"][command]))
    try:
        p.send_signal(sig)
    except ProcessLookupError:  # already finished
        pass
    _, err = p.communicate(timeout=120)
    tally.add(f"{signal.Signals(sig).name} injections")
    _check_run(job, tally, signal.Signals(sig).name, command, folder, p, err)


def _limit_run(job, tally, rnd, folder, command):
    biggest = max(os.path.getsize(os.path.join(job["root"], "ref-" + command, "out", n))
                  for n in job["ref"][command])
    limit = int(rnd.uniform(0.0, 1.1) * biggest)
    p = _start(job["commands"][command] + ["-o", os.path.join(folder, "out")], limit=limit)
    _, err = p.communicate(timeout=120)
    tally.add("RLIMIT_FSIZE injections")
    _check_run(job, tally, f"RLIMIT_FSIZE={limit}", command, folder, p, err, allow_efbig=True)


def test_fault_injection(job, capsys):
    seed = int(os.environ.get("NUMLORA_FAULT_SEED", "0"))
    rnd = random.Random(seed)
    plan = []
    for i in range(N_SIGNALS):
        plan.append(("signal", "merge" if i % 2 == 0 else "quantize", signal.SIGINT if i % 4 < 2 else signal.SIGTERM))
    for i in range(N_LIMITS):
        plan.append(("limit", "merge" if i % 2 == 0 else "quantize", None))
    rnd.shuffle(plan)
    tally = Tally()
    t0 = time.monotonic()

    def worker(k, tasks):
        folder = os.path.join(job["root"], f"worker{k}")
        os.makedirs(folder)
        wrnd = random.Random(seed * 1000 + k)
        for kind, command, sig in tasks:
            try:
                if kind == "signal":
                    _signal_run(job, tally, wrnd, folder, command, sig)
                else:
                    _limit_run(job, tally, wrnd, folder, command)
            except Exception as e:  # noqa: BLE001 - reported below
                tally.fail(f"{kind} {command}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k, plan[k::2])) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    # SIGKILL cannot be handled: the temporary output stays, and the next run removes it
    kill_folder = os.path.join(job["root"], "killed")
    os.makedirs(kill_folder)
    krnd = random.Random(seed + 7)
    for i in range(N_KILLS):
        command = "merge" if i % 2 == 0 else "quantize"
        p = _start(job["commands"][command] + ["-o", os.path.join(kill_folder, "out")])
        _wait_for_job(p, kill_folder)
        time.sleep(krnd.uniform(0.0, 0.6 * job["duration"][command]))
        p.kill()
        p.communicate(timeout=120)
        tally.add("SIGKILL injections")
        stale = [n for n in _temps(kill_folder) if n.startswith(f".numlora-{p.pid}-")]
        if os.path.lexists(os.path.join(kill_folder, "out")):
            tally.add("completed before the fault (output identical to the reference)")
            if _tree(os.path.join(kill_folder, "out")) != job["ref"][command]:
                tally.fail("a completed output differs after SIGKILL")
            import shutil

            shutil.rmtree(os.path.join(kill_folder, "out"))
        elif not stale:
            tally.fail("SIGKILL mid-job left no temporary output (then what was it writing?)")
        q = _start(job["commands"][command] + ["-o", os.path.join(kill_folder, "out")])
        _, err = q.communicate(timeout=120)
        if q.returncode != 0:
            tally.fail(f"the run after SIGKILL failed: {err.decode(errors='replace')[-2000:]}")
        elif stale:
            tally.add("killed mid-job; its stale temporary output removed by the next run")
        _check_run(job, tally, "after SIGKILL", command, kill_folder, q, err, completed="run after SIGKILL")

    seconds = time.monotonic() - t0
    import resource

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    inputs_same = _tree(os.path.join(job["root"], "in")) == job["inputs"]
    if not inputs_same:
        tally.fail("the inputs' content changed")
    injections = sum(v for k, v in tally.counts.items() if k.endswith("injections"))
    outcomes = {k: v for k, v in tally.counts.items() if not k.endswith("injections") and k != "run after SIGKILL"}
    with capsys.disabled():
        print(f"\nfault injection (seed {seed}): {injections} injections "
              f"({', '.join(f'{k} {v}' for k, v in sorted(tally.counts.items()) if k.endswith('injections'))}) "
              f"into merge / quantize of a {len(job['inputs'])}-file ~100 MB model in {seconds:.1f} s "
              f"({cpu.ru_utime + cpu.ru_stime:.0f} s CPU in subprocesses so far); "
              f"outcomes: {outcomes}; inputs unchanged: {inputs_same}; failures: {len(tally.failures)}")
    assert injections >= 50
    assert not tally.failures, "\n".join(tally.failures[:20])
