"""Pallas splash attention (the TPU kernel that ships with JAX) for causal self-attention with padding.

Used by :func:`jpeft.attention.attend` with ``implementation="splash"`` when the mask has a
:class:`~jpeft.attention.MaskStructure` (causal with the keys' offset, padding as segment
ids) and the lengths are multiples of the kernel's 128-wide tiles; otherwise the blockwise
form runs. Grouped-query heads run as one multi-query kernel per key/value head. Under a
mesh context (``jax.set_mesh``, or the mesh the trainer's step traces under), the batch is
split over every mesh axis but ``tensor`` and the key/value heads over ``tensor``, with
``shard_map``: a Pallas kernel is not partitioned by XLA.

Padding: a padded query attends only to padded keys (segment 0) and a real one only to
real keys, so the real positions' outputs equal the dense form's; padded positions differ
(the dense form gives them a uniform average) and carry no loss.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

TILE = 128


def supported(num_queries: int, num_keys: int) -> bool:
    """Whether the kernel takes these lengths (multiples of its tiles)."""
    return num_queries % TILE == 0 and num_keys % TILE == 0


@functools.lru_cache(maxsize=64)
def _kernel(t: int, s: int, offset: int, groups: int, interpret: bool):
    mask = masks.MultiHeadMask([masks.CausalMask((t, s), offset=offset) for _ in range(groups)])
    q_block, kv_block = math.gcd(t, 512), math.gcd(s, 512)
    sizes = kernels.BlockSizes(block_q=q_block, block_kv=kv_block, block_kv_compute=kv_block,
                               block_q_dkv=q_block, block_kv_dkv=kv_block, block_kv_dkv_compute=kv_block,
                               block_q_dq=q_block, block_kv_dq=kv_block)
    return kernels.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, structure, scale: float, *, interpret: bool = False):
    """``(B, T, N, H)`` attention by the splash kernel; ``interpret=True`` runs it on any backend (slowly)."""
    b, t, n, h = q_BxTxNxH.shape
    s, kh = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    kernel = _kernel(t, s, int(structure.offset), n // kh, interpret)
    q_BxKxGxTxH = (q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype)).reshape(b, t, kh, n // kh, h)
    q_BxKxGxTxH = q_BxKxGxTxH.transpose(0, 2, 3, 1, 4)
    k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
    segments_BxS = structure.key_valid_BxS.astype(jnp.int32)
    segments_BxT = segments_BxS[:, structure.offset:]

    def local(q, k, v, seg_q, seg_kv):
        def one(q_GxTxH, k_SxH, v_SxH, seg_q_T, seg_kv_S):
            return kernel(q_GxTxH, k_SxH, v_SxH, segment_ids=kernels.SegmentIds(seg_q_T, seg_kv_S))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over key/value heads
        return jax.vmap(per_head)(q, k, v, seg_q, seg_kv)  # over rows

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out_BxKxGxTxH = local(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, segments_BxT, segments_BxS)
    else:
        rows = tuple(a for a in mesh.axis_names if a != "tensor" and mesh.shape[a] > 1) or None
        heads = "tensor" if "tensor" in mesh.axis_names and kh % mesh.shape["tensor"] == 0 else None
        spec = PartitionSpec(rows, heads)
        out_BxKxGxTxH = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(rows),
                                                                 PartitionSpec(rows)),
                                      out_specs=spec, check_vma=False)(
            q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, segments_BxT, segments_BxS)
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BxTxNxH.dtype)
