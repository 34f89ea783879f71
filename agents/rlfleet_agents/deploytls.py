"""TLS between a named deployment's HAProxy and its replicas on other nodes.

A replica that Ray places on another node than the controller's listens on that node's address,
which the cluster's network reaches. There it serves HTTPS only and asks for a client certificate
(mutual TLS), besides checking the deployment's bearer token on every act/infer request:

- the controller makes a **CA per deployment** (per controller life) in memory; its key never
  leaves the controller's process;
- each remote replica makes its **own key** and sends the controller a certificate request; the
  controller signs it for the replica's node address (IP SAN). The replica's key never leaves the
  replica's process (on disk only while ``ssl`` loads it: 0600 in a 0700 temporary directory);
- HAProxy gets the CA certificate and a **client certificate** of the same CA (0600 files in the
  balancer's 0700 directory) and talks to the remote replicas with
  ``ssl verify required ca-file ... crt ...``; the replicas accept only clients of that CA.

Another deployment's certificates (another CA) are refused both ways; plaintext is refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from typing import Any

VALID_DAYS = 3650  # the CA lives as long as its controller; replicas are replaced when it ends


def _ec_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rlfleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])


class DeploymentCA:
    """The per-deployment CA of one controller (key in memory only)."""

    def __init__(self, deployment: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        self.deployment = deployment
        self._key = _ec_key()
        now = datetime.datetime.now(datetime.UTC)
        subject = _name(f"rlfleet deployment {deployment} CA")
        self._cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, csr_pem: bytes, *, ip: str | None = None, client: bool = False) -> bytes:
        """A certificate for the key of ``csr_pem`` (checked: its signature), named ``ip`` (IP SAN)
        for a server, or a client certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("refused: the replica's certificate request is not signed by its key")
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self._cert.subject)
             .public_key(csr.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                   else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if ip:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                critical=False)
        return b.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def client_pem(self, cn: str = "haproxy") -> bytes:
        """A client certificate and its key in one PEM (HAProxy's ``crt`` file)."""
        key_pem, csr_pem = key_and_csr(cn)
        return self.sign(csr_pem, client=True) + key_pem


def key_and_csr(cn: str) -> tuple[bytes, bytes]:
    """A new private key (PEM) and a certificate request signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = _ec_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA256())
    return _pem_key(key), csr.public_bytes(serialization.Encoding.PEM)


def server_context(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """The replica's server context: TLS 1.2+, its certificate, and client certificates of the
    deployment's CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem.decode())
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


def client_context(ca_pem: bytes, client_pem: bytes | None = None) -> ssl.SSLContext:
    """A client context that trusts only the deployment's CA (and checks the server's IP SAN),
    presenting ``client_pem`` (certificate + key) if given."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    if client_pem is not None:
        _load_chain(ctx, client_pem, None)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes | None) -> None:
    """``ssl`` loads keys only from files: one 0600 file in a 0700 directory, removed at once."""
    with tempfile.TemporaryDirectory(prefix="rlfleet-tls-") as d:
        os.chmod(d, 0o700)
        path = os.path.join(d, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem + (key_pem or b""))
        ctx.load_cert_chain(path)


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
