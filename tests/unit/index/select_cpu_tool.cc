// Thread CPU time per mdci select, as decode sees it (not a test; built with
// the tests as icecache-select-cpu in build/tests/unit/index/). One layer of
// the synthetic generator, H KV heads (each its own tree and OwnedPageKeys
// frames, as a session holds them), then S decode steps that select every
// head once, round-robin, so each head's keys and tree are as cold as they
// are between two layers of a decode step. Prints the median and mean
// thread CPU per select, the descent's share (CollectCandidates timed on the
// same queries in a separate pass), mass against the exhaustive page
// selection (exact-mdci on the same layout) and a hash of every selected
// page, so two builds can be compared for bit-identical selections.
//   icecache-select-cpu --tokens 32768 --kv-heads 16 --steps 16 --fov 32 --candidate-factor 8
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/cli.h"
#include "common/synthetic.h"
#include "common/thread_cpu.h"
#include "server/index/kernels.h"
#include "server/index/mdci_selector.h"
#include "server/index/owned_page_keys.h"
#include "server/index/selector.h"
#include "tests/unit/index/mdci_test_util.h"

using namespace icecache;

namespace {

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

double Mean(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

uint64_t Mix(uint64_t h, uint64_t x) {
  h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Thread CPU per mdci select, heads round-robin as in decode.",
               "icecache-select-cpu");
  cli::Configure(app);
  int64_t tokens = 32768;
  int heads = 8, steps = 16, budget = 256, page = 16, passes = 1;
  std::string preset = "llama3-8b-like";
  bool mass = true;
  bool exhaustive = false;
  MdciParams mp;
  app.add_option("--tokens", tokens, "context tokens of the one layer generated");
  app.add_option("--kv-heads", heads, "KV heads (trees) generated and selected round-robin");
  app.add_option("--steps", steps, "decode steps; each selects every head once");
  app.add_option("--passes", passes, "times the timed select loop runs over the steps (profiling)");
  app.add_option("--budget", budget, "token budget per KV head and step");
  app.add_option("--page", page, "tokens per page");
  app.add_option("--preset", preset, "synthetic preset or family");
  app.add_option("--fov", mp.field_of_view, "mdci field of view");
  app.add_option("--candidate-factor", mp.candidate_factor, "candidates scored exactly, x budget");
  app.add_option("--sketch", mp.sketch_scoring, "rank candidate pages from the int8 sketch (1)");
  app.add_option("--mass", mass, "measure mass against exact-mdci (1) or not (0)");
  app.add_flag("--exhaustive", exhaustive, "time the exhaustive page selection (exact-mdci)");
  if (auto code = cli::Parse(app, argc, argv)) return *code;

  auto cfg = SyntheticPreset(preset);
  if (!cfg.ok()) {
    std::fprintf(stderr, "%s\n", cfg.status().ToString().c_str());
    return 1;
  }
  cfg->tokens = tokens;
  cfg->layers = 1;
  cfg->q_heads = cfg->q_heads / cfg->kv_heads * heads;
  cfg->kv_heads = heads;
  cfg->steps = steps;
  auto dump = GenerateSynthetic(*cfg);
  if (!dump.ok()) {
    std::fprintf(stderr, "%s\n", dump.status().ToString().c_str());
    return 1;
  }
  const int d = dump->head_dim, G = dump->group_size();
  SelectorConfig sc;
  sc.kind = SelectorKind::kMdci;
  sc.head_dim = d;
  sc.page_tokens = page;
  sc.num_query_heads = G;
  sc.dtype = DType::kF16;
  sc.mdci = mp;
  std::vector<std::unique_ptr<OwnedPageKeys>> frames(heads);
  std::vector<std::unique_ptr<Selector>> sels(heads);
  for (int h = 0; h < heads; ++h) {
    auto pk = OwnedPageKeys::ForSelector(sc);
    auto s = Selector::Create(sc, pk->get());
    if (!pk.ok() || !s.ok()) {
      std::fprintf(stderr, "create failed\n");
      return 1;
    }
    std::vector<Placement> pl;
    absl::Status st = (*s)->Build(dump->key(0, h), tokens, &pl);
    if (st.ok()) st = (*pk)->Apply(pl, dump->key(0, h));
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      return 1;
    }
    frames[h] = std::move(pk).value();
    sels[h] = std::move(s).value();
  }
  std::printf("# %lld tokens x %d heads (d=%d, G=%d, %s), width %dx%.1f, budget %d, kernels %s\n",
              static_cast<long long>(tokens), heads, d, G, preset.c_str(), mp.field_of_view,
              mp.candidate_factor, budget, KernelIsa());
  SelectParams sp;
  sp.budget_tokens = budget;
  sp.exhaustive = exhaustive;
  std::vector<double> select_us, descent_us;
  std::vector<Selection> picked(static_cast<size_t>(steps) * heads);
  uint64_t hash = 0, touched = 0;
  for (int pass = 0; pass < passes; ++pass) {
    for (int step = 0; step < steps; ++step) {
      for (int h = 0; h < heads; ++h) {
        const float* q = dump->query(step, 0, h);
        Selection& sel = picked[static_cast<size_t>(step) * heads + h];
        const int64_t c0 = ThreadCpuNanos();
        absl::Status st = sels[h]->Select(q, G, sp, &sel);
        const int64_t c1 = ThreadCpuNanos();
        if (!st.ok()) {
          std::fprintf(stderr, "%s\n", st.ToString().c_str());
          return 1;
        }
        select_us.push_back(static_cast<double>(c1 - c0) * 1e-3);
        touched += sel.keys_touched;
        for (size_t i = 0; i < sel.pages.size(); ++i) hash = Mix(hash, sel.pages[i]);
      }
    }
  }
  // The descent alone, a separate pass (same round-robin, so as cold).
  for (int step = 0; step < steps && !exhaustive; ++step) {
    for (int h = 0; h < heads; ++h) {
      const float* q = dump->query(step, 0, h);
      auto* m = static_cast<MdciSelector*>(sels[h].get());
      DciDescentParams dp;
      dp.field_of_view = mp.field_of_view;
      dp.min_tokens =
          std::max<int64_t>(int64_t{mp.min_candidate_pages} * page,
                            static_cast<int64_t>(std::ceil(mp.candidate_factor * budget)));
      dp.cover_factor = mp.cover_factor;
      dp.entry_nodes = mp.entry_nodes;
      dp.spread_weight = mp.spread_weight;
      dp.normalized = mp.normalized_descent;
      thread_local DciScratch scratch;
      std::vector<uint32_t> nodes;
      uint64_t t = 0;
      const int64_t c0 = ThreadCpuNanos();
      m->tree().CollectCandidates(q, G, 1.0f / std::sqrt(static_cast<float>(d)), dp, &scratch,
                                  &nodes, &t);
      descent_us.push_back(static_cast<double>(ThreadCpuNanos() - c0) * 1e-3);
    }
  }
  std::printf("select thread CPU us: median %.1f mean %.1f | descent alone median %.1f mean %.1f\n",
              Median(select_us), Mean(select_us), Median(descent_us), Mean(descent_us));
  std::printf("keys touched per select %.0f; selection hash %016llx\n",
              static_cast<double>(touched) / select_us.size(),
              static_cast<unsigned long long>(hash));
  if (mass) {
    // Mass of the selection against exact-mdci's (every page scored) on the same layout.
    double sum_m = 0.0, sum_e = 0.0;
    SelectParams ep = sp;
    ep.exhaustive = true;
    for (int step = 0; step < steps; ++step) {
      for (int h = 0; h < heads; ++h) {
        const float* q = dump->query(step, 0, h);
        Selection ex;
        if (!sels[h]->Select(q, G, ep, &ex).ok()) return 1;
        sum_m += mdci_test::MassOf(
            dump->key(0, h), tokens, d, q, G,
            mdci_test::SelectedPositions(*sels[h], picked[static_cast<size_t>(step) * heads + h]));
        sum_e += mdci_test::MassOf(dump->key(0, h), tokens, d, q, G,
                                   mdci_test::SelectedPositions(*sels[h], ex));
      }
    }
    const double n = static_cast<double>(steps) * heads;
    std::printf("mass: mdci %.5f exhaustive %.5f ratio %.5f\n", sum_m / n, sum_e / n,
                sum_m / sum_e);
  }
  return 0;
}
