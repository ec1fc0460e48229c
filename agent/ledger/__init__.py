"""The key ledger: its sans-I/O core, and its storage on the flash record log.

The core takes bytes and values and returns values (no files, sockets,
clocks or threads): ``codec`` (the one binary layout), ``tx``, ``identity``
(Ed25519), ``merkle`` (RFC 6962), ``block`` (header, endorsements, PoW seal,
genesis), ``state`` (meter table, membership, tip, the state digest),
``rules`` (``check_proposal`` for endorsers, ``validate_block`` /
``apply_block`` for ordered blocks, reason codes), ``proof`` (record proofs
for the master station), ``snapshot`` (the snapshot codec and its size
bound), ``query`` (the four answers). ``chain`` is the one module that does
I/O: the chain on the ledger partition through ``hal.recordlog``, checked at
boot; ``errors`` holds its exceptions.
"""
