# -*- coding: utf-8 -*-
"""The Prometheus exporters of the stack's hosts (roles/prometheus_exporters).

- ``node_exporter_args``, ``redis_exporter_args``: the command line of Debian's
  prometheus-node-exporter and prometheus-redis-exporter (the ARGS of /etc/default/<package>),
  from the role's settings; no secret ever reaches them;
- ``systemd_env_value``: a value quoted for a systemd EnvironmentFile;
- ``tls_expiry_textfile``: the textfile-collector file with the notAfter of the host's
  certificate and of the CA that issued it.

Nothing here touches a host. Unit tests: tests/unit/plugins/filter/test_exporters.py.
"""

import ipaddress

from ansible.errors import AnsibleFilterError
from cryptography import x509


def _host_port(address, port):
    """address:port, an IPv6 address in brackets (Go's net.Listen syntax)."""
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]:{int(port)}"
    except ValueError:
        pass
    return f"{address}:{int(port)}"


def node_exporter_args(listen, port, collectors, textfile_dir, web_config=""):
    """Debian's node exporter, 1.5 (bookworm) and later: only the collectors listed (every other
    one off, whatever the version enables by default), the textfile collector's directory, and
    with TLS the web configuration file (--web.config.file: certificate, key, client CA)."""
    if not collectors:
        raise AnsibleFilterError("node_exporter_args: no collector to enable")
    args = ["--web.listen-address=" + _host_port(listen, port), "--collector.disable-defaults"]
    args += [f"--collector.{name}" for name in sorted(set(collectors))]
    if "textfile" in collectors:
        args.append("--collector.textfile.directory=" + textfile_dir)
    if web_config:
        args.append("--web.config.file=" + web_config)
    return args


def redis_exporter_args(listen, port, redis_addr, user, tls_files=None, key="", client_auth=True,
                        client_certificate=False):
    """Debian's redis exporter, 1.45 (bookworm) and later. The password is not among them (the
    exporter reads REDIS_PASSWORD from its EnvironmentFile).

    tls_files: {key, cert, ca} of the host (celery_stack__tls_files), empty without TLS; key: the
    exporter's own copy of the host's key (the unit's runtime directory). With TLS the exporter
    serves HTTPS with the host's certificate (and requires a client certificate of the CA when
    client_auth), and reaches Redis over TLS, checking its certificate against the CA, showing
    the host's certificate when Redis requires one (client_certificate)."""
    args = ["--web.listen-address=" + _host_port(listen, port), "--redis.addr=" + redis_addr,
            "--redis.user=" + user]
    if tls_files:
        if not redis_addr.startswith("rediss://"):
            raise AnsibleFilterError(f"redis_exporter_args: with TLS the Redis address must be rediss://, got "
                                     f"{redis_addr!r}")
        args += ["--tls-server-cert-file=" + tls_files["cert"], "--tls-server-key-file=" + key,
                 "--tls-server-min-version=TLS1.2", "--tls-ca-cert-file=" + tls_files["ca"]]
        if client_auth:
            args.append("--tls-server-ca-cert-file=" + tls_files["ca"])
        if client_certificate:
            args += ["--tls-client-cert-file=" + tls_files["cert"], "--tls-client-key-file=" + key]
    return args


def systemd_env_value(value):
    """A value for a systemd EnvironmentFile, double-quoted: backslash, quote, dollar and
    backtick escaped (systemd removes the escapes; shells reading the file see the same)."""
    value = str(value)
    if "\n" in value:
        raise AnsibleFilterError("systemd_env_value: a value with a line break cannot be written")
    for char in ("\\", '"', "$", "`"):
        value = value.replace(char, "\\" + char)
    return f'"{value}"'


def _certs(pem):
    return x509.load_pem_x509_certificates(pem.encode()) if pem and "-----BEGIN" in pem else []


def _not_after(cert):
    return int(cert.not_valid_after_utc.timestamp())


def tls_expiry_textfile(cert_pem, ca_pem):
    """A Prometheus textfile: the notAfter (unix seconds) of the host's certificate
    (certificate="host") and of the CA of the bundle that issued it (certificate="ca"; the first
    one of the bundle when none did). Empty when there is no certificate. Same input, same text,
    so writing it is idempotent."""
    host = _certs(cert_pem)
    cas = _certs(ca_pem)
    if not host:
        return ""
    leaf = host[0]
    issuer = next((ca for ca in cas if ca.subject == leaf.issuer), cas[0] if cas else None)
    name = "celery_stack_tls_certificate_not_after_timestamp_seconds"
    lines = [f"# HELP {name} notAfter of the TLS certificate this host uses (unix seconds), written by the "
             "prometheus_exporters role of celery-stack.",
             f"# TYPE {name} gauge",
             f'{name}{{certificate="host"}} {_not_after(leaf)}']
    if issuer is not None:
        lines.append(f'{name}{{certificate="ca"}} {_not_after(issuer)}')
    return "\n".join(lines) + "\n"


class FilterModule:
    def filters(self):
        return {"node_exporter_args": node_exporter_args, "redis_exporter_args": redis_exporter_args,
                "systemd_env_value": systemd_env_value, "tls_expiry_textfile": tls_expiry_textfile}
