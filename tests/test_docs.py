"""Every code block of README.md and docs/*.md runs (see tests/docblocks.py for the rules and
the ``<!-- docs-test: ... -->`` markers): a newcomer can copy any block into an empty folder
and it works as shown."""

from __future__ import annotations

import contextlib
import io

import pytest

from docblocks import (
    PEERS_HINT,
    ROOT,
    RUN_LANGS,
    TEXT_LANGS,
    all_blocks,
    chains,
    missing_dask,
    missing_peers,
    parse,
    run_on_simulator,
    run_shell,
)

BLOCKS = all_blocks()
CHAINS = chains(BLOCKS)
# Blocks marked `skip` (installs, tools that download gigabytes) and `gpu-only`: few, on purpose.
MAX_NOT_RUN = 6


def _run_python(b, ns):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(b.code, b.id, "exec"), ns)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("chain", CHAINS, ids=[c[0].id for c in CHAINS])
def test_block_runs(chain, tmp_path, monkeypatch):
    first = chain[0]
    if "gpu" in first.flags:
        assert all(b.lang == "python" and "gpu" in b.flags for b in chain), "a gpu chain is python blocks only"
        run_on_simulator(chain, tmp_path)
        return
    if "dask" in first.flags and missing_dask():
        pytest.skip(f"needs {', '.join(missing_dask())}: pip install -e '.[dask]'")
    missing = missing_peers()
    left_out = [b for b in chain if "peer" in b.flags and missing]
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__main__"}
    for b in chain:
        if b in left_out:
            continue
        if b.lang == "python":
            _run_python(b, ns)
        else:
            run_shell(b, tmp_path)
    if left_out:
        ran = len(chain) - len(left_out)
        pytest.skip(f"{ran} block(s) ran and passed; {len(left_out)} PEFT / bitsandbytes block(s) need "
                    f"{', '.join(missing)}: {PEERS_HINT}")


def test_every_block_is_run_or_marked():
    not_run = [b for b in BLOCKS if b.skip or b.gpu_only]
    for b in BLOCKS:
        assert b.lang in RUN_LANGS | TEXT_LANGS, f"{b.id}: language {b.lang!r}: make it python/bash/console or text"
        if b.lang in TEXT_LANGS:
            assert not (b.flags or b.skip or b.gpu_only), f"{b.id}: a marker on a block that is not code"
        if b.runs and b.lang != "python":
            assert "pip install" not in b.code, f"{b.id}: installs are .ci/run's job: mark the block skip"
        if b.path == "README.md":
            assert "continue" not in b.flags, f"{b.id}: each README block runs alone"
    # every runnable block is in exactly one chain
    assert sum(len(c) for c in CHAINS) == sum(b.runs for b in BLOCKS)
    assert len(not_run) <= MAX_NOT_RUN, "\n".join(f"{b.id}: {b.skip or b.gpu_only}" for b in not_run)


def test_the_marker_parser(tmp_path, monkeypatch):
    import docblocks

    monkeypatch.setattr(docblocks, "ROOT", tmp_path)
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- docs-test: continue -->\n```python\ny = x\n```\n"
                    "<!-- docs-test: skip needs a GPU farm -->\n```bash\npip install x\n```\n"
                    "```\na = b\n```\n<!-- docs-test: gpu-only real sizes -->\n```bash\nnvidia-smi\n```\n")
    bs = parse(page)
    assert [(b.line, b.lang) for b in bs] == [(3, "python"), (8, "python"), (12, "bash"), (15, ""), (19, "bash")]
    assert bs[1].flags == {"continue"} and bs[2].skip == "needs a GPU farm" and bs[4].gpu_only == "real sizes"
    assert [[b.line for b in c] for c in chains(bs)] == [[3, 8]]
    page.write_text("<!-- docs-test: sometimes -->\n```python\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test marker"):
        parse(page)
    page.write_text("<!-- docs-test: skip -->\n```python\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        parse(page)


def test_readme_test_command_is_ci_first_test_run():
    """The README's second command (install and run the tests) is .ci/run's first test run,
    verbatim; the full command it documents installs the `peers` extra that .ci/run uses."""
    readme = parse(ROOT / "README.md")
    opening = readme[0].code.strip().splitlines()
    assert len(opening) == 2 and opening[0].startswith("pip install -e . && numlora demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    runs = [line for line in ci if "pytest" in line and not line.lstrip().startswith("#")]
    assert runs[0].strip() == opening[1].strip()
    full = [b.code.strip() for b in readme if '".[test,peers]"' in b.code]
    assert len(full) == 1 and full[0].endswith(" && python -m pytest"), full
    installs = full[0].removesuffix(" && python -m pytest")
    assert installs in ci[:ci.index(runs[0])], "the full command's installs, verbatim, before the test run"
