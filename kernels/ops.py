"""Triton versions of the model's fused ops, with the same signatures as the torch ones in core/model/layers.py.

* ``rms_norm(x [T, H], weight [H], eps, residual [T, H] | None) -> (out [T, H], new_residual [T, H])``
* ``rotary(q [T, Hq, D], k [T, Hk, D], positions int64 [T], cos_sin_cache float32 [max_pos, D]) -> (q, k)`` (in place)
* ``silu_and_mul(x [T, 2I]) -> [T, I]``

All tensors are in the model dtype unless stated; see :mod:`splitserve.kernels.elementwise` for the exact numerics.
The ``ref_*`` names are the torch references the kernels are tested against.
"""

from __future__ import annotations

from .elementwise import ref_rms_norm, ref_rotary, ref_silu_and_mul, rms_norm, rotary, silu_and_mul

__all__ = ["ref_rms_norm", "ref_rotary", "ref_silu_and_mul", "rms_norm", "rotary", "silu_and_mul"]
