"""Whether the deployment uses TLS on a host (celery_stack_tls: roles/tls puts the CA bundle there),
for the default scenario's tests, which the ssh scenario runs too (TLS on there)."""

# The deployment's CA bundle (roles/tls, tls_dir). With TLS, RabbitMQ and Redis have no plain
# port, also not on loopback: the tests speak TLS to 127.0.0.1, which the certificates name.
TLS_CA = "/etc/celery-stack/tls/ca.crt"
_TLS = {}


def tls_ca(host):
    """The CA bundle's path when the deployment uses TLS on this host, else "" (one look per host)."""
    name = host.backend.get_hostname()
    if name not in _TLS:
        _TLS[name] = TLS_CA if host.file(TLS_CA).exists else ""
    return _TLS[name]
