# -*- coding: utf-8 -*-
"""The preflight's rules beyond the argument specs (playbooks/preflight.yml), as plain functions.

Each function returns a list of messages: ONE broken rule per message, naming the inventory
variable the user wrote (not a role's internal list) and the fix. A message never shows a
secret's value. The argument specs (meta/argument_specs.yml, applied by Ansible on each role's
`validate` entry point) have checked the types before these run, but the specs validate without
converting the variables, so a value may still be a number where a string belongs: the rules
here say so instead of failing on it.

- ``known_variables``, ``unknown_variables``: variables with the bundle's prefixes that no role
  reads (a typo is otherwise silently ignored), with the closest known name;
- ``stack_problems``: the stack's users, secrets, vhost, host groups, routing patterns and TLS options;
- ``app_problems``: the application's account, environment and Celery settings;
- ``rabbitmq_problems``, ``rabbitmq_user_problems``, ``rabbitmq_cluster_problems``,
  ``served_versions``, ``version_problems``: the broker;
- ``redis_problems``, ``redis_user_problems``: the result store;
- ``worker_problems``, ``worker_warnings``: the worker hosts; ``flower_problems``: Flower.
"""

import difflib
import fnmatch
import ipaddress
import pathlib
import re

import yaml
from ansible_collections.celery_stack.core.plugins.module_utils.stack_description import (
    DEAD_LETTER_SUFFIX, POOLS, WORKER_GROUP, as_bool)
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

PREFIXES = ("celery_stack_", "celery_app_", "celery_worker_", "celery_flower_", "celery_monitoring_", "rabbitmq_",
            "redis_", "tls_", "prometheus_exporters_")
# Tags RabbitMQ knows (docs: management, "Management UI Access"); any other is ignored by it.
RABBITMQ_TAGS = ("administrator", "monitoring", "policymaker", "management", "impersonator")
RABBITMQ_USER = re.compile(r"^[A-Za-z0-9_.@-]+$")
REDIS_USER = re.compile(r"^[A-Za-z0-9._-]+$")
FLOWER_USER = re.compile(r"^[^:,\s]+$")
# Account names useradd accepts on Debian without --badname (and no more than 32 characters).
ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A Celery route pattern is a task name, or a glob where only "*" is special (MapRoute); these
# characters are regular-expression syntax that Celery would take literally.
REGEX_SYNTAX = re.compile(r"[\s^$()\[\]{}|+?\\]|^re:")


# ---------------------------------------------------------------------------------------------
# Shapes shared by the rules


def _kind(value):
    """A value's type in the inventory's words."""
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "string" if isinstance(value, str) else type(value).__name__


def _true(value):
    """A boolean setting as Ansible reads it (true, yes, on, 1; a template renders to text)."""
    return value is True or str(value).strip().lower() in ("true", "yes", "on", "1")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value):
    """An integer setting: int, or a string of digits (-e name=5 and quoted YAML give strings)."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def secret_problems(name, value, minimum, required=True):
    """A password or cookie: set, a string, long enough, one line. Never shows the value."""
    if value is None or value == "":
        return [f"{name} is not set: set it (at least {minimum} characters, from Vault)"] if required else []
    if _is_number(value):
        return [f"{name} is a number, not a string: quote it in the inventory (YAML reads an unquoted 1234 as "
                "a number and may change it, e.g. 0123 or 1e5)"]
    if not isinstance(value, str):
        return [f"{name} must be a string, got a {_kind(value)}"]
    found = []
    if len(value) < minimum:
        found.append(f"{name} is shorter than {minimum} characters: use a longer one (from Vault)")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        found.append(f"{name} contains a line break or another control character: the configuration files and "
                     "URLs it goes into cannot carry it (a YAML block scalar adds a final newline: use |- or quotes)")
    return found


def _name_problems(name, value, pattern, what):
    if not isinstance(value, str) or not value:
        return [f"{name} must be set to a {what}"]
    if not pattern.match(value):
        return [f"{name} {value!r} is not a valid {what}"]
    return []


def _at_least(settings, name, minimum, unit=""):
    value = settings.get(name)
    number = _int(value)
    if number is None:
        return [f"{name} must be a whole number, got {value!r}"]
    if number < minimum:
        return [f"{name} must be at least {minimum}{unit}, got {number}"]
    return []


def _not_negative(settings, name):
    """A duration in seconds that may have a fraction (0: off)."""
    try:
        if float(settings.get(name, 0)) >= 0:
            return []
    except (TypeError, ValueError):
        pass
    return [f"{name} must be a number of seconds, 0 or more, got {settings.get(name)!r}"]


def _absolute_paths(settings, names):
    found = []
    for name in names:
        value = settings.get(name)
        if name in settings and (not isinstance(value, str) or not value.startswith("/") or re.search(r"\s", value)
                                 or value.rstrip("/") == ""):
            found.append(f"{name} must be an absolute path without spaces (not /), got {value!r}")
    return found


def _named_entries(entries, variable, pattern, what):
    """Each entry of a list of named users with its index, name, the place messages name
    (`variable[i] (name)`) and the problems of its name: valid, and given once in the list."""
    names = [e.get("name") for e in entries or []]
    for index, entry in enumerate(entries or []):
        name = entry.get("name")
        where = f"{variable}[{index}] ({name})"
        found = _name_problems(f"{variable}[{index}].name", name, pattern, what)
        if names.count(name) > 1 and names.index(name) < index:
            found.append(f"{where}: the name appears twice in {variable}")
        yield index, entry, name, where, found


def _config_problems(name, mapping, key_pattern, what):
    """A mapping rendered one `key = value` (or KEY=value) line each."""
    if not isinstance(mapping, dict):
        return [f"{name} must be a mapping, got a {_kind(mapping)}"]
    found = []
    for key, value in mapping.items():
        if not isinstance(key, str) or not re.match(key_pattern, key):
            found.append(f"{name}: {key!r} is not {what}")
        if isinstance(value, (dict, list)):
            found.append(f"{name}.{key} must be a single value (a string, number or boolean), got a "
                         f"{_kind(value)}")
        elif value is not None and re.search(r"[\n\r\x00]", str(value)):
            found.append(f"{name}.{key} contains a line break: each setting is one line (a YAML block scalar "
                         "adds a final newline: use |- or quotes)")
    return found


# ---------------------------------------------------------------------------------------------
# Unknown variables


def known_variables(roles_dir):
    """The variables the roles read: every option of every entry point of the argument specs of
    the roles in `roles_dir` (on the controller), so the list cannot drift from what is
    documented and validated."""
    known = set()
    for path in sorted(pathlib.Path(roles_dir).glob("*/meta/argument_specs.yml")):
        text = path.read_text(encoding="utf-8")
        for entry in (yaml.safe_load(text) or {}).get("argument_specs", {}).values():
            known.update((entry or {}).get("options") or {})
    return sorted(known)


def unknown_variables(names, known, allowed=()):
    """Variables with one of the bundle's prefixes that no role reads. A role's internal
    variables (``role__name``) are the roles' own. allowed: names or regular expressions
    (celery_stack_preflight_allowed_variables) for another role's variables that share a prefix."""
    found = []
    known = set(known)
    for name in sorted(set(names)):
        if not name.startswith(PREFIXES) or "__" in name or name in known:
            continue
        if any(name == a or re.fullmatch(a, name) for a in allowed or ()):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "no variable of the bundle is close to it."
        found.append(f"{name} is not a variable of celery-stack: {hint} (A variable of another role that shares "
                     "the prefix: list it in celery_stack_preflight_allowed_variables.)")
    return found


# ---------------------------------------------------------------------------------------------
# The stack description (celery_stack_*)


def stack_problems(stack, groups):
    """The stack's users, secrets, vhost, host groups and retries.

    stack: the celery_stack_* variables as the inventory gives them (name -> value)."""
    found = []
    broker = stack.get("celery_stack_broker", "rabbitmq")
    backend = stack.get("celery_stack_result_backend", "redis")
    producers = list(groups.get("celery_producers", []))

    both = [h for h in groups.get(WORKER_GROUP, []) if h in producers]
    if both:
        found.append(f"{', '.join(both)}: in both groups celery_workers and celery_producers. A worker host "
                     "already sends tasks with the workers' settings; a producer host runs no worker and gets "
                     "the producers' narrower user. Put each host in one of the two groups")

    for name in ("celery_stack_network_retries", "celery_stack_network_retry_delay"):
        if name in stack:
            found += _at_least(stack, name, 0)

    # Client certificates are a TLS handshake's: without TLS there is none to require.
    if as_bool(stack.get("celery_stack_tls_client_certificates")) and not as_bool(stack.get("celery_stack_tls")):
        found.append("celery_stack_tls_client_certificates is on while celery_stack_tls is off: client certificates "
                     "need TLS; set celery_stack_tls: true or celery_stack_tls_client_certificates: false")

    vhost = stack.get("celery_stack_broker_vhost", "celery")
    if broker == "rabbitmq":
        if not isinstance(vhost, str) or not vhost:
            found.append("celery_stack_broker_vhost must be a non-empty vhost name, e.g. celery")
        elif re.search(r"[\s\x00-\x1f]", vhost):
            found.append(f"celery_stack_broker_vhost {vhost!r} contains a space or a control character: "
                         "use a name without them, e.g. celery")

    for name in ("celery_stack_address", "celery_stack_listen_address"):
        value = stack.get(name)
        if value not in (None, "") and (not isinstance(value, str) or not re.match(r"^[A-Za-z0-9.:_-]+$", value)):
            found.append(f"{name} {value!r} must be a host name or an IP address")
    listen = stack.get("celery_stack_listen_address")
    if isinstance(listen, str) and listen:
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            found.append(f"celery_stack_listen_address {listen!r} must be an IP address (Redis binds to addresses)")

    # Users: each account name is stated once and belongs to one client.
    if broker == "rabbitmq":
        user = stack.get("celery_stack_broker_user", "celery")
        found += _name_problems("celery_stack_broker_user", user, RABBITMQ_USER,
                                "RabbitMQ user name (letters, digits, _ . @ -)")
        found += secret_problems("celery_stack_broker_password", stack.get("celery_stack_broker_password"), 8)
        if producers:
            producer = stack.get("celery_stack_producer_user", "celery-producer")
            found += _name_problems("celery_stack_producer_user", producer, RABBITMQ_USER,
                                    "RabbitMQ user name (letters, digits, _ . @ -)")
            if producer == user:
                found.append(f"celery_stack_producer_user is {producer!r}, the same as celery_stack_broker_user: "
                             "the producers get a user of their own that may only publish; give it another name")
            found += secret_problems("celery_stack_producer_password", stack.get("celery_stack_producer_password"),
                                     8)
    elif backend == "rpc":
        found.append("celery_stack_result_backend rpc sends results over the RabbitMQ broker: with "
                     "celery_stack_broker redis, use the redis result backend")

    redis_users = []
    if backend == "redis":
        redis_users.append(("celery_stack_redis_results_user", stack.get("celery_stack_redis_results_user",
                                                                           "celery-results")))
        found += secret_problems("celery_stack_redis_results_password",
                                 stack.get("celery_stack_redis_results_password"), 16)
    if broker == "redis":
        redis_users.append(("celery_stack_redis_broker_user", stack.get("celery_stack_redis_broker_user", "")))
        found += secret_problems("celery_stack_redis_broker_password",
                                 stack.get("celery_stack_redis_broker_password"), 16)
    # The exporters (celery_stack_exporters) on a stack with Redis: redis_exporter's own ACL user.
    if as_bool(stack.get("celery_stack_exporters")) and groups.get("redis"):
        redis_users.append(("celery_stack_redis_exporter_user", stack.get("celery_stack_redis_exporter_user",
                                                                           "celery-stack-exporter")))
        found += secret_problems("celery_stack_redis_exporter_password",
                                 stack.get("celery_stack_redis_exporter_password"), 16)
    for name, value in redis_users:
        found += _name_problems(name, value, REDIS_USER, "Redis ACL user name (letters, digits, . _ -)")
        if value == "default":
            found.append(f"{name} is 'default', Redis's default user (switched off): give the application's user "
                         "a name of its own")
    for i, (name, value) in enumerate(redis_users):
        for other, other_value in redis_users[i + 1:]:
            if value == other_value:
                found.append(f"{other} and {name} are the same name: each client of Redis gets a user of its "
                             "own, with different key and command rights")

    # One secret, one use: a leaked producer password must not open the workers' user.
    secrets = [(n, stack.get(n)) for n in ("celery_stack_broker_password", "celery_stack_producer_password",
                                             "celery_stack_redis_results_password",
                                             "celery_stack_redis_broker_password",
                                             "celery_stack_redis_exporter_password")]
    secrets = [(n, v) for n, v in secrets if isinstance(v, str) and v]
    for i, (name, value) in enumerate(secrets):
        for other, other_value in secrets[i + 1:]:
            if value == other_value:
                found.append(f"{other} is the same as {name}: give each user a password of its own")
    return found


def table_shape_problems(queues):
    """The routing table's shape, before the argument spec reads it (the spec's own message for
    a list where a mapping belongs does not name the variable)."""
    if not isinstance(queues, list):
        return [f"celery_stack_queues must be a list of queues (- name: io ...), got a {_kind(queues)}"]
    found = []
    for index, queue in enumerate(queues):
        if not isinstance(queue, dict):
            found.append(f"celery_stack_queues[{index}] must be a mapping (name:, tasks:, pools: ...), got a "
                         f"{_kind(queue)}")
            continue
        where = f"celery_stack_queues[{index}] ({queue.get('name')})"
        pools = queue.get("pools")
        if pools is not None and not isinstance(pools, dict):
            found.append(f"{where}.pools must be a mapping of pool name to settings ({{prefork: {{concurrency: 2}}}}), "
                         f"got a {_kind(pools)}")
        for pool, settings in (pools or {}).items() if isinstance(pools, dict) else ():
            if settings is not None and not isinstance(settings, dict):
                found.append(f"{where}.pools.{pool} must be a mapping of settings ({{concurrency: 2}}), got a "
                             f"{_kind(settings)}")
    return found


def route_pattern_problems(queues):
    """Task patterns Celery would not read as their author meant: regular-expression syntax
    (Celery's routes match a task name exactly, or a glob where only "*" is special); and queue
    names the broker or the bundle keeps for themselves."""
    found = []
    names = [q.get("name") for q in queues if isinstance(q, dict)] if isinstance(queues, list) else []
    for index, queue in enumerate(queues if isinstance(queues, list) else []):
        if not isinstance(queue, dict):
            continue
        name = str(queue.get("name"))
        if name.startswith("amq."):
            found.append(f"celery_stack_queues[{index}].name {name!r}: RabbitMQ keeps names starting with amq. for "
                         "itself (declaring one is refused); choose another name")
        if name.endswith(DEAD_LETTER_SUFFIX) and name[:-len(DEAD_LETTER_SUFFIX)] in names:
            found.append(f"celery_stack_queues[{index}].name {name!r} is the dead-letter queue of queue "
                         f"{name[:-len(DEAD_LETTER_SUFFIX)]} (poison tasks go there): choose another name")
        if not isinstance(queue.get("tasks"), list):
            continue
        for pattern in queue["tasks"]:
            if not isinstance(pattern, str) or not pattern.strip():
                found.append(f"celery_stack_queues[{index}] ({queue.get('name')}).tasks: {pattern!r} is not a task "
                             "name or glob")
            elif REGEX_SYNTAX.search(pattern):
                found.append(f"celery_stack_queues[{index}] ({queue.get('name')}).tasks: {pattern!r} looks like a "
                             "regular expression, which this table does not take: give a task name "
                             "(app.tasks.crawl) or a glob where only * is special (app.tasks.crawl_*)")
    return found


# ---------------------------------------------------------------------------------------------
# The application (celery_app_*)


def environment_problems(name, environment):
    """An environment mapping written into a systemd EnvironmentFile: NAME=value lines."""
    return _config_problems(name, environment, ENV_KEY.pattern, "an environment variable name (letters, digits "
                            "and _, not starting with a digit)")


def app_problems(app, quorum=None):
    """The celery_app_* variables as the inventory gives them (name -> value). quorum: the
    stack's decision on the routed queues' type (celery_stack__quorum_queues), which
    celery_app_broker.quorum may repeat but not contradict."""
    found = []
    for name in ("celery_app_user", "celery_app_group"):
        value = app.get(name)
        found += _name_problems(name, value, ACCOUNT, "Linux account name (lower-case letters, digits, _ -, at "
                                "most 32 characters, not starting with a digit or -)")
        if value == "root":
            found.append(f"{name} is root: the workers run the application's code, never as root; use an account "
                         "of its own (the default, celery)")
    for name in ("celery_app_environment", "celery_app_pip_environment"):
        if name in app:
            found += environment_problems(name, app[name])
    version = str(app.get("celery_app_celery_version", "5.7.0"))
    try:
        if Version(version).major != 5:
            found.append(f"celery_app_celery_version {version!r}: the roles are written for Celery 5 (5.7 tested)")
    except InvalidVersion:
        found.append(f"celery_app_celery_version {version!r} is not an exact version such as 5.7.0")
    for extra in app.get("celery_app_celery_extras") or []:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", str(extra)):
            found.append(f"celery_app_celery_extras: {extra!r} is not an extra's name such as redis")
    for package in app.get("celery_app_pip_packages") or []:
        # URLs, paths and VCS references are pip's to read; a requirement must parse.
        if isinstance(package, str) and not re.search(r"://|^[./~]|^git\+", package):
            try:
                Requirement(package)
            except InvalidRequirement as error:
                found.append(f"celery_app_pip_packages: {package!r} is not a pip requirement ({error})")
    found += _absolute_paths(app, ("celery_app_base_dir", "celery_app_venv", "celery_app_home",
                                   "celery_app_config_dir"))
    for name in ("celery_app_soft_shutdown_timeout", "celery_app_redis_visibility_timeout"):
        if name in app:
            found += _not_negative(app, name)
    for unit in app.get("celery_app_services") or []:
        if not isinstance(unit, str) or not re.match(r"^[A-Za-z0-9@._:\\-]+$", unit):
            found.append(f"celery_app_services: {unit!r} is not a systemd unit name such as gunicorn.service")
        elif unit.startswith(("celery-worker", "celery-beat", "celery-flower")):
            found.append(f"celery_app_services: {unit!r} is the bundle's own unit, restarted one at a time by its "
                         "role: leave it out")
    broker, backend = app.get("celery_app_broker") or {}, app.get("celery_app_result_backend") or {}
    if not broker.get("hosts"):
        found.append(f"celery_app_broker.hosts is empty: the inventory group {broker.get('type')} has no host (or "
                     "set celery_app_broker.hosts)")
    if not broker.get("user") or not broker.get("password"):
        found.append("celery_app_broker needs the broker user and password (celery_stack_broker_user and _password; "
                     "on producer hosts celery_stack_producer_user and _password)")
    if backend.get("type") == "redis" and (not backend.get("user") or not backend.get("password")):
        found.append("celery_app_result_backend of type redis needs the results user and password "
                     "(celery_stack_redis_results_user and _password)")
    if backend.get("type") == "rpc" and broker.get("type") != "rabbitmq":
        found.append("celery_app_result_backend of type rpc needs the RabbitMQ broker")
    if quorum is not None and broker.get("type") == "rabbitmq" \
            and as_bool(broker.get("quorum"), as_bool(quorum)) != as_bool(quorum):
        found.append(f"celery_app_broker.quorum is {broker['quorum']!r}, but the stack's routed queues are "
                     f"{'quorum' if as_bool(quorum) else 'classic'} queues (celery_stack_quorum_queues; unset: quorum "
                     "with more than one host in the group rabbitmq): the workers declare the queues of the one "
                     "table the brokers check. Set celery_stack_quorum_queues (or a queue's queue_type) and leave "
                     "celery_app_broker.quorum out")
    found += _at_least(app, "celery_app_prefetch_multiplier", 1)
    found += _at_least(app, "celery_app_task_worker_lost_limit", 0)
    found += _at_least(app, "celery_app_releases_kept", 1)
    return found


# ---------------------------------------------------------------------------------------------
# RabbitMQ (rabbitmq_*)


# The limits of the stack's vhost and users (roles/rabbitmq, tasks/limits.yml).
BROKER_LIMITS = ("rabbitmq_vhost_max_connections", "rabbitmq_vhost_max_queues", "rabbitmq_app_user_max_connections",
                 "rabbitmq_app_user_max_channels", "rabbitmq_producer_user_max_connections",
                 "rabbitmq_producer_user_max_channels")


def rabbitmq_problems(settings):
    """The broker's own settings (the rabbitmq_* variables, name -> value), one rule each."""
    found = []
    if settings.get("rabbitmq_repository_preset") == "custom":
        for name, example in (("rabbitmq_repository_custom_url", "the mirror's base URL, e.g. "
                                                                  "http://mirror.example.internal"),
                              ("rabbitmq_repository_custom_key_url", "the URL of its armored public key")):
            if not re.match(r"^(https?|file)://\S+$", str(settings.get(name) or "")):
                found.append(f"{name} must be an http(s):// or file:// URL with rabbitmq_repository_preset custom "
                             f"({example}), got {settings.get(name)!r}")
        fingerprint = str(settings.get("rabbitmq_repository_custom_key_fingerprint") or "").replace(" ", "")
        if not re.match(r"^[0-9A-Fa-f]{40}$", fingerprint):
            found.append("rabbitmq_repository_custom_key_fingerprint must be the key's full fingerprint, 40 hex "
                         "digits (gpg --show-keys KEYFILE), with rabbitmq_repository_preset custom")
    version, erlang = str(settings.get("rabbitmq_version")), str(settings.get("rabbitmq_erlang_version"))
    if not re.match(r"^([0-9]+:)?[0-9]+\.[0-9*]\S*$", version):
        found.append(f"rabbitmq_version {version!r} must be an apt version pattern starting with the major and "
                     "minor version, e.g. \"4.1.4-1\" or \"4.1.*\"")
    if not re.match(r"^[0-9]+:[0-9]+\S*$", erlang):
        found.append(f"rabbitmq_erlang_version {erlang!r} must be an apt version pattern WITH the Erlang epoch, e.g. "
                     "\"1:27.3.*\" (without \"1:\" it matches no Erlang package)")
    else:
        major = re.match(r"^([0-9]+:)?([0-9]+)", version)
        if major and int(major.group(2)) >= 4 and int(re.match(r"^[0-9]+:([0-9]+)", erlang).group(1)) < 26:
            found.append(f"rabbitmq_erlang_version {erlang!r}: RabbitMQ {version} needs Erlang 26.2 or later")
    watermark = settings.get("rabbitmq_vm_memory_high_watermark")
    try:
        if not 0.0 < float(watermark) <= 1.0:
            raise ValueError
    except (TypeError, ValueError):
        found.append(f"rabbitmq_vm_memory_high_watermark must be a fraction of RAM above 0 and at most 1 "
                     f"(0.4 to 0.7 advised), got {watermark!r}")
    disk = str(settings.get("rabbitmq_disk_free_limit"))
    if not re.match(r"^[0-9]+([kKmMgGtT][bB]?|[kKmMgG]i[bB])?$", disk):
        found.append(f"rabbitmq_disk_free_limit must be bytes with an optional unit, e.g. 2GB, got {disk!r}")
    found += _at_least(settings, "rabbitmq_consumer_timeout", 1000, " ms")
    found += _at_least(settings, "rabbitmq_limit_nofile", 1024)
    found += _at_least(settings, "rabbitmq_cluster_wait_retries", 1)
    # -1 is RabbitMQ's "no limit"; 0 refuses every connection (channel, queue) of the stack.
    for name in BROKER_LIMITS:
        if name in settings:
            value = _int(settings[name])
            if value is None or value == 0 or value < -1:
                found.append(f"{name} must be -1 (no limit) or at least 1, got {settings[name]!r}: 0 would refuse "
                             "every connection, channel or queue of the stack")
    ports = {}
    for name in ("rabbitmq_amqp_port", "rabbitmq_management_port", "rabbitmq_prometheus_port"):
        if name in settings:
            port = _int(settings[name])
            if port is None or not 1 <= port <= 65535:
                found.append(f"{name} must be a port number (1-65535), got {settings[name]!r}")
            elif port in ports:
                found.append(f"{name} is {port}, the port of {ports[port]}: each listener needs a port of its own")
            else:
                ports[port] = name
    if "rabbitmq_config_extra" in settings:
        found += _config_problems("rabbitmq_config_extra", settings["rabbitmq_config_extra"],
                                  r"^[A-Za-z0-9_.$-]+$", "a rabbitmq.conf key such as log.console.level")
    if "rabbitmq_env_extra" in settings:
        found += _config_problems("rabbitmq_env_extra", settings["rabbitmq_env_extra"], ENV_KEY.pattern,
                                  "an environment variable name such as RABBITMQ_LOGS")
    nodename = str(settings.get("rabbitmq_nodename", "rabbit"))
    if not re.match(r"^[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?$", nodename):
        found.append(f"rabbitmq_nodename must be a node name such as rabbit or rabbit@host, got {nodename!r}")
    for plugin in settings.get("rabbitmq_plugins") or []:
        if not re.match(r"^[a-z0-9_]+$", str(plugin)):
            found.append(f"rabbitmq_plugins: {plugin!r} is not a plugin name such as rabbitmq_management")
    for user in settings.get("rabbitmq_loopback_users") or []:
        if not RABBITMQ_USER.match(str(user)):
            found.append(f"rabbitmq_loopback_users: {user!r} is not a user name")
    for index, vhost in enumerate(settings.get("rabbitmq_vhosts") or []):
        if not isinstance(vhost, str) or not vhost or re.search(r"[\s\x00-\x1f]", vhost):
            found.append(f"rabbitmq_vhosts[{index}] {vhost!r}: a vhost name is non-empty, without spaces")
    if _true(settings.get("rabbitmq_inter_node_tls")) and not _true(settings.get("celery_stack_tls")):
        found.append("rabbitmq_inter_node_tls needs celery_stack_tls: Erlang distribution over TLS uses the host "
                     "certificates that the tls play makes only when celery_stack_tls is on")
    cookie = settings.get("rabbitmq_erlang_cookie")
    if cookie not in (None, ""):
        if not isinstance(cookie, str) or not re.match(r"^[A-Za-z0-9]{20,255}$", cookie):
            found.append("rabbitmq_erlang_cookie must be 20 to 255 letters and digits, the same on every node "
                         "(or empty on a single node)")
    return found


def _permission_problems(where, permissions, vhosts):
    found = []
    by_vhost = {}
    for index, entry in enumerate(permissions or []):
        vhost = entry.get("vhost")
        pwhere = f"{where}.permissions[{index}]"
        if vhost not in vhosts:
            found.append(f"{pwhere}.vhost {vhost!r} is not a vhost of the broker: add it to rabbitmq_vhosts (the "
                         f"stack's is celery_stack_broker_vhost; \"/\" always exists)")
        for kind in ("configure", "write", "read"):
            regex = entry.get(kind, "^$")
            if not isinstance(regex, str):
                found.append(f"{pwhere}.{kind} must be a regular expression string, got {regex!r}")
                continue
            if re.search(r"\s", regex):
                found.append(f"{pwhere}.{kind} {regex!r} contains a space: rabbitmqctl takes each regex as one "
                             "argument; use \\s or [ ]")
                continue
            try:
                re.compile(regex)
            except re.error as error:
                found.append(f"{pwhere}.{kind} {regex!r} is not a regular expression ({error})")
        normal = {k: entry.get(k, "^$") for k in ("configure", "write", "read")}
        if vhost in by_vhost and by_vhost[vhost] != normal:
            found.append(f"{pwhere}: a second, different entry for vhost {vhost!r} (RabbitMQ keeps one set of "
                         "permissions per user and vhost): merge the two entries")
        by_vhost.setdefault(vhost, normal)
    return found


def rabbitmq_user_problems(users, vhosts, reserved=(), remove_guest=True):
    """rabbitmq_users (the inventory's own users; the stack's users are checked by
    stack_problems). vhosts: every vhost the broker gets, "/" included. reserved: the names of
    the stack's own users."""
    found = []
    for _, user, name, where, name_problems in _named_entries(users, "rabbitmq_users", RABBITMQ_USER,
                                                              "RabbitMQ user name (letters, digits, _ . @ -)"):
        found += name_problems
        if name in reserved:
            found.append(f"{where}: the name is already one of the stack's users (celery_stack_broker_user, "
                         "celery_stack_producer_user): give it another name")
        if name == "guest" and remove_guest:
            found.append(f"{where}: guest is removed while rabbitmq_remove_guest is true: use another name")
        found += secret_problems(f"{where}.password", user.get("password"), 8)
        for tag in user.get("tags") or []:
            if tag not in RABBITMQ_TAGS:
                found.append(f"{where}.tags: {tag!r} is not a RabbitMQ user tag (one of {', '.join(RABBITMQ_TAGS)}; "
                             "administrator is the one with every right)")
        found += _permission_problems(where, user.get("permissions"), vhosts)
    return found


def rabbitmq_cluster_problems(nodes, node, cookie):
    """A node of a cluster (2+ nodes): the node names and the shared cookie."""
    found = []
    for name in nodes:
        if not re.match(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+$", str(name)):
            found.append(f"rabbitmq_cluster_nodes: {name!r} is not a node name such as rabbit@host")
    if len(set(nodes)) != len(nodes):
        found.append(f"rabbitmq_cluster_nodes lists a node twice: {', '.join(nodes)}")
    if node not in nodes:
        found.append(f"this broker's node {node} is not among the cluster's nodes ({', '.join(nodes)}): fix "
                     "rabbitmq_cluster_nodes or rabbitmq_nodename (by default the nodes come from the group rabbitmq)")
    if not cookie:
        found.append("rabbitmq_erlang_cookie must be set when there is more than one broker (20 to 255 letters and "
                     "digits, the same on every node, from Vault)")
    return found


def served_versions(madison, package, uris):
    """`apt-cache madison PACKAGE...` output -> the versions of `package` served from one of these
    repository URIs (a source configured already; Debian's own archive serves other versions)."""
    versions = []
    for line in (madison or "").splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 3 and parts[0] == package and any(parts[2].startswith(u.rstrip("/")) for u in uris or ()):
            versions.append(parts[1])
    return versions


def version_problems(pattern, served, name):
    """The apt pin pattern (a version glob) against the versions the configured repository serves
    (served_versions); nothing to say when the repository is not configured yet."""
    if not served or any(fnmatch.fnmatchcase(v, str(pattern)) for v in served):
        return []
    return [f"{name} {pattern!r} matches no version the configured repository serves (it has "
            f"{', '.join(sorted(set(served))[-5:])}): set {name} to a pattern that matches one of them"]


# ---------------------------------------------------------------------------------------------
# Redis (redis_*)


def redis_problems(settings):
    found = []
    if not settings.get("redis_bind"):
        found.append("redis_bind must list at least one address")
    for address in settings.get("redis_bind") or []:
        try:
            if str(address).lstrip("-") != "*":
                ipaddress.ip_address(str(address).lstrip("-"))
        except ValueError:
            found.append(f"redis_bind: {address!r} is not an IP address (a leading - marks one that may be missing)")
    for rule in settings.get("redis_save") or []:
        if not re.match(r"^[0-9]+ +[0-9]+$", str(rule).strip()):
            found.append(f"redis_save: {rule!r} is not a snapshot rule \"SECONDS CHANGES\" such as \"3600 1\"")
    port = _int(settings.get("redis_port"))
    if port is None or not 1 <= port <= 65535:
        found.append(f"redis_port must be a port number (1-65535), got {settings.get('redis_port')!r}")
    if not re.match(r"^[0-9]+([kmg]b?)?$", str(settings.get("redis_maxmemory")), re.IGNORECASE):
        found.append(f"redis_maxmemory must be a number with an optional kb/mb/gb unit, e.g. 512mb, got "
                     f"{settings.get('redis_maxmemory')!r}")
    found += _at_least(settings, "redis_databases", 1)
    admin = settings.get("redis_admin_user")
    found += _name_problems("redis_admin_user", admin, REDIS_USER, "Redis ACL user name (letters, digits, . _ -)")
    if admin == "default":
        found.append("redis_admin_user must not be \"default\": the default user is switched off")
    found += secret_problems("redis_admin_password", settings.get("redis_admin_password"), 16)
    return found


def redis_user_problems(users, presets, admin="admin", reserved=()):
    """redis_users (the inventory's own; the stack's users' names and passwords are checked by
    stack_problems). reserved: {the variable that names a user of the stack: its name}; neither may
    take the admin's name."""
    found = [f"{variable} is {name!r}, the name of redis_admin_user: give the application's user a name of its own"
             for variable, name in sorted((reserved or {}).items()) if name == admin]
    admin_in_list = [i for i, u in enumerate(users or []) if u.get("name") == admin]
    found += [f"redis_users[{i}] ({admin}): the name is redis_admin_user's: use another name" for i in admin_in_list]
    for _, user, name, where, name_problems in _named_entries(users, "redis_users", REDIS_USER,
                                                              "Redis ACL user name (letters, digits, . _ -)"):
        found += name_problems
        if name == "default":
            found.append(f"{where}: the name is Redis's default user (switched off): use another name")
        taken = [variable for variable, value in sorted((reserved or {}).items()) if value == name]
        if taken:
            found.append(f"{where}: the name is already the stack's user ({taken[0]}): give it another name")
        found += secret_problems(f"{where}.password", user.get("password"), 16)
        if "preset" in user and user["preset"] not in presets:
            found.append(f"{where}.preset {user['preset']!r} is not one of redis_acl_presets: "
                         f"{', '.join(sorted(presets))}")
        for key in ("keys", "channels", "commands"):
            for rule in user.get(key) or []:
                if re.search(r"\s", str(rule)):
                    found.append(f"{where}.{key}: {rule!r} contains a space: one pattern or rule per list element")
    return found


# ---------------------------------------------------------------------------------------------
# Workers and Flower


def worker_problems(settings):
    """The celery_worker_* variables as the inventory gives them (name -> value)."""
    found = []
    defaults = settings.get("celery_worker_pool_defaults")
    if not isinstance(defaults, dict) or any(not isinstance(v, dict) for v in defaults.values()):
        return [f"celery_worker_pool_defaults must be a mapping of pool name to its settings ({{prefork: "
                f"{{concurrency: 4}}, threads: {{concurrency: 8}}}}), got a {_kind(defaults)}"]
    for pool in POOLS:
        concurrency = (defaults.get(pool) or {}).get("concurrency", 1)
        if (_int(concurrency) or 0) < 1:
            found.append(f"celery_worker_pool_defaults.{pool}.concurrency must be at least 1, got {concurrency!r}")
    for name, minimum in (("celery_worker_restart_hosts_at_once", 1), ("celery_worker_start_timeout", 1),
                          ("celery_worker_watchdog_timeout", 0), ("celery_worker_stop_timeout", 0),
                          ("celery_worker_stop_margin", 0), ("celery_worker_health_failures", 1),
                          ("celery_worker_health_timeout", 1)):
        if name in settings:
            found += _at_least(settings, name, minimum)
    for path in settings.get("celery_worker_read_write_paths") or []:
        if not isinstance(path, str) or not re.match(r"^-?/\S*$", path) or path.lstrip("-") == "/":
            found.append(f"celery_worker_read_write_paths: {path!r} must be an absolute path other than / (systemd's "
                         "ReadWritePaths=)")
    state = settings.get("celery_worker_state_dir_name")
    if "celery_worker_state_dir_name" in settings and not re.match(r"^[A-Za-z0-9_.-]+$", str(state)) \
            or state in (".", ".."):
        found.append(f"celery_worker_state_dir_name {state!r} must be one directory name under /var/lib")
    interval, timeout = _int(settings.get("celery_worker_health_interval")), _int(
        settings.get("celery_worker_health_timeout"))
    if interval is not None and timeout is not None and interval <= timeout:
        found.append(f"celery_worker_health_interval ({interval} s) must be longer than celery_worker_health_timeout "
                     f"({timeout} s)")
    return found


def worker_warnings(instances, cores):
    """Prefork workers that start far more processes than the host has cores: allowed (a pool
    that waits on I/O may want it), said out loud."""
    cores = max(1, _int(cores) or 1)
    return [f"{i['instance']}: prefork concurrency {i['concurrency']} on a host with {cores} CPU cores (celery_stack_queues"
            f" ({i['queue']}).pools.prefork.concurrency, else celery_worker_pool_defaults): each process is a full "
            "Python interpreter competing for the cores; I/O-bound work belongs to the threads pool"
            for i in instances if i["pool"] == "prefork" and int(i["concurrency"]) > 4 * cores]


def flower_problems(settings, monitoring=False):
    """The celery_flower_* variables as the inventory gives them (name -> value); monitoring:
    celery_stack_monitoring (Flower runs, so it needs its users)."""
    found = []
    users = settings.get("celery_flower_users") or []
    if monitoring and not users:
        found.append("celery_flower_users needs at least one ops user when celery_stack_monitoring is on")
    for _, user, _, where, name_problems in _named_entries(
            users, "celery_flower_users", FLOWER_USER,
            "Flower user name (without ':', ',' or spaces: Flower reads the users as name:password,...)"):
        found += name_problems
        found += secret_problems(f"{where}.password", user.get("password"), 12)
        if isinstance(user.get("password"), str) and re.search(r"[:,]", user["password"]):
            found.append(f"{where}.password contains ':' or ',': Flower reads the users as name:password,...")
    if not settings.get("celery_flower_address"):
        found.append("celery_flower_address must be set (an address, e.g. 127.0.0.1)")
    port = _int(settings.get("celery_flower_port"))
    if port is None or not 1 <= port <= 65535:
        found.append(f"celery_flower_port must be a port number (1-65535), got {settings.get('celery_flower_port')!r}")
    found += _at_least(settings, "celery_flower_max_tasks", 1)
    found += _at_least(settings, "celery_flower_purge_offline_workers", 0)
    version = str(settings.get("celery_flower_version"))
    if not re.match(r"^2\.[0-9]+\.[0-9]+$", version):
        found.append(f"celery_flower_version must be an exact Flower 2.x version such as 2.2.0, got {version!r}: the "
                     "launcher relies on Flower 2's handlers")
    for name in ("celery_flower_user", "celery_flower_group"):
        if name in settings:
            found += _name_problems(name, settings[name], ACCOUNT, "Linux account name")
            if settings[name] == "root":
                found.append(f"{name} is root: Flower runs as an account of its own")
    return found


# A Prometheus duration (model.ParseDuration): units from the largest down, each at most once.
PROMETHEUS_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
MONITORING_DURATIONS = (
    "celery_monitoring_group_wait", "celery_monitoring_group_interval", "celery_monitoring_repeat_interval",
    "celery_monitoring_queue_without_consumer_for", "celery_monitoring_queue_growing_for",
    "celery_monitoring_dead_letter_for", "celery_monitoring_worker_offline_for", "celery_monitoring_task_failure_for",
    "celery_monitoring_target_down_for", "celery_monitoring_scrape_interval", "celery_monitoring_evaluation_interval",
    "celery_monitoring_retention")
MONITORING_RATIOS = ("celery_monitoring_task_failure_ratio", "celery_monitoring_redis_memory_ratio")
LOOPBACK = re.compile(r"^(127\.|::1$|localhost$)")


def monitoring_problems(settings, flower_hosts=(), flower_settings=None, host=""):
    """The celery_monitoring_* variables as the inventory gives them (name -> value) on a
    monitoring host `host`. flower_hosts: the Flower hosts Prometheus scrapes; flower_settings:
    the first one's celery_flower_users and celery_flower_address (name -> value)."""
    found = []
    receiver = settings.get("celery_monitoring_receiver")
    if not isinstance(receiver, dict) or not any(k.endswith("_configs") and v for k, v in receiver.items()):
        found.append("celery_monitoring_receiver must name where Alertmanager sends the alerts, as an Alertmanager "
                     "receiver without its name, e.g. {webhook_configs: [{url: https://...}]} or {email_configs: [...]}: "
                     "a Prometheus that tells nobody is what celery_monitoring exists to end")
    elif "name" in receiver:
        found.append("celery_monitoring_receiver has a name: leave it out, the role names its one receiver")
    for name in MONITORING_DURATIONS:
        value = str(settings.get(name, ""))
        if not value or not PROMETHEUS_DURATION.match(value) or not re.search(r"[1-9]", value):
            found.append(f"{name} must be a Prometheus duration such as 30s, 5m or 1h30m, got {settings.get(name)!r}")
    for name in MONITORING_RATIOS:
        value = settings.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            found.append(f"{name} must be a number between 0 and 1 (a share), got {value!r}")
    found += _at_least(settings, "celery_monitoring_queue_depth", 1)
    found += _at_least(settings, "celery_monitoring_queue_oldest_task_seconds", 1, " seconds")
    found += _at_least(settings, "celery_monitoring_health_restarts_per_hour", 1)
    found += _at_least(settings, "celery_monitoring_health_check_stale_after", 60, " seconds")
    found += _at_least(settings, "celery_monitoring_certificate_days", 1)
    for name in ("celery_monitoring_prometheus_port", "celery_monitoring_alertmanager_port"):
        port = _int(settings.get(name))
        if port is None or not 1 <= port <= 65535:
            found.append(f"{name} must be a port number (1-65535), got {settings.get(name)!r}")
    if flower_hosts:
        flower = flower_settings or {}
        users = [u.get("name") for u in flower.get("celery_flower_users") or [] if isinstance(u, dict)]
        wanted = settings.get("celery_monitoring_flower_user")
        if wanted and wanted not in users:
            found.append(f"celery_monitoring_flower_user is {wanted!r}, which is not one of celery_flower_users "
                         f"({', '.join(map(str, users)) or 'none'}): Prometheus scrapes Flower's /metrics as one of them")
        # Prometheus dials every target by its stack address (the name its certificate carries),
        # even on its own host.
        address = str(flower.get("celery_flower_address") or "127.0.0.1")
        if LOOPBACK.match(address):
            found.append(f"celery_flower_address is {address} on {flower_hosts[0]}: Prometheus on {host} scrapes "
                         f"Flower at {flower_hosts[0]}'s stack address. Let Flower listen there (with "
                         "celery_stack_tls on) and firewall its port to the monitoring host and the operators")
    return found


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (
            known_variables, unknown_variables, stack_problems, table_shape_problems, rabbitmq_cluster_problems, route_pattern_problems, app_problems,
            environment_problems, rabbitmq_problems, rabbitmq_user_problems, served_versions,
            version_problems, redis_problems, redis_user_problems, worker_problems, worker_warnings,
            flower_problems, monitoring_problems, secret_problems)}
