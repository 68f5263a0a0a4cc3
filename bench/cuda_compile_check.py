"""Compile every CUDA kernel to PTX and SASS for sm_90 on a machine without a GPU.

    python bench/cuda_compile_check.py           # all kernels and dtypes (about a minute)
    python bench/cuda_compile_check.py --quick   # the fused attention kernel, two variants

The CUDA simulator runs the kernels as Python, so it never type-checks them: a kernel can pass
every simulator test and still fail to compile for a GPU. This compiles them with Numba and
NVVM (needs a CUDA toolkit: libnvvm, libdevice and ptxas; no driver, no GPU) and prints what
ptxas says about each: registers, spills, shared memory. It fails on a compile error and on
float64 instructions in a float32 kernel (a Python float literal promoted the arithmetic).

Exit status: 0 ok, 1 a kernel failed, 77 no CUDA toolkit found here.
Numba-cuda wants a device (or NVRTC) to pick the target; the few lookups that ask for one are
replaced here by sm_90, which is why this is a development script and not part of the package.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = (9, 0)


def find_toolkit():
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in roots:
        libdevice = os.path.join(root, "nvvm", "libdevice", "libdevice.10.bc")
        ptxas = os.path.join(root, "bin", "ptxas")
        if root and os.path.exists(libdevice) and os.path.exists(ptxas):
            return libdevice, ptxas
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    toolkit = find_toolkit()
    if toolkit is None:
        print("no CUDA toolkit (nvvm/libdevice and ptxas) found; set CUDA_HOME")
        return 77
    libdevice, ptxas = toolkit
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

    def compile_one(name, kernel, sig, compute):
        t0 = time.perf_counter()
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC)
        except Exception as exc:
            failures.append(name)
            print(f"{name}: FAILED to compile: {type(exc).__name__}: {str(exc)[:2000]}")
            return
        path = os.path.join(tmp, name + ".ptx")
        with open(path, "w") as f:
            f.write(ptx)
        f64 = len(re.findall(r"^\s+(?!cvt)\S+\.f64\b", ptx, re.M))
        run = subprocess.run([ptxas, f"-arch=sm_{CC[0]}{CC[1]}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True)
        info = " ".join(re.sub(r"^ptxas info\s*:\s*", "", line).strip()
                        for line in run.stderr.splitlines() if "Used" in line or "spill" in line)
        bad = run.returncode != 0 or (compute == np.float32 and f64)
        if bad:
            failures.append(name)
        print(f"{name}: {'FAILED ' if bad else ''}{time.perf_counter() - t0:.1f}s; "
              f"{f64} float64 instructions; {info}"
              + (run.stderr[-2000:] if run.returncode else ""),
              flush=True)

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
        for ev in (64,) if args.quick else (64, 128):
            ks = kernels.attention_kernels(_cuda._tiles(dtype, ev), dtype)
            for mname, mtype in masks:
                mask = (arr(mtype or store, 1), arr(i64, 1), i64, i64, i64)
                compile_one(f"attention {store} Ev<={ev} {mname}", ks.attention,
                            (*layout, *layout, *layout, *mask, i64, i64, i64, i64, i64, ct,
                             *variants_sig, boolean, arr(store, 3), arr(ct, 2)), compute)
        if args.quick:
            continue
        ks = kernels.attention_kernels(_cuda._tiles(dtype, 0), dtype)
        compile_one(f"attention_weights {store} float mask", ks.attention_weights,
                    (*layout, *layout, arr(store, 1), arr(i64, 1), i64, i64, i64, i64, i64, i64,
                     i64, ct, *variants_sig, boolean, arr(store, 3)), compute)
        compile_one(f"similarity {store}", ks.similarity,
                    (*layout, *layout, i64, i64, i64, i64, ct, boolean, arr(store, 3)), compute)
        compile_one(f"softmax {store}", kernels.softmax_kernel(_cuda.SOFTMAX_TILES, dtype),
                    (arr(store, 1), arr(i64, 1), i64, i64, arr(boolean, 1), arr(i64, 1), i64,
                     i64, boolean, i64, i64, i64, arr(store, 1), arr(i64, 1), i64, i64), compute)
    print(f"{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
