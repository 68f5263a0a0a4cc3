"""Pieces the CUDA kernels share: their compile-time tile shapes and the device-function
decorator."""
from typing import NamedTuple

from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

try:
    from numba.cuda.core.config import ENABLE_CUDASIM as _SIMULATOR
except ImportError:  # pragma: no cover - older numba-cuda
    from numba.core.config import ENABLE_CUDASIM as _SIMULATOR


class Tiles(NamedTuple):
    """Compile-time tile shapes of the similarity and attention-weights kernels."""
    block_q: int          # query rows per thread block
    block_k: int          # keys per step of the key loop
    rows_per_thread: int  # query rows each thread owns
    threads_per_row: int  # threads sharing a query row
    chunk: int            # features (and value rows) staged through shared memory at a time
    block_v: int          # value columns per block; more blocks along grid y cover the rest

    @property
    def threads(self) -> int:
        return self.block_q // self.rows_per_thread * self.threads_per_row

    def shared_bytes(self, itemsize: int) -> int:
        """Static shared memory of these kernels (a bound: what the former fused kernel used)."""
        BQ, BK, _, TX, CH, BV = self
        return itemsize * (CH * (BQ + 1) + CH * (BK + 1) + BQ * (BK + 1) + CH * BV + BQ * (TX + 1))

    def check(self, itemsize: int = 4) -> "Tiles":
        ok = (self.block_q % self.rows_per_thread == 0 and self.block_k % self.threads_per_row == 0
              and self.block_v % self.threads_per_row == 0 and self.block_k % self.chunk == 0
              and min(self) > 0)
        if not ok:
            raise ValueError(f"inconsistent tiles {self}")
        if self.shared_bytes(itemsize) > 48 * 1024:
            raise ValueError(f"tiles {self} need {self.shared_bytes(itemsize)} bytes of shared "
                             f"memory for {itemsize}-byte values; static shared memory ends at "
                             f"48 KiB")
        return self


class RowTiles(NamedTuple):
    """Compile-time shape of the softmax kernel: rows per block, threads sharing a row."""
    rows_per_block: int
    threads_per_row: int

    @property
    def threads(self) -> int:
        return self.rows_per_block * self.threads_per_row


def _device(fn):
    # forceinline lets NVVM keep the callers' small local arrays in registers; the simulator's
    # jit takes no such option.
    if _SIMULATOR:
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True)(fn)
