// Warm restart of a SessionManager (docs/architecture.md §5): the snapshot
// of its sessions (TakeSnapshot) and their recovery in the next process
// (Restore). The invariant: a recovered session serves exactly the bytes,
// pages and selections it served before, or it is dropped with a reason.
//   - Every frame the snapshot names must still hash to its checksum (an
//     arena written after the snapshot, or by anyone else, fails here).
//   - Token counts must agree: chunks sum to the session's tokens, each
//     layer group's slots cover exactly its tokens, each slot once.
//   - Replaying the chunks into fresh indexes must place every token at the
//     page and slot the snapshot recorded.
//   - With the quality monitor on, a recovered session's monitors take over
//     the calibration state the snapshot holds (in range, or the session is
//     dropped), or start fresh when it holds none.
#include <algorithm>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "server/index/parallel_build.h"
#include "server/pool/frame_checksum.h"
#include "server/session/session.h"
#include "server/session/session_append.h"
#include "server/session/session_manager.h"

namespace icecache {
namespace {

// Chunks of layer group g: every complete chunk, plus the pending one when
// the group is already past it.
std::vector<int64_t> GroupChunks(const SessionImage& img, int g) {
  std::vector<int64_t> out = img.chunks;
  if (img.next_layer > 0 && g < img.next_layer / img.config.layer_reuse) {
    out.push_back(img.pending_tokens);
  }
  return out;
}

// Pages of index (g, h): one past the highest page a token sits in.
uint32_t IndexPages(const SessionImage& img, size_t gi) {
  uint32_t pages = 0;
  for (uint32_t code : img.slots[gi]) {
    pages = std::max(pages, code / static_cast<uint32_t>(img.config.page_tokens) + 1);
  }
  return pages;
}

// The counts of the image agree with each other ("" when they do).
std::string CheckCounts(const SessionImage& img) {
  const SessionConfig& c = img.config;
  const int groups = NumLayerGroups(c);
  if (img.tokens < 0 || img.next_layer < 0 || img.next_layer >= c.layers ||
      img.pending_tokens < 0 || img.group_tokens.size() != static_cast<size_t>(groups)) {
    return "its token counts are out of range";
  }
  for (int64_t n : img.chunks) {
    if (n < 1) return "a chunk of its append history is empty";
  }
  if (std::accumulate(img.chunks.begin(), img.chunks.end(), int64_t{0}) != img.tokens) {
    return "its chunks do not add up to its tokens";
  }
  for (int g = 0; g < groups; ++g) {
    const std::vector<int64_t> chunks = GroupChunks(img, g);
    const int64_t want = std::accumulate(chunks.begin(), chunks.end(), int64_t{0});
    if (img.group_tokens[g] != want) return absl::StrCat("layer group ", g, " holds ", want);
    for (int h = 0; h < c.kv_heads; ++h) {
      const size_t gi = static_cast<size_t>(g) * c.kv_heads + h;
      if (img.slots[gi].size() != static_cast<size_t>(want)) {
        return absl::StrCat("layer group ", g, " kv head ", h, " lists ", img.slots[gi].size(),
                            " token slots for ", want, " tokens");
      }
      const uint32_t pages = IndexPages(img, gi);
      std::vector<bool> seen(static_cast<size_t>(pages) * c.page_tokens, false);
      for (uint32_t code : img.slots[gi]) {
        if (seen[code]) return absl::StrCat("layer group ", g, " kv head ", h, " reuses a slot");
        seen[code] = true;
      }
      for (int l = g * c.layer_reuse; l < std::min(c.layers, (g + 1) * c.layer_reuse); ++l) {
        const size_t t = static_cast<size_t>(l) * c.kv_heads + h;
        if (img.frame_offsets[t].size() != pages || img.checksums[t].size() != pages) {
          return absl::StrCat("layer ", l, " kv head ", h, " lists ", img.frame_offsets[t].size(),
                              " frames for ", pages, " pages");
        }
      }
    }
  }
  return "";
}

// Every frame hashes to its checksum ("" when all do).
std::string CheckFrames(const SessionImage& img, const PagePool& pool, uint64_t frame_bytes) {
  const SessionConfig& c = img.config;
  for (size_t t = 0; t < img.frame_offsets.size(); ++t) {
    for (size_t p = 0; p < img.frame_offsets[t].size(); ++p) {
      const uint64_t off = img.frame_offsets[t][p];
      if (off > pool.capacity_bytes() || pool.capacity_bytes() - off < frame_bytes) {
        return absl::StrCat("layer ", t / c.kv_heads, " kv head ", t % c.kv_heads, " page ", p,
                            " lies outside the arena");
      }
      if (FrameChecksum(pool.arena_base() + off, frame_bytes) != img.checksums[t][p]) {
        return absl::StrCat("layer ", t / c.kv_heads, " kv head ", t % c.kv_heads, " page ", p,
                            " fails its checksum (the arena changed after the snapshot)");
      }
    }
  }
  return "";
}

std::string IndexName(const Session& s, size_t gi) {
  return absl::StrCat("layer group ", gi / s.config.kv_heads, " kv head ", gi % s.config.kv_heads);
}

// The loaded selector holds every token at the slot the image records and
// as many pages as the frame table: the check a replay makes per placement.
absl::Status CheckLayout(const Session& s, const Selector& sel, const std::vector<uint32_t>& slots,
                         size_t frames, size_t gi) {
  const uint32_t P = static_cast<uint32_t>(s.config.page_tokens);
  uint64_t held = 0;
  bool same = sel.num_tokens() == static_cast<int64_t>(slots.size()) && sel.num_pages() == frames;
  for (uint32_t p = 0; same && p < sel.num_pages(); ++p) {
    const int32_t* pos = sel.positions(p);
    for (uint32_t k = 0; same && k < sel.fill(p); ++k) {
      same =
          pos[k] >= 0 && static_cast<size_t>(pos[k]) < slots.size() && slots[pos[k]] == p * P + k;
    }
    held += sel.fill(p);
  }
  if (same && held == slots.size()) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat(
      "its image places tokens elsewhere than the snapshot records for ", IndexName(s, gi)));
}

// Loads index gi from its image; the error says why it cannot be used.
absl::Status LoadIndex(Session& s, const SessionImage& img, size_t gi, const IndexImageFile* images)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  if (gi >= img.index_images.size() || img.index_images[gi].bytes == 0) {
    return absl::NotFoundError("the drain wrote no image for it");
  }
  if (images == nullptr) {
    return absl::FailedPreconditionError("the index image file is missing or was refused");
  }
  ASSIGN_OR_RETURN(std::string bytes, images->Read(img.index_images[gi]));
  ASSIGN_OR_RETURN(std::unique_ptr<Selector> sel,
                   Selector::LoadImage(SelectorConfigOf(s), s.page_keys[gi].get(), bytes,
                                       static_cast<int64_t>(img.slots[gi].size())));
  const size_t frames = s.page_frames[s.FrameTableIndex(s.FirstLayerOf(gi / s.config.kv_heads),
                                                        gi % s.config.kv_heads)]
                            .size();
  RETURN_IF_ERROR(CheckLayout(s, *sel, img.slots[gi], frames, gi));
  sel->set_keys_prechecked(true);  // later appends pass CheckAppendInput
  s.selectors[gi] = std::move(sel);
  s.trees_built.fetch_add(1);
  return absl::OkStatus();
}

// Replays the chunks of index gi into a fresh selector and checks that it
// places every token where the image says.
absl::Status ReplayIndex(Session& s, const SessionImage& img, size_t gi)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  const SessionConfig& c = s.config;
  const int g = static_cast<int>(gi / c.kv_heads);
  const int h = static_cast<int>(gi % c.kv_heads);
  const std::vector<uint32_t>& slots = img.slots[gi];
  const std::vector<uint8_t*>& table = s.page_frames[s.FrameTableIndex(s.FirstLayerOf(g), h)];
  const uint32_t P = static_cast<uint32_t>(c.page_tokens);
  const uint64_t row_bytes = static_cast<uint64_t>(c.head_dim) * DTypeSize(c.dtype);
  std::vector<float> keys(slots.size() * c.head_dim);
  for (size_t t = 0; t < slots.size(); ++t) {
    ToFloat(c.dtype, table[slots[t] / P] + (slots[t] % P) * row_bytes, &keys[t * c.head_dim],
            c.head_dim);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Selector> sel,
                   Selector::Create(SelectorConfigOf(s), s.page_keys[gi].get()));
  std::vector<Placement> placed;
  int64_t at = 0;
  for (int64_t n : GroupChunks(img, g)) {
    const float* k = keys.data() + at * c.head_dim;
    RETURN_IF_ERROR(at == 0 ? sel->Build(k, n, &placed) : sel->Insert(k, n, &placed));
    for (int64_t i = 0; i < n; ++i) {
      if (placed[i].page != slots[at + i] / P || placed[i].slot != slots[at + i] % P) {
        return absl::DataLossError(absl::StrCat("rebuilding layer group ", g, " kv head ", h,
                                                " placed token ", at + i,
                                                " elsewhere than before the restart"));
      }
    }
    at += n;
  }
  if (sel->num_pages() != table.size()) {
    return absl::DataLossError(absl::StrCat("rebuilt layer group ", g, " kv head ", h, " has ",
                                            sel->num_pages(), " pages, not ", table.size()));
  }
  // The replay scanned the keys it read back; later appends pass
  // CheckAppendInput.
  sel->set_keys_prechecked(true);
  s.selectors[gi] = std::move(sel);
  s.trees_built.fetch_add(1);
  return absl::OkStatus();
}

// How index gi came back (Rebuild's per-index outcome; each task writes its own).
struct IndexOutcome {
  enum { kEmpty, kLoaded, kReplayed } how = kEmpty;
  std::string refused;  // why its image was not used ("" when none was refused)
};

// Index gi from its image when it verifies, else by replay.
absl::Status RecoverIndex(Session& s, const SessionImage& img, size_t gi,
                          const IndexImageFile* images, IndexOutcome* out)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  if (img.slots[gi].empty()) return absl::OkStatus();  // the group has no tokens yet
  const absl::Status loaded = LoadIndex(s, img, gi, images);
  if (loaded.ok()) {
    out->how = IndexOutcome::kLoaded;
    return loaded;
  }
  // "No image" is not a refusal: the kinds without images always replay.
  if (!absl::IsNotFound(loaded)) out->refused = std::string(loaded.message());
  out->how = IndexOutcome::kReplayed;
  return ReplayIndex(s, img, gi);
}

// Installs the recovered frames and counts in `s`, recovers its indexes on
// `threads` (from their images, else by replay; how each came back in
// *outcomes), and refreshes its lock-free views.
absl::Status Rebuild(Session& s, const SessionImage& img, FrameSet frames, int threads,
                     const IndexImageFile* images, std::vector<IndexOutcome>* outcomes) {
  absl::MutexLock l(&s.mu);
  size_t next = 0;
  for (size_t t = 0; t < img.frame_offsets.size(); ++t) {
    for (size_t p = 0; p < img.frame_offsets[t].size(); ++p) {
      s.page_frames[t].push_back(frames.frame(next++));
    }
    s.page_sums[t] = img.checksums[t];
  }
  s.frames = std::move(frames);
  s.tokens = img.tokens;
  s.group_tokens = img.group_tokens;
  s.next_layer = img.next_layer;
  s.pending_tokens = img.pending_tokens;
  s.chunks = img.chunks;
  // The tasks run while this thread holds s.mu and waits for them; each
  // writes only its own index and outcome.
  outcomes->assign(img.slots.size(), IndexOutcome{});
  RETURN_IF_ERROR(ParallelFor(static_cast<int64_t>(img.slots.size()), threads, [&](int64_t gi) {
    s.mu.AssertHeld();
    return RecoverIndex(s, img, static_cast<size_t>(gi), images, &(*outcomes)[gi]);
  }));
  StoreViews(s);
  return absl::OkStatus();
}

// Writes the image of every index of `s` that keeps one into `images` and
// records where in img->index_images (none recorded when no index has one).
void SaveIndexImages(const Session& s, IndexImageFileWriter* images, SessionImage* img)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
  std::vector<IndexImageRef> refs(s.selectors.size());
  bool any = false;
  std::string bytes;
  for (size_t gi = 0; gi < s.selectors.size(); ++gi) {
    const Selector* sel = s.selectors[gi].get();
    if (sel == nullptr || !sel->has_image() || sel->num_tokens() == 0) continue;
    bytes.clear();
    if (!sel->SaveImage(&bytes).ok()) continue;
    absl::StatusOr<IndexImageRef> ref = images->Append(bytes);
    if (!ref.ok()) return;  // the writer keeps the error; the daemon logs it
    refs[gi] = *ref;
    any = true;
  }
  if (any) img->index_images = std::move(refs);
}

using HeadMonitors = std::vector<std::unique_ptr<HeadQualityMonitor>>;

// The quality monitors of a session of `img` (none when the monitor is off
// or the selector is not monitored), with the snapshot's state restored
// into them; `fresh` says why they start fresh instead. Returns why the
// session must be dropped ("" when it need not).
std::string QualityFor(const SessionImage& img, const SessionQualityOptions& options,
                       bool monitor_on, HeadMonitors* heads, std::string* fresh) {
  if (!monitor_on) return "";
  absl::StatusOr<HeadMonitors> made =
      MakeHeadQuality(img.config, NumLayerGroups(img.config), options);
  if (!made.ok()) return std::string(made.status().message());
  *heads = std::move(made).value();
  if (heads->empty()) return "";  // not monitored: nothing to restore
  if (!img.quality_error.empty()) return img.quality_error;
  if (!img.quality.has_value()) {
    *fresh = img.quality_missing.empty() ? "the snapshot holds no calibration state"
                                         : img.quality_missing;
    return "";
  }
  const absl::Status st = RestoreQualityState(*img.quality, img.config.kv_heads, *heads);
  return st.ok() ? "" : std::string(st.message());
}

// Adds how the indexes of session `s` came back to `report`.
void Tally(const Session& s, const std::vector<IndexOutcome>& outcomes,
           SessionManager::RestoreReport* report) {
  int64_t refused = 0;
  for (size_t gi = 0; gi < outcomes.size(); ++gi) {
    const IndexOutcome& o = outcomes[gi];
    report->indexes_loaded += o.how == IndexOutcome::kLoaded ? 1 : 0;
    report->indexes_replayed += o.how == IndexOutcome::kReplayed ? 1 : 0;
    if (o.refused.empty()) continue;
    if (refused++ == 0) report->images_refused.push_back({s.id, "", IndexName(s, gi), o.refused});
  }
  if (refused > 0) report->images_refused.back()[1] = absl::StrCat(refused);
}

}  // namespace

SnapshotImage SessionManager::TakeSnapshot(std::vector<std::string>* skipped,
                                           IndexImageFileWriter* images) {
  std::vector<std::shared_ptr<Session>> all;
  {
    absl::ReaderMutexLock l(&mu_);
    for (const auto& [id, s] : sessions_) all.push_back(s);
  }
  SnapshotImage image;
  image.daemon_epoch = epoch_;
  image.capacity_bytes = options_.pool->capacity_bytes();
  image.written = clock_->Now();
  for (const auto& sp : all) {
    Session& s = *sp;
    absl::ReaderMutexLock l(&s.mu);
    const bool building =
        std::find(s.group_building.begin(), s.group_building.end(), 1) != s.group_building.end();
    if (s.broken || !s.keep_sums || building) {
      if (skipped != nullptr) {
        skipped->push_back(absl::StrCat(s.id, ": ",
                                        s.broken   ? "its index broke"
                                        : building ? "its indexes were still being built"
                                                   : "no checksums"));
      }
      continue;
    }
    SessionImage img;
    img.id = s.id;
    img.tenant = s.tenant;
    img.epoch = s.epoch;
    img.config = s.config;
    img.config.pinned = s.pinned.load();
    img.created = s.created;
    img.tokens = s.tokens;
    img.next_layer = s.next_layer;
    img.pending_tokens = s.pending_tokens;
    img.chunks = s.chunks;
    img.group_tokens = s.group_tokens;
    img.checksums = s.page_sums;
    for (const std::vector<uint8_t*>& table : s.page_frames) {
      img.frame_offsets.emplace_back();
      for (const uint8_t* f : table) img.frame_offsets.back().push_back(options_.pool->OffsetOf(f));
    }
    const uint32_t P = static_cast<uint32_t>(s.config.page_tokens);
    for (size_t gi = 0; gi < s.selectors.size(); ++gi) {
      img.slots.emplace_back(s.group_tokens[gi / s.config.kv_heads], 0);
      const Selector* sel = s.selectors[gi].get();
      for (uint32_t p = 0; sel != nullptr && p < sel->num_pages(); ++p) {
        const int32_t* pos = sel->positions(p);
        for (uint32_t k = 0; k < sel->fill(p); ++k) {
          if (pos[k] >= 0 && static_cast<size_t>(pos[k]) < img.slots.back().size()) {
            img.slots.back()[pos[k]] = p * P + k;
          }
        }
      }
    }
    if (images != nullptr) SaveIndexImages(s, images, &img);
    if (!s.quality.empty()) img.quality = QualityStateOf(s);
    image.sessions.push_back(std::move(img));
  }
  return image;
}

SessionManager::RestoreReport SessionManager::Restore(const SnapshotImage& image,
                                                      const IndexImageFile* images) {
  RestoreReport report;
  const absl::Time t0 = absl::Now();
  std::vector<const SessionImage*> kept;
  std::vector<HeadMonitors> kept_quality;
  std::vector<std::string> kept_fresh;
  std::vector<RecoveredFrames> sets;
  for (const SessionImage& img : image.sessions) {
    std::string why;
    if (absl::Status st = ValidateSessionConfig(img.config, options_.max_ttl); !st.ok()) {
      why = std::string(st.message());
    } else if (img.id.empty() || !ValidateTenantName(img.tenant).ok()) {
      why = "its id or tenant is malformed";
    }
    const uint64_t frame_bytes =
        PageGeometry{img.config.page_tokens, img.config.head_dim, img.config.dtype}.frame_bytes();
    if (why.empty()) why = CheckCounts(img);
    if (why.empty()) why = CheckFrames(img, *options_.pool, frame_bytes);
    HeadMonitors heads;
    std::string fresh;
    if (why.empty()) why = QualityFor(img, options_.quality, sampler_ != nullptr, &heads, &fresh);
    if (!why.empty()) {
      report.dropped.push_back({img.id, img.tenant, why});
      continue;
    }
    RecoveredFrames set{img.tenant, frame_bytes, {}};
    for (const auto& table : img.frame_offsets) {
      set.offsets.insert(set.offsets.end(), table.begin(), table.end());
    }
    sets.push_back(std::move(set));
    kept.push_back(&img);
    kept_quality.push_back(std::move(heads));
    kept_fresh.push_back(std::move(fresh));
  }
  report.verify_time = absl::Now() - t0;
  absl::StatusOr<std::vector<FrameSet>> owned = options_.pool->Recover(sets);
  if (!owned.ok()) {
    for (const SessionImage* img : kept) {
      report.dropped.push_back({img->id, img->tenant, std::string(owned.status().message())});
    }
    return report;
  }
  const absl::Time now = clock_->Now();
  for (size_t i = 0; i < kept.size(); ++i) {
    const SessionImage& img = *kept[i];
    absl::StatusOr<SizeClassId> cls = options_.pool->GetOrCreateClass(sets[i].frame_bytes);
    auto s = std::make_shared<Session>(img.id, img.tenant, img.epoch, img.config,
                                       cls.ok() ? *cls : 0, now, /*keep_sums=*/true);
    absl::Status st = cls.status();
    std::vector<IndexOutcome> outcomes;
    if (st.ok()) {
      st = Rebuild(*s, img, std::move((*owned)[i]), options_.build_threads, images, &outcomes);
    }
    Tally(*s, outcomes, &report);
    if (!st.ok()) {
      report.dropped.push_back({img.id, img.tenant, std::string(st.message())});
      continue;  // its frames go back to the pool with it
    }
    if (!kept_quality[i].empty()) {
      const bool restored = kept_fresh[i].empty();
      if (restored) RestoreQualityCounters(*img.quality, *s);
      s->EnableQuality(std::move(kept_quality[i]), sampler_.get());
      // Restored calibrators refuse a seed (they have counted selections);
      // fresh ones (an unreadable monitor state) may take one.
      s->calibration_memory = calibration_memory_.get();
      s->width_pool = MakeWidthPool(s->config, options_.quality);
      s->fair_burst = options_.quality.fair_burst;
      report.quality_restored += restored ? 1 : 0;
      if (!restored) report.quality_fresh.push_back({img.id, kept_fresh[i]});
    }
    absl::MutexLock l(&mu_);
    sessions_.emplace(s->id, std::move(s));
    report.recovered++;
  }
  report.rebuild_time = absl::Now() - t0 - report.verify_time;
  return report;
}

}  // namespace icecache
