// Fused training kernels for the model's memory-bound steps on the CPU (nanomoe/ops.py wraps them
// in autograd Functions and keeps a PyTorch path for everything else):
//
// - cross entropy of (N, V) logits: one pass for the row maxima and logsumexps, the loss, and in
//   the backward one pass writing softmax - one-hot straight in the logits' dtype. PyTorch's path
//   (fp32 copy of the logits, log_softmax, its saved (N, V) output, a zero-filled gradient, the
//   log_softmax backward, the cast back) moves ~6x the bytes: ~35 ms of a 0.35 s tiny-model step.
// - rotary embeddings: out = x cos + rotate_half(x) sin per row, in fp32 with one rounding, and the
//   inverse rotation for the backward (the Python version is 5 kernels each way, with a cat); and
//   the attention heads out of the fused qkv projection (split, rotation, transpose to (B, H, T, d))
//   as one pass each way.
// - causal softmax of attention scores: scale, mask and softmax in one pass over the rows' visible
//   half (the masked half is written as zeros, never exponentiated), and its backward likewise;
//   PyTorch adds a (T, T) mask to the scores, then runs softmax over every entry.
// - RMSNorm: rstd and the normalized rows in one pass; the backward (grad x and grad weight) in one
//   pass over the rows, where PyTorch's decomposition takes ~10 elementwise kernels each way.
// - SwiGLU over [gate | up] rows, the dense feed-forward's activation: silu(g) * u in one pass, the
//   backward in one pass writing [dg | du] (recomputing silu, saving only the input).
// All read and write fp32 or bf16 (raw bits) and compute in fp32.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with at::Tensor casters, without torch/extension.h's C++ frontend
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"
#include "tensor_types.h"

namespace {

using at::Tensor;
using namespace nanomoe_simd;
using namespace nanomoe_types;

void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 tensors only, got ", t.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// cross entropy

// max of a row, or NaN if the row holds a NaN (a NaN must reach the loss, never be clamped away)
template <typename T>
float row_max(const T* x, int64_t V) {
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if defined(NANOMOE_AVX512)
  __m512 topv = _mm512_set1_ps(top);
  __mmask16 unordered = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = load16(x + i, 0xffff);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    topv = _mm512_max_ps(topv, v);
  }
  top = _mm512_reduce_max_ps(topv);
  nan = unordered != 0;
#endif
  for (; i < V; ++i) {
    const float v = load(x, i);
    nan |= std::isnan(v);
    top = std::max(top, v);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : top;
}

// sum of e^(x - shift) over a row
template <typename T>
float row_sum_exp(const T* x, int64_t V, float shift) {
  float total = 0.f;
  int64_t i = 0;
#if defined(NANOMOE_AVX512)
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= V; i += 16) acc = _mm512_add_ps(acc, exp_vec(_mm512_sub_ps(load16(x + i, 0xffff), s)));
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < V; ++i) total += std::exp(load(x, i) - shift);
  return total;
}

// Per row n: lse[n] = logsumexp(logits[n]) and loss[n] = lse[n] - logits[n, target[n]] (0 where
// target == ignore_index). A row whose maximum is not finite (NaN, +-inf) gets NaN for both, as
// torch's log_softmax gives NaN there too.
std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& logits_in, const Tensor& targets_in,
                                                 int64_t ignore_index) {
  check_float(logits_in, "cross_entropy");
  TORCH_CHECK(logits_in.dim() == 2, "cross_entropy: logits must be (N, V)");
  const Tensor logits = logits_in.contiguous(), targets = targets_in.to(at::kLong).contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.numel() == N, "cross_entropy: one target per row of logits");
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(t[n] == ignore_index || (t[n] >= 0 && t[n] < V), "cross_entropy: target ", t[n],
                " out of range for ", V, " classes");
  }
  Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat)), lse = at::empty({N}, loss.options());
  float *ls = loss.data_ptr<float>(), *z = lse.data_ptr<float>();
  by_type(logits, [&](auto tag) {
    using T = decltype(tag);
    const T* x = data<T>(logits);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* row = x + n * V;
        const float top = row_max(row, V);
        z[n] = std::isfinite(top) ? top + std::log(row_sum_exp(row, V, top)) : std::numeric_limits<float>::quiet_NaN();
        ls[n] = t[n] == ignore_index ? 0.f : z[n] - load(row, t[n]);
      }
    });
  });
  return {loss, lse};
}

// d logits = scale * (softmax(logits) - one_hot(target)) per row, 0 on ignored rows, in the logits'
// dtype. `scale` is d loss_sum (a 0-dim tensor: read here, no sync on the Python side).
Tensor cross_entropy_backward(const Tensor& logits_in, const Tensor& targets_in, const Tensor& lse,
                              const Tensor& scale_in, int64_t ignore_index) {
  const Tensor logits = logits_in.contiguous(), targets = targets_in.to(at::kLong).contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == N && targets.numel() == N,
              "cross_entropy_backward: lse and targets must match the logits' rows");
  const float scale = scale_in.to(at::kFloat).item<float>();
  Tensor grad = at::empty_like(logits);
  const int64_t* t = targets.data_ptr<int64_t>();
  const float* z = lse.data_ptr<float>();
  by_type(logits, [&](auto tag) {
    using T = decltype(tag);
    const T* x = data<T>(logits);
    T* g = data<T>(grad);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* row = x + n * V;
        T* out = g + n * V;
        const float zn = z[n];
        if (t[n] == ignore_index || std::isnan(zn)) {  // exp_vec clamps its input: make a NaN explicit
          const float fill = t[n] == ignore_index ? 0.f : std::numeric_limits<float>::quiet_NaN();
          for (int64_t i = 0; i < V; ++i) store(out, i, fill);
          continue;
        }
        int64_t i = 0;
#if defined(NANOMOE_AVX512)
        const __m512 sv = _mm512_set1_ps(scale), zv = _mm512_set1_ps(zn);
        for (; i + 16 <= V; i += 16) {
          store16(out + i, _mm512_mul_ps(sv, exp_vec(_mm512_sub_ps(load16(row + i, 0xffff), zv))), 0xffff);
        }
#endif
        for (; i < V; ++i) store(out, i, scale * std::exp(load(row, i) - zn));
        store(out, t[n], scale * (std::exp(load(row, t[n]) - zn) - 1.f));
      }
    });
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------
// rotary embeddings

// One row of d = 2h values: out[i] = x[i] cos[i] - x[i+h] s1[i], out[i+h] = x[i+h] cos[i+h] + x[i] s2[i]
// (s1, s2 the sines times `sign`; see rope below), or a plain copy without tables (c null).
template <typename T>
void rotate_row(const T* in, T* o, const float* c, const float* s1p, const float* s2p, int64_t half, float sign) {
  int64_t i = 0;
  if (c == nullptr) {
#if defined(NANOMOE_AVX512)
    for (; i < 2 * half; i += 16) {
      const __mmask16 m = tail_mask(2 * half - i);
      store16(o + i, load16(in + i, m), m);
    }
#endif
    for (; i < 2 * half; ++i) o[i] = in[i];
    return;
  }
#if defined(NANOMOE_AVX512)
  const __m512 sg = _mm512_set1_ps(sign);
  for (; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    const __m512 x1 = load16(in + i, m), x2 = load16(in + half + i, m);
    const __m512 s1 = _mm512_mul_ps(sg, _mm512_maskz_loadu_ps(m, s1p + i));
    const __m512 s2 = _mm512_mul_ps(sg, _mm512_maskz_loadu_ps(m, s2p + i));
    store16(o + i, _mm512_fnmadd_ps(x2, s1, _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, c + i))), m);
    store16(o + half + i, _mm512_fmadd_ps(x1, s2, _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, c + half + i))), m);
  }
#endif
  for (; i < half; ++i) {
    const float x1 = load(in, i), x2 = load(in, half + i);
    store(o, i, x1 * c[i] - x2 * (sign * s1p[i]));
    store(o, half + i, x2 * c[half + i] + x1 * (sign * s2p[i]));
  }
}

// The tables of one position: cos, and the two sines of rotate_row. The transpose of the rotation
// (inverse, for the backward) has negated sines, each half taking the other half's.
struct RopeTables {
  const float *cs = nullptr, *sn = nullptr;
  int64_t d = 0, half = 0;
  bool inverse = false;
  float sign() const { return inverse ? -1.f : 1.f; }
  const float* c(int64_t t) const { return cs ? cs + t * d : nullptr; }
  const float* s1(int64_t t) const { return sn ? sn + t * d + (inverse ? half : 0) : nullptr; }
  const float* s2(int64_t t) const { return sn ? sn + t * d + (inverse ? 0 : half) : nullptr; }
};

// cos/sin (T, d) as fp32 (kept alive in `keep`), or no tables when both are undefined
RopeTables rope_tables(const Tensor& cos_in, const Tensor& sin_in, int64_t T, int64_t d, bool inverse,
                       std::vector<Tensor>& keep) {
  RopeTables tables;
  tables.d = d;
  tables.half = d / 2;
  tables.inverse = inverse;
  if (!cos_in.defined() || cos_in.numel() == 0) return tables;
  keep = {cos_in.to(at::kFloat).contiguous(), sin_in.to(at::kFloat).contiguous()};
  TORCH_CHECK(keep[0].numel() == T * d && keep[1].numel() == T * d, "rope: cos and sin must be (T, d)");
  tables.cs = keep[0].data_ptr<float>();
  tables.sn = keep[1].data_ptr<float>();
  return tables;
}

// x (B, T, H, d) with a contiguous last dim (any other strides: the q|k part of a fused qkv output),
// cos/sin (T, d) fp32. out (B, T, H, d) contiguous, x's dtype:
//   out[i] = x[i] cos[i] - x[i+h] sin[i],  out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h]   (h = d/2)
// inverse=true applies the transpose (the backward): dx[i] = g[i] cos[i] + g[i+h] sin[i+h],
//   dx[i+h] = g[i+h] cos[i+h] - g[i] sin[i].
Tensor rope(const Tensor& x, const Tensor& cos_in, const Tensor& sin_in, bool inverse) {
  check_float(x, "rope");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rope: x must be (B, T, H, d), d even, "
              "with a contiguous last dimension");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), d = x.size(3);
  std::vector<Tensor> keep;
  const RopeTables tab = rope_tables(cos_in, sin_in, T, d, inverse, keep);
  TORCH_CHECK(tab.cs != nullptr, "rope: cos and sin are required");
  Tensor out = at::empty({B, T, H, d}, x.options());
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  by_type(x, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* src = data<T_>(x);
    T_* dst = data<T_>(out);
    at::parallel_for(0, B * T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        for (int64_t h = 0; h < H; ++h) {
          rotate_row(src + b * sb + t * st + h * sh, dst + (bt * H + h) * d, tab.c(t), tab.s1(t), tab.s2(t), tab.half,
                     tab.sign());
        }
      }
    });
  });
  return out;
}

// The attention heads out of a fused projection, in one pass: qkv (B, T, Hq + 2 Hkv, d) with a
// contiguous last dim -> q (B, Hq, T, d), k (B, Hkv, T, d) rotated by cos/sin (T, d) (undefined:
// no rotation) and v (B, Hkv, T, d), all contiguous: the layout the attention's batched products
// read, where split + rope + transpose + reshape made three copies and a cat in the backward.
std::tuple<Tensor, Tensor, Tensor> qkv_heads(const Tensor& qkv, const Tensor& cos_in, const Tensor& sin_in,
                                             int64_t n_q, int64_t n_kv) {
  check_float(qkv, "qkv_heads");
  TORCH_CHECK(qkv.dim() == 4 && qkv.stride(3) == 1 && qkv.size(2) == n_q + 2 * n_kv && qkv.size(3) % 2 == 0,
              "qkv_heads: qkv must be (B, T, n_q + 2 n_kv, d), d even, with a contiguous last dimension");
  const int64_t B = qkv.size(0), T = qkv.size(1), d = qkv.size(3);
  std::vector<Tensor> keep;
  const RopeTables tab = rope_tables(cos_in, sin_in, T, d, false, keep);
  Tensor q = at::empty({B, n_q, T, d}, qkv.options()), k = at::empty({B, n_kv, T, d}, qkv.options());
  Tensor v = at::empty({B, n_kv, T, d}, qkv.options());
  const int64_t sb = qkv.stride(0), st = qkv.stride(1), sh = qkv.stride(2);
  by_type(qkv, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* src = data<T_>(qkv);
    T_ *qp = data<T_>(q), *kp = data<T_>(k), *vp = data<T_>(v);
    at::parallel_for(0, B * T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        for (int64_t h = 0; h < n_q + 2 * n_kv; ++h) {
          const T_* in = src + b * sb + t * st + h * sh;
          if (h < n_q) {
            rotate_row(in, qp + ((b * n_q + h) * T + t) * d, tab.c(t), tab.s1(t), tab.s2(t), tab.half, tab.sign());
          } else if (h < n_q + n_kv) {
            rotate_row(in, kp + ((b * n_kv + h - n_q) * T + t) * d, tab.c(t), tab.s1(t), tab.s2(t), tab.half,
                       tab.sign());
          } else {
            rotate_row(in, vp + ((b * n_kv + h - n_q - n_kv) * T + t) * d, static_cast<const float*>(nullptr),
                       nullptr, nullptr, tab.half, 1.f);
          }
        }
      }
    });
  });
  return {q, k, v};
}

// The backward of qkv_heads: dq (B, Hq, T, d), dk, dv (B, Hkv, T, d), each with a contiguous last
// dim -> dqkv (B, T, Hq + 2 Hkv, d), the rotation's transpose applied to dq and dk.
Tensor qkv_heads_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& cos_in,
                          const Tensor& sin_in) {
  const int64_t B = dq.size(0), n_q = dq.size(1), T = dq.size(2), d = dq.size(3), n_kv = dk.size(1);
  TORCH_CHECK(dq.stride(3) == 1 && dk.stride(3) == 1 && dv.stride(3) == 1 && dk.sizes() == dv.sizes() &&
                  dk.size(0) == B && dk.size(2) == T && dk.size(3) == d && dq.scalar_type() == dk.scalar_type() &&
                  dq.scalar_type() == dv.scalar_type(),
              "qkv_heads_backward: gradients of q, k and v disagree");
  std::vector<Tensor> keep;
  const RopeTables tab = rope_tables(cos_in, sin_in, T, d, true, keep);
  const int64_t H = n_q + 2 * n_kv;
  Tensor dqkv = at::empty({B, T, H, d}, dq.options());
  by_type(dq, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* base[3] = {data<T_>(dq), data<T_>(dk), data<T_>(dv)};
    const Tensor* grads[3] = {&dq, &dk, &dv};
    int64_t strides[3][3];
    for (int w = 0; w < 3; ++w) {
      for (int i = 0; i < 3; ++i) strides[w][i] = grads[w]->stride(i);
    }
    T_* dst = data<T_>(dqkv);
    at::parallel_for(0, B * T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        for (int64_t h = 0; h < H; ++h) {
          const int which = h < n_q ? 0 : (h < n_q + n_kv ? 1 : 2);
          const int64_t head = which == 0 ? h : (which == 1 ? h - n_q : h - n_q - n_kv);
          const T_* in = base[which] + b * strides[which][0] + head * strides[which][1] + t * strides[which][2];
          T_* o = dst + (bt * H + h) * d;
          if (which < 2) {
            rotate_row(in, o, tab.c(t), tab.s1(t), tab.s2(t), tab.half, tab.sign());
          } else {
            rotate_row(in, o, static_cast<const float*>(nullptr), nullptr, nullptr, tab.half, 1.f);
          }
        }
      }
    });
  });
  return dqkv;
}

// ---------------------------------------------------------------------------------------------
// causal softmax

// scores (BH, R, T) with row r the query at position r % T (R = G*T: G query heads per key head);
// probs[j] = softmax_j(scale * scores[j]) over the keys j <= r % T, 0 for the later keys. In fp32,
// stored in the scores' dtype. A row holding a NaN or an infinity gives NaN (exp_vec would clamp it).
Tensor causal_softmax(const Tensor& scores_in, double scale_in) {
  check_float(scores_in, "causal_softmax");
  TORCH_CHECK(scores_in.dim() == 3, "causal_softmax: scores must be (batch, rows, T)");
  const Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1), T = scores.size(2);
  const float scale = float(scale_in);
  TORCH_CHECK(scale > 0, "causal_softmax: the scale must be positive");
  Tensor probs = at::empty_like(scores);
  by_type(scores, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* src = data<T_>(scores);
    T_* dst = data<T_>(probs);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> e(T);
      for (int64_t r = begin; r < end; ++r) {
        const T_* row = src + r * T;
        T_* out = dst + r * T;
        const int64_t n = r % scores.size(1) % T + 1;  // visible keys
        const float top = row_max(row, n);
        for (int64_t j = n; j < T; ++j) store(out, j, 0.f);
        if (!std::isfinite(top)) {  // NaN, or an overflowed score: no meaningful softmax
          for (int64_t j = 0; j < n; ++j) store(out, j, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        float total = 0.f;
        int64_t j = 0;
#if defined(NANOMOE_AVX512)
        const __m512 sv = _mm512_set1_ps(scale), tv = _mm512_set1_ps(top);
        __m512 acc = _mm512_setzero_ps();
        for (; j < n; j += 16) {
          const __mmask16 m = tail_mask(n - j);
          const __m512 v = _mm512_maskz_mov_ps(m, exp_vec(_mm512_mul_ps(sv, _mm512_sub_ps(load16(row + j, m), tv))));
          _mm512_mask_storeu_ps(e.data() + j, m, v);
          acc = _mm512_add_ps(acc, v);
        }
        total = _mm512_reduce_add_ps(acc);
#endif
        for (; j < n; ++j) total += (e[j] = std::exp(scale * (load(row, j) - top)));
        const float inv = 1.f / total;
        for (j = 0; j < n; ++j) store(out, j, e[j] * inv);
      }
    });
  });
  return probs;
}

// d scores[j] = scale * p[j] * (dp[j] - sum_k p[k] dp[k]) over the visible keys, 0 elsewhere.
Tensor causal_softmax_backward(const Tensor& dprobs_in, const Tensor& probs, double scale_in) {
  const Tensor dprobs = dprobs_in.to(probs.scalar_type()).contiguous();
  TORCH_CHECK(probs.is_contiguous() && dprobs.sizes() == probs.sizes(), "causal_softmax_backward: shapes differ");
  const int64_t rows = probs.size(0) * probs.size(1), T = probs.size(2), R = probs.size(1);
  const float scale = float(scale_in);
  Tensor dscores = at::empty_like(probs);
  by_type(probs, [&](auto tag) {
    using T_ = decltype(tag);
    const T_ *p = data<T_>(probs), *g = data<T_>(dprobs);
    T_* dst = data<T_>(dscores);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T_ *pr = p + r * T, *gr = g + r * T;
        T_* out = dst + r * T;
        const int64_t n = r % R % T + 1;
        const float dot = dot_product(pr, gr, n);
        int64_t j = 0;
#if defined(NANOMOE_AVX512)
        const __m512 dv = _mm512_set1_ps(dot), sv = _mm512_set1_ps(scale);
        for (; j < n; j += 16) {
          const __mmask16 m = tail_mask(n - j);
          store16(out + j, _mm512_mul_ps(sv, _mm512_mul_ps(load16(pr + j, m), _mm512_sub_ps(load16(gr + j, m), dv))), m);
        }
#endif
        for (; j < n; ++j) store(out, j, scale * load(pr, j) * (load(gr, j) - dot));
        for (j = n; j < T; ++j) store(out, j, 0.f);
      }
    });
  });
  return dscores;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

// x (N, D) fp32 or bf16, weight (D) fp32 or bf16 -> y = x * rstd * weight, rstd (N) fp32 with
// rstd = 1 / sqrt(mean(x^2) + eps): the math of ops._RMSNorm, in fp32. y in x's dtype, or in bf16
// with bf16_out (a norm feeding a bf16 matrix product under autocast: the cast it would get there).
std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x_in, const Tensor& weight_in, double eps, bool bf16_out) {
  check_float(x_in, "rms_norm");
  const Tensor x = x_in.contiguous(), w = weight_in.to(at::kFloat).contiguous();
  const int64_t D = x.size(-1), N = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(w.numel() == D, "rms_norm: weight must have the last dimension's size");
  Tensor y = at::empty_like(x, bf16_out ? x.options().dtype(at::kBFloat16) : x.options());
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  const float* wp = w.data_ptr<float>();
  float* rs = rstd.data_ptr<float>();
  by_types(x, y, [&](auto tag, auto out_tag) {
    using T = decltype(tag);
    using O = decltype(out_tag);
    const T* src = data<T>(x);
    O* dst = data<O>(y);
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* row = src + n * D;
        O* out = dst + n * D;
        const float r = 1.f / std::sqrt(dot_product(row, row, D) / float(D) + float(eps));
        rs[n] = r;
        int64_t i = 0;
#if defined(NANOMOE_AVX512)
        const __m512 rv = _mm512_set1_ps(r);
        for (; i < D; i += 16) {
          const __mmask16 m = tail_mask(D - i);
          store16(out + i, _mm512_mul_ps(_mm512_mul_ps(load16(row + i, m), rv), _mm512_maskz_loadu_ps(m, wp + i)), m);
        }
#endif
        for (; i < D; ++i) store(out, i, load(row, i) * r * wp[i]);
      }
    });
  });
  return {y, rstd};
}

// From dy (x's dtype or bf16): dx = rstd (dy w - xhat mean(dy w xhat)) with xhat = x rstd, in x's
// dtype; dw = sum over rows of dy xhat in fp32. Rows go in fixed blocks whose partial dw are added in block order, so
// the result does not depend on the number of threads.
std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& dy_in, const Tensor& x_in, const Tensor& weight_in,
                                             const Tensor& rstd) {
  const Tensor x = x_in.contiguous();
  const Tensor dy = (dy_in.scalar_type() == at::kBFloat16 ? dy_in : dy_in.to(x.scalar_type())).contiguous();
  const Tensor w = weight_in.to(at::kFloat).contiguous();
  const int64_t D = x.size(-1), N = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(dy.numel() == N * D && rstd.numel() == N && rstd.scalar_type() == at::kFloat,
              "rms_norm_backward: gradient and rstd must match the input");
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  Tensor dx = at::empty_like(x), partial = at::zeros({std::max<int64_t>(blocks, 1), D}, rstd.options());
  const float *wp = w.data_ptr<float>(), *rs = rstd.data_ptr<float>();
  float* part = partial.data_ptr<float>();
  by_types(x, dy, [&](auto tag, auto grad_tag) {
    using T = decltype(tag);
    using G = decltype(grad_tag);
    const T* src = data<T>(x);
    const G* g = data<G>(dy);
    T* dst = data<T>(dx);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* dw = part + b * D;
        for (int64_t n = b * kBlock; n < std::min(N, (b + 1) * kBlock); ++n) {
          const T* row = src + n * D;
          const G* grow = g + n * D;
          const float r = rs[n];
          float dot = 0.f;
          int64_t i = 0;
#if defined(NANOMOE_AVX512)
          const __m512 rv = _mm512_set1_ps(r);
          __m512 dotv = _mm512_setzero_ps();
          for (; i < D; i += 16) {
            const __mmask16 m = tail_mask(D - i);
            const __m512 xhat = _mm512_mul_ps(load16(row + i, m), rv), gy = load16(grow + i, m);
            _mm512_mask_storeu_ps(dw + i, m, _mm512_fmadd_ps(gy, xhat, _mm512_maskz_loadu_ps(m, dw + i)));
            dotv = _mm512_fmadd_ps(_mm512_mul_ps(gy, _mm512_maskz_loadu_ps(m, wp + i)), xhat, dotv);
          }
          dot = _mm512_reduce_add_ps(dotv);
#endif
          for (; i < D; ++i) {
            const float xhat = load(row, i) * r, gy = load(grow, i);
            dw[i] += gy * xhat;
            dot += gy * wp[i] * xhat;
          }
          dot /= float(D);
          i = 0;
#if defined(NANOMOE_AVX512)
          const __m512 dotb = _mm512_set1_ps(dot);
          for (; i < D; i += 16) {
            const __mmask16 m = tail_mask(D - i);
            const __m512 xhat = _mm512_mul_ps(load16(row + i, m), rv);
            const __m512 gw = _mm512_mul_ps(load16(grow + i, m), _mm512_maskz_loadu_ps(m, wp + i));
            store16(dst + n * D + i, _mm512_mul_ps(_mm512_fnmadd_ps(xhat, dotb, gw), rv), m);
          }
#endif
          for (; i < D; ++i) {
            const float xhat = load(row, i) * r;
            store(dst + n * D, i, (load(grow, i) * wp[i] - xhat * dot) * r);
          }
        }
      }
    });
  });
  return {dx, partial.sum(0)};
}

// ---------------------------------------------------------------------------------------------
// SwiGLU over [gate | up] rows

// h (N, 2H) rows [g | u] -> a (N, H) = silu(g) * u
Tensor swiglu(const Tensor& h_in) {
  check_float(h_in, "swiglu");
  const Tensor h = h_in.contiguous();
  const int64_t H = h.size(-1) / 2, N = h.numel() / std::max<int64_t>(2 * H, 1);
  TORCH_CHECK(h.size(-1) % 2 == 0, "swiglu: the last dimension holds [gate | up] halves: it must be even");
  auto sizes = h.sizes().vec();
  sizes.back() = H;
  Tensor a = at::empty(sizes, h.options());
  by_type(h, [&](auto tag) {
    using T = decltype(tag);
    const T* src = data<T>(h);
    T* dst = data<T>(a);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) swiglu_forward(src + n * 2 * H, src + n * 2 * H + H, dst + n * H, H);
    });
  });
  return a;
}

// da (N, H), h (N, 2H) the forward's input -> dh (N, 2H) = [dg | du]
Tensor swiglu_backward_rows(const Tensor& da_in, const Tensor& h_in) {
  const Tensor h = h_in.contiguous(), da = da_in.to(h.scalar_type()).contiguous();
  const int64_t H = h.size(-1) / 2, N = h.numel() / std::max<int64_t>(2 * H, 1);
  TORCH_CHECK(da.numel() == N * H, "swiglu_backward: the gradient must have the output's shape");
  Tensor dh = at::empty_like(h);
  by_type(h, [&](auto tag) {
    using T = decltype(tag);
    const T *src = data<T>(h), *g = data<T>(da);
    T* dst = data<T>(dh);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* row = src + n * 2 * H;
        swiglu_backward(g + n * H, row, row + H, dst + n * 2 * H, dst + n * 2 * H + H, H);
      }
    });
  });
  return dh;
}

}  // namespace

__attribute__((visibility("hidden"))) void register_fused_ops(pybind11::module& m) {
  m.def("cross_entropy_forward", &cross_entropy_forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cross_entropy_backward", &cross_entropy_backward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rope", &rope, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("qkv_heads", &qkv_heads, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("qkv_heads_backward", &qkv_heads_backward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("causal_softmax", &causal_softmax, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("causal_softmax_backward", &causal_softmax_backward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm_forward", &rms_norm_forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm_backward", &rms_norm_backward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("swiglu", &swiglu, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("swiglu_backward", &swiglu_backward_rows, pybind11::call_guard<pybind11::gil_scoped_release>());
}
