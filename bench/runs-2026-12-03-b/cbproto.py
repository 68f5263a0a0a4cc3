"""Prototype: NumPy's OpenBLAS runs its threaded jobs on the OpenMP pool (GOMP_parallel)."""
import ctypes, glob, os
import llvmlite.binding as llvm
import numpy as np

IR = r"""
%ctx = type { void (i32, i8*, i32)*, i8*, i64, i32 }
declare void @GOMP_parallel(void (i8*)*, i8*, i32, i32)
declare i32 @omp_get_thread_num()
define void @fa_worker(i8* %raw) {
  %c = bitcast i8* %raw to %ctx*
  %fp = getelementptr %ctx, %ctx* %c, i32 0, i32 0
  %f = load void (i32, i8*, i32)*, void (i32, i8*, i32)** %fp
  %dp = getelementptr %ctx, %ctx* %c, i32 0, i32 1
  %d = load i8*, i8** %dp
  %ep = getelementptr %ctx, %ctx* %c, i32 0, i32 2
  %e = load i64, i64* %ep
  %xp = getelementptr %ctx, %ctx* %c, i32 0, i32 3
  %x = load i32, i32* %xp
  %t = call i32 @omp_get_thread_num()
  %t64 = sext i32 %t to i64
  %off = mul i64 %t64, %e
  %job = getelementptr i8, i8* %d, i64 %off
  call void %f(i32 %t, i8* %job, i32 %x)
  ret void
}
define void @fa_callback(i32 %sync, void (i32, i8*, i32)* %dojob, i32 %n, i64 %elsize, i8* %data, i32 %xd) {
  %c = alloca %ctx
  %fp = getelementptr %ctx, %ctx* %c, i32 0, i32 0
  store void (i32, i8*, i32)* %dojob, void (i32, i8*, i32)** %fp
  %dp = getelementptr %ctx, %ctx* %c, i32 0, i32 1
  store i8* %data, i8** %dp
  %ep = getelementptr %ctx, %ctx* %c, i32 0, i32 2
  store i64 %elsize, i64* %ep
  %xp = getelementptr %ctx, %ctx* %c, i32 0, i32 3
  store i32 %xd, i32* %xp
  %raw = bitcast %ctx* %c to i8*
  call void @GOMP_parallel(void (i8*)* @fa_worker, i8* %raw, i32 %n, i32 0)
  ret void
}
"""
_keep = []
def install():
    from numba.np.ufunc import omppool
    from numba.core import codegen  # ensure llvm initialised
    import numba
    numba.np.ufunc.parallel._launch_threads()
    gomp = ctypes.CDLL(omppool.__file__)
    llvm.initialize_native_target(); llvm.initialize_native_asmprinter()
    for name in ("GOMP_parallel", "omp_get_thread_num"):
        llvm.add_symbol(name, ctypes.cast(getattr(gomp, name), ctypes.c_void_p).value)
    mod = llvm.parse_assembly(IR); mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine()
    ee = llvm.create_mcjit_compiler(mod, tm); ee.finalize_object()
    addr = ee.get_function_address("fa_callback")
    _keep.append((ee, mod))
    path = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"))[0]
    lib = ctypes.CDLL(path)
    setcb = lib.scipy_openblas_set_threads_callback_function64_
    setcb.argtypes = [ctypes.c_void_p]
    setcb(addr)
    return addr
