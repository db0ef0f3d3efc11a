"""Unit tests of the exporters' command lines and textfile (plugins/filter/exporters.py), run by
`make test`. The exporters themselves are scraped for real on the local stack and by the
scenarios' tests (molecule/default/tests/test_exporters.py)."""

import datetime
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import exporters  # noqa: E402

TLS = {"key": "/etc/celery-stack/tls/h.key", "cert": "/etc/celery-stack/tls/h.crt", "ca": "/etc/celery-stack/tls/ca.crt"}
START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def _cert(name, days, issuer=None, issuer_key=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(START)
            .not_valid_after(START + datetime.timedelta(days=days))
            .sign(issuer_key or key, hashes.SHA256()))
    return cert, key


def _pem(*certs):
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def test_the_node_exporter_runs_the_listed_collectors_only():
    args = exporters.node_exporter_args("10.0.0.5", 9100, ["textfile", "cpu", "meminfo", "cpu"],
                                        "/var/lib/prometheus/node-exporter", "/etc/prometheus/node-web.yml")
    assert args == ["--web.listen-address=10.0.0.5:9100", "--collector.disable-defaults", "--collector.cpu",
                    "--collector.meminfo", "--collector.textfile",
                    "--collector.textfile.directory=/var/lib/prometheus/node-exporter",
                    "--web.config.file=/etc/prometheus/node-web.yml"]


def test_the_node_exporter_without_tls_or_textfile():
    args = exporters.node_exporter_args("fd00::5", 9100, ["cpu"], "/var/lib/prometheus/node-exporter")
    assert args == ["--web.listen-address=[fd00::5]:9100", "--collector.disable-defaults", "--collector.cpu"]


def test_the_node_exporter_needs_a_collector():
    with pytest.raises(AnsibleFilterError, match="no collector"):
        exporters.node_exporter_args("10.0.0.5", 9100, [], "/x")


def test_the_redis_exporter_over_tls_requires_client_certificates_by_default():
    args = exporters.redis_exporter_args("10.0.0.6", 9121, "rediss://127.0.0.1:6379", "exporter", TLS,
                                         "/run/x/tls.key")
    assert args == ["--web.listen-address=10.0.0.6:9121", "--redis.addr=rediss://127.0.0.1:6379",
                    "--redis.user=exporter", "--tls-server-cert-file=" + TLS["cert"],
                    "--tls-server-key-file=/run/x/tls.key", "--tls-server-min-version=TLS1.2",
                    "--tls-ca-cert-file=" + TLS["ca"], "--tls-server-ca-cert-file=" + TLS["ca"]]


def test_the_redis_exporter_shows_the_hosts_certificate_to_redis_when_it_requires_one():
    args = exporters.redis_exporter_args("10.0.0.6", 9121, "rediss://127.0.0.1:6379", "exporter", TLS,
                                         "/run/x/tls.key", client_auth=False, client_certificate=True)
    assert "--tls-server-ca-cert-file=" + TLS["ca"] not in args
    assert args[-2:] == ["--tls-client-cert-file=" + TLS["cert"], "--tls-client-key-file=/run/x/tls.key"]


def test_the_redis_exporter_without_tls_has_no_tls_option_and_never_a_password():
    args = exporters.redis_exporter_args("10.0.0.6", 9121, "redis://127.0.0.1:6379", "exporter", {})
    assert args == ["--web.listen-address=10.0.0.6:9121", "--redis.addr=redis://127.0.0.1:6379",
                    "--redis.user=exporter"]
    assert not [a for a in args if "password" in a]


def test_the_redis_exporter_with_tls_refuses_a_plain_redis_address():
    with pytest.raises(AnsibleFilterError, match="rediss://"):
        exporters.redis_exporter_args("10.0.0.6", 9121, "redis://127.0.0.1:6379", "exporter", TLS, "/k")


@pytest.mark.parametrize("value, quoted", [
    ("plain-secret", '"plain-secret"'),
    ('a"b\\c$d`e', '"a\\"b\\\\c\\$d\\`e"'),
])
def test_a_systemd_environment_value_is_quoted(value, quoted):
    assert exporters.systemd_env_value(value) == quoted


def test_a_systemd_environment_value_has_one_line():
    with pytest.raises(AnsibleFilterError, match="line break"):
        exporters.systemd_env_value("two\nlines")


def test_the_tls_textfile_names_the_host_certificate_and_its_ca():
    other_ca, _ = _cert("Another CA", 3650)
    ca, ca_key = _cert("celery-stack CA", 3650)
    host, _ = _cert("h1", 365, ca, ca_key)
    text = exporters.tls_expiry_textfile(_pem(host), _pem(other_ca, ca))
    name = "celery_stack_tls_certificate_not_after_timestamp_seconds"
    host_end = int((START + datetime.timedelta(days=365)).timestamp())
    ca_end = int((START + datetime.timedelta(days=3650)).timestamp())
    assert f"# TYPE {name} gauge\n" in text
    assert f'{name}{{certificate="host"}} {host_end}\n' in text
    assert text.endswith(f'{name}{{certificate="ca"}} {ca_end}\n')
    # the same certificates give the same text (an unchanged file on the host)
    assert exporters.tls_expiry_textfile(_pem(host), _pem(other_ca, ca)) == text


def test_the_tls_textfile_takes_the_first_ca_when_none_issued_the_certificate():
    ca, _ = _cert("Some CA", 100)
    host, _ = _cert("h1", 10)
    text = exporters.tls_expiry_textfile(_pem(host), _pem(ca))
    assert f'{{certificate="ca"}} {int((START + datetime.timedelta(days=100)).timestamp())}' in text


def test_the_tls_textfile_is_empty_without_a_certificate():
    assert exporters.tls_expiry_textfile("", "") == ""
