#include "server/session/prefetch.h"

#include <utility>

namespace icecache {

// ------------------------------------------------------------ GroupPrefetch

GroupPrefetch::GroupPrefetch(int group_in, uint64_t generation_in, int64_t tokens_in,
                             const FetchRequest& request, uint64_t layer_stride, int first,
                             int count)
    : group(group_in),
      generation(generation_in),
      tokens(tokens_in),
      first_layer(first),
      num_layers(count),
      request_(request),
      layer_stride_(layer_stride) {
  absl::MutexLock l(&mu_);
  states_.assign(count, State::kQueued);
  layouts_.resize(count);
}

FetchRequest GroupPrefetch::RequestFor(int layer) const {
  FetchRequest r = request_;
  r.layer = layer;
  r.num_layers = 1;
  // A scatter names blocks, not an offset (each layer has its own tensor).
  if (r.device.block_ids.empty()) {
    r.offset = request_.offset + static_cast<uint64_t>(layer - request_.layer) * layer_stride_;
  }
  r.want_positions = true;
  // Written later, under another hold of the session's lock.
  r.hints_checked = false;
  // (in_place carries over: each layer's write has its own record.)
  // The client's done event belongs to its first layer; a prefetched layer
  // is complete when its push returns (the wait event still orders it).
  r.device.done_event.clear();
  return r;
}

bool GroupPrefetch::Matches(int layer, const std::string& buffer_id, uint64_t offset,
                            const std::vector<uint32_t>& block_ids) const {
  if (layer < first_layer || layer >= first_layer + num_layers) return false;
  if (buffer_id != request_.buffer_id || block_ids != request_.device.block_ids) return false;
  return !block_ids.empty() || offset == RequestFor(layer).offset;
}

bool GroupPrefetch::LayerNotWriting(int i) const { return states_[i] != State::kWriting; }

// absl::Condition over one layer; called by the mutex with mu_ held.
struct GroupPrefetch::LayerWait {
  const GroupPrefetch* self;
  int i;
  static bool Done(LayerWait* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return w->self->LayerNotWriting(w->i);
  }
};

bool GroupPrefetch::NotWriting() const {
  for (State s : states_) {
    if (s == State::kWriting) return false;
  }
  return true;
}

std::optional<FetchLayout> GroupPrefetch::Take(int layer) {
  const int i = layer - first_layer;
  if (i < 0 || i >= num_layers) return std::nullopt;
  absl::MutexLock l(&mu_);
  LayerWait arg{this, i};
  mu_.Await(absl::Condition(&LayerWait::Done, &arg));
  if (states_[i] == State::kDone) return layouts_[i];
  if (states_[i] == State::kQueued) states_[i] = State::kClaimed;
  return std::nullopt;
}

bool GroupPrefetch::BeginLayer(int layer) {
  const int i = layer - first_layer;
  absl::MutexLock l(&mu_);
  if (cancelled_ || states_[i] != State::kQueued) return false;
  states_[i] = State::kWriting;
  return true;
}

void GroupPrefetch::EndLayer(int layer, absl::StatusOr<FetchLayout> written) {
  const int i = layer - first_layer;
  absl::MutexLock l(&mu_);
  if (written.ok()) {
    layouts_[i] = *std::move(written);
    states_[i] = State::kDone;
  } else {
    states_[i] = State::kFailed;
  }
}

void GroupPrefetch::Cancel() {
  absl::MutexLock l(&mu_);
  cancelled_ = true;
  for (State& s : states_) {
    if (s == State::kQueued) s = State::kCancelled;
  }
  mu_.Await(absl::Condition(this, &GroupPrefetch::NotWriting));
}

bool GroupPrefetch::cancelled() const {
  absl::MutexLock l(&mu_);
  return cancelled_;
}

GroupPrefetch::State GroupPrefetch::state(int layer) const {
  absl::MutexLock l(&mu_);
  return states_[layer - first_layer];
}

// ------------------------------------------------------------ Prefetcher

absl::StatusOr<std::unique_ptr<Prefetcher>> Prefetcher::Create(int threads, int max_jobs) {
  if (threads < 1 || max_jobs < 1) {
    return absl::InvalidArgumentError(
        "prefetcher: prefetch_threads and max_prefetch_jobs must be >= 1");
  }
  std::unique_ptr<Prefetcher> p(new Prefetcher(max_jobs));
  for (int i = 0; i < threads; ++i) p->threads_.emplace_back([raw = p.get()] { raw->Loop(); });
  return p;
}

Prefetcher::Prefetcher(int max_jobs) : max_jobs_(max_jobs) {}

Prefetcher::~Prefetcher() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    queue_.clear();
  }
  for (std::thread& t : threads_) t.join();
}

bool Prefetcher::Post(std::function<void()> job) {
  absl::MutexLock l(&mu_);
  if (stop_ || static_cast<int>(queue_.size()) >= max_jobs_) return false;
  queue_.push_back(std::move(job));
  return true;
}

int Prefetcher::pending() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(queue_.size()) + running_;
}

bool Prefetcher::HasWork() const { return stop_ || !queue_.empty(); }
bool Prefetcher::Idle() const { return queue_.empty() && running_ == 0; }

void Prefetcher::WaitIdle() const {
  absl::MutexLock l(&mu_);
  mu_.Await(absl::Condition(this, &Prefetcher::Idle));
}

void Prefetcher::Loop() {
  while (true) {
    std::function<void()> job;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(this, &Prefetcher::HasWork));
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    job();
    absl::MutexLock l(&mu_);
    --running_;
  }
}

}  // namespace icecache
