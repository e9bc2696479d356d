// torch.classes.glm4.DecodeStack: a decode step through every decoder layer and the final norm in one call.
//
// A batch-1 decode step of a small model makes ~70 glm4 ops and ~700 torch calls, with Python module calls between
// them: ~2 ms of the 697M MoE's 9 ms step (Zen 3) ran outside the kernels. This class holds the layers' tensors
// (what glm4.quant.decode_stack reads from the modules) and runs the same ops with the same arguments in the same
// order as glm.py / glm4.py / glm4_moe.py's layers with glm4's kernels swapped in, so its output equals theirs bit
// for bit (tests/test_decode_stack.py); only the Python between the ops is gone.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

using Opt = std::optional<at::Tensor>;

// glm4's own ops, found once by name and called through the dispatcher as Python calls them
template <class Sig>
c10::TypedOperatorHandle<Sig> glm4_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w) {
  static auto op = glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("glm4::dense_mm");
  return op.call(x, w);
}

at::Tensor quant_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const Opt& mins, int64_t bits,
                    int64_t group, int64_t zero_point, int64_t act_bits) {
  static auto op = glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, int64_t,
                                      int64_t, int64_t, bool, int64_t)>("glm4::quant_mm");
  return op.call(x, q, scales, mins, bits, group, zero_point, true, act_bits);
}

at::Tensor kquant_mm(const at::Tensor& x, const at::Tensor& blocks, int64_t K, int64_t type, int64_t act_bits) {
  static auto op =
      glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t)>("glm4::kquant_mm");
  return op.call(x, blocks, K, type, act_bits);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto op = glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("glm4::rms_norm");
  return op.call(x, w, eps);
}

at::Tensor decode_qkv_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                                const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                                int64_t n_heads) {
  static auto op = glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t)>("glm4::decode_qkv_attention");
  return op.call(qkv, cos, sin, interleaved, k, v, slots, tables, lens, block_size, n_heads);
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  static auto op =
      glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("glm4::rope");
  return op.call(x, cos, sin, interleaved);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                            const at::Tensor& lens, int64_t block_size) {
  static auto op = glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, int64_t)>("glm4::decode_attention");
  return op.call(q, k, v, tables, lens, block_size);
}

void dequantize_rows(const at::Tensor& q, const at::Tensor& scales, const Opt& mins, int64_t bits, int64_t group,
                     int64_t zero_point, at::Tensor& out) {
  static auto op = glm4_op<void(const at::Tensor&, const at::Tensor&, const Opt&, int64_t, int64_t, int64_t, int64_t,
                                at::Tensor&)>("glm4::dequantize_rows");
  op.call(q, scales, mins, bits, group, zero_point, 0, out);
}

void kquant_dequantize_rows(const at::Tensor& blocks, int64_t type, at::Tensor& out) {
  static auto op = glm4_op<void(const at::Tensor&, int64_t, int64_t, at::Tensor&)>("glm4::kquant_dequantize_rows");
  op.call(blocks, type, 0, out);
}

at::Tensor row_argmax(const at::Tensor& x) {
  static auto op = glm4_op<at::Tensor(const at::Tensor&)>("glm4::argmax");
  return op.call(x);
}

// glm4's streaming kernels read fp32 activations and write fp32: bf16 ones are widened for them, their outputs
// rounded back, as the modules' .float() / .to(dtype) do
at::Tensor as_fp32(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }
at::Tensor as_dtype_of(const at::Tensor& y, const at::Tensor& x) {
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// One projection as its module runs it for a few tokens: FloatLinear (kind 0: dense_mm over the stored weight),
// QuantLinear (1: quant_mm over glm4's codes), KQuantLinear (2: kquant_mm over GGUF blocks); then + bias (fp32).
struct Linear {
  int64_t kind = 0;
  at::Tensor w, scales;
  Opt mins, bias;
  int64_t bits = 0, group = 0, zero_point = 0, in_features = 0, ggml_type = 0, act_bits = 0;

  // x [..., K] fp32 or bf16 -> [..., N] in x's dtype
  at::Tensor operator()(const at::Tensor& x) const {
    const at::Tensor xf = as_fp32(x);
    at::Tensor y = kind == 0   ? dense_mm(xf, w)
                   : kind == 1 ? quant_mm(xf, w, scales, mins, bits, group, zero_point, act_bits)
                               : kquant_mm(xf, w, in_features, ggml_type, act_bits);
    if (bias) y = y + *bias;
    return as_dtype_of(y, x);
  }
};

struct Norm {
  at::Tensor w;
  double eps = 0;
  at::Tensor operator()(const at::Tensor& x) const { return rms_norm(x, w, eps); }
};

// glm4_moe's routed experts: the router (glm4::moe_route's arguments) and expert_glu's
struct Moe {
  at::Tensor router;
  Opt correction_bias;
  int64_t top_k = 0, n_group = 1, topk_group = 1;
  bool sigmoid = true, norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  at::Tensor gu, dn;
  Opt gu_scales, gu_mins, dn_scales, dn_mins;
  std::vector<int64_t> ints;  // gu bits, group, zero point; dn bits, group, zero point; gu / dn ggml type; act bits

  // the router's choice: logits [N, E] fp32 -> (indices [N, k], weights [N, k]) by glm4::moe_route, the op the
  // router module calls (glm4.quant.fused.moe_route)
  std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& logits) const {
    static auto op = glm4_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, int64_t, int64_t,
                                                                 int64_t, bool, bool, double)>("glm4::moe_route");
    return op.call(logits, correction_bias, top_k, n_group, topk_group, sigmoid, norm_topk_prob,
                   routed_scaling_factor);
  }

  // Glm4MoeMoE's routed part: h [..., H] -> [..., H]
  at::Tensor operator()(const at::Tensor& h) const {
    static auto glu = glm4_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const Opt&, const Opt&, int64_t, int64_t, int64_t, const at::Tensor&,
                                         const Opt&, const Opt&, int64_t, int64_t, int64_t, int64_t, int64_t,
                                         int64_t)>("glm4::expert_glu");
    const at::Tensor flat = h.reshape({-1, h.size(-1)});
    const at::Tensor xf = as_fp32(flat);
    const auto [indices, weights] = route(dense_mm(xf.contiguous(), router));
    const auto& i = ints;
    const at::Tensor y = glu.call(xf, indices, weights, gu, gu_scales, gu_mins, i[0], i[1], i[2], dn, dn_scales,
                                  dn_mins, i[3], i[4], i[5], i[6], i[7], i[8]);
    return as_dtype_of(y, h).view_as(h);
  }
};

struct Layer {
  Norm input, post_attention, post_self_attn, post_mlp;  // the last two: glm4's sandwich norms (else w undefined)
  Norm q_norm, k_norm;  // GLM-4.5's per-head q / k norms before RoPE (else w undefined)
  int64_t qkv = -1, o = -1, n_heads = 0;
  int64_t q = -1, k = -1, v = -1;  // projections of their own (qkv -1: one GGUF file's q4_K q / k and q6_K v)
  int64_t gate_up = -1, down = -1;  // the dense MLP, or a MoE layer's shared experts (-1: none)
  int64_t gate = -1, up = -1;       // gate and up of their own (gate_up -1 with down set)
  std::optional<Moe> moe;
};

struct DecodeStack : torch::CustomClassHolder {
  std::vector<Linear> linears;
  std::vector<Layer> layers;
  Norm final_norm;
  bool complete = false;  // set_final_norm was called (the last step of building)
  int64_t embedding = -1, head = -1;  // linears holding the token table and the output head (set_ends)
  bool bf16 = false;                  // the activations' dtype: bf16, else fp32

  // ints: bits, group, zero point, in_features, ggml type, activation bits
  int64_t add_linear(int64_t kind, at::Tensor w, Opt scales, Opt mins, Opt bias, std::vector<int64_t> ints) {
    TORCH_CHECK(0 <= kind && kind <= 2 && ints.size() == 6, "DecodeStack.add_linear: kind 0..2 and 6 ints");
    TORCH_CHECK(kind != 1 || scales, "DecodeStack.add_linear: codes need scales");
    Linear l;
    l.kind = kind, l.w = w, l.scales = scales ? *scales : at::Tensor(), l.mins = mins, l.bias = bias;
    l.bits = ints[0], l.group = ints[1], l.zero_point = ints[2], l.in_features = ints[3], l.ggml_type = ints[4];
    l.act_bits = ints[5];
    linears.push_back(l);
    return int64_t(linears.size()) - 1;
  }

  // norms: input, post_attention, and for glm4's layers post_self_attn, post_mlp; ids: qkv, o, n_heads, gate_up,
  // down, q, k, v, gate, up (-1: none; qkv or q / k / v, and gate_up or gate / up where down is set)
  void add_layer(std::vector<at::Tensor> norms, std::vector<double> eps, std::vector<int64_t> ids) {
    TORCH_CHECK((norms.size() == 2 || norms.size() == 4) && eps.size() == norms.size() && ids.size() == 10,
                "DecodeStack.add_layer: 2 or 4 norms with their eps, 10 ids");
    const auto n = int64_t(linears.size());
    for (size_t j = 0; j < ids.size(); ++j)
      TORCH_CHECK(j == 2 || (-1 <= ids[j] && ids[j] < n), "DecodeStack.add_layer: no linear ", ids[j]);
    TORCH_CHECK(ids[1] >= 0 && (ids[0] >= 0 || (ids[5] >= 0 && ids[6] >= 0 && ids[7] >= 0)),
                "DecodeStack.add_layer: o and qkv or q / k / v");
    TORCH_CHECK(ids[4] < 0 || ids[3] >= 0 || (ids[8] >= 0 && ids[9] >= 0), "DecodeStack.add_layer: gate / up");
    Layer l;
    l.input = {norms[0], eps[0]}, l.post_attention = {norms[1], eps[1]};
    if (norms.size() == 4) l.post_self_attn = {norms[2], eps[2]}, l.post_mlp = {norms[3], eps[3]};
    l.qkv = ids[0], l.o = ids[1], l.n_heads = ids[2], l.gate_up = ids[3], l.down = ids[4];
    l.q = ids[5], l.k = ids[6], l.v = ids[7], l.gate = ids[8], l.up = ids[9];
    layers.push_back(l);
  }

  // the last layer's routed experts. route: top_k, n_group, topk_group, sigmoid (else softmax), norm_topk_prob
  void set_moe(at::Tensor router, Opt correction_bias, std::vector<int64_t> route, double routed_scaling_factor,
               at::Tensor gu, Opt gu_scales, Opt gu_mins, at::Tensor dn, Opt dn_scales, Opt dn_mins,
               std::vector<int64_t> ints) {
    TORCH_CHECK(!layers.empty() && route.size() == 5 && ints.size() == 9,
                "DecodeStack.set_moe: a layer first, 5 + 9 ints");
    Moe m;
    m.router = router, m.correction_bias = correction_bias;
    m.top_k = route[0], m.n_group = route[1], m.topk_group = route[2], m.sigmoid = route[3] != 0;
    m.norm_topk_prob = route[4] != 0, m.routed_scaling_factor = routed_scaling_factor;
    m.gu = gu, m.gu_scales = gu_scales, m.gu_mins = gu_mins, m.dn = dn, m.dn_scales = dn_scales, m.dn_mins = dn_mins;
    m.ints = ints;
    layers.back().moe = m;
  }

  // the last layer's per-head q / k norms
  void set_qk_norm(at::Tensor q_w, double q_eps, at::Tensor k_w, double k_eps) {
    TORCH_CHECK(!layers.empty(), "DecodeStack.set_qk_norm: a layer first");
    layers.back().q_norm = {q_w, q_eps}, layers.back().k_norm = {k_w, k_eps};
  }

  // none: the model's last layer is its output (ChatGLM without post_layer_norm)
  void set_final_norm(std::optional<at::Tensor> w, double eps) {
    final_norm = {w ? *w : at::Tensor(), eps};
    complete = true;
  }

  // the token table (a linear's tensors as its embedding module reads them: a float table [V, H], glm4's codes or
  // GGUF blocks), the output head, and the activations' dtype: what `greedy` needs beyond the layers
  void set_ends(int64_t embedding_id, int64_t head_id, bool bf16_activations) {
    const auto n = int64_t(linears.size());
    TORCH_CHECK(0 <= embedding_id && embedding_id < n && 0 <= head_id && head_id < n, "DecodeStack.set_ends: ids");
    embedding = embedding_id, head = head_id, bf16 = bf16_activations;
  }

  // ids [N] int64 -> their rows [N, H] in the activations' dtype, as the embedding module looks them up
  // (F.embedding, or StreamingLinear.lookup's dequantize_rows over the rows' codes / blocks, then the cast)
  at::Tensor embed(const at::Tensor& ids) const {
    const Linear& t = linears[embedding];
    at::Tensor rows;
    if (t.kind == 0) {
      rows = t.w.index_select(0, ids);
    } else {
      rows = at::empty({ids.size(0), t.in_features}, t.w.options().dtype(at::kFloat));
      if (t.kind == 1)
        dequantize_rows(t.w.index_select(0, ids), t.scales.index_select(0, ids),
                        t.mins ? Opt(t.mins->index_select(0, ids)) : Opt(), t.bits, t.group, t.zero_point, rows);
      else
        kquant_dequantize_rows(t.w.index_select(0, ids), t.ggml_type, rows);
    }
    return rows.to(bf16 ? at::kBFloat16 : at::kFloat);
  }

  // attention of a decode-only step over the normed input h [B, T, H], layer i of the cache k / v [L, S, Hkv, D]:
  // from a fused projection, one op (RoPE, cache write, attention); with q / k norms or separate q / k / v
  // projections what GlmAttention and PagedAttention.attend do (project or split, norms, RoPE, the cache write as
  // index_copy_, decode_attention)
  at::Tensor attend(const Layer& l, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                    bool interleaved, const at::Tensor& k, const at::Tensor& v, int64_t i, const at::Tensor& slots,
                    const at::Tensor& tables, const at::Tensor& lens, int64_t block_size) const {
    const at::Tensor kc = k.select(0, i), vc = v.select(0, i);
    const int64_t B = h.size(0), T = h.size(1), Hq = l.n_heads, Hkv = k.size(2), D = k.size(3);
    at::Tensor q, kr, vr;
    if (l.qkv >= 0) {
      const at::Tensor qkv = linears[l.qkv](h);
      if (!l.q_norm.w.defined())
        return decode_qkv_attention(qkv, cos, sin, interleaved, kc, vc, slots, tables, lens, block_size, l.n_heads);
      const auto parts = qkv.split_with_sizes({Hq * D, Hkv * D, Hkv * D}, -1);
      q = parts[0], kr = parts[1], vr = parts[2];
    } else {
      q = linears[l.q](h), kr = linears[l.k](h), vr = linears[l.v](h);
    }
    q = q.reshape({B, T, Hq, D}), kr = kr.reshape({B, T, Hkv, D}), vr = vr.reshape({B, T, Hkv, D});
    if (l.q_norm.w.defined()) q = l.q_norm(q), kr = l.k_norm(kr);
    q = rope(q, cos, sin, interleaved), kr = rope(kr, cos, sin, interleaved);
    kc.index_copy_(0, slots, kr.select(0, 0).to(kc.scalar_type()));
    vc.index_copy_(0, slots, vr.select(0, 0).to(vc.scalar_type()));
    return decode_attention(q.select(0, 0), kc, vc, tables, lens, block_size).unsqueeze(0).reshape({B, T, Hq * D});
  }

  // h [B, T, H] embedded tokens (B T <= 16; fp32, or bf16 where the model computes in bf16), cos / sin the step's
  // RoPE tables, k / v the paged cache [L, S, Hkv, D], slots / tables / lens / block_size the decode-only step's
  // metadata (glm4.layers.paged_attention) -> the final-norm hidden states [B, T, H]
  at::Tensor run(at::Tensor h, at::Tensor cos, at::Tensor sin, bool interleaved, at::Tensor k, at::Tensor v,
                 at::Tensor slots, at::Tensor tables, at::Tensor lens, int64_t block_size) {
    TORCH_CHECK(complete && k.size(0) >= int64_t(layers.size()), "DecodeStack.run: incomplete stack");
    at::Tensor x = h;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& l = layers[i];
      at::Tensor a = linears[l.o](
          attend(l, l.input(x), cos, sin, interleaved, k, v, int64_t(i), slots, tables, lens, block_size));
      x = x + (l.post_self_attn.w.defined() ? l.post_self_attn(a) : a);
      const at::Tensor hn = l.post_attention(x);
      at::Tensor m = l.moe ? (*l.moe)(hn) : at::Tensor();
      if (l.down >= 0) {  // dense SwiGLU (or the shared experts): silu(gate) * up, then down
        at::Tensor d;
        if (l.gate_up >= 0) {
          const auto gate_up = linears[l.gate_up](hn).chunk(2, -1);
          d = linears[l.down](at::silu(gate_up[0]) * gate_up[1]);
        } else {
          d = linears[l.down](at::silu(linears[l.gate](hn)) * linears[l.up](hn));
        }
        m = m.defined() ? m + d : d;
      }
      TORCH_CHECK(m.defined(), "DecodeStack.run: layer ", i, " has neither an MLP nor experts");
      x = x + (l.post_mlp.w.defined() ? l.post_mlp(m) : m);
    }
    return final_norm.w.defined() ? final_norm(x) : x;
  }

  // A greedy decode-only step end to end: ids [N] int64 (a token of each sequence), positions [N] int64, cos_table /
  // sin_table [P, R] the RoPE tables' rows for positions 0..P-1 (glm4.layers.rope.Rope.table), the cache and the
  // step's metadata as for `run` -> the next tokens int64 [N]: argmax over the first `vocab` logits of each row.
  // The same ops as the engine's step through the modules (embedding, the tables' rows, `run`, the head module,
  // the sampler's argmax), so the same tokens.
  at::Tensor greedy(at::Tensor ids, at::Tensor positions, at::Tensor cos_table, at::Tensor sin_table,
                    bool interleaved, at::Tensor k, at::Tensor v, at::Tensor slots, at::Tensor tables,
                    at::Tensor lens, int64_t block_size, int64_t vocab) {
    TORCH_CHECK(embedding >= 0 && ids.dim() == 1 && positions.sizes() == ids.sizes() && cos_table.dim() == 2 &&
                    sin_table.sizes() == cos_table.sizes(),
                "DecodeStack.greedy: set_ends first; ids, positions [N]; tables [P, R]");
    const int64_t N = ids.size(0), R = cos_table.size(1);
    const at::Tensor h = embed(ids).view({1, N, -1});
    const at::Tensor cos = cos_table.index_select(0, positions).view({1, N, 1, R});
    const at::Tensor sin = sin_table.index_select(0, positions).view({1, N, 1, R});
    const at::Tensor x = run(h, cos, sin, interleaved, k, v, slots, tables, lens, block_size);
    at::Tensor logits = linears[head](x.view({N, x.size(2)}));
    if (logits.scalar_type() != at::kFloat) logits = logits.to(at::kFloat);
    return row_argmax(logits.size(1) > vocab ? logits.narrow(1, 0, vocab) : logits);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm4, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<>())
      .def("add_linear", &DecodeStack::add_linear)
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_moe", &DecodeStack::set_moe)
      .def("set_qk_norm", &DecodeStack::set_qk_norm)
      .def("set_final_norm", &DecodeStack::set_final_norm)
      .def("set_ends", &DecodeStack::set_ends)
      .def("run", &DecodeStack::run)
      .def("greedy", &DecodeStack::greedy);
}
