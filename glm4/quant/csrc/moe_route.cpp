// glm4::moe_route: a MoE router's choice of experts for a few tokens, glm4.layers.moe.route's arithmetic in one call.
//
// route() in torch is ~10 ops on a [N, 64] tensor (sigmoid, add, topk, gather, sum, divide, multiply): ~29 us a MoE
// layer of a batch-1 decode step on a Zen 4 (the ops run with caches the weights just swept), 2.5 % of the 697M MoE's
// step. Here: one loop per token. The router module (glm4.quant.fused) and the decode stack both call this op, so
// they agree to the bit; against route() in torch the indices are equal and the weights within a few ulp (exp and
// the normalizing sum are the same formulas in another rounding order).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// indices of the k largest of v[0..n), largest first, ties to the lower index (a stable descending sort; a NaN
// first, as torch.topk ranks it)
void top_indices(const float* v, int64_t n, int64_t k, std::vector<int64_t>& order, int64_t* out) {
  order.resize(size_t(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  const auto larger = [v](int64_t a, int64_t b) {
    const bool na = std::isnan(v[a]), nb = std::isnan(v[b]);
    if (na != nb) return na;
    return v[a] > v[b] || (!(v[b] > v[a]) && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), larger);
  std::copy(order.begin(), order.begin() + k, out);
}

// logits [N, E] float32 -> (indices [N, k] int64, weights [N, k] float32); see glm4.layers.moe.route
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                             int64_t top_k, int64_t n_group, int64_t topk_group, bool sigmoid,
                                             bool norm_topk_prob, double routed_scaling_factor) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              "moe_route: logits float32 [N, E] on the CPU");
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(0 < top_k && top_k <= E, "moe_route: top_k ", top_k, " must be in 1..", E);
  TORCH_CHECK(n_group > 0 && E % n_group == 0 && 0 < topk_group && topk_group <= n_group,
              "moe_route: need n_group | E and 0 < topk_group <= n_group");
  TORCH_CHECK(top_k <= topk_group * (E / n_group), "moe_route: top_k exceeds the experts of the kept groups");
  at::Tensor b;
  if (bias) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == E, "moe_route: correction bias [E]");
  }
  const at::Tensor lc = logits.contiguous();
  auto indices = at::empty({N, top_k}, logits.options().dtype(at::kLong));
  auto weights = at::empty({N, top_k}, logits.options());
  const float* lp = lc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  int64_t* ip = indices.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  const int64_t per_group = E / n_group, best_of_group = std::min<int64_t>(2, per_group);
  const bool limit_groups = n_group > 1 && topk_group < n_group;
  std::vector<float> scores(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
  std::vector<float> group_scores(static_cast<size_t>(n_group));
  std::vector<int64_t> order, kept(static_cast<size_t>(topk_group)), picked(2);
  const float scale = float(routed_scaling_factor);
  for (int64_t t = 0; t < N; ++t) {
    const float* l = lp + t * E;
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-l[e]));
    } else {
      const float m = *std::max_element(l, l + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += scores[e] = std::exp(l[e] - m);
      for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = bp ? scores[e] + bp[e] : scores[e];
    if (limit_groups) {  // a group's score: the sum of its two best choices; the topk_group best groups stay
      for (int64_t g = 0; g < n_group; ++g) {
        top_indices(choice.data() + g * per_group, per_group, best_of_group, order, picked.data());
        group_scores[g] = 0.f;
        for (int64_t j = 0; j < best_of_group; ++j) group_scores[g] += choice[g * per_group + picked[j]];
      }
      top_indices(group_scores.data(), n_group, topk_group, order, kept.data());
      std::vector<bool> keep(static_cast<size_t>(n_group), false);
      for (int64_t g : kept) keep[g] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per_group]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    int64_t* idx = ip + t * top_k;
    float* w = wp + t * top_k;
    top_indices(choice.data(), E, top_k, order, idx);
    float sum = 0.f;
    for (int64_t j = 0; j < top_k; ++j) sum += w[j] = scores[idx[j]];
    for (int64_t j = 0; j < top_k; ++j) w[j] = (norm_topk_prob ? w[j] / (sum + 1e-20f) : w[j]) * scale;
  }
  return {indices, weights};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm4, m) {
  m.def("moe_route(Tensor logits, Tensor? bias, int top_k, int n_group, int topk_group, bool sigmoid, "
        "bool norm_topk_prob, float routed_scaling_factor) -> (Tensor, Tensor)",
        &moe_route);
}
