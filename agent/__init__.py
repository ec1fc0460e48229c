"""What runs on the terminal, on top of ``hal``.

- ``placement``: cluster the meters and site terminals at graph medoids
  (eq. 1-4), and re-home meters as they join and leave.
- ``ledger``: the permissioned ledger of meter key operations.
- ``keystore``: the home terminal's meter keys, at rest on flash and in transport.
- ``routing``: the terminals' queueing model (eq. 5-8) and the load-balanced
  router (eq. 9), fed by measured link counters.
- ``node``: the sans-I/O node core joining them into one data path, from a
  meter's request to a committed block and back; ``terminal`` carries its
  actions out against the chain and the key store.

``python -m agent --board FILE --check`` validates a board file.
"""
