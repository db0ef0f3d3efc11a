# -*- coding: utf-8 -*-
"""The TLS role's decisions (roles/tls), as plain functions, on the controller.

- ``tls_names``: the subjectAltNames of a host's certificate from the internal CA (every name
  a client may use: the inventory name, ansible_host, celery_stack_address, extra names,
  loopback); ``tls_required_names``: the names a certificate of the user's own must cover;
- ``tls_renewal_reasons``: why a host's certificate must be issued again (none: keep it), so a
  run signs only what is missing, expiring, of another CA, for other names or another key;
- ``tls_files_problems``: the user's own CA bundle, certificate and key (tls_source files);
- ``tls_problems``: the role's settings beyond the argument specs;
- ``tls_pem``: PEM text as the role writes it (one trailing newline, however it was given).

Problems are messages naming the inventory variable and the fix, one broken rule each; none shows
a key. Certificates are parsed with python cryptography (the controller has it: community.crypto
needs it). Unit tests: tests/unit/plugins/filter/test_tls.py.
"""

import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

# A host reaches its own services on loopback (addresses.addresses gives 127.0.0.1 for the
# host itself), so a certificate that should also serve those connections names them.
LOOPBACK = ("localhost", "127.0.0.1", "::1")
# One DNS label (RFC 1123: letters, digits, inner hyphens; underscores tolerated, as in
# inventories); a name may start with one "*." (a wildcard, for certificates of the user's own
# and extra names).
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


# --- names -----------------------------------------------------------------------------------

def _ip(name):
    try:
        return ipaddress.ip_address(str(name).strip("[]"))
    except ValueError:
        return None


def _dns_ok(name):
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    return 0 < len(name) <= 253 and bool(labels) and all(_LABEL.match(label) for label in labels)


def san(name):
    """One subjectAltName entry as community.crypto writes it: IP:<address> or DNS:<name>
    (lower case, without a trailing dot). `name` may be an entry already (tls_names' output)."""
    name = str(name).strip()
    kind, _, rest = name.partition(":")
    if kind.upper() in ("DNS", "IP") and rest:
        name = rest
    address = _ip(name)
    if address is not None:
        return f"IP:{address.compressed}"
    return "DNS:" + str(name).strip().rstrip(".").lower()


def _sans(names):
    found = []
    for name in names:
        if name is None or str(name).strip() == "":
            continue
        entry = san(name)
        if entry not in found:
            found.append(entry)
    return found


def tls_names(inventory_hostname, ansible_host=None, address=None, extra=(), loopback=True):
    """The subjectAltNames of a host's certificate, first the inventory name, each once."""
    return _sans([inventory_hostname, ansible_host, address, *(extra or []), *(LOOPBACK if loopback else ())])


def tls_required_names(inventory_hostname, address=None, extra=()):
    """The names a certificate of the user's own must cover: the one the other hosts connect to
    (celery_stack_address, else the inventory name: see addresses.addresses) and the extra ones.
    Loopback and ansible_host (how Ansible connects, often a management address) are not asked
    for: an organisation's CA rarely signs them."""
    return _sans([address or inventory_hostname, *(extra or [])])


def _cert_sans(cert):
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return [san(v) for v in ext.get_values_for_type(x509.DNSName)] + \
           [f"IP:{v.compressed}" for v in ext.get_values_for_type(x509.IPAddress)]


def _covers(entries, wanted):
    """Does a certificate with these subjectAltNames serve `wanted` (one entry)? A wildcard
    covers exactly one leftmost label (RFC 6125)."""
    if wanted in entries:
        return True
    if not wanted.startswith("DNS:") or "." not in wanted:
        return False
    parent = wanted[4:].split(".", 1)[1]
    return f"DNS:*.{parent}" in entries


# --- time ------------------------------------------------------------------------------------

def _utc(now):
    """now(utc=true) gives a naive datetime in UTC; a string is ISO 8601."""
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if isinstance(now, str):
        now = datetime.datetime.fromisoformat(now.replace("Z", "+00:00"))
    if now.tzinfo is None:
        now = now.replace(tzinfo=datetime.timezone.utc)
    return now


def _day(moment):
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# --- certificates ----------------------------------------------------------------------------

def _certs(pem):
    """Every certificate of a PEM text ([] for none or an unreadable one)."""
    try:
        return x509.load_pem_x509_certificates(str(pem or "").encode("utf-8"))
    except ValueError:
        return []


def _public(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert, issuer):
    """Signed by issuer's key, with issuer's name (ValueError: another name; TypeError: a key type
    cryptography cannot check)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def tls_renewal_reasons(cert_pem, ca_pem, names, renew_days, now=None, csr_pem=None):
    """Why the certificate on a host must be issued again: [] keeps it.

    cert_pem: the host's certificate ("" when it has none); ca_pem: the internal CA's
    certificate (the host's must be signed by its key); names: the subjectAltNames it must carry,
    exactly (None: not compared, e.g. for the CA itself); renew_days: renew when it expires within
    that many days; now: the time (now(utc=true)); csr_pem: a request made with the host's
    current key (None: not compared), so a new key gets a certificate of its own."""
    certs = _certs(cert_pem)
    if not str(cert_pem or "").strip():
        return ["missing"]
    if not certs:
        return ["unreadable"]
    cert, reasons = certs[0], []
    cas = _certs(ca_pem)
    if ca_pem is not None and not (cas and _issued_by(cert, cas[0])):
        reasons.append("issued by another CA")
    expires = cert.not_valid_after_utc
    if expires - _utc(now) <= datetime.timedelta(days=int(renew_days)):
        reasons.append(f"expires {_day(expires)} (within {int(renew_days)} days)")
    if names is not None:
        have, want = _cert_sans(cert) or [], _sans(names)
        if sorted(have) != sorted(want):
            gone, new = sorted(set(have) - set(want)), sorted(set(want) - set(have))
            reasons.append("names changed (" + ", ".join([f"+{n}" for n in new] + [f"-{n}" for n in gone]) + ")")
    if csr_pem:
        csr = x509.load_pem_x509_csr(str(csr_pem).encode("utf-8"))
        if _public(csr.public_key()) != _public(cert.public_key()):
            reasons.append("another key")
    return reasons


def _chain_problem(leaf, intermediates, bundle, now):
    """None when leaf chains, through intermediates and the bundle, to a self-signed certificate of
    the bundle (what OpenSSL-based clients need by default: a CA file holding only an
    intermediate is not enough for them), else the problem."""
    current, pool, seen = leaf, list(intermediates) + list(bundle), 0
    while seen < 10:
        issuer = next((c for c in pool if c.subject == current.issuer and _issued_by(current, c)), None)
        if issuer is None and current is leaf:
            return "is not signed by a certificate of tls_files_ca (nor through the intermediates after it in " \
                   "tls_files_cert): give the CA bundle that issued it"
        if issuer is None:
            return f"chains to {current.subject.rfc4514_string()}, whose issuer {current.issuer.rfc4514_string()} " \
                   "is not in tls_files_ca: add that root"
        if issuer.not_valid_after_utc <= now:
            return f"chains to {issuer.subject.rfc4514_string()}, which expired {_day(issuer.not_valid_after_utc)}"
        if issuer.subject == issuer.issuer and _issued_by(issuer, issuer):
            if issuer in bundle:
                return None
            return f"chains to the root {issuer.subject.rfc4514_string()}, which is not in tls_files_ca: add it"
        current, seen = issuer, seen + 1
    return "has a chain longer than 10 certificates"


def tls_files_problems(ca_pem, cert_pem, key_pem, names, now=None, renew_days=0):
    """The user's own CA bundle, certificate (leaf first, intermediates after it) and key
    (tls_source files), one message per broken rule. The key is never shown. A certificate that
    expires within renew_days is refused too: the run cannot renew a certificate of the user's
    own, and one that ends in the coming days stops every client of the host then."""
    now, found = _utc(now), []
    bundle, certs = _certs(ca_pem), _certs(cert_pem)
    if not bundle:
        found.append("tls_files_ca holds no PEM certificate: give the CA bundle as PEM text or as the path of a "
                     "file on the controller")
    if not certs:
        found.append("tls_files_cert holds no PEM certificate: give the host's certificate as PEM text or as the "
                     "path of a file on the controller")
    key = None
    try:
        key = serialization.load_pem_private_key(str(key_pem or "").encode("utf-8"), password=None)
    except TypeError:
        found.append("tls_files_key is encrypted: the services read it at start, without a passphrase; give it "
                     "unencrypted (kept secret in the vault)")
    except (ValueError, UnsupportedAlgorithm):
        found.append("tls_files_key holds no readable PEM private key: give it as PEM text (from the vault) or "
                     "as the path of a file on the controller")
    if not certs:
        return found
    leaf = certs[0]
    if key is not None and _public(key.public_key()) != _public(leaf.public_key()):
        found.append("tls_files_cert does not match tls_files_key (another public key): give the pair that "
                     "belongs together")
    if leaf.not_valid_after_utc <= now:
        found.append(f"tls_files_cert expired {_day(leaf.not_valid_after_utc)}: renew it")
    elif renew_days and leaf.not_valid_after_utc <= now + datetime.timedelta(days=int(renew_days)):
        found.append(f"tls_files_cert expires {_day(leaf.not_valid_after_utc)}, within tls_renew_days "
                     f"({int(renew_days)}): renew it and give the new one")
    if bundle:
        problem = _chain_problem(leaf, certs[1:], bundle, now)
        if problem:
            found.append(f"tls_files_cert {problem}")
    have = _cert_sans(leaf)
    if have is None:
        found.append("tls_files_cert has no subjectAltName: clients match the host name against it (the common "
                     "name alone is ignored): have it issued with the host's names")
    else:
        missing = [n for n in _sans(names) if not _covers(have, n)]
        if missing:
            found.append(f"tls_files_cert does not name {', '.join(missing)} (it has {', '.join(have) or 'none'}): "
                         "have it issued for them, or set celery_stack_address / tls_extra_names to the names it has")
    return found


def tls_pem(text):
    """PEM text without surrounding blanks, ending with one newline ("" stays ""): a file lookup
    strips the last newline, the vault may keep it, and a file compared by checksum must come out
    the same each run."""
    text = str(text or "").strip()
    return text + "\n" if text else ""


# --- settings --------------------------------------------------------------------------------

def _repository(start):
    """The git work tree that holds `start` (a directory, or a .git file for a worktree), or None."""
    path = os.path.realpath(os.path.expanduser(str(start)))
    while True:
        if os.path.exists(os.path.join(path, ".git")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def tls_problems(settings, playbook_dir=None):
    """The role's settings (tls_* variables but the tls_files_* contents) beyond the argument
    specs. playbook_dir: where the run's playbook is; a tls_ca_dir inside the same git work tree
    is refused."""
    found = []
    days = {}
    for name in ("tls_renew_days", "tls_cert_days", "tls_ca_days"):
        value = settings.get(name)
        if isinstance(value, bool) or not str(value).strip().isdigit() or int(str(value)) < 1:
            found.append(f"{name} must be a whole number of days, at least 1, got {value!r}")
        else:
            days[name] = int(str(value))
    for name in ("tls_cert_days", "tls_ca_days"):
        if name in days and "tls_renew_days" in days and days[name] <= days["tls_renew_days"]:
            found.append(f"{name} ({days[name]}) must be greater than tls_renew_days ({days['tls_renew_days']}): "
                         "a certificate would be issued again on every run")
    tls_dir = str(settings.get("tls_dir") or "")
    if not tls_dir.startswith("/"):
        found.append(f"tls_dir must be an absolute path on the host, got {tls_dir!r}")
    for index, name in enumerate(settings.get("tls_extra_names") or []):
        if _ip(name) is None and not _dns_ok(str(name).strip().rstrip(".").lower()):
            found.append(f"tls_extra_names[{index}] {name!r} is neither a DNS name (a leading *. allowed) nor an "
                         "IP address")
    if settings.get("tls_source", "internal") == "internal" and playbook_dir:
        repository = _repository(playbook_dir)
        ca_dir = os.path.realpath(os.path.expanduser(str(settings.get("tls_ca_dir") or "")))
        if repository and (ca_dir + os.sep).startswith(repository.rstrip(os.sep) + os.sep):
            found.append(f"tls_ca_dir {settings.get('tls_ca_dir')!r} is inside the repository {repository}: a "
                         "commit, a copy of the repository or `git clean -x` would publish or delete the CA's key; "
                         "choose a directory outside it")
    return found


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (tls_names, tls_required_names, tls_renewal_reasons, tls_files_problems,
                                        tls_problems, tls_pem)}
