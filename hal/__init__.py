"""Hardware abstraction: flash, RAM budget, links, board configs.

May import the standard library and pyserial only, so it runs unchanged on
the terminal's Debian armhf python3, under QEMU and on the host.
"""
