"""Certificates the TLS tests make with the `openssl` CLI: a test CA, a server
certificate for 127.0.0.1/localhost, a client certificate from the same CA, and a
client certificate from a second CA that nobody trusts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.services import require_tool

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by a CA the node does not trust
    rogue_key: Path
    server_bundle: Path  # certificate + key in one PEM (Orthanc wants them apart, dcmtk either)


def _run(openssl: str, *args: str) -> None:
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def _ca(openssl: str, folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(openssl: str, folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _run(openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


def make_pki(folder: Path) -> Pki:
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(openssl, folder, "test-ca")
    rogue_ca = _ca(openssl, folder, "rogue-ca")
    server = _leaf(openssl, folder, "ptx-node-test", ca,
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    # The PACS uses its certificate both ways (Orthanc has one), so it names its address too.
    client = _leaf(openssl, folder, "pacs-test", ca,
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=clientAuth,serverAuth\n")
    rogue = _leaf(openssl, folder, "intruder", rogue_ca, "extendedKeyUsage=clientAuth\n")
    bundle = folder / "server-bundle.pem"
    bundle.write_text(server[0].read_text() + server[1].read_text())
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
               rogue_cert=rogue[0], rogue_key=rogue[1], server_bundle=bundle)
