"""From the model name a client asked for to the ordered list of models that may answer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import msgspec

from gateway.config.schema import LearningPolicy, Policy, RetryPolicy
from gateway.errors import BudgetExceededError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError

__all__ = ["RoutePlan", "Router"]


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: str
    """The name the client called: a route alias, or a model called directly."""
    candidates: tuple[str, ...]
    """Models to try in order: the chosen one first, then the fallbacks."""
    baseline: str
    """The model whose price gives ``baseline_cost_usd``: what the request would have cost without routing."""
    decision: str
    """Why the first candidate: ``fixed``, ``direct``, ``small``/``large`` (classifier), ``default``
    (classifier route, classifier unavailable), ``budget_downgrade``, ``previous_response`` (the
    model whose upstream keeps the response a request continues)."""
    threshold: float | None = None
    """Classifier routes: send to the large model when ``p_large`` is at or above this."""
    retry: RetryPolicy | None = None
    """The route's own retry policy (``routes.<name>.retry``); None: the policy-wide one."""
    target_large_share: float | None = None
    """Classifier routes: keep this share on the large model (the threshold then moves; gateway/large_share.py)."""
    learning: LearningPolicy | None = None
    """Classifier routes: the router learns from this route's traffic (gateway/learning/)."""


class Router:
    def __init__(self, policy: Policy) -> None:
        plans: dict[str, RoutePlan] = {}
        large = policy.pair.large
        for name, model in policy.models.items():
            if model.public:
                plans[name] = RoutePlan(name, (name,), large, "direct")
        for name, route in policy.routes.items():
            assert route.model is not None  # enforced by the loader
            candidates = tuple(dict.fromkeys([route.model, *route.fallbacks]))
            if route.strategy == "classifier":
                plans[name] = RoutePlan(
                    name,
                    candidates,
                    route.baseline or large,
                    "default",
                    route.threshold,
                    route.retry,
                    route.target_large_share,
                    route.learning,
                )
            else:
                plans[name] = RoutePlan(name, candidates, route.baseline or large, "fixed", retry=route.retry)
        self._plans = plans
        self._cache_scopes = {name: _cache_scope(policy, plan) for name, plan in plans.items()}
        self._small, self._large = policy.pair.small, policy.pair.large
        self.pair = (policy.pair.small, policy.pair.large)
        self._fallbacks = {name: tuple(route.fallbacks) for name, route in policy.routes.items()}
        self._stores = {name: (model.base_url, model.api_key_env) for name, model in policy.models.items()}
        self._responses_api = frozenset(name for name, model in policy.models.items() if model.responses_api)
        self.route_names = tuple(policy.routes)
        self.labels_kept = max(
            (route.learning.max_labels for route in policy.routes.values() if route.learning is not None),
            default=LearningPolicy().max_labels,
        )
        """The labels a tenant keeps (its newest): one list holds those of every route, which
        ``router learn`` fits together, so a route with a smaller ``max_labels`` must not cut
        the others' (t125)."""
        self.model_names = tuple(name for name, model in policy.models.items() if model.public)
        self._embedding_models = frozenset(name for name, model in policy.models.items() if model.kind != "chat")

    def cache_scope(self, route: str) -> str:
        """What a route's cached answers belong to: its name and the models that may answer on it,
        as the policy defines them (``upstream_model``, server, provider). A reload that points
        the route at another model starts its cache afresh (t56: the old model's answers were
        served for the whole ``ttl_s``, named as the old model, at no cost)."""
        return self._cache_scopes.get(route, route)

    def plan(self, requested: str, allowed: frozenset[str] = frozenset({"*"})) -> RoutePlan:
        """``allowed``: the caller's route and model names (``*``: all). A name the key may not
        call is refused as an unknown one is, and the error lists only the caller's names: a key
        must not learn which other models and routes exist (OpenAI answers both with one 404)."""
        plan = self._plans.get(requested)
        if plan is None or ("*" not in allowed and requested not in allowed):
            names = sorted(name for name in self._plans if "*" in allowed or name in allowed)
            raise ModelNotFoundError(
                f"model '{requested}' does not exist or this key may not use it; available: {', '.join(names) or 'none'}",
                param="model",
            )
        return plan

    def refuse_unknown(self, requested: str | None, allowed: frozenset[str] = frozenset({"*"})) -> None:
        """:meth:`plan`'s 404 for a name the caller has no route or model of: a body that is wrong
        besides is told so after it, as if it named a model that exists (f226: a Messages field
        refused "on a route that may reach a model other than Anthropic's" where there was no route)."""
        if requested is not None:
            self.plan(requested, allowed)

    def chat_plan(self, requested: str, allowed: frozenset[str] = frozenset({"*"})) -> RoutePlan:
        """:meth:`plan` for a request that asks a chat model (messages, completions, a token count)."""
        plan = self.plan(requested, allowed)
        if plan.candidates[0] in self._embedding_models:
            raise InvalidRequestError(
                f"model '{requested}' is an embedding model; use POST /v1/embeddings", param="model"
            )
        return plan

    def reachable(self, requested: str, allowed: frozenset[str] = frozenset({"*"})) -> tuple[str, ...]:
        """Every model a request for ``requested`` may end at: the route's candidates and, on a
        classifier route, the pair too (what a protocol edge checks before promising a feature).
        A name the key may not call is unknown here too: an edge that decoded its request another
        way told a key which names exist (t30)."""
        return self.ends(self.plan(requested, allowed))

    def ends(self, plan: RoutePlan) -> tuple[str, ...]:
        """Every model a request planned so may end at (what its budget estimate is priced at)."""
        names = (*plan.candidates, *self.pair) if plan.threshold is not None else plan.candidates
        return tuple(dict.fromkeys(names))

    def continuing(self, plan: RoutePlan, holder: str, allowed: frozenset[str] = frozenset({"*"})) -> RoutePlan:
        """The plan for a request that continues what ``holder``'s upstream keeps (a passed-through
        previous response): the candidates whose upstream shares that store (one server and key,
        such as OpenAI's API for all its models), else the holder itself, when the route reaches it
        or the caller may name it (``allowed``): any other upstream would 404, it has never seen
        the response, and a key must not reach a model through a response id that it may not call."""
        store = self._stores.get(holder)
        sharing = tuple(name for name in plan.candidates if self._stores.get(name) == store)
        if sharing:
            moved = sharing[0] != plan.candidates[0]
            return replace(plan, candidates=sharing, decision="previous_response" if moved else plan.decision)
        if store is None:
            raise InvalidRequestError(
                f"the previous response was made by model '{holder}', which this gateway no longer serves",
                param="previous_response_id",
            )
        if plan.decision == "budget_downgrade":  # the holder alone would skip the downgrade
            raise BudgetExceededError(
                f"the budget is nearly spent, so route '{plan.route}' answers with its small model only, which "
                f"cannot continue a response kept by model '{holder}'; start a new conversation",
                param="previous_response_id",
            )
        self.refuse_hidden_holder(holder, self.ends(plan), allowed)
        return RoutePlan(plan.route, (holder,), plan.baseline, "previous_response", retry=plan.retry)

    def refuse_hidden_holder(self, holder: str, names: tuple[str, ...], allowed: frozenset[str]) -> None:
        """A 403 for a request that may end at ``names`` and continues a response ``holder``'s
        upstream keeps, when the key may not call ``holder`` (by name, or as one of ``names``):
        the same whether its route passes Responses requests through or translates them (t147)."""
        if holder not in names and "*" not in allowed and holder not in allowed:
            raise PermissionDeniedError(
                "the previous response is kept by a model this key may not use",  # not named (t60)
                param="previous_response_id",
            )

    def reaches_held(self, holder: str, allowed: frozenset[str]) -> bool:
        """Whether a key that may call ``allowed`` may read or delete a response ``holder``'s upstream
        keeps: it may call ``holder`` (by name, or through a route that may end at it), or a Responses
        model whose upstream shares its store, which a follow-up would go to (:meth:`continuing`)."""
        if "*" in allowed or holder in allowed:
            return True
        store = self._stores.get(holder)
        ends = (name for named in allowed if named in self._plans for name in self.ends(self._plans[named]))
        return any(name == holder or (name in self._responses_api and self._stores[name] == store) for name in ends)

    def downgrade(self, plan: RoutePlan) -> RoutePlan:
        """The same route on the small model alone: a nearly spent budget must not reach the large one."""
        return RoutePlan(plan.route, (self._small,), plan.baseline, "budget_downgrade", retry=plan.retry)

    def classify(self, plan: RoutePlan, p_large: float, threshold: float | None = None) -> RoutePlan:
        """The pair's large model when ``p_large`` reaches the threshold (``threshold``, else the
        route's), else the small; the route's fallbacks follow, then its own model (a large pick
        with the large upstream down is answered by the small one, not refused)."""
        threshold = plan.threshold if threshold is None else threshold
        assert threshold is not None
        chosen, decision = (self._large, "large") if p_large >= threshold else (self._small, "small")
        candidates = tuple(dict.fromkeys([chosen, *self._fallbacks.get(plan.route, ()), *plan.candidates]))
        return RoutePlan(
            plan.route,
            candidates,
            plan.baseline,
            decision,
            threshold,
            plan.retry,
            plan.target_large_share,
            plan.learning,
        )


def _cache_scope(policy: Policy, plan: RoutePlan) -> str:
    """The route and the models that answer on it: its own, and for a classifier route the pair (a
    fallback answers only when they fail: editing the fallbacks emptied the cache, t57)."""
    names = [plan.candidates[0], *((policy.pair.small, policy.pair.large) if plan.decision == "default" else ())]
    models = [policy.models[name] for name in dict.fromkeys(names) if name in policy.models]
    who = [(m.provider, m.base_url, m.upstream_model) for m in models]
    digest = hashlib.sha256(msgspec.json.encode([[*names], who])).hexdigest()[:16]
    return f"{plan.route}@{digest}"
