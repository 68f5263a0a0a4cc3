"""Compile every CUDA kernel to PTX and SASS for sm_90 on a machine without a GPU, and report
what the compiler made of each.

    python bench/cuda_compile_check.py              # all kernels and dtypes (a few minutes)
    python bench/cuda_compile_check.py --quick      # the fused attention kernel, two variants
    python bench/cuda_compile_check.py --sass DIR   # also write each kernel's SASS into DIR
    python bench/cuda_compile_check.py --only decode  # the kernels whose name has "decode"

The CUDA simulator runs the kernels as Python, so it never type-checks them: a kernel can pass
every simulator test and still fail to compile for a GPU, or compile into slow code. This
compiles them with Numba and NVVM (a CUDA toolkit: libnvvm, libdevice and ptxas, e.g. ``pip
install nvidia-cuda-nvcc-cu12``, and nvdisasm for the SASS, ``pip install nvidia-cuda-nvdisasm``;
no driver, no GPU) and reports per kernel: registers, spills, shared memory, blocks and warps
per SM at its block size (sm_90 limits), and per loop of its SASS (a loop is a backward branch)
the FFMA, the shared loads by width, the global loads, the barriers, local-memory accesses and
shuffles.

It fails (exit 1) on a compile error, float64 instructions in a float32 kernel (a Python float
literal promoted the arithmetic), local-memory loads or stores (spills) inside a loop, and fewer
than 4 FFMA per shared-memory load instruction in an innermost compute loop (one with FFMA) of the
fused attention kernel computing in float32, fewer than 16 warps per SM for it (E <= 128), and
a tensor-core kernel (16-bit inputs) without HMMA instructions. Exit 77: no CUDA toolkit here.
Numba-cuda wants a device (or NVRTC) to pick the target; the few lookups that ask for one are
replaced here by sm_90, which is why this is a development script and not part of the package.
"""
import argparse
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = (9, 0)
# sm_90 per SM: 64K 32-bit registers (allocated per warp in units of 256), 228 KiB of shared
# memory (1 KiB of it reserved per block), 2048 threads, 32 blocks.
SM_REGS, SM_SMEM, SM_THREADS, SM_BLOCKS, SMEM_PER_BLOCK_RESERVED = 65536, 233472, 2048, 32, 1024
MIN_FFMA_PER_LDS = 4
MIN_WARPS = 16  # per SM, of the fused float32 kernel where the query tile stays resident


def find_toolkit():
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in roots:
        libdevice = os.path.join(root, "nvvm", "libdevice", "libdevice.10.bc")
        ptxas = os.path.join(root, "bin", "ptxas")
        if root and os.path.exists(libdevice) and os.path.exists(ptxas):
            return libdevice, ptxas, find_nvdisasm(root)
    return None


def find_nvdisasm(root):
    """nvdisasm beside ptxas, in the PyPI packages' folders next to it, or on PATH."""
    here = [os.path.join(root, "bin", "nvdisasm")]
    nvidia = os.path.dirname(os.path.abspath(root))
    here += sorted(glob.glob(os.path.join(nvidia, "*", "bin", "nvdisasm")))
    for path in here:
        if os.path.exists(path):
            return path
    return shutil.which("nvdisasm")


def occupancy(threads, regs, smem):
    """(blocks, warps) per SM on sm_90 for a block of ``threads`` threads."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM_REGS // (per_warp * warps)
    by_smem = SM_SMEM // (smem + SMEM_PER_BLOCK_RESERVED)
    blocks = min(SM_BLOCKS, by_regs, by_smem, SM_THREADS // threads)
    return blocks, blocks * warps


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def sass_loops(sass):
    """The loops of one kernel's SASS: dicts of counts over each loop's instructions (nested
    loops included), innermost first."""
    ops, labels = [], {}
    for line in sass.splitlines():
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = len(ops)
            continue
        m = INSTRUCTION.search(line)
        if m:
            ops.append((m.group(1), m.group(2)))
    spans = {}
    for pos, (op, rest) in enumerate(ops):
        if op.startswith("BRA"):
            t = TARGET.search(rest)
            if t and t.group(1) in labels and labels[t.group(1)] <= pos:
                head = labels[t.group(1)]
                spans[head] = max(spans.get(head, head), pos)
    loops = []
    # (a one-instruction self-loop is the trap after the kernel's last EXIT, not a loop)
    spans = {h: t for h, t in spans.items() if t > h}
    for head, tail in spans.items():
        body = [op for op, _ in ops[head:tail + 1]]
        lds = [op for op in body if op.startswith("LDS")]
        loops.append(dict(
            start=head, end=tail, instructions=len(body),
            inner=not any(h != head and head <= h and t <= tail for h, t in spans.items()),
            ffma=sum(op.startswith("FFMA") for op in body),
            lds32=sum(".64" not in op and ".128" not in op for op in lds),
            lds64=sum(".64" in op for op in lds), lds128=sum(".128" in op for op in lds),
            ldg=sum(op.startswith("LDG") for op in body),
            bar=sum(op.startswith("BAR") for op in body),
            local=sum(op.startswith(("LDL", "STL")) for op in body),
            shfl=sum(op.startswith("SHFL") for op in body),
            hmma=sum(op.startswith("HMMA") for op in body),
            f64=sum(op.startswith(("DFMA", "DADD", "DMUL")) for op in body)))
    loops.sort(key=lambda d: (d["end"] - d["start"], d["start"]))
    for d in loops:
        loads = d["lds32"] + d["lds64"] + d["lds128"]
        d["ffma_per_lds"] = d["ffma"] / loads if loads else math.inf
        d["depth"] = sum(o["start"] <= d["start"] and d["end"] <= o["end"] for o in loops) - 1
    return loops


def describe_loop(d):
    ratio = "n/a" if d["ffma_per_lds"] == math.inf else f"{d['ffma_per_lds']:.2f}"
    return (f"{'innermost ' if d['inner'] else ''}loop depth {d['depth']} "
            f"[{d['start']}-{d['end']}]: {d['instructions']} instructions, {d['ffma']} FFMA, "
            f"LDS 32/64/128-bit {d['lds32']}/{d['lds64']}/{d['lds128']} "
            f"({ratio} FFMA per LDS), {d['ldg']} LDG, {d['bar']} BAR, {d['shfl']} SHFL, "
            f"{str(d['hmma']) + ' HMMA, ' if d['hmma'] else ''}"
            f"{d['local']} local loads/stores")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sass", metavar="DIR", help="write each kernel's SASS into DIR")
    parser.add_argument("--only", metavar="TEXT", help="compile only the kernels whose name has "
                        "TEXT")
    parser.add_argument("--dims", type=int, nargs="+", metavar="D",
                        help="the fused kernel's head dims only (default: 64 128 256; --quick: 64)")
    args = parser.parse_args(argv)
    toolkit = find_toolkit()
    if toolkit is None:
        print("no CUDA toolkit (nvvm/libdevice and ptxas) found; set CUDA_HOME")
        return 77
    libdevice, ptxas, nvdisasm = toolkit
    if nvdisasm is None:
        print("no nvdisasm found (pip install nvidia-cuda-nvdisasm): the SASS loop checks need it")
        if args.sass:
            return 77
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # compile for real, before numba is imported
    sys.path.insert(0, ROOT)
    try:
        from numba import cuda
        import numba.cuda.cudadrv.libs as libs
        import numba.cuda.cudadrv.nvrtc as nvrtc
        import numba.cuda.cudadrv.nvvm as nvvm
        import numba.cuda.dispatcher as dispatcher
        from numba.cuda import types as T
    except Exception as exc:
        print(f"numba-cuda cannot compile here: {exc}")
        return 77

    # The lookups that want a GPU or NVRTC: the target is sm_90, libdevice is the toolkit's.
    class Device:
        compute_capability = CC
    nvrtc.find_closest_arch = lambda cc: cc
    libs.get_libdevice = nvvm.get_libdevice = lambda: libdevice
    dispatcher.get_current_device = lambda: Device()

    import numpy as np
    from fastattn import _cuda
    from fastattn.kernels import cuda as kernels

    i64, boolean = T.int64, T.boolean

    def arr(t, nd):
        return T.Array(t, nd, "C")

    failures = []
    tmp = tempfile.mkdtemp()

    def compile_one(name, kernel, sig, compute, threads, fused=False, mma=False, min_warps=0):
        if args.only and args.only not in name:
            return
        t0 = time.perf_counter()
        problems = []
        try:
            bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC, launch_bounds=bounds)
        except Exception as exc:
            failures.append(name)
            print(f"{name}: FAILED to compile: {type(exc).__name__}: {str(exc)[:2000]}")
            return
        stem = re.sub(r"[^A-Za-z0-9]+", "_", name.replace("<=", "")).strip("_")
        path = os.path.join(tmp, stem + ".ptx")
        with open(path, "w") as f:
            f.write(ptx)
        f64 = len(re.findall(r"^\s+(?!cvt)\S+\.f64\b", ptx, re.M))
        cubin = os.path.join(tmp, stem + ".cubin")
        run = subprocess.run([ptxas, f"-arch=sm_{CC[0]}{CC[1]}", "-v", path, "-o", cubin],
                             capture_output=True, text=True)
        if run.returncode != 0:
            failures.append(name)
            print(f"{name}: FAILED in ptxas:\n{run.stderr[-2000:]}")
            return
        log = run.stderr
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        smem = sum(int(x) for x in re.findall(r"(\d+) bytes smem", log))
        spill_st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
        spill_ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
        stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
        blocks, warps = occupancy(threads, regs, smem)
        if compute == np.float32 and f64:
            problems.append(f"{f64} float64 instructions in a float32 kernel")
        if warps < min_warps:
            problems.append(f"{warps} warps per SM (at least {min_warps} wanted)")
        lines = []
        if nvdisasm:
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
            if sass.returncode != 0:
                problems.append(f"nvdisasm failed: {sass.stderr[-500:]}")
            else:
                if args.sass:
                    with open(os.path.join(args.sass, stem + ".sass"), "w") as f:
                        f.write(sass.stdout)
                    shutil.copy(path, os.path.join(args.sass, stem + ".ptx"))
                hmma = len(re.findall(r"\bHMMA\.", sass.stdout))
                if mma:
                    lines.append(f"    {hmma} HMMA instructions in the kernel")
                    if not hmma:
                        problems.append("no HMMA (tensor-core) instruction")
                for d in sass_loops(sass.stdout):
                    if d["local"]:
                        problems.append(f"{d['local']} local-memory accesses (spills) in a loop")
                    if (fused and compute == np.float32 and d["inner"] and d["ffma"]
                            and d["ffma_per_lds"] < MIN_FFMA_PER_LDS):
                        problems.append(f"{d['ffma_per_lds']:.2f} FFMA per shared load in an "
                                        f"innermost loop (at least {MIN_FFMA_PER_LDS} wanted)")
                    if fused or mma or d["ffma"]:
                        lines.append("    " + describe_loop(d))
        if problems:
            failures.append(name)
        print(f"{name}: {'FAILED: ' + '; '.join(problems) + '; ' if problems else ''}"
              f"{time.perf_counter() - t0:.1f}s; {regs} registers, {spill_st}/{spill_ld} bytes "
              f"spill stores/loads, {stack} bytes stack, {smem} bytes smem; {threads} threads: "
              f"{blocks} blocks = {warps} warps per SM; {f64} float64 PTX instructions",
              flush=True)
        for line in lines:
            print(line)

    variants = [(T.float32, np.float32), (T.float16, np.float32), (T.float64, np.float64)]
    masks = [("no mask", T.float32), ("bool mask", T.boolean), ("float mask", None)]
    if args.quick:
        variants, masks = variants[:2], masks[2:]
    for store, compute in variants:
        ct = T.float32 if compute == np.float32 else T.float64
        dtype = np.dtype(compute)
        layout = (arr(store, 1), arr(i64, 1), i64, i64)
        # offset, left, right, softcap, ALiBi slopes, use_alibi
        variants_sig = (i64, i64, i64, ct, arr(ct, 1), boolean)
        # the fused kernel at the tiles _cuda picks for D = E = Ev of 64 and 128
        # (256: more features than a tile keeps, walked in panels)
        for d in args.dims or ((64,) if args.quick else (64, 128, 256)):
            tiles = _cuda._fused_tiles(dtype, d, d)
            kernel = kernels.fused_attention_kernel(tiles, dtype)
            # every mask kind in float32; float16 and float64 differ in their loads and
            # arithmetic, not in the mask code: the float mask only
            for mname, mtype in masks if store == T.float32 else masks[-1:]:
                mask = (arr(mtype or store, 1), arr(i64, 1), i64, i64, i64)
                compile_one(f"attention {store} D={d}{'' if tiles.resident else ' panels'} "
                            f"{mname}", kernel,
                            (*layout, *layout, *layout, *mask, i64, i64, i64, i64, i64, ct,
                             *variants_sig, boolean, arr(store, 3), arr(ct, 2)), compute,
                            tiles.threads, fused=True,
                            min_warps=MIN_WARPS if tiles.resident and compute == np.float32 else 0)
        if args.quick:
            continue
        tiles = _cuda._tiles(dtype, 0)
        ks = kernels.attention_kernels(tiles, dtype)
        compile_one(f"attention_weights {store} float mask", ks.attention_weights,
                    (*layout, *layout, arr(store, 1), arr(i64, 1), i64, i64, i64, i64, i64, i64,
                     i64, ct, *variants_sig, boolean, arr(store, 3)), compute, tiles.threads)
        compile_one(f"similarity {store}", ks.similarity,
                    (*layout, *layout, i64, i64, i64, i64, ct, boolean, arr(store, 3)), compute,
                    tiles.threads)
        compile_one(f"softmax {store}", kernels.softmax_kernel(_cuda.SOFTMAX_TILES, dtype),
                    (arr(store, 1), arr(i64, 1), i64, i64, arr(boolean, 1), arr(i64, 1), i64,
                     i64, boolean, i64, i64, i64, arr(store, 1), arr(i64, 1), i64, i64), compute,
                    _cuda.SOFTMAX_TILES.threads)
        # decoding from a KV cache and varlen (kernels/cuda/decode.py) at the tiles
        # _cuda_decode picks for Ev = 128 (one value column block)
        from fastattn import _cuda_decode
        tiles = _cuda_decode._tiles(dtype, 128)
        dk = kernels.decode_kernels(tiles, dtype, _cuda_decode.MIN_BLOCKS[dtype])
        ints1, ints2 = arr(i64, 1), T.Array(i64, 2, "C")
        compile_one(f"decode attend {store}", dk.attend,
                    (arr(store, 1), arr(store, 1), arr(store, 1), ints2, ints2, ints1,
                     arr(ct, 1), ints2, ct, ct, boolean, arr(store, 1), arr(ct, 1),
                     T.Array(ct, 2, "C"), arr(ct, 1)), compute, tiles.threads)
        compile_one(f"decode merge {store}", dk.merge,
                    (T.Array(ct, 2, "C"), arr(ct, 1), ints2, ints2, ints1, arr(store, 1),
                     arr(ct, 1)), compute, tiles.threads)
        compile_one(f"decode copy_rows {store}", dk.copy_rows,
                    (arr(store, 1), ints1, i64, arr(store, 1), ints1, i64, i64), compute,
                    tiles.threads)
    # the tensor-core kernel for 16-bit inputs (kernels/cuda/fused_mma.py) at _cuda's tiles
    u16 = (arr(T.uint16, 1), arr(i64, 1), i64, i64)
    for kind, mtype in (("float16", T.float16), ("bfloat16", T.float32))[:1 if args.quick else 2]:
        for d in args.dims or ((64,) if args.quick else (64, 128)):
            tiles = next(t for t in _cuda.GPU_MMA_TILES if d <= t.features)
            tiles = tiles._replace(block_v=min(d, tiles.block_v))
            compile_one(f"attention_mma {kind} D={d} float mask",
                        kernels.mma_attention_kernel(tiles, kind),
                        (*u16, *u16, *u16, arr(mtype, 1), arr(i64, 1), i64, i64, i64, i64, i64,
                         i64, i64, i64, T.float32, i64, i64, i64, T.float32, arr(T.float32, 1),
                         boolean, boolean, arr(T.uint16, 3), arr(T.float32, 2)), np.float32,
                        tiles.threads, mma=True)
    print(f"{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
