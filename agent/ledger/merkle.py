"""RFC 6962 Merkle Tree Hash and inclusion proofs, so one record can be checked alone.

RFC 6962 section 2.1: MTH({}) = SHA-256(), MTH({d0}) = SHA-256(0x00 || d0),
and for n > 1 with k the largest power of two < n,
MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])). The 0x00 / 0x01
prefixes keep a leaf from ever passing for an inner node (second preimages).

The tree is built bottom-up: pair neighbours on each level and carry an odd
last node up unchanged. That yields exactly the RFC's left-balanced split
(the tests compare it with the recursive definition) in O(n) hashes.

Inclusion proofs are RFC 6962 section 2.1.1's PATH(m, D[n]), listed from the
leaf's sibling upwards; ``verify_inclusion`` is RFC 9162 section 2.1.3.2's
algorithm, which needs only the leaf hash, its index, the tree size, the path
and the root: the master station checks one transaction against a block
header without the chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()
HASH_LEN = 32


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry): RFC 6962 section 2.1, the hash of one leaf."""
    return hashlib.sha256(LEAF_PREFIX + bytes(entry)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): RFC 6962 section 2.1, an inner node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first, root level (one hash) last."""
    level = list(leaf_hashes)
    levels = [level]
    while len(level) > 1:
        up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])  # the odd last node moves up unchanged (RFC's k split)
        levels.append(up)
        level = up
    return levels


class MerkleTree:
    """A tree over given entries: its root and any leaf's audit path."""

    __slots__ = ("_levels", "size")

    def __init__(self, entries: Sequence[bytes]) -> None:
        self.size = len(entries)
        self._levels = _levels([leaf_hash(e) for e in entries]) if entries else [[]]

    @property
    def root(self) -> bytes:
        return self._levels[-1][0] if self.size else EMPTY_ROOT

    def inclusion_proof(self, index: int) -> tuple[bytes, ...]:
        """PATH(index, D[size]) of RFC 6962 section 2.1.1, sibling first."""
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} not in a tree of {self.size}")
        path = []
        i = index
        for level in self._levels[:-1]:
            sibling = i ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            # no sibling: this node is the odd one carried up, nothing to prove here
            i >>= 1
        return tuple(path)


def merkle_root(entries: Sequence[bytes]) -> bytes:
    """MTH(entries): RFC 6962 section 2.1."""
    return MerkleTree(entries).root


def inclusion_proof(entries: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """The audit path of ``entries[index]``."""
    return MerkleTree(entries).inclusion_proof(index)


def verify_inclusion(leaf: bytes, index: int, tree_size: int, path: Sequence[bytes],
                     root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: is ``leaf`` (a leaf hash) entry ``index`` of ``root``?

    Never raises on malformed input; anything not a valid proof is False.
    """
    if not isinstance(index, int) or not isinstance(tree_size, int):
        return False
    if not 0 <= index < tree_size:
        return False
    if not isinstance(leaf, bytes) or len(leaf) != HASH_LEN:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in path:
        if sn == 0 or not isinstance(p, bytes) or len(p) != HASH_LEN:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
