"""Unit tests of the TLS role's decisions (plugins/filter/tls.py), run by `make test`.

Certificates are made here with python cryptography (a CA, an intermediate, hosts' keys), so each
rule is shown on real X.509: the renewal reasons (none on a good certificate), and one message per
mistake in a user's own CA bundle, certificate and key, naming the variable, never the key.
"""

import datetime
import ipaddress
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import tls  # noqa: E402

NOW = datetime.datetime(2027, 1, 1, 12, 0)  # what now(utc=true) gives: naive, in UTC
DAY = datetime.timedelta(days=1)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(*objects):
    out = ""
    for obj in objects:
        if isinstance(obj, x509.Certificate):
            out += obj.public_bytes(serialization.Encoding.PEM).decode()
        elif isinstance(obj, x509.CertificateSigningRequest):
            out += obj.public_bytes(serialization.Encoding.PEM).decode()
        else:
            out += obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
    return out


def _cert(subject_key, cn, issuer=None, issuer_key=None, names=None, days=365, start=NOW - DAY, ca=False):
    """A certificate for subject_key; self-signed without issuer."""
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer.subject if issuer else _name(cn))
               .public_key(subject_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names is not None:
        entries = [x509.IPAddress(ipaddress.ip_address(n[3:])) if n.startswith("IP:") else x509.DNSName(n[4:])
                   for n in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(issuer_key or subject_key, hashes.SHA256())


def _csr(key):
    return x509.CertificateSigningRequestBuilder().subject_name(_name("x")).sign(key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki():
    ca_key, other_key, inter_key, host_key = _key(), _key(), _key(), _key()
    ca = _cert(ca_key, "celery-stack CA", ca=True, days=3650)
    other = _cert(other_key, "Another CA", ca=True, days=3650)
    inter = _cert(inter_key, "Intermediate", ca, ca_key, ca=True, days=1000)
    names = ["DNS:mq1", "DNS:mq1.example.org", "IP:10.0.0.11"]
    return {"ca": ca, "ca_key": ca_key, "other": other, "other_key": other_key, "inter": inter,
            "inter_key": inter_key, "host_key": host_key, "names": names,
            "host": _cert(host_key, "mq1", ca, ca_key, names)}


# --- names -----------------------------------------------------------------------------------

def test_tls_names_lists_every_name_once_inventory_name_first():
    assert tls.tls_names("mq1", "10.0.0.11", "mq1.example.org", ["MQ.Example.org.", "10.0.0.11"]) == [
        "DNS:mq1", "IP:10.0.0.11", "DNS:mq1.example.org", "DNS:mq.example.org",
        "DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    assert tls.tls_names("mq1", None, "", [], loopback=False) == ["DNS:mq1"]
    assert tls.tls_names("mq1", "mq1", None, ["fd00:0::1"], False) == ["DNS:mq1", "IP:fd00::1"]


def test_tls_required_names_are_the_address_clients_use():
    assert tls.tls_required_names("mq1", "mq1.example.org", ["mq.example.org"]) == [
        "DNS:mq1.example.org", "DNS:mq.example.org"]
    assert tls.tls_required_names("mq1") == ["DNS:mq1"]


# --- renewal ---------------------------------------------------------------------------------

def test_a_good_certificate_is_kept(pki):
    assert tls.tls_renewal_reasons(_pem(pki["host"]), _pem(pki["ca"]), pki["names"], 30, NOW,
                                   _pem(_csr(pki["host_key"]))) == []
    # the same names in another order and spelling are the same names
    assert tls.tls_renewal_reasons(_pem(pki["host"]), _pem(pki["ca"]), ["10.0.0.11", "MQ1", "mq1.example.org."],
                                   30, NOW.isoformat() + "Z") == []


def test_missing_or_unreadable(pki):
    assert tls.tls_renewal_reasons("", _pem(pki["ca"]), pki["names"], 30, NOW) == ["missing"]
    assert tls.tls_renewal_reasons("garbage", _pem(pki["ca"]), pki["names"], 30, NOW) == ["unreadable"]


def test_expiring_within_renew_days(pki):
    short = _cert(pki["host_key"], "mq1", pki["ca"], pki["ca_key"], pki["names"], days=10)
    reasons = tls.tls_renewal_reasons(_pem(short), _pem(pki["ca"]), pki["names"], 30, NOW)
    assert len(reasons) == 1 and reasons[0].startswith("expires 2027-01-10") and "within 30 days" in reasons[0]
    assert tls.tls_renewal_reasons(_pem(short), _pem(pki["ca"]), pki["names"], 5, NOW) == []


def test_another_ca_names_or_key(pki):
    foreign = _cert(pki["host_key"], "mq1", pki["other"], pki["other_key"], pki["names"])
    assert tls.tls_renewal_reasons(_pem(foreign), _pem(pki["ca"]), pki["names"], 30, NOW) == ["issued by another CA"]
    assert tls.tls_renewal_reasons(_pem(pki["host"]), _pem(pki["ca"]), pki["names"][:2] + ["extra.example.org"],
                                   30, NOW) == ["names changed (+DNS:extra.example.org, -IP:10.0.0.11)"]
    assert tls.tls_renewal_reasons(_pem(pki["host"]), _pem(pki["ca"]), pki["names"], 30, NOW,
                                   _pem(_csr(_key()))) == ["another key"]


def test_a_ca_renewed_with_the_same_key_still_signs_the_old_certificates(pki):
    renewed = _cert(pki["ca_key"], "celery-stack CA", ca=True, days=3650, start=NOW)
    assert tls.tls_renewal_reasons(_pem(pki["host"]), _pem(renewed), pki["names"], 30, NOW) == []
    # the CA's own renewal: names not compared, signed by itself
    assert tls.tls_renewal_reasons(_pem(pki["ca"]), _pem(pki["ca"]), None, 30, NOW) == []
    assert tls.tls_renewal_reasons(_pem(pki["ca"]), _pem(pki["ca"]), None, 30, NOW + 3640 * DAY)[0].startswith(
        "expires")


# --- the user's own files --------------------------------------------------------------------

def test_good_files_give_no_problem(pki):
    assert tls.tls_files_problems(_pem(pki["ca"]), _pem(pki["host"]), _pem(pki["host_key"]), ["mq1.example.org"],
                                  NOW) == []
    # issued by an intermediate sent after the leaf; the bundle holds the root
    leaf = _cert(pki["host_key"], "mq1", pki["inter"], pki["inter_key"], ["DNS:*.example.org"])
    assert tls.tls_files_problems(_pem(pki["other"], pki["ca"]), _pem(leaf, pki["inter"]), _pem(pki["host_key"]),
                                  ["DNS:mq1.example.org"], NOW) == []


def one(found, *expected):
    assert len(found) == 1, found
    for text in expected:
        assert text in found[0], found
    return found[0]


def test_each_mistake_gives_one_message(pki):
    ca, host, key, names = _pem(pki["ca"]), _pem(pki["host"]), _pem(pki["host_key"]), ["mq1"]
    one(tls.tls_files_problems("", host, key, names, NOW), "tls_files_ca holds no PEM certificate")
    one(tls.tls_files_problems(ca, "/no/such/file", key, names, NOW), "tls_files_cert holds no PEM certificate")
    one(tls.tls_files_problems(ca, host, "", names, NOW), "tls_files_key holds no readable PEM private key")
    encrypted = pki["host_key"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"secret")).decode()
    one(tls.tls_files_problems(ca, host, encrypted, names, NOW), "tls_files_key is encrypted")
    one(tls.tls_files_problems(ca, host, _pem(_key()), names, NOW), "does not match tls_files_key")
    one(tls.tls_files_problems(_pem(pki["other"]), host, key, names, NOW),
        "tls_files_cert is not signed by a certificate of tls_files_ca")
    one(tls.tls_files_problems(ca, host, key, ["mq2.example.org", "mq1"], NOW),
        "tls_files_cert does not name DNS:mq2.example.org", "celery_stack_address")
    one(tls.tls_files_problems(ca, host, key, names, NOW + 400 * DAY), "tls_files_cert expired 2027-12-31")
    # the run cannot renew the user's own: one ending within tls_renew_days is refused, with the date
    one(tls.tls_files_problems(ca, host, key, names, NOW + 350 * DAY, 30), "tls_files_cert expires 2027-12-31",
        "within tls_renew_days (30)")
    assert tls.tls_files_problems(ca, host, key, names, NOW + 300 * DAY, 30) == []
    bare = _cert(pki["host_key"], "mq1", pki["ca"], pki["ca_key"], None)
    one(tls.tls_files_problems(ca, _pem(bare), key, names, NOW), "has no subjectAltName")
    # only the intermediate in the bundle: OpenSSL clients want the root
    leaf = _cert(pki["host_key"], "mq1", pki["inter"], pki["inter_key"], ["DNS:mq1"])
    one(tls.tls_files_problems(_pem(pki["inter"]), _pem(leaf), key, names, NOW), "is not in tls_files_ca: add that root")


def test_a_wildcard_covers_one_label_only(pki):
    leaf = _cert(pki["host_key"], "x", pki["ca"], pki["ca_key"], ["DNS:*.example.org"])
    args = (_pem(pki["ca"]), _pem(leaf), _pem(pki["host_key"]))
    assert tls.tls_files_problems(*args, ["mq1.example.org"], NOW) == []
    one(tls.tls_files_problems(*args, ["a.mq1.example.org"], NOW), "does not name DNS:a.mq1.example.org")
    one(tls.tls_files_problems(*args, ["example.org"], NOW), "does not name DNS:example.org")


def test_no_message_shows_the_key(pki):
    key = _pem(pki["host_key"])
    found = tls.tls_files_problems(_pem(pki["other"]), _pem(pki["host"]), key, ["nowhere"], NOW + 400 * DAY)
    assert len(found) == 3 and not any("PRIVATE" in m or key[40:80] in m for m in found)


def test_tls_pem_ends_with_one_newline():
    assert tls.tls_pem("  -----BEGIN X-----\nAA\n-----END X-----\n\n") == "-----BEGIN X-----\nAA\n-----END X-----\n"
    assert tls.tls_pem("-----END X-----") == "-----END X-----\n"
    assert tls.tls_pem("") == tls.tls_pem(None) == ""


# --- settings --------------------------------------------------------------------------------

SETTINGS = {"tls_source": "internal", "tls_renew_days": 30, "tls_cert_days": 365, "tls_ca_days": 3650,
            "tls_dir": "/etc/celery-stack/tls",
            "tls_extra_names": ["mq.example.org", "*.mq.example.org", "10.0.0.1", "::1"],
            "tls_ca_dir": "~/.local/share/celery-stack/ca/prod"}


def test_good_settings_give_no_problem(tmp_path):
    assert tls.tls_problems(SETTINGS, str(tmp_path)) == []


@pytest.mark.parametrize("change, expected", [
    ({"tls_renew_days": 0}, "tls_renew_days must be a whole number of days, at least 1"),
    ({"tls_cert_days": "many"}, "tls_cert_days must be a whole number"),
    ({"tls_cert_days": 30}, "tls_cert_days (30) must be greater than tls_renew_days (30)"),
    ({"tls_ca_days": 20}, "tls_ca_days (20) must be greater than tls_renew_days (30)"),
    ({"tls_dir": "tls"}, "tls_dir must be an absolute path"),
    ({"tls_extra_names": ["ok.example.org", "bad name"]}, "tls_extra_names[1] 'bad name' is neither"),
    ({"tls_extra_names": ["-bad.example.org"]}, "tls_extra_names[0]"),
])
def test_each_bad_setting_gives_one_message(change, expected):
    one(tls.tls_problems(dict(SETTINGS, **change)), expected)


def test_the_ca_directory_must_not_be_inside_the_repository(tmp_path):
    (tmp_path / ".git").write_text("gitdir: /elsewhere\n")  # a worktree's .git is a file
    (tmp_path / "playbooks").mkdir()
    inside = dict(SETTINGS, tls_ca_dir=str(tmp_path / "inventories/.ca"))
    one(tls.tls_problems(inside, str(tmp_path / "playbooks")), "is inside the repository", str(tmp_path))
    assert tls.tls_problems(dict(inside, tls_source="files"), str(tmp_path / "playbooks")) == []
    assert tls.tls_problems(dict(SETTINGS, tls_ca_dir=str(tmp_path) + "-ca"), str(tmp_path)) == []
