// JSON Lines: one object per line, blank lines skipped, every parse error naming the file and line.
#pragma once
#include <fmt/format.h>

#include <cstdint>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace deeplora {

// Calls fn(value, line) for each non-blank line of path (1-based line numbers); fn returns false to
// stop early. Returns the number of values read. Throws std::runtime_error "path: cannot open" or
// "path:line: not valid JSON: ...".
inline int64_t for_each_jsonl(const std::string& path, const std::function<bool(const nlohmann::json&, int64_t)>& fn) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open", path));
  std::string line;
  int64_t lineno = 0, n = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}:{}: not valid JSON: {}", path, lineno, e.what()));
    }
    ++n;
    if (!fn(j, lineno)) break;
  }
  return n;
}

}  // namespace deeplora
