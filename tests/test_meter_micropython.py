"""The meter's code is MicroPython's: pyright against micropython-unix-stubs, and real
MicroPython (the npm WebAssembly port under Node) computing the same bytes as the terminal.

The tools live under ${EDGEKEY_CACHE:-~/.cache/edgekey}/micropython/; when they are
missing, the test runs tools/setup-micropython.sh itself, and fails (never skips) if
that does not work, so a fresh machine checks the same thing as this one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from agent import meterproto as mp
from agent.node import events as ev
from hal import dlt698
from hal.crc16 import crc16_x25

pytestmark = pytest.mark.host_only

CHECKOUT = Path(__file__).resolve().parents[1]
SETUP = CHECKOUT / "tools" / "setup-micropython.sh"
RUNNER = CHECKOUT / "tools" / "mpy-run.mjs"
MICROPYTHON_FILES = ["emulator/meter/frame.py", "emulator/meter/apdu.py",
                     "emulator/meter/meter.py"]
# What MicroPython loads: the package as it would sit in a meter's /lib.
PACKAGE = ["emulator/__init__.py", "emulator/meter/__init__.py", *MICROPYTHON_FILES]


# ================================================================ the tools

def _cache() -> Path:
    base = os.environ.get("EDGEKEY_CACHE") or str(Path.home() / ".cache" / "edgekey")
    return Path(base) / "micropython"


@pytest.fixture(scope="session")
def tools() -> Path:
    """The tools' folder, installed by tools/setup-micropython.sh when not there yet."""
    done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        pytest.fail(f"tools/setup-micropython.sh failed ({done.returncode}):\n{done.stderr}")
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder == _cache(), (folder, _cache())
    for need in ("node_modules/.bin/pyright", "stubs-venv/bin/python", "pyrightconfig.json",
                 "node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs"):
        assert (folder / need).exists(), f"setup left no {need}"
    return folder


def _pyright_config(tools: Path, where: Path) -> Path:
    """pyright against the stubs alone: MicroPython's stdlib as typeshed, the stubs venv as
    the search path (not the interpreter on PATH, whose CPython stdlib would resolve)."""
    site = json.loads((tools / "pyrightconfig.json").read_text())["typeshedPath"]
    config = where / "pyrightconfig.json"
    config.write_text(json.dumps({
        "typeshedPath": site, "venvPath": str(tools), "venv": "stubs-venv",
        "pythonVersion": "3.11", "typeCheckingMode": "standard",
        "reportMissingModuleSource": "none",
    }))
    return config


def _pyright(tools: Path, config: Path, files: list[Path]) -> dict:
    done = subprocess.run([str(tools / "node_modules/.bin/pyright"), "-p", str(config),
                           "--outputjson", *map(str, files)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd=CHECKOUT)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"pyright gave no report ({done.returncode}): {done.stdout}{done.stderr}")
    report["returncode"] = done.returncode
    return report


def _errors(report: dict) -> list[str]:
    return [f"{Path(d['file']).name}:{d['range']['start']['line'] + 1}: {d['message']}"
            for d in report["generalDiagnostics"] if d["severity"] == "error"]


def test_pyright_with_micropython_stubs_passes_the_meter_and_fails_cpython_only_code(
        tools, tmp_path):
    config = _pyright_config(tools, tmp_path)
    ours = _pyright(tools, config, [CHECKOUT / f for f in MICROPYTHON_FILES])
    assert ours["summary"]["filesAnalyzed"] == len(MICROPYTHON_FILES)
    assert _errors(ours) == [] and ours["returncode"] == 0
    # The check can fail: CPython-only APIs are errors, MicroPython's own are fine.
    (tmp_path / "cpython_only.py").write_text(
        "import time\nimport dataclasses\n\nstart = time.perf_counter()\n")
    (tmp_path / "micropython_only.py").write_text(
        "import time\n\nimport micropython\n\nstart = time.ticks_ms()\n"
        "elapsed = time.ticks_diff(time.ticks_ms(), start)\nN = micropython.const(4)\n")
    bad = _pyright(tools, config, [tmp_path / "cpython_only.py"])
    assert bad["returncode"] != 0
    assert any("perf_counter" in e for e in _errors(bad)), _errors(bad)
    assert any('"dataclasses"' in e for e in _errors(bad)), _errors(bad)
    good = _pyright(tools, config, [tmp_path / "micropython_only.py"])
    assert _errors(good) == [] and good["returncode"] == 0


# ================================================================ real MicroPython

def _run(tools: Path, script: Path,
         files: list[tuple[Path, str]] = ()) -> subprocess.CompletedProcess:
    """``script`` under MicroPython with the meter package in /lib and ``files`` copied in."""
    env = dict(os.environ, EDGEKEY_MICROPYTHON_MODULES=str(tools / "node_modules"))
    args = ["node", str(RUNNER), "--heap", str(8 * 1024 * 1024), "--root", str(CHECKOUT)]
    for host, target in files:
        args += ["--file", f"{host}={target}"]
    return subprocess.run([*args, str(script), *PACKAGE], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd=script.parent, env=env)


def test_the_runner_returns_a_real_exit_status(tools, tmp_path):
    cases = {"ok.py": ("import sys\nprint(sys.implementation.name)\n", 0),
             "raises.py": ("raise ValueError('boom')\n", 1),
             "exits.py": ("import sys\nsys.exit(3)\n", 3),
             "imports.py": ("from emulator.meter import frame\nprint(frame.START)\n", 0),
             "no_such.py": ("import dataclasses\n", 1)}
    for name, (src, status) in cases.items():
        (tmp_path / name).write_text(src)
        done = _run(tools, tmp_path / name)
        assert done.returncode == status, (name, done.stdout, done.stderr)
        if name == "ok.py":
            assert done.stdout.strip() == "micropython"
        if name == "raises.py":
            assert "ValueError: boom" in done.stderr
        if name == "imports.py":
            assert done.stdout.strip() == "104"


# -- vectors, made on CPython, answered by hal.dlt698 and agent.meterproto

def _frame_vectors(rng: random.Random) -> list[list]:
    out = []
    for i in range(120):
        n_sa = 16 if i % 10 == 0 else rng.randint(1, 16)
        n_apdu = 600 if i % 17 == 0 else rng.randint(0, 80)
        c = ((0x80 if rng.random() < 0.5 else 0) | (0x40 if rng.random() < 0.5 else 0)
             | (0x20 if rng.random() < 0.2 else 0) | (0x08 if rng.random() < 0.2 else 0)
             | rng.choice([1, 3]))
        out.append([rng.randbytes(n_sa).hex(), rng.randint(0, 255), rng.randbytes(n_apdu).hex(),
                    c, rng.randint(0, 3), rng.randint(0, 3)])
    return out


def _hal_frame(v: list) -> bytes:
    address, client, apdu, c, atype, logical = v
    return dlt698.encode_frame(dlt698.Frame(
        dlt698.Control.from_byte(c), dlt698.ServerAddress(bytes.fromhex(address),
                                                          dlt698.AddressType(atype), logical),
        client, bytes.fromhex(apdu)))


def _stream_vectors(rng: random.Random, frames: list[list]) -> list[list]:
    out = []
    for _ in range(30):
        data = bytearray()
        for _ in range(rng.randint(1, 6)):
            f = _hal_frame(rng.choice(frames[:60]))
            kind = rng.choice(["frame", "frame", "garbage", "wake", "cut", "flip"])
            if kind == "frame":
                data += f
            elif kind == "garbage":
                data += rng.randbytes(rng.randint(1, 20))
            elif kind == "wake":
                data += b"\xfe" * rng.randint(1, 4)
            elif kind == "cut":
                data += f[:rng.randint(1, len(f) - 1)]
            else:
                i = rng.randrange(len(f))
                data += f[:i] + bytes([f[i] ^ rng.randint(1, 255)]) + f[i + 1:]
        chunks = [rng.randint(1, 64) for _ in range(rng.randint(1, 3))]
        idle = sorted(rng.sample(range(12), rng.randint(0, 2)))
        out.append([bytes(data).hex(), chunks, idle])
    return out


def _hal_stream(data: bytes, chunks: list[int], idle: list[int]) -> list[list]:
    dec = dlt698.FrameDecoder()
    events: list[list] = []
    pos = i = 0
    while pos < len(data):
        dec.receive_data(data[pos:pos + chunks[i % len(chunks)]])
        pos += chunks[i % len(chunks)]
        batch = list(dec.events())
        if i in idle:
            dec.line_idle()
            batch += list(dec.events())
        for e in batch:
            if isinstance(e, dlt698.Frame):
                events.append(["frame", bytes(e.server.address).hex(), e.client,
                               e.control.to_byte(), e.apdu.hex(), int(e.server.type),
                               e.server.logical])
            else:
                events.append(["rejected", int(e.reason), e.discarded])
        i += 1
    return events


def _request_events(rng: random.Random) -> list[ev.Event]:
    meter = bytes.fromhex("112233445566")
    out: list[ev.Event] = []
    for i in range(60):
        rid, counter = rng.randint(0, 2**32 - 1), rng.randint(0, 2**64 - 1)
        kind = i % 4
        if kind == 0:
            out.append(ev.RegisterRequest(meter, rid, counter, rng.randint(1, 2**32 - 1),
                                          rng.randbytes(40)))
        elif kind == 1:
            out.append(ev.RotateRequest(meter, rid, counter, rng.randbytes(40)))
        elif kind == 2:
            out.append(ev.RevokeRequest(meter, rid, counter, rng.randbytes(40)))
        else:
            out.append(ev.ReadingRequest(meter, rid, counter,
                                         rng.randbytes(rng.choice([28, 29, 100, 540]))))
    return out


def _agent_request(apdu: bytes) -> list:
    try:
        r = mp.decode_request(b"\x01", apdu)
    except mp.ApduError as exc:
        return ["error", int(exc.code), exc.request_id, exc.service]
    body = mp.encode_request(r)[mp.HEAD.size:]
    version = getattr(r, "key_version", 0)
    return ["ok", int(mp.service_of(r)), r.request_id, r.counter, version,
            (body[4:] if isinstance(r, ev.RegisterRequest) else body).hex()]


def _agent_answer(apdu: bytes) -> list:
    try:
        a = mp.decode_answer(apdu)
    except Exception:
        return ["error"]
    if isinstance(a, mp.AckAnswer):
        return ["ack", a.request_id, a.service, a.key_version, a.value, a.mac.hex()]
    return ["nak", a.request_id, a.service, a.reason, a.counter, a.home]


def _vectors_and_expected() -> tuple[dict, dict]:
    rng = random.Random(698)
    frames = _frame_vectors(rng)
    streams = _stream_vectors(rng, frames)
    reqs = _request_events(rng)
    request_bytes = [mp.encode_request(r) for r in reqs]
    for apdu in list(request_bytes[:30]):  # damaged: cut, wrong version, unknown service
        request_bytes += [apdu[:-1], b"\x02" + apdu[1:], apdu[:1] + b"\x09" + apdu[2:],
                          apdu[:1] + b"\x81" + apdu[2:], apdu[:rng.randint(0, 13)]]
    request_bytes += [rng.randbytes(rng.randint(0, 70)) for _ in range(40)]
    acks = [[rng.randbytes(rng.randint(1, 16)).hex(), rng.randint(0, 2**32 - 1),
             rng.randint(1, 4), rng.randint(0, 2**32 - 1), rng.randint(0, 2**64 - 1),
             rng.randbytes(32).hex()] for _ in range(40)]
    naks = [[rng.randint(0, 2**32 - 1), rng.randint(0, 4), rng.randint(0, 255),
             rng.randint(0, 2**64 - 1), "".join(rng.choice("ecd-0123456789.")
                                               for _ in range(rng.randint(0, 32)))]
            for _ in range(40)]
    ack_bytes = [mp.encode_ack(bytes.fromhex(m), r, s, v, val, bytes.fromhex(k))
                 for m, r, s, v, val, k in acks]
    nak_bytes = [mp.encode_nak(r, s, reason, counter=c, home=h) for r, s, reason, c, h in naks]
    answers = ack_bytes + nak_bytes + [a[:-1] for a in ack_bytes[:10]] + \
        [a + b"x" for a in nak_bytes[:10]] + [rng.randbytes(rng.randint(0, 40))
                                              for _ in range(30)]
    vectors = {
        "frames": frames, "streams": streams,
        "requests": [[int(mp.service_of(r)), r.request_id, r.counter,
                      getattr(r, "key_version", 0), _body(r).hex()] for r in reqs],
        "request_bytes": [b.hex() for b in request_bytes],
        "acks": acks, "naks": naks, "answers": [a.hex() for a in answers],
        "aad": [[m, v, c] for m, _r, _s, v, c, _k in acks[:10]],
    }
    expected = {
        "crc": [crc16_x25(b"123456789"), crc16_x25(bytes(range(256)) * 4)],
        "frames": [_hal_frame(v).hex() for v in frames],
        "frames_back": [[v[0], v[1], v[2], v[3], v[4], v[5]] for v in frames],
        "streams": [_hal_stream(bytes.fromhex(d), c, i) for d, c, i in streams],
        "requests": [b.hex() for b in (mp.encode_request(r) for r in reqs)],
        "decoded_requests": [_agent_request(b) for b in request_bytes],
        "acks": [a.hex() for a in ack_bytes],
        "ack_checks": [[True, False] for _ in acks],
        "naks": [n.hex() for n in nak_bytes],
        "answers": [_agent_answer(a) for a in answers],
        "aad": [_aad(bytes.fromhex(m), v, c) for m, v, c in vectors["aad"]],
    }
    return vectors, expected


def _body(r: ev.Event) -> bytes:
    body = mp.encode_request(r)[mp.HEAD.size:]
    return body[4:] if isinstance(r, ev.RegisterRequest) else body


def _aad(meter_id: bytes, version: int, counter: int) -> str:
    from agent.node.reading import reading_aad
    return reading_aad(meter_id, version, counter % 2**64).hex()


CODEC_SCRIPT = r'''
import hashlib
import hmac
import json

from emulator.meter import apdu as ma
from emulator.meter import frame as mf


def h(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


with open("/vectors.json") as f:
    V = json.load(f)
out = {}
out["crc"] = [mf.crc16_x25(b"123456789"), mf.crc16_x25(bytes(range(256)) * 4)]
frames, back = [], []
for address, client, apdu, c, atype, logical in V["frames"]:
    data = mf.encode_frame(bytes.fromhex(address), client, bytes.fromhex(apdu), c, atype,
                           logical)
    frames.append(data.hex())
    for fr in mf.FrameDecoder().feed(data):
        back.append([fr.address.hex(), fr.client, fr.apdu.hex(), fr.control, fr.address_type,
                     fr.logical])
out["frames"], out["frames_back"] = frames, back
streams = []
for data, chunks, idle in V["streams"]:
    data = bytes.fromhex(data)
    dec = mf.FrameDecoder()
    events = []
    pos = i = 0
    while pos < len(data):
        dec.receive_data(data[pos:pos + chunks[i % len(chunks)]])
        pos += chunks[i % len(chunks)]
        batch = []
        while True:
            e = dec.next_event()
            if e is None:
                break
            batch.append(e)
        if i in idle:
            dec.line_idle()
            while True:
                e = dec.next_event()
                if e is None:
                    break
                batch.append(e)
        for e in batch:
            if isinstance(e, mf.Frame):
                events.append(["frame", e.address.hex(), e.client, e.control, e.apdu.hex(),
                               e.address_type, e.logical])
            else:
                events.append(["rejected", e.reason, e.discarded])
        i += 1
    streams.append(events)
out["streams"] = streams
reqs = []
for service, rid, counter, version, body in V["requests"]:
    body = bytes.fromhex(body)
    if service == ma.REGISTER:
        reqs.append(ma.encode_register(rid, counter, version, body).hex())
    elif service == ma.ROTATE:
        reqs.append(ma.encode_rotate(rid, counter, body).hex())
    elif service == ma.REVOKE:
        reqs.append(ma.encode_revoke(rid, counter, body).hex())
    else:
        reqs.append(ma.encode_reading(rid, counter, body).hex())
out["requests"] = reqs
decoded = []
for apdu in V["request_bytes"]:
    try:
        r = ma.decode_request(bytes.fromhex(apdu))
        decoded.append(["ok", r.service, r.request_id, r.counter, r.key_version, r.body.hex()])
    except ma.ApduError as exc:
        decoded.append(["error", exc.code, exc.request_id, exc.service])
out["decoded_requests"] = decoded
acks, checks = [], []
for meter, rid, service, version, value, key in V["acks"]:
    meter, key = bytes.fromhex(meter), bytes.fromhex(key)
    data = ma.encode_ack(meter, rid, service, version, value, key, h)
    acks.append(data.hex())
    ack = ma.decode_answer(data)
    other = key[1:] + key[:1]  # another key (no step slices on MicroPython)
    checks.append([ma.check_ack(ack, meter, key, h), ma.check_ack(ack, meter, other, h)])
out["acks"], out["ack_checks"] = acks, checks
out["naks"] = [ma.encode_nak(rid, s, reason, counter, home).hex()
               for rid, s, reason, counter, home in V["naks"]]
answers = []
for apdu in V["answers"]:
    try:
        a = ma.decode_answer(bytes.fromhex(apdu))
    except ma.ApduError:
        answers.append(["error"])
        continue
    if isinstance(a, ma.Ack):
        answers.append(["ack", a.request_id, a.service, a.key_version, a.value, a.mac.hex()])
    else:
        answers.append(["nak", a.request_id, a.service, a.reason, a.counter, a.home])
out["answers"] = answers
out["aad"] = [ma.reading_aad(bytes.fromhex(m), v, c).hex() for m, v, c in V["aad"]]
print(json.dumps(out))
'''


def test_micropython_computes_the_terminals_frames_and_apdus(tools, tmp_path):
    vectors, expected = _vectors_and_expected()
    (tmp_path / "vectors.json").write_text(json.dumps(vectors))
    (tmp_path / "codec.py").write_text(CODEC_SCRIPT)
    done = _run(tools, tmp_path / "codec.py", [(tmp_path / "vectors.json", "/vectors.json")])
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    assert sum(len(s) for s in expected["streams"]) > 60  # the streams carried events
    assert any(e[0] == "rejected" for s in expected["streams"] for e in s)
    assert any(d[0] == "ok" for d in expected["decoded_requests"])
    assert {d[1] for d in expected["decoded_requests"] if d[0] == "error"} == {
        int(mp.Fault.BAD_APDU), int(mp.Fault.UNKNOWN_SERVICE), int(mp.Fault.NOT_A_REQUEST)}


# -- the meter itself, one scenario on both interpreters

METER_SCRIPT = r'''
import hashlib
import hmac
import json

from emulator.meter import apdu as ma
from emulator.meter import frame as mf
from emulator.meter.meter import Meter, MeterBank, Shim


def sha(data):
    return hashlib.sha256(data).digest()


def xor(a, b):
    return bytes([x ^ y for x, y in zip(a, b)])


class ToyShim(Shim):
    """Deterministic stand-ins for AES (the WebAssembly port has no cryptolib), real HMAC."""

    def __init__(self, seed):
        self.seed = seed
        self.n = 0

    def random_bytes(self, n):
        out = b""
        while len(out) < n:
            self.n += 1
            out += sha(self.seed + self.n.to_bytes(4, "big"))
        return out[:n]

    def key_wrap(self, kek, key):
        return sha(b"tag" + kek + key)[:8] + xor(key, sha(b"pad" + kek))

    def gcm_seal(self, key, nonce, plaintext, aad):
        ct = xor(plaintext, sha(key + nonce) * 20)
        return ct + hmac.new(key, aad + ct, hashlib.sha256).digest()[:16]

    def hmac_sha256(self, key, msg):
        return hmac.new(key, msg, hashlib.sha256).digest()

    def sha256(self, data):
        return sha(data)

    def ticks_ms(self):
        return 0


def unwrap(kek, wrapped):
    key = xor(wrapped[8:], sha(b"pad" + kek))
    return key if sha(b"tag" + kek + key)[:8] == wrapped[:8] else None


class Terminal:
    def __init__(self, factory):
        self.factory = factory
        self.keys = {}
        self.versions = {}
        self.counters = {}
        self.script = []
        self.height = 0

    def answer(self, data):
        out = []
        for fr in mf.FrameDecoder().feed(data):
            r = ma.decode_request(fr.apdu)
            mid = fr.address
            apdu = self.handle(mid, r)
            if apdu is not None:
                out.append(mf.encode_frame(mid, 1, apdu, mf.control_byte(False, False)))
        return out

    def handle(self, mid, r):
        if self.script:
            act = self.script.pop(0)
            if act == "drop":
                return None
            if act == "forge":
                return ma.encode_ack(mid, r.request_id, r.service, 9, 9, bytes(32),
                                     hmac_sha256)
            return ma.encode_nak(r.request_id, r.service, act[0], act[1], act[2])
        chain = self.counters.get(mid, 0)
        if r.service != ma.READING and r.counter <= chain:
            return ma.encode_nak(r.request_id, r.service, ma.REPLAYED, chain)
        if r.service == ma.REGISTER:
            key = unwrap(self.factory[mid], r.body)
            version = r.key_version
        elif r.service == ma.ROTATE:
            key = unwrap(self.keys[mid], r.body)
            version = self.versions[mid] + 1
        else:
            key = self.keys[mid]
            return ma.encode_ack(mid, r.request_id, r.service, self.versions[mid], r.counter,
                                 key, hmac_sha256)
        if key is None:
            return ma.encode_nak(r.request_id, r.service, ma.BAD_PROOF)
        self.height += 1
        self.keys[mid], self.versions[mid], self.counters[mid] = key, version, r.counter
        return ma.encode_ack(mid, r.request_id, r.service, version, self.height, key,
                             hmac_sha256)


def hmac_sha256(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


ids = [bytes.fromhex("000000000001"), bytes.fromhex("0000000000000002")]
factory = {ids[0]: sha(b"factory 1"), ids[1]: sha(b"factory 2")}
terminal = Terminal(factory)
terminal.counters[ids[1]] = 6  # the chain is ahead of meter 2: REPLAYED, then a skip
bank = MeterBank()
for i, mid in enumerate(ids):
    bank.add(Meter(mid, factory[mid], ToyShim(mid), reading_every_s=0.5, rotate_every_s=1.7,
                   timeout_s=0.3, retries=1, retry_later_s=0.8, start_ms=100 * i))
now = 0
while now <= 6000:
    if now == 2000:
        terminal.script += ["drop", "drop", "drop", [ma.BUSY, 0, ""], "forge"]
    for data in bank.poll(now):
        print(json.dumps(["tx", now, data.hex()]))
        for answer in terminal.answer(data):
            bank.feed(answer, now)
    now += 50
for mid in ids:
    print(json.dumps(["state", bank.meters[mid].state()]))
print(json.dumps(["bank", bank.counters]))
'''


def test_micropython_runs_the_meter_as_cpython_does(tools, tmp_path):
    script = tmp_path / "meter_scenario.py"
    script.write_text(METER_SCRIPT)
    done = _run(tools, script)
    assert done.returncode == 0, done.stderr
    on_cpython = subprocess.run([sys.executable, str(script)], capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=str(CHECKOUT)))
    assert on_cpython.returncode == 0, on_cpython.stderr
    ours = [json.loads(line) for line in done.stdout.splitlines()]
    theirs = [json.loads(line) for line in on_cpython.stdout.splitlines()]
    assert ours == theirs
    states = [x[1] for x in ours if x[0] == "state"]
    assert all(s["counters"]["rotations"] >= 2 for s in states)
    assert states[1]["naks"].get("REPLAYED") == 1 and states[1]["counter"] > 6
    assert sum(s["counters"]["resends"] for s in states) >= 1
    assert sum(s["counters"]["bad_macs"] for s in states) == 1
    assert sum(s["naks"].get("BUSY", 0) for s in states) == 1
    # every frame the meters sent decodes at the terminal to a request
    for _tx, _now, data in (x for x in ours if x[0] == "tx"):
        dec = dlt698.FrameDecoder()
        dec.receive_data(bytes.fromhex(data))
        (frame,) = list(dec.events())
        mp.decode_request(bytes(frame.server.address), frame.apdu)
