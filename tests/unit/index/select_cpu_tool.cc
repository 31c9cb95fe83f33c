// Thread CPU time per mdci select, as decode sees it (not a test; built with
// the tests as icecache-select-cpu in build/tests/unit/index/). One layer of
// the synthetic generator, H KV heads (each its own tree and OwnedPageKeys
// frames, as a session holds them), then S decode steps that select every
// head once, round-robin, so each head's keys and tree are as cold as they
// are between two layers of a decode step.
//
// With --compare-sketch every head also gets a twin loaded from its image
// with MdciParams::sketch_scoring (the same tree; the sketch re-derived from
// the frames), and the timed passes alternate: frames, sketch, frames,
// sketch... Per width (--widths FOVxCF,...) it prints the median and mean
// thread CPU per select of each, the descent alone (CollectCandidates, a
// separate pass), the mass of each against the exhaustive page selection on
// the same layout (exact-mdci) and a hash of every selected page, so two
// builds can be compared for bit-identical selections.
//   icecache-select-cpu --tokens 32768 --kv-heads 16 --steps 8 --passes 4
//       --widths 32x8,70x17.6,128x32 --compare-sketch
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/cli.h"
#include "common/synthetic.h"
#include "common/thread_cpu.h"
#include "server/index/kernels.h"
#include "server/index/mdci_selector.h"
#include "server/index/owned_page_keys.h"
#include "server/index/selector.h"
#include "server/index/width_calibrator.h"
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
  return h ^ (x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2));
}

struct Width {
  int fov = 32;
  float cf = 8.0f;
  bool exhaustive = false;  // "exhaustive": every page scored exactly (exact-mdci)
};

// The positions a selection covers: its tokens (token granularity) or its
// pages' tokens.
std::vector<int32_t> Covered(const Selector& s, const Selection& sel) {
  if (!sel.positions.empty()) return sel.positions;
  return mdci_test::SelectedPositions(s, sel);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Thread CPU per mdci select, heads round-robin as in decode.",
               "icecache-select-cpu");
  cli::Configure(app);
  int64_t tokens = 32768;
  int heads = 8, steps = 16, budget = 256, page = 16, passes = 2, descent_passes = 1;
  std::string preset = "llama3-8b-like", widths_arg = "32x8", granularity = "page";
  bool mass = true, compare = false, reference = false;
  MdciParams mp;
  app.add_option("--tokens", tokens, "context tokens of the one layer generated");
  app.add_option("--kv-heads", heads, "KV heads (trees) generated and selected round-robin");
  app.add_option("--steps", steps, "decode steps; each selects every head once");
  app.add_option("--passes", passes,
                 "timed passes over the steps (alternating with --compare-sketch)");
  app.add_option("--descent-passes", descent_passes,
                 "passes of the descent-alone timing (more samples; a profile of the descent)");
  app.add_option("--budget", budget, "token budget per KV head and step");
  app.add_option("--page", page, "tokens per page");
  app.add_option("--preset", preset, "synthetic preset or family");
  app.add_option("--widths", widths_arg,
                 "mdci widths FOVxCF or 'exhaustive' (every page scored), comma-separated");
  app.add_option("--granularity", granularity,
                 "page (whole pages) or token (the best tokens of the candidate pages, as a "
                 "decode into a host buffer selects)")
      ->check(CLI::IsMember({"page", "token"}));
  app.add_option("--sketch", mp.sketch_scoring, "the measured selectors rank from the sketch (1)");
  app.add_option(
      "--normalized", mp.normalized_descent,
      "the descent ranks by the normalised estimate (1; MdciParams::normalized_descent)");
  app.add_option("--query-quotas", mp.query_quotas,
                 "every query takes its share of the nodes (1; MdciParams::query_quotas)");
  app.add_flag("--compare-sketch", compare, "time sketch twins too, passes alternating");
  app.add_option("--mass", mass, "measure mass against exact-mdci (1) or not (0)");
  app.add_flag("--reference", reference,
               "also time the calibrator's sample of each selection (MeasureSelection: the "
               "exact reference at the same granularity and the ratio), same round-robin");
  if (auto code = cli::Parse(app, argc, argv)) return *code;
  std::vector<Width> widths;
  for (absl::string_view w : absl::StrSplit(widths_arg, ',')) {
    if (w == "exhaustive") {
      widths.push_back(Width{0, 0.0f, true});
      continue;
    }
    std::vector<std::string> p = absl::StrSplit(w, 'x');
    Width x;
    if (p.size() != 2 || !absl::SimpleAtoi(p[0], &x.fov) || !absl::SimpleAtof(p[1], &x.cf)) {
      std::fprintf(stderr, "bad width %s\n", std::string(w).c_str());
      return 2;
    }
    widths.push_back(x);
  }

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
  SelectorConfig twin_config = sc;
  twin_config.mdci.sketch_scoring = true;
  std::vector<std::unique_ptr<OwnedPageKeys>> frames(heads);
  // [0]: the measured selectors; [1]: their sketch twins (--compare-sketch).
  std::vector<std::unique_ptr<Selector>> sels[2];
  sels[0].resize(heads);
  sels[1].resize(heads);
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
    sels[0][h] = std::move(s).value();
    if (compare) {
      std::string image;
      absl::Status is = sels[0][h]->SaveImage(&image);
      auto twin = is.ok() ? Selector::LoadImage(twin_config, frames[h].get(), image, tokens)
                          : absl::StatusOr<std::unique_ptr<Selector>>(is);
      if (!twin.ok()) {
        std::fprintf(stderr, "%s\n", twin.status().ToString().c_str());
        return 1;
      }
      sels[1][h] = std::move(twin).value();
    }
  }
  const int kinds = compare ? 2 : 1;
  std::printf(
      "# %lld tokens x %d heads (d=%d, G=%d, %s), budget %d, %s granularity, kernels %s, %d "
      "passes%s\n",
      static_cast<long long>(tokens), heads, d, G, preset.c_str(), budget, granularity.c_str(),
      KernelIsa(), passes, compare ? " alternating frames / sketch" : "");
  std::printf(
      "# index bytes per head: %.1f MB%s\n", sels[0][0]->index_bytes() / 1e6,
      compare
          ? (" (sketch twin " + std::to_string(sels[1][0]->index_bytes() / 1e6) + " MB)").c_str()
          : "");
  for (const Width& w : widths) {
    SelectParams sp;
    sp.budget_tokens = budget;
    sp.field_of_view = w.fov;
    sp.candidate_factor = w.cf;
    sp.exhaustive = w.exhaustive;
    sp.granularity = granularity == "token" ? Granularity::kToken : Granularity::kPage;
    std::vector<double> select_us[2], descent_us;
    std::vector<Selection> picked[2];
    uint64_t hash[2] = {0, 0}, touched[2] = {0, 0};
    for (int k = 0; k < kinds; ++k) picked[k].resize(static_cast<size_t>(steps) * heads);
    for (int pass = 0; pass < passes; ++pass) {
      for (int k = 0; k < kinds; ++k) {
        for (int step = 0; step < steps; ++step) {
          for (int h = 0; h < heads; ++h) {
            const float* q = dump->query(step, 0, h);
            Selection& sel = picked[k][static_cast<size_t>(step) * heads + h];
            const int64_t c0 = ThreadCpuNanos();
            absl::Status st = sels[k][h]->Select(q, G, sp, &sel);
            const int64_t c1 = ThreadCpuNanos();
            if (!st.ok()) {
              std::fprintf(stderr, "%s\n", st.ToString().c_str());
              return 1;
            }
            select_us[k].push_back(static_cast<double>(c1 - c0) * 1e-3);
            if (pass == 0) {
              touched[k] += sel.keys_touched;
              for (uint32_t p : sel.pages) hash[k] = Mix(hash[k], p);
              for (int32_t p : sel.positions) hash[k] = Mix(hash[k], static_cast<uint32_t>(p));
            }
          }
        }
      }
    }
    // The descent alone, separate passes (same round-robin, so as cold).
    for (int step = 0; step < (w.exhaustive ? 0 : steps * descent_passes); ++step) {
      for (int h = 0; h < heads; ++h) {
        const float* q = dump->query(step % steps, 0, h);
        auto* m = static_cast<MdciSelector*>(sels[0][h].get());
        DciDescentParams dp;
        dp.field_of_view = w.fov;
        dp.min_tokens = std::max<int64_t>(int64_t{mp.min_candidate_pages} * page,
                                          static_cast<int64_t>(std::ceil(w.cf * budget)));
        dp.cover_factor = mp.cover_factor;
        dp.entry_nodes = mp.entry_nodes;
        dp.spread_weight = mp.spread_weight;
        dp.normalized = mp.normalized_descent;
        dp.query_quotas = mp.query_quotas;
        thread_local DciScratch scratch;
        std::vector<uint32_t> nodes;
        uint64_t t = 0;
        const int64_t c0 = ThreadCpuNanos();
        m->tree().CollectCandidates(q, G, 1.0f / std::sqrt(static_cast<float>(d)), dp, &scratch,
                                    &nodes, &t);
        descent_us.push_back(static_cast<double>(ThreadCpuNanos() - c0) * 1e-3);
      }
    }
    // The calibrator's reference and rating of each selection, as its
    // sampler thread runs them (thread CPU).
    std::vector<double> reference_us;
    for (int step = 0; reference && step < steps; ++step) {
      for (int h = 0; h < heads; ++h) {
        const float* q = dump->query(step, 0, h);
        const auto* m = static_cast<const MdciSelector*>(sels[0][h].get());
        const int64_t c0 = ThreadCpuNanos();
        auto sample =
            MeasureSelection(*m, q, G, sp, picked[0][static_cast<size_t>(step) * heads + h]);
        reference_us.push_back(static_cast<double>(ThreadCpuNanos() - c0) * 1e-3);
        if (!sample.ok()) {
          std::fprintf(stderr, "%s\n", sample.status().ToString().c_str());
          return 1;
        }
      }
    }
    double ratio[2] = {0, 0};
    if (mass) {
      double sum_e = 0.0, sum[2] = {0, 0};
      SelectParams ep = sp;
      ep.exhaustive = true;
      for (int step = 0; step < steps; ++step) {
        for (int h = 0; h < heads; ++h) {
          const float* q = dump->query(step, 0, h);
          Selection ex;
          if (!sels[0][h]->Select(q, G, ep, &ex).ok()) return 1;
          sum_e += mdci_test::MassOf(dump->key(0, h), tokens, d, q, G, Covered(*sels[0][h], ex));
          for (int k = 0; k < kinds; ++k) {
            sum[k] += mdci_test::MassOf(
                dump->key(0, h), tokens, d, q, G,
                Covered(*sels[k][h], picked[k][static_cast<size_t>(step) * heads + h]));
          }
        }
      }
      for (int k = 0; k < kinds; ++k) ratio[k] = sum[k] / sum_e;
    }
    const double n = static_cast<double>(steps) * heads;
    const std::string name =
        w.exhaustive ? std::string("exhaustive") : absl::StrCat(w.fov, "x", w.cf);
    std::printf(
        "width %s: select CPU us median %.1f mean %.1f | descent alone median %.1f | keys "
        "touched %.0f | mass / exhaustive %.5f | hash %016llx\n",
        name.c_str(), Median(select_us[0]), Mean(select_us[0]), Median(descent_us),
        static_cast<double>(touched[0]) / n, ratio[0], static_cast<unsigned long long>(hash[0]));
    if (reference) {
      std::printf("width %s: calibrator sample (reference + rating) CPU us median %.1f\n",
                  name.c_str(), Median(reference_us));
    }
    if (compare) {
      std::printf(
          "width %s: sketch twin: select CPU us median %.1f mean %.1f (frames / sketch %.2fx "
          "median) | mass / exhaustive %.5f (%+.5f) | hash %016llx\n",
          name.c_str(), Median(select_us[1]), Mean(select_us[1]),
          Median(select_us[0]) / Median(select_us[1]), ratio[1], ratio[1] - ratio[0],
          static_cast<unsigned long long>(hash[1]));
    }
  }
  return 0;
}
