"""The terminal's serial console: a Zephyr-style shell as a sans-I/O core (``shell``).

The agent runtime registers the real commands and moves the bytes between a
``Shell`` and the console UART; the desk side is ``tools.console_client``.
"""
