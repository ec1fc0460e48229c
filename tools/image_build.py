"""``edgekey image``: the terminal's signed update bundle, built with RAUC's own tools.

A bundle is what `rauc bundle` makes from a manifest and one slot image: a
squashfs (``mksquashfs``, reproducible: every file root's, one timestamp)
holding the agent, the HAL, the board configs, the pure-Python packages
the agent needs beyond Debian's base (pyserial's ``serial``, ``etcd3gw``) and
``slot.json``. The bundle is RAUC's *plain* format (the signature covers the
whole bundle, and installing it needs no device-mapper), signed with the
fleet's update key: an EC P-256 signing certificate under the update CA,
both made here with ``cryptography``'s x509 builder. The signing
certificate carries no extendedKeyUsage: RAUC's default purpose check
refuses codeSigning.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hal.board import Board, board_path, load_board
from hal.bootctl import SLOT_CLASS, compatible

ROOT = Path(__file__).resolve().parent.parent
SLOT_IMAGE = "appfs.img"
SLOT_MOUNT = "/opt/edgekey"  # where the terminal mounts the booted slot
SOURCES = ("agent", "hal", "board_configs")
DEPENDENCIES = ("serial", "etcd3gw")  # beyond Debian's base python3 on the terminal
KEY_FILES = ("ca.crt", "ca.key", "signing.crt", "signing.key")
DEFAULT_KEYS = Path("out/update-keys")
DEFAULT_OUT = Path("out/images")


class ImageError(Exception):
    """A bundle could not be built or read; the message is one line."""


def project_version() -> str:
    try:
        return importlib.metadata.version("edgekey")
    except importlib.metadata.PackageNotFoundError:
        with open(ROOT / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a tool; ImageError with its last line of output when it fails or is missing."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise ImageError(f"{what}: {cmd[0]} is not installed (apt-get install rauc "
                         "squashfs-tools)") from None
    if res.returncode != 0:
        raise ImageError(f"{what}: {last_line(res.stderr or res.stdout)}")
    return res


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------ keys

@dataclass(frozen=True)
class Keys:
    ca_crt: Path
    signing_crt: Path
    signing_key: Path


def make_keys(out: Path, name: str = "edgekey fleet update") -> Keys:
    """A new update CA and a signing certificate under it (EC P-256, no extendedKeyUsage)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    if any((out / f).exists() for f in KEY_FILES):
        raise ImageError(f"{out} already holds update keys; refusing to overwrite them")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    until = now + dt.timedelta(days=3650)

    def dn(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekey"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(until)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
             .add_extension(x509.KeyUsage(
                 digital_signature=not ca, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                 encipher_only=False, decipher_only=False), True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
        if not ca:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = dn(f"{name} CA")
    ca_cert = cert(ca_name, ca_key, ca_name, ca_key, True)
    sign_key = ec.generate_private_key(ec.SECP256R1())
    sign_cert = cert(dn(f"{name} signing"), sign_key, ca_name, ca_key, False)

    def write(path: Path, data: bytes, secret: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    pem = serialization.Encoding.PEM
    for fname, key in (("ca.key", ca_key), ("signing.key", sign_key)):
        write(out / fname, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), True)
    write(out / "ca.crt", ca_cert.public_bytes(pem), False)
    write(out / "signing.crt", sign_cert.public_bytes(pem), False)
    return keys_in(out)


def keys_in(folder: Path) -> Keys:
    return Keys(folder / "ca.crt", folder / "signing.crt", folder / "signing.key")


def ensure_keys(folder: Path) -> tuple[Keys, bool]:
    """The update keys in ``folder``, made there first if it holds none; (keys, made now)."""
    keys = keys_in(folder)
    have = [p for p in (keys.ca_crt, keys.signing_crt, keys.signing_key) if p.exists()]
    if len(have) == 3:
        return keys, False
    if have:
        raise ImageError(f"{folder} holds only some update keys ({', '.join(p.name for p in have)})"
                         "; need ca.crt, signing.crt and signing.key")
    return make_keys(folder), True


# ------------------------------------------------------------------ build

def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImageError(f"package {name!r} is not installed in {sys.prefix}; the slot needs it")
    return Path(next(iter(spec.submodule_search_locations)))


def _source_epoch(paths: list[Path]) -> int:
    """SOURCE_DATE_EPOCH, else the newest source file's mtime: same tree, same image."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    newest = 0
    for top in paths:
        for p in top.rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts:
                newest = max(newest, int(p.stat().st_mtime))
    return newest


def slot_tree(root: Path, board: Board, version: str) -> int:
    """Lay out the slot's files under ``root``; returns the timestamp they carry."""
    sources = [ROOT / s for s in SOURCES] + [_package_dir(d) for d in DEPENDENCIES]
    epoch = _source_epoch(sources)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for src in sources:
        shutil.copytree(src, root / "edgekey" / src.name, ignore=ignore)
    built = dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"version": version, "compatible": compatible(board), "board": board.name,
            "built": built}
    (root / "slot.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return epoch


def compile_slot(root: Path) -> None:
    """Byte-compile the slot's packages, once, on the desk.

    The slot is a read-only squashfs, so the terminal could never cache what it
    compiles and would compile every module at every boot. The source hash, never
    checked, keeps the image a function of the sources (no mtimes); the interpreter tag
    in each file name keeps another Python from using them. A fixed hash seed: set
    constants (frozensets) are marshalled in hash order.
    """
    for pkg in sorted((root / "edgekey").iterdir()):
        if pkg.is_dir():
            _run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode",
                  "unchecked-hash", "-d", f"{SLOT_MOUNT}/edgekey/{pkg.name}", str(pkg)],
                 "compileall", env={**os.environ, "PYTHONHASHSEED": "0"})


def manifest(board: Board, version: str) -> str:
    return (f"[update]\ncompatible={compatible(board)}\nversion={version}\n"
            f"description=edgekey agent for {board.name}\n\n"
            f"[bundle]\nformat=plain\n\n[image.{SLOT_CLASS}]\nfilename={SLOT_IMAGE}\n")


@dataclass(frozen=True)
class Built:
    bundle: Path
    size: int
    seconds: float
    image_size: int
    keys_made: bool


def build_bundle(board: Board, out: Path, version: str, keys_dir: Path, *,
                 mutate: Callable[[Path], None] | None = None) -> Built:
    """Build ``edgekey-<board>-<version>.raucb`` in ``out``.

    ``mutate`` may change the slot's files before they are packed (tests
    build broken slots with it).
    """
    from hal.bootstate import version_key

    t0 = time.monotonic()
    try:
        version_key(version)
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    keys, made = ensure_keys(keys_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / f"edgekey-{board.name}-{version}.raucb"
    with tempfile.TemporaryDirectory(prefix="edgekey-image-") as tmp:
        rootfs, content = Path(tmp) / "rootfs", Path(tmp) / "content"
        rootfs.mkdir()
        content.mkdir()
        epoch = slot_tree(rootfs, board, version)
        if mutate is not None:
            mutate(rootfs)
        compile_slot(rootfs)
        image = content / SLOT_IMAGE
        _run(["mksquashfs", str(rootfs), str(image), "-all-root", "-noappend", "-no-xattrs",
              "-mkfs-time", str(epoch), "-all-time", str(epoch), "-quiet", "-no-progress"],
             "mksquashfs", env={k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"})
        (content / "manifest.raucm").write_text(manifest(board, version))
        part = Path(tmp) / "bundle.raucb"
        _run(["rauc", "bundle", "--cert", str(keys.signing_crt), "--key", str(keys.signing_key),
              "--keyring", str(keys.ca_crt), str(content), str(part)], "rauc bundle")
        image_size = image.stat().st_size
        shutil.move(part, bundle)
    return Built(bundle, bundle.stat().st_size, time.monotonic() - t0, image_size, made)


# ------------------------------------------------------------------ info

@dataclass(frozen=True)
class BundleInfo:
    compatible: str
    version: str
    sha256: str  # the slot image's
    image_size: int
    text: str  # rauc info's own report


def bundle_info(bundle: Path, keyring: Path, text: bool = False) -> BundleInfo:
    """``rauc info --keyring``: checks the signature; ImageError (one line) when it fails.

    ``text``: also rauc info's own report, for people.
    """
    if not bundle.is_file():
        raise ImageError(f"no bundle {bundle}")
    if not keyring.is_file():
        raise ImageError(f"no keyring {keyring}")
    cmd = ["rauc", "info", "--keyring", str(keyring), "--output-format=json", str(bundle)]
    res = _run(cmd, "rauc info")
    try:
        data = json.loads(res.stdout)
        images = [next(iter(i.values())) if len(i) == 1 and isinstance(next(iter(i.values())),
                                                                       dict) else i
                  for i in data.get("images", [])]
        img = next(i for i in images if i.get("filename") == SLOT_IMAGE or
                   i.get("slotclass") == SLOT_CLASS)
        info = BundleInfo(str(data["compatible"]), str(data["version"]),
                          str(img.get("checksum") or img.get("digest") or ""),
                          int(img.get("size") or 0), "")
    except (ValueError, KeyError, StopIteration, TypeError, AttributeError):
        raise ImageError(f"rauc info: {bundle} has no {SLOT_CLASS} image in its manifest "
                         "that this tool understands") from None
    if not text:
        return info
    report = _run(["rauc", "info", "--keyring", str(keyring), str(bundle)], "rauc info").stdout
    return BundleInfo(info.compatible, info.version, info.sha256, info.image_size,
                      re.sub(r"\x1b\[[0-9;]*m", "", report))


# ------------------------------------------------------------------ CLI

def add_parser(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser("image", help="signed RAUC update bundles: build, keys, info"
                           ).add_subparsers(dest="image_cmd", metavar="SUBCOMMAND", required=True)
    b = image.add_parser("build", help="a signed RAUC bundle of the agent for one board")
    b.add_argument("--board", default="pl-terminal", help="board name or file")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})")
    b.add_argument("--version", default=None, help="bundle version (default: the project's)")
    b.add_argument("--keys", type=Path, default=DEFAULT_KEYS,
                   help=f"update keys folder, made on first use (default {DEFAULT_KEYS})")
    k = image.add_parser("keys", help="a new update CA and signing certificate")
    k.add_argument("--out", type=Path, default=DEFAULT_KEYS)
    i = image.add_parser("info", help="a bundle's signature, compatible, version (rauc info)")
    i.add_argument("bundle", type=Path)
    i.add_argument("--keyring", type=Path, required=True, help="the update CA (ca.crt)")
    for p in (b, k, i):
        p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.image_cmd == "keys":
            keys = make_keys(args.out)
            print(f"update CA {keys.ca_crt}, signing certificate {keys.signing_crt} "
                  f"(key {keys.signing_key})")
        elif args.image_cmd == "build":
            board = load_board(board_path(args.board))
            built = build_bundle(board, args.out, args.version or project_version(), args.keys)
            if built.keys_made:
                print(f"made update keys in {args.keys} (CA {keys_in(args.keys).ca_crt})")
            print(f"{built.bundle}: {built.size} bytes ({built.size / 2**20:.1f} MiB, slot image "
                  f"{built.image_size} bytes), built in {built.seconds:.1f} s")
        else:
            print(bundle_info(args.bundle, args.keyring, text=True).text.rstrip())
    except ImageError as exc:
        print(f"edgekey image {args.image_cmd}: {exc}", file=sys.stderr)
        return 1
    return 0
