// defines: end-to-end tests of data-parallel finetune under mpirun (two ranks on the cpu backend):
// parity with one process accumulating the same global batch (the gradient sum after the backward
// or overlapped with it, the weights whole or sharded, launched with -np or a hostfile), the rank
// that dies, the error on one rank, the signal to one rank, resume, and the refusal of an MPI
// launch by a build without MPI
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <thread>

#include "src/dist/comm.h"
#include "tests/cli_test_util.h"

namespace {

using namespace tf::test;
using Clock = std::chrono::steady_clock;

class CliMpi : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    if (!tf::dist::mpi_built())
      GTEST_SKIP()
          << "this build has no MPI (TIGHTFIT_MPI=OFF or no MPI found), so finetune cannot run ranks";
    make_model_and_data();
  }

  // Starts `mpirun -np ranks tightfit args...` with stdout and stderr into files under the test's
  // directory named after `tag`. The container runs as root, and two ranks share two cores.
  // `launcher` goes to mpirun before the binary (a --hostfile).
  pid_t spawn_mpirun(int ranks, const std::vector<std::string>& args, const std::string& tag,
                     const std::vector<std::string>& launcher = {}) {
    const pid_t pid = fork();
    if (pid == 0) {
      setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
      setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
      std::vector<std::string> all = {
          tf::dist::mpiexec(), "-np", std::to_string(ranks), "--oversubscribe", "--mca", "btl", "self,vader"};
      all.insert(all.end(), launcher.begin(), launcher.end());
      all.push_back(TIGHTFIT_BINARY);
      all.insert(all.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& a : all) argv.push_back(a.data());
      argv.push_back(nullptr);
      if (!freopen((dir_ / (tag + ".out")).c_str(), "w", stdout) ||
          !freopen((dir_ / (tag + ".err")).c_str(), "w", stderr))
        _exit(126);
      execv(argv[0], argv.data());
      _exit(127);
    }
    return pid;
  }

  Result mpirun(int ranks, const std::vector<std::string>& args, const std::string& tag,
                const std::vector<std::string>& launcher = {}) {
    Result r;
    r.status = wait_status(spawn_mpirun(ranks, args, tag, launcher));
    r.out = slurp(dir_ / (tag + ".out"));
    r.err = slurp(dir_ / (tag + ".err"));
    return r;
  }

  std::vector<std::string> args(const std::string& out, int steps, int grad_accum) {
    std::vector<std::string> a = finetune_args(out, steps);
    set_option(a, "--grad-accum", std::to_string(grad_accum));
    return a;
  }

  static std::vector<double> field(const fs::path& metrics, const char* key) {
    std::vector<double> v;
    std::ifstream in(metrics);
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line);
      if (j.contains(key)) v.push_back(j[key].get<double>());
    }
    return v;
  }

  std::string adapter(const std::string& run) {
    return slurp(dir_ / run / "adapter" / "adapter_model.safetensors");
  }

  // The pid rank `rank` printed in its one "rank r of N (pid P ...)" line, once it has.
  pid_t rank_pid(const std::string& tag, int rank) {
    const std::regex line("rank " + std::to_string(rank) + " of 2 \\(pid ([0-9]+)");
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < deadline) {
      std::smatch m;
      const std::string out = slurp(dir_ / (tag + ".out"));
      if (std::regex_search(out, m, line)) return pid_t(std::stol(m[1]));
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return -1;
  }

  // The exit status of `job` once it ends within `limit`; else nothing, after stopping it (mpirun
  // ends its ranks on SIGTERM).
  static std::optional<int> wait_within(pid_t job, std::chrono::seconds limit) {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) {
      int st = 0;
      if (waitpid(job, &st, WNOHANG) == job) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(job, SIGTERM);
    wait_status(job);
    return std::nullopt;
  }

  void wait_for_steps(const std::string& run, size_t n) {
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    while (losses(dir_ / run / "metrics.jsonl").size() < n && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  static std::set<std::string> entries(const fs::path& dir) {
    std::set<std::string> names;
    for (const auto& e : fs::recursive_directory_iterator(dir))
      names.insert(fs::relative(e.path(), dir).string());
    return names;
  }
};

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Rank r takes micro-batch r of each step's two, one per rank, so the two ranks see exactly the
// micro-batches one process sees with --grad-accum 2, and each step's gradient is the same sum:
// one process adds micro-batch 1's LoRA products into the buffer holding micro-batch 0's (the
// matmuls' beta = 1 adds each fully formed product once at these shapes, 96 rows, one OpenBLAS
// block of the sum), the ranks add rank 1's buffer to rank 0's. Losses and adapter are bit-exact.
TEST_F(CliMpi, TwoRanksTrainAsOneProcessAccumulatingTheGlobalBatch) {
  Result r = run(args("single", 6, 2));
  ASSERT_EQ(r.status, 0) << r.err;
  r = mpirun(2, args("dp", 6, 1), "dp");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  const std::vector<double> want = losses(dir_ / "single" / "metrics.jsonl");
  ASSERT_EQ(want.size(), 6u);
  EXPECT_EQ(losses(dir_ / "dp" / "metrics.jsonl"), want);
  EXPECT_EQ(field(dir_ / "dp" / "metrics.jsonl", "grad_norm"),
            field(dir_ / "single" / "metrics.jsonl", "grad_norm"));
  EXPECT_EQ(field(dir_ / "dp" / "metrics.jsonl", "tokens"),
            field(dir_ / "single" / "metrics.jsonl", "tokens"));
  EXPECT_FALSE(adapter("single").empty());
  EXPECT_TRUE(adapter("dp") == adapter("single")) << "the adapters differ";
  // Rank 0 alone wrote, and wrote what one process writes.
  EXPECT_EQ(entries(dir_ / "dp"), entries(dir_ / "single"));
  EXPECT_EQ(count(r.out, "rank 0 of 2 (pid"), 1u) << r.out;
  EXPECT_EQ(count(r.out, "rank 1 of 2 (pid"), 1u) << r.out;
  EXPECT_EQ(count(r.out, "done: 6 steps"), 1u) << r.out;
  EXPECT_NE(r.out.find("data parallel: 2 ranks"), std::string::npos) << r.out;
}

// The sum block by block during the backward is the same gather and rank-order add over the same
// elements as the one sum after it, so the two runs are bit for bit the same, and both equal one
// process accumulating the same global batch (as above). The log says which ran.
TEST_F(CliMpi, GradientSumOverlappedWithTheBackwardIsBitForBitTheSumAfterIt) {
  Result r = run(args("single", 4, 2));
  ASSERT_EQ(r.status, 0) << r.err;
  std::vector<std::string> off = args("off", 4, 1);
  off.push_back("--no-overlap-grad-sum");
  r = mpirun(2, off, "off");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("gradient sum: after the backward (--no-overlap-grad-sum)"), std::string::npos)
      << r.out;
  r = mpirun(2, args("on", 4, 1), "on");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("gradient sum: block by block, overlapped with the backward"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("of which"), std::string::npos) << r.out;
  const std::vector<double> want = losses(dir_ / "single" / "metrics.jsonl");
  ASSERT_EQ(want.size(), 4u);
  EXPECT_EQ(losses(dir_ / "on" / "metrics.jsonl"), losses(dir_ / "off" / "metrics.jsonl"));
  EXPECT_EQ(losses(dir_ / "on" / "metrics.jsonl"), want);
  EXPECT_EQ(field(dir_ / "on" / "metrics.jsonl", "grad_norm"),
            field(dir_ / "off" / "metrics.jsonl", "grad_norm"));
  EXPECT_TRUE(adapter("on") == adapter("off")) << "the adapters differ";
  EXPECT_TRUE(adapter("on") == adapter("single")) << "the adapters differ";
}

// The launch README gives for several machines, a hostfile naming the hosts and their slots, here
// with this machine as the only host: the ranks are placed from the file and train as above.
TEST_F(CliMpi, AHostfileLaunchTrainsAsTheSameRanks) {
  Result r = mpirun(2, args("np", 3, 1), "np");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  std::ofstream(dir_ / "hostfile") << "localhost slots=2\n";
  r = mpirun(2, args("hosts", 3, 1), "hosts", {"--hostfile", (dir_ / "hostfile").string()});
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(count(r.out, "rank 1 of 2 (pid"), 1u) << r.out;
  EXPECT_EQ(losses(dir_ / "hosts" / "metrics.jsonl"), losses(dir_ / "np" / "metrics.jsonl"));
  EXPECT_TRUE(adapter("hosts") == adapter("np")) << "the adapters differ";
}

// With --shard-weights each rank keeps half of every block's bytes and gathers the rest just
// before the block runs: the ops read the same bytes as from whole weights, so the run is bit for
// bit the one-process run. NF4 with nested absmax and the f32 norms cross the shares' boundaries;
// the evaluations, which every rank runs since their blocks are gathered too, give rank 0 the
// same losses.
TEST_F(CliMpi, ShardedWeightsTrainAsOneProcessBitForBit) {
  const auto with = [&](std::vector<std::string> a) {
    set_option(a, "--quant", "nf4");
    set_option(a, "--eval-data", (dir_ / "train.jsonl").string());
    set_option(a, "--eval-every", "2");
    return a;
  };
  Result r = run(with(args("single", 4, 2)));
  ASSERT_EQ(r.status, 0) << r.err;
  std::vector<std::string> sharded = with(args("sharded", 4, 1));
  sharded.push_back("--shard-weights");
  r = mpirun(2, sharded, "sharded");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("weights: split across the 2 ranks (--shard-weights), this rank holding 1/2 of every "
                       "layer's block"),
            std::string::npos)
      << r.out;
  const std::vector<double> want = losses(dir_ / "single" / "metrics.jsonl");
  ASSERT_EQ(want.size(), 4u);
  EXPECT_EQ(losses(dir_ / "sharded" / "metrics.jsonl"), want);
  EXPECT_EQ(field(dir_ / "sharded" / "metrics.jsonl", "grad_norm"),
            field(dir_ / "single" / "metrics.jsonl", "grad_norm"));
  const std::vector<double> evals = field(dir_ / "single" / "metrics.jsonl", "eval_loss");
  EXPECT_EQ(evals.size(), 3u);
  EXPECT_EQ(field(dir_ / "sharded" / "metrics.jsonl", "eval_loss"), evals);
  EXPECT_TRUE(adapter("sharded") == adapter("single")) << "the adapters differ";
  const nlohmann::json plan = nlohmann::json::parse(slurp(dir_ / "sharded" / "plan.json"));
  EXPECT_EQ(plan["weights"], "shard");
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "sharded" / "config.json"))["shard_weights"], true);
}

// --shard-weights needs ranks to share with, and is where the weights live: it is refused without
// mpirun and beside another --weights, before anything is written.
TEST_F(CliMpi, ShardedWeightsAreRefusedOnOneRankAndBesideAnotherTier) {
  std::vector<std::string> a = args("one", 1, 1);
  a.push_back("--shard-weights");
  Result r = run(a);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--shard-weights splits the per-layer weights across the ranks"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("mpirun -np N with N >= 2"), std::string::npos) << r.err;
  std::vector<std::string> disk = args("disk", 1, 1);
  disk.push_back("--shard-weights");
  set_option(disk, "--weights", "disk");
  r = mpirun(2, disk, "disk");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("leave --weights out"), std::string::npos) << r.err;
}

// With --grad-accum 2 on each rank the one process adds four micro-batches' products one after
// another, the ranks (m0 + m1) + (m2 + m3): the same terms grouped differently, each float
// gradient element within a few 2^-24 of the sum of its terms' magnitudes. Over 6 AdamW steps of
// this tiny model that moves the losses by about 1e-9 relative (measured); 1e-6 is the bound.
TEST_F(CliMpi, TwoRanksWithAccumulationMatchOneProcessWithinTheRegroupingBound) {
  Result r = run(args("single", 6, 4));
  ASSERT_EQ(r.status, 0) << r.err;
  r = mpirun(2, args("dp", 6, 2), "dp");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  const std::vector<double> want = losses(dir_ / "single" / "metrics.jsonl"),
                            got = losses(dir_ / "dp" / "metrics.jsonl");
  ASSERT_EQ(got.size(), want.size());
  ASSERT_EQ(want.size(), 6u);
  // The first step's loss comes before any update: the same tokens, the same parameters.
  EXPECT_EQ(got[0], want[0]);
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(got[i], want[i], 1e-6 * std::fabs(want[i])) << "step " << i;
}

// Open MPI's mpirun ends the job when a rank dies abnormally: the surviving rank, blocked in its
// next collective, is killed too, and mpirun names the rank that died. The run then resumes on
// two ranks from rank 0's newest checkpoint to the uninterrupted run's losses and adapter.
TEST_F(CliMpi, KilledRankStopsTheOtherAndTheRunResumesBitForBit) {
  Result r = mpirun(2, args("straight", 30, 1), "straight");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  const std::vector<double> want = losses(dir_ / "straight" / "metrics.jsonl");

  const pid_t job = spawn_mpirun(2, args("killed", 30, 1), "killed");
  const pid_t rank1 = rank_pid("killed", 1);
  ASSERT_GT(rank1, 0) << slurp(dir_ / "killed.out");
  wait_for_steps("killed", 3);
  ASSERT_EQ(kill(rank1, SIGKILL), 0);
  const std::optional<int> status = wait_within(job, std::chrono::seconds(60));
  ASSERT_TRUE(status) << "the surviving rank still ran 60 s after rank 1 died";
  EXPECT_NE(*status, 0);
  const std::string said = slurp(dir_ / "killed.out") + slurp(dir_ / "killed.err");
  EXPECT_NE(said.find("rank 1 with PID"), std::string::npos) << said;
  EXPECT_NE(said.find("exited on signal 9"), std::string::npos) << said;
  EXPECT_LT(losses(dir_ / "killed" / "metrics.jsonl").size(), want.size())
      << "the run finished before the kill";

  std::vector<std::string> resume = args("killed", 30, 1);
  resume.push_back("--resume");
  r = mpirun(2, resume, "resume");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("resuming from"), std::string::npos) << r.out;
  EXPECT_EQ(losses(dir_ / "killed" / "metrics.jsonl"), want);
  EXPECT_TRUE(adapter("killed") == adapter("straight")) << "the adapters differ";
}

// Rank 0 fails alone (its plan.json cannot be replaced) while rank 1 goes on to the next
// collective: the error must end both through MPI_Abort rather than leave rank 1 waiting.
TEST_F(CliMpi, AnErrorOnOneRankStopsEveryRank) {
  Result r = mpirun(2, args("run", 2, 1), "run");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  fs::remove(dir_ / "run" / "report.html");  // unfinished again, so that --resume proceeds
  fs::remove(dir_ / "run" / "plan.json");
  fs::create_directories(dir_ / "run" / "plan.json" / "in-the-way");
  std::vector<std::string> resume = args("run", 2, 1);
  resume.push_back("--resume");
  const std::optional<int> status = wait_within(spawn_mpirun(2, resume, "resume"), std::chrono::seconds(60));
  ASSERT_TRUE(status) << "the job still ran 60 s after rank 0's error: rank 1 waits for it";
  EXPECT_NE(*status, 0);
  const std::string err = slurp(dir_ / "resume.err");
  EXPECT_NE(err.find("error: rank 0 of 2: "), std::string::npos) << err;
  EXPECT_NE(err.find("plan.json"), std::string::npos) << err;
}

// A signal to one rank stops both after the same step: the ranks agree each step on whether any
// was signalled, rank 0 saves, and both exit cleanly.
TEST_F(CliMpi, SigtermToOneRankStopsEveryRankAfterTheSameStep) {
  std::vector<std::string> a = args("term", 400, 1);
  set_option(a, "--save-every", "0");
  const pid_t job = spawn_mpirun(2, a, "term");
  const pid_t rank1 = rank_pid("term", 1);
  ASSERT_GT(rank1, 0) << slurp(dir_ / "term.out");
  wait_for_steps("term", 2);
  ASSERT_EQ(kill(rank1, SIGTERM), 0);
  const std::optional<int> status = wait_within(job, std::chrono::seconds(60));
  ASSERT_TRUE(status) << "the job still ran 60 s after the signal";
  EXPECT_EQ(*status, 0) << slurp(dir_ / "term.err");
  const size_t done = losses(dir_ / "term" / "metrics.jsonl").size();
  EXPECT_LT(done, 400u);
  EXPECT_TRUE(fs::exists(dir_ / "term" / "checkpoints" / ("step-" + std::to_string(done)))) << done;
  const std::string out = slurp(dir_ / "term.out");
  EXPECT_NE(out.find("stopped by a signal to another rank after step " + std::to_string(done)),
            std::string::npos)
      << out;
}

// A resume must keep the number of ranks: another count changes the global batch and the shares.
TEST_F(CliMpi, ResumeRefusesAnotherNumberOfRanks) {
  ASSERT_EQ(mpirun(2, args("dp", 2, 1), "dp").status, 0);
  fs::remove(dir_ / "dp" / "report.html");
  std::vector<std::string> resume = args("dp", 2, 1);
  resume.push_back("--resume");
  const Result r = run(resume);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("the run trained on 2 ranks and this launch has 1"), std::string::npos) << r.err;
}

TEST_F(Cli, ABuildWithoutMpiRefusesAnMpiLaunch) {
  if (tf::dist::mpi_built()) GTEST_SKIP() << "this build has MPI: an MPI launch is the CliMpi tests' subject";
  make_model_and_data();
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  const Result r = run(finetune_args("run", 1));
  unsetenv("OMPI_COMM_WORLD_SIZE");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("built without MPI support"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "run"));
}

}  // namespace
