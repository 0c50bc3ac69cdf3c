"""A throw-away PKI for the TLS tests (a real Mosquitto listener and real clients)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_pki(dir_: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, each
    signed by the CA, as PEM files in ``dir_``: ``ca``, ``server``, ``client`` and their
    ``*_key``."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key: Any, issuer: x509.Name, issuer_key: Any, ca: bool,
             san: bool = False) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    out = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test-ca", ca_key, name("test-ca"), ca_key, True)
    for label, key, c in (
        ("ca", ca_key, ca),
        ("server", (sk := ec.generate_private_key(ec.SECP256R1())),
         cert("localhost", sk, name("test-ca"), ca_key, False, san=True)),
        ("client", (ck := ec.generate_private_key(ec.SECP256R1())),
         cert("gateway", ck, name("test-ca"), ca_key, False)),
    ):
        (dir_ / f"{label}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (dir_ / f"{label}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[label] = dir_ / f"{label}.pem"
        out[label + "_key"] = dir_ / f"{label}.key"
    return out
