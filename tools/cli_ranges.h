// CLI11 validators for real-valued flags: finite, within [lo, hi] (either end may be open), and a message that
// prints the range as written ("(0, 1e+06]"), not CLI::Range's fixed six decimals ("0.000000").
#pragma once
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <string>

namespace deeplora::cli {

inline CLI::Validator real_range(double lo, double hi, bool open_lo = false, bool open_hi = false) {
  const std::string range = fmt::format("{}{:g}, {:g}{}", open_lo ? "(" : "[", lo, hi, open_hi ? ")" : "]");
  return CLI::Validator(
      [=](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("'{}' is not a number", s);
        if (!std::isfinite(v) || v < lo || v > hi || (open_lo && v == lo) || (open_hi && v == hi))
          return fmt::format("value {} is outside {}", s, range);
        return "";
      },
      "REAL in " + range);
}

// (0, hi]: a positive real.
inline CLI::Validator positive(double hi) { return real_range(0, hi, true); }

}  // namespace deeplora::cli
