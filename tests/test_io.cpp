// runtime/io: safetensors round trips and every corruption the reader must name, llm.c token shards,
// and atomic writes surviving a writer killed with SIGKILL.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/io/atomic_file.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/token_shards.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;

namespace {
using test::TempDir;


void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A safetensors file from a header text and a data region.
std::string st_file(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string s(reinterpret_cast<const char*>(&n), 8);
  return s + header + data;
}

using test::contains;
std::string error_of(const std::function<void()>& f) { return test::runtime_error_of(f); }

Tensor make_tensor(const Shape& s, DType dt, uint64_t seed) {
  Tensor t = Tensor::empty(s, dt, Device::cpu);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-3, 3);
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (dt) {
      case DType::f32: t.data_as<float>()[i] = float(u(rng)); break;
      case DType::f64: t.data_as<double>()[i] = u(rng); break;
      case DType::bf16: t.data_as<bf16>()[i] = bf16(float(u(rng))); break;
      case DType::i32: t.data_as<int32_t>()[i] = int32_t(rng() % 100000) - 50000; break;
    }
  }
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace

TEST_CASE("safetensors: round trip of every dtype, scalars, empty tensors and metadata") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  NamedTensors in = {
      {"w.f32", make_tensor({2, 3}, DType::f32, 1)},    {"a.bf16", make_tensor({5}, DType::bf16, 2)},
      {"x.f64", make_tensor({2, 2, 2}, DType::f64, 3)}, {"ids.i32", make_tensor({3, 1}, DType::i32, 4)},
      {"scalar", make_tensor({}, DType::f32, 5)},       {"empty", make_tensor({0, 5}, DType::f32, 6)},
      {"four_d", make_tensor({2, 1, 3, 2}, DType::bf16, 7)},
  };
  save_safetensors(path, in, {{"format", "pt"}, {"step", "12"}});

  auto hdr = read_safetensors_header(path);
  CHECK(hdr.data_start % 8 == 0);
  CHECK(hdr.metadata.at("format") == "pt");
  CHECK(hdr.metadata.at("step") == "12");
  REQUIRE(hdr.entries.size() == in.size());
  for (size_t i = 1; i < hdr.entries.size(); ++i) CHECK(hdr.entries[i - 1].name < hdr.entries[i].name);
  for (const auto& e : hdr.entries) CHECK((hdr.data_start + e.begin) % safe_dtype_size(e.dtype) == 0);
  REQUIRE(hdr.find("x.f64") != nullptr);
  CHECK(hdr.find("x.f64")->dtype == SafeDType::f64);
  CHECK(hdr.find("nope") == nullptr);

  auto f = load_safetensors(path);
  CHECK(f.tensors.size() == in.size());
  for (const auto& [name, t] : in) {
    INFO(name);
    REQUIRE(f.contains(name));
    CHECK(same_bytes(f.at(name), t));
    CHECK(f.at(name).name() == name);
    CHECK(f.at(name).device() == Device::cpu);
  }
  CHECK(f.at("scalar").ndim() == 0);
  CHECK(contains(error_of([&] { f.at("missing"); }), "missing"));

  // Writing is deterministic: the same tensors in another order give the same bytes.
  const std::string path2 = dir.file("again.safetensors");
  NamedTensors reversed(in.rbegin(), in.rend());
  save_safetensors(path2, reversed, {{"step", "12"}, {"format", "pt"}});
  CHECK(read_bytes(path) == read_bytes(path2));
}

TEST_CASE("safetensors: F16 stores, loads as f32, and float_as converts") {
  TempDir dir;
  const std::string path = dir.file("half.safetensors");
  std::vector<float> vals = {0.5f, -2.0f, 65504.0f, 1e-7f, std::numeric_limits<float>::infinity(), 0.1f, -0.0f, 3.14159f};
  Tensor t = Tensor::empty({int64_t(vals.size())}, DType::f32);
  std::memcpy(t.data(), vals.data(), vals.size() * 4);
  Tensor ids = make_tensor({4}, DType::i32, 9);
  save_safetensors(path, {{"h", t}, {"ids", ids}}, {}, SafeDType::f16);

  auto f = load_safetensors(path);
  CHECK(f.header.find("h")->dtype == SafeDType::f16);
  CHECK(f.header.find("ids")->dtype == SafeDType::i32);  // float_as leaves integers alone
  CHECK(same_bytes(f.at("ids"), ids));
  const Tensor& h = f.at("h");
  REQUIRE(h.dtype() == DType::f32);
  for (size_t i = 0; i < vals.size(); ++i) {
    INFO(vals[i]);
    CHECK(h.data_as<float>()[i] == f16_to_f32(f32_to_f16(vals[i])));
  }
  CHECK(h.data_as<float>()[0] == 0.5f);
  CHECK(h.data_as<float>()[2] == 65504.0f);
  CHECK(std::isinf(h.data_as<float>()[4]));
  CHECK(std::fabs(h.data_as<float>()[7] - 3.14159f) < 2e-3f);

  // bf16 storage of an f32 tensor matches the host bf16 rounding.
  save_safetensors(path, {{"h", t}}, {}, SafeDType::bf16);
  auto g = load_safetensors(path);
  REQUIRE(g.at("h").dtype() == DType::bf16);
  for (size_t i = 0; i < vals.size(); ++i) CHECK(g.at("h").data_as<bf16>()[i].bits == bf16(vals[i]).bits);
}

TEST_CASE("safetensors: f16 <-> f32 conversion") {
  // Every half survives half -> float -> half exactly (NaN payloads included).
  for (uint32_t b = 0; b < 65536; ++b) {
    uint16_t h = uint16_t(b);
    if (f32_to_f16(f16_to_f32(h)) != h) {
      FAIL_CHECK(fmt::format("half 0x{:04x} does not round-trip", b));
      break;
    }
  }
  CHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // tie -> even (1.0)
  CHECK(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie -> even (up)
  CHECK(f32_to_f16(65520.0f) == 0x7c00);                          // rounds to inf
  CHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);             // smallest subnormal
  CHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);             // tie -> even (zero)
  CHECK(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))));
#if defined(__FLT16_MANT_DIG__)
  std::mt19937 rng(7);
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    _Float16 ref = static_cast<_Float16>(f);
    uint16_t rb;
    std::memcpy(&rb, &ref, 2);
    if (f32_to_f16(f) != rb) {
      FAIL_CHECK(fmt::format("f32_to_f16(bits 0x{:08x}) = 0x{:04x}, compiler says 0x{:04x}", u, f32_to_f16(f), rb));
      break;
    }
  }
#endif
}

TEST_CASE("safetensors: the writer rejects bad input") {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  Tensor t = make_tensor({2}, DType::f32, 1);
  CHECK_THROWS_AS(save_safetensors(path, {{"a", t}, {"a", t}}), std::invalid_argument);
  CHECK_THROWS_AS(save_safetensors(path, {{"__metadata__", t}}), std::invalid_argument);
  CHECK_THROWS_AS(save_safetensors(path, {{"", t}}), std::invalid_argument);
  CHECK_THROWS_AS(save_safetensors(path, {{"u", Tensor()}}), std::invalid_argument);
  CHECK_THROWS_AS(save_safetensors(path, {{"a", t}}, {}, SafeDType::i32), std::invalid_argument);
  CHECK_FALSE(fs::exists(path));
  CHECK(fs::is_empty(dir.path));  // no temp files left behind
}

TEST_CASE("safetensors: every corruption gives an error naming the file") {
  TempDir dir;
  struct Case {
    const char* name;
    std::string bytes;
    std::string expect;  // a word the message must contain besides the file name
  };
  const std::string data8(8, '\x01');
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<Case> cases = {
      {"short", std::string("\x01\x02\x03", 3), "shorter than the 8-byte"},
      {"empty", std::string(), "shorter than the 8-byte"},
      {"header_too_long", std::string("\xff\xff\x00\x00\x00\x00\x00\x00", 8) + "{}", "header length"},
      {"not_json", st_file("{not json", ""), "not valid JSON"},
      {"not_object", st_file("[1, 2, 3]", ""), "not an object"},
      {"entry_not_object", st_file(R"({"a": 3})", ""), "'a'"},
      {"no_dtype", st_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", data8), "lacks 'dtype'"},
      {"no_shape", st_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", data8), "lacks 'shape'"},
      {"no_offsets", st_file(R"({"a":{"dtype":"F32","shape":[2]}})", data8), "lacks 'data_offsets'"},
      {"unknown_dtype", st_file(R"({"a":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", data8), "unknown dtype"},
      {"unsupported_dtype", st_file(R"({"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", data8), "not supported"},
      {"negative_dim", st_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8), "negative"},
      {"five_dims", st_file(R"({"a":{"dtype":"F32","shape":[1,1,1,1,2],"data_offsets":[0,8]}})", data8), "at most 4"},
      {"bad_offsets", st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", data8), "data_offsets"},
      {"reversed_offsets", st_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data8), "end before begin"},
      {"out_of_range", st_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data8), "past the end"},
      {"size_mismatch", st_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8), "needs 12"},
      {"huge_shape", st_file(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", data8), "too large"},
      // 0 bytes in all (a zero dim), but a dim past int64: was "Tensor::empty: negative dimension", no file named.
      {"dim_past_int64", st_file(R"({"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}})", ""),
       "dim above 2^63 - 1"},
      {"overlap", st_file("{" + ok_entry + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')),
       "overlap"},
      {"gap_inside", st_file("{" + ok_entry + R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", std::string(16, '\0')),
       "belong to no tensor"},
      {"trailing_bytes", st_file("{" + ok_entry + "}", data8 + "xx"), "belong to no tensor"},
      {"metadata_not_strings", st_file(R"({"__metadata__":{"k":1},)" + ok_entry + "}", data8), "__metadata__"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const std::string path = dir.file(std::string(c.name) + ".safetensors");
    write_bytes(path, c.bytes);
    std::string msg = error_of([&] { load_safetensors(path); });
    CHECK(contains(msg, path));
    CHECK(contains(msg, c.expect));
    CHECK(error_of([&] { read_safetensors_header(path); }) == msg);
  }
  // Tensor-level problems name the tensor too.
  std::string path = dir.file("size_mismatch.safetensors");
  CHECK(contains(error_of([&] { load_safetensors(path); }), "'a'"));
  CHECK(contains(error_of([&] { load_safetensors(dir.file("absent.safetensors")); }), "absent.safetensors"));

  // A good file cut short anywhere fails with the file name, never loads garbage.
  path = dir.file("good.safetensors");
  save_safetensors(path, {{"w", make_tensor({16, 16}, DType::f32, 3)}, {"b", make_tensor({16}, DType::bf16, 4)}});
  const std::string good = read_bytes(path);
  for (size_t cut : {size_t(0), size_t(5), size_t(8), size_t(40), good.size() / 2, good.size() - 1}) {
    INFO("cut at " << cut);
    std::string p = dir.file(fmt::format("cut{}.safetensors", cut));
    write_bytes(p, good.substr(0, cut));
    CHECK(contains(error_of([&] { load_safetensors(p); }), p));
  }
}

TEST_CASE("token shards: round trip, partial reads and corruption") {
  TempDir dir;
  const std::string path = dir.file("shard.bin");
  std::vector<uint16_t> toks(5000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = uint16_t((i * 7919) % 65536);
  write_token_shard(path, std::span<const uint16_t>(toks));
  CHECK(fs::file_size(path) == 1024 + 2 * toks.size());
  CHECK(read_token_shard_header(path) == int64_t(toks.size()));
  CHECK(read_token_shard(path) == toks);
  auto part = read_token_shard_range(path, 100, 50);
  CHECK(part == std::vector<uint16_t>(toks.begin() + 100, toks.begin() + 150));
  CHECK(contains(error_of([&] { read_token_shard_range(path, 4990, 20); }), path));

  // llm.c layout, byte for byte.
  std::string raw = read_bytes(path);
  int32_t hdr[3];
  std::memcpy(hdr, raw.data(), 12);
  CHECK(hdr[0] == 20240520);
  CHECK(hdr[1] == 1);
  CHECK(hdr[2] == 5000);

  std::vector<int32_t> ids = {50256, 0, 65535, 15496};
  write_token_shard(path, std::span<const int32_t>(ids));
  auto back = read_token_shard(path);
  CHECK(std::vector<int32_t>(back.begin(), back.end()) == ids);
  std::vector<int32_t> too_big = {1, 70000};
  CHECK_THROWS_AS(write_token_shard(path, std::span<const int32_t>(too_big)), std::invalid_argument);

  auto corrupt = [&](const char* name, const std::function<void(std::string&)>& edit, const char* expect) {
    INFO(name);
    std::string bytes = raw;
    edit(bytes);
    std::string p = dir.file(name);
    write_bytes(p, bytes);
    std::string msg = error_of([&] { read_token_shard(p); });
    CHECK(contains(msg, p));
    CHECK(contains(msg, expect));
  };
  corrupt("bad_magic.bin", [](std::string& b) { b[0] ^= 0x5a; }, "magic");
  corrupt("bad_version.bin", [](std::string& b) { b[4] = 2; }, "version");
  corrupt("truncated.bin", [](std::string& b) { b.resize(b.size() - 3); }, "truncated");
  corrupt("extra.bin", [](std::string& b) { b += "zz"; }, "bytes");
  corrupt("short.bin", [](std::string& b) { b.resize(100); }, "shorter");
  corrupt("negative.bin", [](std::string& b) { b[11] = char(0x80); }, "negative");
}

TEST_CASE("atomic file: replaces on commit, leaves the old file otherwise") {
  TempDir dir;
  const std::string path = dir.file("state.txt");
  write_file_atomic(path, "old contents");
  CHECK(read_bytes(path) == "old contents");
  {
    AtomicFile f(path);
    f.write("half-written new");
    CHECK(fs::exists(f.temp_path()));
    CHECK(read_bytes(path) == "old contents");
  }  // destroyed without commit
  CHECK(read_bytes(path) == "old contents");
  write_file_atomic(path, "new contents");
  CHECK(read_bytes(path) == "new contents");
  size_t n_files = 0;
  for (auto& e : fs::directory_iterator(dir.path)) n_files += e.is_regular_file();
  CHECK(n_files == 1);  // no temp files left
  CHECK(contains(error_of([&] { write_file_atomic(dir.file("no/such/dir/x"), "x"); }), "no/such/dir/x"));
}

// Forks a child that runs body(fd): it writes one byte to fd when under way, then works until killed.
// The parent waits for that byte, sleeps `delay`, kills the child with SIGKILL and returns its wait status.
static int run_until_killed(const std::function<void(int)>& body, useconds_t delay) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    try {
      body(fds[1]);
    } catch (...) {
    }
    ::_exit(3);
  }
  ::close(fds[1]);
  char c = 0;
  REQUIRE(::read(fds[0], &c, 1) == 1);
  ::close(fds[0]);
  ::usleep(delay);
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

TEST_CASE("atomic file: a writer killed with SIGKILL mid-save leaves the previous file loadable") {
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  Tensor old_w = make_tensor({64, 64}, DType::f32, 11);
  save_safetensors(path, {{"w", old_w}}, {{"step", "1"}});

  // (a) The child stops mid-write (temp file partly written, no rename) and is killed.
  {
    const int status = run_until_killed(
        [&](int fd) {
          AtomicFile f(path);
          std::string chunk(1 << 20, 'x');
          f.write(chunk);
          (void)!::write(fd, "w", 1);
          for (;;) {  // keep writing slowly until killed
            f.write(chunk);
            ::usleep(1000);
          }
        },
        20000);
    CHECK(WIFSIGNALED(status));
    auto f = load_safetensors(path);
    CHECK(same_bytes(f.at("w"), old_w));
    CHECK(f.header.metadata.at("step") == "1");
  }

  // (b) The child saves real checkpoints in a loop and is killed at an arbitrary moment: the file is
  // always one complete checkpoint, old or new.
  Tensor new_w = make_tensor({512, 1024}, DType::f32, 12);  // 2 MiB
  for (int round = 0; round < 5; ++round) {
    const int status = run_until_killed(
        [&](int fd) {
          (void)!::write(fd, "s", 1);
          for (;;) save_safetensors(path, {{"w", new_w}}, {{"step", "2"}});
        },
        useconds_t(3000 + 7000 * round));
    CHECK(WIFSIGNALED(status));
    auto f = load_safetensors(path);
    const std::string step = f.header.metadata.at("step");
    CHECK(same_bytes(f.at("w"), step == "1" ? old_w : new_w));
  }
}
