"""What runs on the terminal: ledger, key store, ordering, placement, routing, console."""
