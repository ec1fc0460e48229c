"""``edgekey fleet up|status|down``: terminals, emulated meters and PLC channels on this machine.

``up`` plans the meters (K-means + medoid, agent/placement), provisions the
fleet as a utility would (a signed provisioning file, each terminal's
secrets sealed under its device key, factory keys sealed to the home
terminals), makes each terminal's flash image of its board's size, and
starts in the background, per terminal:

- a console cable: ``socat`` joins two ptys, the agent opens one end as its
  console UART and ``edgekey console`` the other;
- the PLC channel (``python -m emulator.plc``): the board's ``[plc]`` rate,
  latency, bit errors, frame loss and modem buffer between two ptys;
- the agent (``python -m agent``), its ``hplc`` link on the channel's end;
- the emulated meters (``python -m emulator.meter``), all on one channel, as
  on an HPLC network.

A fleet of more than one terminal also gets its network: a fleet CA and
certificates (``DIR/tls``: every terminal's, every etcd member's), a TLS
listener per terminal on a free loopback port, and etcd voting members
hosted by the first 3 (or 5, ``--etcd-members``) terminals, each member a
process of its terminal's group with its data directory beside the
terminal's flash image (``DIR/ecd-00.etcd``). The provisioning pins the CA
and names the endpoints and peer addresses; the agents do the rest.

``DIR/fleet.json`` records every process (command line, pid, log) so
``status`` and ``down`` find them, and ``up`` on an existing directory
restarts whatever is no longer running (an agent after ``kill -9``), never
re-provisioning. ``down`` stops everything, also after a crash. ``kill ID``
is a power cut of one terminal (SIGKILL to its agent and its etcd member),
``start ID`` powers it on again.

``up --netns`` puts each terminal (its agent and its etcd member) in a
network namespace of its own on one bridge (emulator/netns.py), so that
``partition ID...`` can cut terminals off the WAN and ``heal ID...`` bring
them back: the partition tests' tool. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.routing.fleet import ROUTE_METHODS
from emulator.netns import NetnsPlan
from emulator.netns import available as netns_available
from tools.provision_cmd import (
    add_terminal,
    etcd_client,
    provision_fleet,
    publish,
    retire_terminal,
)
from tools.provision_cmd import write_fleet as _write

STOP_ORDER = ("meters", "agent", "channel", "cable", "etcd")  # meters first, etcd last
START_ORDER = ("cable", "channel", "agent", "meters")
# What of ``up``'s options the processes' command lines take (kept in fleet.json for ``add``)
PROCESS_OPTIONS = ("latency_ms", "ber", "loss", "seed", "rate_kbyte_s", "log_level",
                   "checkpoint_every", "reading_every", "rotate_every", "start_spread",
                   "route_method", "wan_rate_mbit", "wan_buffer_packets", "arm")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PROCESS_MARK = "EDGEKEY_FLEET"  # in every child's environment: down kills only its own pids


def add_parser(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="a fleet of terminals with emulated meters, in the "
                                         "background").add_subparsers(
        dest="fleet_cmd", metavar="SUBCOMMAND", required=True)
    up = fleet.add_parser("up", help="provision and start (or restart what stopped)")
    up.add_argument("--terminals", type=int, default=1)
    up.add_argument("--meters", type=int, default=20)
    up.add_argument("--dir", type=Path, default=Path("out/fleet"))
    up.add_argument("--board", default="host")
    up.add_argument("--seed", type=int, default=1)
    up.add_argument("--rate-kbyte-s", type=float, default=None,
                    help="PLC channel rate (default: the board's [plc] rate_max)")
    up.add_argument("--latency-ms", type=float, default=20.0)
    up.add_argument("--ber", type=float, default=0.0, help="channel bit error rate")
    up.add_argument("--loss", type=float, default=0.0, help="channel frame loss probability")
    up.add_argument("--reading-every", type=float, default=5.0,
                    help="seconds between a meter's readings (0: none)")
    up.add_argument("--rotate-every", type=float, default=20.0,
                    help="seconds between a meter's key rotations (0: none)")
    up.add_argument("--start-spread", type=float, default=2.0,
                    help="meters register spread over this many seconds")
    up.add_argument("--log-level", default="info")
    up.add_argument("--etcd-members", type=int, choices=(1, 3, 5), default=None,
                    help="etcd voting members, hosted by the first terminals (default: 3, or 1 "
                         "for fewer than 3 terminals)")
    up.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                    help="blocks between checkpoints (default: the board's); etcd keeps the "
                         "blocks from the checkpoint before the newest on")
    up.add_argument("--route-method", choices=("direct", *ROUTE_METHODS), default="greedy",
                    help="how terminals' messages travel: along the WAN mesh by this router "
                         "(greedy, the paper's eq. 9, by default; shortest, reliability, "
                         "residual: baselines) or straight to their destination (direct)")
    up.add_argument("--wan-rate-mbit", type=float, default=None, metavar="MBIT",
                    help="emulate the WAN: shape every link between terminals to this rate "
                         "(the paper's is 25); default: unshaped loopback")
    up.add_argument("--wan-buffer-packets", type=int, default=None, metavar="M",
                    help="an emulated link's buffer in 360-byte packets (default: the board's "
                         "[wan] forward_buffer_packets)")
    up.add_argument("--arm", default="", metavar="ID,...",
                    help="terminals whose agent runs as armhf under qemu-arm-static "
                         "(Debian's python3 on the cached root filesystem): a mixed fleet")
    up.add_argument("--netns", action="store_true",
                    help="each terminal in its own network namespace (needed by partition; "
                         "root only)")
    for name, text in (("status", "exit 0 only when every process answers"),
                       ("down", "stop every process of the fleet")):
        p = fleet.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=Path("out/fleet"))
    for name, text in (("kill", "power cut: SIGKILL a terminal's agent and etcd member"),
                       ("start", "power a killed terminal on again")):
        p = fleet.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=Path("out/fleet"))
        p.add_argument("id", help="the terminal, e.g. ecd-03")
    add = fleet.add_parser("add", help="a new terminal at run time: provisioned, published, "
                                       "added through the ledger, started")
    add.add_argument("--dir", type=Path, default=Path("out/fleet"))
    add.add_argument("--etcd-member", action="store_true",
                     help="it hosts an etcd voting member (replacing a retired voting host)")
    add.add_argument("--via", default=None, help="the terminal whose console proposes it "
                                                 "(default: the first running one)")
    retire = fleet.add_parser("retire", help="withdraw a terminal: provisioned, published, "
                                             "retired through the ledger")
    retire.add_argument("--dir", type=Path, default=Path("out/fleet"))
    retire.add_argument("--via", default=None)
    retire.add_argument("id")
    for name, text in (("partition", "cut terminals off the WAN (a fleet started with --netns)"),
                       ("heal", "give cut terminals their WAN link back")):
        p = fleet.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=Path("out/fleet"))
        p.add_argument("ids", nargs="+", help="the terminals, e.g. ecd-03 ecd-04")
    meters = fleet.add_parser("meters", help="meters joining and leaving the running fleet")
    msub = meters.add_subparsers(dest="meters_cmd", metavar="ACTION", required=True)
    mj = msub.add_parser("join", help="provision N new meters; they register at the terminal "
                                      "that hears them, which homes them by its placement")
    mj.add_argument("count", type=int)
    ml = msub.add_parser("leave", help="take meters off their channel and revoke them")
    ml.add_argument("meters", nargs="+", metavar="METER")
    msub.add_parser("settle", help="move meters whose key migrated onto their new home's "
                                   "channel")
    for q in msub.choices.values():
        q.add_argument("--dir", type=Path, default=Path("out/fleet"))
    for p in fleet.choices.values():
        p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.fleet_cmd == "up":
        return up(args)
    if args.fleet_cmd == "status":
        return status(args.dir)
    if args.fleet_cmd == "kill":
        return kill(args.dir, args.id)
    if args.fleet_cmd == "start":
        return start(args.dir, args.id)
    if args.fleet_cmd == "add":
        return add(args.dir, etcd_member=args.etcd_member, via=args.via)
    if args.fleet_cmd == "retire":
        return retire(args.dir, args.id, via=args.via)
    if args.fleet_cmd == "meters":
        from tools import fleet_meters

        try:
            rows = (fleet_meters.join(args.dir, args.count) if args.meters_cmd == "join"
                    else fleet_meters.leave(args.dir, args.meters)
                    if args.meters_cmd == "leave" else fleet_meters.settle(args.dir))
        except (RuntimeError, OSError) as exc:
            print(f"edgekey fleet: {exc}", file=sys.stderr)
            return 1
        fleet_meters.print_rows(rows)
        return 0
    if args.fleet_cmd in ("partition", "heal"):
        return partition(args.dir, args.ids, cut=args.fleet_cmd == "partition")
    return down(args.dir)


# ================================================================= processes

def _commands(directory: Path, t: dict, args: argparse.Namespace, board: str,
              members: dict, plan: NetnsPlan | None = None) -> dict[str, dict]:
    tid = t["id"]
    py = sys.executable
    console, console_agent = directory / f"{tid}.console", directory / f"{tid}.console-agent"
    plc_terminal, plc_meters = directory / f"{tid}.plc-terminal", directory / f"{tid}.plc-meters"
    channel = [py, "-m", "emulator.plc", "--terminal-end", f"pty:{plc_terminal}",
               "--meter-end", f"pty:{plc_meters}", "--board", board,
               "--latency-ms", str(args.latency_ms), "--ber", str(args.ber),
               "--loss", str(args.loss), "--seed", str(args.seed),
               "--stats", str(directory / f"{tid}.channel-stats.json"),
               "--ready", str(directory / f"{tid}.channel-ready.json")]
    if args.rate_kbyte_s is not None:
        channel += ["--rate-kbyte-s", str(args.rate_kbyte_s)]
    arm = tid in str(getattr(args, "arm", "") or "").split(",")
    agent_py = [str(Path(__file__).resolve().parents[1] / "emulator/qemu/arm-python.sh")] \
        if arm else [py]
    agent = [*agent_py, "-m", "agent", "--board", board, "--node", tid, "--flash", t["flash"],
             "--trust", str(directory / "utility.pub"), "--device-key", t["device_key"],
             "--tls-dir", str(directory / "tls"), "--log-level", args.log_level,
             "--links", f"console={console_agent}", f"hplc={plc_terminal}"]
    extra = ["--route-method", getattr(args, "route_method", None) or "direct"]
    if args.checkpoint_every is not None:
        extra += ["--checkpoint-every", str(args.checkpoint_every)]
    for flag, name in (("--wan-rate-mbit", "wan_rate_mbit"),
                       ("--wan-buffer-packets", "wan_buffer_packets")):
        if getattr(args, name, None) is not None:
            extra += [flag, str(getattr(args, name))]
    agent[agent.index("--links"):agent.index("--links")] = extra
    meters = [py, "-m", "emulator.meter", "--link", str(plc_meters),
              "--meters", t["meters_file"], "--state", str(directory / f"{tid}.meter-state"),
              "--reading-every", str(args.reading_every),
              "--rotate-every", str(args.rotate_every),
              "--start-spread", str(args.start_spread), "--seed", str(args.seed),
              "--stats", str(directory / f"{tid}.meter-stats.json"),
              "--answers", str(directory / f"{tid}.meter-answers.jsonl")]
    cable = ["socat", f"pty,raw,echo=0,link={console}", f"pty,raw,echo=0,link={console_agent}"]
    procs = {"cable": {"cmd": cable, "wait": [str(console), str(console_agent)]},
             "channel": {"cmd": channel, "wait": [str(plc_terminal), str(plc_meters)]},
             "agent": {"cmd": agent, "wait": []}}
    if t["meters"]:
        procs["meters"] = {"cmd": meters, "wait": []}
    if t.get("etcd"):
        procs["etcd"] = {"cmd": _etcd_command(directory, tid, t["etcd"], members), "wait": []}
    if plan is not None:  # the terminal's own processes run in its namespace
        for name in ("agent", "etcd"):
            if name in procs:
                procs[name]["cmd"] = plan.exec_prefix(tid) + procs[name]["cmd"]
    return procs


def _etcd_command(directory: Path, tid: str, member: dict, members: dict) -> list[str]:
    from emulator.etcd import member_command

    tls = directory / "tls"
    name = member["name"]
    initial = ",".join(f"{m['name']}={m['peer']}" for m in members.values())
    return member_command(name, directory / f"{tid}.etcd", member["client"], member["peer"],
                          initial, f"edgekey-{directory.name}", "new",
                          directory / f"{tid}.etcd.log",
                          (str(tls / "ca.crt"), str(tls / f"{name}.crt"), str(tls / f"{name}.key")))


def _mark(directory: Path) -> str:
    return str(directory.resolve())


def _alive(pid: int | None, mark: str | None = None) -> bool:
    """A running process of a fleet (``mark``: of the fleet in that directory). pids come
    round again quickly (pid_max is often 32768): a pid that now belongs to another fleet's
    process, or to anything else, is not alive for this one."""
    if not pid:
        return False
    env = b""
    for _ in range(20):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            return False
        if env:
            break
        # Just exec'd: Popen returns once the exec is committed, and the kernel sets up
        # the new environment a moment later; until then /proc reads it as empty.
        time.sleep(0.005)
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                os.waitpid(pid, os.WNOHANG)
                return False
    except (OSError, IndexError, ChildProcessError):
        pass
    if mark is None:
        return PROCESS_MARK.encode() in env
    return f"{PROCESS_MARK}={mark}".encode() in env.split(b"\0")


def _start(proc: dict, directory: Path, name: str, extra: list[str] | None = None) -> None:
    log = directory / f"{name}.log"
    env = dict(os.environ, **{PROCESS_MARK: str(directory.resolve())})
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get(
        "PYTHONPATH", "")
    with open(log, "ab") as out:
        child = subprocess.Popen(proc["cmd"] + (extra or []), stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=out, env=env, start_new_session=True)
    proc.update(pid=child.pid, log=str(log))
    deadline = time.monotonic() + READY_TIMEOUT_S
    for path in proc["wait"]:
        while not os.path.exists(path):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (see {log})")
            time.sleep(0.02)


def load_fleet(directory: Path) -> dict:
    try:
        return json.loads((directory / "fleet.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"edgekey fleet: no fleet in {directory} (edgekey fleet up)") from None


def up(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.terminals < 1:
        print("edgekey fleet: --terminals must be at least 1", file=sys.stderr)
        return 2
    fresh = not (directory / "fleet.json").exists()
    if fresh:
        if args.netns and not netns_available():
            print("edgekey fleet: --netns needs root, iproute2 and veth/bridge support",
                  file=sys.stderr)
            return 2
        fleet = provision_fleet(directory, terminals=args.terminals, meters=args.meters,
                                board_name=args.board, seed=args.seed,
                                etcd_members=args.etcd_members, netns=args.netns)
    else:
        fleet = load_fleet(directory)
    if "options" not in fleet:  # provisioned (here or by edgekey provision new), never started
        fleet["options"] = {k: getattr(args, k) for k in PROCESS_OPTIONS} | {
            "seed": fleet["seed"]}
        fresh = True
        plan = _plan(fleet)
        for t in fleet["terminals"]:
            t["processes"] = _commands(directory, t, argparse.Namespace(**fleet["options"]),
                                       fleet["board"], fleet["etcd"]["members"], plan)
            t["formatted"] = False
    try:
        plan = _plan(fleet)
        if plan is not None and (fresh or not any(_alive(p.get("pid"), _mark(directory)) for t in
                                                  fleet["terminals"]
                                                  for p in t["processes"].values())):
            plan.create()
        _start_etcd(directory, fleet, [t["id"] for t in fleet["terminals"]])
        for t in fleet["terminals"]:
            _start_terminal(directory, t)
        _write(directory, fleet)
    except (RuntimeError, OSError) as exc:
        _write(directory, fleet)
        print(f"edgekey fleet: {exc}", file=sys.stderr)
        down(directory)
        return 1
    for t in fleet["terminals"]:
        print(f"{t['id']}: console {t['console']}  agent pid {t['pid']}  log {t['log']}  "
              f"meters {t['meters']}")
    print(f"fleet: {directory / 'fleet.json'}")
    return 0


def _start_terminal(directory: Path, t: dict) -> None:
    """Whatever of a terminal's group (but etcd) is not running, in order; --format once."""
    for name in START_ORDER:
        proc = t["processes"].get(name)  # a terminal added later has no meters of its own
        if proc is None or _alive(proc.get("pid"), _mark(directory)):
            continue
        extra = ["--format"] if name == "agent" and not t.get("formatted", True) else None
        _start(proc, directory, f"{t['id']}.{name}", extra)
        if name == "agent":
            t["console"] = str(directory / f"{t['id']}.console")
            t["pid"] = proc["pid"]
            t["log"] = proc["log"]
            _wait_console(t["console"], proc, _mark(directory))
            t["formatted"] = True


def _start_etcd(directory: Path, fleet: dict, ids: list[str]) -> None:
    """The etcd members of ``ids`` that are not running, then until the cluster has a leader."""
    started = []
    for t in fleet["terminals"]:
        proc = t["processes"].get("etcd")
        if proc is None or t["id"] not in ids or _alive(proc.get("pid"), _mark(directory)):
            continue
        if t.get("retired"):  # its member left etcd's membership with it: it cannot rejoin
            continue
        if (directory / f"{t['id']}.etcd").exists():  # a restart: the member rejoins
            proc["cmd"] = [("existing" if c == "new" else c) for c in proc["cmd"]]
        _start(proc, directory, f"{t['id']}.etcd")
        started.append(t)
    if not started:
        return
    from agent.net.etcd import EtcdClient
    from emulator.etcd import wait_leader

    tls = directory / "tls"
    for t in started:
        with EtcdClient([t["etcd"]["client"]], ca=str(tls / "ca.crt"),
                        cert=str(tls / f"{t['id']}.crt"), key=str(tls / f"{t['id']}.key"),
                        timeout_s=1.0) as c:
            why = wait_leader(c, lambda t=t: _alive(t["processes"]["etcd"]["pid"],
                                                    _mark(directory)), READY_TIMEOUT_S)
        if why is not None:
            raise RuntimeError(f"etcd of {t['id']} {why} (see "
                               f"{directory / (t['id'] + '.etcd.log')})")


def _plan(fleet: dict) -> NetnsPlan | None:
    return NetnsPlan.from_json(fleet["netns"]) if fleet.get("netns") else None


def partition(directory: Path, ids: list[str], *, cut: bool) -> int:
    """Take terminals' WAN links down (``cut``) or up again."""
    fleet = load_fleet(directory)
    plan = _plan(fleet)
    if plan is None:
        print("edgekey fleet: partition needs a fleet started with --netns", file=sys.stderr)
        return 2
    unknown = [t for t in ids if t not in plan.terminals]
    if unknown:
        print(f"edgekey fleet: no terminal {', '.join(unknown)}", file=sys.stderr)
        return 2
    for t in ids:
        plan.cut(t) if cut else plan.heal(t)
    print(f"{'cut' if cut else 'healed'}: {' '.join(ids)}")
    return 0


def _terminal(fleet: dict, directory: Path, tid: str) -> dict | None:
    t = next((t for t in fleet["terminals"] if t["id"] == tid), None)
    if t is None:
        print(f"edgekey fleet: no terminal {tid!r} in {directory}", file=sys.stderr)
    return t


def kill(directory: Path, tid: str) -> int:
    """A power cut of ``tid``: SIGKILL to its agent and its etcd member, nothing else."""
    fleet = load_fleet(directory)
    t = _terminal(fleet, directory, tid)
    if t is None:
        return 2
    killed = []
    for name in ("agent", "etcd"):
        pid = t["processes"].get(name, {}).get("pid")
        if _alive(pid, _mark(directory)):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    _wait_gone(killed, STOP_TIMEOUT_S, _mark(directory))
    print(f"{tid}: killed {len(killed)} process(es)")
    return 0


def start(directory: Path, tid: str) -> int:
    fleet = load_fleet(directory)
    t = _terminal(fleet, directory, tid)
    if t is None:
        return 2
    try:
        _start_etcd(directory, fleet, [tid])
        _start_terminal(directory, t)
    except (RuntimeError, OSError) as exc:
        print(f"edgekey fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        _write(directory, fleet)
    print(f"{tid}: running, console {t['console']}")
    return 0


def _running(fleet: dict, directory: Path) -> list[dict]:
    return [t for t in fleet["terminals"] if not t.get("retired")
            and _alive(t.get("processes", {}).get("agent", {}).get("pid"), _mark(directory))]


def _console_json(url: str, command: str, timeout: float = 10.0) -> tuple[bool, Any]:
    """(ok, the JSON answer or the error text) of one console command."""
    from tools.console_client import ConsoleClient

    with ConsoleClient(url, timeout=timeout) as c:
        r = c.run(f"{command} --json")
    if not r.ok:
        return False, f"{r.code} {r.reason}"
    return True, json.loads(r.body.splitlines()[-1])


def _published(directory: Path, fleet: dict, terminals: list[dict]) -> int:
    """Publish the newest provisioning and wait until every running terminal has it in force."""
    from tools.console_client import ConsoleTimeout

    issued = publish(directory)
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = list(terminals)
    while waiting and time.monotonic() < deadline:
        for t in list(waiting):
            try:
                ok, st = _console_json(t["console"], "status", 3.0)
            except (ConsoleTimeout, OSError, ValueError):
                continue
            if ok and st.get("provisioning_issued_ms", 0) >= issued:
                waiting.remove(t)
        time.sleep(0.2)
    if waiting:
        raise RuntimeError(f"provisioning issued at {issued} not in force on "
                           f"{', '.join(t['id'] for t in waiting)} after "
                           f"{READY_TIMEOUT_S:.0f} s (see their logs)")
    return issued


def _propose(fleet: dict, directory: Path, via: str | None, command: str) -> dict:
    """A membership change on a running terminal's console, answered once it committed."""
    running = _running(fleet, directory)
    t = next((t for t in running if t["id"] == via), None) if via else (
        running[0] if running else None)
    if t is None:
        raise RuntimeError(f"no running terminal {via or ''} to propose it on")
    ok, answer = _console_json(t["console"], command, timeout=60.0)
    if not ok:
        raise RuntimeError(f"{t['id']}: {command}: {answer}")
    return answer


def add(directory: Path, *, etcd_member: bool = False, via: str | None = None) -> int:
    """A new terminal: provisioned and published (every running terminal has its keys and
    address in force), TERMINAL_ADD committed through a running terminal's console, its
    etcd member announced to etcd (``--etcd-member``), then started; it catches up from
    etcd (or a peer's snapshot) like a terminal back from a power cut."""
    fleet = load_fleet(directory)
    running = _running(fleet, directory)
    if not running:
        print("edgekey fleet: no terminal is running to add one to", file=sys.stderr)
        return 1
    try:
        entry = add_terminal(directory, etcd_member=etcd_member)
        fleet = load_fleet(directory)
        t = next(x for x in fleet["terminals"] if x["id"] == entry["id"])
        _published(directory, fleet, running)
        answer = _propose(fleet, directory, via, f"member add {t['id']}")
        t["processes"] = _commands(directory, t, argparse.Namespace(**fleet["options"]),
                                   fleet["board"], fleet["etcd"]["members"], _plan(fleet))
        t["formatted"] = False
        if t.get("etcd"):
            t["processes"]["etcd"]["cmd"] = _announce_member(directory, t)
            _start_etcd(directory, fleet, [t["id"]])
        _start_terminal(directory, t)
    except (RuntimeError, OSError) as exc:
        print(f"edgekey fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        if (directory / "fleet.json").exists():
            _write(directory, fleet)
    print(f"{t['id']}: added at height {answer['height']} ({answer['active']} active), "
          f"console {t['console']}")
    return 0


def _announce_member(directory: Path, t: dict) -> list[str]:
    """Add ``t``'s etcd member to etcd's membership; its command line (state existing, the
    initial cluster as etcd now has it)."""
    from emulator.etcd import member_command, retry_unhealthy

    member = t["etcd"]
    with etcd_client(directory) as etcd:
        retry_unhealthy(lambda: etcd.member_add([member["peer"]]), READY_TIMEOUT_S)
        members = etcd.member_list()
    initial = ",".join(f"{m['name'] or member['name']}={m['peer_urls'][0]}" for m in members
                       if m["peer_urls"])
    tls = directory / "tls"
    return member_command(member["name"], directory / f"{t['id']}.etcd", member["client"],
                          member["peer"], initial, f"edgekey-{directory.name}", "existing",
                          directory / f"{t['id']}.etcd.log",
                          (str(tls / "ca.crt"), str(tls / f"{member['name']}.crt"),
                           str(tls / f"{member['name']}.key")))


def retire(directory: Path, tid: str, *, via: str | None = None) -> int:
    """Withdraw ``tid``: a newer provisioning published, TERMINAL_RETIRE committed through
    another running terminal's console (its etcd member leaves etcd with it)."""
    fleet = load_fleet(directory)
    if _terminal(fleet, directory, tid) is None:
        return 2
    try:
        retire_terminal(directory, tid)
        fleet = load_fleet(directory)
        _published(directory, fleet, _running(fleet, directory))
        others = [t["id"] for t in _running(fleet, directory) if t["id"] != tid]
        answer = _propose(fleet, directory, via or (others[0] if others else None),
                          f"member retire {tid}")
        next(t for t in fleet["terminals"] if t["id"] == tid)["retired"] = True
    except (RuntimeError, OSError) as exc:
        print(f"edgekey fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        _write(directory, fleet)
    print(f"{tid}: retired at height {answer['height']} ({answer['active']} active)")
    return 0


def _wait_console(url: str, proc: dict, mark: str | None = None) -> None:
    from tools.console_client import ConsoleClient, ConsoleTimeout

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(proc["pid"], mark):
            raise RuntimeError(f"the agent exited (see {proc['log']})")
        try:
            with ConsoleClient(url, timeout=2.0) as c:
                if c.run("status").ok:
                    return
        except (ConsoleTimeout, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the agent's console did not answer in {READY_TIMEOUT_S:.0f} s")


def status(directory: Path) -> int:
    from tools.console_client import ConsoleClient, ConsoleTimeout

    fleet = load_fleet(directory)
    bad = 0
    for t in fleet["terminals"]:
        for name, proc in t["processes"].items():
            alive = _alive(proc.get("pid"), _mark(directory))
            gone = name == "etcd" and t.get("retired")  # removed from etcd with its terminal
            bad += not (alive or gone)
            print(f"{t['id']} {name:<8} pid {proc.get('pid')}: "
                  f"{'running' if alive else 'left etcd (retired)' if gone else 'DOWN'}")
        try:
            with ConsoleClient(t["console"], timeout=3.0) as c:
                r = c.run("status --json")
            if r.ok:
                st = json.loads(r.body.splitlines()[-1])
                print(f"{t['id']} console: OK  height {st['height']}  "
                      f"{'synced' if st.get('synced', True) else 'NOT SYNCED'}  "
                      f"proposer {st.get('proposer')}  in flight {st['operations_in_flight']}")
            else:
                print(f"{t['id']} console: ERR {r.code} {r.reason}")
            bad += not r.ok
        except (ConsoleTimeout, OSError, ValueError, KeyError) as exc:
            print(f"{t['id']} console: no answer ({exc})")
            bad += 1
    return 0 if bad == 0 else 1


def down(directory: Path) -> int:
    fleet = load_fleet(directory)
    pids = []
    for name in STOP_ORDER:
        for t in fleet["terminals"]:
            proc = t.get("processes", {}).get(name, {})
            pid = proc.get("pid")
            if _alive(pid, _mark(directory)):
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
                _wait_gone([pid], STOP_TIMEOUT_S, _mark(directory))
    leftover = [p for p in pids if _alive(p, _mark(directory))]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    _wait_gone(leftover, STOP_TIMEOUT_S, _mark(directory))
    for t in fleet["terminals"]:
        for suffix in ("console", "console-agent", "plc-terminal", "plc-meters"):
            link = directory / f"{t['id']}.{suffix}"
            if link.is_symlink():
                link.unlink()
    plan = _plan(fleet)
    if plan is not None:
        plan.delete()
    print(f"fleet down: {len(pids)} process(es) stopped"
          + (f", {len(leftover)} killed" if leftover else ""))
    return 0


def _wait_gone(pids: list[int], timeout: float, mark: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p, mark) for p in pids) and time.monotonic() < deadline:
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, os.WNOHANG)
        time.sleep(0.05)
