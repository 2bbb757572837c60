"""The sidecar's decision engine: may this agent call this tool, or reach this host?

Pure: ``decide`` takes the policy, the action, what the read store said about
the agent (and how old that answer is), a rate limiter and ``now``, and
returns a ``Decision``. The only I/O is reading the policy file
(``load_policy``, ``PolicyWatcher``); the only state is ``RateLimiter``.

Semantics — ``decide`` follows these steps, and the code numbers them:

1. **Match.** Rules are checked in file order; the first rule whose ``tools``
   (for a tool action) or ``hosts`` (for a host action) has a glob pattern
   (``fnmatch``: ``*``, ``?``, ``[…]``) matching the action decides. Tool
   names match case-sensitively. Hosts match case-insensitively, with any
   port and trailing dot removed from the action's host first;
   ``*.example.com`` matches every subdomain but not ``example.com`` itself
   unless that is listed too. Hosts match by address, not by spelling: an IP
   literal in any spelling a C resolver accepts (``127.1``, ``2130706433``,
   ``0x7f000001``, ``0x7f.0.0.1``, ``[::ffff:127.0.0.1]`` …) is matched in its
   canonical form (``ip_literal``), and a pattern that is an IP or a CIDR
   (``10.0.0.0/8``, ``fd00::/8``) matches every address inside it — the
   literal's, or the one a name resolved to (``Action.address``). Before any
   rule, a **link-local** address (169.254.0.0/16, fe80::/10: the cloud
   metadata service) is denied (``link_local``, severity high) unless an
   allow rule names its address or network explicitly.
2. **Trust.** Trust data is *missing* when ``trust`` is None and *stale* when
   it is older than the policy's ``staleness_seconds`` (default 30). Then:
   **strict** denies every action (``trust_unavailable`` / ``trust_stale``);
   **standard** skips the baseline (step 3) and denies, with that reason,
   only an action whose matching rule is an allow rule with a trust condition
   (``min_tier``, ``min_score``, ``require_capability``) — everything else
   goes on to step 4 without trust data.
3. **Baseline** (fresh trust only): a suspended agent (status or tier
   ``suspended``) is denied everything (``agent_suspended``); an agent whose
   tier is ``untrusted`` is denied everything (``untrusted``).
4. **Rule.** ``effect: deny`` denies (``rule_denied``). ``effect: allow``
   allows when every condition holds, else denies with the first failing
   one, in this order: ``min_tier`` (``below_min_tier``; order untrusted <
   probationary < standard < trusted < verified_partner; a suspended agent,
   or one with a tier this module does not know, is below every tier),
   ``min_score`` (``below_min_score``),
   ``require_capability`` (``missing_capability``: some effective capability
   of the agent must cover it, see ``projections.delegation.covers``), then
   ``rate_limit`` (``rate_limited``: a token bucket per (rule, agent) of
   ``requests`` per ``per_seconds``, starting full, consumed only when
   everything else passed, so a denied call never spends a token).
5. **Default.** No rule matched: **strict** denies (``no_rule``);
   **standard** and **permissive** allow. An empty rule list is valid: under
   strict it denies everything.
6. **Enforcement.** **permissive** evaluates exactly as standard and never
   blocks: what standard would deny comes back ``allowed=True,
   enforced=False`` with standard's reason, so it is still recorded.
   **Shadow** (any mode) decides as configured and turns a deny into
   ``allowed=True, enforced=False`` with the would-be reason.

A decision's ``severity`` is what a ``policy.violation`` report about it
should carry: the deny rule's ``severity`` (default medium) for
``rule_denied``, ``high`` for ``link_local``, ``low`` for every other reason.
(An allow rule may not carry a ``severity``: no decision would use it.)
A deny rule may not carry conditions (``min_tier`` …): it denies everyone.

Consequence worth knowing: with the same inputs (and limiter history),
anything strict allows, standard allows too — strict only adds denials.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
import socket
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import yaml

from projections.config import SEVERITIES, Severity
from projections.delegation import covered_by_any
from projections.trust import TIERS
from sidecar.errors import SidecarError

Mode = Literal["strict", "standard", "permissive"]
MODES: tuple[Mode, ...] = get_args(Mode)
Reason = Literal[
    "allowed",
    "rule_denied",
    "no_rule",
    "below_min_tier",
    "below_min_score",
    "missing_capability",
    "rate_limited",
    "agent_suspended",
    "untrusted",
    "trust_unavailable",
    "trust_stale",
    "link_local",
    "unparseable",
]
"""The stable ``reason`` codes of a ``Decision``."""

DEFAULT_STALENESS_SECONDS = 30.0
DEFAULT_SEVERITY: Severity = "medium"
NO_POLICY_FILE = "(no policy file)"
"""``Policy.source`` of a policy built from the mode alone."""

# Lowest first; "suspended" (the projections' tier of a suspended agent) ranks
# below every tier a rule can name.
_TIER_RANK = {tier: rank for rank, tier in enumerate(reversed(TIERS))}
RULE_TIERS = tuple(t for t in reversed(TIERS) if t != "suspended")
"""Tiers a rule's ``min_tier`` may name, lowest first."""


class PolicyError(SidecarError):
    """A policy file is unreadable or invalid; the message is one line, ``file:line: what``."""


# -- types --------------------------------------------------------------------


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LINK_LOCAL: tuple[Network, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
"""Denied to egress by default in strict and standard (cloud metadata lives here)."""
_NUMERIC_V4 = re.compile(r"^[0-9a-fx.]+$")


@dataclass(frozen=True, slots=True)
class Action:
    """What the agent is about to do: call an MCP tool, or reach an egress host.

    For a host, ``address`` is the IP address the connection will use (the
    resolved address of a name, or the literal's canonical form); without it,
    an IP literal ``name`` is parsed (every spelling, see ``ip_literal``)."""

    kind: Literal["tool", "host"]
    name: str
    address: Address | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"

    def ip(self) -> Address | None:
        if self.kind != "host":
            return None
        return self.address if self.address is not None else ip_literal(self.name)


@dataclass(frozen=True, slots=True)
class TrustInfo:
    """What the read store said about the agent, and how old that answer is."""

    did: str
    score: int
    tier: str
    status: Literal["active", "suspended"]
    capabilities: frozenset[str]
    age_seconds: float


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``requests`` per ``per_seconds``, refilled continuously (a token bucket)."""

    requests: int
    per_seconds: float


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a policy file; ``line`` is where it starts (1-based)."""

    id: str
    tools: tuple[str, ...]
    hosts: tuple[str, ...]
    effect: Literal["allow", "deny"]
    min_tier: str | None
    min_score: int | None
    require_capability: str | None
    rate_limit: RateLimit | None
    severity: Severity
    line: int
    networks: tuple[Network, ...] = ()

    @property
    def needs_trust(self) -> bool:
        """True when the rule has a condition that reads trust data."""
        return any(c is not None for c in (self.min_tier, self.min_score, self.require_capability))

    def matches(self, action: Action) -> bool:
        if action.kind == "tool":
            return any(fnmatch.fnmatchcase(action.name, p) for p in self.tools)
        host = normalize_host(action.name)
        literal = ip_literal(host)
        if literal is not None:
            host = str(literal)  # 127.1, 0x7f000001, [::ffff:127.0.0.1] … match as 127.0.0.1
        if any(fnmatch.fnmatchcase(host, p) for p in self.hosts):
            return True
        address = action.ip()
        if address is None:
            return False
        if any(fnmatch.fnmatchcase(str(address), p) for p in self.hosts):
            return True
        return self.contains(address)

    def contains(self, address: Address) -> bool:
        """True when one of the rule's IP / CIDR host patterns holds ``address``."""
        return any(address.version == n.version and address in n for n in self.networks)


@dataclass(frozen=True, slots=True)
class Policy:
    """The mode, the rules in file order, and where they came from."""

    mode: Mode
    shadow: bool
    rules: tuple[Rule, ...]
    staleness_seconds: float
    source: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``decide``; see the module docstring for the meaning of each field."""

    allowed: bool
    enforced: bool
    reason: Reason
    rule: str | None
    policy: str
    mode: Mode
    agent: str
    score: int | None
    tier: str | None
    severity: Severity
    detail: str


def normalize_host(host: str) -> str:
    """Lower-case, without port, brackets or trailing dot: the form host patterns match."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6-address]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    # "pastebin.com." resolves like "pastebin.com"; without this a trailing dot
    # would slip past a deny rule.
    return host.rstrip(".")


def ip_literal(host: str) -> Address | None:
    """The address ``host`` names when it is an IP literal in any spelling a C resolver
    accepts, else None (a name).

    IPv6 (with or without brackets) by ``ipaddress``, an IPv4-mapped IPv6 address
    unwrapped to its IPv4 address; IPv4 by ``socket.inet_aton``, which accepts
    what ``getaddrinfo`` and every HTTP client connecting through it accept:
    ``127.1``, ``2130706433``, ``0x7f000001``, ``0x7f.0.0.1``, ``0177.0.0.1``,
    ``127.0.1`` — all 127.0.0.1.
    """
    text = normalize_host(host)
    if ":" in text:
        try:
            v6 = ipaddress.IPv6Address(text.partition("%")[0])
        except ValueError:
            return None
        return v6.ipv4_mapped or v6
    if not _NUMERIC_V4.match(text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def host_network(pattern: str) -> Network | None:
    """The network a host pattern names (an IP literal in any spelling, or CIDR), else None."""
    address = ip_literal(pattern)
    if address is not None:
        return ipaddress.ip_network(address)
    if "/" not in pattern:
        return None
    try:
        network = ipaddress.ip_network(pattern, strict=True)
    except ValueError:
        return None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        mapped = network.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{mapped}/{max(network.prefixlen - 96, 0)}")
    return network


# -- rate limiting ------------------------------------------------------------


class RateLimiter:
    """Token buckets by key; pure given ``now``, bounded to ``max_keys`` buckets.

    A bucket starts full (``requests`` tokens) and refills at
    ``requests / per_seconds`` tokens a second. The least recently used bucket
    is dropped when a new key would exceed ``max_keys``; a sidecar serves one
    agent, so there is about one key per rule, and eviction only guards against unbounded
    growth, never against an agent's own rate.
    """

    __slots__ = ("_buckets", "_max_keys")

    def __init__(self, max_keys: int = 10_000) -> None:
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, key: str, rate: RateLimit, now: float) -> bool:
        """Spend one token of ``key``'s bucket at ``now``; False when none is left."""
        tokens, at = self._buckets.pop(key, (float(rate.requests), now))
        # A clock that steps back must not mint tokens: only forward time refills.
        elapsed = max(now - at, 0.0)
        tokens = min(float(rate.requests), tokens + elapsed * rate.requests / rate.per_seconds)
        allowed = tokens >= 1.0 - 1e-9  # tolerate float error on exact refills
        if allowed:
            tokens = max(tokens - 1.0, 0.0)
        self._buckets[key] = (tokens, max(now, at))
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    @property
    def size(self) -> int:
        """How many buckets are kept."""
        return len(self._buckets)


# -- deciding -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verdict:
    reason: Reason
    rule: Rule | None
    detail: str


def decide(
    policy: Policy,
    action: Action,
    trust: TrustInfo | None,
    agent: str,
    limiter: RateLimiter,
    now: float,
) -> Decision:
    """Decide ``action`` for ``agent`` (steps 1-6 of the module docstring)."""
    mode: Mode = "standard" if policy.mode == "permissive" else policy.mode
    verdict = _evaluate(policy, mode, action, trust, agent, limiter, now)
    # 6. enforcement
    denied = verdict.reason != "allowed"
    overridden = denied and (policy.shadow or policy.mode == "permissive")
    detail = verdict.detail
    if overridden:
        why = "shadow mode" if policy.shadow else "permissive mode"
        detail = f"{detail} (not enforced: {why})"
    rule = verdict.rule
    return Decision(
        allowed=not denied or overridden,
        enforced=not overridden,
        reason=verdict.reason,
        rule=None if rule is None else rule.id,
        policy=policy.source,
        mode=policy.mode,
        agent=agent,
        score=None if trust is None else trust.score,
        tier=None if trust is None else trust.tier,
        severity=_severity(verdict),
        detail=detail,
    )


def _severity(verdict: _Verdict) -> Severity:
    if verdict.rule is not None and verdict.reason == "rule_denied":
        return verdict.rule.severity
    return "high" if verdict.reason == "link_local" else "low"


def _evaluate(
    policy: Policy,
    mode: Mode,
    action: Action,
    trust: TrustInfo | None,
    agent: str,
    limiter: RateLimiter,
    now: float,
) -> _Verdict:
    # 1. match
    rule = next((r for r in policy.rules if r.matches(action)), None)
    address = action.ip()
    # Link-local (the cloud metadata service): denied unless an allow rule names
    # its address or network explicitly (a name glob such as "*" is not enough).
    if (
        address is not None
        and any(address.version == n.version and address in n for n in LINK_LOCAL)
        and not any(r.effect == "allow" and r.contains(address) for r in policy.rules)
    ):
        detail = f"{action} ({address}) is link-local: denied by default"
        return _Verdict("link_local", None, detail)
    # 2. trust missing or stale
    problem = _trust_problem(trust, policy.staleness_seconds, agent)
    if problem is not None:
        if mode == "strict":
            return problem
        if rule is not None and rule.effect == "allow" and rule.needs_trust:
            return _Verdict(problem.reason, rule, f"{action} needs trust data: {problem.detail}")
        trust = None
    # 3. baseline
    elif (baseline := _baseline(trust, agent)) is not None:
        return baseline
    # 4. rule
    if rule is not None:
        return _apply(rule, action, trust, agent, limiter, now)
    # 5. default
    if mode == "strict":
        return _Verdict("no_rule", None, f"{action} matches no rule (strict mode denies)")
    return _Verdict("allowed", None, f"{action} matches no rule ({mode} mode allows)")


def _trust_problem(trust: TrustInfo | None, staleness: float, agent: str) -> _Verdict | None:
    if trust is None:
        return _Verdict("trust_unavailable", None, f"trust data for {agent} is unavailable")
    # `not <=` also treats a NaN age as stale: fail closed.
    if not trust.age_seconds <= staleness:
        age = f"{trust.age_seconds:g}s old, limit {staleness:g}s"
        return _Verdict("trust_stale", None, f"trust data for {agent} is stale ({age})")
    return None


def _baseline(trust: TrustInfo | None, agent: str) -> _Verdict | None:
    if trust is None:
        return None
    if _suspended(trust):
        return _Verdict("agent_suspended", None, f"agent {agent} is suspended")
    if trust.tier == "untrusted":
        return _Verdict("untrusted", None, f"agent {agent} is untrusted ({trust.score})")
    return None


def _suspended(trust: TrustInfo) -> bool:
    return trust.status == "suspended" or trust.tier == "suspended"


def _apply(
    rule: Rule,
    action: Action,
    trust: TrustInfo | None,
    agent: str,
    limiter: RateLimiter,
    now: float,
) -> _Verdict:
    if rule.effect == "deny":
        return _Verdict("rule_denied", rule, f"{action} is denied by rule {rule.id}")
    failed = None if trust is None else _failed_condition(rule, action, trust)
    if failed is not None:
        return failed
    limit = rule.rate_limit
    if limit is not None and not limiter.take(f"{rule.id}\x00{agent}", limit, now):
        rate = f"{limit.requests} per {limit.per_seconds:g}s"
        return _Verdict("rate_limited", rule, f"{action} exceeds rule {rule.id}'s limit of {rate}")
    return _Verdict("allowed", rule, f"{action} is allowed by rule {rule.id}")


def _failed_condition(rule: Rule, action: Action, trust: TrustInfo) -> _Verdict | None:
    standing = f"agent is {trust.tier} ({trust.score})"
    if rule.min_tier is not None and _tier_rank(trust) < _TIER_RANK[rule.min_tier]:
        return _Verdict("below_min_tier", rule, f"{action} needs tier {rule.min_tier}, {standing}")
    if rule.min_score is not None and trust.score < rule.min_score:
        return _Verdict(
            "below_min_score", rule, f"{action} needs score {rule.min_score}, {standing}"
        )
    need = rule.require_capability
    if need is not None and not covered_by_any(need, trust.capabilities):
        return _Verdict(
            "missing_capability", rule, f"{action} needs capability {need}, agent lacks it"
        )
    return None


def _tier_rank(trust: TrustInfo) -> int:
    # An unknown tier ranks below everything: fail closed.
    return -1 if _suspended(trust) else _TIER_RANK.get(trust.tier, -1)


# -- loading ------------------------------------------------------------------

_TOP_KEYS = ("rules", "staleness_seconds", "version")
_RULE_KEYS = (
    "effect",
    "hosts",
    "id",
    "min_score",
    "min_tier",
    "rate_limit",
    "require_capability",
    "severity",
    "tools",
)
_CONDITION_KEYS = ("min_tier", "min_score", "require_capability", "rate_limit")
_RATE_KEYS = ("per_seconds", "requests")


def load_policy(path: Path | None, mode: Mode, shadow: bool) -> Policy:
    """The policy in ``path`` (no rules when None); raise ``PolicyError`` if unreadable/invalid."""
    _check_mode(mode)
    if path is None:
        return Policy(mode, shadow, (), DEFAULT_STALENESS_SECONDS, NO_POLICY_FILE)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror or exc}") from exc
    return parse_policy(data, str(path), mode, shadow)


def parse_policy(data: bytes | str, source: str, mode: Mode, shadow: bool) -> Policy:
    """The policy in ``data`` (a file's contents, named ``source`` in errors)."""
    _check_mode(mode)
    parser = _Parser(source, _decode(data, source))
    try:
        rules, staleness = parser.document()
    finally:
        parser.loader.dispose()
    return Policy(mode, shadow, rules, staleness, source)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PolicyError(f"unknown policy mode {mode!r} (expected one of: {', '.join(MODES)})")


def _decode(data: bytes | str, source: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicyError(f"{source}:{line}: policy file is not valid UTF-8") from exc


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _yaml_problem(exc: yaml.MarkedYAMLError) -> tuple[int, str]:
    """The line and one-line text of a YAML syntax error (with its context, if any)."""
    mark = exc.problem_mark or exc.context_mark
    line = 1 if mark is None else mark.line + 1
    problem = " ".join(str(exc.problem or "syntax error").split())
    if exc.context:
        where = "" if exc.context_mark is None else f" on line {exc.context_mark.line + 1}"
        problem = f"{problem} ({exc.context}{where})"
    return line, f"invalid YAML: {problem}"


class _Parser:
    """Builds a policy from the YAML node tree, so every error can name its line."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.loader = yaml.SafeLoader(text)

    def error(self, line: int, message: str) -> PolicyError:
        return PolicyError(f"{self.source}:{line}: {message}")

    def document(self) -> tuple[tuple[Rule, ...], float]:
        root = self._compose()
        if root is None:
            raise self.error(1, "policy file is empty (expected version: 1 and rules)")
        top = self.fields(root, "policy", _TOP_KEYS)
        if "version" not in top:
            raise self.error(_line(root), "policy needs version: 1")
        version = self.value(top["version"])
        if type(version) is not int or version != 1:
            raise self.error(
                _line(top["version"]), f"unsupported policy version {version!r} (expected 1)"
            )
        staleness = DEFAULT_STALENESS_SECONDS
        if "staleness_seconds" in top:
            staleness = self.positive(top["staleness_seconds"], "staleness_seconds")
        if "rules" not in top:
            raise self.error(_line(root), "policy needs a rules list")
        return self.rules(top["rules"]), staleness

    def _compose(self) -> yaml.Node | None:
        try:
            return self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise self.error(*_yaml_problem(exc)) from exc
        except yaml.YAMLError as exc:
            raise self.error(1, f"invalid YAML: {' '.join(str(exc).split())}") from exc

    def value(self, node: yaml.Node) -> object:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "cannot read value"
            raise self.error(
                _line(node), f"invalid YAML: {' '.join(str(problem).split())}"
            ) from exc

    def fields(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        """The keys of a mapping node (unknown or repeated keys are errors)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(_line(node), f"{what} must be a mapping")
        found: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "…"
            if key not in allowed:
                expected = ", ".join(allowed)
                raise self.error(
                    _line(key_node), f"unknown key {key!r} in {what} (expected one of: {expected})"
                )
            if key in found:
                raise self.error(_line(key_node), f"duplicate key {key!r} in {what}")
            found[key] = value_node
        return found

    def positive(self, node: yaml.Node, name: str) -> float:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(_line(node), f"{name} must be a number > 0, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise self.error(_line(node), f"{name} must be a number > 0, got {value!r}")
        return float(value)

    def rules(self, node: yaml.Node) -> tuple[Rule, ...]:
        if isinstance(node, yaml.ScalarNode) and self.value(node) is None:
            return ()  # `rules:` with nothing under it: an empty list
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(_line(node), "rules must be a list of rules")
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for item in node.value:
            rule = self.rule(item)
            if rule.id in seen:
                first = seen[rule.id]
                raise self.error(
                    rule.line, f"duplicate rule id {rule.id!r} (first defined on line {first})"
                )
            seen[rule.id] = rule.line
            rules.append(rule)
        return tuple(rules)

    def rule(self, node: yaml.Node) -> Rule:
        """One rule, checked key by key in the order an author reads them."""
        fields = self.fields(node, "rule", _RULE_KEYS)
        line = _line(node)
        if "id" not in fields:
            raise self.error(line, "rule needs an id")
        rule_id = self.text(fields["id"], "rule id")
        tools = self.patterns(fields.get("tools"), "tools")
        hosts = self.patterns(fields.get("hosts"), "hosts")
        if not tools and not hosts:
            raise self.error(line, f"rule {rule_id!r} needs tools or hosts")
        effect = self.effect(fields.get("effect"), rule_id, line)
        self.check_applies(fields, effect, rule_id)
        limit = fields.get("rate_limit")
        networks = tuple(n for n in map(host_network, hosts) if n is not None)
        return Rule(
            id=rule_id,
            tools=tools,
            hosts=hosts,
            effect=effect,
            min_tier=self.tier(fields.get("min_tier")),
            min_score=self.score(fields.get("min_score")),
            require_capability=self.optional_text(
                fields.get("require_capability"), "require_capability"
            ),
            rate_limit=None if limit is None else self.rate_limit(limit),
            severity=self.severity(fields.get("severity")),
            line=line,
            networks=networks,
        )

    def text(self, node: yaml.Node, name: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            raise self.error(_line(node), f"{name} must be a non-empty string, got {value!r}")
        return value

    def optional_text(self, node: yaml.Node | None, name: str) -> str | None:
        return None if node is None else self.text(node, name)

    def patterns(self, node: yaml.Node | None, name: Literal["tools", "hosts"]) -> tuple[str, ...]:
        if node is None:
            return ()
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(_line(node), f"{name} must be a non-empty list of glob patterns")
        texts = [(item, self.text(item, f"each of {name}")) for item in node.value]
        if name == "tools":
            return tuple(text for _, text in texts)
        return tuple(self.host(item, text) for item, text in texts)

    def host(self, node: yaml.Node, pattern: str) -> str:
        # A pattern with a scheme, path or port never matches a normalized host;
        # in a deny rule it would silently block nothing. (An IP or CIDR is fine.)
        network = host_network(pattern)
        if network is not None:
            literal = ip_literal(pattern)
            return str(literal) if literal is not None else str(network)
        if "/" in pattern or pattern.count(":") == 1:
            message = f"host pattern {pattern!r} must be a bare host (no scheme, path or port)"
            raise self.error(_line(node), message)
        return pattern.lower().rstrip(".")

    def effect(self, node: yaml.Node | None, rule_id: str, line: int) -> Literal["allow", "deny"]:
        if node is None:
            raise self.error(line, f"rule {rule_id!r} needs an effect (allow or deny)")
        value = self.value(node)
        if value == "allow":
            return "allow"
        if value == "deny":
            return "deny"
        raise self.error(_line(node), f"effect must be allow or deny, got {value!r}")

    def check_applies(self, fields: dict[str, yaml.Node], effect: str, rule_id: str) -> None:
        """Refuse keys that mean nothing on the rule: conditions on a deny rule (it
        denies everyone, whatever they say), a severity on an allow rule (only a deny
        rule's severity is ever reported)."""
        if effect == "allow" and "severity" in fields:
            raise self.error(
                _line(fields["severity"]),
                f"severity has no effect on allow rule {rule_id!r} (only deny rules report one)",
            )
        if effect == "deny":
            for key in _CONDITION_KEYS:
                if key in fields:
                    raise self.error(
                        _line(fields[key]), f"{key} has no effect on deny rule {rule_id!r}"
                    )

    def tier(self, node: yaml.Node | None) -> str | None:
        if node is None:
            return None
        value = self.value(node)
        if value not in RULE_TIERS:
            raise self.error(
                _line(node), f"unknown tier {value!r} (expected one of: {', '.join(RULE_TIERS)})"
            )
        return str(value)

    def score(self, node: yaml.Node | None) -> int | None:
        if node is None:
            return None
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise self.error(
                _line(node), f"min_score must be an integer from 0 to 1000, got {value!r}"
            )
        return value

    def rate_limit(self, node: yaml.Node) -> RateLimit:
        fields = self.fields(node, "rate_limit", _RATE_KEYS)
        for key in _RATE_KEYS:
            if key not in fields:
                raise self.error(_line(node), f"rate_limit needs {key}")
        requests = self.value(fields["requests"])
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
            raise self.error(
                _line(fields["requests"]), f"requests must be an integer >= 1, got {requests!r}"
            )
        return RateLimit(requests, self.positive(fields["per_seconds"], "per_seconds"))

    def severity(self, node: yaml.Node | None) -> Severity:
        if node is None:
            return DEFAULT_SEVERITY
        value = self.value(node)
        for severity in SEVERITIES:
            if value == severity:
                return severity
        raise self.error(
            _line(node), f"unknown severity {value!r} (expected one of: {', '.join(SEVERITIES)})"
        )


# -- watching -----------------------------------------------------------------


class PolicyWatcher:
    """The current policy of a file, reloaded by ``check`` when the file changes.

    A reload is atomic: the whole new policy replaces the old one, or (when the
    new file is unreadable or invalid) the old one stays and ``check`` reports
    the error once. ``error`` keeps the last reload error until a good reload.
    The first load happens in the constructor and raises ``PolicyError``: a
    sidecar must not start on a broken policy.
    """

    def __init__(self, path: Path | None, mode: Mode, shadow: bool) -> None:
        self.path = path
        self.mode: Mode = mode
        self.shadow = shadow
        self.error: PolicyError | None = None
        # Stat before reading: a change after the stat shows up at the next check.
        self._signature = None if path is None else _signature(path)
        self._current = load_policy(path, mode, shadow)

    @property
    def current(self) -> Policy:
        return self._current

    def check(self) -> tuple[Policy, PolicyError | None]:
        """Reload if the file changed; the policy now in force, and this reload's error."""
        if self.path is None:
            return self._current, None
        signature: tuple[int, ...] | None = None
        error: PolicyError | None = None
        try:
            signature = _signature(self.path)
        except PolicyError as exc:
            error = exc
        if signature == self._signature:
            return self._current, None
        self._signature = signature
        if error is None:
            try:
                self._current = load_policy(self.path, self.mode, self.shadow)
            except PolicyError as exc:
                error = exc
        self.error = error
        return self._current, error


def _signature(path: Path) -> tuple[int, ...]:
    """What changes when the file does: inode (a ConfigMap swaps files), size and times."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror or exc}") from exc
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
