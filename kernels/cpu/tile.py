"""The register-tiled block product of the CPU attention kernel, written as LLVM vector code.

    c[r, :COLS] (= or +=) sum over d < depth of a[r, d] * b[d, :COLS]     for r < ROWS

with ROWS = 6 rows and COLS = two vectors: the 12 partial sums stay in vector registers for the
whole depth, and each step loads two vectors of ``b`` and six scalars of ``a`` for twelve fused
multiply-adds (the shape of the classic gemm micro-kernel). A vector is one register of the
machine Numba compiles for: 64 bytes where it has AVX-512 (COLS = 32 float32 or 16 float64), else
32 bytes, AVX2's (16 or 8). Measured on a 2-core Xeon with AVX-512, one thread: the 64-byte tile
ran at 86-107 GFLOP/s against 53-57 for the 32-byte one (OpenBLAS's sgemm: 92 per core), and
the whole attention kernel 1.4-1.9x faster.
Numba cannot express a value that lives in a vector register, and LLVM does not keep arrays in
registers across a loop, so plain loops reach about half of the machine's peak; OpenBLAS, called
on small blocks, pays for packing them on every call.

Arrays are flat, C-contiguous and addressed by element offsets: row ``r`` of ``a`` starts at
``a_start + r * a_row_stride``, row ``d`` of ``b`` at ``b_start + d * b_row_stride``, row ``r`` of
``c`` at ``c_start + r * c_row_stride``. The caller pads ``a`` and ``c`` to ROWS rows and ``b`` and
``c`` to COLS columns; nothing here checks bounds.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, register_jitable

ROWS = 6
VECTORS = 2           # vectors per row of the tile

# CPUs whose names (NUMBA_CPU_NAME) LLVM gives AVX-512; for the host, its own feature list says.
_AVX512_CPUS = ("skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake-client",
                "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
                "graniterapids", "graniterapids-d", "diamondrapids", "znver4", "znver5",
                "x86-64-v4")


def vector_bytes() -> int:
    """The width of one vector register of the CPU Numba compiles for: 64 with AVX-512, else 32.

    It follows Numba's own choice of target (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host),
    which is also part of the key of Numba's on-disk cache: a kernel cached for one width is never
    loaded for the other.
    """
    from numba.core import config
    features = config.CPU_FEATURES
    name = config.CPU_NAME
    if features is not None:
        return 64 if "+avx512f" in features.split(",") else 32
    if name is not None and name != "host":
        return 64 if name in _AVX512_CPUS else 32
    import llvmlite.binding as llvm
    try:
        host = llvm.get_host_cpu_features()
    except RuntimeError:  # (no feature list on this platform: LLVM splits wider vectors anyway)
        return 32
    return 64 if host.get("avx512f", False) else 32


VECTOR_BYTES = vector_bytes()


@register_jitable
def tile_cols(itemsize):
    """Columns of one tile for elements of ``itemsize`` bytes (16 for float32, 8 for float64)."""
    return VECTORS * VECTOR_BYTES // itemsize


@intrinsic
def tile_width(typingctx, array):
    """``tile_cols`` for the elements of ``array``, as a constant in compiled code (an array's
    itemsize is read at run time, so loops over ``tile_cols(array.itemsize)`` columns have a trip
    count LLVM does not know, and divisions by it stay divisions)."""
    if not isinstance(array, types.Array) or not isinstance(array.dtype, types.Float):
        return None
    cols = VECTORS * VECTOR_BYTES // (array.dtype.bitwidth // 8)

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, cols)

    return types.intp(array), codegen


def _make_tile_product(accumulate: bool, strided_a: bool = False):
    def typer(typingctx, a, a_start, a_row_stride, *rest):
        if strided_a:  # a_depth_stride, then the rest as without it
            if len(rest) != 8:
                return None
            a_depth_stride, b, b_start, b_row_stride, c, c_start, c_row_stride, depth = rest
        else:
            if len(rest) != 7:
                return None
            b, b_start, b_row_stride, c, c_start, c_row_stride, depth = rest
        arrays = (a, b, c)
        if not all(isinstance(x, types.Array) and x.layout == "C" for x in arrays):
            return None
        if len({x.dtype for x in arrays}) != 1 or a.dtype not in (types.float32, types.float64):
            return None
        if not c.mutable:
            return None
        strides = (types.intp,) * (3 if strided_a else 2)
        return types.void(a, *strides, b, types.intp, types.intp, c, types.intp, types.intp,
                          types.intp)

    def codegen(context, builder, sig, args):
        if strided_a:
            (a, a_start, a_row_stride, a_depth_stride, b, b_start, b_row_stride, c, c_start,
             c_row_stride, depth) = args
        else:
            (a, a_start, a_row_stride, b, b_start, b_row_stride, c, c_start, c_row_stride,
             depth) = args
            a_depth_stride = None
        b_index = 4 if strided_a else 3
        dtype = sig.args[0].dtype
        itemsize = context.get_abi_sizeof(context.get_value_type(dtype))
        lanes = VECTOR_BYTES // itemsize
        fty = context.get_value_type(dtype)
        vty = ir.VectorType(fty, lanes)
        idx = ir.IntType(64)
        # declare_intrinsic cannot name vector overloads itself: llvm.fma.v8f32 / llvm.fma.v4f64
        fma_name = f"llvm.fma.v{lanes}f{itemsize * 8}"
        fma = builder.module.declare_intrinsic(fma_name, (), ir.FunctionType(vty, [vty] * 3))

        def data(arg, aty):
            return context.make_array(aty)(context, builder, arg).data

        a_ptr, b_ptr, c_ptr = (data(x, sig.args[i])
                               for x, i in ((a, 0), (b, b_index), (c, b_index + 3)))

        def vector_at(ptr, offset):
            return builder.bitcast(builder.gep(ptr, [offset]), vty.as_pointer())

        zero = ir.Constant(vty, None)
        entry = builder.block
        loop = builder.append_basic_block("tile.depth")
        done = builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", depth, ir.Constant(idx, 0)), loop, done)

        # One step of the depth loop: sums[r][v] += a[r, d] * b[d, v * lanes : (v + 1) * lanes]
        builder.position_at_end(loop)
        d = builder.phi(idx)
        d.add_incoming(ir.Constant(idx, 0), entry)
        sums = [[builder.phi(vty) for _ in range(VECTORS)] for _ in range(ROWS)]
        for row in sums:
            for s in row:
                s.add_incoming(zero, entry)
        b_row = builder.add(b_start, builder.mul(d, b_row_stride))
        a_depth = d if a_depth_stride is None else builder.mul(d, a_depth_stride)
        b_vectors = [builder.load(vector_at(b_ptr, builder.add(b_row, ir.Constant(idx, v * lanes))),
                                  align=itemsize)
                     for v in range(VECTORS)]
        new_sums = []
        for r in range(ROWS):
            a_at = builder.add(builder.add(a_start, builder.mul(ir.Constant(idx, r), a_row_stride)),
                               a_depth)
            a_scalar = builder.load(builder.gep(a_ptr, [a_at]))
            a_splat = builder.shuffle_vector(
                builder.insert_element(ir.Constant(vty, ir.Undefined), a_scalar,
                                       ir.Constant(ir.IntType(32), 0)),
                ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                                            [0] * lanes))
            new_sums.append([builder.call(fma, [a_splat, b_vectors[v], sums[r][v]])
                             for v in range(VECTORS)])
        d_next = builder.add(d, ir.Constant(idx, 1))
        loop_end = builder.block
        d.add_incoming(d_next, loop_end)
        for r in range(ROWS):
            for v in range(VECTORS):
                sums[r][v].add_incoming(new_sums[r][v], loop_end)
        builder.cbranch(builder.icmp_signed("<", d_next, depth), loop, done)

        # Write the tile (depth 0 writes zeros, or leaves c as it is when accumulating).
        builder.position_at_end(done)
        totals = []
        for r in range(ROWS):
            totals.append([])
            for v in range(VECTORS):
                total = builder.phi(vty)
                total.add_incoming(zero, entry)
                total.add_incoming(new_sums[r][v], loop_end)
                totals[r].append(total)
        for r in range(ROWS):
            c_row = builder.add(c_start, builder.mul(ir.Constant(idx, r), c_row_stride))
            for v in range(VECTORS):
                total = totals[r][v]
                where = vector_at(c_ptr, builder.add(c_row, ir.Constant(idx, v * lanes)))
                if accumulate:
                    total = builder.fadd(builder.load(where, align=itemsize), total)
                builder.store(total, where, align=itemsize)
        return context.get_dummy_value()

    if strided_a:
        def tile(typingctx, a, a_start, a_row_stride, a_depth_stride, b, b_start, b_row_stride,
                 c, c_start, c_row_stride, depth):
            sig = typer(typingctx, a, a_start, a_row_stride, a_depth_stride, b, b_start,
                        b_row_stride, c, c_start, c_row_stride, depth)
            return (sig, codegen) if sig is not None else None
    else:
        def tile(typingctx, a, a_start, a_row_stride, b, b_start, b_row_stride, c, c_start,
                 c_row_stride, depth):
            sig = typer(typingctx, a, a_start, a_row_stride, b, b_start, b_row_stride, c,
                        c_start, c_row_stride, depth)
            return (sig, codegen) if sig is not None else None

    name = "tile_product_add" if accumulate else "tile_product"
    tile.__name__ = tile.__qualname__ = name + ("_strided" if strided_a else "")
    return intrinsic(tile)


tile_product = _make_tile_product(accumulate=False)
tile_product.__doc__ = "c[r, :COLS] = sum_d a[r, d] * b[d, :COLS] for r < ROWS (see module doc)."
tile_product_add = _make_tile_product(accumulate=True)
tile_product_add.__doc__ = "c[r, :COLS] += sum_d a[r, d] * b[d, :COLS] for r < ROWS."
tile_product_add_strided = _make_tile_product(accumulate=True, strided_a=True)
tile_product_add_strided.__doc__ = (
    "``tile_product_add`` with a[r, d] at a_start + r * a_row_stride + d * a_depth_stride (the "
    "argument after a_row_stride): a stored transposed is read in place, six neighbouring "
    "elements a step.")
