"""The emulated HPLC channel between emulated meters and a terminal agent's ``hplc`` link.

``emulator.plc.model`` is the channel without I/O (rate, latency, bit errors,
frame loss, the modem buffer); ``python -m emulator.plc`` is the process that
serves it on two pyserial-openable ends (ptys or loopback sockets).
"""
