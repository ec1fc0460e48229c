"""The fleet's certificate authority: X.509 for the terminals' TLS and for etcd.

Provisioning (``edgekey provision``, on the desk) makes one CA per fleet and
issues from it; a terminal only loads what it was given (``common_name``,
``sha256_pem``: the CA it trusts is pinned by the signed provisioning):

- one certificate per terminal, CN = its terminal id, for both ends of the
  inter-terminal TLS (serverAuth + clientAuth) and as its etcd client
  certificate (etcd's ``--client-cert-auth`` checks it against the CA);
- one certificate per etcd member for its client and peer listeners.

EC P-256 throughout: what Go's crypto/tls (etcd), OpenSSL (Python's ``ssl``)
and RAUC all take. Built with ``cryptography``'s x509 module, no openssl
command line. The terminal never makes certificates; it only loads them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 3650  # a terminal's service life; renewal goes with a re-provisioning
LOOPBACK = ("127.0.0.1",)


@dataclass(frozen=True)
class Issued:
    """A key and its certificate, PEM."""

    key_pem: bytes
    cert_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``stem.key`` (mode 0600) and ``stem.crt`` in ``directory``; their paths."""
        key, crt = directory / f"{stem}.key", directory / f"{stem}.crt"
        if key.exists():
            key.unlink()
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        crt.write_bytes(self.cert_pem)
        return key, crt


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, fleet: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"edgekey fleet {fleet}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class FleetCA:
    """A fleet's CA key and certificate; ``issue`` signs leaf certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, fleet: str, *, now: dt.datetime | None = None) -> FleetCA:
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"edgekey fleet CA {fleet}", fleet)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, key_pem: bytes, cert_pem: bytes) -> FleetCA:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the fleet CA key is not an EC key")
        return cls(key, x509.load_pem_x509_certificate(cert_pem))

    @property
    def fleet(self) -> str:
        org = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(org[0].value).removeprefix("edgekey fleet ") if org else ""

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def issue(self, cn: str, *, ips: tuple[str, ...] = LOOPBACK,
              dns: tuple[str, ...] = ("localhost",), now: dt.datetime | None = None) -> Issued:
        """A P-256 key and a certificate for ``cn``, good as TLS server and client."""
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (x509.CertificateBuilder().subject_name(_name(cn, self.fleet))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                             key_agreement=True, content_commitment=False,
                                             data_encipherment=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))

    def write(self, directory: Path) -> tuple[Path, Path]:
        """``ca.key`` (0600) and ``ca.crt`` in ``directory``."""
        return Issued(self.key_pem, self.cert_pem).write(directory, "ca")


def sha256_pem(cert_pem: bytes) -> bytes:
    """The SHA-256 of a PEM certificate's DER: what the provisioning pins the fleet CA by."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256())


def common_name(cert_pem: bytes) -> str:
    """The CN of a PEM certificate (a terminal's id)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise ValueError("the certificate has no common name")
    return str(attrs[0].value)
