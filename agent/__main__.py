"""``python -m agent``: the terminal agent (``agent/main.py``), or ``--check`` of a board file.

Exit status 0 after a clean stop (SIGTERM) or a valid board file; 1 when the
agent refuses to start (the reason on stderr) or the board file is invalid;
2 for a usage error.
"""

from __future__ import annotations

import sys

from agent.main import main

if __name__ == "__main__":
    sys.exit(main())
