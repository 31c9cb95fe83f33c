// Warm restart in process (docs/architecture.md §5): a manager over a
// file-backed arena takes a snapshot; a second manager over the same file
// restores it. The recovered session must select the same pages and ship the
// same bytes as a twin session that never restarted; a session whose bytes
// changed after the snapshot is dropped, never served.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "gtest/gtest.h"
#include "server/pool/frame_checksum.h"
#include "server/session/index_image_file.h"
#include "server/session/snapshot.h"
#include "server/session/snapshot_quality.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::MakeKv;
using ::icecache::testing::MakeQueries;
using ::icecache::testing::SmallConfig;
using ::icecache::testing::StatusIs;
using ::icecache::testing::UniqueName;
using ::testing::HasSubstr;

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }

// One "daemon": a pool (file-backed when `file` is set), buffers, a manager
// and a registered shm buffer.
struct Node {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<BufferRegistry> buffers;
  std::unique_ptr<SessionManager> manager;
  ShmFile shm;
  std::string buffer;

  // `quality`: the monitor on, every selection measured, no exact fallback
  // for cost (deterministic: session_quality_test.cc).
  static Node Start(const std::string& file, bool reuse, bool quality = false) {
    Node n;
    PagePoolOptions po;
    po.capacity_bytes = uint64_t{32} << 20;
    po.use_huge_pages = false;
    po.backing_file = file;
    po.reuse_backing_file = reuse;
    n.pool = PagePool::Create(po).value();
    n.buffers = BufferRegistry::Create(BufferRegistryOptions()).value();
    SessionManagerOptions mo;
    mo.pool = n.pool.get();
    mo.buffers = n.buffers.get();
    mo.reaper_interval = absl::ZeroDuration();
    mo.build_threads = 2;
    mo.keep_checksums = !file.empty();
    if (quality) {
      mo.quality.enabled = true;
      mo.quality.warmup_samples = 1 << 20;
      mo.quality.warmup_every = 1;
      mo.quality.sampler.cpu_share = 1.0;
      mo.quality.sampler.burst = absl::Seconds(100);
      mo.quality.sampler.low_priority = false;
      mo.quality.exact_cost_ratio = 0.0;
    }
    n.manager = SessionManager::Create(mo).value();
    n.shm = ShmFile::Create(UniqueName("restore"), 1 << 20).value();
    n.buffer = n.buffers->RegisterShm(Alice(), n.shm.path(), n.shm.size(), absl::Now())->id;
    return n;
  }

  // Appends tokens [first, first + n) and returns the session's tokens.
  void Append(const std::string& id, const SessionConfig& c, int64_t first, int64_t n) {
    ASSERT_THAT(manager->AppendKv(Alice(), id, n, MakeKv(c, first, n)), IsOk());
  }

  // One decode step of every layer: the selections and the bytes shipped.
  std::string Step(const std::string& id, const SessionConfig& c, uint32_t seed) {
    std::string out;
    for (int layer = 0; layer < c.layers; ++layer) {
      SelectRequest sel;
      sel.layer = layer;
      sel.queries = MakeQueries(c, seed + layer);
      sel.params.budget_tokens = 12;
      sel.params.want_positions = true;
      std::memset(shm.data(), 0, shm.size());
      auto r = manager->DecodeStep(Alice(), id, sel, buffer, 0, 1);
      EXPECT_THAT(r, IsOk());
      if (!r.ok()) return "";
      for (const Selection& h : r->selection.heads) {
        for (uint32_t p : h.pages) out += std::to_string(p) + ",";
        out += "|";
      }
      out.append(reinterpret_cast<const char*>(shm.data()), r->layout.total_bytes);
    }
    return out;
  }
};

class RestoreFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    file_ = "/dev/shm/" + UniqueName("arena");
    snap_ = "/dev/shm/" + UniqueName("snapshot");
    images_ = "/dev/shm/" + UniqueName("indexes");
  }
  void TearDown() override {
    unlink(file_.c_str());
    unlink(snap_.c_str());
    unlink(images_.c_str());
  }

  // Drains `n` for an upgrade: freeze, snapshot to a file (with the index
  // images when `images`), keep the arena.
  void Upgrade(Node& n, bool images = false) {
    n.pool->Freeze();
    std::vector<std::string> skipped;
    std::unique_ptr<IndexImageFileWriter> writer;
    if (images) {
      auto w = IndexImageFileWriter::Create(images_);
      ASSERT_THAT(w, IsOk());
      writer = std::move(w).value();
    }
    const SnapshotImage image = n.manager->TakeSnapshot(&skipped, writer.get());
    if (images) {
      ASSERT_THAT(writer->Commit(), IsOk());
    }
    ASSERT_THAT(WriteSnapshotFile(image, snap_), IsOk());
    EXPECT_TRUE(skipped.empty());
    n.pool->KeepBackingFile();
  }

  // A session of `c` in `before` and in a `twin` that never restarts: a
  // prefill of 40 tokens and 6 decode tokens, one decode step each.
  // Returns the session's id in `before` and in the twin.
  std::pair<std::string, std::string> Prepare(Node& before, Node& twin, const SessionConfig& c) {
    const std::string id = before.manager->CreateSession(Alice(), c)->id;
    const std::string tid = twin.manager->CreateSession(Alice(), c)->id;
    for (Node* n : {&before, &twin}) {
      const std::string& s = n == &twin ? tid : id;
      n->Append(s, c, 0, 40);
      for (int64_t t = 40; t < 46; ++t) n->Append(s, c, t, 1);
    }
    EXPECT_EQ(before.Step(id, c, 1), twin.Step(tid, c, 1));
    return {id, tid};
  }

  // Decode steps after the restart: identical to the twin's.
  void ContinueLikeTheTwin(Node& after, Node& twin, const std::string& id, const std::string& tid,
                           const SessionConfig& c) {
    for (uint32_t step = 2; step < 6; ++step) {
      after.Append(id, c, 44 + step, 1);
      twin.Append(tid, c, 44 + step, 1);
      ASSERT_EQ(after.Step(id, c, step * 10), twin.Step(tid, c, step * 10)) << "step " << step;
    }
  }

  // A session of config `c` and its twin prepared, the node upgraded with
  // index images, a new node restoring them (the image file used once):
  // `check` sees the snapshot and the restore report, then the session must
  // continue like the twin.
  void RestoreWithImagesAndContinue(
      const SessionConfig& c,
      const std::function<void(const SnapshotImage&, const SessionManager::RestoreReport&)>&
          check) {
    Node twin = Node::Start("", false);
    std::pair<std::string, std::string> ids;
    {
      Node before = Node::Start(file_, false);
      ids = Prepare(before, twin, c);
      Upgrade(before, /*images=*/true);
    }
    Node after = Node::Start(file_, true);
    auto image = ReadSnapshotFile(snap_);
    ASSERT_THAT(image, IsOk());
    ASSERT_EQ(image->sessions.size(), 1u);
    auto file = IndexImageFile::OpenAndRemove(images_);
    ASSERT_THAT(file, IsOk());
    EXPECT_NE(access(images_.c_str(), F_OK), 0) << "an image file is used once";
    const SessionManager::RestoreReport report = after.manager->Restore(*image, file->get());
    ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
    check(*image, report);
    ContinueLikeTheTwin(after, twin, ids.first, ids.second, c);
  }

  std::string file_, snap_, images_;
};

class SessionRestoreTest : public RestoreFixture,
                           public ::testing::WithParamInterface<SelectorKind> {};

TEST_P(SessionRestoreTest, RecoveredSessionSelectsAndShipsWhatATwinWithoutRestartDoes) {
  if (GetParam() == SelectorKind::kSnapkv) {
    GTEST_SKIP() << "without its image a replayed snapkv index fixes new votes at its first "
                    "select (docs/architecture.md §5); IndexImagesAreLoaded covers snapkv";
  }
  const SessionConfig c = SmallConfig(GetParam());
  Node twin = Node::Start("", false);
  const std::string tid = twin.manager->CreateSession(Alice(), c)->id;
  std::string id;
  uint64_t epoch = 0;
  {
    Node before = Node::Start(file_, false);
    auto info = before.manager->CreateSession(Alice(), c);
    ASSERT_THAT(info, IsOk());
    id = info->id;
    epoch = info->epoch;
    for (Node* n : {&before, &twin}) {
      const std::string& s = n == &twin ? tid : id;
      n->Append(s, c, 0, 40);
      for (int64_t t = 40; t < 46; ++t) n->Append(s, c, t, 1);
    }
    ASSERT_EQ(before.Step(id, c, 1), twin.Step(tid, c, 1));
    Upgrade(before);
  }
  Node after = Node::Start(file_, true);
  auto image = ReadSnapshotFile(snap_);
  ASSERT_THAT(image, IsOk());
  const SessionManager::RestoreReport report = after.manager->Restore(*image);
  ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
  auto info = after.manager->GetSession(Alice(), id);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->epoch, epoch) << "same data, same epoch";
  EXPECT_NE(after.manager->epoch(), epoch);
  EXPECT_EQ(info->tokens, 46);
  for (uint32_t step = 2; step < 6; ++step) {
    after.Append(id, c, 44 + step, 1);
    twin.Append(tid, c, 44 + step, 1);
    ASSERT_EQ(after.Step(id, c, step * 10), twin.Step(tid, c, step * 10)) << "step " << step;
  }
}

TEST_P(SessionRestoreTest, SessionWrittenAfterTheSnapshotIsDroppedNotServed) {
  const SessionConfig c = SmallConfig(GetParam());
  std::string id;
  SnapshotImage stale;
  {
    Node before = Node::Start(file_, false);
    id = before.manager->CreateSession(Alice(), c)->id;
    before.Append(id, c, 0, 21);
    stale = before.manager->TakeSnapshot(nullptr);  // taken, then more is written
    before.Append(id, c, 21, 2);                    // fills the partial page
    before.pool->Freeze();
    before.pool->KeepBackingFile();
  }
  Node after = Node::Start(file_, true);
  const SessionManager::RestoreReport report = after.manager->Restore(stale);
  EXPECT_EQ(report.recovered, 0);
  ASSERT_EQ(report.dropped.size(), 1u);
  EXPECT_THAT(report.dropped[0][2], HasSubstr("fails its checksum"));
  EXPECT_THAT(after.manager->GetSession(Alice(), id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(after.pool->used_bytes(), 0u);
}

TEST_P(SessionRestoreTest, IndexImagesAreLoadedAndTheSessionContinuesLikeItsTwin) {
  const bool has_images =
      GetParam() == SelectorKind::kMdci || GetParam() == SelectorKind::kPqcache ||
      GetParam() == SelectorKind::kSnapkv || GetParam() == SelectorKind::kMdciPublished;
  RestoreWithImagesAndContinue(
      SmallConfig(GetParam()),
      [&](const SnapshotImage& image, const SessionManager::RestoreReport& report) {
        EXPECT_EQ(image.sessions[0].index_images.size(), has_images ? 4u : 0u);
        EXPECT_EQ(report.indexes_loaded, has_images ? 4 : 0);
        EXPECT_EQ(report.indexes_replayed, has_images ? 0 : 4);
        EXPECT_TRUE(report.images_refused.empty());
      });
}

// mdci with its int8 scoring sketch (MdciParams::sketch_scoring): the image
// does not carry the sketch, the loaded index re-derives it from the frames,
// and the session keeps the option across the restart and selects like its
// twin that never restarted. (That the re-derived sketch is the written one,
// bit for bit, is page_sketch_test's; this small session selects the same
// pages either way.)
class MdciSketchRestoreTest : public RestoreFixture {};

TEST_F(MdciSketchRestoreTest, IsRederivedFromTheFramesAfterARestart) {
  SessionConfig c = SmallConfig(SelectorKind::kMdci);
  c.mdci.sketch_scoring = true;
  RestoreWithImagesAndContinue(
      c, [](const SnapshotImage& image, const SessionManager::RestoreReport& report) {
        EXPECT_TRUE(image.sessions[0].config.mdci.sketch_scoring);
        EXPECT_EQ(report.indexes_loaded, 4);
      });
}

// mdci with the scan, the query basis turned off (MdciParams::query_basis,
// types.proto) and every carried candidate kept (carry_keep_factor 0): the
// snapshot keeps both options, so the restarted session selects as its twin
// (it once came back with the default keep factor).
TEST_F(MdciSketchRestoreTest, TheQueryBasisAndCarryOptionsSurviveARestart) {
  SessionConfig c = SmallConfig(SelectorKind::kMdci);
  c.mdci.pq_factor = MdciParams::kDefaultPqFactor;
  c.mdci.query_basis = false;
  c.mdci.carry_keep_factor = 0.0f;
  RestoreWithImagesAndContinue(
      c, [](const SnapshotImage& image, const SessionManager::RestoreReport& report) {
        EXPECT_FALSE(image.sessions[0].config.mdci.query_basis);
        EXPECT_EQ(image.sessions[0].config.mdci.carry_keep_factor, 0.0f);
        EXPECT_EQ(report.indexes_loaded, 4);
      });
}

INSTANTIATE_TEST_SUITE_P(Selectors, SessionRestoreTest,
                         ::testing::Values(SelectorKind::kExact, SelectorKind::kMdci,
                                           SelectorKind::kQuest, SelectorKind::kPqcache,
                                           SelectorKind::kSnapkv, SelectorKind::kMdciPublished),
                         [](const ::testing::TestParamInfo<SelectorKind>& info) {
                           std::string name(SelectorKindName(info.param));
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

void Overwrite(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A corrupted or truncated image file: the indexes whose images fail their
// hash are replayed (and named), the others loaded; the session serves
// exactly what its twin does.
class DamagedImagesTest : public RestoreFixture, public ::testing::WithParamInterface<int> {};

TEST_P(DamagedImagesTest, FallBackToReplayWithIdenticalResults) {
  const SessionConfig c = SmallConfig(SelectorKind::kMdci);
  Node twin = Node::Start("", false);
  std::pair<std::string, std::string> ids;
  {
    Node before = Node::Start(file_, false);
    ids = Prepare(before, twin, c);
    Upgrade(before, /*images=*/true);
  }
  std::string bytes = ReadFileToString(images_).value();
  if (GetParam() == 0) {
    bytes[bytes.size() / 3] ^= 0x10;  // inside the second image
  } else {
    // Cut inside the second-to-last image: the last two are cut (where
    // depends on the images' sizes, so it is read from the snapshot).
    auto snap = ReadSnapshotFile(snap_);
    ASSERT_THAT(snap, IsOk());
    std::vector<IndexImageRef> refs;
    for (const SessionImage& s : snap->sessions) {
      for (const IndexImageRef& r : s.index_images) {
        if (r.bytes > 0) refs.push_back(r);
      }
    }
    std::sort(refs.begin(), refs.end(),
              [](const IndexImageRef& a, const IndexImageRef& b) { return a.offset < b.offset; });
    ASSERT_GE(refs.size(), 3u);
    const IndexImageRef& cut = refs[refs.size() - 2];
    ASSERT_EQ(refs.back().offset + refs.back().bytes, bytes.size());
    bytes.resize(cut.offset + cut.bytes / 2);
  }
  Overwrite(images_, bytes);
  chmod(images_.c_str(), 0600);
  Node after = Node::Start(file_, true);
  auto image = ReadSnapshotFile(snap_);
  ASSERT_THAT(image, IsOk());
  auto file = IndexImageFile::OpenAndRemove(images_);
  ASSERT_THAT(file, IsOk());
  const SessionManager::RestoreReport report = after.manager->Restore(*image, file->get());
  ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
  EXPECT_EQ(report.indexes_replayed, GetParam() == 0 ? 1 : 2);
  EXPECT_EQ(report.indexes_loaded + report.indexes_replayed, 4);
  ASSERT_EQ(report.images_refused.size(), 1u);
  EXPECT_EQ(report.images_refused[0][0], ids.first);
  EXPECT_THAT(report.images_refused[0][3],
              HasSubstr(GetParam() == 0 ? "fails its checksum" : "outside"));
  ContinueLikeTheTwin(after, twin, ids.first, ids.second, c);
}

INSTANTIATE_TEST_SUITE_P(BitFlipOrTruncation, DamagedImagesTest, ::testing::Values(0, 1));

// The quality monitor across a warm restart (docs/architecture.md §5): the
// self-calibrated widths, exact fallbacks and sampling come back with the
// session, an older snapshot's session starts its calibration fresh, and a
// state out of range drops the session.
class QualityRestoreTest : public RestoreFixture {
 protected:
  static constexpr int64_t kTokens = 800;

  // mdci with a width too narrow for its target: the calibrator widens it.
  static SessionConfig Calibrated() {
    SessionConfig c = SmallConfig(SelectorKind::kMdci);
    c.mdci.field_of_view = 1;
    c.mdci.candidate_factor = 1.0f;
    c.target_mass_ratio = 0.95;
    return c;
  }

  static std::string Widths(Node& n, const std::string& id) {
    auto info = n.manager->GetSession(Alice(), id);
    EXPECT_THAT(info, IsOk());
    if (!info.ok()) return "";
    std::string out = info->quality.monitored ? "monitored\n" : "not monitored\n";
    for (const HeadQualityInfo& h : info->quality.heads) {
      out += absl::StrCat(h.group, "/", h.kv_head, h.exact ? " exact" : " tree", " w=", h.width,
                          " changes=", h.width_changes, " samples=", h.samples,
                          " exact_sel=", h.exact_selections, " fallbacks=", h.fallbacks,
                          " every=", h.sample_interval, " mean=", h.mean_mass_ratio, "\n");
    }
    return out;
  }

  // One select of each layer group's first layer, its measurements waited
  // for: the pages (and keys touched) and the widths after it.
  static std::string Step(Node& n, const std::string& id, const SessionConfig& c, uint32_t seed) {
    std::string out;
    for (int layer = 0; layer < c.layers; layer += c.layer_reuse) {
      SelectRequest sel;
      sel.layer = layer;
      sel.queries = MakeQueries(c, seed + layer);
      sel.params.budget_tokens = 12;
      auto r = n.manager->SelectPages(Alice(), id, sel);
      EXPECT_THAT(r, IsOk());
      if (!r.ok()) return "";
      for (const Selection& h : r->heads) {
        for (uint32_t p : h.pages) out += absl::StrCat(p, ",");
        out += absl::StrCat("touched ", h.keys_touched, "|");
      }
    }
    n.manager->WaitForQualitySamples();
    return out + "\n" + Widths(n, id);
  }

  // A calibrated session on `before` (and `twin`, when given) after
  // `steps` steps; `before` is then drained for an upgrade. Returns its id
  // and the twin's.
  std::pair<std::string, std::string> CalibrateAndDrain(Node& before, Node* twin, int steps) {
    const SessionConfig c = Calibrated();
    const std::string id = before.manager->CreateSession(Alice(), c)->id;
    const std::string tid = twin ? twin->manager->CreateSession(Alice(), c)->id : "";
    before.Append(id, c, 0, kTokens);
    if (twin) twin->Append(tid, c, 0, kTokens);
    for (int step = 0; step < steps; ++step) {
      const std::string got = Step(before, id, c, 100 + step);
      if (twin) {
        EXPECT_EQ(got, Step(*twin, tid, c, 100 + step)) << "step " << step;
      }
    }
    Upgrade(before);
    return {id, tid};
  }

  // The snapshot as a daemon reads it, after `edit`, written and read back.
  SnapshotImage Edited(const std::function<void(SessionImage&)>& edit) {
    auto image = ReadSnapshotFile(snap_);
    EXPECT_THAT(image, IsOk());
    EXPECT_EQ(image->sessions.size(), 1u);
    edit(image->sessions[0]);
    EXPECT_THAT(WriteSnapshotFile(*image, snap_), IsOk());
    return ReadSnapshotFile(snap_).value();
  }
};

TEST_F(QualityRestoreTest, CalibrationComesBackAndGoesOnLikeATwin) {
  const SessionConfig c = Calibrated();
  Node twin = Node::Start("", false, true);
  std::pair<std::string, std::string> ids;
  std::string widths;
  {
    Node before = Node::Start(file_, false, true);
    ids = CalibrateAndDrain(before, &twin, 12);
    widths = Widths(before, ids.first);
  }
  // This small session meets its target at the start width; the tallies and
  // schedule still move (widths that move: warm_restart_test.cc
  // CalibratedWidthsSurviveTheRestart, and the exact fallback below).
  EXPECT_THAT(widths, HasSubstr("samples=12 ")) << widths;
  Node after = Node::Start(file_, true, true);
  const SessionManager::RestoreReport report = after.manager->Restore(Edited([](auto&) {}));
  ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
  EXPECT_EQ(report.quality_restored, 1);
  EXPECT_TRUE(report.quality_fresh.empty());
  EXPECT_EQ(Widths(after, ids.first), widths);
  for (int step = 12; step < 20; ++step) {
    ASSERT_EQ(Step(after, ids.first, c, 100 + step), Step(twin, ids.second, c, 100 + step))
        << "step " << step;
  }
}

TEST_F(QualityRestoreTest, ASnapshotWithoutCalibrationStateStartsItFresh) {
  std::string id;
  {
    Node before = Node::Start(file_, false, true);
    id = CalibrateAndDrain(before, nullptr, 6).first;
  }
  Node after = Node::Start(file_, true, true);
  const SessionManager::RestoreReport report =
      after.manager->Restore(Edited([](SessionImage& s) { s.quality.reset(); }));
  ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
  EXPECT_EQ(report.quality_restored, 0);
  ASSERT_EQ(report.quality_fresh.size(), 1u);
  EXPECT_EQ(report.quality_fresh[0][0], id);
  EXPECT_THAT(report.quality_fresh[0][1], HasSubstr("older daemon"));
  const std::string widths = Widths(after, id);
  EXPECT_THAT(widths, HasSubstr("monitored\n0/0 tree w=1 changes=0 samples=0")) << widths;
}

// A session restored with its calibrators resumes its sampler budget where
// it stood (quality_sampler.h): no second warm-up burst. Here its saved
// measurement CPU is past the burst (100 s), so its due heads are dropped.
TEST_F(QualityRestoreTest, ARestoredSessionResumesItsSamplerBudget) {
  const SessionConfig c = Calibrated();
  std::string id;
  {
    Node before = Node::Start(file_, false, true);
    id = CalibrateAndDrain(before, nullptr, 2).first;
  }
  Node after = Node::Start(file_, true, true);
  const SessionManager::RestoreReport report = after.manager->Restore(Edited(
      [](SessionImage& s) { s.quality->calibration_cpu_ns = int64_t{200} * 1'000'000'000; }));
  ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
  ASSERT_EQ(report.quality_restored, 1);
  auto before_step = after.manager->GetSession(Alice(), id);
  ASSERT_THAT(before_step, IsOk());
  Step(after, id, c, 200);
  auto after_step = after.manager->GetSession(Alice(), id);
  ASSERT_THAT(after_step, IsOk());
  EXPECT_EQ(after_step->quality.samples, before_step->quality.samples);
  EXPECT_GT(after_step->quality.samples_dropped, before_step->quality.samples_dropped);
}

// A restored exact fallback: that head selects exactly (every key scored)
// at once, and says so.
TEST_F(QualityRestoreTest, ARestoredExactFallbackSelectsExactly) {
  std::string id;
  {
    Node before = Node::Start(file_, false, true);
    id = CalibrateAndDrain(before, nullptr, 4).first;
  }
  Node after = Node::Start(file_, true, true);
  const SessionManager::RestoreReport report = after.manager->Restore(Edited([](SessionImage& s) {
    CalibratorState& head1 = s.quality->heads[1].calibrator;
    head1.mode = SelectMode::kExact;
    head1.reprobe_wait = 256;
    head1.fallbacks = 1;
  }));
  ASSERT_EQ(report.recovered, 1) << (report.dropped.empty() ? "" : report.dropped[0][2]);
  const std::string widths = Widths(after, id);
  EXPECT_THAT(widths, HasSubstr("0/1 exact")) << widths;
  EXPECT_THAT(widths, HasSubstr("0/0 tree")) << widths;
  const std::string step = Step(after, id, Calibrated(), 7);
  // Layer group 0: head 0 descends its tree, head 1 scores every key.
  const size_t first = step.find("touched ");
  ASSERT_NE(first, std::string::npos) << step;
  EXPECT_NE(step.substr(first, 12), absl::StrCat("touched ", kTokens)) << step;
  EXPECT_THAT(step.substr(first + 8), HasSubstr(absl::StrCat("touched ", kTokens, "|"))) << step;
}

// A calibration state out of range, unreadable or of the wrong shape: the
// session is dropped with the reason, never served with an absurd width.
class CorruptQualityTest : public QualityRestoreTest, public ::testing::WithParamInterface<int> {};

TEST_P(CorruptQualityTest, DropsTheSessionWithTheReason) {
  std::string id;
  {
    Node before = Node::Start(file_, false, true);
    id = CalibrateAndDrain(before, nullptr, 4).first;
  }
  const struct {
    std::function<void(SessionImage&)> edit;
    const char* why;
  } cases[] = {
      {[](SessionImage& s) { s.quality->heads[1].calibrator.width = 1e9; },
       "layer group 0 kv head 1: calibrator state: width must be in [0.5, 64], got 1e+09"},
      {[](SessionImage& s) { s.quality->heads[0].sum_ratio = std::nan(""); },
       "field 'sum_ratio' is missing or not of its type"},
      {[](SessionImage& s) { s.quality->heads.pop_back(); }, "lists 3 heads for 4 indexes"},
      {[](SessionImage& s) { s.quality->heads[2].calibrated = false; },
       "holds no calibrator state, but the session's width is calibrated"},
  };
  Node after = Node::Start(file_, true, true);
  const SessionManager::RestoreReport report =
      after.manager->Restore(Edited(cases[GetParam()].edit));
  EXPECT_EQ(report.recovered, 0);
  ASSERT_EQ(report.dropped.size(), 1u);
  EXPECT_EQ(report.dropped[0][0], id);
  EXPECT_THAT(report.dropped[0][2], HasSubstr(cases[GetParam()].why));
  EXPECT_THAT(after.manager->GetSession(Alice(), id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(after.pool->used_bytes(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Cases, CorruptQualityTest, ::testing::Range(0, 4));

// A session's image with the smallest state a snapshot file holds (the
// file's own tests: nothing is restored from it).
SessionImage BareSessionImage(const std::string& id, const SessionConfig& config) {
  SessionImage s;
  s.id = id;
  s.tenant = "alice";
  s.config = config;
  s.frame_offsets.resize(8);
  s.checksums.resize(8);
  s.slots.resize(4);
  s.group_tokens = {0, 0};
  return s;
}

TEST(SnapshotFileTest, TamperedOrTruncatedFilesAreDataLoss) {
  const std::string path = "/dev/shm/" + UniqueName("snap");
  SnapshotImage image;
  image.daemon_epoch = 42;
  image.capacity_bytes = 1 << 21;
  const SessionImage s = BareSessionImage("abc", SmallConfig());
  image.sessions.push_back(s);
  ASSERT_THAT(WriteSnapshotFile(image, path), IsOk());
  auto back = ReadSnapshotFile(path);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->daemon_epoch, 42u);
  ASSERT_EQ(back->sessions.size(), 1u);
  EXPECT_EQ(back->sessions[0].config.head_dim, 16);
  EXPECT_EQ(back->sessions[0].config.selector, s.config.selector);
  std::string bytes = ReadFileToString(path).value();
  bytes[bytes.size() / 2] ^= 1;
  Overwrite(path, bytes);
  EXPECT_THAT(ReadSnapshotFile(path), StatusIs(absl::StatusCode::kDataLoss));
  Overwrite(path, bytes.substr(0, 20));
  EXPECT_THAT(ReadSnapshotFile(path), StatusIs(absl::StatusCode::kDataLoss));
  unlink(path.c_str());
}

// The calibration state goes through the snapshot's JSON bit for bit (a
// restored width selects exactly as before); another state format is
// "missing" (the calibration starts fresh), a mistyped field an error that
// names it.
TEST(SnapshotFileTest, TheCalibrationStateRoundTripsExactly) {
  SessionQualityState q;
  q.samples_dropped = 3;
  q.selection_ns = 123456789012;
  HeadQualityState h;
  h.calibrated = true;
  h.samples = 41;
  h.sum_ratio = 38.123456789012345;
  h.recent_ratio = 1.0 / 3.0;
  h.calibrator.width = 11.390625;
  h.calibrator.floor = 1.5 * 1.5 * 1.5 * 1.224744871391589;
  h.calibrator.mean_at_width = 0.9512345678901234;
  h.calibrator.var_at_width = 0.0012345678901234567;
  h.calibrator.mode = SelectMode::kExact;
  h.calibrator.reprobe_wait = 512;
  h.calibrator.ranking = DescentRanking::kNormalized;
  h.calibrator.trial_n = 8;
  h.calibrator.trial_since = 5;
  h.calibrator.trial_needed = 16;
  h.calibrator.trial_gain = 0.0123456789012345;
  h.calibrator.ranking_switches = 1;
  h.calibrator.schedule.steps = 77;
  h.calibrator.schedule.select_ns = 2.0 / 7.0 * 1e6;
  h.calibrator.method = SearchMethod::kTree;  // the method duel, mid-trial
  h.calibrator.parked.width = 1.5 * 1.5;
  h.calibrator.parked.mean_at_width = 0.9612345678901234;
  h.calibrator.parked.cost = 612345.0 / 7.0;
  h.calibrator.parked.cost_n = 9;
  h.calibrator.parked.tried = true;
  h.calibrator.method_trial = true;
  h.calibrator.method_shadow = true;  // (JSON only: Restore refuses the two together)
  h.calibrator.trial_bar = h.calibrator.parked.cost;
  h.calibrator.method_wait = 512;
  h.calibrator.method_trials = 2;
  h.calibrator.method_switches = 1;
  q.heads = {h, HeadQualityState{}};
  const Json session{{"quality", QualityStateToJson(q)}};
  auto back = ParseJson(DumpJson(session));
  ASSERT_THAT(back, IsOk());
  QualityStateRead read = QualityStateFromJson(*back);
  ASSERT_TRUE(read.state.has_value()) << read.error << read.missing;
  const SessionQualityState& r = *read.state;
  EXPECT_EQ(r.samples_dropped, 3);
  EXPECT_EQ(r.selection_ns, 123456789012);
  ASSERT_EQ(r.heads.size(), 2u);
  EXPECT_TRUE(r.heads[0].calibrated);
  EXPECT_FALSE(r.heads[1].calibrated);
  EXPECT_EQ(r.heads[0].sum_ratio, h.sum_ratio);
  EXPECT_EQ(r.heads[0].recent_ratio, h.recent_ratio);
  EXPECT_EQ(r.heads[0].calibrator.width, h.calibrator.width);
  EXPECT_EQ(r.heads[0].calibrator.floor, h.calibrator.floor);
  EXPECT_EQ(r.heads[0].calibrator.mean_at_width, h.calibrator.mean_at_width);
  EXPECT_EQ(r.heads[0].calibrator.var_at_width, h.calibrator.var_at_width);
  EXPECT_EQ(r.heads[0].calibrator.mode, SelectMode::kExact);
  EXPECT_EQ(r.heads[0].calibrator.reprobe_wait, 512);
  EXPECT_EQ(r.heads[0].calibrator.ranking, DescentRanking::kNormalized);
  EXPECT_EQ(r.heads[0].calibrator.trial_n, 8);
  EXPECT_EQ(r.heads[0].calibrator.trial_since, 5);
  EXPECT_EQ(r.heads[0].calibrator.trial_needed, 16);
  EXPECT_EQ(r.heads[0].calibrator.trial_gain, h.calibrator.trial_gain);
  EXPECT_EQ(r.heads[0].calibrator.ranking_switches, 1);
  EXPECT_EQ(r.heads[0].calibrator.schedule.steps, 77);
  EXPECT_EQ(r.heads[0].calibrator.schedule.select_ns, h.calibrator.schedule.select_ns);
  EXPECT_EQ(r.heads[0].calibrator.method, SearchMethod::kTree);
  EXPECT_EQ(r.heads[0].calibrator.parked.width, h.calibrator.parked.width);
  EXPECT_EQ(r.heads[0].calibrator.parked.mean_at_width, h.calibrator.parked.mean_at_width);
  EXPECT_EQ(r.heads[0].calibrator.parked.cost, h.calibrator.parked.cost);
  EXPECT_EQ(r.heads[0].calibrator.parked.cost_n, 9);
  EXPECT_TRUE(r.heads[0].calibrator.parked.tried);
  EXPECT_TRUE(r.heads[0].calibrator.method_trial);
  EXPECT_TRUE(r.heads[0].calibrator.method_shadow);
  EXPECT_EQ(r.heads[0].calibrator.trial_bar, h.calibrator.trial_bar);
  EXPECT_EQ(r.heads[0].calibrator.method_wait, 512);
  EXPECT_EQ(r.heads[0].calibrator.method_trials, 2);
  EXPECT_EQ(r.heads[0].calibrator.method_switches, 1);
  // The same state for a head that never ran the duel: no "duel" written.
  {
    SessionQualityState plain = q;
    plain.heads[0].calibrator.method = SearchMethod::kSelector;
    EXPECT_FALSE(QualityStateToJson(plain)["heads"][0]["calibrator"].contains("duel"));
  }
  Json bad_method = session;
  bad_method["quality"]["heads"][0]["calibrator"]["duel"]["method"] = "guess";
  read = QualityStateFromJson(bad_method);
  EXPECT_FALSE(read.state.has_value());
  EXPECT_THAT(read.error, HasSubstr("field 'method'"));
  // One written before shadow trials: none running.
  {
    Json no_shadow = session;
    no_shadow["quality"]["heads"][0]["calibrator"]["duel"].erase("shadow");
    read = QualityStateFromJson(no_shadow);
    ASSERT_TRUE(read.state.has_value()) << read.error << read.missing;
    EXPECT_FALSE(read.state->heads[0].calibrator.method_shadow);
    no_shadow["quality"]["heads"][0]["calibrator"]["duel"]["shadow"] = 3;
    read = QualityStateFromJson(no_shadow);
    EXPECT_FALSE(read.state.has_value());
    EXPECT_THAT(read.error, HasSubstr("field 'shadow'"));
  }

  // A snapshot written before the method duel: the start method.
  Json older = session;
  older["quality"]["heads"][0]["calibrator"].erase("duel");
  read = QualityStateFromJson(older);
  ASSERT_TRUE(read.state.has_value()) << read.error << read.missing;
  EXPECT_EQ(read.state->heads[0].calibrator.method, SearchMethod::kSelector);
  // A snapshot written before the variance was kept: read as no spread.
  older["quality"]["heads"][0]["calibrator"].erase("var_at_width");
  read = QualityStateFromJson(older);
  ASSERT_TRUE(read.state.has_value()) << read.error << read.missing;
  EXPECT_EQ(read.state->heads[0].calibrator.var_at_width, 0.0);
  // One written before the ranking trial: the base ranking, the trial anew.
  for (const char* k :
       {"ranking", "trial_n", "trial_since", "trial_needed", "trial_gain", "ranking_switches"}) {
    older["quality"]["heads"][0]["calibrator"].erase(k);
  }
  read = QualityStateFromJson(older);
  ASSERT_TRUE(read.state.has_value()) << read.error << read.missing;
  EXPECT_EQ(read.state->heads[0].calibrator.ranking, DescentRanking::kSelector);
  EXPECT_EQ(read.state->heads[0].calibrator.trial_n, 0);
  EXPECT_EQ(read.state->heads[0].calibrator.trial_needed, 0);
  Json bad_ranking = session;
  bad_ranking["quality"]["heads"][0]["calibrator"]["ranking"] = "loudest-ish";
  read = QualityStateFromJson(bad_ranking);
  EXPECT_FALSE(read.state.has_value());
  EXPECT_THAT(read.error, HasSubstr("field 'ranking'"));

  Json other = session;
  other["quality"]["format"] = 2;
  read = QualityStateFromJson(other);
  EXPECT_FALSE(read.state.has_value());
  EXPECT_TRUE(read.error.empty());
  EXPECT_THAT(read.missing, HasSubstr("format 2; this daemon reads 1"));
  Json mistyped = session;
  mistyped["quality"]["heads"][0]["calibrator"]["mode"] = "sideways";
  read = QualityStateFromJson(mistyped);
  EXPECT_FALSE(read.state.has_value());
  EXPECT_THAT(read.error, HasSubstr("head 0: field 'mode'"));
  read = QualityStateFromJson(Json::object());
  EXPECT_THAT(read.missing, HasSubstr("older daemon"));
}

// A session's unit of selection survives a warm restart: unset (by
// destination), page and token.
TEST(SnapshotFileTest, TheSessionsGranularityRoundTrips) {
  const std::string path = "/dev/shm/" + UniqueName("snap-gran");
  SnapshotImage image;
  image.capacity_bytes = 1 << 21;
  const std::optional<Granularity> units[] = {std::nullopt, Granularity::kPage,
                                              Granularity::kToken};
  for (const std::optional<Granularity>& g : units) {
    SessionImage s = BareSessionImage(absl::StrCat("s", image.sessions.size()), SmallConfig());
    s.config.granularity = g;
    image.sessions.push_back(s);
  }
  ASSERT_THAT(WriteSnapshotFile(image, path), IsOk());
  auto back = ReadSnapshotFile(path);
  ASSERT_THAT(back, IsOk());
  ASSERT_EQ(back->sessions.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(back->sessions[i].config.granularity, units[i]) << i;
  unlink(path.c_str());
}

// MdciParams::insert_fit survives a warm restart, and a snapshot written
// before it existed reads as 0 (every decode key routed, the rule its
// appends were placed by), not as today's default: its logged appends must
// replay to the same placements.
TEST(SnapshotFileTest, TheInsertFitRoundTripsAndAnOlderSnapshotRoutesEveryKey) {
  const std::string path = "/dev/shm/" + UniqueName("snap-fit");
  SnapshotImage image;
  image.capacity_bytes = 1 << 21;
  SessionImage s = BareSessionImage("s0", SmallConfig(SelectorKind::kMdci));
  s.config.mdci.insert_fit = 3.5f;
  image.sessions.push_back(s);
  ASSERT_THAT(WriteSnapshotFile(image, path), IsOk());
  auto back = ReadSnapshotFile(path);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->sessions[0].config.mdci.insert_fit, 3.5f);
  EXPECT_GT(MdciParams().insert_fit, 0.0f);  // what an absent field must not read as

  // The same file as an older daemon wrote it: the field blanked out (the
  // JSON keeps its length), the checksum recomputed.
  auto bytes = ReadFileToString(path);
  ASSERT_THAT(bytes, IsOk());
  std::string older = *bytes;
  const std::string field = "\"insert_fit\":3.5,";
  const size_t at = older.find(field);
  ASSERT_NE(at, std::string::npos);
  older.replace(at, field.size(), std::string(field.size(), ' '));
  const uint64_t sum = FrameChecksum(older.data(), older.size() - 8);
  std::memcpy(older.data() + older.size() - 8, &sum, 8);
  Overwrite(path, older);
  back = ReadSnapshotFile(path);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->sessions[0].config.mdci.insert_fit, 0.0f);
  unlink(path.c_str());
}

}  // namespace
}  // namespace icecache
