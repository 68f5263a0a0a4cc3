"""Attention kernels, grouped by target; installed as ``fastattn.kernels``.

``cpu``: Numba ``njit(parallel=True)`` kernels. ``cuda``: ``numba.cuda`` kernels.
Each is imported (and compiled) only when its backend is first used.
"""
