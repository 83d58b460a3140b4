// tokenize: text files -> llm.c token shards (train/val) with the GPT-2 tokenizer. Each file is one
// document, preceded by <|endoftext|> as llm.c's data scripts do; the first --val-fraction of the
// token stream goes to the val shards.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "models/tokenizer.h"
#include "runtime/io/token_shards.h"

using namespace deeplora;

namespace {

constexpr const char* kUsage = R"(usage: tokenize --vocab VOCAB.json --merges MERGES.txt [options] FILE...

Tokenizes text files with GPT-2's byte-level BPE into llm.c token shards (256 x int32 header,
magic 20240520, version 1, uint16 tokens). Each file is one document, preceded by <|endoftext|>.

options:
  --vocab PATH          vocab.json (token -> id)
  --merges PATH         merges.txt (ranked merges)
  --out-dir DIR         where the shards go (default: .; created if missing)
  --name NAME           shard file prefix: NAME_{train,val}_000000.bin (default: data)
  --val-fraction F      fraction of the token stream, from its start, for val shards (default: 0.05)
  --shard-tokens N      tokens per shard (default: 100000000)
  --threads N           tokenizer threads, at most 1024 (default 0: all cores)
  --help                this text

Invalid UTF-8 in the input is replaced by U+FFFD (counted in the summary).
)";

struct Args {
  std::string vocab, merges, out_dir = ".", name = "data";
  double val_fraction = 0.05;
  int64_t shard_tokens = 100000000;
  int threads = 0;
  std::vector<std::string> files;
  bool help = false;
};

template <class T> T parse_number(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    T x;
    if constexpr (std::is_floating_point_v<T>) x = T(std::stod(v, &used));
    else x = T(std::stoll(v, &used));
    if (used != v.size()) throw std::invalid_argument("trailing characters");
    return x;
  } catch (const std::exception&) {
    throw std::invalid_argument(fmt::format("{} expects a number, got '{}'", flag, v));
  }
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(fmt::format("{} needs a value (see --help)", f));
      return argv[++i];
    };
    if (f == "--help" || f == "-h") a.help = true;
    else if (f == "--vocab") a.vocab = value();
    else if (f == "--merges") a.merges = value();
    else if (f == "--out-dir") a.out_dir = value();
    else if (f == "--name") a.name = value();
    else if (f == "--val-fraction") a.val_fraction = parse_number<double>(f, value());
    else if (f == "--shard-tokens") a.shard_tokens = parse_number<int64_t>(f, value());
    else if (f == "--threads") a.threads = parse_number<int>(f, value());
    else if (f.starts_with("--")) throw std::invalid_argument(fmt::format("unknown flag {} (see --help)", f));
    else a.files.push_back(f);
  }
  if (a.help) return a;
  if (a.vocab.empty() || a.merges.empty()) throw std::invalid_argument("--vocab and --merges are required (see --help)");
  if (a.files.empty()) throw std::invalid_argument("no input files (see --help)");
  if (!(a.val_fraction >= 0.0 && a.val_fraction < 1.0))
    throw std::invalid_argument(fmt::format("--val-fraction {} is outside [0, 1)", a.val_fraction));
  if (a.shard_tokens < 1 || a.shard_tokens > INT32_MAX)
    throw std::invalid_argument(fmt::format("--shard-tokens {} is outside [1, {}]", a.shard_tokens, INT32_MAX));
  if (a.threads < 0 || a.threads > 1024)
    throw std::invalid_argument(fmt::format("--threads {} is outside [0, 1024] (0: all cores)", a.threads));
  if (a.name.empty() || a.name.find('/') != std::string::npos)
    throw std::invalid_argument(fmt::format("--name '{}' must be a non-empty file prefix without '/'", a.name));
  for (const std::string& f : a.files) {
    std::error_code ec;
    const auto st = std::filesystem::status(f, ec);
    if (!std::filesystem::exists(st)) throw std::invalid_argument(fmt::format("{}: no such file", f));
    if (std::filesystem::is_directory(st))
      throw std::invalid_argument(fmt::format("{}: is a directory; give the files in it (e.g. {}/*.txt)", f, f));
  }
  if (std::filesystem::exists(a.out_dir) && !std::filesystem::is_directory(a.out_dir))
    throw std::invalid_argument(fmt::format("--out-dir {}: exists and is not a directory", a.out_dir));
  return a;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("{}: cannot open", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw std::runtime_error(fmt::format("{}: read error", path));
  return ss.str();
}

struct Doc {
  std::vector<uint16_t> tokens;
  size_t bytes = 0, replaced = 0;
  std::string error;
};

// Writes tokens [begin, end) as shards of at most shard_tokens; returns the paths written.
std::vector<std::string> write_shards(const Args& a, const std::string& split, const std::vector<uint16_t>& all,
                                      size_t begin, size_t end) {
  std::vector<std::string> paths;
  for (size_t s = begin, k = 0; s < end; s += size_t(a.shard_tokens), ++k) {
    size_t e = std::min(end, s + size_t(a.shard_tokens));
    std::string path = fmt::format("{}/{}_{}_{:06d}.bin", a.out_dir, a.name, split, k);
    write_token_shard(path, std::span<const uint16_t>(all.data() + s, e - s));
    paths.push_back(path);
  }
  return paths;
}

int run(const Args& a) {
  auto t0 = std::chrono::steady_clock::now();
  Tokenizer tok(a.vocab, a.merges);
  if (tok.eot_id() < 0) throw std::runtime_error(fmt::format("{}: no <|endoftext|> token to separate documents", a.vocab));
  if (tok.vocab_size() > 65536)
    throw std::runtime_error(fmt::format("{}: vocab of {} ids does not fit llm.c's uint16 shards", a.vocab, tok.vocab_size()));

  std::vector<Doc> docs(a.files.size());
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < docs.size();) {
      try {
        std::string text = read_file(a.files[i]);
        docs[i].bytes = text.size();
        text = sanitize_utf8(text, &docs[i].replaced);
        std::vector<int32_t> ids{tok.eot_id()};
        tok.encode_append(text, ids);
        docs[i].tokens.assign(ids.begin(), ids.end());  // ids < 65536 checked above
      } catch (const std::exception& e) {
        docs[i].error = e.what();
      }
    }
  };
  unsigned n_threads = a.threads > 0 ? unsigned(a.threads) : std::max(1u, std::thread::hardware_concurrency());
  n_threads = std::min<unsigned>(n_threads, unsigned(docs.size()));
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < n_threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();

  std::vector<uint16_t> all;
  size_t bytes = 0, replaced = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    if (!docs[i].error.empty()) throw std::runtime_error(docs[i].error);
    bytes += docs[i].bytes;
    replaced += docs[i].replaced;
    all.insert(all.end(), docs[i].tokens.begin(), docs[i].tokens.end());
    std::vector<uint16_t>().swap(docs[i].tokens);
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::filesystem::create_directories(a.out_dir);
  size_t n_val = size_t(std::llround(a.val_fraction * double(all.size())));
  if (a.val_fraction > 0 && n_val == 0 && all.size() > 1) n_val = 1;
  auto val = write_shards(a, "val", all, 0, n_val);
  auto train = write_shards(a, "train", all, n_val, all.size());

  fmt::print("tokenized {} files, {} bytes -> {} tokens ({:.2f} bytes/token) in {:.2f} s ({:.1f} MB/s, {} threads)\n",
             a.files.size(), bytes, all.size(), all.empty() ? 0.0 : double(bytes) / double(all.size()), secs,
             double(bytes) / std::max(secs, 1e-9) / 1e6, n_threads);
  if (replaced) fmt::print("replaced {} invalid UTF-8 sequences with U+FFFD\n", replaced);
  fmt::print("val:   {} tokens in {} shards{}{}\n", n_val, val.size(), val.empty() ? "" : ", first ", val.empty() ? "" : val.front());
  fmt::print("train: {} tokens in {} shards{}{}\n", all.size() - n_val, train.size(), train.empty() ? "" : ", first ",
             train.empty() ? "" : train.front());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse_args(argc, argv);
    if (a.help) {
      fmt::print("{}", kUsage);
      return 0;
    }
    return run(a);
  } catch (const std::exception& e) {
    fmt::print(stderr, "tokenize: error: {}\n", e.what());
    return 1;
  }
}
