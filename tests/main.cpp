// doctest's main for the whole suite. Without a usable GPU the GPU test cases are excluded before
// the run (a -tce filter added to the command line's), so doctest's summary counts them as skipped,
// not passed, and one line says why.
//
// A GPU test case is one whose name contains "CUDA", "cuda" or "GPU" ("deeplora_product on CUDA:
// ...", "linalg cuda: ...", "... CPU vs CUDA ...", "dist: ... on two GPUs ..."): every case that needs
// a GPU is named so, and no CPU case is (a case with a CPU part and a GPU part is two cases). The
// tools/device_check.sh filters (*CUDA*, *cuda*, *GPU*) select the same cases on the GPU machine.
// Each GPU case still returns early without a GPU when run some other way.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cctype>
#include <cstdio>
#include <string>

#include "runtime/device.h"

namespace {

// doctest matches names case-insensitively (unless --case-sensitive: hence both spellings).
constexpr const char* kGpuCases = "*CUDA*,*cuda*,*GPU*,*gpu*";

bool is_gpu_case(const char* name) {
  std::string n(name);
  for (char& c : n) c = char(std::tolower(static_cast<unsigned char>(c)));
  return n.find("cuda") != std::string::npos || n.find("gpu") != std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  doctest::Context ctx;
  ctx.applyCommandLine(argc, argv);
  if (!deeplora::cuda_available()) {
    int n = 0;
    for (const auto& tc : doctest::detail::getRegisteredTests()) n += is_gpu_case(tc.m_name) ? 1 : 0;
    if (n > 0) {
      ctx.addFilter("test-case-exclude", kGpuCases);
      std::printf("[deeplora] skipping %d GPU test cases: %s\n", n, deeplora::cuda_unavailable_reason().c_str());
      std::fflush(stdout);
    }
  }
  return ctx.run();
}
