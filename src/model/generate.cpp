#include "src/model/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "src/core/error.h"
#include "src/core/rng.h"

namespace tf {

std::vector<int32_t> generate_tokens(LlamaModel& model, const std::vector<int32_t>& prompt_ids, int max_new,
                                     std::span<const int32_t> stop_ids, int64_t n_tokens, float temperature,
                                     uint64_t seed, GenerateStats* stats) {
  TF_CHECK(!prompt_ids.empty(), "generation needs a non-empty prompt");
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::time_point first;
  const int vocab = model.config().vocab;
  TF_CHECK(n_tokens >= 1 && n_tokens <= vocab, "generation: the tokenizer's ", n_tokens,
           " tokens do not fit the model's vocabulary of ", vocab);
  KvCache cache = model.make_kv_cache(int64_t(prompt_ids.size()) + max_new);
  std::vector<float> logits(size_t(vocab), 0.0f);
  for (size_t i = 0; i < prompt_ids.size(); i += size_t(model.max_tokens())) {
    const int64_t n = std::min<int64_t>(model.max_tokens(), int64_t(prompt_ids.size() - i));
    model.decode(cache, prompt_ids.data() + i, n, logits.data());
  }
  const auto tokens_end = logits.begin() + n_tokens;
  std::vector<int32_t> out;
  const Philox rng(seed, 0x5a3b1e);
  for (int t = 0; t < max_new; ++t) {
    int32_t next = int32_t(std::max_element(logits.begin(), tokens_end) - logits.begin());
    if (temperature > 0) {
      // Sample from softmax(logits / T) by inverting the cumulative distribution.
      const float mx = logits[size_t(next)];
      double sum = 0;
      for (auto l = logits.begin(); l != tokens_end; ++l) sum += (*l = std::exp((*l - mx) / temperature));
      double u = double(rng.uniform(uint64_t(t))) * sum;
      for (int32_t i = 0; i < int32_t(n_tokens); ++i)
        if ((u -= logits[size_t(i)]) <= 0) {
          next = i;
          break;
        }
    }
    out.push_back(next);
    if (t == 0) first = Clock::now();
    if (std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end() || t + 1 == max_new) break;
    model.decode(cache, &next, 1, logits.data());
  }
  if (stats) {
    const auto secs = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
    stats->prompt_tokens = int64_t(prompt_ids.size());
    stats->new_tokens = int64_t(out.size());
    stats->prompt_s = out.empty() ? secs(Clock::now() - start) : secs(first - start);
    stats->decode_s = out.empty() ? 0 : secs(Clock::now() - first);
  }
  return out;
}

}  // namespace tf
