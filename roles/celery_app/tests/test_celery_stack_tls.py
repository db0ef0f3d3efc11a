"""The clients' TLS settings (celery_stack_config.tls_settings) against a real TLS server, with
real kombu and py-amqp: the server's certificate is checked against the deployment's CA bundle
and its name against the host dialled. kombu's py-amqp transport has ignored the CA of amqps://
URLs in some versions (kombu #1149): these tests fail if the check does not happen.

The server is a TLS listener on loopback that completes the handshake and then closes: a client
that trusts it gets past TLS and fails on AMQP (an OSError that is not a certificate error); a
client that does not gets ssl.SSLCertVerificationError."""

import datetime
import ipaddress
import json
import socket
import ssl
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kombu import Connection

ROLE = Path(__file__).resolve().parents[1]
NOW = datetime.datetime.now(datetime.timezone.utc)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(key, name, issuer_key=None, issuer=None, sans=(), ca=False):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(hours=1)).not_valid_after(NOW + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(s)) for s in sans]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(tmp_path, name, obj):
    path = tmp_path / name
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


@pytest.fixture
def pki(tmp_path):
    """The deployment's CA and server certificates it signed (two "brokers": 127.0.0.1 and
    127.0.0.2, the second also with its peer's name), and one from another CA. Addresses, not
    names: kombu dials 127.0.0.1 for `localhost`."""
    ca_key, other_key, server_key = _key(), _key(), _key()
    ca = _cert(ca_key, "celery-stack CA", ca=True)
    other = _cert(other_key, "another CA", ca=True)
    return {
        "ca": _pem(tmp_path, "ca.crt", ca),
        "server_key": _pem(tmp_path, "server.key", server_key),
        "mq1": _pem(tmp_path, "mq1.crt", _cert(server_key, "mq1", ca_key, ca, ["127.0.0.1"])),
        "mq2": _pem(tmp_path, "mq2.crt", _cert(server_key, "mq2", ca_key, ca, ["127.0.0.2"])),
        "mq2_with_peers": _pem(tmp_path, "mq2-peers.crt", _cert(server_key, "mq2", ca_key, ca,
                                                                  ["127.0.0.2", "127.0.0.1"])),
        "mq1_other_ca": _pem(tmp_path, "mq1-other.crt", _cert(server_key, "mq1", other_key, other, ["127.0.0.1"])),
    }


@pytest.fixture
def tls_server():
    """start(cert, key) -> port of a loopback TLS listener that shakes hands and closes."""
    sockets = []

    def start(cert, key, address="127.0.0.1"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        listener = socket.create_server((address, 0))
        sockets.append(listener)

        def serve():
            while True:
                try:
                    raw, _ = listener.accept()
                except OSError:
                    return
                try:
                    with context.wrap_socket(raw, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass  # the client refused our certificate

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in sockets:
        listener.close()


@pytest.fixture
def config(tmp_path, monkeypatch, pki):
    """celery_stack_config as the role installs it, with TLS on for the broker and the results."""
    python = tmp_path / "python"
    python.mkdir()
    (python / "celery_stack_config.py").write_text(
        (ROLE / "files/etc/celery-stack/python/celery_stack_config.py").read_text())
    (python / "celery_stack_config.json").write_text(json.dumps({
        "app_module": "acme:app", "broker_type": "rabbitmq", "table": [], "secrets_file": str(tmp_path / "env"),
        "declare_queues": True, "secrets": {}, "settings": {"task_default_queue": "io", "task_queues": [],
                                                            "task_routes": []},
        "tls": {"broker": True, "result_backend": True, "ca_file": pki["ca"]}}))
    monkeypatch.syspath_prepend(str(python))
    sys.modules.pop("celery_stack_config", None)
    import celery_stack_config

    return celery_stack_config


def _connect(url, settings):
    # The transport's own connect (the path every Celery connection takes), without kombu's
    # retries, which would sleep and wrap the certificate error.
    with Connection(url, ssl=settings["broker_use_ssl"], connect_timeout=5) as connection:
        connection.transport.establish_connection()


def test_settings_require_a_certificate_from_the_ca(config, pki):
    settings = config.tls_settings()
    assert settings["broker_use_ssl"] == {"ca_certs": pki["ca"], "cert_reqs": ssl.CERT_REQUIRED,
                                          "server_hostname": None}
    assert settings["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": pki["ca"],
                                                 "ssl_check_hostname": True}


def test_a_broker_with_the_deployments_certificate_is_trusted(config, pki, tls_server):
    port = tls_server(pki["mq1"], pki["server_key"])
    # past TLS: the listener is no AMQP server, so the AMQP handshake fails, not the certificate
    with pytest.raises(OSError) as failure:
        _connect(f"amqps://u:p@127.0.0.1:{port}/", config.tls_settings())
    assert not isinstance(failure.value, ssl.SSLCertVerificationError), failure.value


def test_a_broker_with_a_certificate_from_another_ca_is_refused(config, pki, tls_server):
    port = tls_server(pki["mq1_other_ca"], pki["server_key"])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        _connect(f"amqps://u:p@127.0.0.1:{port}/", config.tls_settings())


def test_a_broker_dialled_by_a_name_its_certificate_lacks_is_refused(config, pki, tls_server):
    port = tls_server(pki["mq2"], pki["server_key"], "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _connect(f"amqps://u:p@127.0.0.1:{port}/", config.tls_settings())


def test_kombu_checks_a_failover_broker_against_the_first_brokers_name(config, pki, tls_server):
    """Why every RabbitMQ node's certificate also names the other nodes (roles/tls, tls_peer_names):
    kombu writes the first broker's name into the shared TLS options, and the next connection
    (a failover, a reconnect) is checked against that name, whatever host it dials."""
    settings = config.tls_settings()
    first = tls_server(pki["mq1"], pki["server_key"], "127.0.0.1")
    with pytest.raises(OSError):
        _connect(f"amqps://u:p@127.0.0.1:{first}/", settings)
    assert settings["broker_use_ssl"]["server_hostname"] == "127.0.0.1"
    # the second broker's own, valid certificate is refused: checked against the first's name
    second = tls_server(pki["mq2"], pki["server_key"], "127.0.0.2")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _connect(f"amqps://u:p@127.0.0.2:{second}/", settings)
    # with its peer's name as well (what the tls play issues for a cluster), it is trusted
    peers = tls_server(pki["mq2_with_peers"], pki["server_key"], "127.0.0.2")
    with pytest.raises(OSError) as failure:
        _connect(f"amqps://u:p@127.0.0.2:{peers}/", settings)
    assert not isinstance(failure.value, ssl.SSLCertVerificationError), failure.value
