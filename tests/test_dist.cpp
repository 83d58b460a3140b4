// Data parallelism: the gradient reducer's buckets and launch points (in process), then through
// `mpirun -np 2 dist_check` on the CPU: 2 ranks x batch b train like 1 process x batch 2b, and a rank
// that throws takes the job down within seconds, naming itself. On a machine with two GPUs the same
// equality runs with NCCL in bf16.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

#include "models/gpt.h"
#include "runtime/dist.h"
#include "runtime/io/token_shards.h"
#include "runtime/optim.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;

namespace {

std::string find_in_path(const std::string& exe) {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "");
  std::string dir;
  while (std::getline(ss, dir, ':'))
    if (!dir.empty() && access((fs::path(dir) / exe).c_str(), X_OK) == 0) return (fs::path(dir) / exe).string();
  return "";
}

using test::Run;
using test::run_command;

// The last line of the output that parses as a JSON object (rank 0's result).
nlohmann::json result_of(const Run& r) {
  std::stringstream ss(r.output);
  std::string line, last;
  while (std::getline(ss, line))
    if (!line.empty() && line[0] == '{') last = line;
  INFO("output:\n" << r.output);
  REQUIRE_FALSE(last.empty());
  return nlohmann::json::parse(last);
}

struct Launcher {
  std::string mpirun, dist_check;
  std::string skip;  // why the mpirun tests cannot run here
};

Launcher launcher() {
  Launcher l;
  l.dist_check = (fs::path(DEEPLORA_BUILD_DIR) / "dist_check").string();
  l.mpirun = find_in_path("mpirun");
#ifdef DEEPLORA_HAVE_MPI
  const bool have_mpi = true;
#else
  const bool have_mpi = false;
#endif
  if (!have_mpi) l.skip = "this build has no MPI (DEEPLORA_MPI=OFF or MPI not found)";
  else if (l.mpirun.empty()) l.skip = "mpirun not found on PATH (install openmpi-bin)";
  else if (access(l.dist_check.c_str(), X_OK) != 0) l.skip = l.dist_check + " not built (ninja dist_check)";
  // OpenMPI refuses root without these; harmless otherwise.
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  return l;
}

// Shared memory only (no network probing), no core binding: fast and quiet in containers and CI.
std::string mpirun_line(const Launcher& l, int np) {
  return fmt::format("{} -np {} --oversubscribe --allow-run-as-root --bind-to none --mca btl self,vader {}", l.mpirun,
                     np, l.dist_check);
}

double max_rel_diff(const nlohmann::json& a, const nlohmann::json& b, const char* key) {
  const auto& x = a.at(key);
  const auto& y = b.at(key);
  REQUIRE(x.size() == y.size());
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double u = x[i].get<double>(), v = y[i].get<double>();
    worst = std::max(worst, std::abs(u - v) / std::max(std::abs(v), 1e-12));
  }
  return worst;
}

}  // namespace

TEST_CASE("dist: a world of one without mpirun; collectives are no-ops") {
  const dist::Context& c = dist::init();
  if (c.mpi) {
    MESSAGE("skipped: the test binary runs under mpirun");
    return;
  }
  CHECK(c.rank == 0);
  CHECK(c.world == 1);
  CHECK(&dist::init() == &c);  // idempotent
  Tensor t = Tensor::from_vector({1, 2, 3}, Shape{3}, DType::f32);
  dist::all_reduce_sum(t);
  CHECK(t.to_double() == std::vector<double>{1, 2, 3});
  CHECK(dist::all_reduce_scalar(2.5) == 2.5);
  dist::barrier();
  CHECK(std::getenv("NCCL_NVLS_ENABLE") != nullptr);
}

TEST_CASE("dist: GradReducer buckets tile the flat gradients and launch once their grads are final") {
  Gpt model(GptConfig::preset("tiny"), DType::f32, Device::cpu, 5);
  ParamGroup decay{{}, 1.0, 0.1, "decay"}, no_decay{{}, 1.0, 0.0, "no_decay"};
  for (Tensor& t : model.trainable_tensors()) (t.ndim() >= 2 ? decay : no_decay).params.push_back(t);
  AdamW opt({decay, no_decay});
  const size_t bucket_bytes = 16 << 10;
  dist::GradReducer red(opt, bucket_bytes);
  auto flat = opt.flat_grads();
  const auto& bs = red.buckets();
  REQUIRE(bs.size() > 4);
  // Contiguous, covering each buffer, every parameter in exactly one bucket, cut at >= bucket_bytes.
  std::map<int, int64_t> pos;
  std::set<const TensorImpl*> seen;
  size_t n_params = 0;
  for (size_t i = 0; i < bs.size(); ++i) {
    const auto& b = bs[i];
    CHECK(b.begin == pos[b.buffer]);
    CHECK(b.end > b.begin);
    pos[b.buffer] = b.end;
    for (auto* p : b.params) CHECK(seen.insert(p).second);
    n_params += b.params.size();
    const bool last_of_buffer = i + 1 == bs.size() || bs[i + 1].buffer != b.buffer;
    if (!last_of_buffer) CHECK(size_t(b.end - b.begin) * dtype_size(flat[size_t(b.buffer)].dtype()) >= bucket_bytes);
  }
  for (auto& [buf, end] : pos) CHECK(end == flat[size_t(buf)].numel());
  CHECK(n_params == opt.grad_ranges().size());

  // A few tokens; snapshot each bucket as it launches and compare with the gradient after backward.
  std::vector<int32_t> ids(2 * 8), tgt(2 * 8);
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = int32_t((i * 7) % 64);
    tgt[i] = int32_t((i * 5 + 3) % 64);
  }
  std::vector<std::vector<double>> at_launch(bs.size());
  red.set_launch_observer([&](const dist::GradReducer::Bucket& b) {
    const size_t i = size_t(&b - bs.data());
    at_launch[i] = flat[size_t(b.buffer)].slice0(b.begin, b.end).to_double();
  });
  for (int step = 0; step < 2; ++step) {  // twice: the plan is rebuilt every backward
    opt.zero_grad();
    Tensor loss = model.loss(Tensor::from_ints(ids, Shape{2, 8}), Tensor::from_ints(tgt, Shape{2, 8}));
    red.arm();
    backward(loss);
    CHECK(red.n_launched_in_backward() == int64_t(bs.size()));  // all during backward, none left over
    red.finish();
    int64_t early = 0;  // buckets launched before the last node: the overlap
    for (size_t i = 0; i < bs.size(); ++i) {
      CHECK(at_launch[i] == flat[size_t(bs[i].buffer)].slice0(bs[i].begin, bs[i].end).to_double());
      early += bs[i].ready_at > 0 ? 1 : 0;
    }
    CHECK(early > 0);
  }
  // Not armed (earlier micro-batches of an accumulation): finish() reduces every bucket anyway.
  std::fill(at_launch.begin(), at_launch.end(), std::vector<double>{});
  Tensor loss = model.loss(Tensor::from_ints(ids, Shape{2, 8}), Tensor::from_ints(tgt, Shape{2, 8}));
  backward(loss);
  red.finish();
  for (auto& v : at_launch) CHECK_FALSE(v.empty());
}

TEST_CASE("dist: mpirun -np 2 x batch b trains like 1 process x batch 2b (CPU, f32)") {
  Launcher l = launcher();
  if (!l.skip.empty()) {
    MESSAGE("skipped: " << l.skip);
    return;
  }
  fs::path d = test::fresh_dir("dist-equal");
  const std::string shard = test::random_shard(d, 6000, 11);
  const std::string common = fmt::format("--data {} --steps 20 --eval-every 10 --eval-batches 4", shard);
  auto single = [&](const std::string& flags, const std::string& out) {
    Run r = run_command(fmt::format("{} {} {} --out {}", l.dist_check, common, flags, (d / out).string()));
    INFO("1 process " << flags << ":\n" << r.output);
    REQUIRE(r.status == 0);
    return r;
  };
  auto ranks2 = [&](const std::string& flags, const std::string& out) {
    Run r = run_command(fmt::format("{} {} {} --out {}", mpirun_line(l, 2), common, flags, (d / out).string()));
    INFO("mpirun -np 2 " << flags << ":\n" << r.output);
    REQUIRE(r.status == 0);
    return r;
  };

  Run one = single("--batch 4", "one");
  Run two = ranks2("--batch 2 --bucket-mb 0.01", "two");  // tiny buckets: many launched inside backward
  auto a = result_of(one), b = result_of(two);
  CHECK(a.at("world") == 1);
  CHECK(b.at("world") == 2);
  REQUIRE(a.at("losses").size() == 20);
  CHECK(max_rel_diff(b, a, "losses") <= 1e-5);
  CHECK(max_rel_diff(b, a, "val_losses") <= 1e-5);
  MESSAGE("2 ranks x 2 vs 1 x 4: losses within " << max_rel_diff(b, a, "losses") << ", val losses within "
                                                 << max_rel_diff(b, a, "val_losses") << " (relative); 1 process "
                                                 << one.seconds << " s, mpirun -np 2 " << two.seconds << " s");

  // Gradient accumulation: the all-reduce runs in the last micro-batch's backward only.
  auto a_acc = result_of(single("--batch 4 --grad-accum 2", "one_acc"));
  auto b_acc = result_of(ranks2("--batch 2 --grad-accum 2", "two_acc"));
  CHECK(max_rel_diff(b_acc, a_acc, "losses") <= 1e-5);
  MESSAGE("grad-accum 2: losses within " << max_rel_diff(b_acc, a_acc, "losses"));

  // With a compressed Deep LoRA adapter: the initialization gradient is averaged over the ranks before
  // the SVD, so both ranks build the same A, B, and only the adapter's small buffer is reduced.
  auto a_dl = result_of(single("--batch 4 --adapter deeplora --rank 8 --lr 1e-2", "one_dl"));
  auto b_dl = result_of(ranks2("--batch 2 --adapter deeplora --rank 8 --lr 1e-2", "two_dl"));
  REQUIRE(a_dl.at("losses").size() == 20);
  CHECK(max_rel_diff(b_dl, a_dl, "losses") <= 1e-5);
  MESSAGE("deeplora adapter, 2 ranks x 2 vs 1 x 4: losses within " << max_rel_diff(b_dl, a_dl, "losses"));

  // Rank 0 writes the checkpoint; both ranks resume from it and continue the same run.
  result_of(ranks2("--batch 2 --ckpt-every 10 --stop-after 10", "resume"));
  CHECK(fs::exists(d / "resume" / "metrics.jsonl"));
  CHECK(fs::exists(d / "resume" / "latest"));
  auto c = result_of(ranks2("--batch 2 --ckpt-every 10 --resume", "resume"));
  REQUIRE(c.at("losses").size() == 10);
  double worst = 0;
  for (size_t i = 0; i < 10; ++i) {
    const double u = c["losses"][i].get<double>(), v = b["losses"][i + 10].get<double>();
    worst = std::max(worst, std::abs(u - v) / std::abs(v));
  }
  CHECK(worst <= 1e-6);
  MESSAGE("resumed 2-rank run: steps 11-20 within " << worst << " of the uninterrupted one");
  fs::remove_all(d);
}

// JSONL prompt/completion examples of very different lengths (completions of 1 to 24 bytes), the
// case where a mean of per-micro-batch means differs from the token mean of the global batch.
std::string varied_jsonl(const fs::path& dir, int n, uint64_t seed) {
  std::string text;
  uint64_t s = seed;
  auto next = [&] {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return s >> 33;
  };
  for (int i = 0; i < n; ++i) {
    std::string prompt, completion;
    for (uint64_t k = 0, m = 1 + next() % 8; k < m; ++k) prompt += char('a' + next() % 26);
    for (uint64_t k = 0, m = 1 + (i % 3 == 0 ? 16 + next() % 8 : next() % 3); k < m; ++k)
      completion += char('a' + next() % 26);
    text += fmt::format("{{\"prompt\": \"{}\", \"completion\": \"{}\"}}\n", prompt, completion);
  }
  const std::string p = (dir / "varied.jsonl").string();
  std::ofstream(p) << text;
  return p;
}

TEST_CASE("dist: grad-accum k x batch b equals batch k*b for JSONL of varied lengths (token-weighted loss, 1 process)") {
  const std::string dist_check = (fs::path(DEEPLORA_BUILD_DIR) / "dist_check").string();
  fs::path d = test::fresh_dir("accum-jsonl");
  const std::string vocab = test::write_byte_vocab(d / "vocab");
  const std::string data = varied_jsonl(d, 44, 5);
  auto run = [&](const std::string& flags, const std::string& out) {
    Run r = run_command(fmt::format("{} --data {} --vocab-dir {} --seq-len 32 --steps 12 --eval-every 6 {} --out {}",
                                    dist_check, data, vocab, flags, (d / out).string()));
    INFO(flags << ":\n" << r.output);
    REQUIRE(r.status == 0);
    return result_of(r);
  };
  auto a = run("--batch 4", "b4");
  auto b = run("--batch 2 --grad-accum 2", "b2a2");
  auto c = run("--batch 1 --grad-accum 4", "b1a4");
  REQUIRE(a.at("losses").size() == 12);
  CHECK(max_rel_diff(b, a, "losses") <= 1e-5);
  CHECK(max_rel_diff(c, a, "losses") <= 1e-5);
  CHECK(max_rel_diff(b, a, "val_losses") <= 1e-5);
  MESSAGE("JSONL, batch 2 x accum 2 and 1 x 4 vs batch 4: losses within " << max_rel_diff(b, a, "losses") << " and "
                                                                          << max_rel_diff(c, a, "losses"));
  fs::remove_all(d);
}

TEST_CASE("dist: mpirun -np 2 equals one process at the global batch for JSONL of varied lengths (token-weighted)") {
  Launcher l = launcher();
  if (!l.skip.empty()) {
    MESSAGE("skipped: " << l.skip);
    return;
  }
  fs::path d = test::fresh_dir("dist-jsonl");
  const std::string vocab = test::write_byte_vocab(d / "vocab");
  const std::string data = varied_jsonl(d, 44, 7);
  const std::string common =
      fmt::format("--data {} --vocab-dir {} --seq-len 32 --steps 12 --eval-every 6 --eval-batches 4", data, vocab);
  auto run = [&](const std::string& launch, const std::string& flags, const std::string& out) {
    Run r = run_command(fmt::format("{} {} {} --out {}", launch, common, flags, (d / out).string()));
    INFO(launch << " " << flags << ":\n" << r.output);
    REQUIRE(r.status == 0);
    return result_of(r);
  };
  auto one = run(l.dist_check, "--batch 4", "one");
  auto two = run(mpirun_line(l, 2), "--batch 2 --bucket-mb 0.01", "two");
  auto two_acc = run(mpirun_line(l, 2), "--batch 1 --grad-accum 2", "two_acc");
  CHECK(two.at("world") == 2);
  REQUIRE(one.at("losses").size() == 12);
  CHECK(max_rel_diff(two, one, "losses") <= 1e-5);
  CHECK(max_rel_diff(two, one, "val_losses") <= 1e-5);
  CHECK(max_rel_diff(two_acc, one, "losses") <= 1e-5);
  MESSAGE("JSONL: 2 ranks x 2 vs 1 x 4: losses within " << max_rel_diff(two, one, "losses") << ", val within "
                                                         << max_rel_diff(two, one, "val_losses")
                                                         << "; 2 ranks x 1 x accum 2: " << max_rel_diff(two_acc, one, "losses"));
  fs::remove_all(d);
}

TEST_CASE("dist: a NaN gradient on every rank is skipped by all of them together; training goes on") {
  Launcher l = launcher();
  if (!l.skip.empty()) {
    MESSAGE("skipped: " << l.skip);
    return;
  }
  fs::path d = test::fresh_dir("dist-nan");
  const std::string shard = test::random_shard(d, 6000, 19);
  Run r = run_command(fmt::format("{} --data {} --batch 2 --steps 8 --nan-grad-steps 3 --ckpt-every 4 --out {}",
                                  mpirun_line(l, 2), shard, (d / "run").string()));
  INFO(r.output);
  REQUIRE(r.status == 0);
  auto j = result_of(r);
  CHECK(j.at("bad_steps") == 1);
  CHECK(j.at("losses")[3].is_number());  // the loss was finite, the gradient not
  CHECK(j.at("losses")[7].get<double>() < j.at("losses")[0].get<double>());
  fs::remove_all(d);
}

TEST_CASE("dist: a rank that throws takes mpirun down within seconds, naming the rank") {
  Launcher l = launcher();
  if (!l.skip.empty()) {
    MESSAGE("skipped: " << l.skip);
    return;
  }
  fs::path d = test::fresh_dir("dist-fail");
  const std::string shard = test::random_shard(d, 6000, 13);
  // Enough steps that rank 0 would still be training (blocked in the all-reduce) long after.
  Run r = run_command(fmt::format("{} --data {} --batch 2 --steps 100000 --fail-rank 1 --fail-step 3 --out {}",
                                  mpirun_line(l, 2), shard, (d / "run").string()));
  {
    INFO("output:\n" << r.output);
    CHECK(r.status != 0);
    CHECK(r.seconds < 60);
    CHECK(r.output.find("rank 1 failed") != std::string::npos);
    CHECK(r.output.find("failing on purpose at step 3") != std::string::npos);
  }
  MESSAGE("failed run: exit " << r.status << " after " << r.seconds << " s");
  // A rank that dies outright (kill -9, OOM killer): mpirun notices and ends the others.
  Run k = run_command(fmt::format("{} --data {} --batch 2 --steps 100000 --fail-rank 1 --fail-step 3 --fail-kill --out {}",
                                  mpirun_line(l, 2), shard, (d / "run_kill").string()));
  {
    INFO("output:\n" << k.output);
    CHECK(k.status != 0);
    CHECK(k.seconds < 60);
    CHECK(k.output.find("rank 1") != std::string::npos);
  }
  MESSAGE("killed rank: exit " << k.status << " after " << k.seconds << " s");
  fs::remove_all(d);
}

TEST_CASE("dist: mpirun -np 2 on two GPUs (NCCL, bf16) trains like 1 GPU at the global batch") {
  Launcher l = launcher();
  if (!l.skip.empty()) {
    MESSAGE("skipped: " << l.skip);
    return;
  }
  if (dist::cuda_device_count() < 2) {
    MESSAGE("skipped: needs 2 GPUs (" << dist::cuda_device_count() << " visible)");
    return;
  }
  fs::path d = test::fresh_dir("dist-nccl");
  const std::string shard = test::random_shard(d, 200000, 17);
  const std::string common = fmt::format(
      "--data {} --preset small-cpu --seq-len 64 --steps 20 --eval-every 10 --device cuda --dtype bf16", shard);
  Run one = run_command(fmt::format("{} {} --batch 8 --out {}", l.dist_check, common, (d / "one").string()));
  INFO("1 GPU:\n" << one.output);
  REQUIRE(one.status == 0);
  Run two = run_command(fmt::format("{} {} --batch 4 --bucket-mb 0.25 --out {}", mpirun_line(l, 2), common,
                                    (d / "two").string()));
  INFO("2 GPUs:\n" << two.output);
  REQUIRE(two.status == 0);
  auto a = result_of(one), b = result_of(two);
  CHECK(max_rel_diff(b, a, "losses") <= 1e-2);
  CHECK(max_rel_diff(b, a, "val_losses") <= 1e-2);
  MESSAGE("NCCL bf16, 2 GPUs x 4 vs 1 x 8: losses within " << max_rel_diff(b, a, "losses") << ", val losses within "
                                                           << max_rel_diff(b, a, "val_losses"));
  fs::remove_all(d);
}
