"""Evaluate the semantic cache's decision on hand-written pairs, as the gateway makes it.

For each file of pairs (``router_models.cache_pairs``), with the shipped router embedding
and the shipped verifier (ONNX, CPU provider):

* **cache simulation** (the headline): every source of the file stored in one index; each
  variant looked up as ``SemanticCache.lookup`` does: the 4 nearest stored prompts at
  cosine ≥ ``threshold``, the rules (``gateway.cache.structure``), the verifier at the
  policy's bar (``gateway.cache.semantic.ServeBar``). A paraphrase is *served* when its own source is served; a near
  miss served anything is a *false hit* (so is a paraphrase served another source's answer);
* per origin, language (English or not) and kind of edit, with 95 % bootstrap intervals
  (resampling sources, 2,000 draws);
* **unrelated sources**: random pairs of two different sources of the file (English and
  other languages apart) judged by the rules and the verifier with no similarity floor;
  any served is a wrong answer a sparse cache could give;
* a sweep over ``verify_threshold`` (with the policy's matched and close thresholds
  following it, and with one threshold for every candidate), and the embedding alone over its threshold (the
  baseline: the nearest stored prompt at cosine ≥ t, no rules, no verifier), drawn as ``--figure``.

    python -m router_models.cache_eval --pairs router_models/data/semantic_cache/test_fresh.jsonl \
        --second-half ../shared/data/semantic-cache/dev_pairs.jsonl      # development
    python -m router_models.cache_eval --final    # the held-out test file, once
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from gateway.cache.semantic import NEAREST_CANDIDATES, VERIFIED_CANDIDATES, ServeBar
from gateway.cache.structure import conflicts, matched_structure, plain_text
from gateway.cache.verifier import DEFAULT_ARTIFACTS, PairVerifier, load_verifier
from gateway.classifier import Classifier, load_classifier
from gateway.config.schema import SEMANTIC_CUTOFFS, SemanticCachePolicy
from router_models.cache_pairs import Pair, load_pairs, second_half, source_key

DATA = Path(__file__).parent / "data" / "semantic_cache"
TEST_FILES = [DATA / "test_dec14.jsonl"]
"""The held-out test (2026-12-01, thirteenth: test_dec14a-e of five writers, less the 10
sources that repeat a text of another file). The earlier test files were read once each;
test_dec8, test_dec9 and test_dec10 train the shipped verifier, test_dec11, test_dec12 and
test_dec13 guided the ninth to eleventh rules."""
ROUTER_ARTIFACTS = Path(__file__).parents[1] / "gateway" / "classifier" / "artifacts"


@dataclass(slots=True)
class Looked:
    pair: Pair
    similarity: float
    """Cosine to its own source."""
    own_rank_ok: bool
    """Its own source is among the candidates (top 4 at cosine ≥ the floor)."""
    candidates: list[tuple[str, float, bool, float, bool]]
    """(source, cosine, judged (the rules allow it and it is the nearest they allow), p_same,
    numbers or options matched) per candidate, best cosine first."""


def load_models(verifier_dir: Path = DEFAULT_ARTIFACTS) -> tuple[Classifier, PairVerifier]:
    """The shipped router (for its embedding) and a verifier, on the CPU provider."""
    classifier = load_classifier(ROUTER_ARTIFACTS, prefer_gpu=False)
    verifier = load_verifier(verifier_dir, prefer_gpu=False)
    assert classifier is not None and verifier is not None
    return classifier, verifier


def look_up_all(pairs: list[Pair], threshold: float, classifier: Classifier, verifier: PairVerifier) -> list[Looked]:
    sources = sorted({p.source for p in pairs})
    stored = np.stack([classifier.score_batch_sync([s])[0].embedding for s in sources])
    looked = []
    for p in pairs:
        e = classifier.score_batch_sync([p.variant])[0].embedding
        cos = stored @ e
        order = [int(i) for i in np.argsort(-cos)[:NEAREST_CANDIDATES] if cos[i] >= threshold]
        allowed = [not conflicts(sources[i], p.variant) for i in order]
        same_text = {i for i in order if plain_text(sources[i]) == plain_text(p.variant)}  # no verdict needed
        checked = [i for i, ok in zip(order, allowed, strict=True) if ok][:VERIFIED_CANDIDATES]
        judged = [i for i in checked if i not in same_text]
        verdicts = dict(zip(judged, verifier.judge_sync([(sources[i], p.variant) for i in judged]), strict=True))
        p_same = {i: 0.0 if v.unsure else v.p_same for i, v in verdicts.items()} | dict.fromkeys(same_text, 1.0)
        candidates = [
            (sources[i], float(cos[i]), ok and i in checked, p_same.get(i, 0.0),
             matched_structure(sources[i], p.variant))
            for i, ok in zip(order, allowed, strict=True)
        ]  # fmt: skip
        own = float(cos[sources.index(p.source)])
        looked.append(Looked(p, own, any(c[0] == p.source for c in candidates), candidates))
    return looked


def served(item: Looked, t: ServeBar) -> str | None:
    """The source whose answer is served, or None."""
    passing = [c for c in item.candidates if c[2] and c[3] >= t.at(c[1], c[4])]
    return max(passing, key=lambda c: c[3])[0] if passing else None


def outcome(item: Looked, t: ServeBar) -> tuple[bool, bool]:
    """(right hit, wrong hit) for one variant."""
    source = served(item, t)
    if source is None:
        return False, False
    if item.pair.paraphrase and source == item.pair.source:
        return True, False
    return False, True


def rates(items: Sequence[Looked], t: ServeBar) -> tuple[float, float, int, int]:
    para = [i for i in items if i.pair.paraphrase]
    near = [i for i in items if not i.pair.paraphrase]
    hit = sum(outcome(i, t)[0] for i in para) / max(1, len(para))
    false = sum(outcome(i, t)[1] for i in near) / max(1, len(near))
    return hit, false, len(para), len(near)


def bootstrap(items: Sequence[Looked], t: ServeBar, draws: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    by_source: dict[str, list[Looked]] = defaultdict(list)
    for i in items:
        by_source[source_key(i.pair)].append(i)
    keys = sorted(by_source)
    rng = random.Random(seed)
    hits, falses = [], []
    for _ in range(draws):
        sample = [i for k in rng.choices(keys, k=len(keys)) for i in by_source[k]]
        h, f, _, _ = rates(sample, t)
        hits.append(h)
        falses.append(f)
    return {
        "paraphrases_served_ci95": [float(np.quantile(hits, 0.025)), float(np.quantile(hits, 0.975))],
        "near_misses_served_ci95": [float(np.quantile(falses, 0.025)), float(np.quantile(falses, 0.975))],
    }


def embedding_only(items: Sequence[Looked], t: float) -> tuple[float, float]:
    """The baseline: serve the nearest stored prompt at cosine ≥ t, no rules, no verifier."""
    para = [i for i in items if i.pair.paraphrase]
    near = [i for i in items if not i.pair.paraphrase]

    def top(i: Looked) -> str | None:
        return i.candidates[0][0] if i.candidates and i.candidates[0][1] >= t else None

    return (
        sum(top(i) == i.pair.source for i in para) / max(1, len(para)),
        sum(top(i) is not None for i in near) / max(1, len(near)),
    )


def unrelated_served(
    pairs: list[Pair], t: ServeBar, verifier: PairVerifier, most: int = 600, seed: int = 0
) -> dict[str, object]:
    """How often the rules and the verifier would serve one source's answer for another,
    unrelated source (English sources paired with English ones, the others with each other), with no
    similarity floor: what guards a lookup whose nearest stored prompt is merely the least
    far. Up to ``most`` random pairs per group."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for source in sorted({(p.source, p.lang) for p in pairs}):
        by_group["en" if source[1] == "en" else "other"].append(source[0])
    rng = random.Random(seed)
    out: dict[str, object] = {}
    for group, sources in sorted(by_group.items()):
        candidates = [(a, b) for a in sources for b in sources if a != b]
        sample = rng.sample(candidates, min(most, len(candidates)))
        allowed = [(a, b) for a, b in sample if not conflicts(a, b)]
        verdicts = verifier.judge_sync(allowed) if allowed else []
        served = sum(
            not v.unsure and v.p_same >= t.at(0.0, matched_structure(a, b))  # far apart: not a close pair
            for (a, b), v in zip(allowed, verdicts, strict=True)
        )
        out[f"lang={group}"] = {"pairs": len(sample), "allowed_by_rules": len(allowed), "served": served}
    return out


def groups(items: list[Looked]) -> dict[str, list[Looked]]:
    out: dict[str, list[Looked]] = defaultdict(list)
    for i in items:
        out["all"].append(i)
        out[f"origin={i.pair.origin}"].append(i)
        out["lang=" + ("en" if i.pair.lang == "en" else "other")].append(i)
    return out


def report(items: list[Looked], t: ServeBar) -> dict[str, object]:
    table: dict[str, object] = {}
    for name, members in sorted(groups(items).items()):
        hit, false, n_para, n_near = rates(members, t)
        table[name] = {
            "paraphrases": n_para,
            "near_misses": n_near,
            "paraphrases_served": round(hit, 4),
            "near_misses_served": round(false, 4),
            **{k: [round(v, 4) for v in vs] for k, vs in bootstrap(members, t).items()},
        }
    edits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i in items:
        if not i.pair.paraphrase:
            edits[i.pair.edit][0] += 1
            edits[i.pair.edit][1] += outcome(i, t)[1]
    table["near_misses_served_by_edit"] = {
        e: f"{s}/{n}" for e, (n, s) in sorted(edits.items(), key=lambda kv: -kv[1][0])
    }
    para = [i for i in items if i.pair.paraphrase]
    table["paraphrase_losses"] = {
        "below_similarity_floor_or_not_top4": sum(not i.own_rank_ok for i in para),
        "refused_by_rules_or_not_the_nearest_allowed": sum(
            any(c[0] == i.pair.source and not c[2] for c in i.candidates) for i in para
        ),
        "refused_by_verifier": sum(
            any(c[0] == i.pair.source and c[2] and c[3] < t.at(c[1], c[4]) for c in i.candidates) for i in para
        ),
    }
    return table


_HIGH = (0.975, 0.98, 0.985, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999)
"""Past 0.975 the verifier's scores crowd together: the sweep reads them finer there."""


def sweep(items: list[Looked], policy: ServeBar) -> dict[str, list[list[float]]]:
    """Each row: threshold t, paraphrases served, near misses served. ``verifier``: the
    policy's bar with its base at t (the matched one as far below as the policy has it, the
    close one at least t); ``verifier_one_threshold``: t for every candidate."""
    grid = np.round(np.arange(0.3, 0.975, 0.025), 3).tolist() + list(_HIGH)
    offset = policy.base - policy.matched

    def policy_at(t: float) -> ServeBar:
        return ServeBar(
            t,
            max(0.0, t - offset),
            max(t, policy.close),
            policy.close_similarity,
            max(t, policy.far),
            policy.far_similarity,
        )

    return {
        "verifier": [[t, *rates(items, policy_at(t))[:2]] for t in grid],
        "verifier_one_threshold": [[t, *rates(items, ServeBar(t, t))[:2]] for t in grid],
        "embedding_only": [[t, *embedding_only(items, t)] for t in np.round(np.arange(0.80, 1.0, 0.01), 2).tolist()],
    }


def draw(curves: dict[str, dict[str, list[list[float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, right in zip(axes, (100, 10), strict=True):
        for name, curve in curves.items():
            for kind, style in (("verifier", "-o"), ("verifier_one_threshold", "--"), ("embedding_only", ":")):
                pts = curve[kind]
                label = f"{name}: {kind.replace('_', ' ')}"
                ax.plot([p[2] * 100 for p in pts], [p[1] * 100 for p in pts], style, ms=3, label=label)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.axhline(40.0, color="grey", lw=0.8)
        ax.set_xlabel("near misses served (false hits, %)")
        ax.set_ylabel("paraphrases served (%)")
        ax.set_xlim(0, right)
        ax.set_ylim(0, 100)
    axes[0].set_title("verifier threshold sweep vs the embedding's threshold alone")
    axes[1].set_title("the same, false hits up to 10 %")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", action="append", default=[], help="JSONL pairs, one evaluation each (repeatable)")
    parser.add_argument(
        "--second-half",
        action="append",
        default=[],
        help="JSONL pairs of which only the sources the verifier did not train on count (see verifier_train --half-of)",
    )
    parser.add_argument("--final", action="store_true", help="the held-out test files (report once)")
    parser.add_argument(
        "--verifier", type=Path, default=DEFAULT_ARTIFACTS, help="verifier artifacts (default: the shipped ones)"
    )
    for name in SEMANTIC_CUTOFFS:
        what = "the cosine floor, " if name == "threshold" else ""
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{what}instead of the policy's default")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--figure", type=Path, help="draw the sweep as PNG")
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in SEMANTIC_CUTOFFS if getattr(args, name) is not None}
    policy = msgspec.structs.replace(SemanticCachePolicy(), **given)
    files = [Path(p) for p in args.pairs] + (TEST_FILES if args.final else [])
    thresholds = ServeBar.of(policy)
    results: dict[str, object] = {
        "verifier": str(args.verifier),
        **{name: getattr(policy, name) for name in SEMANTIC_CUTOFFS},
    }
    curves = {}
    sets = {str(f): load_pairs([f]) for f in files}
    sets |= {f"{f} (second half)": second_half(load_pairs([f])) for f in args.second_half}
    if args.final:
        sets = {k: v for k, v in sets.items() if Path(k) not in TEST_FILES} | {"test": load_pairs(TEST_FILES)}
    classifier, verifier = load_models(args.verifier)
    for name, pairs in sets.items():
        items = look_up_all(pairs, policy.threshold, classifier, verifier)
        results[name] = {
            "at_policy": report(items, thresholds),
            "unrelated_sources": unrelated_served(pairs, thresholds, verifier),
            "sweep": sweep(items, thresholds),
        }
        curves[Path(name).name.replace(".jsonl", "")] = results[name]["sweep"]  # type: ignore[index]
        print(json.dumps({name: {k: results[name][k] for k in ("at_policy", "unrelated_sources")}}, indent=1))  # type: ignore[index]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.figure:
        draw(curves, args.figure)


if __name__ == "__main__":
    main()
