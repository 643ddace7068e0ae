// One-token decode step of a dense nanomoe GPT on the CPU, as one C++ call.
//
// Why: at batch 1 a token is ~25 matrix-vector products over ~13 MB of bf16 weights. Under
// torch.compile the products run as scalar-reduction loops and every token pays ~0.3 ms of Python
// wrapper and guard checks; here each product reads four weight rows per pass with AVX512-BF16 dot
// products (or fp32 FMAs), and a token costs one Python call. Same math as nanomoe/model.py:
// pre-norm blocks (layernorm or rmsnorm), learned or rotary positions, grouped-query attention over
// a static KV cache, relu / gelu (tanh) / swiglu feed-forward, optional biases. Activations and
// accumulations are fp32; bf16 weights are read as bf16, and the matrix inputs are rounded to
// bf16 for them, as under autocast. Built on first use by nanomoe/native.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// ------------------------------------------------------------------------------------------------
// Four dot products of one input row x (K) with four weight rows: the weight rows are read once
// and x four times from L1, so a matrix-vector product streams its weights at memory speed.

inline void dot4(const float* x, const float* const w[4], int64_t K, float out[4]) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w[0] + k), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w[1] + k), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w[2] + k), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w[3] + k), a3);
  }
  if (k < K) {
    __mmask16 m = __mmask16((1u << (K - k)) - 1);
    __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w[0] + k), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w[1] + k), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w[2] + k), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w[3] + k), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0);
  out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2);
  out[3] = _mm512_reduce_add_ps(a3);
#else
  for (int r = 0; r < 4; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += x[k] * w[r][k];
    out[r] = acc;
  }
#endif
}

inline void dot4(const uint16_t* x, const uint16_t* const w[4], int64_t K, float out[4]) {
#if defined(__AVX512BF16__)
  // 32 bf16 pairs per instruction, accumulated in fp32
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    a0 = _mm512_dpbf16_ps(a0, xv, (__m512bh)_mm512_loadu_si512(w[0] + k));
    a1 = _mm512_dpbf16_ps(a1, xv, (__m512bh)_mm512_loadu_si512(w[1] + k));
    a2 = _mm512_dpbf16_ps(a2, xv, (__m512bh)_mm512_loadu_si512(w[2] + k));
    a3 = _mm512_dpbf16_ps(a3, xv, (__m512bh)_mm512_loadu_si512(w[3] + k));
  }
  if (k < K) {
    __mmask32 m = __mmask32((uint64_t(1) << (K - k)) - 1);
    __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
    a0 = _mm512_dpbf16_ps(a0, xv, (__m512bh)_mm512_maskz_loadu_epi16(m, w[0] + k));
    a1 = _mm512_dpbf16_ps(a1, xv, (__m512bh)_mm512_maskz_loadu_epi16(m, w[1] + k));
    a2 = _mm512_dpbf16_ps(a2, xv, (__m512bh)_mm512_maskz_loadu_epi16(m, w[2] + k));
    a3 = _mm512_dpbf16_ps(a3, xv, (__m512bh)_mm512_maskz_loadu_epi16(m, w[3] + k));
  }
  out[0] = _mm512_reduce_add_ps(a0);
  out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2);
  out[3] = _mm512_reduce_add_ps(a3);
#else
  for (int r = 0; r < 4; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(x[k]) * bf16_to_float(w[r][k]);
    out[r] = acc;
  }
#endif
}

// Y (B, N) = X (B, K) W^T (+ bias) (+ Y if accumulate), W (N, K) row-major as nn.Linear stores it.
// Threads split the output rows; each block of four weight rows serves every input row while it
// sits in L1.
template <typename T>
void linear(const T* X, const T* W, const float* bias, float* Y, int64_t B, int64_t K, int64_t N, bool accumulate) {
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * 4, rows = std::min<int64_t>(4, N - n);
      const T* w[4];
      for (int r = 0; r < 4; ++r) w[r] = W + (n + std::min<int64_t>(r, rows - 1)) * K;
      for (int64_t b = 0; b < B; ++b) {
        float out[4];
        dot4(X + b * K, w, K, out);
        float* y = Y + b * N + n;
        for (int64_t r = 0; r < rows; ++r) {
          float v = out[r] + (bias ? bias[n + r] : 0.f);
          y[r] = accumulate ? y[r] + v : v;
        }
      }
    }
  });
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// Matrix inputs in the weights' type: bf16 weights take bf16 inputs (the dot-product instruction
// multiplies bf16 pairs), fp32 weights the fp32 activations as they are.
inline const float* as_input(const float* x, std::vector<float>&, int64_t) { return x; }
inline const uint16_t* as_input(const float* x, std::vector<uint16_t>& buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = float_to_bf16(x[i]);
  return buf.data();
}

// Absent parts (no bias, no learned positions, ...) come from Python as empty tensors.
bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

Tensor fp32_copy(const Tensor& t) {
  return present(t) ? t.detach().to(torch::kFloat32).contiguous().clone() : Tensor();
}

const float* ptr_or_null(const Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }

struct Layer {
  Tensor attn_norm_w, attn_norm_b, qkv_w, qkv_b, proj_w, proj_b;
  Tensor ffn_norm_w, ffn_norm_b, fc_w, fc_b, out_w, out_b;
  Tensor k_cache, v_cache;  // (B, Hkv, S, d), the Python decoder's own buffers
};

}  // namespace

// The decoder of one model, batch size and cache. Holds references to the model's matrices and
// the cache buffers (no copies: bf16 weights stay bf16), and fp32 copies of the small vectors.
class DecodeStep {
 public:
  DecodeStep(std::vector<Tensor> matrices, std::vector<Tensor> vectors, std::vector<Tensor> caches,
             std::vector<int64_t> dims, std::vector<std::string> kinds, double norm_eps) {
    // dims: n_layer, n_embd, n_head, n_kv_head, head_dim, ffn_hidden, vocab, block_size, batch, max_len
    TORCH_CHECK(dims.size() == 10, "decode_step: expected 10 dims");
    L_ = dims[0]; D_ = dims[1]; Hq_ = dims[2]; Hkv_ = dims[3]; d_ = dims[4]; F_ = dims[5];
    V_ = dims[6]; block_ = dims[7]; B_ = dims[8]; S_ = dims[9];
    TORCH_CHECK(kinds.size() == 3, "decode_step: expected kinds norm, position, ffn");
    rmsnorm_ = kinds[0] == "rmsnorm";
    rope_ = kinds[1] == "rope";
    ffn_ = kinds[2] == "swiglu" ? 2 : kinds[2] == "gelu" ? 1 : 0;
    eps_ = float(norm_eps);
    // matrices: tok_emb, pos_emb (empty for rope), lm_head, then per layer qkv, proj, fc, out
    TORCH_CHECK(matrices.size() == size_t(3 + 4 * L_), "decode_step: wrong number of matrices");
    // vectors: final norm w, b, rope cos, sin, then per layer attn_norm w, b, qkv b, proj b,
    // ffn_norm w, b, fc b, out b (empty tensors where the model has none)
    TORCH_CHECK(vectors.size() == size_t(4 + 8 * L_), "decode_step: wrong number of vectors");
    TORCH_CHECK(caches.size() == size_t(2 * L_), "decode_step: wrong number of cache buffers");
    bf16_ = matrices[0].scalar_type() == torch::kBFloat16;
    for (const auto& m : matrices) {
      if (!present(m)) continue;
      TORCH_CHECK(m.is_contiguous() && m.device().is_cpu(), "decode_step: matrices must be contiguous CPU tensors");
      TORCH_CHECK(m.scalar_type() == matrices[0].scalar_type(), "decode_step: all matrices need one dtype");
    }
    for (const auto& c : caches) {
      TORCH_CHECK(c.is_contiguous() && c.scalar_type() == matrices[0].scalar_type(),
                  "decode_step: cache buffers must be contiguous, in the weights' dtype");
      TORCH_CHECK(c.size(0) == B_ && c.size(1) == Hkv_ && c.size(2) == S_ && c.size(3) == d_,
                  "decode_step: cache buffer shape");
    }
    tok_emb_ = matrices[0];
    pos_emb_ = matrices[1];
    lm_head_ = matrices[2];
    final_norm_w_ = fp32_copy(vectors[0]);
    final_norm_b_ = fp32_copy(vectors[1]);
    rope_cos_ = fp32_copy(vectors[2]);
    rope_sin_ = fp32_copy(vectors[3]);
    for (int64_t l = 0; l < L_; ++l) {
      Layer layer;
      layer.qkv_w = matrices[3 + 4 * l];
      layer.proj_w = matrices[4 + 4 * l];
      layer.fc_w = matrices[5 + 4 * l];
      layer.out_w = matrices[6 + 4 * l];
      const auto* v = &vectors[4 + 8 * l];
      layer.attn_norm_w = fp32_copy(v[0]);
      layer.attn_norm_b = fp32_copy(v[1]);
      layer.qkv_b = fp32_copy(v[2]);
      layer.proj_b = fp32_copy(v[3]);
      layer.ffn_norm_w = fp32_copy(v[4]);
      layer.ffn_norm_b = fp32_copy(v[5]);
      layer.fc_b = fp32_copy(v[6]);
      layer.out_b = fp32_copy(v[7]);
      layer.k_cache = caches[2 * l];
      layer.v_cache = caches[2 * l + 1];
      layers_.push_back(layer);
    }
    const int64_t qkv = (Hq_ + 2 * Hkv_) * d_, fc = (ffn_ == 2 ? 2 : 1) * F_;
    x_.resize(B_ * D_);
    h_.resize(B_ * D_);
    qkv_.resize(B_ * qkv);
    att_.resize(B_ * Hq_ * d_);
    fc_.resize(B_ * fc);
    act_.resize(B_ * F_);
    scores_.resize(B_ * Hq_ * S_);
    const int64_t widest = std::max({D_, F_, Hq_ * d_});
    in_f32_.resize(bf16_ ? 0 : 1);
    in_bf16_.resize(bf16_ ? B_ * widest : 0);
  }

  // tokens (B,) int64, each row's new token; slot: the cache slot it is written to; pad (B,) int64:
  // the first slot of each row's prompt (left padding). Returns the next-token logits (B, V) fp32.
  Tensor step(const Tensor& tokens, int64_t slot, const Tensor& pad) {
    TORCH_CHECK(tokens.numel() == B_ && pad.numel() == B_, "decode_step: one token and one pad per row");
    TORCH_CHECK(slot >= 0 && slot < S_, "decode_step: slot ", slot, " outside the cache of ", S_);
    auto tok = tokens.to(torch::kInt64).contiguous();
    auto pd = pad.to(torch::kInt64).contiguous();
    const int64_t* tok_p = tok.data_ptr<int64_t>();
    const int64_t* pad_p = pd.data_ptr<int64_t>();
    std::vector<int64_t> pos(B_);
    for (int64_t b = 0; b < B_; ++b) {
      TORCH_CHECK(tok_p[b] >= 0 && tok_p[b] < V_, "decode_step: token id ", tok_p[b], " outside the vocabulary");
      pos[b] = slot - pad_p[b];
      TORCH_CHECK(pad_p[b] >= 0 && pos[b] >= 0 && pos[b] < block_, "decode_step: position outside the model");
    }
    auto logits = torch::empty({B_, V_}, torch::kFloat32);
    if (bf16_) {
      run<uint16_t>(tok_p, pad_p, pos.data(), slot, logits.data_ptr<float>(), in_bf16_);
    } else {
      run<float>(tok_p, pad_p, pos.data(), slot, logits.data_ptr<float>(), in_f32_);
    }
    return logits;
  }

 private:
  template <typename T>
  static const T* data(const Tensor& t) {
    return reinterpret_cast<const T*>(t.data_ptr());
  }

  void norm(const float* x, const Tensor& w, const Tensor& b, float* y) const {
    const float* wp = w.data_ptr<float>();
    const float* bp = ptr_or_null(b);
    for (int64_t r = 0; r < B_; ++r) {
      const float* xr = x + r * D_;
      float* yr = y + r * D_;
      float mean = 0.f;
      if (!rmsnorm_) {
#pragma omp simd reduction(+ : mean)
        for (int64_t i = 0; i < D_; ++i) mean += xr[i];
        mean /= float(D_);
      }
      float var = 0.f;
#pragma omp simd reduction(+ : var)
      for (int64_t i = 0; i < D_; ++i) var += (xr[i] - mean) * (xr[i] - mean);
      const float rstd = 1.f / std::sqrt(var / float(D_) + eps_);
      for (int64_t i = 0; i < D_; ++i) yr[i] = (xr[i] - mean) * rstd * wp[i] + (bp ? bp[i] : 0.f);
    }
  }

  void rotate(float* v, int64_t p) const {  // rope, half-split layout: pairs (i, i + d/2)
    const float* c = rope_cos_.data_ptr<float>() + p * d_;
    const float* s = rope_sin_.data_ptr<float>() + p * d_;
    const int64_t half = d_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * c[i] - x2 * s[i];
      v[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
  }

  template <typename T>
  void run(const int64_t* tok, const int64_t* pad, const int64_t* pos, int64_t slot, float* logits,
           std::vector<T>& in) {
    const int64_t qkv_n = (Hq_ + 2 * Hkv_) * d_, G = Hq_ / Hkv_;
    const T* tok_emb = data<T>(tok_emb_);
    for (int64_t b = 0; b < B_; ++b) {
      for (int64_t i = 0; i < D_; ++i) {
        float v = load(tok_emb, tok[b] * D_ + i);
        if (present(pos_emb_)) v += load(data<T>(pos_emb_), pos[b] * D_ + i);
        x_[b * D_ + i] = v;
      }
    }
    for (const Layer& layer : layers_) {
      // attention: x += proj(attend(qkv(norm(x))))
      norm(x_.data(), layer.attn_norm_w, layer.attn_norm_b, h_.data());
      linear<T>(as_input(h_.data(), in, B_ * D_), data<T>(layer.qkv_w), ptr_or_null(layer.qkv_b), qkv_.data(), B_, D_,
                qkv_n, false);
      T* kc = reinterpret_cast<T*>(layer.k_cache.data_ptr());
      T* vc = reinterpret_cast<T*>(layer.v_cache.data_ptr());
      for (int64_t b = 0; b < B_; ++b) {
        float* row = qkv_.data() + b * qkv_n;
        if (rope_) {
          for (int64_t h = 0; h < Hq_ + Hkv_; ++h) rotate(row + h * d_, pos[b]);
        }
        for (int64_t h = 0; h < Hkv_; ++h) {  // this token's keys and values into its cache slot
          const int64_t at = ((b * Hkv_ + h) * S_ + slot) * d_;
          for (int64_t i = 0; i < d_; ++i) {
            store(kc, at + i, row[(Hq_ + h) * d_ + i]);
            store(vc, at + i, row[(Hq_ + Hkv_ + h) * d_ + i]);
          }
        }
      }
      const float scale = 1.f / std::sqrt(float(d_));
      at::parallel_for(0, B_ * Hq_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {  // one (row, query head) at a time
          const int64_t b = bh / Hq_, hq = bh % Hq_, h = hq / G;
          const float* q = qkv_.data() + b * qkv_n + hq * d_;
          const T* keys = kc + (b * Hkv_ + h) * S_ * d_;
          const T* values = vc + (b * Hkv_ + h) * S_ * d_;
          float* sc = scores_.data() + bh * S_;
          float top = -INFINITY;
          for (int64_t s = pad[b]; s <= slot; ++s) {  // this row's tokens, up to the new one
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d_; ++i) dot += q[i] * load(keys, s * d_ + i);
            sc[s] = dot * scale;
            top = std::max(top, sc[s]);
          }
          float total = 0.f;
          for (int64_t s = pad[b]; s <= slot; ++s) total += (sc[s] = std::exp(sc[s] - top));
          float* y = att_.data() + b * Hq_ * d_ + hq * d_;
          std::fill(y, y + d_, 0.f);
          for (int64_t s = pad[b]; s <= slot; ++s) {
            const float p = sc[s] / total;
#pragma omp simd
            for (int64_t i = 0; i < d_; ++i) y[i] += p * load(values, s * d_ + i);
          }
        }
      });
      linear<T>(as_input(att_.data(), in, B_ * Hq_ * d_), data<T>(layer.proj_w), ptr_or_null(layer.proj_b), x_.data(),
                B_, Hq_ * d_, D_, true);

      // feed-forward: x += out(act(fc(norm(x))))
      norm(x_.data(), layer.ffn_norm_w, layer.ffn_norm_b, h_.data());
      const int64_t fc_n = (ffn_ == 2 ? 2 : 1) * F_;
      linear<T>(as_input(h_.data(), in, B_ * D_), data<T>(layer.fc_w), ptr_or_null(layer.fc_b), fc_.data(), B_, D_, fc_n,
                false);
      for (int64_t b = 0; b < B_; ++b) {
        const float* f = fc_.data() + b * fc_n;
        float* a = act_.data() + b * F_;
        for (int64_t j = 0; j < F_; ++j) {
          if (ffn_ == 2) {  // [gate | up]: silu(gate) * up
            const float g = f[j];
            a[j] = g / (1.f + std::exp(-g)) * f[F_ + j];
          } else if (ffn_ == 1) {  // gelu, tanh approximation
            const float v = f[j];
            a[j] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
          } else {
            a[j] = std::max(f[j], 0.f);
          }
        }
      }
      linear<T>(as_input(act_.data(), in, B_ * F_), data<T>(layer.out_w), ptr_or_null(layer.out_b), x_.data(), B_, F_,
                D_, true);
    }
    norm(x_.data(), final_norm_w_, final_norm_b_, h_.data());
    linear<T>(as_input(h_.data(), in, B_ * D_), data<T>(lm_head_), nullptr, logits, B_, D_, V_, false);
  }

  int64_t L_, D_, Hq_, Hkv_, d_, F_, V_, block_, B_, S_;
  bool rmsnorm_, rope_, bf16_;
  int ffn_;
  float eps_;
  Tensor tok_emb_, pos_emb_, lm_head_, final_norm_w_, final_norm_b_, rope_cos_, rope_sin_;
  std::vector<Layer> layers_;
  std::vector<float> x_, h_, qkv_, att_, fc_, act_, scores_, in_f32_;
  std::vector<uint16_t> in_bf16_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<int64_t>,
                    std::vector<std::string>, double>())
      .def("step", &DecodeStep::step, py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512_bf16", []() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
  });
}
