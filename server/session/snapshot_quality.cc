#include "server/session/snapshot_quality.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

Json ScheduleToJson(const SampleScheduleState& s) {
  return Json{{"steps", s.steps},
              {"since", s.since},
              {"taken", s.taken},
              {"select_n", s.select_n},
              {"reference_n", s.reference_n},
              {"select_ns", s.select_ns},
              {"reference_ns", s.reference_ns},
              {"warmup_credit", s.warmup_credit}};
}

Json ArmToJson(const CalibratorArm& a) {
  return Json{{"width", a.width},
              {"floor", a.floor},
              {"at_width", a.at_width},
              {"mean_at_width", a.mean_at_width},
              {"var_at_width", a.var_at_width},
              {"release_streak", a.release_streak},
              {"release_needed", a.release_needed},
              {"released", a.released},
              {"cost_n", a.cost_n},
              {"cost", a.cost},
              {"tried", a.tried}};
}

// The method duel's state ("duel"; absent: an older snapshot).
Json DuelToJson(const CalibratorState& c) {
  return Json{{"method", std::string(SearchMethodName(c.method))},
              {"parked", ArmToJson(c.parked)},
              {"method_trial", c.method_trial},
              {"trial_exact", c.trial_exact},
              {"shadow", c.method_shadow},
              {"trial_bar", c.trial_bar},
              {"method_wait", c.method_wait},
              {"method_run", c.method_run},
              {"method_trials", c.method_trials},
              {"method_switches", c.method_switches}};
}

Json CalibratorToJson(const CalibratorState& c) {
  Json j{{"width", c.width},
         {"floor", c.floor},
         {"at_width", c.at_width},
         {"mean_at_width", c.mean_at_width},
         {"var_at_width", c.var_at_width},
         {"release_streak", c.release_streak},
         {"release_needed", c.release_needed},
         {"released", c.released},
         {"steps", c.steps},
         {"samples", c.samples},
         {"changes", c.changes},
         {"last_change_step", c.last_change_step},
         {"last_ratio", c.last_ratio},
         {"sum_ratio", c.sum_ratio},
         {"sum_topk", c.sum_topk},
         {"schedule", ScheduleToJson(c.schedule)},
         {"mode", c.mode == SelectMode::kExact ? "exact" : "tree"},
         {"probing", c.probing},
         {"tree_cost_n", c.tree_cost_n},
         {"tree_cost", c.tree_cost},
         {"exact_cost_n", c.exact_cost_n},
         {"exact_cost", c.exact_cost},
         {"exact_run", c.exact_run},
         {"reprobe_wait", c.reprobe_wait},
         {"exact_steps", c.exact_steps},
         {"fallbacks", c.fallbacks},
         {"reprobes", c.reprobes},
         {"ranking", std::string(DescentRankingName(c.ranking))},
         {"trial_n", c.trial_n},
         {"trial_since", c.trial_since},
         {"trial_needed", c.trial_needed},
         {"trial_gain", c.trial_gain},
         {"ranking_switches", c.ranking_switches},
         {"seeded", c.seeded}};
  if (c.method != SearchMethod::kSelector) j["duel"] = DuelToJson(c);
  return j;
}

Json HeadToJson(const HeadQualityState& h) {
  Json j{{"samples", h.samples},       {"sum_ratio", h.sum_ratio},
         {"sum_topk", h.sum_topk},     {"recent_ratio", h.recent_ratio},
         {"last_ratio", h.last_ratio}, {"schedule", ScheduleToJson(h.schedule)}};
  if (h.calibrated) j["calibrator"] = CalibratorToJson(h.calibrator);
  return j;
}

// Strict field reads: the first missing or mistyped field is remembered
// (by its path) and every later read fails too.
class Reader {
 public:
  explicit Reader(std::string* error) : error_(error) {}

  bool Int(const Json& o, const char* k, int64_t* out) {
    const Json* v = Find(o, k);
    if (v == nullptr || !v->is_number_integer()) return Fail(k);
    *out = v->get<int64_t>();
    return true;
  }
  bool Num(const Json& o, const char* k, double* out) {
    const Json* v = Find(o, k);
    if (v == nullptr || !v->is_number()) return Fail(k);  // null: a non-finite value was written
    *out = v->get<double>();
    return true;
  }
  bool Bool(const Json& o, const char* k, bool* out) {
    const Json* v = Find(o, k);
    if (v == nullptr || !v->is_boolean()) return Fail(k);
    *out = v->get<bool>();
    return true;
  }
  const Json* Object(const Json& o, const char* k) {
    const Json* v = Find(o, k);
    if (v == nullptr || !v->is_object()) {
      Fail(k);
      return nullptr;
    }
    return v;
  }
  void Within(std::string where) { where_ = std::move(where); }
  bool ok() const { return error_->empty(); }
  bool Fail(const char* k) {
    if (ok()) *error_ = absl::StrCat(where_, "field '", k, "' is missing or not of its type");
    return false;
  }

 private:
  const Json* Find(const Json& o, const char* k) const {
    if (!ok() || !o.is_object()) return nullptr;
    auto it = o.find(k);
    return it == o.end() ? nullptr : &*it;
  }
  std::string* error_;
  std::string where_;
};

void ReadSchedule(Reader& r, const Json& o, SampleScheduleState* s) {
  r.Int(o, "steps", &s->steps);
  r.Int(o, "since", &s->since);
  r.Int(o, "taken", &s->taken);
  r.Int(o, "select_n", &s->select_n);
  r.Int(o, "reference_n", &s->reference_n);
  r.Num(o, "select_ns", &s->select_ns);
  r.Num(o, "reference_ns", &s->reference_ns);
  // Absent in snapshots written before calibration seeds: nothing credited.
  s->warmup_credit = 0;
  if (o.is_object() && o.contains("warmup_credit")) r.Int(o, "warmup_credit", &s->warmup_credit);
}

void ReadArm(Reader& r, const Json& o, CalibratorArm* a) {
  r.Num(o, "width", &a->width);
  r.Num(o, "floor", &a->floor);
  r.Int(o, "at_width", &a->at_width);
  r.Num(o, "mean_at_width", &a->mean_at_width);
  r.Num(o, "var_at_width", &a->var_at_width);
  r.Int(o, "release_streak", &a->release_streak);
  r.Int(o, "release_needed", &a->release_needed);
  r.Bool(o, "released", &a->released);
  r.Int(o, "cost_n", &a->cost_n);
  r.Num(o, "cost", &a->cost);
  r.Bool(o, "tried", &a->tried);
}

void ReadDuel(Reader& r, const Json& o, CalibratorState* c) {
  auto method = o.find("method");
  if (method != o.end() && *method == "tree") {
    c->method = SearchMethod::kTree;
  } else if (method != o.end() && *method == "scan") {
    c->method = SearchMethod::kScan;
  } else {
    r.Fail("method");
  }
  if (const Json* a = r.Object(o, "parked")) ReadArm(r, *a, &c->parked);
  r.Bool(o, "method_trial", &c->method_trial);
  r.Bool(o, "trial_exact", &c->trial_exact);
  // Absent in snapshots written before shadow trials: none running.
  c->method_shadow = false;
  if (o.is_object() && o.contains("shadow")) r.Bool(o, "shadow", &c->method_shadow);
  r.Num(o, "trial_bar", &c->trial_bar);
  r.Int(o, "method_wait", &c->method_wait);
  r.Int(o, "method_run", &c->method_run);
  r.Int(o, "method_trials", &c->method_trials);
  r.Int(o, "method_switches", &c->method_switches);
}

void ReadCalibrator(Reader& r, const Json& o, CalibratorState* c) {
  r.Num(o, "width", &c->width);
  r.Num(o, "floor", &c->floor);
  r.Int(o, "at_width", &c->at_width);
  r.Num(o, "mean_at_width", &c->mean_at_width);
  // Absent in snapshots written before the confidence bound: no spread known.
  c->var_at_width = 0.0;
  if (o.is_object() && o.contains("var_at_width")) r.Num(o, "var_at_width", &c->var_at_width);
  r.Int(o, "release_streak", &c->release_streak);
  r.Int(o, "release_needed", &c->release_needed);
  r.Bool(o, "released", &c->released);
  r.Int(o, "steps", &c->steps);
  r.Int(o, "samples", &c->samples);
  r.Int(o, "changes", &c->changes);
  r.Int(o, "last_change_step", &c->last_change_step);
  r.Num(o, "last_ratio", &c->last_ratio);
  r.Num(o, "sum_ratio", &c->sum_ratio);
  r.Num(o, "sum_topk", &c->sum_topk);
  if (const Json* s = r.Object(o, "schedule")) ReadSchedule(r, *s, &c->schedule);
  auto mode = o.find("mode");
  const bool exact = mode != o.end() && *mode == "exact";
  if (!exact && (mode == o.end() || *mode != "tree")) r.Fail("mode");
  c->mode = exact ? SelectMode::kExact : SelectMode::kTree;
  r.Bool(o, "probing", &c->probing);
  r.Int(o, "tree_cost_n", &c->tree_cost_n);
  r.Num(o, "tree_cost", &c->tree_cost);
  r.Int(o, "exact_cost_n", &c->exact_cost_n);
  r.Num(o, "exact_cost", &c->exact_cost);
  r.Int(o, "exact_run", &c->exact_run);
  r.Int(o, "reprobe_wait", &c->reprobe_wait);
  r.Int(o, "exact_steps", &c->exact_steps);
  r.Int(o, "fallbacks", &c->fallbacks);
  r.Int(o, "reprobes", &c->reprobes);
  // Absent in snapshots written before the ranking duel: the base ranking,
  // and the duel starts afresh.
  c->ranking = DescentRanking::kSelector;
  c->trial_n = c->trial_since = c->trial_needed = c->ranking_switches = 0;
  c->trial_gain = 0.0;
  // Absent in snapshots written before calibration seeds.
  c->seeded = false;
  if (o.is_object() && o.contains("seeded")) r.Bool(o, "seeded", &c->seeded);
  // Absent in snapshots written before the method duel: the start method.
  c->method = SearchMethod::kSelector;
  if (o.is_object() && o.contains("duel")) {
    if (const Json* d = r.Object(o, "duel")) ReadDuel(r, *d, c);
  }
  if (!o.is_object() || !o.contains("ranking")) return;
  auto ranking = o.find("ranking");
  if (*ranking == "loudest") {
    c->ranking = DescentRanking::kLoudest;
  } else if (*ranking == "normalized") {
    c->ranking = DescentRanking::kNormalized;
  } else if (*ranking != "selector") {
    r.Fail("ranking");
  }
  r.Int(o, "trial_n", &c->trial_n);
  r.Int(o, "trial_since", &c->trial_since);
  r.Int(o, "trial_needed", &c->trial_needed);
  r.Num(o, "trial_gain", &c->trial_gain);
  r.Int(o, "ranking_switches", &c->ranking_switches);
}

void ReadHead(Reader& r, const Json& o, HeadQualityState* h) {
  r.Int(o, "samples", &h->samples);
  r.Num(o, "sum_ratio", &h->sum_ratio);
  r.Num(o, "sum_topk", &h->sum_topk);
  r.Num(o, "recent_ratio", &h->recent_ratio);
  r.Num(o, "last_ratio", &h->last_ratio);
  if (const Json* s = r.Object(o, "schedule")) ReadSchedule(r, *s, &h->schedule);
  h->calibrated = o.is_object() && o.contains("calibrator");
  if (!h->calibrated) return;
  if (const Json* c = r.Object(o, "calibrator")) ReadCalibrator(r, *c, &h->calibrator);
}

}  // namespace

Json QualityStateToJson(const SessionQualityState& q) {
  Json heads = Json::array();
  for (const HeadQualityState& h : q.heads) heads.push_back(HeadToJson(h));
  return Json{{"format", kQualityStateFormat},
              {"samples_dropped", q.samples_dropped},
              {"samples_stale", q.samples_stale},
              {"samples_reselected", q.samples_reselected},
              {"calibration_cpu_ns", q.calibration_cpu_ns},
              {"selection_ns", q.selection_ns},
              {"heads", std::move(heads)}};
}

QualityStateRead QualityStateFromJson(const Json& session) {
  QualityStateRead out;
  auto it = session.find("quality");
  if (it == session.end()) {
    out.missing = "the snapshot holds no calibration state (written by an older daemon)";
    return out;
  }
  auto format = it->is_object() ? it->find("format") : it->end();
  if (format == it->end() || !format->is_number_integer()) {
    out.error = "its quality state has no format";
    return out;
  }
  if (format->get<int64_t>() != kQualityStateFormat) {
    out.missing = absl::StrCat("its calibration state has format ", format->dump(),
                               "; this daemon reads ", kQualityStateFormat);
    return out;
  }
  SessionQualityState q;
  Reader r(&out.error);
  r.Within("its quality state: ");
  r.Int(*it, "samples_dropped", &q.samples_dropped);
  r.Int(*it, "samples_stale", &q.samples_stale);
  r.Int(*it, "samples_reselected", &q.samples_reselected);
  r.Int(*it, "calibration_cpu_ns", &q.calibration_cpu_ns);
  r.Int(*it, "selection_ns", &q.selection_ns);
  auto heads = it->find("heads");
  if (heads == it->end() || !heads->is_array()) {
    r.Fail("heads");
    return out;
  }
  for (size_t i = 0; r.ok() && i < heads->size(); ++i) {
    r.Within(absl::StrCat("its quality state, head ", i, ": "));
    ReadHead(r, (*heads)[i], &q.heads.emplace_back());
  }
  if (r.ok()) out.state = std::move(q);
  return out;
}

}  // namespace icecache
