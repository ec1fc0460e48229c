# The two commands a newcomer types: `make demo` and `make test`.
# Each sets itself up: Debian packages (as root), the virtual environment,
# and for the ARM tier the armhf root filesystem.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pyright, MicroPython's WebAssembly port and micropython-unix-stubs for the meter code's checks
MPY_STAMP := $(or $(EDGEKEY_CACHE),$(HOME)/.cache/edgekey)/micropython/.installed

.PHONY: setup test test-host test-arm test-agent-qemu test-board lint demo bench bench-arm clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup-host.sh
	tools/setup-host.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[desk,test]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

$(MPY_STAMP): tools/setup-micropython.sh | $(STAMP)
	tools/setup-micropython.sh >/dev/null

# Test files spread over every core (pytest-xdist; one file's tests stay on one worker).
test-host: $(STAMP) $(MPY_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

test-arm: $(STAMP)
	emulator/qemu/run-arm-tests.sh

# The agent itself under qemu-arm-static (armhf python3 on the cached root filesystem),
# driven from the host over its console and hplc ptys: the runtime tests with --target qemu.
test-agent-qemu: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --target qemu tests/test_agent_runtime.py \
	    tests/test_fleet_mixed.py

# The system-mode board under qemu-system-arm (emulator/qemu/build-board.sh, cached): the HIL
# tests against its pty UARTs, and signed A/B updates run on the board itself, with rollback
# and power cuts; the two files' boards run side by side (3.5 minutes on 2 cores).
# Against a real terminal instead:
#   .venv/bin/python -m pytest --target hil --port /dev/ttyUSB0 --link-port /dev/ttyUSB1 \
#       --meters ecd-00.meters.json tests/test_hil.py
test-board: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --target hil -n 2 --dist loadfile tests/test_hil.py \
	    tests/test_board_update.py

test: lint test-host test-arm test-agent-qemu test-board

demo: $(STAMP)
	$(VENV)/bin/edgekey demo

bench: $(STAMP)
	$(VENV)/bin/edgekey bench hal

# The same benchmark on the terminal's interpreter under qemu-arm-static (smaller partition).
bench-arm: $(STAMP)
	emulator/qemu/arm-python.sh -m tools.cli bench hal --size-mib 64 --durable 300 \
		--frames 2000 --out bench/results/hal-armhf.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out bench/results
