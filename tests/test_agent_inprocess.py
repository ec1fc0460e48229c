"""The agent's loop in this process, on ptys: the same code under emulated ARM as on the host.

The process tests (test_agent_runtime.py, test_fleet.py) cannot start a
guest python under qemu-user; this one runs ``agent.main.Agent`` in a
thread of the test, so the ARM tier checks the running agent on Debian's
armhf python3, cryptography 38 and pyserial 3.5.
"""

from __future__ import annotations

import threading
from pathlib import Path

from agent import meterproto as mp
from agent.main import Agent, Options
from emulator.agent_harness import AgentProc, TestMeter


def test_the_agent_loop_serves_a_meter_and_the_console(tmp_path: Path):
    a = AgentProc(tmp_path, meters=3)
    opts = Options("host", "ecd-00", a.image, {"console": a.console_path, "hplc": a.link_path},
                   tmp_path / "utility.pub", Path(a.device_key), True, "warning", 0x01,
                   enforce_ram=False)  # the budget is the process's: not this test runner's
    agent = Agent(opts, [])
    loop = threading.Thread(target=agent.serve, daemon=True)
    loop.start()
    try:
        a.console("echo off")
        m = TestMeter(a, 0)
        assert isinstance(m.request(m.keys.register()), mp.AckAnswer)
        assert isinstance(m.request(m.keys.rotate()), mp.AckAnswer)
        reading = m.keys.reading(b"kWh=7")
        a_ = m.request(reading)
        assert isinstance(a_, mp.AckAnswer) and a_.value == reading.counter
        assert a.console_json("ledger height") == {"height": 2}
        got = a.console_json(f"keys get {m.meter_id.hex()}")
        assert got["key_version"] == 2 and got["key_held_here"]
        _body, status = a.console("bogus")
        assert status.startswith("ERR ENOEXEC")
        assert a.console("ledger verify")[1] == "OK"
    finally:
        agent.request_stop(0)
        loop.join(30)
        a.close()
    assert not loop.is_alive()
