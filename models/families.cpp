// The model families built into deeplora: one line per family (its entry comes from its own files).
// Registered when the registry is first used (models/causal_lm.cpp), so no static-initialization
// order or dropped object file of the static library can lose one.
#include "models/causal_lm.h"
#include "models/gpt_io.h"
#include "models/llama.h"

namespace deeplora {

std::vector<CausalLMFamily> builtin_families() {
  return {
      gpt2_family(),
      llama_family(), qwen2_family(), mistral_family(),  // models/llama.*
  };
}

}  // namespace deeplora
