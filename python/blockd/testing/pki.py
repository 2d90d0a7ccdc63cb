"""Throw-away X.509 certificates for TLS tests, made with the openssl command-line tool.

``make_pki(directory)`` writes a certificate authority and, signed by it, a server and a client
certificate, laid out as QEMU's tls-creds-x509 objects (and libnbd's tls-certificates) expect::

    directory/server/{ca-cert.pem,server-cert.pem,server-key.pem}
    directory/client/{ca-cert.pem,client-cert.pem,client-key.pem}

Keys are ECDSA P-256 (quick to generate); the certificates name ``localhost`` and 127.0.0.1 and
are valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"


@dataclass
class Pki:
    ca_cert: Path
    server_dir: Path
    client_dir: Path


def have_openssl() -> bool:
    return shutil.which(OPENSSL) is not None


def _run(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True)


def _key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def make_pki(directory: Path, name: str = "blockd test CA") -> Pki:
    """Creates a CA and a server and a client certificate under `directory` (see the module)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca-key.pem", directory / "ca-cert.pem"
    _key(ca_key)
    _run("req", "-x509", "-new", "-key", ca_key, "-out", ca_cert, "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for role, purpose in (("server", "serverAuth"), ("client", "clientAuth")):
        target = directory / role
        target.mkdir(exist_ok=True)
        key, cert, request = target / f"{role}-key.pem", target / f"{role}-cert.pem", directory / f"{role}.csr"
        extensions = directory / f"{role}.ext"
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={purpose}\n"
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _key(key)
        _run("req", "-new", "-key", key, "-out", request, "-subj", f"/CN=localhost {role}")
        _run("x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)
        shutil.copy(ca_cert, target / "ca-cert.pem")
    return Pki(ca_cert=ca_cert, server_dir=directory / "server", client_dir=directory / "client")
