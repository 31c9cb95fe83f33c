// The manager's side of the layer-group prefetch (docs/architecture.md §5.2;
// prefetch.h holds the record and the worker pool).
//
// Invariants:
//  - At most one record of a (session, group) writes at a time: StartPrefetch
//    replaces the group's record and cancels the old one (waiting for the
//    layer it is writing) under the session's prefetch_start_mu, before the
//    new job is posted.
//  - A layer is written by exactly one party: the worker (kQueued ->
//    kWriting) or the client's call (kQueued -> kClaimed); the loser skips.
//  - The worker writes a layer only while the group's stored selection is
//    the record's, at the record's token count (checked under the session's
//    reader lock, which appends need exclusively), so a stale selection is
//    never written; the call checks the same before it uses the bytes.
//  - No session lock is held while waiting for a record (Take, Cancel).
#include <utility>

#include "server/session/prefetch.h"
#include "server/session/session.h"
#include "server/session/session_manager.h"

namespace icecache {

namespace {

struct PrefetchJob {
  std::weak_ptr<Session> session;
  std::shared_ptr<GroupPrefetch> record;
  BufferLease lease;
};

}  // namespace

SessionManager::PrefetchedLayer SessionManager::TakePrefetched(Session& s,
                                                               const SelectRequest& select,
                                                               const FetchRequest& fetch) {
  PrefetchedLayer out;
  if (!select.reuse_group_selection || fetch.num_layers != 1 || select.layer < 0 ||
      select.layer >= s.config.layers) {
    return out;
  }
  {
    absl::MutexLock l(&s.prefetch_mu);
    out.record = s.prefetch[s.GroupOf(select.layer)];
  }
  if (out.record == nullptr ||
      !out.record->Matches(select.layer, fetch.buffer_id, fetch.offset, fetch.device.block_ids)) {
    out.record.reset();
    return out;
  }
  out.layout = out.record->Take(select.layer);
  if (!out.layout.has_value() &&
      out.record->state(select.layer) == GroupPrefetch::State::kClaimed) {
    prefetch_counters_->claimed.fetch_add(1, std::memory_order_relaxed);
  }
  return out;
}

bool SessionManager::UsePrefetched(const Session& s, const SelectResult& selection,
                                   const FetchRequest& fetch, PrefetchedLayer* pre,
                                   DecodeStepResult* out) {
  if (!pre->layout.has_value()) return false;
  const GroupPrefetch& r = *pre->record;
  if (!selection.reused || selection.generation != r.generation ||
      !s.SelectionCurrent(r.group, r.generation, r.tokens)) {
    return false;  // written from a selection that is no longer the group's
  }
  out->layout = *std::move(pre->layout);
  if (!fetch.want_positions) {
    for (FetchHeadLayout& h : out->layout.heads) h.positions.clear();
  }
  out->prefetched = true;
  prefetch_counters_->used.fetch_add(1, std::memory_order_relaxed);
  return true;
}

int SessionManager::StartPrefetch(const std::shared_ptr<Session>& sp, BufferLease lease,
                                  const FetchRequest& fetch, const DecodeStepResult& out) {
  Session& s = *sp;
  const int group = s.GroupOf(fetch.layer);
  const int first = fetch.layer + fetch.num_layers;
  const int end = s.FirstLayerOf(group) + s.LayersIn(group);
  if (prefetcher_ == nullptr || s.config.layer_reuse <= 1 || out.selection.reused ||
      s.FirstLayerOf(group) != fetch.layer || first >= end) {
    return 0;
  }
  auto job = std::make_shared<PrefetchJob>();
  job->session = sp;
  job->record =
      std::make_shared<GroupPrefetch>(group, out.selection.generation, out.selection.tokens, fetch,
                                      out.layout.layer_stride_bytes, first, end - first);
  job->lease = std::move(lease);
  absl::MutexLock serial(&s.prefetch_start_mu);
  std::shared_ptr<GroupPrefetch> old;
  {
    absl::MutexLock l(&s.prefetch_mu);
    old = std::exchange(s.prefetch[group], job->record);
  }
  // The old record stops before the new one may write the same places.
  if (old != nullptr) old->Cancel();
  GroupPrefetch* record = job->record.get();
  const bool posted = prefetcher_->Post([this, job = std::move(job)] {
    if (options_.on_prefetch_job) options_.on_prefetch_job();
    RunPrefetch(job->session, *job->record, job->lease);
  });
  if (!posted) {
    record->Cancel();  // its layers are left to the calls
    prefetch_counters_->refused.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  prefetch_counters_->started.fetch_add(1, std::memory_order_relaxed);
  return end - first;
}

void SessionManager::DropPrefetch(Session& s, int layer) {
  if (s.config.layer_reuse <= 1 || layer < 0 || layer >= s.config.layers ||
      s.FirstLayerOf(s.GroupOf(layer)) != layer) {
    return;
  }
  const int group = s.GroupOf(layer);
  absl::MutexLock serial(&s.prefetch_start_mu);
  std::shared_ptr<GroupPrefetch> old;
  {
    absl::MutexLock l(&s.prefetch_mu);
    old = std::move(s.prefetch[group]);
  }
  if (old != nullptr) old->Cancel();
}

void SessionManager::RunPrefetch(const std::weak_ptr<Session>& weak, GroupPrefetch& record,
                                 BufferLease& lease) {
  for (int layer = record.first_layer; layer < record.first_layer + record.num_layers; ++layer) {
    std::shared_ptr<Session> s = weak.lock();
    if (s == nullptr || s->closed.load() || !lease.registered()) {
      record.Cancel();
    }
    if (!record.BeginLayer(layer)) {
      const GroupPrefetch::State st = record.state(layer);
      if (st != GroupPrefetch::State::kClaimed) {
        prefetch_counters_->discarded.fetch_add(1, std::memory_order_relaxed);
      }
      continue;
    }
    absl::StatusOr<FetchLayout> written;
    {
      absl::ReaderMutexLock read(&s->mu);
      if (s->SelectionCurrent(record.group, record.generation, record.tokens)) {
        written =
            s->Fetch(lease, record.RequestFor(layer), options_.decode_threads, checksum_counters());
      } else {
        written = absl::AbortedError("the group selected again; prefetch dropped");
      }
    }
    if (written.ok()) {
      prefetch_counters_->written.fetch_add(1, std::memory_order_relaxed);
    } else {
      prefetch_counters_->discarded.fetch_add(1, std::memory_order_relaxed);
    }
    const bool stale = absl::IsAborted(written.status());
    record.EndLayer(layer, std::move(written));
    if (stale) record.Cancel();
  }
}

PrefetchStats SessionManager::prefetch_stats() const {
  const PrefetchCounters& c = *prefetch_counters_;
  PrefetchStats st;
  st.started = c.started.load();
  st.refused = c.refused.load();
  st.written = c.written.load();
  st.used = c.used.load();
  st.claimed = c.claimed.load();
  st.discarded = c.discarded.load();
  return st;
}

void SessionManager::WaitForPrefetch() const {
  if (prefetcher_ != nullptr) prefetcher_->WaitIdle();
}

int SessionManager::PrefetchPending() const {
  return prefetcher_ == nullptr ? 0 : prefetcher_->pending();
}

}  // namespace icecache
