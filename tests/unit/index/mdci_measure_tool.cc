// Local tuning tool of the mdci selector (not a test, not the benchmark
// driver; tests/bench/ owns icecache-bench). For one layer of the synthetic
// generator it builds mdci, exact-mdci and positional exact per KV head, and
// prints build time (thread CPU time), select time, keys touched, attention-mass recall (mean
// over the G queries and steps) and index bytes per token.
// Built by CMake with the tests (target icecache-mdci-measure, in
// build/tests/unit/index/); run it with --help for the flags, e.g.
//   icecache-mdci-measure --tokens 131072 --kv-heads 2 --steps 8 --fov 32
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "common/cli.h"
#include "common/synthetic.h"
#include "server/index/kernels.h"
#include "server/index/mdci_selector.h"
#include "server/index/selector.h"
#include "tests/unit/index/mdci_test_util.h"

using namespace icecache;
#include <time.h>
// Thread CPU time: the machine is shared, wall time would count other jobs.
struct Clock {
  using time_point = double;
  static double now() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  }
};
static double Secs(double a, double b) { return b - a; }

struct MeasureFlags {
  int64_t tokens = 131072;
  int heads = 2;
  int steps = 8;
  int budget = 256;
  int page = 16;
  std::string preset = "llama3-8b-like";
  bool incremental = false;
  int64_t decode_from = 0;
  int64_t mass_from = 0;  // > 0: also the mass among positions from here on
  bool verbose = false;
};

void AddFlags(CLI::App& app, MeasureFlags* f, MdciParams* mp) {
  app.add_option("--tokens", f->tokens, "context tokens of the one layer generated");
  app.add_option("--kv-heads,--kv_heads", f->heads, "KV heads generated and measured");
  app.add_option("--steps", f->steps, "decode steps (queries) per head");
  app.add_option("--budget", f->budget, "token budget per KV head and step");
  app.add_option("--page", f->page, "tokens per page");
  app.add_option("--preset", f->preset, "synthetic preset");
  app.add_option("--fov", mp->field_of_view, "mdci field of view");
  app.add_option("--candidate-factor,--candidate_factor", mp->candidate_factor,
                 "candidates scored exactly, x budget");
  app.add_option("--spread", mp->spread_weight, "spread weight");
  app.add_option("--entry", mp->entry_nodes, "entry nodes");
  app.add_option("--cover", mp->cover_factor, "cover factor");
  app.add_option("--refine", mp->refine_iters, "refine iterations");
  app.add_option("--build-candidates,--build_candidates", mp->build_candidates, "build candidates");
  app.add_option("--route-fov,--route_fov", mp->route_fov, "routing field of view");
  app.add_option("--rank", mp->spread_rank, "spread rank");
  app.add_option("--window", mp->locality_window, "locality window");
  app.add_option("--augmented", mp->augmented_routing, "augmented routing (0/1)");
  app.add_flag("--incremental", f->incremental, "build by 64-token inserts instead of Build");
  app.add_option("--decode-from,--decode_from", f->decode_from,
                 "> 0: Build this many tokens, then insert the rest one token at a time");
  app.add_option("--mass-from,--mass_from", f->mass_from,
                 "> 0: also report the mass among positions from here on (default: "
                 "--decode-from)");
  app.add_option("--insert-route-fov,--insert_route_fov", mp->insert_route_fov,
                 "routing field of view of Insert (0 = --route-fov)");
  app.add_option("--insert-fit,--insert_fit", mp->insert_fit,
                 "a decode key that fits the nearest recent node with room within this factor "
                 "of its spread joins it unrouted (0 = route every key)");
  app.add_option("--pq", mp->pq_factor,
                 "mdci selects by the PQ scan with this pq_factor (0 = the tree's descent)");
  app.add_flag("--verbose", f->verbose, "print exact-mdci's page ranks under the tree estimate");
}

int main(int argc, char** argv) {
  CLI::App app("Local tuning tool of the mdci selector.", "icecache-mdci-measure");
  cli::Configure(app);
  MeasureFlags f;
  MdciParams mp;
  AddFlags(app, &f, &mp);
  if (auto code = cli::Parse(app, argc, argv)) return *code;
  const int64_t tokens = f.tokens;
  const int heads = f.heads;
  const int steps = f.steps;
  const int budget = f.budget;
  const int P = f.page;
  auto cfg = SyntheticPreset(f.preset);
  if (!cfg.ok()) {
    std::fprintf(stderr, "%s\n", cfg.status().ToString().c_str());
    return 1;
  }
  cfg->tokens = tokens;
  cfg->layers = 1;
  cfg->q_heads = cfg->q_heads / cfg->kv_heads * heads;
  cfg->kv_heads = heads;
  cfg->steps = steps;
  auto t0 = Clock::now();
  auto dump = GenerateSynthetic(*cfg);
  if (!dump.ok()) {
    std::fprintf(stderr, "%s\n", dump.status().ToString().c_str());
    return 1;
  }
  const int d = dump->head_dim, G = dump->group_size();
  std::printf("generated %lld tokens x %d heads (d=%d, G=%d) in %.1f s; kernels %s\n",
              (long long)tokens, heads, d, G, Secs(t0, Clock::now()), KernelIsa());
  const bool incremental = f.incremental;
  double sum_us_descent = 0;
  // Decode keys inserted, and those that joined a recent node unrouted
  // (insert_fit), over the mdci heads (Selector::insert_counts).
  double inserted_keys = 0, unrouted_keys = 0;
  double sum_insert_us = 0, decode_m = 0, decode_e = 0, region_share = 0;
  double sum_build = 0, sum_us_m = 0, sum_us_e = 0, sum_us_scan = 0;
  double mass_m = 0, mass_e = 0, mass_p = 0, touched = 0, bytes = 0, fill = 0;
  int n_sel = 0;
  for (int h = 0; h < heads; ++h) {
    const float* keys = dump->key(0, h);
    std::map<SelectorKind,
             std::pair<std::unique_ptr<mdci_test::TestPageKeys>, std::unique_ptr<Selector>>>
        sels;
    for (SelectorKind kind :
         {SelectorKind::kMdci, SelectorKind::kExactMdci, SelectorKind::kExact}) {
      SelectorConfig sc;
      sc.kind = kind;
      sc.head_dim = d;
      sc.page_tokens = P;
      sc.num_query_heads = G;
      sc.dtype = DType::kF16;
      sc.mdci = mp;
      auto pk = std::make_unique<mdci_test::TestPageKeys>(d, P, DType::kF16);
      auto s = Selector::Create(sc, pk.get());
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
        return 1;
      }
      std::vector<Placement> pl;
      auto b0 = Clock::now();
      absl::Status st;
      double insert_s = 0;
      if (f.decode_from > 0 && f.decode_from < tokens) {
        st = (*s)->Build(keys, f.decode_from, &pl);
        std::vector<Placement> one;
        auto i0 = Clock::now();
        for (int64_t i = f.decode_from; i < tokens && st.ok(); ++i) {
          st = (*s)->Insert(keys + i * d, 1, &one);
          pl.insert(pl.end(), one.begin(), one.end());
        }
        insert_s = Secs(i0, Clock::now());
      } else if (incremental && kind != SelectorKind::kExact) {
        std::vector<Placement> chunk;
        for (int64_t i = 0; i < tokens && st.ok(); i += 64) {
          const int64_t c = std::min<int64_t>(64, tokens - i);
          st = (*s)->Insert(keys + i * d, c, &chunk);
          pl.insert(pl.end(), chunk.begin(), chunk.end());
        }
      } else {
        st = (*s)->Build(keys, tokens, &pl);
      }
      const double bs = Secs(b0, Clock::now());
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return 1;
      }
      pk->Apply(keys, pl);
      if (kind == SelectorKind::kMdci) {
        sum_build += bs;
        sum_insert_us += insert_s * 1e6 / std::max<int64_t>(1, tokens - f.decode_from);
        bytes += static_cast<double>((*s)->index_bytes()) / tokens;
        fill += static_cast<MdciSelector*>(s->get())->mean_page_fill();
        inserted_keys += static_cast<double>((*s)->insert_counts().inserted);
        unrouted_keys += static_cast<double>((*s)->insert_counts().unrouted);
      }
      sels[kind] = {std::move(pk), std::move(s).value()};
    }
    // Plain SIMD scan of all keys (fp16, contiguous) for reference.
    std::vector<uint16_t> k16(static_cast<size_t>(tokens) * d);
    FloatToHalf(keys, k16.data(), k16.size());
    std::vector<float> logits(static_cast<size_t>(tokens) * G);
    for (int step = 0; step < steps; ++step) {
      const float* q = dump->query(step, 0, h);
      SelectParams sp;
      sp.budget_tokens = budget;
      Selection sm, se, sx;
      const int reps = 5;
      auto a = Clock::now();
      for (int r = 0; r < reps; ++r) (void)sels[SelectorKind::kMdci].second->Select(q, G, sp, &sm);
      auto b = Clock::now();
      for (int r = 0; r < 2; ++r)
        (void)sels[SelectorKind::kExactMdci].second->Select(q, G, sp, &se);
      auto c = Clock::now();
      for (int r = 0; r < 2; ++r)
        DotRowsMulti(DType::kF16, k16.data(), tokens, d, q, G, logits.data());
      auto e = Clock::now();
      (void)sels[SelectorKind::kExact].second->Select(q, G, sp, &sx);
      sum_us_m += Secs(a, b) * 1e6 / reps;
      {
        // Time of the descent alone (candidate collection), for the breakdown.
        auto* m = static_cast<MdciSelector*>(sels[SelectorKind::kMdci].second.get());
        DciDescentParams dp;
        dp.field_of_view = mp.field_of_view;
        dp.min_tokens = std::max<int64_t>(int64_t{mp.min_candidate_pages} * P,
                                          static_cast<int64_t>(mp.candidate_factor * budget));
        dp.cover_factor = mp.cover_factor;
        dp.entry_nodes = mp.entry_nodes;
        dp.spread_weight = mp.spread_weight;
        DciScratch scratch;
        std::vector<uint32_t> nodes;
        uint64_t t = 0;
        auto d0 = Clock::now();
        for (int r = 0; r < reps; ++r) {
          m->tree().CollectCandidates(q, G, 1.0f / std::sqrt(static_cast<float>(d)), dp, &scratch,
                                      &nodes, &t);
        }
        sum_us_descent += Secs(d0, Clock::now()) * 1e6 / reps;
      }
      sum_us_e += Secs(b, c) * 1e6 / 2;
      sum_us_scan += Secs(c, e) * 1e6 / 2;
      touched += static_cast<double>(sm.keys_touched) / tokens;
      mass_m +=
          mdci_test::MassOf(keys, tokens, d, q, G,
                            mdci_test::SelectedPositions(*sels[SelectorKind::kMdci].second, sm));
      const int64_t region = f.mass_from > 0 ? f.mass_from : f.decode_from;
      if (region > 0) {
        std::vector<int32_t> all_region(static_cast<size_t>(tokens - region));
        for (size_t i = 0; i < all_region.size(); ++i) {
          all_region[i] = static_cast<int32_t>(region + static_cast<int64_t>(i));
        }
        region_share += mdci_test::MassOf(keys, tokens, d, q, G, all_region);
        decode_m += mdci_test::MassOf(
            keys, tokens, d, q, G,
            mdci_test::SelectedPositions(*sels[SelectorKind::kMdci].second, sm), region);
        decode_e += mdci_test::MassOf(
            keys, tokens, d, q, G,
            mdci_test::SelectedPositions(*sels[SelectorKind::kExactMdci].second, se), region);
      }
      mass_e += mdci_test::MassOf(
          keys, tokens, d, q, G,
          mdci_test::SelectedPositions(*sels[SelectorKind::kExactMdci].second, se));
      mass_p +=
          mdci_test::MassOf(keys, tokens, d, q, G,
                            mdci_test::SelectedPositions(*sels[SelectorKind::kExact].second, sx));
      ++n_sel;
      if (f.verbose) {
        // Rank of exact-mdci's pages under the tree's level-1 estimate.
        auto* m = static_cast<MdciSelector*>(sels[SelectorKind::kMdci].second.get());
        DciDescentParams dp;
        dp.min_tokens = tokens;
        dp.entry_nodes = 1 << 30;
        dp.spread_weight = mp.spread_weight;
        DciScratch scratch;
        std::vector<uint32_t> order;
        uint64_t t = 0;
        m->tree().CollectCandidates(q, G, 1.0f / std::sqrt(static_cast<float>(d)), dp, &scratch,
                                    &order, &t);
        std::vector<int> rank(order.size());
        for (size_t i = 0; i < order.size(); ++i) rank[order[i]] = static_cast<int>(i);
        std::printf("head %d step %d mass mdci %.4f exact-mdci %.4f | ranks:", h, step,
                    mdci_test::MassOf(keys, tokens, d, q, G, mdci_test::SelectedPositions(*m, sm)),
                    mdci_test::MassOf(
                        keys, tokens, d, q, G,
                        mdci_test::SelectedPositions(*sels[SelectorKind::kExactMdci].second, se)));
        for (size_t i = 0; i < se.pages.size(); ++i) {
          std::printf(" %d%s", rank[m->tree().page_table().node_of_page(se.pages[i])],
                      std::isinf(se.scores[i]) ? "*" : "");
        }
        std::printf("\n");
      }
    }
  }
  std::printf("fov=%d cf=%.2f spread=%.2f entry=%d cover=%.2f refine=%d%s\n", mp.field_of_view,
              mp.candidate_factor, mp.spread_weight, mp.entry_nodes, mp.cover_factor,
              mp.refine_iters, incremental ? " (incremental build)" : "");
  std::printf("build %.3f s/head  index %.1f B/token (%.1f%% of 512 B KV)  mean fill %.3f\n",
              sum_build / heads, bytes / heads, 100.0 * bytes / heads / 512.0, fill / heads);
  std::printf("descent us %.1f (of mdci select)\n", sum_us_descent / n_sel);
  if (f.decode_from > 0) {
    std::printf(
        "decode inserts from %lld: %.2f us per key (insert fov %d, insert fit %.2f: %.3f of the "
        "keys unrouted)\n",
        (long long)f.decode_from, sum_insert_us / heads, mp.insert_route_fov, mp.insert_fit,
        unrouted_keys / std::max(1.0, inserted_keys));
  }
  if (f.mass_from > 0 || f.decode_from > 0) {
    std::printf(
        "mass among positions from %lld (%.4f of all the mass): mdci %.4f  exact-mdci %.4f\n",
        static_cast<long long>(f.mass_from > 0 ? f.mass_from : f.decode_from), region_share / n_sel,
        decode_m / n_sel, decode_e / n_sel);
  }
  std::printf(
      "select us: mdci %.1f  exact-mdci %.1f  fp16 scan %.1f  (mdci/scan %.3f)  touched %.2f%%\n",
      sum_us_m / n_sel, sum_us_e / n_sel, sum_us_scan / n_sel, sum_us_m / sum_us_scan,
      100.0 * touched / n_sel);
  std::printf(
      "mass: mdci %.4f  exact-mdci %.4f  exact-positional %.4f  ratio mdci/exact-mdci %.4f\n",
      mass_m / n_sel, mass_e / n_sel, mass_p / n_sel, mass_m / mass_e);
  return 0;
}
