"""Each role's argument spec agrees with its defaults/main.yml, the source of truth of the defaults.

For every role of roles/ (entry point main of meta/argument_specs.yml; the other entry points
share its options through a YAML anchor):

- an option whose spec has a `default:` has exactly that value in defaults/main.yml (both
  YAML-loaded, so a template is compared as its text); a default that is a template belongs in
  defaults/main.yml only, without a `default:` in the spec;
- every variable of defaults/main.yml is an option of the spec (documented and validated, and
  known to the preflight's unknown-variable check).

Only the top-level options are compared: a sub-option's `default:` (celery_app_broker.vhost)
says what the role takes when an inventory gives the mapping without that key. Run by `make test`.
"""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[6]
ROLES = sorted(p.parent.parent for p in ROOT.glob("roles/*/meta/argument_specs.yml"))


def _load(path):
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _spec(role):
    return _load(role / "meta/argument_specs.yml")["argument_specs"]["main"].get("options") or {}


def _defaults(role):
    path = role / "defaults/main.yml"
    return _load(path) if path.exists() else {}


def _same(spec_value, default_value):
    """Equal values of the same types all the way down (True is not 1, 10.0 is not 10)."""
    if type(spec_value) is not type(default_value):
        return False
    if isinstance(spec_value, dict):
        return spec_value.keys() == default_value.keys() and all(
            _same(spec_value[k], default_value[k]) for k in spec_value)
    if isinstance(spec_value, list):
        return len(spec_value) == len(default_value) and all(map(_same, spec_value, default_value))
    return spec_value == default_value


def test_every_role_is_checked():
    assert {role.name for role in ROLES} >= {"celery_app", "celery_flower", "celery_stack", "celery_worker",
                                             "rabbitmq", "redis"}


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_a_spec_default_is_the_value_of_defaults_main(role):
    spec, defaults = _spec(role), _defaults(role)
    drift = {name: {"spec": option["default"], "defaults/main.yml": defaults.get(name, "<not set>")}
             for name, option in spec.items()
             if "default" in option and (name not in defaults or not _same(option["default"], defaults[name]))}
    assert drift == {}, f"{role.name}: fix meta/argument_specs.yml (defaults/main.yml is the source of truth)"


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_every_default_is_an_option_of_the_spec(role):
    assert sorted(set(_defaults(role)) - set(_spec(role))) == []


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_the_spec_says_where_the_defaults_live(role):
    text = (role / "meta/argument_specs.yml").read_text(encoding="utf-8")
    head = text.split("argument_specs:", 1)[0]
    assert "defaults/main.yml" in head, "a comment above argument_specs: points to defaults/main.yml"
