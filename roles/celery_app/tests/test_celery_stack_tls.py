"""The clients' TLS settings (celery_stack_config.tls_settings) against a real TLS server, with
real kombu and py-amqp: the server's certificate is checked against the deployment's CA bundle
and its name against the host dialled. kombu's py-amqp transport has ignored the CA of amqps://
URLs in some versions (kombu #1149): these tests fail if the check does not happen.

The server is a TLS listener on loopback that completes the handshake and then closes: a client
that trusts it gets past TLS and fails on AMQP (an OSError that is not a certificate error); a
client that does not gets ssl.SSLCertVerificationError.

Client certificates (celery_stack_tls_client_certificates): a listener that requires one, as
RabbitMQ (fail_if_no_peer_cert) and Redis (tls-auth-clients yes) then do, and records each
handshake: a client without a certificate, or with one of another CA, is refused; the client
with the deployment's settings shows the host's certificate and is accepted."""

import datetime
import ipaddress
import json
import socket
import ssl
import sys
import threading
import time
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
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _cert(ca_key, "celery-stack CA", ca=True)
    other = _cert(other_key, "another CA", ca=True)
    return {
        "ca": _pem(tmp_path, "ca.crt", ca),
        "ca_key": _pem(tmp_path, "ca.key", ca_key),
        "server_key": _pem(tmp_path, "server.key", server_key),
        "mq1": _pem(tmp_path, "mq1.crt", _cert(server_key, "mq1", ca_key, ca, ["127.0.0.1"])),
        "mq2": _pem(tmp_path, "mq2.crt", _cert(server_key, "mq2", ca_key, ca, ["127.0.0.2"])),
        "mq2_with_peers": _pem(tmp_path, "mq2-peers.crt", _cert(server_key, "mq2", ca_key, ca,
                                                                  ["127.0.0.2", "127.0.0.1"])),
        "mq1_other_ca": _pem(tmp_path, "mq1-other.crt", _cert(server_key, "mq1", other_key, other, ["127.0.0.1"])),
        # a client host's certificate and key (the application's copies), and one of another CA
        "client_key": _pem(tmp_path, "tls-client.key", client_key),
        "client": _pem(tmp_path, "tls-client.crt", _cert(client_key, "worker1", ca_key, ca, ["127.0.0.3"])),
        "client_other_ca": _pem(tmp_path, "other-client.crt", _cert(client_key, "worker1", other_key, other,
                                                                     ["127.0.0.3"])),
    }


def _listen(context, address, sockets, on_handshake):
    """A loopback TLS listener with this context, in a thread: on_handshake(error or None, socket)
    for each connection, whose socket closes right after. Returns its port."""
    listener = socket.create_server((address, 0))
    sockets.append(listener)

    def serve():
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    on_handshake(None, tls)
            except (ssl.SSLError, OSError) as error:
                on_handshake(error, None)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@pytest.fixture
def tls_server():
    """start(cert, key) -> port of a loopback TLS listener that shakes hands and closes."""
    sockets = []

    def start(cert, key, address="127.0.0.1"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        return _listen(context, address, sockets, lambda error, tls: None)  # a refusal is the client's

    yield start
    for listener in sockets:
        listener.close()


@pytest.fixture
def mtls_server(pki):
    """start() -> (port, handshakes): a loopback TLS listener with mq1's certificate that, like
    RabbitMQ with fail_if_no_peer_cert and Redis with tls-auth-clients yes, requires a client
    certificate from the deployment's CA. handshakes: per connection, the client certificate's
    common name, or "refused: <why>"."""
    sockets = []

    def start():
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(pki["mq1"], pki["server_key"])
        handshakes = []

        def record(error, tls):
            handshakes.append(f"refused: {error}" if error else
                              dict(field[0] for field in tls.getpeercert()["subject"])["commonName"])

        return _listen(context, "127.0.0.1", sockets, record), handshakes

    yield start
    for listener in sockets:
        listener.close()


def _load_config(tmp_path, monkeypatch, tls, broker_type="rabbitmq"):
    """celery_stack_config as the role installs it, with the JSON's `tls` as given."""
    python = tmp_path / "python"
    python.mkdir(exist_ok=True)
    (python / "celery_stack_config.py").write_text(
        (ROLE / "files/etc/celery-stack/python/celery_stack_config.py").read_text())
    (python / "celery_stack_config.json").write_text(json.dumps({
        "app_module": "acme:app", "broker_type": broker_type, "table": [], "secrets_file": str(tmp_path / "env"),
        "declare_queues": True, "secrets": {}, "settings": {"task_default_queue": "io", "task_queues": [],
                                                            "task_routes": []},
        "tls": tls}))
    monkeypatch.syspath_prepend(str(python))
    sys.modules.pop("celery_stack_config", None)
    import celery_stack_config

    return celery_stack_config


@pytest.fixture
def config(tmp_path, monkeypatch, pki):
    """celery_stack_config as the role installs it, with TLS on for the broker and the results."""
    return _load_config(tmp_path, monkeypatch, {"broker": True, "result_backend": True, "ca_file": pki["ca"],
                                                "client_cert": "", "client_key": ""})


@pytest.fixture
def mtls_config(tmp_path, monkeypatch, pki):
    """The same with celery_stack_tls_client_certificates: the clients show the host's certificate."""
    return _load_config(tmp_path, monkeypatch, {"broker": True, "result_backend": True, "ca_file": pki["ca"],
                                                "client_cert": pki["client"], "client_key": pki["client_key"]})


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


# --- client certificates (celery_stack_tls_client_certificates) --------------------------------

def test_settings_show_the_hosts_certificate_with_client_certificates(mtls_config, pki):
    settings = mtls_config.tls_settings()
    # py-amqp's SSL options (kombu hands them to ssl.SSLContext.load_cert_chain)
    assert settings["broker_use_ssl"] == {"ca_certs": pki["ca"], "cert_reqs": ssl.CERT_REQUIRED,
                                          "server_hostname": None, "certfile": pki["client"],
                                          "keyfile": pki["client_key"]}
    # redis-py's connection options
    assert settings["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": pki["ca"],
                                                 "ssl_check_hostname": True, "ssl_certfile": pki["client"],
                                                 "ssl_keyfile": pki["client_key"]}


def test_a_redis_broker_shows_the_hosts_certificate_too(tmp_path, monkeypatch, pki):
    config = _load_config(tmp_path, monkeypatch, {"broker": True, "result_backend": True, "ca_file": pki["ca"],
                                                  "client_cert": pki["client"], "client_key": pki["client_key"]},
                          broker_type="redis")
    settings = config.tls_settings()
    assert settings["broker_use_ssl"] == settings["redis_backend_use_ssl"]
    assert settings["broker_use_ssl"]["ssl_certfile"] == pki["client"]


def test_a_client_without_a_certificate_is_refused(config, mtls_server):
    port, handshakes = mtls_server()
    with pytest.raises(OSError) as failure:
        _connect(f"amqps://u:p@127.0.0.1:{port}/", config.tls_settings())
    assert not isinstance(failure.value, ssl.SSLCertVerificationError), failure.value  # we trusted the server
    _wait_for(handshakes)
    assert len(handshakes) == 1 and handshakes[0].startswith("refused:"), handshakes
    assert "certificate" in handshakes[0].lower(), handshakes


def test_a_client_with_a_certificate_of_another_ca_is_refused(mtls_config, pki, mtls_server):
    port, handshakes = mtls_server()
    settings = mtls_config.tls_settings()
    settings["broker_use_ssl"]["certfile"] = pki["client_other_ca"]
    with pytest.raises(OSError):
        _connect(f"amqps://u:p@127.0.0.1:{port}/", settings)
    _wait_for(handshakes)
    assert len(handshakes) == 1 and "certificate verify failed" in handshakes[0], handshakes


def test_the_client_with_the_deployments_settings_is_accepted(mtls_config, mtls_server):
    port, handshakes = mtls_server()
    # past TLS: the listener is no AMQP server, so the AMQP handshake fails, not TLS
    with pytest.raises(OSError) as failure:
        _connect(f"amqps://u:p@127.0.0.1:{port}/", mtls_config.tls_settings())
    assert not isinstance(failure.value, ssl.SSLError), failure.value
    _wait_for(handshakes)
    assert handshakes == ["worker1"]


def test_a_renewed_certificate_is_shown_at_the_next_connection(mtls_config, pki, mtls_server, tmp_path):
    """Why a renewed copy restarts no client (roles/celery_app, tasks/settings.yml): py-amqp loads
    the certificate and key at every new connection, from the same settings."""
    port, handshakes = mtls_server()
    settings = mtls_config.tls_settings()
    with pytest.raises(OSError):
        _connect(f"amqps://u:p@127.0.0.1:{port}/", settings)
    renewed_key = _key()
    ca_key = serialization.load_pem_private_key(Path(pki["ca_key"]).read_bytes(), None)
    ca = x509.load_pem_x509_certificate(Path(pki["ca"]).read_bytes())
    Path(pki["client"]).write_bytes(_cert(renewed_key, "worker1-renewed", ca_key, ca).public_bytes(
        serialization.Encoding.PEM))
    Path(pki["client_key"]).write_bytes(renewed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(OSError):
        _connect(f"amqps://u:p@127.0.0.1:{port}/", settings)
    _wait_for(handshakes, 2)
    assert handshakes == ["worker1", "worker1-renewed"]


def _wait_for(handshakes, count=1):
    """The listener records a handshake in its own thread, after the client may have given up."""
    for _ in range(100):
        if len(handshakes) >= count:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("with_certificate", [True, False])
def test_redis_py_shows_the_hosts_certificate_to_redis(config, mtls_config, mtls_server, with_certificate):
    """The result backend's connection options as Celery hands them to redis-py (the deployment's
    venv has it through celery[redis]; skipped where it is not installed)."""
    redis = pytest.importorskip("redis")
    port, handshakes = mtls_server()
    options = (mtls_config if with_certificate else config).tls_settings()["redis_backend_use_ssl"]
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, socket_timeout=5, retry=Retry(NoBackoff(), 0),
                         **options)
    with pytest.raises(redis.exceptions.ConnectionError):  # no Redis behind TLS
        client.ping()
    _wait_for(handshakes)
    if with_certificate:
        assert handshakes[0] == "worker1", handshakes
    else:
        assert handshakes[0].startswith("refused:") and "certificate" in handshakes[0].lower(), handshakes
