"""The key ledger's sans-I/O core: transactions, blocks, Merkle tree, signatures, rules.

Bytes and values in, values out: no files, sockets, clocks or threads. The
node does the I/O (ordering, flash); this package decides what is valid.
Modules: codec (the one binary layout), tx, identity (Ed25519), merkle
(RFC 6962), block (header, endorsements, PoW seal, genesis), state (meter
table, membership, tip), rules (validate_block / apply_block, reason codes).
"""
