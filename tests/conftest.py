import os

# The CUDA tests run in Numba's CUDA simulator unless the caller chose otherwise. Numba reads
# the variable when it is first imported, so it is set here, before any test module imports it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
