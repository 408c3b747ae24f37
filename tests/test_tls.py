"""DICOM TLS and who may connect: the SCP and the C-STORE SCU speak TLS (1.2 or newer)
with certificates the test makes, tried against dcmtk (`storescu +tls`, `storescp +tls`)
and an Orthanc with DicomTlsEnabled in both directions; a listener reachable from the
network with nobody on its allow-list does not start."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from node.config import ConfigError, Destination, NodeConfig, load_config
from node.db import JobStatus
from node.delivery import DeliveryError, send_dimse
from node.demo.pacs import free_port, wait_until
from node.scp import ScpConfigError, StoreSCP
from node.tls import TlsConfigError, client_context, server_context
from tests.scp_helpers import associations, chest_file, jobs, node_config, running_scp, storescu
from tests.services import Orthanc, require_tool
from tests.tls_certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_scp_config(tmp_path: Path, pki: Pki, *, require_client_certificate: bool = True) -> NodeConfig:
    return node_config(tmp_path, scp={"tls": {
        "enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
        "ca_bundle": str(pki.ca), "require_client_certificate": require_client_certificate,
    }})


def _tls_destination(pki: Pki, port: int, *, ae_title: str = "STORESCP", ca: Path | None = None,
                     client_cert: bool = True) -> Destination:
    tls: dict[str, object] = {"enabled": True, "ca_bundle": str(ca or pki.ca)}
    if client_cert:
        tls |= {"certificate": str(pki.client_cert), "private_key": str(pki.client_key)}
    return Destination(name="tlspacs", ae_title=ae_title, host="127.0.0.1", port=port, tls=tls)


# --- the SCP with dcmtk's storescu ------------------------------------------------------------------------------


def test_storescu_over_mutual_tls_is_stored_and_everything_else_is_refused(tmp_path: Path, pki: Pki) -> None:
    config = _tls_scp_config(tmp_path, pki)
    image = chest_file(tmp_path / "in")
    with running_scp(config) as scp:
        good = storescu(scp.port, [image], "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
        assert good.returncode == 0, good.stderr
        stored = jobs(config)
        assert [j.status for j in stored] == [JobStatus.RECEIVED]
        assert Path(stored[0].spool_path).exists()

        # Plain TCP to the TLS port, a certificate from a CA the node does not trust, no certificate at all.
        plain = storescu(scp.port, [image])
        rogue = storescu(scp.port, [image], "+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca))
        anonymous = storescu(scp.port, [image], "+tla", "+cf", str(pki.ca))
        for refused in (plain, rogue, anonymous):
            assert refused.returncode != 0, refused.stdout + refused.stderr
        assert len(jobs(config)) == 1
        def tls_refusals() -> list:
            rows = [a for a in associations(config) if not a.accepted and "TLS" in (a.reject_reason or "")]
            return rows if sum(a.occurrences for a in rows) >= 3 else []

        refusals = wait_until(tls_refusals, 30, what="three refused TLS connections in the association log")
        assert all(a.peer_address == "127.0.0.1" for a in refusals)


def test_a_caller_that_connects_and_stays_silent_does_not_block_others(tmp_path: Path, pki: Pki) -> None:
    config = _tls_scp_config(tmp_path, pki)
    image = chest_file(tmp_path / "in")
    with running_scp(config) as scp, socket.create_connection(("127.0.0.1", scp.port)) as _silent:
        time.sleep(0.5)  # the silent connection is accepted first
        started = time.monotonic()
        good = storescu(scp.port, [image], "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
        assert good.returncode == 0, good.stderr
        assert time.monotonic() - started < 20
    assert [j.status for j in jobs(config)] == [JobStatus.RECEIVED]


def test_tls_contexts_refuse_old_protocols_and_name_missing_files(tmp_path: Path, pki: Pki) -> None:
    config = _tls_scp_config(tmp_path, pki)
    server = server_context(config.scp.tls)
    client = client_context(_tls_destination(pki, 104).tls)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2 and client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED and client.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="min_version"):
        load_config(None, environ={}, overrides={"scp": {"tls": {"enabled": True, "min_version": "1.1"}}})
    missing = node_config(tmp_path / "missing", scp={"tls": {"enabled": True, "certificate": str(tmp_path / "no.crt"),
                                                             "private_key": str(pki.server_key)}})
    with pytest.raises(TlsConfigError, match=r"certificate .*no\.crt does not exist"):
        StoreSCP(missing, enqueuer=None)
    # A TLS 1.1 client gets no connection.
    with running_scp(config) as scp:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")


# --- the SCU with dcmtk's storescp -------------------------------------------------------------------------------


def _storescp(pki: Pki, folder: Path, port: int) -> subprocess.Popen[bytes]:
    binary = require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    # +tls requires the caller's certificate by default (-rc).
    proc = subprocess.Popen([binary, "-aet", "STORESCP", "-od", str(folder), "+tls", str(pki.server_key),
                             str(pki.server_cert), "+cf", str(pki.ca), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(listening, 20, what="storescp +tls to listen")
    return proc


def test_delivery_over_tls_to_dcmtk_storescp(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    received = tmp_path / "received"
    image = chest_file(tmp_path / "out")
    proc = _storescp(pki, received, port)
    try:
        assert send_dimse(_tls_destination(pki, port), [image], calling_ae_title="PTXNODE", timeout_s=20) == 1
        assert len(list(received.iterdir())) == 1
        # No client certificate: storescp requires one.
        with pytest.raises(DeliveryError, match="DICOM TLS"):
            send_dimse(_tls_destination(pki, port, client_cert=False), [image], calling_ae_title="PTXNODE",
                       timeout_s=20)
        # A server certificate from a CA we were not told to trust.
        with pytest.raises(DeliveryError, match="DICOM TLS"):
            send_dimse(_tls_destination(pki, port, ca=pki.rogue_cert), [image], calling_ae_title="PTXNODE",
                       timeout_s=20)
        assert len(list(received.iterdir())) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- Orthanc with DicomTlsEnabled, both directions ---------------------------------------------------------------


def test_orthanc_with_dicom_tls_sends_to_the_node_and_receives_from_it(tmp_path: Path, pki: Pki) -> None:
    config = _tls_scp_config(tmp_path, pki)
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.extra_config = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.client_cert),
        "DicomTlsPrivateKey": str(pki.client_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    pacs.start()
    try:
        with running_scp(config) as scp:
            pacs.request("PUT", "/modalities/ptx", (
                f'{{"AET": "PTXNODE", "Host": "127.0.0.1", "Port": {scp.port}, "UseDicomTls": true}}').encode())
            orthanc_id = pacs.upload(chest_file(tmp_path / "in", seed=1))
            pacs.store_to_modality("ptx", [orthanc_id])
            stored = jobs(config)
            assert [j.status for j in stored] == [JobStatus.RECEIVED]
            assert stored[0].calling_ae == "ORTHANC"

        # The node's SCU into Orthanc's TLS port, presenting the node's certificate.
        output = chest_file(tmp_path / "out", seed=2)
        dest = Destination(name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port, tls={
            "enabled": True, "ca_bundle": str(pki.ca), "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key)})
        assert send_dimse(dest, [output], calling_ae_title="PTXNODE", timeout_s=20) == 1
        import pydicom

        uid = str(pydicom.dcmread(output).SOPInstanceUID)
        assert pacs.find_sop(uid)
        # Plain TCP to Orthanc's TLS port is not a delivery.
        plain = dest.model_copy(update={"tls": dest.tls.model_copy(update={"enabled": False})})
        with pytest.raises(DeliveryError):
            send_dimse(plain, [chest_file(tmp_path / "out2", seed=3)], calling_ae_title="PTXNODE", timeout_s=10)
    finally:
        pacs.stop()


# --- who may connect -------------------------------------------------------------------------------------------


def test_scp_on_a_network_address_needs_an_allow_list_or_accept_any_caller(tmp_path: Path) -> None:
    open_config = node_config(tmp_path, scp={"bind_address": "0.0.0.0"})
    with pytest.raises(ScpConfigError, match="accept_any_caller"):
        StoreSCP(open_config, enqueuer=None).start()
    for allowed in ({"accept_any_caller": True}, {"allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.5"}]}):
        config = node_config(tmp_path, scp={"bind_address": "0.0.0.0", **allowed})
        with running_scp(config) as scp:
            assert scp.port > 0
    from node.scp import check_caller_exposure

    for loopback in ("127.0.0.1", "::1", "localhost"):
        check_caller_exposure(node_config(tmp_path, scp={"bind_address": loopback}))  # raises if refused


def test_serve_refuses_an_open_listener_with_the_reason(tmp_path: Path) -> None:
    import sys

    from node.config import write_config_file

    config_path = write_config_file(tmp_path / "node.toml", {
        "spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "scp": {"bind_address": "0.0.0.0", "port": free_port()},
        "model": {"allow_untrained": True}, "worker": {"embedded_workers": 0}, "http": {"enabled": False},
    })
    run = subprocess.run([sys.executable, "-m", "node.cli", "serve", "-c", str(config_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "allowed_callers" in run.stderr and "accept_any_caller" in run.stderr
    assert "Traceback" not in run.stderr
