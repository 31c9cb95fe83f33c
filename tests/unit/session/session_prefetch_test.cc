// Layer-group prefetch (IceCache(r), docs/architecture.md §5.2) on real pool
// frames and a real /dev/shm buffer: the later layers of a group are written
// in the background, their calls use them only when they are complete and
// current, and a prefetch is dropped when it goes stale.
#include <unistd.h>

#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::MakeKv;
using ::icecache::testing::MakeQueries;
using ::icecache::testing::SmallConfig;
using ::icecache::testing::UniqueName;

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }

constexpr uint64_t kBufferBytes = 1 << 20;

// A manager whose prefetch thread can be held before each job.
class SessionPrefetchTest : public ::testing::Test {
 protected:
  void SetUp() override { Start(/*max_jobs=*/64); }
  void TearDown() override {
    if (!gate_.HasBeenNotified()) gate_.Notify();  // a held job must not block the teardown
  }

  void Start(int max_jobs) {
    env_.manager.reset();
    PagePoolOptions po;
    po.capacity_bytes = uint64_t{64} << 20;
    po.use_huge_pages = false;
    auto pool = PagePool::Create(po);
    ASSERT_THAT(pool, IsOk());
    env_.pool = std::move(pool).value();
    BufferRegistryOptions bo;
    bo.idle_ttl = absl::Seconds(60);
    auto reg = BufferRegistry::Create(bo);
    ASSERT_THAT(reg, IsOk());
    env_.buffers = std::move(reg).value();
    SessionManagerOptions mo;
    mo.pool = env_.pool.get();
    mo.buffers = env_.buffers.get();
    mo.clock = &clock_;
    mo.reaper_interval = absl::ZeroDuration();
    mo.max_prefetch_jobs = max_jobs;
    mo.on_prefetch_job = [this] {
      if (gated_) gate_.WaitForNotification();
    };
    auto m = SessionManager::Create(mo);
    ASSERT_THAT(m, IsOk());
    env_.manager = std::move(m).value();
    auto shm = ShmFile::Create(UniqueName("prefetch"), kBufferBytes);
    ASSERT_THAT(shm, IsOk());
    shm_ = std::move(shm).value();
    auto b = env_.buffers->RegisterShm(Alice(), shm_.path(), shm_.size(), clock_.Now());
    ASSERT_THAT(b, IsOk());
    buffer_id_ = b->id;
  }

  // A session of 4 layers in one group (layer_reuse 4) holding `tokens`. Its
  // granularity unset: DecodeStep into the shm buffer selects per token.
  std::string NewSession(int64_t tokens, std::optional<Granularity> granularity = std::nullopt) {
    config_ = SmallConfig();
    config_.layer_reuse = 4;
    config_.granularity = granularity;
    auto info = env_.manager->CreateSession(Alice(), config_);
    EXPECT_THAT(info, IsOk());
    EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, tokens, MakeKv(config_, 0, tokens)),
                IsOk());
    return info->id;
  }

  SelectRequest First(uint32_t seed) const {
    SelectRequest s;
    s.layer = 0;
    s.queries = MakeQueries(config_, seed);
    s.params.budget_tokens = 12;
    s.params.sink_tokens = 4;
    s.params.want_positions = true;
    return s;
  }
  static SelectRequest Later(int layer) {
    SelectRequest s;
    s.layer = layer;
    s.reuse_group_selection = true;
    s.params.want_positions = true;
    return s;
  }

  absl::StatusOr<DecodeStepResult> Step(const std::string& id, const SelectRequest& s,
                                        uint64_t offset, bool prefetch = false) {
    return env_.manager->DecodeStep(Alice(), id, s, buffer_id_, offset, 1, {}, prefetch);
  }

  // The selection's pages, or its tokens when it was made per token.
  static void AddSelection(const SelectResult& selection, FetchRequest* f) {
    for (const Selection& h : selection.heads) {
      if (h.token_refs.empty()) {
        f->pages.push_back(h.pages);
      } else {
        f->tokens.push_back(h.positions);
      }
    }
  }

  // What a fetch of the whole group with `selection` writes, in a copy of
  // the buffer region [0, 4 x stride): the reference bytes.
  std::vector<uint8_t> Reference(const std::string& id, const DecodeStepResult& first) {
    FetchRequest f;
    f.layer = 0;
    f.num_layers = 4;
    AddSelection(first.selection, &f);
    f.buffer_id = buffer_id_;
    f.offset = kBufferBytes / 2;
    auto layout = env_.manager->FetchPages(Alice(), id, f);
    EXPECT_THAT(layout, IsOk());
    const uint8_t* at = shm_.data() + kBufferBytes / 2;
    return std::vector<uint8_t>(at, at + layout->total_bytes);
  }

  // The bytes of layer `layer` in the first half of the buffer.
  std::vector<uint8_t> LayerBytes(const FetchLayout& l) const {
    const uint8_t* at = shm_.data() + l.buffer_offset;
    return std::vector<uint8_t>(at, at + l.layer_stride_bytes);
  }
  static std::vector<uint8_t> Slice(const std::vector<uint8_t>& ref, const FetchLayout& l,
                                    int layer) {
    const size_t at = static_cast<size_t>(layer) * l.layer_stride_bytes;
    return std::vector<uint8_t>(ref.begin() + at, ref.begin() + at + l.layer_stride_bytes);
  }

  // Prefetches layers 1..3 of a 4-layer group and checks their bytes.
  void ExpectLaterLayersPrefetched(std::optional<Granularity> granularity);

  FakeClock clock_;
  testing::Env env_;
  ShmFile shm_;
  std::string buffer_id_;
  SessionConfig config_;
  bool gated_ = false;
  absl::Notification gate_;
};

// Both units: per token (the default into shm) and whole pages.
TEST_F(SessionPrefetchTest, LaterLayersAreWrittenInTheBackgroundAndHandedToTheirCalls) {
  ExpectLaterLayersPrefetched(std::nullopt);
}
TEST_F(SessionPrefetchTest, LaterLayersOfAPageSelectionAreWrittenInTheBackgroundToo) {
  ExpectLaterLayersPrefetched(Granularity::kPage);
}

void SessionPrefetchTest::ExpectLaterLayersPrefetched(std::optional<Granularity> granularity) {
  const std::string id = NewSession(64, granularity);
  auto first = Step(id, First(3), 0, /*prefetch=*/true);
  ASSERT_THAT(first, IsOk());
  ASSERT_EQ(first->selection.heads[0].token_refs.empty(), granularity == Granularity::kPage);
  EXPECT_EQ(first->prefetching, 3);
  EXPECT_FALSE(first->prefetched);
  env_.manager->WaitForPrefetch();
  const uint64_t stride = first->layout.layer_stride_bytes;
  const std::vector<uint8_t> ref = Reference(id, *first);
  EXPECT_EQ(LayerBytes(first->layout), Slice(ref, first->layout, 0));
  for (int layer = 1; layer < 4; ++layer) {
    auto later = Step(id, Later(layer), layer * stride);
    ASSERT_THAT(later, IsOk());
    EXPECT_TRUE(later->prefetched) << "layer " << layer;
    EXPECT_TRUE(later->selection.reused);
    EXPECT_EQ(later->layout.first_layer, layer);
    EXPECT_EQ(later->layout.buffer_offset, layer * stride);
    for (int h = 0; h < config_.kv_heads; ++h) {
      EXPECT_EQ(later->layout.heads[h].positions, first->layout.heads[h].positions);
    }
    EXPECT_EQ(LayerBytes(later->layout), Slice(ref, first->layout, layer)) << "layer " << layer;
  }
  const PrefetchStats st = env_.manager->prefetch_stats();
  EXPECT_EQ(st.started, 1u);
  EXPECT_EQ(st.written, 3u);
  EXPECT_EQ(st.used, 3u);
  EXPECT_EQ(st.claimed, 0u);
}

TEST_F(SessionPrefetchTest, ACallThatComesFirstWritesItsLayerItselfAndTheWorkerSkipsIt) {
  const std::string id = NewSession(64);
  gated_ = true;
  auto first = Step(id, First(3), 0, true);
  ASSERT_THAT(first, IsOk());
  ASSERT_EQ(first->prefetching, 3);
  const uint64_t stride = first->layout.layer_stride_bytes;
  // The worker is held: layer 1's call claims its layer and copies it.
  auto one = Step(id, Later(1), stride);
  ASSERT_THAT(one, IsOk());
  EXPECT_FALSE(one->prefetched);
  gate_.Notify();
  env_.manager->WaitForPrefetch();
  const std::vector<uint8_t> ref = Reference(id, *first);
  EXPECT_EQ(LayerBytes(one->layout), Slice(ref, first->layout, 1));
  for (int layer = 2; layer < 4; ++layer) {
    auto later = Step(id, Later(layer), layer * stride);
    ASSERT_THAT(later, IsOk());
    EXPECT_TRUE(later->prefetched);
    EXPECT_EQ(LayerBytes(later->layout), Slice(ref, first->layout, layer));
  }
  const PrefetchStats st = env_.manager->prefetch_stats();
  EXPECT_EQ(st.claimed, 1u);
  EXPECT_EQ(st.written, 2u);
  EXPECT_EQ(st.used, 2u);
}

TEST_F(SessionPrefetchTest, ANewStepDropsTheOldPrefetchAndWritesOnlyTheNewSelection) {
  const std::string id = NewSession(64);
  gated_ = true;
  auto old_step = Step(id, First(3), 0, true);
  ASSERT_THAT(old_step, IsOk());
  // Next token, next step, other queries: the old job has not run.
  const auto kv = MakeKv(config_, 64, 1);
  ASSERT_THAT(env_.manager->AppendKv(Alice(), id, 1, kv), IsOk());
  auto step = Step(id, First(11), 0, true);
  ASSERT_THAT(step, IsOk());
  ASSERT_EQ(step->prefetching, 3);
  gate_.Notify();
  env_.manager->WaitForPrefetch();
  const uint64_t stride = step->layout.layer_stride_bytes;
  const std::vector<uint8_t> ref = Reference(id, *step);
  for (int layer = 1; layer < 4; ++layer) {
    auto later = Step(id, Later(layer), layer * stride);
    ASSERT_THAT(later, IsOk());
    EXPECT_TRUE(later->prefetched);
    EXPECT_EQ(LayerBytes(later->layout), Slice(ref, step->layout, layer));
  }
  const PrefetchStats st = env_.manager->prefetch_stats();
  EXPECT_EQ(st.started, 2u);
  EXPECT_EQ(st.written, 3u);    // only the new step's layers
  EXPECT_EQ(st.discarded, 3u);  // the old step's
}

TEST_F(SessionPrefetchTest, AnotherSelectionOfTheGroupMakesTheCallsCopyAgain) {
  const std::string id = NewSession(64);
  auto first = Step(id, First(3), 0, true);
  ASSERT_THAT(first, IsOk());
  env_.manager->WaitForPrefetch();
  // The group selects again with other queries (same tokens): the bytes
  // written from the first selection are stale.
  SelectRequest again = First(29);
  again.params.budget_tokens = 20;
  auto second = env_.manager->SelectPages(Alice(), id, again);
  ASSERT_THAT(second, IsOk());
  const uint64_t stride = first->layout.layer_stride_bytes;
  auto later = Step(id, Later(1), stride);
  ASSERT_THAT(later, IsOk());
  EXPECT_FALSE(later->prefetched);
  for (int h = 0; h < config_.kv_heads; ++h) {
    EXPECT_EQ(later->selection.heads[h].pages, second->heads[h].pages);
  }
  EXPECT_EQ(env_.manager->prefetch_stats().used, 0u);
}

TEST_F(SessionPrefetchTest, AFirstLayerCallWithoutPrefetchStopsTheOldOneBeforeItSelects) {
  const std::string id = NewSession(64);
  gated_ = true;
  ASSERT_THAT(Step(id, First(3), 0, true), IsOk());
  // The same group selects again, without prefetch: the held job must not
  // write the old selection afterwards.
  auto again = Step(id, First(17), 0, /*prefetch=*/false);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->prefetching, 0);
  gate_.Notify();
  env_.manager->WaitForPrefetch();
  const PrefetchStats st = env_.manager->prefetch_stats();
  EXPECT_EQ(st.written, 0u);
  EXPECT_EQ(st.discarded, 3u);
  const uint64_t stride = again->layout.layer_stride_bytes;
  const std::vector<uint8_t> ref = Reference(id, *again);
  for (int layer = 1; layer < 4; ++layer) {
    auto later = Step(id, Later(layer), layer * stride);
    ASSERT_THAT(later, IsOk());
    EXPECT_FALSE(later->prefetched);
    EXPECT_EQ(LayerBytes(later->layout), Slice(ref, again->layout, layer));
  }
}

TEST_F(SessionPrefetchTest, ACallAtAnotherOffsetIsWrittenAsAsked) {
  const std::string id = NewSession(64);
  auto first = Step(id, First(3), 0, true);
  ASSERT_THAT(first, IsOk());
  env_.manager->WaitForPrefetch();
  const uint64_t stride = first->layout.layer_stride_bytes;
  auto later = Step(id, Later(2), 6 * stride);
  ASSERT_THAT(later, IsOk());
  EXPECT_FALSE(later->prefetched);
  EXPECT_EQ(later->layout.buffer_offset, 6 * stride);
  const std::vector<uint8_t> ref = Reference(id, *first);
  EXPECT_EQ(LayerBytes(later->layout), Slice(ref, first->layout, 2));
}

TEST_F(SessionPrefetchTest, ADroppedSessionOrUnregisteredBufferStopsThePrefetch) {
  gated_ = true;
  const std::string a = NewSession(64);
  ASSERT_THAT(Step(a, First(3), 0, true), IsOk());
  ASSERT_THAT(env_.manager->DropSession(Alice(), a), IsOk());
  const std::string b = NewSession(64);
  ASSERT_THAT(Step(b, First(3), 0, true), IsOk());
  ASSERT_THAT(env_.buffers->Unregister(Alice(), buffer_id_), IsOk());
  gate_.Notify();
  env_.manager->WaitForPrefetch();
  const PrefetchStats st = env_.manager->prefetch_stats();
  EXPECT_EQ(st.started, 2u);
  EXPECT_EQ(st.written, 0u);
  EXPECT_EQ(st.discarded, 6u);
}

TEST_F(SessionPrefetchTest, AFullQueueAnswersWithoutPrefetchAndTheCallsStillWrite) {
  Start(/*max_jobs=*/1);
  gated_ = true;
  const std::string a = NewSession(64);
  const std::string b = NewSession(64);
  const std::string c = NewSession(64);
  auto ra = Step(a, First(3), 0, true);  // taken by the (held) thread
  ASSERT_THAT(ra, IsOk());
  while (env_.manager->PrefetchPending() != 1) std::this_thread::yield();
  // The job is running (held) or queued: either way one slot is used; fill
  // the queue, then one more is refused.
  auto rb = Step(b, First(3), 0, true);
  ASSERT_THAT(rb, IsOk());
  // c writes a region of its own. a's and b's prefetches write their later
  // layers at [stride, 3 stride) from the prefetch thread. This thread
  // writing the same bytes would be a client's race between two sessions,
  // ordered only by the test's gate, and TSan reported it once in a fresh
  // clone's run (2026-12-03).
  constexpr uint64_t kOwnRegion = kBufferBytes / 4;
  auto rc = Step(c, First(3), kOwnRegion, true);
  ASSERT_THAT(rc, IsOk());
  const int refused = (rb->prefetching == 0) + (rc->prefetching == 0);
  EXPECT_GE(refused, 1);
  EXPECT_EQ(env_.manager->prefetch_stats().refused, static_cast<uint64_t>(refused));
  const uint64_t stride = rc->layout.layer_stride_bytes;
  auto later = Step(c, Later(1), kOwnRegion + stride);
  ASSERT_THAT(later, IsOk());
  if (rc->prefetching == 0) {
    EXPECT_FALSE(later->prefetched);
  }
  gate_.Notify();
  env_.manager->WaitForPrefetch();
}

// Several sessions decode concurrently, each with prefetch, each checking
// every byte of every layer it was handed.
TEST_F(SessionPrefetchTest, ConcurrentStreamsGetTheirOwnBytes) {
  constexpr int kStreams = 4, kSteps = 6;
  std::vector<std::string> ids;
  std::vector<ShmFile> files;
  std::vector<std::string> buffers;
  for (int i = 0; i < kStreams; ++i) {
    ids.push_back(NewSession(48));
    auto shm = ShmFile::Create(UniqueName("prefetch-c"), kBufferBytes);
    ASSERT_THAT(shm, IsOk());
    auto reg = env_.buffers->RegisterShm(Alice(), shm->path(), shm->size(), clock_.Now());
    ASSERT_THAT(reg, IsOk());
    buffers.push_back(reg->id);
    files.push_back(std::move(shm).value());
  }
  std::vector<int> bad(kStreams, 0), used(kStreams, 0);
  auto run = [&](int i) {
    int64_t tokens = 48;
    for (int step = 0; step < kSteps; ++step) {
      if (step > 0) {
        if (!env_.manager->AppendKv(Alice(), ids[i], 1, MakeKv(config_, tokens, 1)).ok()) {
          ++bad[i];
          return;
        }
        ++tokens;
      }
      auto first = env_.manager->DecodeStep(Alice(), ids[i], First(100 + step * 7 + i), buffers[i],
                                            0, 1, {}, true);
      if (!first.ok()) {
        ++bad[i];
        return;
      }
      const uint64_t stride = first->layout.layer_stride_bytes;
      std::vector<std::vector<uint8_t>> got;
      for (int layer = 1; layer < 4; ++layer) {
        auto later = env_.manager->DecodeStep(Alice(), ids[i], Later(layer), buffers[i],
                                              layer * stride, 1, {}, false);
        if (!later.ok()) {
          ++bad[i];
          return;
        }
        used[i] += later->prefetched;
        const uint8_t* at = files[i].data() + layer * stride;
        got.emplace_back(at, at + stride);
      }
      FetchRequest f;
      f.layer = 0;
      f.num_layers = 4;
      AddSelection(first->selection, &f);
      f.buffer_id = buffers[i];
      f.offset = kBufferBytes / 2;
      auto whole = env_.manager->FetchPages(Alice(), ids[i], f);
      if (!whole.ok()) {
        ++bad[i];
        return;
      }
      for (int layer = 1; layer < 4; ++layer) {
        const uint8_t* ref = files[i].data() + kBufferBytes / 2 + layer * stride;
        if (std::memcmp(ref, got[layer - 1].data(), stride) != 0) ++bad[i];
      }
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) threads.emplace_back(run, i);
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) EXPECT_EQ(bad[i], 0) << "stream " << i;
  const PrefetchStats st = env_.manager->prefetch_stats();
  EXPECT_EQ(st.used + st.claimed + st.discarded, static_cast<uint64_t>(kStreams * kSteps * 3));
}

}  // namespace
}  // namespace icecache
