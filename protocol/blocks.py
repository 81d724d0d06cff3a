"""Blocks of the parameter space and their seeds (PROTOCOL.md §5.5): the pure-integer half.

Cyclic block updates (FedCyBGD, Wang et al. 2024, arXiv 2406.11187) train one block of
the model at a time. On this project's wire a block client's update is still one scalar
per seed, but its seeds are *block seeds*, whose direction is zero outside the block:
the reconstruction error of a projected update shrinks with the block's size instead of
the whole space's (``(d_b − 1)/K`` instead of ``(d − 1)/K``, PROTOCOL.md §8.1), and
every replica replays it touching the block's elements only.

The table of the ledger is ``seed -> total`` and never cleared (§6.2), so whether a
seed is restricted, and to which block, must be a function of the seed and the
federation alone. A federation whose ``FederationInfo.block_seeds`` is ``J > 0`` has, for
every block ``b``, the ``J`` seeds ``block_seed(federation_id, b, j)``, ``j < J``; every
other seed names a direction over the whole space. Anyone who knows the federation's id
recomputes them (no key is sent): :func:`block_seed_map`.

Blocks follow the canonical names (§5.1): a tensor whose name holds ``layers.<i>.`` is in
block ``i`` (the full model's layer number); every other tensor (the embedding, the final
norm, an untied head; only the ``full`` scope has them) is in the outer block,
:data:`OUTER_BLOCK`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from protocol.seeds import pool_seed

__all__ = ["OUTER_BLOCK", "MAX_BLOCK_SEEDS", "MAX_BLOCK", "BLOCK_KEY_DOMAIN", "block_of", "block_key",
           "block_seed", "block_seed_map"]

# The outer block's number: above any decoder layer a model can have (layer numbers are
# below it, limits.MAX_LAYERS on the wire).
OUTER_BLOCK = 65535
MAX_BLOCK = OUTER_BLOCK
# Seeds per block at most: block_seed's index is block * 2**16 + j.
MAX_BLOCK_SEEDS = 1 << 16
BLOCK_KEY_DOMAIN = b"edgefed block seeds v1:"

# A decoder layer's number in a canonical name (Llama: model.layers.<i>.…; peft's LoRA
# names keep it).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_of(name: str) -> int:
    """The block of the tensor with canonical name ``name``: its decoder layer's number,
    or :data:`OUTER_BLOCK` for a tensor outside every numbered layer."""
    match = _LAYER.search(name)
    if match is None:
        return OUTER_BLOCK
    layer = int(match.group(1))
    if layer >= OUTER_BLOCK:
        raise ValueError(f"layer number {layer} in {name!r} is not below {OUTER_BLOCK}")
    return layer


def block_key(federation_id: str) -> int:
    """The key block seeds derive from: the first 8 bytes of
    ``SHA-256(BLOCK_KEY_DOMAIN + federation_id as UTF-8)``, little-endian, top bit cleared."""
    digest = hashlib.sha256(BLOCK_KEY_DOMAIN + federation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def block_seed(federation_id: str, block: int, index: int) -> int:
    """Seed ``index`` of block ``block``: ``pool_seed(block_key(federation_id), block * 2**16 + index)``."""
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be an int in [0, {MAX_BLOCK}], got {block!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_BLOCK_SEEDS:
        raise ValueError(f"index must be an int in [0, {MAX_BLOCK_SEEDS}), got {index!r}")
    return pool_seed(block_key(federation_id), block * MAX_BLOCK_SEEDS + index)


def block_seed_map(federation_id: str, blocks: Iterable[int], per_block: int) -> dict[int, int]:
    """``seed -> block`` for the first ``per_block`` seeds of each of ``blocks``.

    Raises:
        ValueError: two block seeds coincide (a chance of about ``n² / 2**64``; a
            federation that meets it must pick another id).
    """
    if isinstance(per_block, bool) or not isinstance(per_block, int) or not 0 <= per_block <= MAX_BLOCK_SEEDS:
        raise ValueError(f"per_block must be an int in [0, {MAX_BLOCK_SEEDS}], got {per_block!r}")
    key = block_key(federation_id)
    found: dict[int, int] = {}
    for block in sorted(set(blocks)):
        block_seed(federation_id, block, 0)  # validates the block number
        for index in range(per_block):
            seed = pool_seed(key, block * MAX_BLOCK_SEEDS + index)
            if seed in found:
                raise ValueError(f"block seeds of blocks {found[seed]} and {block} coincide in federation "
                                 f"{federation_id!r}; choose another federation id")
            found[seed] = block
    return found
