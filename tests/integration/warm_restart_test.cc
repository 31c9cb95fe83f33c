// Warm restart through real daemons (docs/operations.md "Drain, upgrade and
// restart"): a client decodes, `icecachectl drain --for-upgrade` stops the
// daemon (exit code 3), a new daemon on the same backing_dir recovers the
// session (same id, same epoch) and the client goes on decoding with
// exactly the selections and bytes of a daemon that never restarted. After
// a SIGKILL there is no snapshot: the next daemon starts cold and the old
// session is NOT_FOUND, never served stale.
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

constexpr int kSteps = 6;

class WarmRestartTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = "/dev/shm/icecache-warm-" + std::to_string(getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    state_dir_ = dir_;
    config_ = absl::StrCat("pool { capacity_bytes: 67108864 backing_dir: \"", dir_, "\" }");
  }
  void TearDown() override {
    unlink((dir_ + "/icecached-arena").c_str());
    unlink((state_dir_ + "/icecached-snapshot").c_str());
    unlink((state_dir_ + "/icecached-indexes").c_str());
    rmdir(dir_.c_str());
    rmdir(state_dir_.c_str());
  }
  // codes: the session keeps the daemon's default codes (pq_factor unset),
  // on daemons started with kNoMonitor.
  std::string UpgradeAndContinue(const std::function<void()>& between,
                                 SelectorType selector = SelectorType::kMdci, bool codes = false);
  std::string dir_, state_dir_, config_;
};

// The quality monitor with product-quantised codes (a head keeps the cheaper
// of the scan and the tree by their measured CPU time, and the scan's factor
// follows samples taken within a CPU budget) need not choose alike on two
// daemons, so the sessions here take the tree alone (pq_factor 0), or, with
// `codes`, the daemon's default codes on daemons without the monitor
// (kNoMonitor: the scan at its fixed factor), which select alike.
constexpr char kNoMonitor[] = "quality { enabled: false }\n";
// With the monitor, the candidate carry-over is off: the carried candidates
// live in memory only, so the first select of a head after a restart scans
// afresh where the daemon that never restarted reuses its last candidates.
constexpr char kNoCarry[] = "quality { carry_steps: 0 }\n";

struct Workload {
  explicit Workload(SelectorType selector = SelectorType::kMdci, bool codes = false)
      : m(MakeModel(/*layers=*/4, /*kv_heads=*/2, /*tokens=*/512, kSteps, selector)) {
    if (!codes) m.spec.mdci_pq_factor = 0.0f;
  }
  TestModel m;
  int64_t prefill = 512 - kSteps;
};

// One decode step (append one token, then every layer's DecodeStep): the
// selected pages and the bytes shipped, as one string.
absl::StatusOr<std::string> Step(Client& client, const Workload& run, const std::string& id,
                                 ShmBuffer& out, int step) {
  const int64_t t = run.prefill + step;
  RETURN_IF_ERROR(client.AppendKvInline(id, run.m.kv.Chunk(t, t + 1), 1).status());
  SelectOptions opt;
  opt.budget_tokens = 48;
  opt.want_positions = true;
  std::string got;
  for (int layer = 0; layer < run.m.spec.layers; ++layer) {
    ASSIGN_OR_RETURN(StepResult r, client.DecodeStep(id, layer, Queries(run.m, step, layer),
                                                     out.buffer_id(), 0, opt));
    RETURN_IF_ERROR(
        VerifyFetch(run.m.kv, t + 1, r.layout, r.heads, out.data(), out.size()).status());
    for (const HeadSelection& h : r.heads) {
      for (uint32_t p : h.pages) got += absl::StrCat(p, ",");
      got += "|";
    }
    got.append(reinterpret_cast<const char*>(out.data()), r.layout.total_bytes);
  }
  return got;
}

// Decodes half the steps on a daemon with a backing dir, drains it for an
// upgrade, runs `between` (with the backing dir's paths settled), starts a
// new daemon and decodes the other half: every step must be the reference
// daemon's. Returns the new daemon's stderr.
std::string WarmRestartTest::UpgradeAndContinue(const std::function<void()>& between,
                                                SelectorType selector, bool codes) {
  Workload run(selector, codes);
  const std::string extra = codes ? kNoMonitor : kNoCarry;
  config_ += extra;
  // The reference: a daemon that never restarts.
  std::vector<std::string> want;
  {
    auto ref = StartDaemon(extra);
    EXPECT_THAT(ref, IsOk());
    if (!ref.ok()) return "";
    auto client = Connect(**ref);
    auto s = (*client)->CreateSession(run.m.spec);
    EXPECT_THAT(s, IsOk());
    EXPECT_THAT((*client)->AppendKvInline(s->id, run.m.kv.Chunk(0, run.prefill), run.prefill),
                IsOk());
    auto out = (*client)->CreateShmBuffer(1 << 20);
    for (int step = 0; step < kSteps; ++step) {
      auto got = Step(**client, run, s->id, *out, step);
      EXPECT_THAT(got, IsOk());
      want.push_back(got.value_or(""));
    }
  }
  auto before = StartDaemon(config_, {}, "info");
  EXPECT_THAT(before, IsOk());
  if (!before.ok()) return "";
  std::string id;
  uint64_t epoch = 0;
  {
    auto client = Connect(**before);
    auto s = (*client)->CreateSession(run.m.spec);
    EXPECT_THAT(s, IsOk());
    id = s->id;
    epoch = s->epoch;
    EXPECT_THAT((*client)->AppendKvInline(id, run.m.kv.Chunk(0, run.prefill), run.prefill), IsOk());
    auto out = (*client)->CreateShmBuffer(1 << 20);
    for (int step = 0; step < kSteps / 2; ++step) {
      auto got = Step(**client, run, id, *out, step);
      EXPECT_THAT(got, IsOk());
      EXPECT_EQ(got.value_or(""), want[step]) << "step " << step << " before the restart";
    }
  }
  auto drain = RunCommand(
      {IcecachectlPath(), "--socket", (*before)->socket_path(), "drain", "--for-upgrade"});
  EXPECT_THAT(drain, IsOk());
  EXPECT_EQ(drain->exit_code, 0) << drain->err;
  auto status = (*before)->Wait(absl::Seconds(30));
  EXPECT_THAT(status, IsOk());
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 3) << (*before)->Stderr();
  EXPECT_THAT((*before)->Stderr(), HasSubstr("msg=snapshot_written"));
  struct stat st;
  for (const std::string& path : {dir_ + "/icecached-arena", state_dir_ + "/icecached-snapshot",
                                  state_dir_ + "/icecached-indexes"}) {
    EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << path;
  }
  between();

  auto after = StartDaemon(config_, {}, "info");
  EXPECT_THAT(after, IsOk());
  if (!after.ok()) return "";
  EXPECT_THAT((*after)->Stderr(), HasSubstr("msg=warm_restart recovered=1 dropped=0"));
  EXPECT_NE(stat((state_dir_ + "/icecached-snapshot").c_str(), &st), 0)
      << "a snapshot is used once";
  EXPECT_NE(stat((state_dir_ + "/icecached-indexes").c_str(), &st), 0) << "images are used once";
  auto client = Connect(**after);
  auto s = (*client)->GetSession(id);
  EXPECT_THAT(s, IsOk());
  EXPECT_EQ(s->epoch, epoch) << "a recovered session keeps its epoch (same data)";
  EXPECT_EQ(s->tokens, static_cast<uint64_t>(run.prefill + kSteps / 2));
  auto out = (*client)->CreateShmBuffer(1 << 20);  // buffers are the client's: register again
  EXPECT_THAT(out, IsOk());
  for (int step = kSteps / 2; step < kSteps; ++step) {
    auto got = Step(**client, run, id, *out, step);
    EXPECT_THAT(got, IsOk());
    EXPECT_EQ(got.value_or(""), want[step]) << "step " << step << " after the restart";
  }
  return (*after)->Stderr();
}

// The indexes come back from their images (4 layers x 2 KV heads, layer
// reuse 1: 8 indexes), not by replay: the daemon's warm_restart line says so.
TEST_F(WarmRestartTest, DrainForUpgradeAndRestartContinueDecodingIdentically) {
  const std::string log = UpgradeAndContinue([] {});
  EXPECT_THAT(log, HasSubstr("indexes_loaded=8 indexes_replayed=0"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr("index_image_refused")));
}

// The same with the daemon's default product-quantised codes: the images
// carry them, so the recovered session selects by the same codes.
TEST_F(WarmRestartTest, DrainForUpgradeKeepsTheCodesAndContinuesIdentically) {
  const std::string log = UpgradeAndContinue([] {}, SelectorType::kMdci, /*codes=*/true);
  EXPECT_THAT(log, HasSubstr("indexes_loaded=8 indexes_replayed=0"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr("index_image_refused")));
}

// A bit flipped in the image file: that index fails its hash and is
// replayed, the others load; decoding goes on identically.
TEST_F(WarmRestartTest, CorruptIndexImageFallsBackToReplayIdentically) {
  const std::string log = UpgradeAndContinue([&] {
    const std::string path = dir_ + "/icecached-indexes";
    std::string bytes = ReadFileToString(path).value();
    bytes[bytes.size() / 2] ^= 0x04;
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;  // keeps its 0600
  });
  EXPECT_THAT(log, HasSubstr("indexes_loaded=7 indexes_replayed=1"));
  EXPECT_THAT(log, HasSubstr("msg=index_image_refused"));
  EXPECT_THAT(log, HasSubstr("fails its checksum"));
}

// A truncated image file: the images past the cut are replayed.
TEST_F(WarmRestartTest, TruncatedIndexImagesFallBackToReplayIdentically) {
  const std::string log = UpgradeAndContinue([&] {
    const std::string path = dir_ + "/icecached-indexes";
    ASSERT_EQ(truncate(path.c_str(), 100), 0);
  });
  EXPECT_THAT(log, HasSubstr("indexes_loaded=0 indexes_replayed=8"));
  EXPECT_THAT(log, HasSubstr("msg=index_image_refused"));
}

// A snapshot whose image file is gone (an older daemon's drain, or an
// operator who removed it) restores by replay.
TEST_F(WarmRestartTest, SnapshotWithoutIndexImagesRestoresByReplay) {
  const std::string log =
      UpgradeAndContinue([&] { unlink((dir_ + "/icecached-indexes").c_str()); });
  EXPECT_THAT(log, HasSubstr("indexes_loaded=0 indexes_replayed=8"));
}

// mdci-published keeps an image too (its DCI's levels, parents and
// directions; the cells are recomputed from the recovered keys): every
// index loads, none is rebuilt, and decoding goes on identically.
TEST_F(WarmRestartTest, MdciPublishedRecoversFromItsImagesIdentically) {
  const std::string log = UpgradeAndContinue([] {}, SelectorType::kMdciPublished);
  EXPECT_THAT(log, HasSubstr("indexes_loaded=8 indexes_replayed=0"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr("index_image_refused")));
}

// A damaged mdci-published image is refused (its checksum) and that index is
// rebuilt by replay, as for mdci; decoding goes on identically.
TEST_F(WarmRestartTest, CorruptMdciPublishedImageIsRefusedAndReplayedIdentically) {
  const std::string log = UpgradeAndContinue(
      [&] {
        const std::string path = dir_ + "/icecached-indexes";
        std::string bytes = ReadFileToString(path).value();
        bytes[bytes.size() / 2] ^= 0x10;
        std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
      },
      SelectorType::kMdciPublished);
  EXPECT_THAT(log, HasSubstr("indexes_loaded=7 indexes_replayed=1"));
  EXPECT_THAT(log, HasSubstr("msg=index_image_refused"));
  EXPECT_THAT(log, HasSubstr("fails its checksum"));
}

// pool.state_dir: the arena stays in backing_dir, the snapshot and the
// index images go to the state dir (created 0700), and nothing of them is
// left in backing_dir.
TEST_F(WarmRestartTest, AStateDirHoldsTheSnapshotAndImagesApartFromTheArena) {
  state_dir_ = dir_ + "-state";
  config_ = absl::StrCat("pool { capacity_bytes: 67108864 backing_dir: \"", dir_,
                         "\" state_dir: \"", state_dir_, "\" }");
  const std::string log = UpgradeAndContinue([&] {
    struct stat st;
    EXPECT_NE(stat((dir_ + "/icecached-snapshot").c_str(), &st), 0);
    EXPECT_NE(stat((dir_ + "/icecached-indexes").c_str(), &st), 0);
    ASSERT_EQ(stat(state_dir_.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
  });
  EXPECT_THAT(log, HasSubstr("indexes_loaded=8 indexes_replayed=0"));
}

// hugetlbfs takes no write(2): a backing dir there without a state dir would
// lose every session at the drain, so the daemon refuses to start, saying
// what to set. Needs root (it mounts a hugetlbfs in a temporary directory).
TEST_F(WarmRestartTest, AHugetlbfsBackingDirWithoutAStateDirIsRefusedAtStart) {
  if (geteuid() != 0) GTEST_SKIP() << "mounting a hugetlbfs needs root";
  std::string mnt = ::icecache::testing::TempPathTemplate("icecache-hugetlbfs-");
  ASSERT_NE(mkdtemp(mnt.data()), nullptr);
  if (mount("none", mnt.c_str(), "hugetlbfs", 0, nullptr) != 0) {
    const int e = errno;
    rmdir(mnt.c_str());
    GTEST_SKIP() << "cannot mount a hugetlbfs here: " << std::strerror(e);
  }
  auto daemon = StartDaemon(
      absl::StrCat("pool { capacity_bytes: 67108864 backing_dir: \"", mnt, "/arena\" }"));
  EXPECT_THAT(daemon, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("pool.state_dir")));
  EXPECT_THAT(daemon.status().message(), HasSubstr("is on hugetlbfs, which takes no write(2)"));
  rmdir((mnt + "/arena").c_str());
  umount2(mnt.c_str(), MNT_DETACH);
  rmdir(mnt.c_str());
}

// Self-calibrated widths across a restart. Every selection is measured
// (a warm-up longer than the test), measurement has the CPU it needs and
// cost never decides the exact fallback, and each step waits for its
// measurements: the calibration is then a pure function of the data, so a
// daemon that never restarts is the reference, step by step.
// The candidate carry-over is off: the carried candidates live in memory
// only, so the first select after a restart scans afresh where the daemon
// that never restarted would carry.
constexpr char kCalibrationConfig[] =
    "quality { warmup_samples: 1000000 warmup_every: 1 cpu_share: 1 burst_ms: 60000 "
    "queue_capacity: 4096 "
    "exact_cost_ratio: 0 carry_steps: 0 }\n";
constexpr int kCalSteps = 40;

struct CalibratedRun {
  TestModel m = MakeModel(/*layers=*/1, /*kv_heads=*/2, /*tokens=*/2048, kCalSteps,
                          SelectorType::kMdci, /*seed=*/5);
  int64_t prefill = 2048 - kCalSteps;
  CalibratedRun() {
    m.spec.mdci_field_of_view = 2;  // too narrow for 0.95 on this data: the width must rise
    m.spec.mdci_candidate_factor = 1.0f;
    m.spec.target_mass_ratio = 0.95;
    // The tree's calibration alone. With the product-quantised codes (the
    // daemon's default) the method duel chooses per head the cheaper of the
    // scan and the tree by their measured CPU time, so two daemons given the
    // same steps need not choose alike, and this test compares two runs.
    m.spec.mdci_pq_factor = 0.0f;
  }
};

// Every head's calibration as GetSession reports it, as text.
std::string Widths(const SessionQuality& q) {
  std::string out;
  for (const HeadQuality& h : q.heads) {
    out += absl::StrCat(h.layer_group, "/", h.kv_head, h.exact ? " exact" : " tree", " w=", h.width,
                        " fov=", h.field_of_view, " cand=", h.candidate_factor,
                        " changes=", h.width_changes, " fallbacks=", h.fallbacks,
                        " exact_sel=", h.exact_selections, " samples=", h.samples,
                        " every=", h.sample_interval, " mean=", h.mean_mass_ratio,
                        " recent=", h.recent_mass_ratio, " last=", h.last_mass_ratio, "\n");
  }
  return out;
}

// One calibrated decode step: append a token, select layer 0 and wait until
// both heads' selections are accounted for (measured, or made exactly).
// Returns the selected positions and the heads' calibration after it.
absl::StatusOr<std::string> CalibratedStep(Client& client, const CalibratedRun& run,
                                           const std::string& id, ShmBuffer& out, int step) {
  const int64_t t = run.prefill + step;
  RETURN_IF_ERROR(client.AppendKvInline(id, run.m.kv.Chunk(t, t + 1), 1).status());
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.want_positions = true;
  ASSIGN_OR_RETURN(StepResult r,
                   client.DecodeStep(id, 0, Queries(run.m, step, 0), out.buffer_id(), 0, opt));
  std::string got;
  for (const HeadSelection& h : r.heads) {
    for (int32_t p : h.positions) got += absl::StrCat(p, ",");
    got += "|";
  }
  const uint64_t want = 2 * static_cast<uint64_t>(step + 1);
  absl::StatusOr<SessionInfo> info;
  const bool accounted = Eventually([&] {
    info = client.GetSession(id);
    uint64_t n = info.ok() ? info->quality.samples : 0;
    for (const HeadQuality& h : info.ok() ? info->quality.heads : std::vector<HeadQuality>{}) {
      n += h.exact_selections;
    }
    return n >= want;
  });
  if (!accounted) return absl::DeadlineExceededError(absl::StrCat("step ", step, " not measured"));
  return got + "\n" + Widths(info->quality);
}

// The per-head table of `icecachectl sessions show`.
std::string ShownWidths(const DaemonProcess& d, const std::string& id) {
  auto r = RunCommand({IcecachectlPath(), "--socket", d.socket_path(), "sessions", "show", id});
  if (!r.ok() || r->exit_code != 0) return "sessions show failed";
  const size_t at = r->out.find("GROUP  KV_HEAD  MODE");
  return at == std::string::npos ? r->out : r->out.substr(at);
}

// A session whose widths calibrated (rose from a too-narrow start) is
// drained and recovered: GetSession and `sessions show` report the same
// widths, and every later step selects, measures and adapts exactly as on
// a daemon that never restarted.
TEST_F(WarmRestartTest, CalibratedWidthsSurviveTheRestart) {
  config_ += kCalibrationConfig;
  CalibratedRun run;
  std::vector<std::string> want;
  {
    auto ref = StartDaemon(kCalibrationConfig);
    ASSERT_THAT(ref, IsOk());
    auto client = Connect(**ref);
    auto s = (*client)->CreateSession(run.m.spec);
    ASSERT_THAT(s, IsOk());
    ASSERT_THAT((*client)->AppendKvInline(s->id, run.m.kv.Chunk(0, run.prefill), run.prefill),
                IsOk());
    auto out = (*client)->CreateShmBuffer(1 << 20);
    for (int step = 0; step < kCalSteps; ++step) {
      auto got = CalibratedStep(**client, run, s->id, *out, step);
      ASSERT_THAT(got, IsOk());
      want.push_back(*got);
    }
  }
  auto before = StartDaemon(config_, {}, "info");
  ASSERT_THAT(before, IsOk());
  std::string id, widths, shown;
  {
    auto client = Connect(**before);
    auto s = (*client)->CreateSession(run.m.spec);
    ASSERT_THAT(s, IsOk());
    id = s->id;
    ASSERT_THAT((*client)->AppendKvInline(id, run.m.kv.Chunk(0, run.prefill), run.prefill), IsOk());
    auto out = (*client)->CreateShmBuffer(1 << 20);
    for (int step = 0; step < kCalSteps / 2; ++step) {
      auto got = CalibratedStep(**client, run, id, *out, step);
      ASSERT_THAT(got, IsOk());
      ASSERT_EQ(*got, want[step]) << "step " << step << " before the restart";
    }
    const SessionQuality q = (*client)->GetSession(id)->quality;
    widths = Widths(q);
    for (const HeadQuality& h : q.heads) {
      EXPECT_TRUE(h.exact || h.width > 1.0) << "the width never rose: the test shows nothing\n"
                                            << widths;
    }
    shown = ShownWidths(**before, id);
  }
  auto drain = RunCommand(
      {IcecachectlPath(), "--socket", (*before)->socket_path(), "drain", "--for-upgrade"});
  ASSERT_THAT(drain, IsOk());
  ASSERT_EQ(drain->exit_code, 0) << drain->err;
  ASSERT_THAT((*before)->Wait(absl::Seconds(30)), IsOk());

  auto after = StartDaemon(config_, {}, "info");
  ASSERT_THAT(after, IsOk());
  EXPECT_THAT((*after)->Stderr(), HasSubstr("calibrations_restored=1"));
  EXPECT_THAT((*after)->Stderr(), ::testing::Not(HasSubstr("calibration_not_recovered")));
  auto client = Connect(**after);
  auto s = (*client)->GetSession(id);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(Widths(s->quality), widths) << "GetSession after the restart";
  EXPECT_EQ(ShownWidths(**after, id), shown) << "sessions show after the restart";
  auto out = (*client)->CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  for (int step = kCalSteps / 2; step < kCalSteps; ++step) {
    auto got = CalibratedStep(**client, run, id, *out, step);
    ASSERT_THAT(got, IsOk());
    EXPECT_EQ(*got, want[step]) << "step " << step << " after the restart";
  }
}

TEST_F(WarmRestartTest, AfterSigkillTheNextDaemonStartsColdAndTheSessionIsGone) {
  Workload run;
  auto before = StartDaemon(config_);
  ASSERT_THAT(before, IsOk());
  std::string id;
  {
    auto client = Connect(**before);
    ASSERT_THAT(client, IsOk());
    auto s = (*client)->CreateSession(run.m.spec);
    ASSERT_THAT(s, IsOk());
    id = s->id;
    ASSERT_THAT((*client)->AppendKvInline(id, run.m.kv.Chunk(0, 64), 64), IsOk());
  }
  ASSERT_EQ(kill((*before)->pid(), SIGKILL), 0);
  ASSERT_THAT((*before)->Wait(absl::Seconds(10)), IsOk());
  auto after = StartDaemon(config_);
  ASSERT_THAT(after, IsOk());
  auto client = Connect(**after);
  ASSERT_THAT(client, IsOk());
  EXPECT_THAT((*client)->GetSession(id), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(WarmRestartTest, DrainForUpgradeWithoutABackingDirIsRefused) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  EXPECT_THAT((*client)->Drain(true, true),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("pool.backing_dir")));
  EXPECT_THAT((*client)->GetStats(), IsOk());
  EXPECT_FALSE((*client)->GetStats()->draining) << "a refused drain changes nothing";
}

}  // namespace
}  // namespace icecache::testing
