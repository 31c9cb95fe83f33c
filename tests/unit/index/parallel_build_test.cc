#include "server/index/parallel_build.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/index_test_data.h"

namespace icecache {
namespace {

using ::icecache::testing::HeadData;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeClusteredHead;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(ParallelForTest, RunsEveryIndexOnceForAnyThreadCount) {
  for (int threads : {0, 1, 2, 4}) {
    std::vector<std::atomic<int>> hits(1000);
    ASSERT_THAT(ParallelFor(1000, threads,
                            [&](int64_t i) {
                              hits[i].fetch_add(1);
                              return absl::OkStatus();
                            }),
                IsOk());
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(hits[i].load(), 1) << "threads " << threads;
  }
}

// The daemon's pattern: oneTBB's workers already exist (an earlier build),
// and a different thread (a gRPC handler, the index builder) writes the
// inputs and calls ParallelFor; its tasks read them and write outputs the
// caller reads afterwards. Plain data, no atomics: under TSan this is
// reported unless ParallelFor makes the fork and join edges visible
// (Debian's oneTBB is uninstrumented; parallel_build.cc).
TEST(ParallelForTest, TasksSeeTheCallersWritesAndTheCallerSeesTheirs) {
  ASSERT_THAT(ParallelFor(64, 2, [](int64_t) { return absl::OkStatus(); }), IsOk());
  for (int round = 0; round < 4; ++round) {
    std::thread caller([round] {
      std::vector<int64_t> in(256), out(256, 0);
      for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int64_t>(i) * (round + 1);
      ASSERT_THAT(ParallelFor(256, 2,
                              [&](int64_t i) {
                                out[i] = in[i] + 1;
                                return absl::OkStatus();
                              }),
                  IsOk());
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_EQ(out[i], static_cast<int64_t>(i) * (round + 1) + 1) << "round " << round;
      }
    });
    caller.join();
  }
}

// ParallelFor and ParallelForInOrder alike.
TEST(ParallelForTest, OneThreadRunsSeriallyInOrderOnTheCaller) {
  for (bool in_order : {false, true}) {
    std::vector<int64_t> order;
    const std::thread::id caller = std::this_thread::get_id();
    bool same_thread = true;
    auto fn = [&](int64_t i) {
      order.push_back(i);
      same_thread &= std::this_thread::get_id() == caller;
      return absl::OkStatus();
    };
    ASSERT_THAT(in_order ? ParallelForInOrder(50, 1, fn) : ParallelFor(50, 1, fn), IsOk());
    ASSERT_EQ(order.size(), 50u);
    for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(order[i], i);
    EXPECT_TRUE(same_thread) << "in_order " << in_order;
  }
}

TEST(ParallelForTest, ReturnsTheLowestFailingIndexWhateverTheSchedule) {
  for (int threads : {1, 2, 4}) {
    for (int rep = 0; rep < 5; ++rep) {
      absl::Status s = ParallelFor(200, threads, [](int64_t i) {
        if (i == 170) return absl::NotFoundError("late");
        if (i == 57 || i == 58) return absl::DataLossError("early");
        return absl::OkStatus();
      });
      EXPECT_THAT(s, StatusIs(absl::StatusCode::kDataLoss, HasSubstr("task 57: early")))
          << "threads " << threads;
    }
  }
}

// ParallelFor and ParallelForInOrder alike.
TEST(ParallelForTest, BadArguments) {
  using Fn = std::function<absl::Status(int64_t)>;
  for (auto* run : {&ParallelFor, &ParallelForInOrder}) {
    const Fn ok = [](int64_t) { return absl::OkStatus(); };
    EXPECT_THAT(run(-1, 1, ok), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(run(3, -2, ok), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(run(3, 2, Fn()), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(run(0, 2, ok), IsOk());
  }
}

TEST(ParallelForInOrderTest, RunsEveryIndexOnceForAnyThreadCount) {
  for (int threads : {0, 1, 2, 4}) {
    for (int count : {1, 2, 7, 300}) {
      std::vector<std::atomic<int>> hits(count);
      ASSERT_THAT(ParallelForInOrder(count, threads,
                                     [&](int64_t i) {
                                       hits[i].fetch_add(1);
                                       return absl::OkStatus();
                                     }),
                  IsOk());
      for (int i = 0; i < count; ++i) {
        ASSERT_EQ(hits[i].load(), 1) << "threads " << threads << " count " << count;
      }
    }
  }
}

// The order a lane sees is the queue's: every lane takes increasing indices
// (one lane: ParallelForTest.OneThreadRunsSeriallyInOrderOnTheCaller).
TEST(ParallelForInOrderTest, LanesTakeIndicesInIncreasingOrder) {
  for (int threads : {0, 2, 4}) {
    absl::Mutex mu;
    std::map<std::thread::id, std::vector<int64_t>> taken;
    ASSERT_THAT(ParallelForInOrder(500, threads,
                                   [&](int64_t i) {
                                     absl::MutexLock l(&mu);
                                     taken[std::this_thread::get_id()].push_back(i);
                                     return absl::OkStatus();
                                   }),
                IsOk());
    for (const auto& [id, seq] : taken) {
      EXPECT_TRUE(std::is_sorted(seq.begin(), seq.end())) << "threads " << threads;
    }
  }
}

TEST(ParallelForInOrderTest, ReturnsTheLowestFailingIndexWhateverTheSchedule) {
  for (int threads : {1, 2, 4}) {
    std::atomic<int64_t> ran_after{0};
    absl::Status s = ParallelForInOrder(2000, threads, [&](int64_t i) {
      if (i > 1000) ran_after.fetch_add(1);
      if (i == 170) return absl::NotFoundError("late");
      if (i == 57 || i == 58) return absl::DataLossError("early");
      return absl::OkStatus();
    });
    EXPECT_THAT(s, StatusIs(absl::StatusCode::kDataLoss, HasSubstr("task 57: early")))
        << "threads " << threads;
    // One lane stops at the failure; more lanes may run a few past it.
    if (threads == 1) {
      EXPECT_EQ(ran_after.load(), 0);
    }
  }
}

// layers x heads selectors, each with its own frames.
struct Heads {
  std::vector<HeadData> data;
  std::vector<std::unique_ptr<OwnedPageKeys>> frames;
  std::vector<std::unique_ptr<Selector>> sels;
  std::vector<std::vector<Placement>> placements;
  std::vector<BuildJob> jobs;
};

Heads MakeHeads(SelectorKind kind, int count) {
  Heads h;
  h.placements.resize(count);
  for (int i = 0; i < count; ++i) {
    h.data.push_back(MakeClusteredHead(500 + 37 * i, 32, 2, 1, 300 + i));
    SelectorConfig c;
    c.kind = kind;
    c.head_dim = 32;
    c.num_query_heads = 2;
    h.frames.push_back(*OwnedPageKeys::ForSelector(c));
    h.sels.push_back(*Selector::Create(c, h.frames.back().get()));
  }
  for (int i = 0; i < count; ++i) {
    BuildJob j;
    j.selector = h.sels[i].get();
    j.keys = h.data[i].keys.data();
    j.n = h.data[i].n;
    j.placements = &h.placements[i];
    OwnedPageKeys* frames = h.frames[i].get();
    const float* keys = j.keys;
    j.on_built = [frames, keys](const std::vector<Placement>& pl) {
      return frames->Apply(pl, keys);
    };
    h.jobs.push_back(std::move(j));
  }
  return h;
}

TEST(ParallelBuildTest, ParallelEqualsSerialBuild) {
  for (SelectorKind kind : {SelectorKind::kExact, SelectorKind::kQuest}) {
    Heads serial = MakeHeads(kind, 8);
    ASSERT_THAT(ParallelBuild(serial.jobs, 1), IsOk());
    for (int threads : {2, 4}) {
      Heads par = MakeHeads(kind, 8);
      ASSERT_THAT(ParallelBuild(par.jobs, threads), IsOk());
      for (int i = 0; i < 8; ++i) {
        ASSERT_EQ(par.sels[i]->num_tokens(), par.data[i].n);
        ASSERT_EQ(par.placements[i].size(), serial.placements[i].size());
        for (size_t t = 0; t < par.placements[i].size(); ++t) {
          ASSERT_EQ(par.placements[i][t].page, serial.placements[i][t].page);
          ASSERT_EQ(par.placements[i][t].slot, serial.placements[i][t].slot);
        }
        SelectParams p;
        p.budget_tokens = 64;
        Selection a, b;
        ASSERT_THAT(serial.sels[i]->Select(serial.data[i].query(0), 2, p, &a), IsOk());
        ASSERT_THAT(par.sels[i]->Select(par.data[i].query(0), 2, p, &b), IsOk());
        EXPECT_EQ(a.pages, b.pages);
        EXPECT_EQ(a.scores, b.scores);
      }
    }
  }
}

TEST(ParallelBuildTest, ReportsTheLowestFailingJobAndLeavesItEmpty) {
  Heads h = MakeHeads(SelectorKind::kExact, 6);
  h.data[4].keys[7 * 32] = std::numeric_limits<float>::quiet_NaN();
  h.data[2].keys[3 * 32 + 1] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(ParallelBuild(h.jobs, 3),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("task 2: key row 3")));
  EXPECT_EQ(h.sels[2]->num_tokens(), 0);
  EXPECT_EQ(h.sels[4]->num_tokens(), 0);
  EXPECT_EQ(h.sels[0]->num_tokens(), h.data[0].n);
}

TEST(ParallelBuildTest, RejectsMalformedJobsBeforeBuildingAny) {
  Heads h = MakeHeads(SelectorKind::kExact, 3);
  h.jobs[2].selector = h.jobs[0].selector;
  EXPECT_THAT(ParallelBuild(h.jobs, 2), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(h.sels[0]->num_tokens(), 0);
  h = MakeHeads(SelectorKind::kExact, 3);
  h.jobs[1].keys = nullptr;
  EXPECT_THAT(ParallelBuild(h.jobs, 2), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(h.sels[0]->num_tokens(), 0);
}

TEST(ParallelBuildTest, FrameWriterErrorsPropagate) {
  Heads h = MakeHeads(SelectorKind::kExact, 4);
  h.jobs[1].on_built = [](const std::vector<Placement>&) {
    return absl::ResourceExhaustedError("no frames left");
  };
  EXPECT_THAT(ParallelBuild(h.jobs, 2),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("task 1")));
}

}  // namespace
}  // namespace icecache
