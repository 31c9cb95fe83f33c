#include "tests/bench/decode_flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace icecache::bench {

absl::StatusOr<std::vector<int64_t>> ParseContexts(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t scale = 1;
    if (!part.empty() && (part.back() == 'k' || part.back() == 'K')) {
      scale = 1024;
      part.remove_suffix(1);
    }
    int64_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1 || n > (int64_t{1} << 24) / scale) {
      return absl::InvalidArgumentError(
          absl::StrCat("--contexts: '", part, scale > 1 ? "k" : "",
                       "' is not a token count (like 32768 or 32k, at most 16384k)"));
    }
    out.push_back(n * scale);
  }
  if (out.empty()) return absl::InvalidArgumentError("--contexts: empty list");
  return out;
}

DecodeFlags::DecodeFlags(CLI::App* app) {
  policies_ = absl::StrJoin(o_.policies, ",");
  // A flag given twice takes its last value, so arguments appended to a
  // preset command line override it (`deploy/dev.sh demo --tokens 8k`).
  app->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app->add_option("--mode", o_.mode, "socket (a daemon over its Unix socket) or in-process")
      ->capture_default_str();
  app->add_option("--spawn", o_.spawn, "start the icecached at PATH on a temporary socket")
      ->type_name("PATH");
  app->add_option("--socket", o_.socket, "a running daemon (default: the default socket)")
      ->type_name("PATH");
  app->add_option("--preset", o_.preset, "synthetic model preset (shape and content)")
      ->capture_default_str();
  app->add_option("--seed", o_.seed, "generator seed")->capture_default_str();
  app->add_option("--layers", o_.layers, "layers of the model (per-token figures are for these)")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--tokens,--contexts", contexts_,
                  "context lengths: prefill + decode steps (8k = 8192)")
      ->type_name("N[,N..]")
      ->capture_default_str();
  app->add_option("--steps", o_.steps, "decode steps per policy (the first is part of TT2T)")
      ->check(CLI::Range(2, 1000))
      ->capture_default_str();
  app->add_option("--policies", policies_,
                  "full, exact-token, or a selector name with optional layer reuse (mdci-r4) and "
                  "layer-group prefetch (mdci-r4+pf) and/or in-place writes (mdci-r4+ip)")
      ->type_name("P[,P..]")
      ->capture_default_str();
  app->add_option("--batch", batch_, "batch sizes of the batched-decode sweep (1 = none)")
      ->type_name("B[,B..]")
      ->capture_default_str();
  app->add_option("--batch-policy", o_.batch_policy, "policy of the batch sweep")
      ->capture_default_str();
  app->add_option("--batch-layers", o_.batch_layers, "layers per session of the batch sweep")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--budget", o_.budget,
                  "selected tokens per KV head and step (icecached's default session budget)")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--sink-tokens", o_.sink_tokens, "first tokens always selected")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--recent-tokens", o_.recent_tokens, "last tokens always selected")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--page-tokens,--page_tokens", o_.page_tokens, "tokens per page")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app->add_option("--reference-layers", o_.reference_layers,
                  "layers of the in-process companion that splits select / gather / RPC")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--quality-layers", o_.quality_layers,
                  "layers whose quality is measured (evenly spaced; their KV stays in this "
                  "process, every other layer's is generated when streamed)")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--daemon-config", o_.daemon_config,
                  "with --spawn: textproto appended to the daemon's config (e.g. 'quality { "
                  "enabled: false }')")
      ->type_name("TEXTPROTO");
  app->add_option("--ring-spin-us", o_.ring_spin_us,
                  "the client's ClientOptions::decode_ring_spin in microseconds (how long it "
                  "watches a ring for its answer before it sleeps); -1: the client's default")
      ->check(CLI::Range(-1, 100000))
      ->capture_default_str();
  app->add_flag("--daemon-prefault", o_.daemon_prefault,
                "with --spawn: the daemon faults its pool in at start (pool.prefault), sized "
                "to the KV it holds");
  app->add_option("--hold-prefill", o_.hold_prefill,
                  "on: generate the prefill once, hold it and stream it pipelined (the next "
                  "chunk sent while the last one's trees build; copies timed, no generation); "
                  "off: generate each chunk untimed and wait for its trees before the next; "
                  "auto: on where the daemon's KV and the held copy fit --memory-gib")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app->add_flag("--in-place-ab", o_.in_place_ab,
                "+ip policies write in place on odd steps and whole on even steps, into the "
                "same per-layer regions; the report gives both gathers (interleaved A/B)");
  app->add_flag("--prefetch-ab", o_.prefetch_ab,
                "+pf policies prefetch on odd steps and not on even ones (interleaved A/B of "
                "the later layers' calls); default: on every step");
  app->add_flag("--mdci-sketch", o_.mdci_sketch,
                "mdci sessions rank candidate pages from an int8 copy of the keys "
                "(MdciParams::sketch_scoring; --mode in-process only)");
  app->add_option("--mdci-pq", o_.mdci_pq,
                  "mdci sessions keep 4-bit product-quantised keys and select by scanning them, "
                  "this many x budget tokens' worth of pages scored exactly "
                  "(SessionConfig.selector.mdci.pq_factor; the calibrator's method duel puts the "
                  "tree on trial per head; the default is the daemon's); 0: the tree only")
      ->capture_default_str()
      ->check(CLI::Range(0.0f, 512.0f));
  app->add_option(
         "--mdci-carry-keep", o_.mdci_carry_keep,
         "mdci sessions: the selects that reuse a fresh one's candidates score its best "
         "this many x budget tokens' worth of them "
         "(SessionConfig.selector.mdci.carry_keep_factor; 0: every candidate; default: the "
         "daemon's)")
      ->check(CLI::Range(0.0f, 512.0f));
  app->add_flag("--companion-quality", o_.companion_quality,
                "the in-process companion runs the quality monitor (mdci at its own calibrated "
                "width; default: the fixed width). The table's split is the daemon's own either "
                "way");
  app->add_option("--memory-gib", o_.memory_gib,
                  "KV held at once (this process + daemon); longer contexts run fewer layers")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--json", o_.json, "write the figures as JSON")->type_name("FILE");
  app->add_option("--plot", o_.plot, "write TPOT and mass recall against context as SVG")
      ->type_name("FILE.svg");
  app->add_flag("!--no-progress", o_.progress, "no progress bars on stderr");
  app->add_flag("--rpc-overhead", o_.rpc_overhead,
                "only the RPC cost per layer message: the shared-memory ring and the gRPC "
                "stream against in-process, interleaved on the same state (first context)");
}

absl::StatusOr<DecodeBenchOptions> DecodeFlags::Options() const {
  DecodeBenchOptions o = o_;
  if (o.mode != "socket" && o.mode != "in-process") {
    return absl::InvalidArgumentError(
        absl::StrCat("--mode: '", o.mode, "' (expected socket or in-process)"));
  }
  if (o.mode == "in-process" && (!o.spawn.empty() || !o.socket.empty())) {
    return absl::InvalidArgumentError("--spawn and --socket are for --mode socket");
  }
  ASSIGN_OR_RETURN(o.contexts, ParseContexts(contexts_));
  for (int64_t t : o.contexts) {
    if (t <= o.steps + o.budget) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--contexts: ", t, " tokens leave no room for --budget ", o.budget, " and --steps"));
    }
  }
  o.policies = absl::StrSplit(policies_, ',', absl::SkipEmpty());
  if (o.policies.empty()) return absl::InvalidArgumentError("--policies: empty list");
  for (const std::string& p : o.policies) RETURN_IF_ERROR(ParseDecodePolicy(p).status());
  o.batch.clear();
  for (absl::string_view part : absl::StrSplit(batch_, ',', absl::SkipEmpty())) {
    int b = 0;
    if (!absl::SimpleAtoi(part, &b) || b < 1 || b > 256) {
      return absl::InvalidArgumentError(absl::StrCat("--batch: '", part, "' (1..256)"));
    }
    o.batch.push_back(b);
  }
  if (o.batch.empty()) o.batch = {1};
  std::sort(o.batch.begin(), o.batch.end());
  return o;
}

}  // namespace icecache::bench
