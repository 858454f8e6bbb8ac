"""Certificates and keys for a loopback or testbed federation (TLS + node authentication).

A private CA, the SuperLink's certificate for the addresses it is reached at (loopback and the
testbed's namespace-local ones), and one EC key pair per site in the OpenSSH format Flower's
node authentication reads (what ``ssh-keygen -t ecdsa -b 384`` makes). For tests and the
testbed only: a real federation's operator issues its own.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path


def make_certificates(d: Path, sites: Iterable[str],
                      addresses: Iterable[str] = ("127.0.0.1",)) -> None:
    """Write ``ca.crt``, ``server.pem``/``server.key`` (valid for ``addresses``) and
    ``site-NAME``/``site-NAME.pub`` for each name in ``sites`` into folder ``d``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject, issuer, key, sign_key, extensions):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(valid[0]).not_valid_after(valid[1]))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(sign_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privseg test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key,
              [(x509.BasicConstraints(ca=True, path_length=None), True)])
    key = ec.generate_private_key(ec.SECP384R1())
    addresses = list(addresses)
    sans = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a))
                                          for a in addresses]
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]), ca_name,
                  key, ca_key, [(x509.SubjectAlternativeName(sans), False)])
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(server.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for name in sites:
        k = ec.generate_private_key(ec.SECP384R1())
        (d / f"site-{name}").write_bytes(k.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (d / f"site-{name}.pub").write_bytes(k.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
