"""Pure unit and property tests of the sidecar's policy engine: no network, no clock."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections.config import SEVERITIES
from sidecar.policy import (
    DEFAULT_STALENESS_SECONDS,
    NO_POLICY_FILE,
    RULE_TIERS,
    Action,
    Decision,
    Mode,
    Policy,
    PolicyError,
    PolicyWatcher,
    RateLimit,
    RateLimiter,
    Rule,
    TrustInfo,
    decide,
    load_policy,
    normalize_host,
    parse_policy,
)

AGENT = "did:mesh:" + "a" * 32
OTHER = "did:mesh:" + "b" * 32
MODES: tuple[Mode, ...] = ("strict", "standard", "permissive")


def trust(
    score: int = 800,
    tier: str = "trusted",
    *,
    status: Literal["active", "suspended"] = "active",
    caps: Sequence[str] = (),
    age: float = 0.0,
    did: str = AGENT,
) -> TrustInfo:
    return TrustInfo(
        did=did,
        score=score,
        tier=tier,
        status=status,
        capabilities=frozenset(caps),
        age_seconds=age,
    )


def policy(rules_yaml: str = "", mode: Mode = "standard", *, shadow: bool = False) -> Policy:
    """A policy whose rules list is ``rules_yaml`` (indented as list items under ``rules:``)."""
    rules = textwrap.indent(textwrap.dedent(rules_yaml), "  ") if rules_yaml.strip() else "  []\n"
    return parse_policy(f"version: 1\nrules:\n{rules}", "policy.yaml", mode, shadow)


def tool(name: str) -> Action:
    return Action("tool", name)


def host(name: str) -> Action:
    return Action("host", name)


def check(
    pol: Policy,
    action: Action,
    info: TrustInfo | None = None,
    *,
    limiter: RateLimiter | None = None,
    now: float = 0.0,
    agent: str = AGENT,
) -> Decision:
    return decide(pol, action, info, agent, RateLimiter() if limiter is None else limiter, now)


GOOD = trust()

EXAMPLE = """\
version: 1
staleness_seconds: 30        # optional, default 30
rules:
  - id: read-tools
    tools: ["search", "read_*"]
    effect: allow
  - id: writes-need-trust
    tools: ["write_*", "delete_*"]
    effect: allow
    min_tier: trusted          # or min_score: 700
    require_capability: "tools:write"
    rate_limit: {requests: 10, per_seconds: 60}
  - id: no-paste-sites
    hosts: ["*.pastebin.com", "pastebin.com"]
    effect: deny
    severity: high
"""


# -- matching -----------------------------------------------------------------


def test_first_matching_rule_decides() -> None:
    deny_first = policy("""\
        - id: no-deletes
          tools: ["delete_*"]
          effect: deny
        - id: everything
          tools: ["*"]
          effect: allow
    """)
    assert check(deny_first, tool("delete_repo"), GOOD).reason == "rule_denied"
    assert check(deny_first, tool("delete_repo"), GOOD).rule == "no-deletes"
    assert check(deny_first, tool("read_file"), GOOD).rule == "everything"

    allow_first = policy("""\
        - id: everything
          tools: ["*"]
          effect: allow
        - id: no-deletes
          tools: ["delete_*"]
          effect: deny
    """)
    decision = check(allow_first, tool("delete_repo"), GOOD)
    assert (decision.allowed, decision.reason, decision.rule) == (True, "allowed", "everything")


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("search", True),
        ("read_file", True),
        ("read_", True),
        ("Read_file", False),  # tools are case-sensitive
        ("SEARCH", False),
        ("searches", False),
        ("xread_file", False),
        ("read-file", False),
    ],
)
def test_tool_globs_are_case_sensitive(name: str, matches: bool) -> None:
    pol = policy("""\
        - id: reads
          tools: ["search", "read_*"]
          effect: deny
    """)
    assert (check(pol, tool(name), GOOD).rule == "reads") is matches


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("A.Example.COM", True),  # hosts are case-insensitive
        ("a.example.com:443", True),  # the port is not part of the match
        ("a.example.com.", True),  # nor is the root's trailing dot
        ("example.com", False),  # *.example.com is subdomains only
        ("badexample.com", False),
        ("example.com.evil.net", False),
        ("pastebin.com", True),
        ("PASTEBIN.COM:8443", True),
        ("[2001:db8::1]:443", True),
        ("2001:db8::1", True),
    ],
)
def test_host_globs_are_case_insensitive(name: str, matches: bool) -> None:
    pol = policy("""\
        - id: hosts
          hosts: ["*.Example.com", "pastebin.com", "2001:db8::1"]
          effect: deny
    """)
    assert (check(pol, host(name), GOOD).rule == "hosts") is matches


def test_normalize_host() -> None:
    assert normalize_host("API.Example.com:443") == "api.example.com"
    assert normalize_host("[::1]:8080") == "::1"
    assert normalize_host("::1") == "::1"
    assert normalize_host("example.com.") == "example.com"


def test_tool_rules_do_not_match_hosts_and_vice_versa() -> None:
    pol = policy(
        """\
        - id: tools-only
          tools: ["*"]
          effect: deny
        - id: hosts-only
          hosts: ["*"]
          effect: deny
          severity: high
        """,
        "strict",
    )
    assert check(pol, host("search"), GOOD).rule == "hosts-only"
    assert check(pol, tool("example.com"), GOOD).rule == "tools-only"


def test_a_rule_may_name_tools_and_hosts() -> None:
    pol = policy("""\
        - id: both
          tools: ["fetch"]
          hosts: ["api.example.com"]
          effect: deny
    """)
    assert check(pol, tool("fetch"), GOOD).rule == "both"
    assert check(pol, host("api.example.com"), GOOD).rule == "both"
    assert check(pol, tool("api.example.com"), GOOD).rule is None


# -- conditions ---------------------------------------------------------------

CONDITIONS = """\
- id: writes
  tools: ["delete_*"]
  effect: allow
  min_tier: trusted
  min_score: 750
  require_capability: "tools:write"
"""
WRITES_ALLOWED = "tool delete_repo is allowed by rule writes"


@pytest.mark.parametrize(
    ("info", "reason", "detail"),
    [
        (
            trust(612, "standard", caps=["tools:write"]),
            "below_min_tier",
            "tool delete_repo needs tier trusted, agent is standard (612)",
        ),
        (
            trust(720, "trusted", caps=["tools:write"]),
            "below_min_score",
            "tool delete_repo needs score 750, agent is trusted (720)",
        ),
        (
            trust(800, "trusted", caps=["tools:read"]),
            "missing_capability",
            "tool delete_repo needs capability tools:write, agent lacks it",
        ),
        (
            trust(612, "standard"),  # every condition fails: the first one is reported
            "below_min_tier",
            "tool delete_repo needs tier trusted, agent is standard (612)",
        ),
        (trust(800, "trusted", caps=["tools:write"]), "allowed", WRITES_ALLOWED),
        (trust(950, "verified_partner", caps=["tools:*"]), "allowed", WRITES_ALLOWED),
        (trust(950, "verified_partner", caps=["*"]), "missing_capability", None),
        (trust(950, "verified_partner", caps=["tools"]), "missing_capability", None),
        (trust(800, "mystery", caps=["tools:write"]), "below_min_tier", None),  # fails closed
    ],
)
def test_conditions_in_order(info: TrustInfo, reason: str, detail: str | None) -> None:
    for mode in ("strict", "standard"):
        decision = check(policy(CONDITIONS, mode), tool("delete_repo"), info)
        assert decision.reason == reason
        assert decision.allowed is (reason == "allowed")
        assert decision.enforced
        assert decision.rule == "writes"
        assert decision.severity == "low"
        if detail is not None:
            assert decision.detail == detail


@pytest.mark.parametrize(
    ("tier", "passes"),
    [
        ("probationary", False),
        ("standard", True),
        ("trusted", True),
        ("verified_partner", True),
    ],
)
def test_tier_order(tier: str, passes: bool) -> None:
    pol = policy("""\
        - id: r
          tools: ["t"]
          effect: allow
          min_tier: standard
    """)
    assert check(pol, tool("t"), trust(600, tier)).allowed is passes


def test_min_tier_untrusted_admits_every_active_tier_but_baseline_still_applies() -> None:
    pol = policy("""\
        - id: r
          tools: ["t"]
          effect: allow
          min_tier: untrusted
    """)
    assert check(pol, tool("t"), trust(400, "probationary")).allowed
    assert check(pol, tool("t"), trust(200, "untrusted")).reason == "untrusted"


# -- rate limiting ------------------------------------------------------------

LIMITED = """\
- id: limited
  tools: ["call"]
  effect: allow
  min_score: 500
  rate_limit: {requests: 2, per_seconds: 10}
"""


def test_rate_limit_over_time() -> None:
    pol = policy(LIMITED)
    limiter = RateLimiter()
    outcomes = [
        check(pol, tool("call"), GOOD, limiter=limiter, now=t).reason
        for t in (0.0, 0.0, 0.0, 4.9, 5.0, 5.0, 25.0, 25.0, 25.0)
    ]
    assert outcomes == [
        "allowed",
        "allowed",
        "rate_limited",
        "rate_limited",  # 0.98 of a token
        "allowed",  # 5s refill one token (2 per 10s)
        "rate_limited",
        "allowed",  # 20s later the bucket is full again: 2, never more
        "allowed",
        "rate_limited",
    ]
    denied = check(pol, tool("call"), GOOD, limiter=limiter, now=25.0)
    assert denied.detail == "tool call exceeds rule limited's limit of 2 per 10s"
    assert (denied.allowed, denied.severity, denied.rule) == (False, "low", "limited")


def test_rate_limit_spends_no_token_on_a_denied_call() -> None:
    pol = policy(LIMITED)
    limiter = RateLimiter()
    for _ in range(5):
        assert check(pol, tool("call"), trust(400, "probationary"), limiter=limiter).reason == (
            "below_min_score"
        )
    assert check(pol, tool("call"), GOOD, limiter=limiter).allowed
    assert check(pol, tool("call"), GOOD, limiter=limiter).allowed
    assert not check(pol, tool("call"), GOOD, limiter=limiter).allowed


def test_rate_limit_buckets_are_per_rule_and_agent() -> None:
    pol = policy("""\
        - id: one
          tools: ["a"]
          effect: allow
          rate_limit: {requests: 1, per_seconds: 60}
        - id: two
          tools: ["b"]
          effect: allow
          rate_limit: {requests: 1, per_seconds: 60}
    """)
    limiter = RateLimiter()
    assert check(pol, tool("a"), GOOD, limiter=limiter).allowed
    assert not check(pol, tool("a"), GOOD, limiter=limiter).allowed
    assert check(pol, tool("b"), GOOD, limiter=limiter).allowed
    assert check(pol, tool("a"), trust(did=OTHER), limiter=limiter, agent=OTHER).allowed


def test_rate_limiter_token_bucket() -> None:
    limiter = RateLimiter()
    rate = RateLimit(requests=10, per_seconds=60)
    assert all(limiter.take("k", rate, 100.0) for _ in range(10))
    assert not limiter.take("k", rate, 100.0)
    assert limiter.take("k", rate, 106.0)  # exactly one token in 6s, despite float steps
    assert not limiter.take("k", rate, 106.0)
    # a clock that steps back mints nothing, and does not move the bucket's clock back
    assert not limiter.take("k", rate, 50.0)
    assert not limiter.take("k", rate, 111.9)
    assert limiter.take("k", rate, 112.0)


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(max_keys=3)
    rate = RateLimit(requests=1, per_seconds=3600)
    for key in ("a", "b", "c"):
        assert limiter.take(key, rate, 0.0)
    assert not limiter.take("a", rate, 1.0)  # a is now the most recently used
    assert limiter.take("d", rate, 1.0)  # evicts b, the least recently used
    assert limiter.size == 3
    assert not limiter.take("a", rate, 2.0)
    assert limiter.take("b", rate, 2.0)  # b was forgotten: a fresh bucket


@given(
    requests=st.integers(1, 5),
    per_seconds=st.sampled_from([0.5, 1.0, 7.0, 60.0]),
    steps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=60),
)
def test_token_bucket_never_exceeds_its_rate(
    requests: int, per_seconds: float, steps: list[float]
) -> None:
    limiter = RateLimiter()
    rate = RateLimit(requests, per_seconds)
    now, granted = 0.0, 0
    for step in steps:
        now += step
        granted += limiter.take("k", rate, now)
        assert granted <= requests + now * requests / per_seconds + 1e-6


# -- baseline -----------------------------------------------------------------

ALLOW_ALL = """\
- id: all
  tools: ["*"]
  hosts: ["*"]
  effect: allow
"""


SUSPENDED = f"agent {AGENT} is suspended"


@pytest.mark.parametrize("mode", ["strict", "standard"])
@pytest.mark.parametrize(
    ("info", "reason", "detail"),
    [
        (trust(800, "trusted", status="suspended"), "agent_suspended", SUSPENDED),
        (trust(800, "suspended"), "agent_suspended", SUSPENDED),
        (trust(250, "untrusted"), "untrusted", f"agent {AGENT} is untrusted (250)"),
    ],
)
def test_baseline_denies_before_the_rules(
    mode: Mode, info: TrustInfo, reason: str, detail: str
) -> None:
    for action in (tool("search"), host("example.com"), tool("unlisted")):
        decision = check(policy(ALLOW_ALL, mode), action, info)
        assert (decision.allowed, decision.reason, decision.rule) == (False, reason, None)
        assert decision.detail == detail
        assert decision.severity == "low"
    assert check(policy("", mode), tool("x"), info).reason == reason


def test_permissive_records_the_baseline_without_blocking() -> None:
    decision = check(policy(ALLOW_ALL, "permissive"), tool("x"), trust(800, status="suspended"))
    assert (decision.allowed, decision.enforced, decision.reason) == (
        True,
        False,
        "agent_suspended",
    )
    assert decision.detail == f"agent {AGENT} is suspended (not enforced: permissive mode)"


# -- defaults, trust unavailable and stale --------------------------------------


def test_no_rule_matched() -> None:
    rules = """\
        - id: other
          tools: ["other"]
          effect: allow
    """
    strict = check(policy(rules, "strict"), tool("x"), GOOD)
    assert (strict.allowed, strict.reason, strict.rule) == (False, "no_rule", None)
    assert strict.detail == "tool x matches no rule (strict mode denies)"
    standard = check(policy(rules, "standard"), tool("x"), GOOD)
    assert (standard.allowed, standard.enforced, standard.reason) == (True, True, "allowed")
    permissive = check(policy(rules, "permissive"), tool("x"), GOOD)
    assert (permissive.allowed, permissive.enforced, permissive.reason) == (True, True, "allowed")


@pytest.mark.parametrize("rules", ["", "[]"])
def test_an_empty_rule_list_denies_everything_under_strict(rules: str) -> None:
    pol = parse_policy(f"version: 1\nrules: {rules}\n", "policy.yaml", "strict", False)
    assert pol.rules == ()
    assert check(pol, tool("x"), GOOD).reason == "no_rule"
    assert check(pol, host("example.com"), GOOD).reason == "no_rule"
    standard = replace(pol, mode="standard")
    assert check(standard, tool("x"), GOOD).allowed


MIXED = """\
- id: conditional
  tools: ["delete_*"]
  effect: allow
  min_score: 700
- id: plain
  tools: ["read_*"]
  effect: allow
- id: limited
  tools: ["ping"]
  effect: allow
  rate_limit: {requests: 1, per_seconds: 60}
- id: blocked
  hosts: ["pastebin.com"]
  effect: deny
  severity: critical
"""

UNAVAILABLE = ("trust_unavailable", None)
STALE = ("trust_stale", trust(900, "verified_partner", caps=["*"], age=31.0))
# A stale answer that says "suspended" proves standard does not use stale data.
STALE_SUSPENDED = ("trust_stale", trust(900, "trusted", status="suspended", age=31.0))


@pytest.mark.parametrize("problem", [UNAVAILABLE, STALE, STALE_SUSPENDED])
@pytest.mark.parametrize(
    ("action", "standard"),
    [
        (tool("delete_repo"), ("trust", False, "conditional")),  # "trust": the problem's reason
        (tool("read_file"), ("allowed", True, "plain")),
        (host("pastebin.com"), ("rule_denied", False, "blocked")),
        (tool("unlisted"), ("allowed", True, None)),
    ],
)
def test_trust_missing_or_stale(
    problem: tuple[str, TrustInfo | None], action: Action, standard: tuple[str, bool, str | None]
) -> None:
    """Strict denies everything; standard only what needs trust; permissive records it."""
    problem_reason, info = problem
    pol = policy(MIXED, "strict")
    decision = check(pol, action, info)
    assert (decision.allowed, decision.reason, decision.rule) == (False, problem_reason, None)
    assert decision.severity == "low"

    decision = check(replace(pol, mode="standard"), action, info)
    reason, allowed, rule = standard
    expected_reason = problem_reason if reason == "trust" else reason
    assert (decision.reason, decision.allowed, decision.rule) == (expected_reason, allowed, rule)

    decision = check(replace(pol, mode="permissive"), action, info)
    assert decision.allowed
    assert decision.reason == expected_reason
    assert decision.enforced is (expected_reason == "allowed")


def test_trust_problem_details() -> None:
    pol = policy(MIXED, "strict")
    assert check(pol, tool("x"), None).detail == f"trust data for {AGENT} is unavailable"
    assert check(pol, tool("x"), trust(age=45.0)).detail == (
        f"trust data for {AGENT} is stale (45s old, limit 30s)"
    )
    standard = check(replace(pol, mode="standard"), tool("delete_repo"), None)
    assert standard.detail == (
        f"tool delete_repo needs trust data: trust data for {AGENT} is unavailable"
    )


def test_standard_still_rate_limits_without_trust() -> None:
    pol = policy(MIXED, "standard")
    limiter = RateLimiter()
    assert check(pol, tool("ping"), None, limiter=limiter).allowed
    assert check(pol, tool("ping"), None, limiter=limiter).reason == "rate_limited"


def test_staleness_boundary_and_setting() -> None:
    pol = policy(ALLOW_ALL, "strict")
    assert pol.staleness_seconds == DEFAULT_STALENESS_SECONDS == 30.0
    assert check(pol, tool("x"), trust(age=30.0)).allowed  # exactly the limit is fresh
    assert check(pol, tool("x"), trust(age=30.001)).reason == "trust_stale"
    assert check(pol, tool("x"), trust(age=float("nan"))).reason == "trust_stale"
    short = parse_policy(
        "version: 1\nstaleness_seconds: 2.5\nrules: []\n", "p.yaml", "strict", False
    )
    assert short.staleness_seconds == 2.5
    assert check(short, tool("x"), trust(age=3.0)).reason == "trust_stale"


# -- enforcement: permissive and shadow ---------------------------------------


def test_permissive_never_blocks_and_records_standards_reason() -> None:
    pol = policy(MIXED, "permissive")
    decision = check(pol, host("pastebin.com:443"), GOOD)
    assert decision == Decision(
        allowed=True,
        enforced=False,
        reason="rule_denied",
        rule="blocked",
        policy="policy.yaml",
        mode="permissive",
        agent=AGENT,
        score=800,
        tier="trusted",
        severity="critical",
        detail="host pastebin.com:443 is denied by rule blocked (not enforced: permissive mode)",
    )
    low = check(pol, tool("delete_x"), trust(650, "standard"))
    assert (low.allowed, low.enforced, low.reason) == (True, False, "below_min_score")


@pytest.mark.parametrize("mode", MODES)
def test_shadow_decides_but_never_blocks(mode: Mode) -> None:
    pol = policy(MIXED, mode, shadow=True)
    denied = check(pol, host("pastebin.com"), GOOD)
    assert (denied.allowed, denied.enforced, denied.reason) == (True, False, "rule_denied")
    assert denied.detail.endswith("(not enforced: shadow mode)")
    assert denied.severity == "critical"
    allowed = check(pol, tool("read_file"), GOOD)
    assert (allowed.allowed, allowed.enforced, allowed.reason) == (True, True, "allowed")
    unavailable = check(pol, tool("delete_repo"), None)
    assert unavailable.allowed
    assert not unavailable.enforced
    assert unavailable.reason == "trust_unavailable"


def test_strict_without_shadow_blocks() -> None:
    decision = check(policy(MIXED, "strict"), host("pastebin.com"), GOOD)
    assert (decision.allowed, decision.enforced, decision.reason) == (False, True, "rule_denied")
    assert decision.detail == "host pastebin.com is denied by rule blocked"


# -- severity and decision fields ---------------------------------------------


def test_severity_on_an_allow_rule_is_refused_and_conditions_report_low() -> None:
    with pytest.raises(PolicyError) as info:
        policy("""\
            - id: guarded
              tools: ["delete_*"]
              effect: allow
              min_tier: trusted
              severity: high
        """)
    assert "severity has no effect on allow rule 'guarded'" in str(info.value)
    pol = policy("""\
        - id: guarded
          tools: ["delete_*"]
          effect: allow
          min_tier: trusted
    """)
    decision = check(pol, tool("delete_repo"), trust(600, "standard"))
    assert (decision.reason, decision.severity) == ("below_min_tier", "low")


def test_severity() -> None:
    pol = policy("""\
        - id: default-severity
          tools: ["a"]
          effect: deny
        - id: high
          tools: ["b"]
          effect: deny
          severity: high
        - id: cond
          tools: ["c"]
          effect: allow
          min_score: 999
    """)
    assert check(pol, tool("a"), GOOD).severity == "medium"
    assert check(pol, tool("b"), GOOD).severity == "high"
    assert check(pol, tool("c"), GOOD).severity == "low"
    assert check(pol, tool("d"), GOOD).severity == "low"
    assert check(pol, tool("b"), trust(800, status="suspended")).severity == "low"


def test_decision_without_trust_has_no_score_or_tier() -> None:
    decision = check(load_policy(None, "standard", False), tool("x"), None)
    assert decision == Decision(
        allowed=True,
        enforced=True,
        reason="allowed",
        rule=None,
        policy=NO_POLICY_FILE,
        mode="standard",
        agent=AGENT,
        score=None,
        tier=None,
        severity="low",
        detail="tool x matches no rule (standard mode allows)",
    )


@pytest.mark.parametrize(
    ("mode", "info", "allowed", "reason"),
    [
        ("strict", GOOD, False, "no_rule"),
        ("strict", None, False, "trust_unavailable"),
        ("standard", GOOD, True, "allowed"),
        ("standard", None, True, "allowed"),
        ("permissive", None, True, "allowed"),
    ],
)
def test_no_policy_file_is_just_the_mode(
    mode: Mode, info: TrustInfo | None, allowed: bool, reason: str
) -> None:
    pol = load_policy(None, mode, False)
    assert pol == Policy(mode, False, (), 30.0, NO_POLICY_FILE)
    decision = check(pol, tool("x"), info)
    assert (decision.allowed, decision.reason) == (allowed, reason)


# -- loading ------------------------------------------------------------------


def test_load_example(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    pol = load_policy(path, "strict", True)
    assert (pol.mode, pol.shadow, pol.staleness_seconds, pol.source) == (
        "strict",
        True,
        30.0,
        str(path),
    )
    assert pol.rules == (
        Rule(
            id="read-tools",
            tools=("search", "read_*"),
            hosts=(),
            effect="allow",
            min_tier=None,
            min_score=None,
            require_capability=None,
            rate_limit=None,
            severity="medium",
            line=4,
        ),
        Rule(
            id="writes-need-trust",
            tools=("write_*", "delete_*"),
            hosts=(),
            effect="allow",
            min_tier="trusted",
            min_score=None,
            require_capability="tools:write",
            rate_limit=RateLimit(10, 60.0),
            severity="medium",
            line=7,
        ),
        Rule(
            id="no-paste-sites",
            tools=(),
            hosts=("*.pastebin.com", "pastebin.com"),
            effect="deny",
            min_tier=None,
            min_score=None,
            require_capability=None,
            rate_limit=None,
            severity="high",
            line=13,
        ),
    )


def test_host_patterns_are_stored_lower_case() -> None:
    pol = policy("""\
        - id: h
          hosts: ["API.Example.COM."]
          effect: deny
    """)
    assert pol.rules[0].hosts == ("api.example.com",)


def test_rule_tiers() -> None:
    assert RULE_TIERS == ("untrusted", "probationary", "standard", "trusted", "verified_partner")


def _rule(body: str) -> str:
    """A policy file whose rules (starting on line 3) are ``body``."""
    return "version: 1\nrules:\n" + textwrap.indent(textwrap.dedent(body), "  ")


TIERS_TEXT = "untrusted, probationary, standard, trusted, verified_partner"
RULE_KEYS_TEXT = (
    "effect, hosts, id, min_score, min_tier, rate_limit, require_capability, severity, tools"
)
BARE = "must be a bare host (no scheme, path or port)"
# Rule texts for _rule: line 3 is "- id: a", line 4 "tools: [a]", line 5 the effect, line 6 more.
ALLOW = "- id: a\n  tools: [a]\n  effect: allow\n"
DENY = "- id: a\n  tools: [a]\n  effect: deny\n"
RULE_CASES = [
    ("unknown-rule-key", ALLOW.replace("effect", "efect"),
     f"5: unknown key 'efect' in rule (expected one of: {RULE_KEYS_TEXT})"),
    ("no-id", "- tools: [a]\n  effect: allow\n", "3: rule needs an id"),
    ("empty-id", ALLOW.replace("id: a", 'id: ""'), "3: rule id must be a non-empty string, got ''"),
    ("numeric-id", ALLOW.replace("id: a", "id: 7"), "3: rule id must be a non-empty string, got 7"),
    ("duplicate-id", ALLOW + ALLOW.replace("id: a", "id: b") + DENY,
     "9: duplicate rule id 'a' (first defined on line 3)"),
    ("no-tools-or-hosts", "- id: a\n  effect: allow\n", "3: rule 'a' needs tools or hosts"),
    ("empty-tools", ALLOW.replace("[a]", "[]"),
     "4: tools must be a non-empty list of glob patterns"),
    ("hosts-not-a-list", "- id: a\n  hosts: example.com\n  effect: deny\n",
     "4: hosts must be a non-empty list of glob patterns"),
    ("tool-not-a-string", "- id: a\n  tools:\n    - ok\n    - 12\n  effect: deny\n",
     "6: each of tools must be a non-empty string, got 12"),
    ("host-with-port", "- id: a\n  hosts:\n    - x.com\n    - pastebin.com:443\n  effect: deny\n",
     f"6: host pattern 'pastebin.com:443' {BARE}"),
    ("host-with-scheme", '- id: a\n  hosts: ["https://pastebin.com"]\n  effect: deny\n',
     f"4: host pattern 'https://pastebin.com' {BARE}"),
    ("no-effect", "- id: a\n  tools: [a]\n", "3: rule 'a' needs an effect (allow or deny)"),
    ("bad-effect", ALLOW.replace("allow", "permit"),
     "5: effect must be allow or deny, got 'permit'"),
    ("unknown-tier", ALLOW + "  min_tier: trustd\n",
     f"6: unknown tier 'trustd' (expected one of: {TIERS_TEXT})"),
    ("suspended-is-no-min-tier", ALLOW + "  min_tier: suspended\n",
     f"6: unknown tier 'suspended' (expected one of: {TIERS_TEXT})"),
    ("min-score-high", ALLOW + "  min_score: 1001\n",
     "6: min_score must be an integer from 0 to 1000, got 1001"),
    ("min-score-negative", ALLOW + "  min_score: -1\n",
     "6: min_score must be an integer from 0 to 1000, got -1"),
    ("min-score-float", ALLOW + "  min_score: 700.5\n",
     "6: min_score must be an integer from 0 to 1000, got 700.5"),
    ("min-score-bool", ALLOW + "  min_score: true\n",
     "6: min_score must be an integer from 0 to 1000, got True"),
    ("empty-capability", ALLOW + '  require_capability: ""\n',
     "6: require_capability must be a non-empty string, got ''"),
    ("rate-limit-scalar", ALLOW + "  rate_limit: 10\n", "6: rate_limit must be a mapping"),
    ("rate-limit-no-period", ALLOW + "  rate_limit: {requests: 10}\n",
     "6: rate_limit needs per_seconds"),
    ("rate-limit-zero", ALLOW + "  rate_limit:\n    requests: 0\n    per_seconds: 60\n",
     "7: requests must be an integer >= 1, got 0"),
    ("rate-limit-zero-period", ALLOW + "  rate_limit:\n    requests: 10\n    per_seconds: 0\n",
     "8: per_seconds must be a number > 0, got 0"),
    ("rate-limit-unknown-key", ALLOW + "  rate_limit:\n    requests: 10\n    per_second: 60\n",
     "8: unknown key 'per_second' in rate_limit (expected one of: per_seconds, requests)"),
    ("bad-severity", DENY + "  severity: urgent\n",
     "6: unknown severity 'urgent' (expected one of: low, medium, high, critical)"),
    ("condition-on-deny", DENY + "  min_tier: trusted\n",
     "6: min_tier has no effect on deny rule 'a'"),
    ("duplicate-key", ALLOW + "  effect: deny\n", "6: duplicate key 'effect' in rule"),
    ("rule-not-a-mapping", "- just-a-string\n", "3: rule must be a mapping"),
    ("yaml-syntax", '- id: a\n  tools: ["a", "b"\n  effect: allow\n',
     "5: invalid YAML: expected ',' or ']', but got '<scalar>'"
     " (while parsing a flow sequence on line 4)"),
    ("unsafe-tag", "- id: !!python/object:os.system x\n",
     "3: invalid YAML: could not determine a constructor for the tag"
     " 'tag:yaml.org,2002:python/object:os.system'"),
]  # fmt: skip
FILE_CASES = [
    ("yaml-tab", "version: 1\nrules:\n\t- id: a\n",
     "3: invalid YAML: found character '\\t' that cannot start any token"
     " (while scanning for the next token)"),
    ("two-documents", "version: 1\nrules: []\n---\nversion: 1\n",
     "3: invalid YAML: but found another document"
     " (expected a single document in the stream on line 1)"),
    ("version-2", "version: 2\nrules: []\n", "1: unsupported policy version 2 (expected 1)"),
    ("version-string", "version: '1'\nrules: []\n",
     "1: unsupported policy version '1' (expected 1)"),
    ("no-version", "rules: []\n", "1: policy needs version: 1"),
    ("no-rules", "# nothing\nversion: 1\n", "2: policy needs a rules list"),
    ("rules-not-a-list", "version: 1\nrules:\n  id: a\n  tools: [a]\n",
     "3: rules must be a list of rules"),
    ("unknown-top-key", "version: 1\nrule: []\n",
     "2: unknown key 'rule' in policy (expected one of: rules, staleness_seconds, version)"),
    ("bad-staleness", "version: 1\nstaleness_seconds: -5\nrules: []\n",
     "2: staleness_seconds must be a number > 0, got -5"),
    ("infinite-staleness", "version: 1\nstaleness_seconds: .inf\nrules: []\n",
     "2: staleness_seconds must be a number > 0, got inf"),
    ("empty", "", "1: policy file is empty (expected version: 1 and rules)"),
    ("top-level-list", "- version: 1\n", "1: policy must be a mapping"),
]  # fmt: skip
BAD_POLICIES = [
    *(pytest.param(_rule(text), message, id=name) for name, text, message in RULE_CASES),
    *(pytest.param(text, message, id=name) for name, text, message in FILE_CASES),
]


@pytest.mark.parametrize(("text", "message"), BAD_POLICIES)
def test_policy_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path, "strict", False)
    assert str(caught.value) == f"{path}:{message}"
    assert "\n" not in str(caught.value)


def test_policy_error_for_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"version: 1\nrules:\n  - id: caf\xe9\n")
    with pytest.raises(PolicyError, match=r"^.*policy\.yaml:3: policy file is not valid UTF-8$"):
        load_policy(path, "strict", False)


def test_policy_error_for_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(path, "strict", False)
    assert str(caught.value) == f"{path}: cannot read policy file: No such file or directory"


def test_unknown_mode() -> None:
    with pytest.raises(PolicyError, match="unknown policy mode 'lenient'"):
        load_policy(None, "lenient", False)  # type: ignore[arg-type]  # the point of the test


# -- watching -----------------------------------------------------------------

GOOD_V1 = _rule("""\
    - id: first
      tools: [a]
      effect: deny
""")
GOOD_V2 = _rule("""\
    - id: second
      tools: [b]
      effect: deny
    - id: third
      tools: [c]
      effect: deny
""")
BAD = _rule("""\
    - id: broken
      tools: [a]
      efect: deny
""")


def _write(path: Path, text: str, stamp: int) -> None:
    """Write ``text`` with mtime ``stamp`` s, so a change never hides within one clock tick."""
    path.write_text(text)
    os.utime(path, ns=(stamp * 10**9, stamp * 10**9))


def _ids(pol: Policy) -> list[str]:
    return [rule.id for rule in pol.rules]


def test_watcher_reloads_atomically(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, GOOD_V1, 1)
    watcher = PolicyWatcher(path, "strict", True)
    first = watcher.current
    assert (_ids(first), first.mode, first.shadow) == (["first"], "strict", True)
    assert watcher.check() == (first, None)  # unchanged: nothing read
    assert watcher.current is first

    _write(path, BAD, 2)
    pol, error = watcher.check()
    assert pol is first
    assert error is not None
    assert (
        str(error) == f"{path}:5: unknown key 'efect' in rule (expected one of: {RULE_KEYS_TEXT})"
    )
    assert watcher.error is error
    assert watcher.check() == (first, None)  # reported once, still in force
    assert watcher.error is error

    _write(path, GOOD_V2, 3)
    pol, error = watcher.check()
    assert _ids(pol) == ["second", "third"]
    assert error is None
    assert watcher.error is None
    assert watcher.current is pol


def test_watcher_survives_the_file_disappearing(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, GOOD_V1, 1)
    watcher = PolicyWatcher(path, "standard", False)
    path.unlink()
    pol, error = watcher.check()
    assert _ids(pol) == ["first"]
    assert str(error) == f"{path}: cannot read policy file: No such file or directory"
    assert watcher.check() == (pol, None)
    _write(path, GOOD_V2, 2)
    pol, error = watcher.check()
    assert (_ids(pol), error) == (["second", "third"], None)


def test_watcher_sees_a_swapped_file(tmp_path: Path) -> None:
    # Kubernetes updates a mounted ConfigMap by swapping a symlink to a new file.
    path = tmp_path / "policy.yaml"
    _write(tmp_path / "v1.yaml", GOOD_V1, 1)
    _write(tmp_path / "v2.yaml", GOOD_V1.replace("first", "fresh"), 1)  # same size and mtime
    path.symlink_to(tmp_path / "v1.yaml")
    watcher = PolicyWatcher(path, "strict", False)
    tmp = tmp_path / "swap"
    tmp.symlink_to(tmp_path / "v2.yaml")
    tmp.replace(path)
    assert _ids(watcher.check()[0]) == ["fresh"]


def test_watcher_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, BAD, 1)
    with pytest.raises(PolicyError, match=r"policy\.yaml:5: unknown key 'efect'"):
        PolicyWatcher(path, "strict", False)


def test_watcher_without_a_file() -> None:
    watcher = PolicyWatcher(None, "permissive", False)
    assert watcher.current == load_policy(None, "permissive", False)
    assert watcher.check() == (watcher.current, None)


# -- properties ---------------------------------------------------------------

TOOL_NAMES = ("search", "read_file", "write_file", "delete_repo", "Search")
HOST_NAMES = ("example.com", "api.example.com", "pastebin.com:443", "EVIL.net", "x.evil.net")
TOOL_PATTERNS = ("search", "read_*", "write_*", "delete_*", "*", "?earch")
HOST_PATTERNS = ("example.com", "*.example.com", "pastebin.com", "*.evil.net", "*")
CAPABILITIES = ("tools:write", "tools:*", "tools:read", "net:*", "*")
TRUST_TIERS = (*RULE_TIERS, "suspended")


@st.composite
def rules(draw: st.DrawFn, index: int) -> Rule:
    effect = draw(st.sampled_from(["allow", "deny"]))
    tools = tuple(draw(st.lists(st.sampled_from(TOOL_PATTERNS), max_size=2)))
    hosts = tuple(draw(st.lists(st.sampled_from(HOST_PATTERNS), max_size=2)))
    if not tools and not hosts:
        tools = ("*",)
    if effect == "deny":
        severity = draw(st.sampled_from(SEVERITIES))
        return Rule(f"r{index}", tools, hosts, "deny", None, None, None, None, severity, index + 3)
    rate = st.builds(RateLimit, st.integers(1, 3), st.sampled_from([1.0, 10.0]))
    return Rule(
        id=f"r{index}",
        tools=tools,
        hosts=hosts,
        effect="allow",
        min_tier=draw(st.none() | st.sampled_from(RULE_TIERS)),
        min_score=draw(st.none() | st.integers(0, 1000)),
        require_capability=draw(st.none() | st.sampled_from(CAPABILITIES)),
        rate_limit=draw(st.none() | rate),
        severity="medium",
        line=index + 3,
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    count = draw(st.integers(0, 4))
    drawn = tuple(draw(rules(i)) for i in range(count))
    return Policy("standard", False, drawn, draw(st.sampled_from([5.0, 30.0])), "policy.yaml")


def trust_infos() -> st.SearchStrategy[TrustInfo | None]:
    return st.none() | st.builds(
        TrustInfo,
        did=st.just(AGENT),
        score=st.integers(0, 1000),
        tier=st.sampled_from(TRUST_TIERS),
        status=st.sampled_from(["active", "suspended"]),
        capabilities=st.frozensets(st.sampled_from(CAPABILITIES), max_size=3),
        age_seconds=st.floats(0, 60, allow_nan=False),
    )


actions = st.one_of(
    st.builds(Action, st.just("tool"), st.sampled_from(TOOL_NAMES)),
    st.builds(Action, st.just("host"), st.sampled_from(HOST_NAMES)),
)
# A run of calls at non-decreasing times, so rate limits come into play.
runs = st.lists(st.tuples(actions, st.floats(0, 2, allow_nan=False)), min_size=1, max_size=12)


def _run(pol: Policy, calls: list[tuple[Action, float]], info: TrustInfo | None) -> list[Decision]:
    limiter, now = RateLimiter(), 0.0
    decisions: list[Decision] = []
    for action, step in calls:
        now += step
        decisions.append(decide(pol, action, info, AGENT, limiter, now))
    return decisions


@given(pol=policies(), calls=runs, info=trust_infos())
def test_permissive_never_blocks_and_records_what_standard_would(
    pol: Policy, calls: list[tuple[Action, float]], info: TrustInfo | None
) -> None:
    standard = _run(pol, calls, info)
    permissive = _run(replace(pol, mode="permissive"), calls, info)
    for std, perm in zip(standard, permissive, strict=True):
        assert perm.allowed
        assert perm.reason == std.reason
        assert perm.enforced is std.allowed
        assert perm.severity == std.severity


@given(pol=policies(), calls=runs, info=trust_infos(), mode=st.sampled_from(MODES))
def test_shadow_never_blocks_and_records_what_it_would(
    pol: Policy,
    calls: list[tuple[Action, float]],
    info: TrustInfo | None,
    mode: Mode,
) -> None:
    enforced = _run(replace(pol, mode=mode), calls, info)
    shadowed = _run(replace(pol, mode=mode, shadow=True), calls, info)
    for real, shadow in zip(enforced, shadowed, strict=True):
        assert shadow.allowed
        assert (shadow.reason, shadow.rule, shadow.severity) == (
            real.reason,
            real.rule,
            real.severity,
        )
        assert shadow.enforced is (real.reason == "allowed")


@given(pol=policies(), calls=runs, info=trust_infos())
def test_strict_allows_only_what_standard_allows(
    pol: Policy, calls: list[tuple[Action, float]], info: TrustInfo | None
) -> None:
    # Why it holds: with missing or stale trust strict denies everything; with
    # fresh trust both modes take the same path and differ only when no rule
    # matches, where no bucket is touched — so the limiters stay in step.
    strict = _run(replace(pol, mode="strict"), calls, info)
    standard = _run(pol, calls, info)
    for s, d in zip(strict, standard, strict=True):
        if s.allowed:
            assert d.allowed
            assert s.rule == d.rule
        if info is not None and info.age_seconds <= pol.staleness_seconds:
            assert s.reason == d.reason or (s.reason, d.reason) == ("no_rule", "allowed")


@given(pol=policies(), action=actions, info=trust_infos(), mode=st.sampled_from(MODES))
def test_decisions_are_well_formed(
    pol: Policy, action: Action, info: TrustInfo | None, mode: Mode
) -> None:
    decision = decide(replace(pol, mode=mode), action, info, AGENT, RateLimiter(), 0.0)
    assert decision.enforced or decision.allowed  # an override is always an allow
    assert (decision.reason == "allowed") is (decision.allowed and decision.enforced)
    if decision.reason != "rule_denied":
        assert decision.severity == "low"
    if decision.rule is not None:
        matched = next(r for r in pol.rules if r.id == decision.rule)
        assert matched.matches(action)
        assert not any(r.matches(action) for r in pol.rules[: pol.rules.index(matched)])
