"""The routing-pattern section of the analyze report: its metrics.json entries, definitions, tables and figures.

:func:`usmoe_lp.report.analyze_report.write_analyze_report` calls in here: :func:`pattern_definitions` extends the
definitions registry, :func:`layer_metrics` / :func:`result_metrics` give the section's JSON (each layer's
``patterns`` — :meth:`usmoe_lp.diagnostics.patterns.PatternStats.to_json`: ``coactivation_lift``,
``vocab_specialisation``, ``domain_specialisation``, ``locality`` with ``expert_reuse_rate`` and ``lru_hit_rate`` —
and the per layer pair ``layer_transition_mi``, beside what was not computed, ``unavailable``),
:func:`pattern_figures` the PNGs and :func:`pattern_blocks` the section as report blocks
(:mod:`usmoe_lp.report.markup`: one text for report.md and report.html).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from usmoe_lp.report.markup import Bullets, Figure, Heading, Paragraph, Table
from usmoe_lp.report.pattern_figures import (
    plot_coactivation_lift,
    plot_domain_shares,
    plot_locality,
    plot_transition_mi,
    plot_vocab_specialisation,
)

__all__ = ["PATTERN_CAPTIONS", "layer_metrics", "pattern_blocks", "pattern_definitions", "pattern_figures",
           "pattern_tables", "result_metrics"]

OLMOE = "OLMoE, Muennighoff et al. 2024, arXiv 2409.02060 §5"
LRU = "Eliseev & Mazur 2023, arXiv 2312.17238 §3.1 (LRU expert cache); Mattson et al. 1970 (stack distances)"
THIS = "this project"
ANCHOR = "routing-patterns"

# key -> (definition, unit, source); each cites its subsection of docs/definitions.md's "Routing patterns"
_NEW: dict[str, tuple[str, str, str]] = {
    "patterns": ("in a layer: the routing patterns of the model's own selection over every token (co-activation, "
                 "vocabulary and domain specialisation, locality); in `config`: whether they were measured",
                 "object / bool", THIS),
    "unavailable": ("analysis -> why it was not computed: on a selection log (the experts each token was routed to, "
                    "no router logits) the analyses that need logits; their values are null", "object of strings",
                    THIS),
    "pair": ("the two consecutive analysed layers (l, l+1) of a transition", "list of layer names", THIS),
    # co-activation
    "coactivation_lift": ("co-activation of expert pairs over all unordered pairs of each token's selection: lift "
                          "C[i,j] T / (c_i c_j), C[i,j] the tokens that selected both (CoactivationStats)", "object",
                          f"{OLMOE} (OLMoE's script counts rank-adjacent pairs only)"),
    "mean_lift": ("sum_{i<j} C[i,j] lift[i,j] / pairs: the lift of a co-activated pair drawn at random",
                  "ratio (1 = independent)", OLMOE),
    "max_lift": ("the largest off-diagonal lift", "ratio (1 = independent)", OLMOE),
    "max_lift_pair": ("the expert pair (i, j), i < j, of max_lift", "pair of expert indices", THIS),
    "top_partner": ("per expert i, the j != i maximising P(j | i) = C[i,j] / c_i (-1 when undefined), (N,)",
                    "expert index", OLMOE),
    "top_partner_conditional": ("per expert i, P(top_partner | i), (N,)", "probability", OLMOE),
    "mean_top_conditional": ("mean over used experts of top_partner_conditional", "probability", OLMOE),
    # transitions
    "layer_transition_mi": ("per pair of consecutive layers: the mutual information between the expert of layer l "
                            "and of layer l+1 of a token, each drawn uniformly from the token's selection, tokens "
                            "pooled (TransitionStats)", "list of objects", THIS),
    "num_experts_a": ("N of the first layer of the pair", "count of experts", THIS),
    "num_experts_b": ("N of the second layer of the pair", "count of experts", THIS),
    "skipped_tokens": ("tokens with no expert in either layer, left out", "count of tokens", THIS),
    "mutual_information": ("I(e; e') = sum P(e,e') log(P(e,e') / (P(e) P(e'))) of the pooled joint distribution",
                           "nats (0 = independent)", THIS),
    "entropy_a": ("H of the first layer's marginal P(e)", "nats", THIS),
    "entropy_b": ("H of the second layer's marginal P(e')", "nats", THIS),
    "mi_normalised": ("mutual_information / min(entropy_a, entropy_b)", "share in [0, 1]", THIS),
    "top1_tokens": ("tokens with a top-1 expert in both layers", "count of tokens", THIS),
    "top1_mutual_information": ("the mutual information of the two layers' top-1 experts", "nats", THIS),
    "top1_mi_normalised": ("top1_mutual_information / min of the top-1 marginal entropies", "share in [0, 1]",
                           THIS),
    # vocabulary
    "vocab_specialisation": ("OLMoE's token specialisation: for token ids seen >= min_count times, the share of "
                             "their occurrences whose top-1 expert is the id's most frequent one (VocabStats)",
                             "object", OLMOE),
    "min_count": ("occurrences a token id needs to enter the specialisation", "count of tokens", OLMOE),
    "usable_tokens": ("tokens with a known id (>= 0) and a top-1 expert", "count of tokens", THIS),
    "unknown_tokens": ("tokens whose id the log does not know (-1)", "count of tokens", THIS),
    "no_expert_tokens": ("tokens of a known id with no expert", "count of tokens", THIS),
    "vocab_size": ("distinct token ids among the usable tokens", "count of ids", THIS),
    "eligible_ids": ("token ids seen >= min_count times", "count of ids", OLMOE),
    "eligible_tokens": ("occurrences of the eligible ids", "count of tokens", OLMOE),
    "specialisation": ("mean over eligible ids v of max_e n(v,e) / n_v, n(v,e) the occurrences of v with top-1 e",
                       "share (1/N .. 1)", OLMOE),
    "specialisation_weighted": ("sum_v max_e n(v,e) / sum_v n_v over eligible ids (occurrence-weighted)",
                                "share (1/N .. 1)", OLMOE),
    "expert_ids": ("per expert, the eligible ids whose favourite top-1 expert it is, (N,)", "count of ids", OLMOE),
    "expert_specialisation": ("per expert, the mean specialisation of the ids that favour it (None where none), "
                              "(N,)", "share", OLMOE),
    "expert_token_entropy": ("per expert, H of the token ids it receives as top-1, (N,)", "nats", THIS),
    "expert_token_entropy_normalised": ("expert_token_entropy / log vocab_size, (N,)", "share in [0, 1]", THIS),
    # domains
    "domain_specialisation": ("per domain d and expert e, share_d(e) = k_d c_e^(d) / sum_e c_e^(d) (the share of "
                              "the domain's tokens routed to e) against uniform k_d / N (DomainStats); null without "
                              "domain labels", "object", f"{OLMOE} (domain specialisation)"),
    "domain_names": ("the domain labels, index d = position", "list of strings", THIS),
    "unlabelled_tokens": ("tokens of sequences without a domain label, left out", "count of tokens", THIS),
    "domain_tokens": ("T_d, the tokens of each domain, (D,)", "count of tokens", THIS),
    "share": ("share_d(e) = c_e^(d) / T_d, (D, N)", "share of the domain's tokens", OLMOE),
    "uniform_share": ("k_d / N, the share if every expert were used alike, (D,)", "share", OLMOE),
    "max_share_ratio": ("max_e share_d(e) / (k_d / N), (D,)", "ratio (1 = uniform)", THIS),
    "tv_distance": ("(1/2) sum_e |q_d(e) - q(e)|, the domain's expert distribution against all domains', (D,)",
                    "distance in [0, 1]", THIS),
    "mean_tv_distance": ("mean of tv_distance over the domains with a selection", "distance in [0, 1]", THIS),
    # locality
    "locality": ("routing locality along each sequence: expert reuse and LRU cache hit rates (LocalityStats)",
                 "object", LRU),
    "expert_reuse_rate": ("mean over consecutive token pairs of a sequence of |S_t ∩ S_t-1| / |S_t|",
                          "share of a token's experts", LRU),
    "reuse_baseline": ("the reuse rate of independent draws with the layer's marginals: sum_e c_e^2 / (T sum_e c_e)",
                       "share of a token's experts", THIS),
    "reuse_pairs": ("consecutive token pairs averaged by expert_reuse_rate", "count of pairs", THIS),
    "reuse_skipped": ("consecutive pairs whose later token has no expert", "count of pairs", THIS),
    "lru_hit_rate": ("entry m-1: hits / accesses of a per-sequence LRU cache of the m most recently used experts, "
                     "m = 1..N (first uses miss), (N,)", "share of expert accesses", LRU),
    "lru_hit_rate_at_k": ("lru_hit_rate at a cache of m = k experts (report column)", "share of expert accesses",
                          LRU),
    "recency_histogram": ("accesses whose expert had r more recently used experts before the token, r = 0..N-1",
                          "count of accesses", LRU),
    "cold_misses": ("first uses of an expert in a sequence (a miss at every cache size)", "count of accesses", LRU),
    "accesses": ("(token, selected expert) accesses", "count of accesses", LRU),
}

# keys already defined elsewhere in metrics.json that the pattern statistics also use, with their meaning there
_SHARED: dict[str, str] = {
    "pairs": "in `coactivation_lift`: co-activated expert pairs, sum_{i<j} C[i,j]",
    "counts": "in `domain_specialisation`: c_e^(d), the tokens of domain d that selected e, (D, N)",
    "experts_per_token": "in `domain_specialisation`: k_d, the domain's mean experts per token, (D,)",
    "token_entropy": "in `vocab_specialisation`: H of the token ids of the usable tokens, in nats",
}


_SECTIONS: dict[str, tuple[str, ...]] = {
    "co-activation": ("coactivation_lift", "mean_lift", "max_lift", "max_lift_pair", "top_partner",
                      "top_partner_conditional", "mean_top_conditional"),
    "layer-transitions": ("layer_transition_mi", "pair", "num_experts_a", "num_experts_b", "skipped_tokens",
                          "mutual_information", "entropy_a", "entropy_b", "mi_normalised", "top1_tokens",
                          "top1_mutual_information", "top1_mi_normalised"),
    "vocabulary-specialisation": ("vocab_specialisation", "min_count", "usable_tokens", "unknown_tokens",
                                  "no_expert_tokens", "vocab_size", "eligible_ids", "eligible_tokens",
                                  "specialisation", "specialisation_weighted", "expert_ids", "expert_specialisation",
                                  "expert_token_entropy", "expert_token_entropy_normalised"),
    "domain-specialisation": ("domain_specialisation", "domain_names", "unlabelled_tokens", "domain_tokens", "share",
                              "uniform_share", "max_share_ratio", "tv_distance", "mean_tv_distance"),
    "locality": ("locality", "expert_reuse_rate", "reuse_baseline", "reuse_pairs", "reuse_skipped", "lru_hit_rate",
                 "lru_hit_rate_at_k", "recency_histogram", "cold_misses", "accesses"),
}
"""The subsection of docs/definitions.md's "Routing patterns" defining each key (the others: the section)."""
_ANCHOR_OF = {key: anchor for anchor, keys in _SECTIONS.items() for key in keys}


def pattern_definitions(existing: dict, make: Callable[[str, str, str, str], Any]) -> dict:
    """The definitions of the keys of this section: the new ones, and the existing ``existing`` entries of the keys
    it shares (their definition extended by the meaning here). ``make(definition, unit, source, anchor)`` builds an
    entry (:func:`usmoe_lp.report.analyze_report._d`; the anchor: a heading of docs/definitions.md)."""
    out = {key: make(text, unit, source, _ANCHOR_OF.get(key, ANCHOR)) for key, (text, unit, source) in _NEW.items()}
    for key, where in _SHARED.items():
        if key in existing:
            d = existing[key]
            out[key] = d._replace(definition=f"{d.definition}; {where}")
    return out


# ------------------------------------------------------------------------------- metrics.json
def layer_metrics(la) -> dict[str, Any]:
    """The section's entries of one layer of metrics.json: ``patterns`` (when measured) and ``unavailable`` (when
    an analysis could not run)."""
    out: dict[str, Any] = {}
    if getattr(la, "patterns", None) is not None:
        out["patterns"] = la.patterns.to_json()
    if getattr(la, "unavailable", None):
        out["unavailable"] = dict(la.unavailable)
    return out


def result_metrics(result) -> dict[str, Any]:
    """The section's top-level entries of metrics.json: ``layer_transition_mi`` (one record per pair of consecutive
    layers: ``pair`` and :meth:`TransitionStats.to_dict`) and ``unavailable``, each when there is one."""
    out: dict[str, Any] = {}
    transitions = getattr(result, "transitions", None) or {}
    if transitions:
        out["layer_transition_mi"] = [{"pair": [a, b], **s.to_dict()} for (a, b), s in transitions.items()]
    if getattr(result, "unavailable", None):
        out["unavailable"] = dict(result.unavailable)
    return out


def unavailable_lines(result) -> list[str]:
    """What was not computed and why, one line per cause (empty when everything ran): the analyses that share a
    cause (the reason's text before ``; ``, e.g. a selection log's missing logits) are named together, each with
    what of the missing input it needs.

    >>> from types import SimpleNamespace
    >>> unavailable_lines(SimpleNamespace(unavailable={"margins": "not computed: no logits; scores differ",
    ...                                                "collapse": "not computed: no logits; ranks"}))
    ['no logits: `margins` (scores differ), `collapse` (ranks).']
    """
    causes: dict[str, list[str]] = {}
    for name, why in (getattr(result, "unavailable", None) or {}).items():
        text = why[len("not computed: "):] if why.lower().startswith("not computed: ") else why
        cause, _, detail = text.partition("; ")
        causes.setdefault(cause, []).append(f"`{name}` ({detail})" if detail else f"`{name}`")
    return [f"{cause}: {', '.join(items)}." for cause, items in causes.items()]


# ------------------------------------------------------------------------------- tables
def _layers(result):
    return [la for la in result.layers if getattr(la, "patterns", None) is not None]


def pattern_tables(result) -> dict[str, pd.DataFrame]:
    """The section's tables: ``patterns`` (one row per layer), ``transitions`` (one row per layer pair) and
    ``domains`` (one row per domain, means over layers; empty without domain labels)."""
    rows = []
    for la in _layers(result):
        p = la.patterns
        c, v, loc = p.coactivation, p.vocab, p.locality
        k = min(la.top_k, p.num_experts)
        row = {"layer": la.layer, "tokens": c.tokens, "mean_lift": c.mean_lift, "max_lift": c.max_lift,
               "mean_top_conditional": c.mean_top_conditional, "specialisation": v.specialisation,
               "eligible_ids": v.eligible_ids, "expert_reuse_rate": loc.expert_reuse_rate,
               "reuse_baseline": loc.reuse_baseline,
               "lru_hit_rate_at_k": float(loc.lru_hit_rate[k - 1]) if len(loc.lru_hit_rate) else np.nan}
        if p.domain is not None:
            row["mean_tv_distance"] = p.domain.mean_tv_distance
        rows.append(row)
    trans = [{"pair": f"{a} → {b}", "tokens": s.tokens, "mutual_information": s.mutual_information,
              "mi_normalised": s.mi_normalised, "top1_mutual_information": s.top1_mutual_information,
              "top1_mi_normalised": s.top1_mi_normalised}
             for (a, b), s in (getattr(result, "transitions", None) or {}).items()]
    domain_stats = [la.patterns.domain for la in _layers(result) if la.patterns.domain is not None]
    domains = pd.DataFrame()
    if domain_stats:
        tv = np.array([np.asarray(d.tv_distance, dtype=float) for d in domain_stats])
        ratio = np.array([np.asarray(d.max_share_ratio, dtype=float) for d in domain_stats])
        with warnings.catch_warnings():  # a domain without tokens: NaN in every layer
            warnings.simplefilter("ignore", RuntimeWarning)
            tv_mean, ratio_max = np.nanmean(tv, axis=0), np.nanmax(ratio, axis=0)
        domains = pd.DataFrame({"domain": list(domain_stats[0].domain_names),
                                "domain_tokens": np.asarray(domain_stats[0].domain_tokens),
                                "tv_distance": tv_mean, "max_share_ratio": ratio_max})
    return {"patterns": pd.DataFrame(rows), "transitions": pd.DataFrame(trans), "domains": domains}


# ------------------------------------------------------------------------------- figures
PATTERN_CAPTIONS = {
    "coactivation_lift.png": "Co-activation lift of expert pairs (log2; 0 = chosen together as often as "
                             "independent choices would be).",
    "layer_transitions.png": "Mutual information between the experts of consecutive layers, per layer pair.",
    "vocab_specialisation.png": "Vocabulary specialisation: how consistently a token id goes to one top-1 expert, "
                                "per layer and per expert.",
    "domain_shares.png": "Expert use per domain against the uniform share k/N (log2; 0 = uniform).",
    "expert_locality.png": "Expert locality along sequences: LRU expert-cache hit rate against the cache size m "
                           "(m = k marked), and the reuse rate of consecutive tokens against independent draws.",
}
"""The section's figures (file name -> caption)."""


def pattern_figures(result) -> dict[str, Any]:
    """name.png -> matplotlib Figure of the section (those with nothing to show left out)."""
    layers = _layers(result)
    pairs = [(a, b, s) for (a, b), s in (getattr(result, "transitions", None) or {}).items()]
    figs = {
        "coactivation_lift.png": plot_coactivation_lift([(la.layer, la.patterns.coactivation) for la in layers]),
        "layer_transitions.png": plot_transition_mi(pairs),
        "vocab_specialisation.png": plot_vocab_specialisation([(la.layer, la.patterns.vocab) for la in layers]),
        "domain_shares.png": plot_domain_shares([(la.layer, la.patterns.domain) for la in layers]),
        "expert_locality.png": plot_locality([(la.layer, la.patterns.locality) for la in layers],
                                             [la.top_k for la in layers]),
    }
    return {k: v for k, v in figs.items() if v is not None}


# ------------------------------------------------------------------------------- the section
INTRO = ("Patterns of the model's own selection over every token of each layer (captured selections in their "
         "recorded rank order; recomputed ones ranked by the selection scores, ties to the lowest expert index). "
         "`mean_lift`: co-activation of expert pairs against independence (all pairs of a token's experts); "
         "`specialisation`: OLMoE's vocabulary specialisation (share of a token id's occurrences on its favourite "
         "top-1 expert, ids seen at least 10 times); `expert_reuse_rate` against `reuse_baseline` (independent "
         "draws with the layer's load) and `lru_hit_rate_at_k`: how often consecutive tokens of a sequence reuse "
         "experts, the hit rate of an LRU cache of k experts per sequence.")

TRANSITIONS_NOTE = ("Mutual information between the expert of layer l and of layer l+1 of a token (each drawn "
                    "uniformly from the token's selection), and of their top-1 experts; plug-in estimates, biased "
                    "upward by about (N-1)^2 / (2T) nats for independent layers.")

DOMAINS_NOTE = ("Per domain: its tokens (in every layer), `tv_distance` (mean over layers) between the domain's "
                "expert distribution and all domains', and `max_share_ratio` (largest over layers and experts) of "
                "the share of the domain's tokens on an expert to the uniform k/N.")


PATTERN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Co-activation and vocabulary", ("tokens", "mean_lift", "max_lift", "mean_top_conditional", "specialisation",
                                      "eligible_ids")),
    ("Locality and domains", ("expert_reuse_rate", "reuse_baseline", "lru_hit_rate_at_k", "mean_tv_distance")),
)
"""The column groups of the per-layer table (one table each, the layer repeated: a 1280 px page holds it)."""


def pattern_blocks(result, pngs) -> list:
    """The section as report blocks (none when the patterns were not measured). ``pngs``: figure name -> PNG bytes
    (or just the names, for Markdown); only this section's figures are taken. Ends with the definitions of the
    section's columns."""
    from usmoe_lp.report.analyze_report import definition_of  # the registry (it imports this module)

    tables = pattern_tables(result)
    if tables["patterns"].empty:
        return []
    blocks: list = [Heading("Routing patterns"), Paragraph(INTRO), Table(tables["patterns"], PATTERN_GROUPS)]
    if not tables["transitions"].empty:
        blocks += [Paragraph(TRANSITIONS_NOTE), Table(tables["transitions"])]
    if not tables["domains"].empty:
        blocks += [Paragraph(DOMAINS_NOTE), Table(tables["domains"])]
    for name in (n for n in PATTERN_CAPTIONS if n in pngs):
        data = pngs[name] if isinstance(pngs, dict) else b""
        blocks.append(Figure(name, data, PATTERN_CAPTIONS[name]))
    keys = dict.fromkeys(c for frame in tables.values() for c in frame.columns if c not in ("layer", "tokens"))
    defs = [(k, d) for k in keys if (d := definition_of(k)) is not None]
    blocks.append(Bullets(tuple(f"`{k}`: {d.definition} [{d.unit}] ({d.source}; {d.see})" for k, d in defs)))
    return blocks
