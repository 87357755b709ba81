"""Merkle trees as Certificate Transparency builds them (RFC 6962, section 2.1).

    leaf:  SHA-256(0x00 || data)
    node:  SHA-256(0x01 || left || right)
    MTH(D[n]) = H(0x01 || MTH(D[0:k]) || MTH(D[k:n])), k the largest power of two < n

so a tree of any size is a perfect left subtree and whatever is left on the
right. Pure functions of byte strings; the audit log's leaves are its
records' hashes.

A tree is also described by its *frontier*: the roots of the perfect
subtrees that the binary digits of its size give, largest first. Appending a
leaf is a binary carry; the root folds the frontier from the right. A
checkpoint stores its frontier, so the next one costs only the new leaves.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) = SHA-256()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """k: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def extend_frontier(frontier: list[bytes], size: int, leaves: Iterable[bytes]) -> tuple[list[bytes], int]:
    """(frontier, size) after appending leaf *data* to a tree of `size` leaves."""
    frontier = list(frontier)
    for data in leaves:
        frontier.append(leaf_hash(data))
        size += 1
        carry = size
        while carry & 1 == 0:  # two perfect subtrees of equal size merge, like a binary carry
            right = frontier.pop()
            frontier[-1] = node_hash(frontier[-1], right)
            carry >>= 1
    return frontier, size


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """MTH of the tree the frontier describes: fold from the right."""
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for left in reversed(frontier[:-1]):
        root = node_hash(left, root)
    return root


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf data."""
    return frontier_root(extend_frontier([], 0, leaves)[0])


def _subtree_root(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaf *hashes* (not data), recursively as the RFC defines it."""
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_subtree_root(hashes[:k]), _subtree_root(hashes[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) (RFC 6962 2.1.1): the sibling hashes from the leaf up, for the tree of all `leaves`."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"index: {index} is outside a tree of {len(leaves)} leaves")
    return _path(index, [leaf_hash(d) for d in leaves])


def _path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    if len(hashes) == 1:
        return []
    k = _split(len(hashes))
    if m < k:
        return _path(m, hashes[:k]) + [_subtree_root(hashes[k:])]
    return _path(m - k, hashes[k:]) + [_subtree_root(hashes[:k])]


def verify_inclusion(data: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether `proof` shows leaf data `data` at `index` in the tree of `size` leaves with `root`.

    The verification algorithm of RFC 9162 section 2.1.3.2 (the RFC 6962
    audit path, checked bit by bit against the index and size, so a proof for
    another index or size fails)."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf_hash(data)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn & 1 == 0 and fn != 0:  # a right edge: climb past the levels with no sibling
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


__all__ = ["EMPTY_ROOT", "extend_frontier", "frontier_root", "inclusion_proof", "leaf_hash", "merkle_root",
           "node_hash", "verify_inclusion"]
