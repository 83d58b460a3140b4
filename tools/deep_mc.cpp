// deep_mc: deep matrix completion, original vs compressed deep factorization (models/deep_mc.h).
// Prints progress every --log-every iterations and one JSON summary line; see --help.
#include <fmt/format.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "models/deep_mc.h"

int main(int argc, char** argv) {
  using namespace deeplora::deep_mc;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const std::string& a : args)
    if (a == "--help" || a == "-h") {
      fmt::print("{}\n", usage());
      return 0;
    }
  try {
    run(parse_args(args), stdout);
    return 0;
  } catch (const std::invalid_argument& e) {
    fmt::print(stderr, "deep_mc: error: {}\n", e.what());
    return 2;
  } catch (const Diverged& e) {
    fmt::print(stderr, "deep_mc: diverged: {}\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    fmt::print(stderr, "deep_mc: error: {}\n", e.what());
    return 1;
  }
}
