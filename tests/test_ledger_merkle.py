"""RFC 6962 Merkle Tree Hash and audit paths against the reference definition and vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def reference_mth(d: Sequence[bytes]) -> bytes:
    """RFC 6962 section 2.1, transcribed: split at the largest power of two < n."""
    n = len(d)
    if n == 0:
        return sha(b"")
    if n == 1:
        return sha(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return sha(b"\x01" + reference_mth(d[:k]) + reference_mth(d[k:]))


def reference_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """RFC 6962 section 2.1.1 PATH(m, D[n]), transcribed."""
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*reference_path(m, d[:k]), reference_mth(d[k:])]
    return [*reference_path(m - k, d[k:]), reference_mth(d[:k])]


# Certificate Transparency's reference leaves and tree heads for sizes 0..8
# (published with RFC 6962 implementations, e.g. transparency-dev/merkle).
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]
CT_PATHS = {
    0: ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    5: ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}

ENTRIES = [bytes([i, i * 7 % 256]) * (1 + i % 3) for i in range(70)]


def test_empty_tree_hash_is_sha256_of_nothing() -> None:
    assert merkle_root([]) == EMPTY_ROOT == sha(b"") == CT_ROOTS[0]


@pytest.mark.parametrize("n", range(9))
def test_roots_match_the_certificate_transparency_vectors(n: int) -> None:
    assert merkle_root(CT_LEAVES[:n]) == CT_ROOTS[n]


@pytest.mark.parametrize("index", sorted(CT_PATHS))
def test_audit_paths_match_the_certificate_transparency_vectors(index: int) -> None:
    path = inclusion_proof(CT_LEAVES, index)
    assert [p.hex() for p in path] == CT_PATHS[index]
    assert verify_inclusion(leaf_hash(CT_LEAVES[index]), index, 8, path, CT_ROOTS[8])


def test_three_leaves_by_hand() -> None:
    """Split at k = 2: MTH(a, b, c) = H(1 || H(1 || H(0||a) || H(0||b)) || H(0||c))."""
    a, b, c = b"a", b"b", b"c"
    la, lb, lc = sha(b"\x00a"), sha(b"\x00b"), sha(b"\x00c")
    assert merkle_root([a, b, c]) == sha(b"\x01" + sha(b"\x01" + la + lb) + lc)
    assert inclusion_proof([a, b, c], 2) == (sha(b"\x01" + la + lb),)
    assert inclusion_proof([a, b, c], 0) == (lb, lc)


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    """A node's two children, offered as one leaf, do not hash to the node."""
    left, right = leaf_hash(b"x"), leaf_hash(b"y")
    assert node_hash(left, right) != leaf_hash(left + right)


@pytest.mark.parametrize("n", range(71))
def test_root_equals_the_recursive_definition(n: int) -> None:
    assert merkle_root(ENTRIES[:n]) == reference_mth(ENTRIES[:n])


def test_every_leaf_proof_verifies_and_equals_rfc_path_for_0_to_70_leaves() -> None:
    for n in range(71):
        tree = MerkleTree(ENTRIES[:n])
        assert tree.size == n
        for m in range(n):
            path = tree.inclusion_proof(m)
            assert list(path) == reference_path(m, ENTRIES[:n])
            assert verify_inclusion(leaf_hash(ENTRIES[m]), m, n, path, tree.root)


def test_tampered_proofs_fail_for_1_to_70_leaves() -> None:
    """Injected: a flipped path bit, a wrong index, leaf or root, a path too long or short.

    The tree size is not tampered with: an audit path alone does not fix it
    (RFC 9162 takes it from the signed tree head), so the master station
    takes it from the signed block header's tx_count.
    """
    for n in range(1, 71):
        tree = MerkleTree(ENTRIES[:n])
        root = tree.root
        for m in range(n):
            path = tree.inclusion_proof(m)
            leaf = leaf_hash(ENTRIES[m])
            for j in range(len(path)):
                bad = list(path)
                bad[j] = bytes([path[j][0] ^ 1]) + path[j][1:]
                assert not verify_inclusion(leaf, m, n, bad, root)
            assert not verify_inclusion(leaf_hash(ENTRIES[m] + b"!"), m, n, path, root)
            assert not verify_inclusion(leaf, m, n, path, sha(root))
            assert not verify_inclusion(leaf, m, n, (*path, root), root)
            if path:
                assert not verify_inclusion(leaf, m, n, path[:-1], root)
            for other in {m - 1, m + 1} & set(range(n)):
                assert not verify_inclusion(leaf, other, n, path, root)


def test_index_outside_the_tree_is_refused() -> None:
    tree = MerkleTree(ENTRIES[:5])
    with pytest.raises(IndexError):
        tree.inclusion_proof(5)
    with pytest.raises(IndexError):
        MerkleTree([]).inclusion_proof(0)
    leaf = leaf_hash(ENTRIES[0])
    assert not verify_inclusion(leaf, 5, 5, (), tree.root)
    assert not verify_inclusion(leaf, -1, 5, (), tree.root)
    assert not verify_inclusion(leaf, 0, 0, (), EMPTY_ROOT)


def test_single_leaf_tree_has_an_empty_path() -> None:
    tree = MerkleTree([b"only"])
    assert tree.inclusion_proof(0) == ()
    assert tree.root == leaf_hash(b"only")
    assert verify_inclusion(leaf_hash(b"only"), 0, 1, (), tree.root)


@given(st.binary(max_size=40), st.integers(-2, 80), st.integers(-2, 80),
       st.lists(st.binary(max_size=40), max_size=8), st.binary(max_size=40))
def test_verify_inclusion_never_raises_on_garbage(leaf: bytes, index: int, size: int,
                                                  path: list[bytes], root: bytes) -> None:
    assert verify_inclusion(leaf, index, size, path, root) in (False, True)


@given(st.lists(st.binary(max_size=12), min_size=1, max_size=40), st.data())
def test_proofs_verify_for_arbitrary_entries(entries: list[bytes], data: st.DataObject) -> None:
    m = data.draw(st.integers(0, len(entries) - 1))
    tree = MerkleTree(entries)
    assert tree.root == reference_mth(entries)
    assert verify_inclusion(leaf_hash(entries[m]), m, len(entries), tree.inclusion_proof(m),
                            tree.root)
