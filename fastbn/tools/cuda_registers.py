"""Registers per thread of every fused CUDA kernel, compiled without a GPU.

``python -m fastbn.tools.cuda_registers [--cc 9.0] [--loops]`` compiles each
kernel of the fused paths (``fastbn.kernels.cuda_numba.compile_report``: NVVM
to PTX, nvJitLink to a cubin, launch bounds of 1024 threads) for float16,
float32 and float64 data and prints a Markdown table.  The bar: at most 64
registers, so that a 1024-thread block fits one SM's 65536 registers.  Needs
the compilers of the ``cuda`` extra (``pip install "fastbn[cuda]"``), not a GPU.

``--loops`` adds the SASS instructions per element of each kernel's main loop,
read from ``nvdisasm`` (``pip install nvidia-cuda-nvdisasm``, or a CUDA
toolkit on PATH); without it that column says why and the table is unchanged
otherwise.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

# Data arrays each kernel reads per element (for elements per loop iteration).
STREAMS = {"_dysums_rows": 2, "_dysums_cols": 2, "_affine_u_cols": 2}

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*`\(\.(L_x_\d+)\)")
_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")
# Loops the main loop is not: barriers (block merges), calls (float64 division).
_NOT_MAIN = re.compile(r"\b(BAR|CALL|MUFU|WARPSYNC)\b")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def table(cc=(9, 0), loops=False):
    """The report of ``compile_report`` as Markdown lines (with the main loops' cost if ``loops``)."""
    from ..kernels import cuda_numba
    cubins = {} if loops else None
    rows = cuda_numba.compile_report(cc, cubins=cubins)
    head = f"| kernel | dtype | registers (sm_{cc[0]}{cc[1]}) | spill stores / loads (bytes) |"
    rule = "|---|---|---|---|"
    if loops:
        nvd = nvdisasm()
        head += " main loop: instructions / elements = per element |"
        rule += "---|"
    lines = [head, rule]
    for k, d, r, ss, sl in rows:
        line = f"| `{k}` | {d} | {r} | {ss} / {sl} |"
        if loops:
            line += f" {loop_cell(nvd, cubins[k, d], k, d)} |"
        lines.append(line)
    worst = max((r or 0) for _, _, r, _, _ in rows)
    return lines, worst


def nvdisasm():
    """Path of nvdisasm (PATH, CUDA_HOME, or the nvidia-cuda-nvdisasm wheel), or None."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    pats = [os.path.join(r, "bin", "nvdisasm") for r in roots if r]
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        pats.append(os.path.join(sp, "nvidia", "*", "bin", "nvdisasm"))
        pats.append(os.path.join(sp, "nvidia", "*", "*", "bin", "nvdisasm"))
    for pat in pats:
        for path in sorted(glob.glob(pat)):
            if os.access(path, os.X_OK):
                return path
    return None


def loop_cell(nvd, cubin, kernel, dtype):
    """The ``--loops`` cell of one kernel: its main loop's cost, or why there is none."""
    if nvd is None:
        return "n/a (nvdisasm not found: pip install nvidia-cuda-nvdisasm)"
    try:
        sass = disassemble(nvd, cubin)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"n/a (nvdisasm failed: {str(exc).strip()[:80]})"
    import numpy as np
    found = main_loop(sass, kernel, np.dtype(dtype).itemsize * STREAMS.get(kernel, 1))
    if found is None:
        return "n/a (no loop found)"
    n, elems = found
    return f"{n} / {elems:g} = {n / elems:.1f}"


def disassemble(nvd, cubin):
    """SASS text of a cubin (bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvd, "-c", path], capture_output=True, text=True, check=True,
                              timeout=120).stdout


def main_loop(sass, kernel, bytes_per_element):
    """(instructions, elements) of the main loop of ``kernel`` in ``sass``, or None.

    Loops are backward branches; the main one is the largest that loads data
    and neither synchronises nor calls (those are the block merges).  Its
    elements per iteration: bytes loaded / ``bytes_per_element`` (the data's
    item size times the arrays read per element), so vector loads count whole.
    """
    insns, labels = _function(sass, kernel)
    best = None
    for at, (addr, text) in enumerate(insns):
        m = _BRA.search(text)
        if not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        body = [t for a, t in insns if labels[m.group(1)] <= a <= addr]
        if any(_NOT_MAIN.search(t) for t in body):
            continue
        loaded = sum(_load_bytes(t) for t in body)
        if loaded and (best is None or len(body) > best[0]):
            best = (len(body), loaded / bytes_per_element)
    return best


def _function(sass, kernel):
    """[(address, instruction)] and {label: address} of the function named like ``kernel``."""
    insns, labels, pending, inside = [], {}, [], False
    for line in sass.splitlines():
        f = _FUNC.match(line)
        if f:
            inside = kernel in f.group(1) and not f.group(1).startswith("__cuda")
            continue
        if not inside:
            continue
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSN.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            insns.append((addr, m.group(2)))
    return insns, labels


def _load_bytes(text):
    """Bytes one instruction loads from global (or generic) memory, 0 if it is no such load."""
    op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    parts = op.split(".")
    if parts[0] not in ("LD", "LDG"):
        return 0
    for p in parts[1:]:
        if p in _WIDTH:
            return _WIDTH[p]
    return 4


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.tools.cuda_registers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (default) or 8.0")
    parser.add_argument("--loops", action="store_true",
                        help="add the SASS instructions per element of each kernel's main loop (nvdisasm)")
    args = parser.parse_args(argv)
    cc = tuple(int(p) for p in args.cc.split("."))
    lines, worst = table(cc, loops=args.loops)
    print("\n".join(lines))
    print(f"\nmost registers per thread: {worst} (bar: 64)")
    return 0 if worst <= 64 else 1


if __name__ == "__main__":
    sys.exit(main())
