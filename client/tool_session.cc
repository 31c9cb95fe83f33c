#include "client/tool_session.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/synthetic.h"

namespace icecache {

absl::Span<const float> SyntheticModel::Queries(int step, int layer) const {
  return absl::MakeConstSpan(dump.query(step % dump.steps, layer, 0),
                             static_cast<size_t>(dump.q_heads) * dump.head_dim);
}

size_t SyntheticModel::FetchBytes(int budget_tokens, int sink_tokens) const {
  const size_t page_bytes = 2 * static_cast<size_t>(spec.page_tokens) * spec.head_dim * 2;
  return static_cast<size_t>(spec.kv_heads) * (budget_tokens + sink_tokens + spec.page_tokens) *
         page_bytes;
}

absl::StatusOr<SyntheticModel> MakeSyntheticModel(const SyntheticModelOptions& o) {
  ASSIGN_OR_RETURN(SyntheticConfig sc, SyntheticPreset(o.preset));
  sc.layers = o.layers;
  sc.tokens = o.tokens;
  sc.steps = o.steps;
  if (o.seed.has_value()) sc.seed = *o.seed;
  SyntheticModel m;
  ASSIGN_OR_RETURN(m.dump, GenerateSynthetic(sc));
  m.kv = HostKv::FromDump(&m.dump);
  m.spec.layers = m.dump.layers;
  m.spec.kv_heads = m.dump.kv_heads;
  m.spec.q_heads = m.dump.q_heads;
  m.spec.head_dim = m.dump.head_dim;
  m.spec.dtype = DType::kF16;
  m.spec.page_tokens = o.page_tokens;
  ASSIGN_OR_RETURN(m.spec.selector, ParseSelectorType(o.selector));
  m.spec.layer_reuse = 1;
  m.spec.ttl = o.ttl;
  return m;
}

absl::StatusOr<DaemonConnection> SpawnOrConnect(const std::string& spawn_binary,
                                                ClientOptions options) {
  DaemonConnection c;
  if (!spawn_binary.empty()) {
    DaemonOptions d;
    d.binary = spawn_binary;
    ASSIGN_OR_RETURN(c.daemon, DaemonProcess::Start(d));
    options.socket_path = c.daemon->socket_path();
  }
  ASSIGN_OR_RETURN(c.client, Client::Create(options));
  if (c.daemon == nullptr) {
    // Fail here, before a tool generates data or opens its output, when no
    // daemon answers where the client looked.
    absl::StatusOr<bool> serving = c.client->Health();
    if (!serving.ok()) {
      return absl::UnavailableError(
          absl::StrCat("no icecached answers at ", c.client->target(),
                       " (start one, or pass --spawn PATH to start one, or --socket PATH): ",
                       serving.status().message()));
    }
  }
  return c;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

}  // namespace icecache
