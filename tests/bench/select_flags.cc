#include "tests/bench/select_flags.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/cli.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "tests/bench/select_baselines_table.h"
#include "tests/bench/select_matrix.h"

namespace icecache::bench {
namespace {

absl::StatusOr<std::vector<int>> ParseIntList(const std::string& flag, const std::string& v) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(v, ',', absl::SkipEmpty())) {
    int x = 0;
    if (!absl::SimpleAtoi(part, &x)) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: '%s' is not an integer", flag, part));
    }
    out.push_back(x);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrFormat("%s: empty list", flag));
  return out;
}

// The baselines' knobs, in the flags' words (the selectors check them
// again, in SelectorConfig's words).
absl::Status CheckBaselineFlags(const BaselineParams& b) {
  struct Range {
    const char* flag;
    double value, lo, hi;
  };
  const Range ranges[] = {
      {"--pq-subspaces", double(b.pq_subspaces), 1, 1024},
      {"--pq-bits", double(b.pq_bits), 1, 8},
      {"--pq-rescore-factor", b.pq_rescore_factor, 1, 1e6},
      {"--snapkv-window", double(b.snapkv_window), 1, 1e9},
      {"--snapkv-kernel", double(b.snapkv_kernel), 1, 255},
      {"--magicpig-bits", double(b.magicpig_bits), 1, 16},
      {"--magicpig-tables", double(b.magicpig_tables), 1, 1024},
      {"--dci-candidate-factor", b.dci_candidate_factor, 1, 1e6},
  };
  for (const Range& r : ranges) {
    if (!(r.value >= r.lo && r.value <= r.hi)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s must be in [%g, %g], got %g", r.flag, r.lo, r.hi, r.value));
    }
  }
  if (b.snapkv_kernel % 2 == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--snapkv-kernel must be odd, got %d", b.snapkv_kernel));
  }
  return absl::OkStatus();
}

absl::Status CheckRanges(const SelectBenchOptions& o) {
  if (int(o.matrix) + int(o.baselines) + int(o.diagnose) > 1) {
    return absl::InvalidArgumentError("give one of --matrix, --baselines and --diagnose");
  }
  if (o.matrix || o.baselines || o.diagnose) {
    if (!o.synthetic.empty() || !o.dump_dir.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(o.matrix     ? "--matrix"
                       : o.diagnose ? "--diagnose"
                                    : "--baselines",
                       " runs the synthetic families (--families); drop --synthetic and --dump"));
    }
    const auto known = SyntheticFamilyNames();
    for (const std::string& f : o.families) {
      if (std::find(known.begin(), known.end(), f) == known.end()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("--families: unknown '%s' (known: %s)", f, absl::StrJoin(known, ",")));
      }
    }
    for (const std::string& w : o.widths) RETURN_IF_ERROR(ParseWidth(w).status());
    if (o.baselines && !o.widths.empty()) {
      return absl::InvalidArgumentError("--widths needs --matrix (not --baselines)");
    }
  } else if (o.synthetic.empty() == o.dump_dir.empty()) {
    return absl::InvalidArgumentError(
        "give exactly one of --synthetic PRESET or --dump DIR (or --matrix, or --baselines)");
  } else if (!o.families.empty() || !o.widths.empty() || !o.plot_path.empty()) {
    return absl::InvalidArgumentError(
        "--families, --widths and --plot need --matrix (--families and --plot: or --baselines)");
  }
  RETURN_IF_ERROR(CheckBaselineFlags(o.baseline));
  if (o.tokens < 0) {
    return absl::InvalidArgumentError(
        "--tokens must be >= 0 (0: 16384 synthetic tokens, or the whole dump)");
  }
  if (o.budget < 1) return absl::InvalidArgumentError("--budget must be >= 1");
  for (int p : o.page_tokens) {
    if (p < 1 || p > 256) {
      return absl::InvalidArgumentError(absl::StrFormat("--page-tokens %d outside [1, 256]", p));
    }
  }
  if (o.heads < 1 || o.heads > 1024)
    return absl::InvalidArgumentError("--heads must be in [1, 1024]");
  if (o.steps < 1 || o.steps > 100000)
    return absl::InvalidArgumentError("--steps must be in [1, 100000]");
  if (o.threads < 1 || o.threads > 256)
    return absl::InvalidArgumentError("--threads must be in [1, 256]");
  if (o.layer_reuse < 1 || o.layer_reuse > 128) {
    return absl::InvalidArgumentError("--layer-reuse must be in [1, 128]");
  }
  if (o.queries_per_step < 0 || o.queries_per_step > 64) {
    return absl::InvalidArgumentError(
        "--queries-per-step must be in [1, 64] (0: the data's group)");
  }
  if (o.sink_tokens < 0) return absl::InvalidArgumentError("--sink-tokens must be >= 0");
  if (o.chunk_tokens < 0) return absl::InvalidArgumentError("--chunk-tokens must be >= 0");
  if (!(o.quest_rescore_factor >= 0) || !std::isfinite(o.quest_rescore_factor)) {
    return absl::InvalidArgumentError("--quest-rescore must be finite and >= 0");
  }
  const auto& all = AllMethodNames();
  for (const std::string& s : o.selectors) {
    if (std::find(all.begin(), all.end(), s) == all.end()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--selectors: unknown '%s' (known: %s)", s, absl::StrJoin(all, ",")));
    }
  }
  return absl::OkStatus();
}

}  // namespace

SelectFlags::SelectFlags(CLI::App* app) {
  app->footer("Give exactly one of --synthetic, --dump or --matrix.");
  app->add_option("--synthetic", o_.synthetic, "synthetic KV preset (common/synthetic.h)");
  app->add_option("--dump", o_.dump_dir, "a KV dump directory (common/kv_dump.h)");
  app->add_option("--tokens", o_.tokens,
                  "synthetic: prefill tokens (0: 16384); dump: caps the context (0: all of it)");
  app->add_option("--budget", o_.budget, "token budget per KV head and step");
  app->add_option("--page-tokens", page_tokens_, "page sizes to run")->type_name("P[,P..]");
  app->add_option("--heads", o_.heads, "KV heads generated and measured (synthetic)");
  app->add_option("--steps", o_.steps, "decode steps: queries and 1-token inserts (synthetic)");
  app->add_option("--threads", o_.threads, "build threads, parallel over trees");
  app->add_option("--isa", o_.isa,
                  "kernels: auto (the CPU's widest), avx2 or avx512 (to compare the two in one "
                  "machine)")
      ->capture_default_str();
  app->add_option(
         "--selectors", selectors_,
         "comma-separated subset of: " + absl::StrJoin(AllMethodNames(), ",") + " (default: all)")
      ->type_name("LIST");
  app->add_option("--granularity", granularity_,
                  "page selectors run at each listed granularity: page (whole pages), token "
                  "(best tokens of the candidate pages, reported as NAME/token)")
      ->type_name("page,token")
      ->capture_default_str();
  app->add_option("--json", o_.json_path, "write the JSON report to FILE")->type_name("FILE");
  app->add_option("--layer-reuse", o_.layer_reuse, "one tree per head for G consecutive layers");
  app->add_option("--queries-per-step", o_.queries_per_step,
                  "query heads per KV head scored together (0: the data's group)");
  app->add_option("--sink-tokens", o_.sink_tokens, "sink tokens every method gets");
  app->add_option("--chunk-tokens", o_.chunk_tokens,
                  "tokens inserted in 16-token chunks after the steps");
  app->add_option("--seed", o_.seed, "generator seed (synthetic; 0: the preset's)");
  app->add_option("--kv-dtype", kv_dtype_, "dtype of the stored keys: f16, bf16, f32");
  app->add_option("--hnsw-m", o_.peer.hnsw_m, "peers: HNSW graph degree");
  app->add_option("--hnsw-efc", o_.peer.hnsw_ef_construction, "peers: HNSW build beam");
  app->add_option("--ivf-nlist", o_.peer.ivf_nlist, "peers: IVF lists (0: sqrt(prefill))");
  app->add_option("--pq-m", o_.peer.pq_m, "peers: IVFPQ sub-quantizers");
  app->add_option("--mdci-fov", o_.mdci.field_of_view, "mdci: field of view");
  app->add_option("--mdci-candidate-factor", o_.mdci.candidate_factor,
                  "mdci: candidates scored exactly, x budget");
  app->add_option("--mdci-normalized-descent", o_.mdci.normalized_descent,
                  "mdci: rank nodes by each query's normalised share (1) or the loudest query (0)");
  app->add_option("--mdci-calibrated-rest", o_.mdci.calibrated_rest,
                  "mdci: correct each query's estimated mass outside the candidates by the "
                  "estimate's error on the candidates (1) or not (0)")
      ->capture_default_str();
  app->add_option("--mdci-sketch", o_.mdci.sketch_scoring,
                  "mdci: rank the candidate pages from an int8 copy of the keys (1) or the fp16 "
                  "frames (0)")
      ->capture_default_str();
  app->add_option("--mdci-pq", o_.mdci.pq_factor,
                  "mdci: > 0 selects by a full scan of 4-bit product-quantised keys, scoring this "
                  "many x budget tokens' worth of the best pages exactly (MdciParams::pq_factor); "
                  "0: the tree's descent")
      ->capture_default_str();
  app->add_option("--mdci-query-basis", o_.mdci.query_basis,
                  "mdci with --mdci-pq: learn the queries' top directions and score the queries' "
                  "part there exactly in the scan (1), or the codes alone (0) "
                  "(MdciParams::query_basis)")
      ->capture_default_str();
  app->add_option("--mdci-carry", o_.mdci_carry,
                  "mdci: each fresh select's candidate pages are reused by this many selects of "
                  "the same tree after it (SelectParams::carry_steps; 0: every select fresh)")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  app->add_option("--mdci-carry-keep", o_.mdci.carry_keep_factor,
                  "mdci with --mdci-carry: the carried selects score the fresh one's best this "
                  "many x budget tokens' worth of candidate pages, by its exact scores "
                  "(MdciParams::carry_keep_factor; 0: every candidate)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--mdci-query-quotas", o_.mdci.query_quotas,
                  "mdci: each query of the group takes its share of the descent's nodes from its "
                  "own ranking (1) or one ranking for the group (0)");
  app->add_option("--mdci-locality-window", o_.mdci.locality_window,
                  "mdci layout: pages group similar keys within windows of this many positions "
                  "(0: across the whole context)");
  app->add_option("--mdci-refine-iters", o_.mdci.refine_iters,
                  "mdci layout: bulk-build re-assignments of keys against full centroids");
  app->add_option(
      "--mdci-augmented-routing", o_.mdci.augmented_routing,
      "mdci layout: route keys to nodes by MIPS-augmented (1) or plain L2 (0) distance");
  app->add_option("--mdci-target-mass", o_.mdci_target_mass,
                  "mdci: self-calibrate the width to this mass ratio vs exact-mdci (0: off)");
  app->add_option("--mdci-token-target-mass", o_.mdci_token_target_mass,
                  "--matrix: the token-granular calibrated policy's target against the exact "
                  "token oracle (0: as --mdci-target-mass)");
  app->add_option("--calibrate-every", o_.calibrate_every,
                  "mdci calibration: once warm, at least N steps between samples");
  app->add_option("--calibrate-max-every", o_.calibrate_max_every,
                  "mdci calibration: once warm, at most N steps between samples (floor rate)");
  app->add_option("--calibrate-confidence-z", o_.calibrate_confidence_z,
                  "calibration: a width misses when mean - z x standard error of its samples is "
                  "under the target (0: the mean alone)")
      ->capture_default_str();
  app->add_option("--calibrate-min-width", o_.calibrate_min_width,
                  "calibration: the narrowest width a head may settle on, x the selector's "
                  "own (heads start at 1)")
      ->capture_default_str();
  app->add_option("--calibrate-carry-z", o_.calibrate_carry_z,
                  "calibration: a head stops carrying candidates only when its carried samples "
                  "fall behind by z standard errors more than the margin (0: the means alone)")
      ->capture_default_str();
  app->add_option("--calibrate-warmup-every", o_.calibrate_warmup_every,
                  "calibration: the warm-up samples one selection in N")
      ->capture_default_str();
  app->add_option("--calibrate-max-increase", o_.calibrate_max_increase,
                  "calibration: a miss by much raises the width by up to this factor, x (1 - "
                  "ratio) / (1 - target) (1.5 or less: the fixed step of 1.5)")
      ->capture_default_str();
  app->add_option("--calibrate-confirm-every", o_.calibrate_confirm_every,
                  "calibration: a fresh width whose first sample misses the target takes its "
                  "second N selections on (0: at the steady interval)")
      ->capture_default_str();
  app->add_option("--calibrate-ranking-trial", o_.calibrate_ranking_trial,
                  "calibration: sampled steps that also try the other descent ranking (loudest "
                  "vs normalized) before the head keeps the better one (0: off; 8: measured)")
      ->capture_default_str();
  app->add_option("--calibrate-duel-fresh", o_.calibrate_duel_fresh,
                  "calibration: the method duel compares fresh selections' costs (1) or the mean "
                  "over all selections, carried ones included (0)")
      ->capture_default_str();
  app->add_option("--calibrate-method-duel", o_.calibrate_method_duel,
                  "calibration with --mdci-pq: put the tree on trial against the scan per head "
                  "and keep the cheaper that meets the target (1), or the scan only (0)")
      ->capture_default_str();
  app->add_option("--calibrate-exact-cost-ratio", o_.calibrate_exact_cost_ratio,
                  "calibration: a head whose width costs this share of the exact scan selects "
                  "exactly (0: only when the widest width misses; then no width or mass depends "
                  "on timing)")
      ->capture_default_str();
  app->add_option("--calibrate-share", o_.calibrate_share,
                  "mdci calibration: once warm, reference cost / selection cost to aim at");
  app->add_option("--steady-steps", o_.steady_steps,
                  "calibrated mdci: N more selections per tree after the measured steps (queries "
                  "replayed, mass not measured) for the steady-state sampling overhead");
  app->add_option("--calibrate-warmup", o_.calibrate_warmup,
                  "mdci calibration: the first N steps are all sampled");
  app->add_option("--mdci-m", o_.mdci.num_composite, "mdci: composite indices (m)");
  app->add_option("--mdci-l", o_.mdci.num_simple, "mdci: simple indices per composite (L)");
  app->add_option("--quest-rescore", o_.quest_rescore_factor,
                  "quest rescore factor (0: plain Quest)");
  app->add_flag("--matrix", o_.matrix,
                "robustness matrix: mdci, exact, exact-mdci, exact-token, quest and streaming on "
                "every synthetic family (select_matrix.h)");
  app->add_option("--families", families_,
                  "--matrix: comma-separated subset of: " +
                      absl::StrJoin(SyntheticFamilyNames(), ",") + " (default: all)")
      ->type_name("LIST");
  app->add_option(
         "--widths", widths_,
         "--matrix: mdci widths of the frontier, FOVxCF (field of view x candidate "
         "factor), 'exhaustive', or pqF (the product-quantised scan, MdciParams::pq_factor "
         "F), e.g. 32x8,128x16,512x32,pq8,exhaustive (default: none)")
      ->type_name("LIST");
  app->add_option("--frontier-token", o_.frontier_token,
                  "--matrix: run the --widths at token granularity too (the granularity "
                  "frontier; 0: page only)")
      ->capture_default_str();
  app->add_option("--plot", o_.plot_path, "--matrix: write the frontier as an SVG to FILE")
      ->type_name("FILE");
  app->add_flag("--diagnose", o_.diagnose,
                "where mdci's descent loses mass against the exact page reference, per family "
                "(--families) and width (--widths; default the configured one), and the width "
                "its ranking would need (select_diagnose.h)");
  app->add_flag("--baselines", o_.baselines,
                "comparison table: the baselines and mdci at budgets 256, 1024 and 25% of the "
                "context on every family of --families (select_baselines_table.h); --json and "
                "--plot name its outputs");
  app->add_option("--pq-subspaces", o_.baseline.pq_subspaces, "pqcache: sub-spaces (m)");
  app->add_option("--pq-bits", o_.baseline.pq_bits, "pqcache: bits per code (2^b centroids)");
  app->add_option("--pq-rescore-factor", o_.baseline.pq_rescore_factor,
                  "pqcache: tokens rescored exactly, x budget (1: the paper's top-k)");
  app->add_option("--snapkv-window", o_.baseline.snapkv_window, "snapkv: observation window");
  app->add_option("--snapkv-kernel", o_.baseline.snapkv_kernel, "snapkv: pooling kernel (odd)");
  app->add_option("--snapkv-avg-pool", o_.baseline.snapkv_avg_pool,
                  "snapkv: average pooling (1) or max pooling (0)");
  app->add_option("--magicpig-bits", o_.baseline.magicpig_bits, "magicpig: bits per table (K)");
  app->add_option("--magicpig-tables", o_.baseline.magicpig_tables, "magicpig: tables (L)");
  app->add_option("--dci-candidate-factor", o_.baseline.dci_candidate_factor,
                  "mdci-published: DCI candidates per query, x budget");
  app->add_flag("--verbose", o_.verbose, "print every sweep point of the peers");
  app->add_flag("--check", o_.check, "re-read the JSON and validate it (exit 1 when bad)");
}

absl::StatusOr<SelectBenchOptions> SelectFlags::Options() const {
  SelectBenchOptions o = o_;
  if (o.isa != "auto" && o.isa != "avx2" && o.isa != "avx512") {
    return absl::InvalidArgumentError(
        absl::StrCat("--isa must be auto, avx2 or avx512, got '", o.isa, "'"));
  }
  ASSIGN_OR_RETURN(o.page_tokens, ParseIntList("--page-tokens", page_tokens_));
  o.selectors = absl::StrSplit(selectors_, ',', absl::SkipEmpty());
  o.families = absl::StrSplit(families_, ',', absl::SkipEmpty());
  o.widths = absl::StrSplit(widths_, ',', absl::SkipEmpty());
  o.granularities.clear();
  for (absl::string_view g : absl::StrSplit(granularity_, ',', absl::SkipEmpty())) {
    absl::StatusOr<Granularity> parsed = ParseGranularity(std::string(g));
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--granularity: ", parsed.status().message()));
    }
    if (std::find(o.granularities.begin(), o.granularities.end(), *parsed) ==
        o.granularities.end()) {
      o.granularities.push_back(*parsed);
    }
  }
  if (o.granularities.empty()) {
    return absl::InvalidArgumentError("--granularity: give page, token or page,token");
  }
  absl::StatusOr<DType> dtype = ParseDType(kv_dtype_);
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-dtype: ", dtype.status().message()));
  }
  o.kv_dtype = *dtype;
  RETURN_IF_ERROR(CheckRanges(o));
  if (o.selectors.empty()) o.selectors = o.baselines ? BaselineTableMethods() : AllMethodNames();
  std::sort(o.page_tokens.begin(), o.page_tokens.end());
  o.page_tokens.erase(std::unique(o.page_tokens.begin(), o.page_tokens.end()), o.page_tokens.end());
  return o;
}

absl::StatusOr<SelectBenchOptions> ParseSelectArgs(const std::vector<std::string>& args) {
  CLI::App app("The page-selection benchmark.", "icecache-bench select");
  cli::Configure(app);
  SelectFlags flags(&app);
  RETURN_IF_ERROR(cli::ParseArgs(app, args));
  return flags.Options();
}

}  // namespace icecache::bench
