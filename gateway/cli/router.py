"""``python -m gateway router learn|rollback|status``: the router learnt from a deployment's labels.

``learn`` reads the labelled requests of the given tenant (``--global``: the poolable
labels of every ``--tenant`` given, for tenants without a router of their own), fits a
candidate on the older three quarters, compares it with the router in force on the newest
quarter (gateway/learning/learned.py) and prints the comparison as JSON. ``--promote``
puts the candidate in force only when it is better beyond the interval; running gateways
pick it up within seconds. ``rollback`` puts the previous version back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.cli._parsers import Subcommands
from gateway.config.schema import TenantName

if TYPE_CHECKING:
    from gateway.config.schema import Policy
    from gateway.store.base import KeyValue

# The store and the metrics are imported when the command runs, not when the CLI is built:
# prometheus_client picks its multiprocess mode at import, before `serve --workers` sets it.

__all__ = ["register", "run"]


def register(commands: Subcommands) -> None:
    router = commands.add_parser("router", help="learn the router from labelled traffic; promote, roll back")
    actions = router.add_subparsers(dest="router_command", required=True)
    for name, text in (
        ("learn", "fit a candidate router on the labels and compare it with the one in force"),
        ("rollback", "put the previous learnt router back in force"),
        ("status", "the learnt router versions in force, and the target-share thresholds shared now"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument(
            "--redis",
            default=os.environ.get("REDIS_URL"),
            help="Redis URL (default: $REDIS_URL, else the private Redis a serve keeps in --data-dir)",
        )
        action.add_argument("--data-dir", default=".gateway", help="serve's --data-dir (default .gateway)")
        action.add_argument(
            "--tenant",
            action="append",
            default=[],
            type=_tenant,
            help="tenant (learn: repeat with --global)" if name == "learn" else "tenant",
        )
        action.add_argument("--global", dest="pooled", action="store_true", help="the router pooled across tenants")
        if name != "learn":
            action.add_argument(
                "--policies",
                default="policies.yaml",
                help="policy file (default ./policies.yaml): which routes the pooled router serves",
            )
        if name == "learn":
            action.add_argument("--promote", action="store_true", help="put the candidate in force if it is better")
        action.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    usage = _misused(args)
    if usage is not None:
        print(f"python -m gateway router {args.router_command}: error: {usage}", file=sys.stderr)
        return 2
    if not args.redis:
        from gateway.services.redis_server import running_embedded_url

        args.redis = running_embedded_url(os.path.join(args.data_dir, "redis"))
    if not args.redis:
        print(f"give --redis or set REDIS_URL (no private Redis of a serve in {args.data_dir})", file=sys.stderr)
        return 1
    from gateway.store.base import StoreUnavailable

    try:
        return asyncio.run(_run(args))
    except StoreUnavailable:
        print("Redis did not answer", file=sys.stderr)
        return 1


def _tenant(text: str) -> str:
    """A name a tenant can have: an empty one named none, and was taken (t152)."""
    try:
        return msgspec.convert(text, TenantName)
    except msgspec.ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no tenant name (1-128 characters, no control characters, no space at either end)"
        ) from None


def _misused(args: argparse.Namespace) -> str | None:
    """What is wrong with the tenants given, as the command reads them; None: nothing."""
    if not args.pooled:
        return None if len(args.tenant) == 1 else "give exactly one --tenant, or --global"
    if args.router_command == "learn":
        return None if args.tenant else "give --global the tenants whose labels to pool (--tenant, repeated)"
    if args.tenant:  # t152: status --global --tenant X answered for the pooled router, silently
        return f"--global {args.router_command} is the pooled router's, for every tenant: leave --tenant out"
    return None


async def _run(args: argparse.Namespace) -> int:
    from gateway.accounting.metrics import Metrics
    from gateway.learning.learned import UnreadableRouter, active_version, rollback
    from gateway.store.redis import SharedRedis, connect, redis_store

    try:
        client = connect(args.redis, timeout_s=5.0)
    except ValueError as exc:  # a URL redis-py cannot read (no I/O has happened yet)
        print(f"invalid --redis / REDIS_URL: {exc}", file=sys.stderr)
        return 2
    redis = SharedRedis(client, Metrics())
    kv = redis_store(redis).kv
    scope = None if args.pooled else args.tenant[0]
    try:
        pools = policy = None
        if scope is not None and args.router_command != "learn":
            policy = _policy(args.policies)
            if policy is None:  # t166: it answered without it, exit 0; route, calibrate and keys exit 1
                return 1
            pools = _pools(policy)
        if args.router_command == "status":
            status = await _status(kv, scope, await active_version(kv, scope), pools)
            if scope is not None and policy is not None:
                status["target_share_thresholds"] = await _target_share_thresholds(kv, scope, policy)
            print(json.dumps(status))
            return 0
        if args.router_command == "rollback":
            before = await active_version(kv, scope)
            after = await rollback(kv, scope)
            print(json.dumps(await _status(kv, scope, after, pools)))
            if before is None and after is None:  # t69: exit 0, and only the status to tell
                who = "the pooled router" if scope is None else f"tenant {scope!r}"
                print(f"nothing to roll back: {who} has no learned router in force", file=sys.stderr)
                return 1
            return 0
        return await _learn(kv, scope, args.tenant, args.promote)
    except UnreadableRouter as exc:  # gateways ignore it and serve the shipped router; a promotion replaces it
        print(f"{exc} (gateways serve the shipped router meanwhile)", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


def _policy(path: str) -> Policy | None:
    """The policy at ``path``; None when the file cannot be read or is invalid (said on stderr)."""
    from gateway.cli.check import report_invalid
    from gateway.config.loader import load_policy
    from gateway.errors import ConfigError

    try:
        return load_policy(path, unset_ok=True).policy
    except ConfigError as exc:
        report_invalid(exc)
        print(
            "--policies tells which routes the pooled router serves (learning.scope: global) and which keep "
            "a target_large_share: give the gateway's policy file",
            file=sys.stderr,
        )
        return None


def _pools(policy: Policy) -> bool:
    """Whether a route of the policy pools labels (``learning.scope: global``): the pooled router serves no other."""
    return any(route.learning is not None and route.learning.scope == "global" for route in policy.routes.values())


async def _target_share_thresholds(kv: KeyValue, tenant: str, policy: Policy) -> dict[str, dict[str, float | None]]:
    """Each route with a ``target_large_share``: that target and the threshold the tenant's
    prompts are held against there, shared by the gateways (rounded as the log and the
    ``x-gateway-threshold`` header round it); ``null``: none kept on that target yet, the route's
    own ``threshold`` holds (t178: only the request log showed it)."""
    from gateway.large_share import shared_threshold

    shown: dict[str, dict[str, float | None]] = {}
    for name, route in policy.routes.items():
        if route.target_large_share is None:
            continue
        threshold = await shared_threshold(kv, tenant, name, route.target_large_share, timeout_s=5.0)
        shown[name] = {
            "target_large_share": route.target_large_share,
            "threshold": None if threshold is None else round(threshold, 4),
        }
    return shown


async def _status(kv: KeyValue, scope: str | None, active: str | None, pools: bool | None = None) -> dict[str, Any]:
    """What is in force: a tenant's own router (None: the shipped one) and, where a route pools
    labels (``learning.scope: global``; ``pools``: whether one does, None: not known), the
    pooled router that stands in when it has none."""
    from gateway.learning.examples import LearningStore
    from gateway.learning.learned import active_version, load_version

    if active is not None and await load_version(kv, scope, active) is None:
        active = None  # its stored router expired or was evicted: gateways serve the shipped one
    if scope is None:
        return {"scope": "global", "active": active}
    # t152: where no route pools labels, no pooled router serves the tenant (its own one neither)
    pooled = None if pools is False else (active or await active_version(kv, None))
    if pooled is not None and not active and await load_version(kv, None, pooled) is None:
        pooled = None
    labels = len({example.request for example in await LearningStore(kv).labels(scope)})  # relabels count once
    if not labels and active is None:  # a misspelt tenant looked like one on the shipped router (t32)
        print(f"no labels and no router kept for tenant {scope!r}: is the name right?", file=sys.stderr)
    return {"scope": scope, "active": active, "pooled_routes": pooled, "labels": labels}


async def _learn(kv: KeyValue, scope: str | None, tenants: list[str], promote_it: bool) -> int:
    from gateway.learning.examples import LabelledExample, LearningStore
    from gateway.learning.learned import (
        UnreadableRouter,
        active,
        fit_candidate,
        latest_labels,
        promote,
        same_classifier,
    )

    store = LearningStore(kv)
    examples: list[LabelledExample] = []
    held_back = 0
    for tenant in tenants:
        found = await store.labels(tenant)
        taken = [e for e in found if scope is not None or e.poolable]
        examples.extend(taken)
        # requests, as learn and status count them: a relabel counts once (t125)
        held_back += len({e.request for e in found}) - len({e.request for e in taken})
    try:
        current = await active(kv, scope)
    except UnreadableRouter as exc:  # gateways serve the shipped router meanwhile: compare with that
        print(f"{exc}; comparing with the shipped router, which gateways serve meanwhile", file=sys.stderr)
        current = None
    try:
        candidate, evaluation = fit_candidate(examples, current)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        if held_back:  # t79: "0 labelled requests" for a tenant with hundreds, and no word why
            print(
                f"{held_back} labelled requests of these tenants were left out: their route has learning scope "
                "'tenant', so they are not pooled (set learning.scope: global on the route to pool them)",
                file=sys.stderr,
            )
        return 1
    labelled = latest_labels(examples)  # a relabelled request counts once, as status counts it (t69)
    usable = same_classifier(labelled)
    report = {
        "scope": scope or "global",
        "labels": len(labelled),
        "labels_of_another_classifier": len(labelled) - len(usable),
        "current": None if current is None else current.version,
        "candidate": candidate.version,
        **evaluation.to_dict(),
    }
    if promote_it:
        if evaluation.better:
            await promote(kv, scope, candidate)
            report["promoted"] = True
        else:
            report["promoted"] = False
            report["why_not"] = "the candidate is not better than the router in force beyond the interval"
    print(json.dumps(report, indent=2))
    return 0 if not promote_it or evaluation.better else 2
