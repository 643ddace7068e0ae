// Training kernels of the grouped expert feed-forward (nanomoe/grouped_ffn.py) on the CPU:
// forward and backward of every expert's block of rows, experts shared out over the threads.
//
// Why: a small MoE layer is ~9 matrix products per expert of ~1000 rows. Split over two cores, such
// a product gains only ~1.5x from the second core (oneDNN splits each call and synchronizes); here
// every expert runs whole on one thread (its products single-threaded, as efficient per FLOP as a
// big one), the threads taking experts from a shared queue, one parallel region per pass. Each thread
// also does its experts' share of the work around the products while the data is in its cache:
// the fp32 -> bf16 weight casts, the dispatch gather, the activation (SwiGLU as one fused loop,
// forward and backward, recomputing silu rather than storing it), and the fp32 weight gradients.
// Products and the relu/gelu activations are ATen's own kernels, so the results are those of the
// Python path (grouped_ffn.py) up to the SwiGLU's single rounding.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with at::Tensor casters, without torch/extension.h's C++ frontend
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "tensor_types.h"

namespace {

using at::Tensor;
using namespace nanomoe_simd;
using namespace nanomoe_types;

enum Activation { RELU = 0, GELU = 1, SWIGLU = 2 };

// body(e, first row, rows) for every expert with rows, each expert whole on one thread. The threads
// take experts from a shared counter, largest block first: a thread that got a slower share (a
// busier core, colder data) simply takes fewer. A fixed split balanced by rows left one thread
// waiting for the other ~6% of the layer's time on the 2-core VM. Which thread runs an expert never
// changes its results: each expert's products are single-threaded and write only its own rows.
template <typename F>
void each_expert(const std::vector<int64_t>& rows, F&& body) {
  std::vector<int64_t> first(rows.size(), 0), order;
  for (size_t e = 1; e < rows.size(); ++e) first[e] = first[e - 1] + rows[e - 1];
  for (size_t e = 0; e < rows.size(); ++e) {
    if (rows[e] > 0) order.push_back(static_cast<int64_t>(e));
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rows[a] > rows[b]; });
  const int64_t n_work = static_cast<int64_t>(order.size());
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), std::max<int64_t>(1, n_work));
  std::atomic<int64_t> next{0};
  // grad and inference mode are thread-local: the workers take the caller's (the autograd Function
  // runs without grad; generation runs in inference mode, whose tensors only it may write)
  const at::ThreadLocalState caller;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard same_state(caller);
    for (int64_t i = next.fetch_add(1); i < n_work; i = next.fetch_add(1)) body(order[i], first[order[i]], rows[order[i]]);
  });
}

// the same on rows [r0, r0 + n) of (R, H) buffers, for fp32 or bf16 data
void swiglu_forward_rows(const Tensor& g, const Tensor& u, const Tensor& a) {
  const int64_t n = g.numel();
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16, "experts: fp32 or bf16 only");
  if (g.scalar_type() == at::kFloat) {
    swiglu_forward(g.data_ptr<float>(), u.data_ptr<float>(), a.data_ptr<float>(), n);
  } else {
    swiglu_forward(reinterpret_cast<const uint16_t*>(g.data_ptr()), reinterpret_cast<const uint16_t*>(u.data_ptr()),
                   reinterpret_cast<uint16_t*>(a.data_ptr()), n);
  }
}

void swiglu_backward_rows(const Tensor& da, const Tensor& g, const Tensor& u, const Tensor& dg, const Tensor& du) {
  const int64_t n = g.numel();
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16, "experts: fp32 or bf16 only");
  if (g.scalar_type() == at::kFloat) {
    swiglu_backward(da.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(), dg.data_ptr<float>(),
                    du.data_ptr<float>(), n);
  } else {
    auto p = [](const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    swiglu_backward(p(da), p(g), p(u), p(dg), p(du), n);
  }
}

bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

// out[n] = sum_k gate[k, n] * src[row[k, n]] (gate null: weights 1), accumulated in fp32, rounded
// once: the combine (expert outputs back to tokens) and the gradient's way back to the tokens.
template <typename T, typename O>
void gather_sum(const T* src, const int64_t* row, const float* gate, O* out, int64_t N, int64_t K, int64_t D) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t d = 0;
#if defined(NANOMOE_AVX512)
      for (; d < D; d += 16) {
        const __mmask16 m = tail_mask(D - d);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = k * N + n;
          const __m512 v = load16(src + row[i] * D + d, m);
          acc = gate ? _mm512_fmadd_ps(v, _mm512_set1_ps(gate[i]), acc) : _mm512_add_ps(acc, v);
        }
        store16(out + n * D + d, acc, m);
      }
#endif
      for (; d < D; ++d) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = k * N + n;
          acc += gate ? load(src, row[i] * D + d) * gate[i] : load(src, row[i] * D + d);
        }
        store(out, n * D + d, acc);
      }
    }
  });
}

// dst[r] = src[token[r]] for rows [r0, r0 + n), converting fp32 <-> bf16 on the way (the dispatch
// gather, with the cast of the layer's input to the compute dtype in the same pass)
template <typename S, typename T>
void gather_rows(const S* src, const int64_t* token, T* dst, int64_t r0, int64_t n, int64_t D) {
  for (int64_t r = r0; r < r0 + n; ++r) {
    const S* s = src + token[r] * D;
    T* o = dst + r * D;
    int64_t d = 0;
#if defined(NANOMOE_AVX512)
    for (; d < D; d += 16) {
      const __mmask16 m = tail_mask(D - d);
      store16(o + d, load16(s + d, m), m);
    }
#endif
    for (; d < D; ++d) store(o, d, load(s, d));
  }
}

// dgate[k, n] = y[row[k, n]] . dout[n], in fp32
template <typename T>
void gate_grads(const T* y, const T* dout, const int64_t* row, float* dgate, int64_t N, int64_t K, int64_t D) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = k * N + n;
        const T* yr = y + row[i] * D;
        const T* g = dout + n * D;
        const float total = dot_product(yr, g, D);
        dgate[i] = total;
      }
    }
  });
}

// dst[r] = src[token[r]] * gate[slot[r]] for rows [r0, r0 + n): each row's output gradient
template <typename T>
void gated_rows(const T* src, const int64_t* token, const int64_t* slot, const float* gate, T* dst, int64_t r0,
                int64_t n, int64_t D) {
  for (int64_t r = r0; r < r0 + n; ++r) {
    const T* s = src + token[r] * D;
    T* o = dst + r * D;
    const float g = gate[slot[r]];
    int64_t d = 0;
#if defined(NANOMOE_AVX512)
    for (; d < D; d += 16) {
      const __mmask16 m = tail_mask(D - d);
      store16(o + d, _mm512_mul_ps(load16(s + d, m), _mm512_set1_ps(g)), m);
    }
#endif
    for (; d < D; ++d) store(o, d, load(s, d) * g);
  }
}


// The index tensors the kernels follow come from Python: check them, as out-of-range indices
// would read and write outside the buffers (the Python path raises IndexError on them).
void check_indices(const Tensor& t, int64_t size, int64_t limit, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == size && t.is_contiguous(), "experts: ",
              what, " must be a contiguous int64 vector of ", size, " entries");
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < size; ++i) TORCH_CHECK(p[i] >= 0 && p[i] < limit, "experts: ", what, " entry out of range");
}

int64_t total_rows(const std::vector<int64_t>& rows) {
  int64_t R = 0;
  for (int64_t n : rows) {
    TORCH_CHECK(n >= 0, "experts: negative row count");
    R += n;
  }
  return R;
}

void linear(Tensor out, const Tensor& x, const Tensor& w, const Tensor& b) {  // out = x w (+ b)
  if (present(b)) {
    at::addmm_out(out, b, x, w);
  } else {
    at::mm_out(out, x, w);
  }
}

// Forward. x_src (N, D) the layer's input, fp32 or bf16; token (R,) the token of every expert-sorted row;
// w_in (E, D, F) and w_out (E, H, D) the parameters (F = 2H for swiglu: [gate | up]), b_g, b_u,
// b_out (E, H), (E, H), (E, D) biases in the compute dtype or empty; row (K*N,) the row of every
// assignment (R, a zero row, if dropped) and gate (K, N) fp32 its weight. Written: x (R, D) the
// gathered rows; w_g, w_u (E, D, H) and w_o (E, H, D) the weights in the compute dtype (experts
// with rows only); h (R, H) the gate (or only) pre-activation, u (R, H) the up projection
// (swiglu), a (R, H) the activation, y (R + 1, D) the expert outputs (row R stays as given: zero);
// out (N, D) the layer's output.
void forward(const Tensor& x_src, const Tensor& token, const std::vector<int64_t>& rows, int64_t activation,
             const Tensor& w_in, const Tensor& w_out, const Tensor& b_g, const Tensor& b_u, const Tensor& b_out,
             const Tensor& row, const Tensor& gate, Tensor x, Tensor w_g, Tensor w_u, Tensor w_o, Tensor h, Tensor u,
             Tensor a, Tensor y, Tensor out) {
  const int64_t H = h.size(1), R = x.size(0), N = x_src.size(0), K = gate.size(0);
  TORCH_CHECK(total_rows(rows) == R && y.size(0) == R + 1 && gate.size(1) == N &&
                  static_cast<int64_t>(rows.size()) == w_in.size(0),
              "experts_forward: buffers, plan and gates disagree in size");
  check_indices(token, R, std::max<int64_t>(N, 1), "token");
  check_indices(row, K * N, R + 1, "row");
  const bool glu = activation == SWIGLU;
  each_expert(rows, [&](int64_t e, int64_t r0, int64_t n) {
    w_g[e].copy_(glu ? w_in[e].narrow(1, 0, H) : w_in[e]);
    if (glu) w_u[e].copy_(w_in[e].narrow(1, H, H));
    w_o[e].copy_(w_out[e]);
    Tensor xe = x.narrow(0, r0, n), he = h.narrow(0, r0, n), ae = a.narrow(0, r0, n);
    by_type(x_src, [&](auto s) {
      using S = decltype(s);
      by_type(x, [&](auto t) {
        using T = decltype(t);
        gather_rows(data<S>(x_src), token.data_ptr<int64_t>(), data<T>(x), r0, n, x.size(1));
      });
    });
    linear(he, xe, w_g[e], present(b_g) ? b_g[e] : Tensor());
    if (glu) {
      Tensor ue = u.narrow(0, r0, n);
      linear(ue, xe, w_u[e], present(b_u) ? b_u[e] : Tensor());
      swiglu_forward_rows(he, ue, ae);
    } else if (activation == RELU) {
      at::relu_out(ae, he);
    } else {
      at::gelu_out(ae, he, "tanh");
    }
    linear(y.narrow(0, r0, n), ae, w_o[e], present(b_out) ? b_out[e] : Tensor());
  });
  // combine: out[n] = sum_k gate[k, n] y[row[k, n]]
  const int64_t D = y.size(1);
  by_type(y, [&](auto t) {
    using T = decltype(t);
    gather_sum(data<T>(y), row.data_ptr<int64_t>(), gate.data_ptr<float>(), data<T>(out), N, K, D);
  });
}

// Backward. dout (N, D) the output gradient in the compute dtype; token, slot (R,) each row's token
// and flat assignment k * N + n (K * N for padding rows), gate_ext (K*N + 1,) fp32 gate weights
// with a trailing 0, row (K*N,) as in the forward; x, w_g, w_u, w_o, h, u, a, y as the forward
// wrote them. Written: dx (N, D) in the input's dtype; dgate (K, N) fp32 when given; dw_in
// (E, D, F), dw_out (E, H, D) in the parameters' dtype and db_in (E, F), db_out (E, D) in fp32
// when given, for experts with rows. Scratch in the compute dtype: dy (R, D), da, du (R, H),
// dx_rows (R + 1, D, row R zero), dw_g, dw_u (E, D, H), dw_o (E, H, D).
void backward(const Tensor& dout, const Tensor& token, const Tensor& slot, const Tensor& gate_ext, const Tensor& row,
              const std::vector<int64_t>& rows, int64_t activation, const Tensor& x, const Tensor& w_g,
              const Tensor& w_u, const Tensor& w_o, const Tensor& h, const Tensor& u, const Tensor& a, const Tensor& y,
              Tensor dx, Tensor dgate, Tensor dw_in, Tensor dw_out, Tensor db_in, Tensor db_out, Tensor dy, Tensor da,
              Tensor du, Tensor dx_rows, Tensor dw_g, Tensor dw_u, Tensor dw_o) {
  const int64_t H = h.size(1), D = x.size(1), N = dx.size(0), R = x.size(0);
  const int64_t K = N > 0 ? row.size(0) / N : 0;
  TORCH_CHECK(total_rows(rows) == R && dx_rows.size(0) == R + 1 && dy.size(0) == R && dout.size(0) == N &&
                  gate_ext.numel() == K * N + 1 && row.numel() == K * N,
              "experts_backward: buffers, plan and gates disagree in size");
  check_indices(token, R, std::max<int64_t>(N, 1), "token");
  check_indices(slot, R, K * N + 1, "slot");
  check_indices(row, K * N, R + 1, "row");
  const bool glu = activation == SWIGLU, bias = present(db_in);
  if (present(dgate)) {  // dgate[k, n] = y[row[k, n]] . dout[n]
    by_type(y, [&](auto t) {
      using T = decltype(t);
      gate_grads(data<T>(y), data<T>(dout), row.data_ptr<int64_t>(), dgate.data_ptr<float>(), N, K, D);
    });
  }
  each_expert(rows, [&](int64_t e, int64_t r0, int64_t n) {
    by_type(dy, [&](auto t) {  // this expert's rows of dy: their token's output gradient times their gate
      using T = decltype(t);
      gated_rows(data<T>(dout), token.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), gate_ext.data_ptr<float>(),
                 data<T>(dy), r0, n, D);
    });
    const Tensor dye = dy.narrow(0, r0, n), xe = x.narrow(0, r0, n), he = h.narrow(0, r0, n);
    Tensor dae = da.narrow(0, r0, n), dxe = dx_rows.narrow(0, r0, n);
    // down projection: da = dy w_o^T, dw_o = a^T dy
    at::mm_out(dae, dye, w_o[e].t());
    Tensor dw_oe = dw_o[e];
    at::mm_out(dw_oe, a.narrow(0, r0, n).t(), dye);
    dw_out[e].copy_(dw_oe);
    if (bias) db_out[e].copy_(dye.sum(0, false, at::kFloat));
    // activation: dh in da's buffer
    Tensor due;
    if (glu) {
      due = du.narrow(0, r0, n);
      swiglu_backward_rows(dae, he, u.narrow(0, r0, n), dae, due);
    } else if (activation == RELU) {  // a > 0 exactly where h > 0
      at::threshold_backward_out(dae, dae, a.narrow(0, r0, n), 0);
    } else {
      at::gelu_backward_out(dae, dae, he, "tanh");
    }
    // input projection: dx = dh w_g^T (+ du w_u^T), dw = x^T [dh | du]
    at::mm_out(dxe, dae, w_g[e].t());
    Tensor dw_ge = dw_g[e];
    at::mm_out(dw_ge, xe.t(), dae);
    dw_in[e].narrow(1, 0, H).copy_(dw_ge);
    if (bias) db_in[e].narrow(0, 0, H).copy_(dae.sum(0, false, at::kFloat));
    if (glu) {
      at::addmm_out(dxe, dxe, due, w_u[e].t());
      Tensor dw_ue = dw_u[e];
      at::mm_out(dw_ue, xe.t(), due);
      dw_in[e].narrow(1, H, H).copy_(dw_ue);
      if (bias) db_in[e].narrow(0, H, H).copy_(due.sum(0, false, at::kFloat));
    }
  });
  // back to the tokens: dx[n] = sum_k dx_rows[row[k, n]]
  by_type(dx_rows, [&](auto t) {
    using T = decltype(t);
    by_type(dx, [&](auto o) {
      using O = decltype(o);
      gather_sum(data<T>(dx_rows), row.data_ptr<int64_t>(), static_cast<const float*>(nullptr), data<O>(dx), N, K, D);
    });
  });
}

// The router of kinds "topk" (gates renormalized over the chosen experts) and "switch" (gates the
// chosen probabilities), per token: softmax over the E experts in fp32 and its logsumexp, the top k
// of probs + selection bias (bias for choosing only), the gates. Returns indices (N, K), gates
// (N, K), probs (N, E), logsumexp (N). A few dozen flops a token: ATen's generic top-k and
// softmax kernels and the autograd graph around them cost far more than the math.
std::tuple<Tensor, Tensor, Tensor, Tensor> router_forward(const Tensor& logits_in, const Tensor& bias_in, int64_t K,
                                                          bool renormalize) {
  const Tensor logits = logits_in.contiguous(), bias = bias_in.to(at::kFloat).contiguous();
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && K >= 1 && K <= E && bias.numel() == E,
              "router: fp32 (N, E) logits, an (E,) bias and 1 <= K <= E");
  Tensor probs = at::empty({N, E}, logits.options()), lse = at::empty({N}, logits.options());
  Tensor gates = at::empty({N, K}, logits.options()), indices = at::empty({N, K}, logits.options().dtype(at::kLong));
  const float *l = logits.data_ptr<float>(), *b = bias.data_ptr<float>();
  float *p = probs.data_ptr<float>(), *z = lse.data_ptr<float>(), *g = gates.data_ptr<float>();
  int64_t* ix = indices.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<char> taken(E);
    for (int64_t n = begin; n < end; ++n) {
      const float* ln = l + n * E;
      float* pn = p + n * E;
      float top = ln[0];
      for (int64_t e = 1; e < E; ++e) top = std::max(top, ln[e]);
      float total = 0.f;
      for (int64_t e = 0; e < E; ++e) total += std::exp(ln[e] - top);
      z[n] = top + std::log(total);
      for (int64_t e = 0; e < E; ++e) pn[e] = std::exp(ln[e] - z[n]);
      std::fill(taken.begin(), taken.end(), 0);
      float chosen = 0.f;
      for (int64_t j = 0; j < K; ++j) {  // K passes of argmax over the experts not taken yet
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          if (taken[e]) continue;
          if (best < 0 || pn[e] + b[e] > pn[best] + b[best]) best = e;
        }
        taken[best] = 1;
        ix[n * K + j] = best;
        g[n * K + j] = pn[best];
        chosen += pn[best];
      }
      if (renormalize) {
        for (int64_t j = 0; j < K; ++j) g[n * K + j] /= chosen;
      }
    }
  });
  return {indices, gates, probs, lse};
}

// d logits from the gradients of the gates, the probs and the logsumexp (each may be empty: zero).
Tensor router_backward(const Tensor& probs, const Tensor& indices, const Tensor& d_gates_in,
                       const Tensor& d_probs_in, const Tensor& d_lse_in, bool renormalize) {
  const int64_t N = probs.size(0), E = probs.size(1), K = indices.size(1);
  const Tensor d_gates = present(d_gates_in) ? d_gates_in.to(at::kFloat).contiguous() : Tensor();
  const Tensor d_probs = present(d_probs_in) ? d_probs_in.to(at::kFloat).contiguous() : Tensor();
  const Tensor d_lse = present(d_lse_in) ? d_lse_in.to(at::kFloat).contiguous() : Tensor();
  Tensor d_logits = at::empty({N, E}, probs.options());
  const float* p = probs.data_ptr<float>();
  const int64_t* ix = indices.data_ptr<int64_t>();
  const float* dg = d_gates.defined() ? d_gates.data_ptr<float>() : nullptr;
  const float* dp = d_probs.defined() ? d_probs.data_ptr<float>() : nullptr;
  const float* dz = d_lse.defined() ? d_lse.data_ptr<float>() : nullptr;
  float* out = d_logits.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> grad(E);
    for (int64_t n = begin; n < end; ++n) {
      const float* pn = p + n * E;
      for (int64_t e = 0; e < E; ++e) grad[e] = dp ? dp[n * E + e] : 0.f;
      if (dg) {  // gate j = p[i_j] (/ sum_j p[i_j] when renormalized)
        float chosen = 0.f, weighted = 0.f;
        for (int64_t j = 0; j < K; ++j) chosen += pn[ix[n * K + j]];
        for (int64_t j = 0; j < K; ++j) weighted += dg[n * K + j] * pn[ix[n * K + j]] / chosen;
        for (int64_t j = 0; j < K; ++j) {
          grad[ix[n * K + j]] += renormalize ? (dg[n * K + j] - weighted) / chosen : dg[n * K + j];
        }
      }
      float dot = 0.f;  // softmax: d logits = p (grad - <grad, p>); logsumexp: d logits = d_lse p
      for (int64_t e = 0; e < E; ++e) dot += grad[e] * pn[e];
      const float extra = dz ? dz[n] : 0.f;
      for (int64_t e = 0; e < E; ++e) out[n * E + e] = pn[e] * (grad[e] - dot + extra);
    }
  });
  return d_logits;
}

// The dispatch plan of grouped_ffn.make_plan, as one counting sort (the Python version is ~10
// tensor ops, ~0.7 ms per layer call). Assignments a = k * N + n in that order (first choices
// before second choices, earlier tokens first); an expert keeps its first `capacity` (< 0: all);
// tokens with valid[n] false are left out; blocks padded to a multiple of `row_multiple` rows.
// Returns token (R,), slot (R,), row (K*N,), the rows of every expert and the assignments kept.
std::tuple<Tensor, Tensor, Tensor, std::vector<int64_t>, int64_t> plan(const Tensor& indices, int64_t n_experts,
                                                                      int64_t capacity, int64_t row_multiple,
                                                                      const Tensor& valid) {
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong, "plan: indices must be (N, K) int64");
  const Tensor idx = indices.contiguous();
  const int64_t N = idx.size(0), K = idx.size(1);
  TORCH_CHECK(row_multiple >= 1 && n_experts >= 1, "plan: row_multiple and n_experts must be >= 1");
  TORCH_CHECK(!present(valid) || valid.numel() == N, "plan: valid must have one entry per token");
  const int64_t* ex = idx.data_ptr<int64_t>();
  const Tensor ok = present(valid) ? valid.to(at::kBool).contiguous() : Tensor();
  const bool* keep = present(ok) ? ok.data_ptr<bool>() : nullptr;
  std::vector<int64_t> counts(n_experts, 0);
  for (int64_t n = 0; n < N; ++n) {
    if (keep && !keep[n]) continue;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = ex[n * K + k];
      TORCH_CHECK(e >= 0 && e < n_experts, "plan: expert index ", e, " out of range");
      ++counts[e];
    }
  }
  std::vector<int64_t> rows(n_experts), first(n_experts), filled(n_experts, 0);
  int64_t R = 0, kept = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    if (capacity >= 0) counts[e] = std::min(counts[e], capacity);
    kept += counts[e];
    rows[e] = (counts[e] + row_multiple - 1) / row_multiple * row_multiple;
    first[e] = R;
    R += rows[e];
  }
  Tensor token = at::zeros({R}, idx.options()), slot = at::full({R}, K * N, idx.options());
  Tensor row = at::full({K * N}, R, idx.options());
  int64_t *tok = token.data_ptr<int64_t>(), *sl = slot.data_ptr<int64_t>(), *rw = row.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      if (keep && !keep[n]) continue;
      const int64_t e = ex[n * K + k];
      if (filled[e] == counts[e]) continue;  // over capacity: dropped
      const int64_t r = first[e] + filled[e]++, a = k * N + n;
      tok[r] = n;
      sl[r] = a;
      rw[a] = r;
    }
  }
  return {token, slot, row, rows, kept};
}

}  // namespace

__attribute__((visibility("hidden"))) void register_experts(pybind11::module& m) {
  m.def("experts_forward", &forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("experts_backward", &backward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("experts_plan", &plan, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("router_forward", &router_forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("router_backward", &router_backward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
