"""Certificates and keys for a federation, made with the `cryptography` package.

A federation has its own small CA: it signs the aggregator's TLS certificate
and nothing else, so a site that trusts it trusts exactly one server. Sites
do not get certificates; each proves who it is with a node-authentication key
(ECDSA, NIST P-384, public half in OpenSSH format, as Flower expects) that
the aggregator registers.

Keys and certificates are written with `fedpriv.common.files.write_secret`
and `write_public` (O_EXCL; secrets 0600): a file that already exists is
never replaced, so re-running provisioning cannot silently swap a key that
sites or ledgers already depend on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.common.files import write_public, write_secret

CURVE = ec.SECP384R1()
HASH = hashes.SHA384()
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_key(path: str | Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """A new private key file, owner-only; an existing one is never replaced (`SecretExistsError`)."""
    return write_secret(path, key_pem(key))


def write_cert(path: str | Path, cert: x509.Certificate) -> Path:
    """A new certificate file; an existing one is never replaced either."""
    return write_public(path, cert_pem(cert))


def load_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key")
    return key


def load_cert(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    # Backdated a little: a site whose clock runs slightly behind must still accept a fresh certificate.
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def new_ca(federation: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    name = _name(f"{federation} fedpriv CA", federation)
    start = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        # pathlen 0: the CA can sign server certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, HASH)
    )
    return key, cert


def split_hosts(hosts: list[str]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses, in the order given, without duplicates."""
    dns, ips = [], []
    for host in hosts:
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            if host.lower() not in dns:
                dns.append(host.lower())
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    organisation: str,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate valid for every name and IP in `hosts`."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    dns, ips = split_hosts(hosts)
    key = new_key()
    start = _now()
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], organisation))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, HASH)
    )
    return key, cert


def cert_hosts(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [str(i) for i in san.get_values_for_type(x509.IPAddress)]


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class NodeKey:
    """A site's Flower node-authentication key pair, serialised as Flower reads it."""

    private_openssh: bytes
    public_openssh: bytes

    @classmethod
    def generate(cls) -> NodeKey:
        key = new_key()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return cls(private, public + b"\n")

    def write(self, private_path: str | Path, public_path: str | Path) -> None:
        """The private half owner-only, the public half readable; neither replaces an existing file."""
        write_secret(private_path, self.private_openssh)
        write_public(public_path, self.public_openssh)


def node_public_key(text: str | bytes) -> ec.EllipticCurvePublicKey:
    """Parses an OpenSSH node public key; only NIST P-384 is accepted."""
    raw = text.encode() if isinstance(text, str) else text
    key = serialization.load_ssh_public_key(raw.strip())
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise ValueError("node public key must be an ECDSA NIST P-384 key in OpenSSH format")
    return key
