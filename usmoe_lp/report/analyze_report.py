"""Write an analysis as metrics.json, report.md, a self-contained report.html and PNG figures."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from usmoe_lp._json import json_ready
from usmoe_lp.logs.format import library_versions
from usmoe_lp.report.analyze_figures import (
    plot_experts_per_token,
    plot_layer_balance,
    plot_leakage_offsets,
    plot_load_heatmap,
    plot_spectra,
    plot_sweeps,
    pooled_rows,
    representative_labels,
    sweep_omissions,
)
from usmoe_lp.report.markup import (
    Bullets,
    Figure,
    Heading,
    Paragraph,
    Table,
    list_text,
    md_table,
    render_html,
    render_markdown,
)
from usmoe_lp.report.outputs import check_report_location, foreign_check, write_figures
from usmoe_lp.report.pattern_report import (
    PATTERN_CAPTIONS,
    layer_metrics,
    pattern_blocks,
    pattern_definitions,
    pattern_figures,
    result_metrics,
    unavailable_lines,
)
from usmoe_lp.staging import check_destination, staged_directory

SCHEMA = "usmoe-lp/analyze/1"

DOCS = "docs/definitions.md"
"""The repository's definitions page; every definition below cites a section of it (``see``)."""


class Definition(NamedTuple):
    """What a key of metrics.json means: a one-line ``definition`` (formula), its ``unit``, the
    ``source`` (paper or code) it follows, and ``see``: the section of the repository's docs
    (``docs/definitions.md#...``, ``docs/routers.md#...``) that defines it in full."""

    definition: str
    unit: str
    source: str
    see: str


def _d(definition: str, unit: str, source: str, anchor: str) -> Definition:
    return Definition(definition, unit, source, f"{DOCS}#{anchor}")


THIS = "this project"
MOEWATCH = "moewatch"
MEGATRON = "Megatron-LM routing_diagnostics"

# key -> Definition. Every key of metrics.json is one of these, a router parameter
# (router_parameter_definitions) or data (a layer name, a router label, an eps threshold, a library name).
DEFINITIONS: dict[str, Definition] = {
    # ------------------------------------------------------------------ layout and identifiers
    "schema": _d("format name and version of metrics.json", "string", THIS, "layout-of-metricsjson"),
    "source": _d("the analysed router log (its path as given) or 'in-memory logits'", "string", THIS,
                 "layout-of-metricsjson"),
    "model": _d("the captured model as the router log records it: name, family, revision", "object", THIS,
                "layout-of-metricsjson"),
    "name": _d("the model's name (transformers name or path) in `model`", "string", THIS, "layout-of-metricsjson"),
    "family": _d("the model family: the transformers model_type of the captured model (e.g. olmoe)", "string",
                 "transformers config.model_type", "three-kinds-of-family"),
    "revision": _d("the model's revision (commit) when recorded", "string", THIS, "layout-of-metricsjson"),
    "config": _d("the analysis settings (usmoe_lp.diagnostics.AnalyzeConfig)", "object", THIS, "analysis-settings"),
    "library_versions": _d("versions of Python and of the libraries the numbers depend on, by distribution name",
                           "object of strings", THIS, "layout-of-metricsjson"),
    "definitions": _d("this table: key -> definition, unit, source, see", "object", THIS, "layout-of-metricsjson"),
    "layer": _d("the MoE layer's name in the router log (a table row; `pooled` for all layers together)",
                "string", THIS, "layout-of-metricsjson"),
    "layers": _d("per MoE layer, keyed by the layer's name in the router log", "object", THIS,
                 "layout-of-metricsjson"),
    "pooled": _d("the statistics over all layers together (how each is pooled is said at its key)", "object", THIS,
                 "pooling-over-layers"),
    "note": _d("a sentence on how the pooled statistics are pooled", "string", THIS, "pooling-over-layers"),
    "load": _d("load balance of the model's own selection in this layer (LoadStats)", "object", THIS,
               "load-balance"),
    "load_over_layers": _d("load-balance metrics averaged over layers (expert e of one layer is not expert e of "
                           "another)", "object", THIS, "pooling-over-layers"),
    "load_pooled_tokens": _d("LoadStats of every layer's tokens in one set (as transformers pools its aux loss)",
                             "object", "transformers load_balancing_loss_func", "pooling-over-layers"),
    "collapse": _d("representation-collapse statistics of this layer's logits (CollapseStats)", "object", THIS,
                   "representation-collapse"),
    "margins": _d("decision margins of the model's top-k in this layer (MarginStats)", "object", MEGATRON,
                  "margins"),
    "counterfactual": _d("in a layer or `pooled`: one record per counterfactual router setting (the columns of "
                         "AnalyzeResult.counterfactual_frame); in `config`: whether re-routing ran", "list / bool",
                         THIS, "counterfactual-re-routing"),
    "leakage": _d("in a layer or `pooled`: prefix-consistency statistics per router label (LeakageStats); in "
                  "`config`: whether leakage ran", "object / bool", THIS, "leakage"),
    "cross_sequence": _d("per router label with a batch- or position-coupled program: how a sequence's routing "
                         "changes with the rest of its batch", "object", THIS, "cross-sequence-dependence"),
    "sample": _d("the per-sequence sample of this layer: whole sequences, the first of the log", "object", THIS,
                 "samples"),
    "native_agreement": _d("agreement of the registry's native router, re-run on the logits, with the selection "
                           "the log recorded (NativeAgreement)", "object", THIS, "native-agreement"),
    "params": _d("the router setting's own parameters (names as in docs/routers.md)", "object", THIS, "leakage"),
    "histogram": _d("log-spaced histogram of the top-k margins: `edges` and `counts`", "object", MEGATRON, "margins"),
    "edges": _d("bin edges of the margin histogram: 20 log-spaced bins per decade from 1e-8 to 1e3; bin 0 is "
                "[0, edges[0]), the last [edges[-1], inf)", "score units", THIS, "margins"),
    "counts": _d("in `load`: c_e, the token-expert assignments of each expert, (N,); in a `histogram`: tokens per "
                 "bin, len(edges) + 1", "count", THIS, "load-balance"),
    # ------------------------------------------------------------------ sizes and labels
    "num_experts": _d("N, the routed experts of the layer (shared experts excluded)", "count of experts", THIS,
                      "sizes-and-labels"),
    "top_k": _d("k, the model's experts per token (None where unknown)", "count of experts", THIS,
                "sizes-and-labels"),
    "k": _d("the model's experts per token, the budget unit of every router (matched budget: k per token)",
            "count of experts", THIS, "sizes-and-labels"),
    "score_function": _d("how the model turns logits into probabilities: softmax, sigmoid, softmax_topk or unknown",
                         "string", THIS, "sizes-and-labels"),
    "selection_source": _d("where the model's own selection comes from: recorded at capture, or recomputed as the "
                           "top-k of the selection scores", "string", THIS, "sizes-and-labels"),
    "tokens": _d("real tokens (padding excluded) the numbers beside it cover: the layer's, the sample's, a "
                 "router's routed tokens, or the tokens compared", "count of tokens", THIS, "sizes-and-labels"),
    "num_tokens": _d("T, real tokens accumulated (all layers' tokens when pooled)", "count of tokens", THIS,
                     "sizes-and-labels"),
    "num_sequences": _d("sequences analysed (those with at least one real token)", "count of sequences", THIS,
                        "sizes-and-labels"),
    "sequences": _d("sequences the numbers beside it cover (the sample's, or those compared)", "count of sequences",
                    THIS, "sizes-and-labels"),
    "batches": _d("batches of `batch_size` sequences routed together", "count of batches", THIS,
                  "cross-sequence-dependence"),
    "router": _d("the registry router's name (docs/routers.md)", "string", THIS, "sizes-and-labels"),
    "label": _d("the router setting's label, unique per setting (RouterConfig.label)", "string", THIS,
                "sizes-and-labels"),
    "group": _d("the group the router's program couples: token, sequence, batch or position", "string", THIS,
                "certificates"),
    "exact": _d("True if the router returns an optimum of its program (a certificate is expected), False for a "
                "heuristic (its gap to the optimum is reported)", "bool", THIS, "certificates"),
    "prefix_rule": _d("how the router decides on a prefix of a sequence (token_local, causal, global_topc, "
                      "expert_capacity, recompute), which sets how leakage is computed", "string", THIS, "leakage"),
    # ------------------------------------------------------------------ load balance
    "load_entropy": _d("H(l) / log N, l_e = c_e / sum_e c_e the load share of the selection (top-k counts)",
                       "fraction of log N (1 = uniform)", "moewatch's load entropy", "load-entropy"),
    "load_entropy_nats": _d("H(l) of the load share", "nats", "moewatch's load entropy", "load-entropy"),
    "entropy": _d("the load entropy H(l) / log N of the model's selection, as LoadStats names it (= load_entropy)",
                  "fraction of log N (1 = uniform)", "moewatch's load entropy", "load-entropy"),
    "entropy_nats": _d("H(l) in nats, as LoadStats names it (= load_entropy_nats)", "nats",
                       "moewatch's load entropy", "load-entropy"),
    "load_share": _d("l_e = c_e / sum_e c_e per expert, (N,)", "share of assignments", THIS, "load-entropy"),
    "token_entropy": _d("mean over tokens of H(q_t), q_t the token's probabilities normalised to sum 1",
                        "nats", "moewatch's entropy from logits", "routing-entropies"),
    "token_entropy_normalised": _d("token_entropy / log N", "fraction of log N", "moewatch's entropy from logits",
                                   "routing-entropies"),
    "mean_prob_entropy": _d("H(mean_t q_t) / log N, the entropy of the mean routing distribution",
                            "fraction of log N", MEGATRON, "routing-entropies"),
    "mean_prob_entropy_nats": _d("H(mean_t q_t)", "nats", MEGATRON, "routing-entropies"),
    "maxvio": _d("max_e c_e / mean_e c_e - 1", "ratio (0 = balanced)", "DeepSeek, arXiv 2408.15664", "maxvio"),
    "max_over_mean": _d("max_e c_e / mean_e c_e, zero-load experts counted in the mean", "ratio (1 = balanced)",
                        "moewatch and plumb-moe imbalance (plumb-moe leaves zero-load experts out)", "maxvio"),
    "cv": _d("population std_e(c_e) / mean_e(c_e)", "ratio (0 = balanced)", MEGATRON, "coefficient-of-variation"),
    "gini": _d("1 + 1/N - 2 sum_i (sum_{j<=i} c_(j)) / (N sum c), c ascending", "0 = balanced, (N-1)/N = collapse",
               "Megatron-LM routing_diagnostics, with the +1/N term it omits", "gini"),
    "dead_experts": _d("experts with c_e = 0", "count of experts", MEGATRON, "dead-and-cold-experts"),
    "cold_experts": _d("experts with load share l_e <= 0.001 (dead ones included)", "count of experts",
                       "moewatch's threshold", "dead-and-cold-experts"),
    "utilisation": _d("1 - dead_experts / N", "share of experts", THIS, "dead-and-cold-experts"),
    "experts_per_token": _d("histogram: tokens that got 0, 1, ..., N experts, (N+1,)", "count of tokens",
                            "this project (USMoE lets it vary, arXiv 2503.22996)", "experts-per-token"),
    "mean_experts_per_token": _d("selected pairs / tokens", "experts per token", THIS, "experts-per-token"),
    "zero_expert_rate": _d("share of tokens with no expert", "share of tokens",
                           "flaxformer fraction_tokens_left_behind", "experts-per-token"),
    "importance_cv2": _d("Var_e(Imp_e) / Mean_e(Imp_e)^2, Imp_e = sum_t p_te (population variance)",
                         "ratio (0 = balanced)", "Shazeer et al. 2017, arXiv 1701.06538", "importance-loss"),
    "aux_loss": _d("Switch/GShard N * sum_e f_e P_e, f_e = c_e / T (sums to k), P_e = mean_t p_te, this layer",
                   "dimensionless (k at perfect balance)",
                   "Switch eqs. 4-6, arXiv 2101.03961; transformers load_balancing_loss_func", "auxiliary-loss"),
    "aux_loss_pooled": _d("the same loss over all layers' tokens pooled into one set", "dimensionless",
                          "transformers load_balancing_loss_func", "auxiliary-loss"),
    "aux_loss_per_layer_mean": _d("mean over layers of the per-layer aux loss", "dimensionless",
                                  "OLMoE training scripts (allenai/OLMoE)", "auxiliary-loss"),
    "z_loss": _d("(1/T) sum_t (logsumexp_e z_te)^2", "logit units squared", "ST-MoE, arXiv 2202.08906", "z-loss"),
    # ------------------------------------------------------------------ representation collapse
    "max_rank": _d("min(T, N), the largest possible rank of the logit matrix", "count", THIS, "effective-rank"),
    "logit_spectrum": _d("singular values of the logits Z (T, N), descending", "logit units", THIS,
                         "effective-rank"),
    "logit_spectrum_centered": _d("singular values of the row-centred logits Z (I - 11^T / N)", "logit units",
                                  THIS, "effective-rank"),
    "logit_effective_rank": _d("exp(H(q)), q_i = sigma_i / sum_j sigma_j over the singular values of Z",
                               "dimensions (<= N)", "Roy & Vetterli 2007", "effective-rank"),
    "logit_effective_rank_centered": _d("effective rank of the row-centred logits (the part softmax sees)",
                                        "dimensions (<= N - 1)", "Roy & Vetterli 2007", "effective-rank"),
    "logit_effective_rank_column_centered": _d("effective rank of Z minus each expert's mean logit",
                                               "dimensions (<= N)", "Roy & Vetterli 2007", "effective-rank"),
    "hidden_dim": _d("d, the width of the captured pre-router hidden states (None without them)", "dimensions",
                     THIS, "effective-rank"),
    "hidden_spectrum": _d("singular values of the hidden states H (T, d), descending", "hidden units", THIS,
                          "effective-rank"),
    "hidden_effective_rank": _d("effective rank of the pre-router hidden states H", "dimensions (<= d)",
                                "Roy & Vetterli 2007", "effective-rank"),
    "probs_source": _d("the probabilities behind the expert cosines: softmax of the logits, or given by the caller",
                       "string", THIS, "expert-cosine"),
    "expert_cosine": _d("cos(P[:, i], P[:, j]) of the experts' probability columns over the tokens, (N, N)",
                        "cosine", "X-MoE, Chi et al. 2022, arXiv 2204.09179", "expert-cosine"),
    "mean_expert_cosine": _d("mean of expert_cosine over the N (N - 1) pairs i != j", "cosine in [0, 1]",
                             "X-MoE, Chi et al. 2022, arXiv 2204.09179", "expert-cosine"),
    "router_row_similarity": _d("mean over i != j of |cos(W_i, W_j)| of the router weight rows", "cosine in [0, 1]",
                                "arXiv 2605.12476", "expert-cosine"),
    "span_energy": _d("||H P_W||_F^2 / ||H||_F^2, hidden energy in the router row space", "share (1 = collapse)",
                      "X-MoE, Chi et al. 2022, arXiv 2204.09179", "span-energy"),
    "span_energy_isotropic": _d("rank(W) / d, the span energy of isotropic hidden states (baseline)", "share",
                                "X-MoE, Chi et al. 2022, arXiv 2204.09179", "span-energy"),
    # ------------------------------------------------------------------ margins
    "boundary_tokens": _d("tokens with a top-k boundary (all if k < N, none if k = N)", "count of tokens", MEGATRON,
                          "margins"),
    "mean_margin": _d("mean over tokens of s_(k) - s_(k+1), the k-th minus the (k+1)-th largest selection score",
                      "score units", "Megatron-LM router_diagnostics", "margins"),
    "median_margin": _d("median margin, read from the log-spaced histogram (relative error <= 10^(1/40))",
                        "score units", THIS, "margins"),
    "min_margin": _d("smallest margin over tokens", "score units", THIS, "margins"),
    "max_margin": _d("largest margin over tokens", "score units", THIS, "margins"),
    "mean_relative_margin": _d("mean of margin / s_(k) over tokens whose s_(k) > 0", "ratio",
                               "Megatron-LM router_diagnostics", "margins"),
    "relative_tokens": _d("tokens behind mean_relative_margin (s_(k) > 0)", "count of tokens", THIS, "margins"),
    "fragile_pairs": _d("per eps: token-expert decisions with |s_te - b_t| <= eps, b_t the midpoint of the token's "
                        "k-th and (k+1)-th scores", "count of decisions", THIS, "fragile-decisions"),
    "fragile_share": _d("per eps: fragile_pairs / (T N)", "share of decisions", THIS, "fragile-decisions"),
    "fragile@<eps>": _d("fragile_share of the layer at that eps (collapse table column; key: the eps)",
                        "share of decisions", THIS, "fragile-decisions"),
    "topc_margin_mean": _d("mean over groups of the c-th minus the (c+1)-th largest score of the router's global "
                           "top-c (global_topc prefix rule, sequence groups)", "score units",
                           "this project (Megatron-LM's boundary margin at the global cut)", "top-c-margin"),
    "topc_fragile@<eps>": _d("share of token-expert pairs within eps of the global top-c boundary (key: the eps)",
                             "share of pairs", THIS, "top-c-margin"),
    # ------------------------------------------------------------------ counterfactual re-routing
    "groups": _d("groups routed (sequences; batches or positions for coupled programs), each with a real token",
                 "count of groups", THIS, "counterfactual-re-routing"),
    "pairs": _d("selected token-expert pairs", "count of pairs", THIS, "counterfactual-re-routing"),
    "realised_kbar": _d("pairs / tokens: the experts per token the router actually used", "experts per token",
                        THIS, "counterfactual-re-routing"),
    "objective": _d("sum of the model's probabilities P over the selected pairs (the common currency of every "
                    "router)", "probability mass", "papers/routing-as-lp.md §1", "objective-and-coverage"),
    "own_objective": _d("sum of the router's own scores over its selection (its program's objective)",
                        "score units", "papers/routing-as-lp.md §1", "objective-and-coverage"),
    "probability_mass": _d("sum of P over the real tokens (= tokens for probabilities summing to 1)",
                           "probability mass", THIS, "objective-and-coverage"),
    "coverage": _d("objective / probability_mass", "share of probability mass", THIS, "objective-and-coverage"),
    "dropped_tokens": _d("real tokens with no expert", "count of tokens", THIS, "objective-and-coverage"),
    "drop_rate": _d("dropped_tokens / tokens", "share of tokens", "flaxformer fraction_tokens_left_behind",
                    "objective-and-coverage"),
    "budget_mismatch": _d("pairs - k * tokens (EC: N e - T k summed over sequences)", "count of pairs",
                          "papers/routing-as-lp.md §4.4", "objective-and-coverage"),
    "agreement": _d("mean over real tokens of the Jaccard similarity |A ∩ M| / |A ∪ M| of the router's expert set A "
                    "and the model's own M (1 when both are empty)", "similarity in [0, 1]", THIS, "agreement"),
    "agreement_tokens": _d("tokens the agreement averages over", "count of tokens", THIS, "agreement"),
    # ------------------------------------------------------------------ certificates
    "certificate": _d("how optimality was checked: closed_form (every group), lp_duals (every group, HiGHS duals), "
                      "lp_sample (sampled groups) or None (the router has no program)", "string",
                      "usmoe_lp.lp.certify", "certificates"),
    "certified_optimal": _d("groups whose selection the dual certificate proves optimal for the router's own "
                            "program", "count of groups", "usmoe_lp.lp.certify", "certificates"),
    "certified_total": _d("groups certified", "count of groups", "usmoe_lp.lp.certify", "certificates"),
    "max_certificate_gap": _d("largest dual bound minus objective over the certified groups (own scores)",
                              "score units", "usmoe_lp.lp.certify", "certificates"),
    "lp_checked": _d("groups also solved with HiGHS (the independent LP cross-check)", "count of groups",
                     "usmoe_lp.lp.solve", "certificates"),
    "lp_skipped": _d("groups passed over by the LP cross-check for their size", "count of groups", THIS,
                     "certificates"),
    "lp_failed": _d("LP solves that did not reach optimality", "count of groups", THIS, "certificates"),
    "max_lp_gap": _d("max |LP optimum - router objective| over the checked groups (own scores)", "score units",
                     "usmoe_lp.lp.solve", "certificates"),
    "lp_relative_gap": _d("sum (LP optimum - router objective) / sum LP optimum over the checked groups "
                          "(0 for exact routers)", "share of the optimum", THIS, "certificates"),
    # ------------------------------------------------------------------ leakage
    "flip_rate": _d("share of token-expert decisions that differ between routing the prefix 1..t (with its own "
                    "budget) and the whole sequence, at token t (in `cross_sequence`: with the batch vs alone)",
                    "share of decisions", THIS, "flip-rate"),
    "token_flip_rate": _d("share of tokens whose expert set differs between prefix and full routing",
                          "share of tokens", THIS, "flip-rate"),
    "jaccard_distance": _d("mean over tokens of 1 - |A ∩ B| / |A ∪ B| between the causal set A and the full-sequence "
                           "set B (0 for two empty sets)", "distance in [0, 1]", THIS, "jaccard-distance"),
    "leak_jaccard_distance": _d("the leakage jaccard_distance of the setting (counterfactual column)",
                                "distance in [0, 1]", THIS, "jaccard-distance"),
    "per_offset": _d("flip rate per offset T - t (index = number of future tokens)", "share of decisions", THIS,
                     "flip-rate"),
    "per_offset_count": _d("tokens at each offset", "count of tokens", THIS, "flip-rate"),
    "per_offset_token_flip_rate": _d("token flip rate per offset T - t", "share of tokens", THIS, "flip-rate"),
    "displacement_mean": _d("mean over steps t = 2..T of the earlier tokens whose expert set changes when token t "
                            "is appended", "tokens per step", THIS, "displacement"),
    "displacement_max": _d("largest displacement of one step", "tokens", THIS, "displacement"),
    "displacement_histogram": _d("steps with 0, 1, 2, ... displaced tokens", "count of steps", THIS, "displacement"),
    "displacement_steps": _d("appending steps counted (T - 1 per sequence)", "count of steps", THIS, "displacement"),
    "positions_sampled": _d("for the recompute rule on sequences longer than max_recompute_tokens: prefix "
                            "positions evaluated per sequence (0: every position)", "count of positions", THIS,
                            "prefix-rules"),
    "rule_mismatches": _d("sequences whose full routing under the entry's incremental prefix rule differed from "
                          "the router's own, so every prefix was re-routed instead (0 when the rule describes the "
                          "router)", "count of sequences", THIS, "prefix-rules"),
    "leak_positions_sampled": _d("positions_sampled of the setting's leakage (counterfactual column)",
                                 "count of positions", THIS, "prefix-rules"),
    "sampled_sequences": _d("sequences whose positions were sampled (recompute rule, longer than "
                            "max_recompute_tokens)", "count of sequences", THIS, "prefix-rules"),
    "cross_flip_rate": _d("flip_rate between routing a sequence with its batch (batch/position groups) and alone",
                          "share of decisions", THIS, "cross-sequence-dependence"),
    "cross_token_flip_rate": _d("token_flip_rate of the same comparison", "share of tokens", THIS,
                                "cross-sequence-dependence"),
    "cross_jaccard_distance": _d("jaccard_distance of the same comparison", "distance in [0, 1]", THIS,
                                 "cross-sequence-dependence"),
    "cross_tokens": _d("tokens of that comparison", "count of tokens", THIS, "cross-sequence-dependence"),
    "pairs_batch": _d("selected pairs of real tokens when routed with the batch", "count of pairs", THIS,
                      "cross-sequence-dependence"),
    "pairs_alone": _d("selected pairs of real tokens when each sequence is routed alone", "count of pairs", THIS,
                      "cross-sequence-dependence"),
    "kv_decode_token_flip_rate": _d("share of tokens whose expert set differs between the full-sequence routing "
                                    "(training) and the routing a KV-cache decoder computes one token per step",
                                    "share of tokens", "this project (papers/routing-as-lp.md §5.3)",
                                    "kv-cache-decode-mismatch"),
    "kv_decode_flip_rate": _d("share of token-expert decisions that differ in the same comparison",
                              "share of decisions", "this project (papers/routing-as-lp.md §5.3)",
                              "kv-cache-decode-mismatch"),
    # ------------------------------------------------------------------ native agreement
    "agreeing_tokens": _d("tokens whose native re-routing equals the recorded selection", "count of tokens", THIS,
                          "native-agreement"),
    "tied_tokens": _d("disagreeing tokens explained by a tie at the selection boundary", "count of tokens", THIS,
                      "native-agreement"),
    "rate": _d("agreeing_tokens / tokens", "share of tokens", THIS, "native-agreement"),
    # ------------------------------------------------------------------ settings (AnalyzeConfig)
    "routers": _d("the registry routers re-routed (docs/routers.md)", "list of names", THIS, "analysis-settings"),
    "alphas": _d("shorthand for the swept values of alpha (None: the default)", "list", THIS, "analysis-settings"),
    "kbars": _d("shorthand for the swept values of kbar (None: k/2 .. 3k/2 around the model's k)", "list", THIS,
                "analysis-settings"),
    "scopes": _d("shorthand for the swept values of scope", "list", THIS, "analysis-settings"),
    "sweep": _d("router parameter -> the values swept for every router that has it", "object", THIS,
                "analysis-settings"),
    "chunk_tokens": _d("tokens per streamed chunk", "count of tokens", THIS, "analysis-settings"),
    "sequence_tokens": _d("at most this many tokens per layer (whole sequences) enter the per-sequence analyses",
                          "count of tokens", THIS, "samples"),
    "batch_size": _d("sequences grouped for the batch and position groups", "count of sequences", THIS,
                     "analysis-settings"),
    "lp_sample": _d("groups per setting cross-checked with HiGHS", "count of groups", THIS, "certificates"),
    "lp_layers": _d("layers in which the LP cross-check runs (the first ones)", "count of layers", THIS,
                    "certificates"),
    "eps": _d("fragility thresholds of the margins", "score units", THIS, "fragile-decisions"),
    "hidden": _d("whether captured hidden states and router weights enter the collapse metrics", "bool", THIS,
                 "analysis-settings"),
    "threads": _d("whether the collapse Grams run in a worker thread (results are identical)", "bool", THIS,
                  "analysis-settings"),
    "max_recompute_tokens": _d("longest sequence the leakage recompute rule evaluates at every position; longer "
                               "ones are sampled", "count of tokens", THIS, "leakage"),
}


DEFINITIONS.update(pattern_definitions(DEFINITIONS, _d))  # the routing patterns' keys (usmoe_lp.report.pattern_report)


def router_parameter_definitions() -> dict[str, Definition]:
    """A definition for every parameter of the registry routers (keys of counterfactual records, of a
    leakage setting's ``params`` and of ``config.sweep``), from the routers' own
    :class:`~usmoe_lp.routers.Param` help; names that are also metrics keep the metric's definition."""
    from usmoe_lp.routers import ROUTERS

    owners: dict[str, list] = {}
    for entry in ROUTERS.values():
        for p in entry.params:
            owners.setdefault(p.name, []).append((entry.name, p))
    out = {}
    for name, pairs in owners.items():
        if name in DEFINITIONS:
            continue
        text = "; ".join(f"{router}: {p.help}" for router, p in pairs)
        kinds = sorted({p.kind.__name__ for _, p in pairs})
        out[name] = Definition(f"router parameter ({text}); in `config`, the values analyze swept (None: defaults)",
                               f"{'/'.join(kinds)} (router parameter)", "docs/routers.md",
                               f"docs/routers.md#{pairs[0][0]}")
    return out


def all_definitions() -> dict[str, Definition]:
    """:data:`DEFINITIONS` and the registry routers' parameters: what metrics.json's ``definitions`` holds."""
    return {**DEFINITIONS, **router_parameter_definitions()}


def definition_of(key: str, definitions: dict | None = None):
    """The definition of a metrics.json key: the key itself, or ``name@<eps>`` for ``name@0.01``-style keys."""
    table = all_definitions() if definitions is None else definitions
    if key in table:
        return table[key]
    base, at, _ = key.partition("@")
    return table.get(f"{base}@<eps>") if at else None


def _plain(obj) -> Any:
    """A statistics object as plain data: its ``to_dict()``, a dataclass's fields, or the object."""
    if obj is None or isinstance(obj, dict | list | str | int | float):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def metrics_dict(result) -> dict[str, Any]:
    """Every number of an :class:`~usmoe_lp.diagnostics.AnalyzeResult` as JSON-safe plain data, with
    ``definitions``: key -> definition, unit, source and ``see`` (its section of ``docs/definitions.md``
    or ``docs/routers.md``) for every key that occurs (:func:`all_definitions`)."""
    frame = result.counterfactual_frame()
    layers = {}
    for la in result.layers:
        cf = la.counterfactual
        layers[la.layer] = {
            "num_experts": la.num_experts, "top_k": la.top_k, "score_function": la.score_function,
            "tokens": la.num_tokens, "selection_source": la.selection_source,
            "load": _plain(la.load), "collapse": _plain(la.collapse), "margins": _plain(la.margins),
            "counterfactual": None if cf is None else _cf_records(frame, la.layer),
            "leakage": {label: _plain(s) for label, s in la.leakage.items()},
            "cross_sequence": {label: _plain(s) for label, s in la.cross_sequence.items()},
            "sample": {"sequences": la.sample_sequences, "tokens": la.sample_tokens},
        }
        native = getattr(la, "native_agreement", None)
        if native is not None:
            layers[la.layer]["native_agreement"] = _plain(native)
        layers[la.layer].update(layer_metrics(la))  # routing patterns, what was not computed
    lf = result.load_frame()
    mean_row = lf[lf["layer"] == "pooled"].drop(columns=["layer"]).to_dict(orient="records")
    pooled = {
        "note": "load_over_layers: balance metrics averaged over layers (expert e of one layer is not expert e of "
                "another); load_pooled_tokens: every layer's tokens in one set, as transformers' pooled aux loss",
        "load_over_layers": mean_row[0] if mean_row else None,
        "load_pooled_tokens": _plain(result.pooled_load),
        "aux_loss_pooled": result.aux_loss_pooled,
        "aux_loss_per_layer_mean": result.aux_loss_per_layer_mean,
        "counterfactual": None if result.pooled_counterfactual is None else _cf_records(frame, "pooled"),
        "leakage": {label: _plain(s) for label, s in result.pooled_leakage.items()},
    }
    cfg = result.config
    return json_ready({
        "schema": SCHEMA,
        "source": result.source,
        "model": result.model,
        "config": dict(vars(cfg)),
        "library_versions": library_versions(),
        "definitions": {k: d._asdict() for k, d in all_definitions().items()},
        "layers": layers,
        "pooled": pooled,
        **result_metrics(result),
    })


def _cf_records(frame: pd.DataFrame, layer: str) -> list[dict[str, Any]]:
    f = frame[frame["layer"] == layer].drop(columns=["layer"]) if not frame.empty else frame
    return f.to_dict(orient="records")


def make_figures(result) -> dict[str, Any]:
    """name.png -> matplotlib Figure (None entries skipped)."""
    cf = result.counterfactual_frame()
    shown = representative_labels(cf) or None
    pooled = pooled_rows(cf) if not cf.empty else cf
    routers = dict(zip(pooled["label"], pooled["router"], strict=True)) if not pooled.empty else None
    tokens = int(pooled["tokens"].max()) if not pooled.empty and "tokens" in pooled else None
    figs = {
        "load_heatmap.png": plot_load_heatmap(result.expert_load_frame(), tokens=result.layers[0].num_tokens),
        "layer_balance.png": plot_layer_balance(result.load_frame()),
        "experts_per_token.png": plot_experts_per_token(result.experts_per_token_frame(shown), routers=routers,
                                                        tokens=tokens),
        "leakage_per_offset.png": plot_leakage_offsets(result.leakage_offset_frame(), labels=shown, routers=routers),
        "sweeps.png": plot_sweeps(cf) if not cf.empty else None,
        "collapse_spectra.png": plot_spectra(result.spectrum_frame(), tokens=result.layers[0].num_tokens),
    }
    figs.update(pattern_figures(result))
    return {k: v for k, v in figs.items() if v is not None}


def figure_notes(result, names) -> dict[str, str]:
    """name.png -> what of the counterfactual settings the figure leaves out, and why (empty if nothing)."""
    cf = result.counterfactual_frame()
    if cf.empty:
        return {}
    labels = list(dict.fromkeys(pooled_rows(cf)["label"]))
    shown = representative_labels(cf)
    notes = {}
    left = [lb for lb in labels if lb not in shown]
    if left:
        text = (f"Shows {len(shown)} of the {len(labels)} router settings: every single setting and, of each router "
                "swept over a parameter, the series nearest its defaults; all settings are in the counterfactual "
                "table. Not shown: " + ", ".join(f"`{lb}`" for lb in left) + ".")
        for name in ("experts_per_token.png", "leakage_per_offset.png"):
            if name in names:
                notes[name] = text
    omitted = sweep_omissions(cf)
    if omitted and "sweeps.png" in names:
        notes["sweeps.png"] = "Left out of a panel where the value is undefined: " + "; ".join(omitted) + "."
    return notes


CAPTIONS = {
    "load_heatmap.png": "Expert load per layer: each expert's share of the layer's token-expert assignments (black "
                        "cells: dead experts, no assignment at all).",
    "layer_balance.png": "Routing entropy and load imbalance (MaxVio, Gini) per layer.",
    "experts_per_token.png": "Experts per token under each counterfactual router setting (0 = dropped token).",
    "leakage_per_offset.png": "Leakage: how often the routing of token t changes once later tokens are seen.",
    "sweeps.png": "Every counterfactual router setting against realised k-bar: coverage, drops, leakage, balance "
                  "(lines: routers swept over a numeric parameter; markers: single settings).",
    "collapse_spectra.png": "Singular spectra of the row-centred router logits per layer.",
}


ANALYZE_OWNED: tuple[str, ...] = (r"metrics\.json", r"report\.md", r"report\.html",
                                  *(re.escape(name) for name in (*CAPTIONS, *PATTERN_CAPTIONS)))
"""What an analyze report directory holds (see :func:`usmoe_lp.report.outputs.foreign_entries`)."""


def check_analyze_destination(out: str | Path, *, log: str | Path | None = None, overwrite: bool = False,
                              overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> None:
    """Raise :class:`~usmoe_lp.errors.OutputExists` unless ``out`` may receive an analyze report.

    ``out`` may be missing or empty; an earlier analyze report there needs ``overwrite``, and any
    other file there is refused (never deleted). ``out`` must not be (or lie inside) a router log,
    nor contain the analysed ``log``.
    """
    check_report_location(out, what="analyze report", inputs=() if log is None else (log,), out_flag=out_flag)
    check_destination(out, what="analyze report", overwrite=overwrite, foreign=foreign_check(ANALYZE_OWNED),
                      overwrite_flag=overwrite_flag)


def write_analyze_report(result, out: str | Path, *, title: str = "usmoe-lp analyze", overwrite: bool = False,
                         overwrite_flag: str = "overwrite=True") -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` (self-contained: figures embedded) and
    the PNG figures into the directory ``out``. Returns name -> path of every file written.

    The directory is built aside and swapped in only when complete (:mod:`usmoe_lp.staging`): a
    failure leaves an earlier report untouched, and a rerun leaves no figure of an earlier run. An
    existing non-empty ``out`` is replaced only with ``overwrite=True`` and only when it holds nothing
    but an earlier analyze report. The same result gives the same bytes whatever ``out`` is (no
    timings, no paths of the output in the files).
    """
    final = Path(out)
    check_analyze_destination(final, log=_log_path(result), overwrite=overwrite, overwrite_flag=overwrite_flag)
    with staged_directory(final, what="analyze report", overwrite=overwrite, foreign=foreign_check(ANALYZE_OWNED),
                          overwrite_flag=overwrite_flag) as tmp:
        names = _write_files(result, tmp, title)
    return {name: final / name for name in names}


def _log_path(result) -> Path | None:
    """The analysed router log's directory, when the result came from one on disk."""
    path = Path(result.source)
    return path if path.is_dir() else None


def _write_files(result, out: Path, title: str) -> list[str]:
    names = ["metrics.json"]
    (out / "metrics.json").write_text(json.dumps(metrics_dict(result), indent=1, allow_nan=False) + "\n")
    pngs = write_figures(make_figures(result), out)
    names.extend(pngs)
    tables = report_tables(result)
    (out / "report.md").write_text(_markdown(result, tables, pngs, title))
    (out / "report.html").write_text(_html(result, tables, pngs, title))
    return [*names, "report.md", "report.html"]


def report_tables(result) -> dict[str, pd.DataFrame]:
    """The tables of the report, as frames: per-layer load and collapse, counterfactual (pooled)."""
    load = result.load_frame()
    cols = [c for c in ("layer", "tokens", "load_entropy", "token_entropy", "maxvio", "cv", "gini", "max_over_mean",
                        "dead_experts", "aux_loss", "z_loss") if c in load]
    coll = result.collapse_frame().drop(columns=["max_rank", "median_margin"], errors="ignore")
    cf = result.counterfactual_frame()
    if not cf.empty:
        cf = cf[cf["layer"] == "pooled"]
        keep = [c for c in ("label", "realised_kbar", "coverage", "drop_rate", "agreement", "flip_rate",
                            "displacement_mean", "kv_decode_token_flip_rate", "cross_flip_rate", "topc_margin_mean",
                            "gini", "maxvio", "certified_optimal", "certified_total", "max_lp_gap") if c in cf]
        cf = cf[keep]
    return {"load": load[cols], "collapse": coll.dropna(axis=1, how="all"), "counterfactual": cf}


def summary_lines(result) -> list[str]:
    """Five lines that say what the analysis found (printed by the CLI and the demo). No router is
    named in advance: the lines compare whatever settings the analysis re-routed."""
    lines = []
    lf = result.load_frame()
    per = lf[lf["layer"] != "pooled"]
    worst = per.loc[per["maxvio"].idxmax()] if not per.empty else None
    lines.append(f"{len(result.layers)} layers x {result.layers[0].num_tokens} tokens, "
                 f"N = {result.layers[0].num_experts}, k = {result.layers[0].top_k}; "
                 f"load entropy {per['load_entropy'].min():.3f}-{per['load_entropy'].max():.3f} of log N")
    if worst is not None:
        lines.append(f"most imbalanced layer {worst['layer']}: MaxVio {worst['maxvio']:.2f}, Gini {worst['gini']:.3f}, "
                     f"{int(worst['dead_experts'])} dead experts")
    aux_p, aux_l = result.aux_loss_pooled, result.aux_loss_per_layer_mean
    if aux_p is not None:
        lines.append(f"aux loss pooled (transformers) {aux_p:.4f} vs per-layer mean (OLMoE) {aux_l:.4f}")
    cf = result.counterfactual_frame()
    pooled = pooled_rows(cf) if not cf.empty else cf
    if not pooled.empty:
        k = result.layers[0].top_k
        matched = matched_budget_rows(pooled, k)
        if not matched.empty:
            best = best_at_matched_budget(pooled, k)
            low = matched.loc[matched["coverage"].astype(float).idxmin()]
            lines.append(f"re-routing at the matched budget (realised k-bar within {MATCHED_TOLERANCE:.0%} of k = {k}, "
                         f"{len(matched)} of {len(pooled)} settings): coverage of the probability mass from "
                         f"{low['coverage']:.3f} ({low['label']}) to {best['coverage']:.3f} ({best['label']}, the "
                         f"best: {BEST_MEANS}; {_as_share(best.get('drop_rate'))} tokens dropped)")
        leaky = pooled.dropna(subset=["flip_rate"]) if "flip_rate" in pooled else pooled.iloc[:0]
        if not leaky.empty:
            w = leaky.loc[leaky["flip_rate"].astype(float).idxmax()]
            free = leaky[leaky["flip_rate"].astype(float) == 0.0]
            lines.append(f"leakage: {w['label']} flips {w['flip_rate']:.2%} of prefix decisions; "
                         f"{len(free)} of {len(leaky)} settings flip none")
    return lines[:5]


MATCHED_TOLERANCE = 0.02
"""Settings whose realised k-bar is within this share of the model's k count as at the matched budget."""

BEST_MEANS = "highest coverage of the probability mass at the matched budget"
"""What "best" means wherever a report names the best router setting (:func:`best_at_matched_budget`)."""


def matched_budget_rows(pooled: pd.DataFrame, k: int) -> pd.DataFrame:
    """The rows of a (pooled) counterfactual frame at the matched budget: realised k-bar within
    :data:`MATCHED_TOLERANCE` of ``k`` (|k-bar - k| <= 0.02 k), with a coverage."""
    if pooled.empty:
        return pooled
    kbar = pooled["realised_kbar"].astype(float)
    return pooled[(kbar - k).abs() <= MATCHED_TOLERANCE * k].dropna(subset=["coverage"])


def best_at_matched_budget(pooled: pd.DataFrame, k: int, router: str | None = None) -> pd.Series | None:
    """The best router setting of a (pooled) counterfactual frame, the one definition of "best" of every report:
    among the settings at the matched budget (:func:`matched_budget_rows`), of ``router`` only when given, the one
    with the highest ``coverage`` (share of the probability mass its selection covers; the first on ties).
    None when no setting qualifies."""
    rows = matched_budget_rows(pooled, k)
    if router is not None and not rows.empty:
        rows = rows[rows["router"] == router]
    return None if rows.empty else rows.loc[rows["coverage"].astype(float).idxmax()]


def _as_share(v) -> str:
    try:
        return f"{float(v):.1%}"
    except (TypeError, ValueError):
        return "–"


# ------------------------------------------------------------------------------- rendering
def _md_table(frame: pd.DataFrame) -> str:
    """A Markdown table (:func:`usmoe_lp.report.markup.md_table`; kept for the reports that import it here)."""
    return md_table(frame)


def _report_definitions(tables) -> list[tuple[str, Definition]]:
    """The definitions of the columns of the report's tables, in order of appearance."""
    keys = dict.fromkeys(c for frame in tables.values() for c in frame.columns)
    return [(k, d) for k in keys if (d := definition_of(k)) is not None]


DEFINITIONS_INTRO = (f"Definitions of the columns above; every key of metrics.json is defined in its `definitions` "
                     f"and, with formulas and sources, in {DOCS} of the usmoe-lp repository (the section is named "
                     f"after each definition).")

LOAD_NOTE = ("Row `pooled`: balance metrics are averaged over layers (expert e of one layer is not expert e of "
             "another); `aux_loss` there is transformers' pooled loss.")

COLLAPSE_NOTE = ("Per layer: effective ranks of the router logits and hidden states, expert and router-row cosines, "
                 "the top-k decision margin and the share of decisions within each eps of the top-k boundary "
                 "(`fragile@eps`).")

COUNTERFACTUAL_NOTE = ("Each router setting re-routes the captured logits; `coverage` is the share of probability "
                       "mass its selection covers, `flip_rate` its leakage, `certified_optimal` of "
                       "`certified_total` the groups whose selection the dual certificate proves optimal for the "
                       "router's own program. The table is cut in two (the label repeated) so it fits the page.")

COUNTERFACTUAL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Budget, coverage and load balance", ("realised_kbar", "coverage", "drop_rate", "agreement", "gini", "maxvio")),
    ("Leakage and optimality certificates", ("flip_rate", "displacement_mean", "kv_decode_token_flip_rate",
                                             "cross_flip_rate", "topc_margin_mean", "certified_optimal",
                                             "certified_total", "max_lp_gap")),
)
"""The column groups of the counterfactual table: one table each, the label repeated (a 1280 px page holds it)."""

SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("load", "Load balance (model's own selection)", LOAD_NOTE),
    ("collapse", "Collapse and margins", COLLAPSE_NOTE),
    ("counterfactual", "Counterfactual re-routing (pooled over layers)", COUNTERFACTUAL_NOTE),
)
"""The table sections of the report: table key, heading, the paragraph above the table (Markdown and HTML)."""


def _router_settings(result) -> str:
    """The counterfactual settings, per router: its label, or the values of the parameters it swept."""
    cf = result.counterfactual_frame()
    pooled = pooled_rows(cf) if not cf.empty else cf
    if pooled.empty:
        return "Counterfactual re-routing: off."
    parts = []
    for router, g in pooled.groupby("router", sort=False):
        if len(g) == 1:
            parts.append(f"`{g['label'].iloc[0]}`")
            continue
        swept = [(p, list(dict.fromkeys(_value_text(v) for v in g[p]))) for p in g.columns
                 if p in router_parameter_definitions() and len({_value_text(v) for v in g[p]}) > 1]
        parts.append(f"`{router}` ({len(g)} settings: " + "; ".join(f"{p} {list_text(v)}" for p, v in swept) + ")")
    return "Counterfactual routers (registry names and labels): " + ", ".join(parts) + "."


def _value_text(v) -> str:
    return f"{v:g}" if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) else str(v)


def _intro(result) -> list[str]:
    cfg = result.config
    la0 = result.layers[0]
    return [f"Source: `{result.source}`" + (f" (model {result.model.get('name')})." if result.model.get("name")
                                            else "."),
            f"Layers: {len(result.layers)}; tokens per layer: {la0.num_tokens}; experts: {la0.num_experts}; "
            f"top-k: {la0.top_k}; score function: {la0.score_function}; selection: {la0.selection_source}.",
            f"Counterfactual and leakage sample: {la0.sample_sequences} sequences, {la0.sample_tokens} tokens per "
            f"layer (whole sequences, the first of the log, until {cfg.sequence_tokens} tokens are reached).",
            _router_settings(result)]


def report_blocks(result, tables, pngs, title) -> list:
    """The report as blocks (:mod:`usmoe_lp.report.markup`), the one text both report.md and report.html render.
    ``pngs``: figure name -> PNG bytes (or just the names, for Markdown)."""
    notes = figure_notes(result, list(pngs))
    blocks: list = [Heading(title, 1), *[Paragraph(s) for s in _intro(result)],
                    *[Paragraph(f"Not computed: {s}") for s in unavailable_lines(result)],
                    Heading("Summary"), Bullets(tuple(summary_lines(result)))]
    for key, heading, note in SECTIONS:
        blocks += [Heading(heading), Paragraph(note),
                   Table(tables[key], COUNTERFACTUAL_GROUPS if key == "counterfactual" else ())]
    blocks += pattern_blocks(result, pngs)
    blocks.append(Heading("Figures"))
    for n in (n for n in pngs if n not in PATTERN_CAPTIONS):  # those of the routing patterns: in their section
        data = pngs[n] if isinstance(pngs, dict) else b""
        blocks.append(Figure(n, data, CAPTIONS.get(n, n), notes.get(n, "")))
    blocks += [Heading("Definitions"), Paragraph(DEFINITIONS_INTRO),
               Bullets(tuple(f"`{k}`: {d.definition} [{d.unit}] ({d.source}; {d.see})"
                             for k, d in _report_definitions(tables)))]
    return blocks


def _markdown(result, tables, pngs, title) -> str:
    return render_markdown(report_blocks(result, tables, pngs, title))


def _html(result, tables, pngs, title) -> str:
    return render_html(report_blocks(result, tables, pngs, title), title=title)
