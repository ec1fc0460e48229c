"""The meter key store of the home terminal: key material, transport, keys at rest on flash.

Keys never leave their meter's home terminal in clear (paper, section 2.2.1):
the ledger carries only fingerprints and rotation-proof digests
(material.py), exports are wrapped to an authorised requester
(transport.py), and keys at rest are encrypted under the device key
(store.py, hal/devicekey.py).
"""
