// Replays fuzz inputs through the same entry points as the libFuzzer targets (fuzz/entry_points.h):
// every input a fuzzer once crashed on (fuzz/regressions/<target>/) must now end in success or a
// tf::Error, and every seed (fuzz/corpus/<target>/) is a valid input that must be accepted.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz/entry_points.h"

namespace fs = std::filesystem;

namespace {

const fs::path kFuzzDir = fs::path(TIGHTFIT_FIXTURES) / ".." / ".." / "fuzz";
const char* const kTargets[] = {"safetensors",      "gguf",  "tokenizer_json",
                                "tokenizer_encode", "jsonl", "jinja"};

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<fs::path> files_in(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(e.path());
  return out;
}

TEST(FuzzRegressions, EveryTargetHasAnEntryPoint) {
  for (const char* t : kTargets) EXPECT_NE(tf::fuzz::entry_point(t), nullptr) << t;
  EXPECT_EQ(tf::fuzz::entry_point("no_such_target"), nullptr);
}

TEST(FuzzRegressions, SeedsAreAccepted) {
  for (const char* t : kTargets) {
    const std::vector<fs::path> seeds = files_in(kFuzzDir / "corpus" / t);
    EXPECT_FALSE(seeds.empty()) << "no seeds for " << t;
    for (const fs::path& p : seeds) {
      const std::vector<uint8_t> bytes = read_bytes(p);
      EXPECT_TRUE(tf::fuzz::entry_point(t)(bytes.data(), bytes.size())) << p;
    }
  }
}

// A crash or sanitizer report here fails the test binary; an exception other than tf::Error fails the
// expectation. Success and tf::Error are both fine: the input only has to be handled. Only targets a
// fuzzer has broken have a folder, so a target without one is fine; but regressions/ itself must hold
// inputs, and each folder in it must be a target's and hold some, or a renamed or misplaced input
// would silently stop being replayed.
TEST(FuzzRegressions, FoundInputsAreHandled) {
  const fs::path dir = kFuzzDir / "regressions";
  ASSERT_TRUE(fs::is_directory(dir)) << dir << " is missing";
  size_t replayed = 0;
  for (const auto& folder : fs::directory_iterator(dir)) {
    const tf::fuzz::EntryPoint run = tf::fuzz::entry_point(folder.path().filename().string());
    ASSERT_TRUE(folder.is_directory() && run != nullptr)
        << folder.path() << " is not the folder of a fuzz target";
    const std::vector<fs::path> inputs = files_in(folder.path());
    EXPECT_FALSE(inputs.empty()) << folder.path() << " holds no inputs";
    for (const fs::path& p : inputs) {
      const std::vector<uint8_t> bytes = read_bytes(p);
      EXPECT_NO_THROW(run(bytes.data(), bytes.size())) << p;
      ++replayed;
    }
  }
  EXPECT_GT(replayed, 0u) << dir << " holds no inputs";
}

// A seed that loses a byte at the end or gains one in the middle is still handled: a quick stand-in
// for the fuzzer in CI, where libFuzzer is not built.
TEST(FuzzRegressions, MutatedSeedsAreHandled) {
  for (const char* t : kTargets) {
    for (const fs::path& p : files_in(kFuzzDir / "corpus" / t)) {
      std::vector<uint8_t> bytes = read_bytes(p);
      if (bytes.size() < 2) continue;
      std::vector<uint8_t> cut(bytes.begin(), bytes.end() - 1);
      EXPECT_NO_THROW(tf::fuzz::entry_point(t)(cut.data(), cut.size())) << p << " truncated";
      bytes.insert(bytes.begin() + std::ptrdiff_t(bytes.size() / 2), uint8_t(0xff));
      EXPECT_NO_THROW(tf::fuzz::entry_point(t)(bytes.data(), bytes.size())) << p << " with 0xff inserted";
    }
  }
}

}  // namespace
