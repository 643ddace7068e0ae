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

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with at::Tensor casters, without torch/extension.h's C++ frontend
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using at::Tensor;
using namespace nanomoe_simd;

// Batch sizes from which weights are repacked for the batched kernel (below it, matrix-vector).
int64_t PACK_MIN_BATCH = 2;
// and from which the packed weights go through AMX tiles (where the CPU has them)
int64_t AMX_MIN_BATCH = 8;

// ------------------------------------------------------------------------------------------------
// Four dot products of one input row x (K) with four weight rows: the weight rows are read once
// and x four times from L1, so a matrix-vector product streams its weights at memory speed.

#if defined(__AVX512F__)
inline void horizontal_sums(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float out[4]) {
  out[0] = _mm512_reduce_add_ps(a0);
  out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2);
  out[3] = _mm512_reduce_add_ps(a3);
}
#endif

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
  horizontal_sums(a0, a1, a2, a3, out);
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
  horizontal_sums(a0, a1, a2, a3, out);
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

#if defined(__AVX512BF16__)
// Batched steps: a matrix-vector loop re-reads every weight row for each input row and reduces
// each dot product across a vector's lanes. Instead the bf16 weights are repacked once into the
// layout vdpbf16ps multiplies (blocks of 32 output rows; per pair of inputs k, 32 rows x 2), so
// one instruction adds 16 rows' products for one input row, with no horizontal sums, and a block
// of up to 8 input rows shares every weight load.
constexpr int64_t PACK_ROWS = 32;
constexpr int PACK_MAX_BATCH = 8;

Tensor pack_pairs(const Tensor& W) {  // P[block][k / 2][row in block][k % 2] = W[block * 32 + row][k]
  const int64_t N = W.size(0), K = W.size(1), blocks = (N + PACK_ROWS - 1) / PACK_ROWS;
  Tensor padded = W;
  if (blocks * PACK_ROWS != N) {
    padded = at::zeros({blocks * PACK_ROWS, K}, W.options());
    padded.narrow(0, 0, N).copy_(W);
  }
  return padded.view({blocks, PACK_ROWS, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

template <int R>
void packed_block(const uint16_t* X, int64_t K, const uint16_t* P, const float* bias, float* Y, int64_t N,
                  int64_t n0, bool accumulate) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(P + kp * 2 * PACK_ROWS);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(P + kp * 2 * PACK_ROWS + PACK_ROWS);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, X + r * K + 2 * kp, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
    }
  }
  for (int v = 0; v < 2; ++v) {
    const int64_t n = n0 + v * 16;
    if (n >= N) break;
    const __mmask16 m = N - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - n)) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      float* y = Y + r * N + n;
      __m512 val = _mm512_add_ps(acc[r][v], b);
      if (accumulate) val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(m, y));
      _mm512_mask_storeu_ps(y, m, val);
    }
  }
}

// Y (B, N) = X (B, K) W^T (+ bias) (+ Y if accumulate) with W packed by pack_pairs (K even).
void linear_packed(const uint16_t* X, const Tensor& P, const float* bias, float* Y, int64_t B, int64_t K, int64_t N,
                   bool accumulate) {
  const int64_t blocks = P.size(0), chunks = (B + PACK_MAX_BATCH - 1) / PACK_MAX_BATCH;
  const uint16_t* packed = reinterpret_cast<const uint16_t*>(P.data_ptr());
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {  // consecutive items share a weight block
      const int64_t blk = item / chunks, b0 = (item % chunks) * PACK_MAX_BATCH;
      const int64_t rows = std::min<int64_t>(PACK_MAX_BATCH, B - b0);
      const uint16_t* p = packed + blk * (K / 2) * PACK_ROWS * 2;
      const uint16_t* x = X + b0 * K;
      float* y = Y + b0 * N;
      const int64_t n0 = blk * PACK_ROWS;
      switch (rows) {
        case 1: packed_block<1>(x, K, p, bias, y, N, n0, accumulate); break;
        case 2: packed_block<2>(x, K, p, bias, y, N, n0, accumulate); break;
        case 3: packed_block<3>(x, K, p, bias, y, N, n0, accumulate); break;
        case 4: packed_block<4>(x, K, p, bias, y, N, n0, accumulate); break;
        case 5: packed_block<5>(x, K, p, bias, y, N, n0, accumulate); break;
        case 6: packed_block<6>(x, K, p, bias, y, N, n0, accumulate); break;
        case 7: packed_block<7>(x, K, p, bias, y, N, n0, accumulate); break;
        default: packed_block<8>(x, K, p, bias, y, N, n0, accumulate); break;
      }
    }
  });
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define NANOMOE_AMX 1
// Many rows (a batched step): AMX tile products, 16 rows x 32 inputs times 32 inputs x 16 outputs
// per instruction, on the same packed weights (a 16-pair x 16-row half of a packed block is one
// B tile with a 128-byte stride).
bool amx_ready() {  // Linux hands out the tile registers per process, on request
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Y (B, N) = X W^T (+ bias) (+ Y if accumulate): X bf16 with rows padded with zeros to a multiple
// of 32, K a multiple of 32, W packed by pack_pairs.
void linear_amx(const uint16_t* X, const Tensor& P, const float* bias, float* Y, int64_t B, int64_t K, int64_t N,
                bool accumulate) {
  const int64_t blocks = P.size(0), row_pairs = (B + 31) / 32;
  const uint16_t* packed = reinterpret_cast<const uint16_t*>(P.data_ptr());
  at::parallel_for(0, blocks * row_pairs, 1, [&](int64_t begin, int64_t end) {
    TileConfig cfg;  // tiles 0-3: C (2 x 2 of 16 x 16 fp32); 4, 5: A (16 rows x 32); 6, 7: B
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    alignas(64) float c[4][16][16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item / row_pairs, m0 = (item % row_pairs) * 32;
      const uint16_t* p = packed + blk * (K / 2) * PACK_ROWS * 2;
      const uint16_t* x = X + m0 * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, x + k0, K * 2);
        _tile_loadd(5, x + 16 * K + k0, K * 2);
        _tile_loadd(6, p + k0 * PACK_ROWS, PACK_ROWS * 4);
        _tile_loadd(7, p + k0 * PACK_ROWS + PACK_ROWS, PACK_ROWS * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      for (int t = 0; t < 4; ++t) {
        const int64_t n = blk * PACK_ROWS + (t % 2) * 16;
        if (n >= N) continue;
        const __mmask16 m = N - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - n)) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < 16; ++r) {
          const int64_t row = m0 + (t / 2) * 16 + r;
          if (row >= B) break;
          float* y = Y + row * N + n;
          __m512 val = _mm512_add_ps(_mm512_loadu_ps(c[t][r]), b);
          if (accumulate) val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(m, y));
          _mm512_mask_storeu_ps(y, m, val);
        }
      }
    }
    _tile_release();
  });
}
#endif

// A weight matrix (N, K) as nn.Linear stores it, and its packed copy where the batched kernel applies.
struct Matrix {
  Tensor w, packed;
  int64_t N = 0, K = 0;
};

Matrix make_matrix(const Tensor& w, bool pack) {
  Matrix m;
  m.w = w;
  m.N = w.size(0);
  m.K = w.size(1);
#if defined(__AVX512BF16__)
  if (pack && w.scalar_type() == at::kBFloat16 && m.K % 2 == 0) m.packed = pack_pairs(w);
#endif
  return m;
}

// amx_min: the decoder's AMX threshold (its input buffers are padded for it when it is built)
template <typename T>
void apply(const Matrix& m, const T* X, const float* bias, float* Y, int64_t B, bool accumulate, int64_t amx_min) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
#if defined(NANOMOE_AMX)
    if (m.packed.defined() && B >= amx_min && m.K % 32 == 0 && amx_ready()) {
      return linear_amx(X, m.packed, bias, Y, B, m.K, m.N, accumulate);
    }
#endif
    if (m.packed.defined()) return linear_packed(X, m.packed, bias, Y, B, m.K, m.N, accumulate);
  }
#endif
  linear<T>(X, reinterpret_cast<const T*>(m.w.data_ptr()), bias, Y, B, m.K, m.N, accumulate);
}


// Matrix inputs in the weights' type: bf16 weights take bf16 inputs (the dot-product instruction
// multiplies bf16 pairs), fp32 weights the fp32 activations as they are.
// `padded` >= n: entries [n, padded) are zeroed (AMX tiles read rows in 32s past the batch).
inline const float* as_input(const float* x, std::vector<float>&, int64_t, int64_t = 0) { return x; }
inline const uint16_t* as_input(const float* x, std::vector<uint16_t>& buf, int64_t n, int64_t padded = 0) {
  int64_t i = 0;
  if (padded > n) std::fill(buf.begin() + n, buf.begin() + padded, 0);
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {  // round to nearest even, like float_to_bf16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf.data() + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  }
#endif
  for (; i < n; ++i) buf[i] = float_to_bf16(x[i]);
  return buf.data();
}

// softmax(q k^T / sqrt(d)) v for one query (fp32, d) over keys/values [lo, hi] of one cache head
// (rows of d in the cache's type); `q_in` is q in the cache's type (for the dot products), `sc` a
// scratch row, `y` the output (d).
template <typename T>
void attend(const float* q, const T* q_in, const T* keys, const T* values, int64_t lo, int64_t hi, int64_t d,
            float* sc, float* y) {
  const float scale = 1.f / std::sqrt(float(d));
  const int64_t n = hi - lo + 1;
  float top = -INFINITY;
#if defined(NANOMOE_AVX512)
  for (int64_t s = 0; s < n; s += 4) {  // four keys per pass: the matrix-vector kernel's dot products
    const int64_t rows = std::min<int64_t>(4, n - s);
    const T* w[4];
    for (int r = 0; r < 4; ++r) w[r] = keys + (lo + s + std::min<int64_t>(r, rows - 1)) * d;
    float out[4];
    dot4(q_in, w, d, out);
    for (int64_t r = 0; r < rows; ++r) top = std::max(top, sc[s + r] = out[r] * scale);
  }
  __m512 total_v = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail_mask(n - s);
    const __m512 e = exp_vec(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(sc + s, m, e);
    total_v = _mm512_add_ps(total_v, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv_total = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total_v));
  for (int64_t i = 0; i < d; i += 16) {  // y = sum_s p_s v_s, 16 lanes of the head at a time
    const __mmask16 m = tail_mask(d - i);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) acc = _mm512_fmadd_ps(_mm512_set1_ps(sc[s]), load16(values + (lo + s) * d + i, m), acc);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(acc, inv_total));
  }
#else
  (void)q_in;
  for (int64_t s = 0; s < n; ++s) {
    float dot = 0.f;
    for (int64_t i = 0; i < d; ++i) dot += q[i] * load(keys, (lo + s) * d + i);
    top = std::max(top, sc[s] = dot * scale);
  }
  float total = 0.f;
  for (int64_t s = 0; s < n; ++s) total += (sc[s] = std::exp(sc[s] - top));
  std::fill(y, y + d, 0.f);
  for (int64_t s = 0; s < n; ++s) {
    const float p = sc[s] / total;
    for (int64_t i = 0; i < d; ++i) y[i] += p * load(values, (lo + s) * d + i);
  }
#endif
}

// The feed-forward's hidden activation of one row: f holds [gate | up] for swiglu (kind 2), the
// pre-activation for gelu (tanh approximation, kind 1) or relu (kind 0); a gets F values.
void activation(const float* f, float* a, int64_t F, int kind) {
  int64_t j = 0;
#if defined(NANOMOE_AVX512)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; j + 16 <= F; j += 16) {
    const __m512 v = _mm512_loadu_ps(f + j);
    __m512 out;
    if (kind == 2) {  // silu(gate) * up = gate / (1 + e^-gate) * up
      out = _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, exp_vec(_mm512_sub_ps(_mm512_setzero_ps(), v)))),
                          _mm512_loadu_ps(f + F + j));
    } else if (kind == 1) {  // 0.5 v (1 + tanh(z)) = v (1 - 1 / (e^2z + 1))
      const __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                     _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), _mm512_mul_ps(v, _mm512_mul_ps(v, v)), v));
      const __m512 e2z = exp_vec(_mm512_add_ps(z, z));
      out = _mm512_mul_ps(v, _mm512_sub_ps(one, _mm512_div_ps(one, _mm512_add_ps(e2z, one))));
    } else {
      out = _mm512_max_ps(v, _mm512_setzero_ps());
    }
    _mm512_storeu_ps(a + j, out);
  }
#endif
  for (; j < F; ++j) {
    const float v = f[j];
    if (kind == 2) {
      a[j] = v / (1.f + std::exp(-v)) * f[F + j];
    } else if (kind == 1) {
      a[j] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    } else {
      a[j] = std::max(v, 0.f);
    }
  }
}

// Absent parts (no bias, no learned positions, ...) come from Python as empty tensors.
bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

Tensor fp32_copy(const Tensor& t) {
  return present(t) ? t.detach().to(at::kFloat).contiguous().clone() : Tensor();
}

const float* ptr_or_null(const Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }

using Named = std::map<std::string, Tensor>;

Tensor get(const Named& m, const char* key) {  // absent entries (no bias, dense layer, ...) are undefined
  const auto it = m.find(key);
  return it == m.end() ? Tensor() : it->second;
}

// A dense feed-forward (or the shared expert of an MoE layer): out(act(fc(x))).
struct FeedForward {
  Matrix fc, out;
  Tensor fc_b, out_b;
};

// The routed experts of an MoE layer, each as its two matrices in nn.Linear's (out, in) layout.
struct Experts {
  Tensor gate, selection_bias;  // (E, D) and (E,), fp32: routing runs in fp32 as in the model
  std::vector<Matrix> in, out;  // per expert: (H or 2H, D) and (D, H)
  Tensor in_b, out_b;           // (E, H or 2H), (E, D) fp32, or undefined
  bool has_shared = false;
  FeedForward shared;
};

struct Layer {
  Matrix qkv, proj;
  Tensor attn_norm_w, attn_norm_b, qkv_b, proj_b, ffn_norm_w, ffn_norm_b;
  bool moe = false;
  FeedForward ffn;  // dense layers
  Experts experts;  // MoE layers
  Tensor k_cache, v_cache;  // (B, Hkv, S, d), the Python decoder's own buffers
};

// The decoder of one model, batch size and cache. Holds references to the model's matrices at one
// row (packed copies for batches; transposed copies of expert weights) and the cache buffers, and
// fp32 copies of the small vectors.
class DecodeStep {
 public:
  // globals: tok_emb, lm_head, final_norm_w, and where the model has them pos_emb, final_norm_b,
  // rope_cos, rope_sin. layers: per block the entries read in the constructor below.
  // dims: n_embd, n_head, n_kv_head, head_dim, ffn_hidden, vocab, block_size, batch, max_len,
  // n_experts, top_k, expert_hidden. kinds: norm, position, ffn, router.
  DecodeStep(Named globals, std::vector<Named> layers, std::vector<int64_t> dims, std::vector<std::string> kinds,
             double norm_eps) {
    TORCH_CHECK(dims.size() == 12, "decode_step: expected 12 dims");
    TORCH_CHECK(kinds.size() == 4, "decode_step: expected kinds norm, position, ffn, router");
    D_ = dims[0]; Hq_ = dims[1]; Hkv_ = dims[2]; d_ = dims[3]; F_ = dims[4]; V_ = dims[5]; block_ = dims[6];
    B_ = dims[7]; S_ = dims[8]; E_ = dims[9]; K_ = dims[10]; Fe_ = dims[11];
    L_ = int64_t(layers.size());
    rmsnorm_ = kinds[0] == "rmsnorm";
    rope_ = kinds[1] == "rope";
    ffn_ = kinds[2] == "swiglu" ? 2 : kinds[2] == "gelu" ? 1 : 0;
    router_ = kinds[3] == "noisy_topk" ? 2 : kinds[3] == "topk" ? 1 : 0;  // 0: switch
    eps_ = float(norm_eps);
    check_shapes(globals, layers);
    tok_emb_ = get(globals, "tok_emb");
    dtype_ = tok_emb_.scalar_type();
    bf16_ = dtype_ == at::kBFloat16;
    amx_min_ = AMX_MIN_BATCH;  // the thresholds as they are now: the buffers below are sized for them
    const bool pack = B_ >= PACK_MIN_BATCH;
    pos_emb_ = weights(get(globals, "pos_emb"), false);
    lm_head_ = matrix(get(globals, "lm_head"), pack);
    final_norm_w_ = fp32_copy(get(globals, "final_norm_w"));
    final_norm_b_ = fp32_copy(get(globals, "final_norm_b"));
    rope_cos_ = fp32_copy(get(globals, "rope_cos"));
    rope_sin_ = fp32_copy(get(globals, "rope_sin"));
    for (const Named& t : layers) {
      Layer layer;
      layer.qkv = matrix(get(t, "qkv_w"), pack);
      layer.proj = matrix(get(t, "proj_w"), pack);
      layer.attn_norm_w = fp32_copy(get(t, "attn_norm_w"));
      layer.attn_norm_b = fp32_copy(get(t, "attn_norm_b"));
      layer.qkv_b = fp32_copy(get(t, "qkv_b"));
      layer.proj_b = fp32_copy(get(t, "proj_b"));
      layer.ffn_norm_w = fp32_copy(get(t, "ffn_norm_w"));
      layer.ffn_norm_b = fp32_copy(get(t, "ffn_norm_b"));
      layer.moe = present(get(t, "gate_w"));
      if (layer.moe) {
        Experts& ex = layer.experts;
        ex.gate = fp32_copy(get(t, "gate_w"));
        ex.selection_bias = fp32_copy(get(t, "selection_bias"));
        const Tensor in = weights(get(t, "experts_in"), true), out = weights(get(t, "experts_out"), true);
        TORCH_CHECK(in.size(0) == E_ && out.size(0) == E_, "decode_step: one matrix per expert");
        for (int64_t e = 0; e < E_; ++e) {
          ex.in.push_back(matrix(in.select(0, e), pack));
          ex.out.push_back(matrix(out.select(0, e), pack));
        }
        ex.in_b = fp32_copy(get(t, "experts_in_b"));
        ex.out_b = fp32_copy(get(t, "experts_out_b"));
        ex.has_shared = present(get(t, "shared_fc_w"));
        if (ex.has_shared) ex.shared = make_feed_forward(t, "shared_fc_w", "shared_fc_b", "shared_out_w", "shared_out_b", pack);
        ++n_moe_;
      } else {
        layer.ffn = make_feed_forward(t, "fc_w", "fc_b", "out_w", "out_b", pack);
      }
      layer.k_cache = get(t, "k_cache");
      layer.v_cache = get(t, "v_cache");
      for (const Tensor* c : {&layer.k_cache, &layer.v_cache}) {
        TORCH_CHECK(present(*c) && c->is_contiguous() && c->scalar_type() == dtype_,
                    "decode_step: cache buffers must be contiguous, in the weights' dtype");
        TORCH_CHECK(c->size(0) == B_ && c->size(1) == Hkv_ && c->size(2) == S_ && c->size(3) == d_,
                    "decode_step: cache buffer shape");
      }
      layers_.push_back(std::move(layer));
    }
    const int64_t qkv = (Hq_ + 2 * Hkv_) * d_;
    int64_t hidden = std::max(F_, Fe_);  // the widest feed-forward: dense, expert or shared expert
    for (const Layer& layer : layers_) {
      if (layer.moe && layer.experts.has_shared) hidden = std::max(hidden, layer.experts.shared.out.K);
    }
    const int64_t fc = (ffn_ == 2 ? 2 : 1) * hidden;
    x_.resize(B_ * D_);
    h_.resize(B_ * D_);
    qkv_.resize(B_ * qkv);
    att_.resize(B_ * Hq_ * d_);
    fc_.resize(B_ * fc);
    act_.resize(B_ * hidden);
    y_.resize(B_ * D_);
    scores_.resize(B_ * Hq_ * S_);
    route_w_.resize(B_ * std::max<int64_t>(K_, 1));
    const int64_t widest = std::max({D_, hidden, Hq_ * d_});
    padded_rows_ = B_ >= amx_min_ ? (B_ + 31) / 32 * 32 : B_;  // AMX reads rows in 32s
    in_f32_.resize(1);  // (fp32 weights read the fp32 activations directly)
    in_bf16_.resize(bf16_ ? padded_rows_ * widest : 0);
    q_bf16_.resize(bf16_ ? B_ * qkv : 0);
  }

  // tokens (B,) int64, each row's new token; slot: the cache slot it is written to; pad (B,) int64:
  // the first slot of each row's prompt (left padding). Returns the next-token logits (B, V) fp32
  // and the experts each row's token went to, (MoE layers, B, top_k) int64.
  std::tuple<Tensor, Tensor> step(const Tensor& tokens, int64_t slot, const Tensor& pad) {
    TORCH_CHECK(tokens.numel() == B_ && pad.numel() == B_, "decode_step: one token and one pad per row");
    TORCH_CHECK(tokens.device().is_cpu() && pad.device().is_cpu(), "decode_step: tokens and pad must be on the CPU");
    TORCH_CHECK(slot >= 0 && slot < S_, "decode_step: slot ", slot, " outside the cache of ", S_);
    auto tok = tokens.to(at::kLong).contiguous();
    auto pd = pad.to(at::kLong).contiguous();
    const int64_t* tok_p = tok.data_ptr<int64_t>();
    const int64_t* pad_p = pd.data_ptr<int64_t>();
    std::vector<int64_t> pos(B_);
    for (int64_t b = 0; b < B_; ++b) {
      TORCH_CHECK(tok_p[b] >= 0 && tok_p[b] < V_, "decode_step: token id ", tok_p[b], " outside the vocabulary");
      pos[b] = slot - pad_p[b];
      TORCH_CHECK(pad_p[b] >= 0 && pos[b] >= 0 && pos[b] < block_, "decode_step: position outside the model");
    }
    auto logits = at::empty({B_, V_}, at::kFloat);
    auto experts = at::empty({n_moe_, B_, K_}, at::kLong);
    if (bf16_) {
      run<uint16_t>(tok_p, pad_p, pos.data(), slot, logits.data_ptr<float>(), experts.data_ptr<int64_t>(), in_bf16_,
                    q_bf16_);
    } else {
      run<float>(tok_p, pad_p, pos.data(), slot, logits.data_ptr<float>(), experts.data_ptr<int64_t>(), in_f32_,
                 in_f32_);
    }
    return {logits, experts};
  }

 private:
  template <typename T>
  static const T* data(const Tensor& t) {
    return reinterpret_cast<const T*>(t.data_ptr());
  }

  // Every tensor against the sizes the kernels index by (the config's): a mismatch would read or
  // write out of bounds, so it is refused here.
  void check_shapes(const Named& g, const std::vector<Named>& layers) const {
    const int64_t fcw = ffn_ == 2 ? 2 : 1, qkv = (Hq_ + 2 * Hkv_) * d_;
    TORCH_CHECK(Hkv_ > 0 && Hq_ % Hkv_ == 0 && (!rope_ || d_ % 2 == 0), "decode_step: head layout");
    expect(g, "tok_emb", {V_, D_});
    expect(g, "lm_head", {V_, D_});
    expect(g, "final_norm_w", {D_});
    expect(g, "final_norm_b", {D_}, true);
    expect_table(g, "pos_emb", D_, true);
    if (rope_) {
      expect_table(g, "rope_cos", d_, false);
      expect_table(g, "rope_sin", d_, false);
    }
    for (const Named& t : layers) {
      expect(t, "attn_norm_w", {D_});
      expect(t, "attn_norm_b", {D_}, true);
      expect(t, "ffn_norm_w", {D_});
      expect(t, "ffn_norm_b", {D_}, true);
      expect(t, "qkv_w", {qkv, D_});
      expect(t, "qkv_b", {qkv}, true);
      expect(t, "proj_w", {D_, Hq_ * d_});
      expect(t, "proj_b", {D_}, true);
      if (!present(get(t, "gate_w"))) {
        expect(t, "fc_w", {fcw * F_, D_});
        expect(t, "fc_b", {fcw * F_}, true);
        expect(t, "out_w", {D_, F_});
        expect(t, "out_b", {D_}, true);
        continue;
      }
      TORCH_CHECK(K_ >= 1 && K_ <= E_, "decode_step: top_k must be between 1 and n_experts");
      expect(t, "gate_w", {E_, D_});
      expect(t, "selection_bias", {E_});
      expect(t, "experts_in", {E_, fcw * Fe_, D_});
      expect(t, "experts_in_b", {E_, fcw * Fe_}, true);
      expect(t, "experts_out", {E_, D_, Fe_});
      expect(t, "experts_out_b", {E_, D_}, true);
      if (present(get(t, "shared_fc_w"))) {
        const Tensor out = get(t, "shared_out_w");
        TORCH_CHECK(present(out) && out.dim() == 2, "decode_step: shared_out_w missing");
        const int64_t hidden = out.size(1);
        expect(t, "shared_out_w", {D_, hidden});
        expect(t, "shared_out_b", {D_}, true);
        expect(t, "shared_fc_w", {fcw * hidden, D_});
        expect(t, "shared_fc_b", {fcw * hidden}, true);
      }
    }
  }

  static void expect(const Named& m, const char* key, std::vector<int64_t> shape, bool optional = false) {
    const Tensor t = get(m, key);
    if (!present(t)) {
      TORCH_CHECK(optional, "decode_step: ", key, " missing");
      return;
    }
    TORCH_CHECK(t.sizes().vec() == shape, "decode_step: ", key, " has shape ", t.sizes(),
                ", the model config implies ", c10::IntArrayRef(shape));
  }

  void expect_table(const Named& m, const char* key, int64_t width, bool optional) const {  // a row per position
    const Tensor t = get(m, key);
    if (!present(t)) {
      TORCH_CHECK(optional, "decode_step: ", key, " missing");
      return;
    }
    TORCH_CHECK(t.dim() == 2 && t.size(0) >= block_ && t.size(1) == width, "decode_step: ", key, " has shape ",
                t.sizes(), ", the model config implies at least ", block_, " rows of ", width);
  }

  Tensor weights(const Tensor& w, bool required) const {  // a weight tensor in place, checked
    if (!present(w)) {
      TORCH_CHECK(!required, "decode_step: a weight matrix is missing");
      return Tensor();
    }
    TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "decode_step: weights must be contiguous CPU tensors");
    TORCH_CHECK(w.scalar_type() == dtype_, "decode_step: all weight matrices need the embedding's dtype");
    return w;
  }

  Matrix matrix(const Tensor& w, bool pack) const { return make_matrix(weights(w, true), pack); }

  FeedForward make_feed_forward(const Named& t, const char* fc, const char* fc_b, const char* out, const char* out_b,
                           bool pack) const {
    FeedForward f;
    f.fc = matrix(get(t, fc), pack);
    f.out = matrix(get(t, out), pack);
    f.fc_b = fp32_copy(get(t, fc_b));
    f.out_b = fp32_copy(get(t, out_b));
    return f;
  }

  template <typename T>
  void product(const Matrix& m, const T* X, const float* bias, float* Y, int64_t rows, bool accumulate) const {
    apply<T>(m, X, bias, Y, rows, accumulate, amx_min_);
  }

  // `rows` rows of K activations as a matrix product's input (zero rows up to what AMX reads)
  template <typename T>
  const T* input(const float* x, std::vector<T>& buf, int64_t K, int64_t rows) const {
    const int64_t padded = rows >= amx_min_ ? (rows + 31) / 32 * 32 : rows;
    return as_input(x, buf, rows * K, padded * K);
  }
  template <typename T>
  const T* input(const float* x, std::vector<T>& buf, int64_t K) const {
    return input(x, buf, K, B_);
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

  // y (rows, D) (+)= out(act(fc(x))) for x given as the matrix input (rows, D); hidden width F.
  template <typename T>
  void feed_forward(const FeedForward& f, const T* x, int64_t rows, int64_t F, float* y, bool accumulate,
                    std::vector<T>& in) {
    const int64_t fc_n = (ffn_ == 2 ? 2 : 1) * F;
    product<T>(f.fc, x, ptr_or_null(f.fc_b), fc_.data(), rows, false);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) activation(fc_.data() + b * fc_n, act_.data() + b * F, F, ffn_);
    });
    product<T>(f.out, input(act_.data(), in, F, rows), ptr_or_null(f.out_b), y, rows, accumulate);
  }

  // Routing of every row (as the model's Router in eval mode: no noise), then each chosen expert
  // on the rows that chose it; x += sum_k gate_k * expert_k(h). `chosen` gets (B, K) expert ids.
  template <typename T>
  void routed_experts(const Experts& ex, int64_t* chosen, std::vector<T>& in) {
    const float* gate = ex.gate.data_ptr<float>();
    const float* bias = ex.selection_bias.data_ptr<float>();
    std::vector<float> hr(D_), logits(E_), probs(E_), sel(E_);
    for (int64_t b = 0; b < B_; ++b) {
      // the router sees the normalized row in the model's dtype, upcast (fp32 router math)
      for (int64_t i = 0; i < D_; ++i) hr[i] = bf16_ ? bf16_to_float(float_to_bf16(h_[b * D_ + i])) : h_[b * D_ + i];
      float top = -INFINITY;
      for (int64_t e = 0; e < E_; ++e) {
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D_; ++i) dot += hr[i] * gate[e * D_ + i];
        logits[e] = dot;
        top = std::max(top, dot);
      }
      float total = 0.f;
      for (int64_t e = 0; e < E_; ++e) total += (probs[e] = std::exp(logits[e] - top));
      for (int64_t e = 0; e < E_; ++e) {
        probs[e] /= total;
        sel[e] = (router_ == 2 ? logits[e] : probs[e]) + bias[e];
      }
      float kept = 0.f, kept_top = -INFINITY;
      for (int64_t k = 0; k < K_; ++k) {  // top-k by selection score, best first (ties: lower id)
        int64_t best = -1;
        for (int64_t e = 0; e < E_; ++e) {
          if (sel[e] != -INFINITY && (best < 0 || sel[e] > sel[best])) best = e;
        }
        TORCH_CHECK(best >= 0, "decode_step: router scores are not finite");
        sel[best] = -INFINITY;
        chosen[b * K_ + k] = best;
        route_w_[b * K_ + k] = router_ == 2 ? logits[best] : probs[best];
        kept += probs[best];
        kept_top = std::max(kept_top, logits[best]);
      }
      float* w = route_w_.data() + b * K_;
      if (router_ == 2) {  // noisy_topk: softmax over the kept logits
        float z = 0.f;
        for (int64_t k = 0; k < K_; ++k) z += (w[k] = std::exp(w[k] - kept_top));
        for (int64_t k = 0; k < K_; ++k) w[k] /= z;
      } else if (router_ == 1) {  // topk: kept probabilities renormalized
        for (int64_t k = 0; k < K_; ++k) w[k] /= kept;
      }  // switch: the raw probabilities
    }
    const int64_t in_n = (ffn_ == 2 ? 2 : 1) * Fe_;
    std::vector<int64_t> rows;
    std::vector<float> gates;
    for (int64_t e = 0; e < E_; ++e) {
      rows.clear();
      gates.clear();
      for (int64_t b = 0; b < B_; ++b) {
        for (int64_t k = 0; k < K_; ++k) {
          if (chosen[b * K_ + k] == e) {
            rows.push_back(b);
            gates.push_back(route_w_[b * K_ + k]);
          }
        }
      }
      const int64_t n = int64_t(rows.size());
      if (n == 0) continue;
      for (int64_t r = 0; r < n; ++r) std::copy_n(h_.data() + rows[r] * D_, D_, y_.data() + r * D_);  // gather
      const T* xe = input(y_.data(), in, D_, n);
      product<T>(ex.in[e], xe, ex.in_b.defined() ? ex.in_b.data_ptr<float>() + e * in_n : nullptr, fc_.data(), n, false);
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) activation(fc_.data() + r * in_n, act_.data() + r * Fe_, Fe_, ffn_);
      });
      product<T>(ex.out[e], input(act_.data(), in, Fe_, n), ex.out_b.defined() ? ex.out_b.data_ptr<float>() + e * D_ : nullptr,
               y_.data(), n, false);
      for (int64_t r = 0; r < n; ++r) {  // combine, weighted by the gate
        float* xr = x_.data() + rows[r] * D_;
        const float* yr = y_.data() + r * D_;
        const float g = gates[r];
#pragma omp simd
        for (int64_t i = 0; i < D_; ++i) xr[i] += g * yr[i];
      }
    }
  }

  template <typename T>
  void run(const int64_t* tok, const int64_t* pad, const int64_t* pos, int64_t slot, float* logits, int64_t* experts,
           std::vector<T>& in, std::vector<T>& in_q) {
    const int64_t qkv_n = (Hq_ + 2 * Hkv_) * d_, G = Hq_ / Hkv_;
    const T* tok_emb = data<T>(tok_emb_);
    for (int64_t b = 0; b < B_; ++b) {
      for (int64_t i = 0; i < D_; ++i) {
        float v = load(tok_emb, tok[b] * D_ + i);
        if (present(pos_emb_)) v += load(data<T>(pos_emb_), pos[b] * D_ + i);
        x_[b * D_ + i] = v;
      }
    }
    int64_t moe_layer = 0;
    for (const Layer& layer : layers_) {
      // attention: x += proj(attend(qkv(norm(x))))
      norm(x_.data(), layer.attn_norm_w, layer.attn_norm_b, h_.data());
      product<T>(layer.qkv, input(h_.data(), in, D_), ptr_or_null(layer.qkv_b), qkv_.data(), B_, false);
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
      const T* q_in = as_input(qkv_.data(), in_q, B_ * qkv_n);  // (only the query part is read)
      at::parallel_for(0, B_ * Hq_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {  // one (row, query head) at a time
          const int64_t b = bh / Hq_, hq = bh % Hq_, h = hq / G;
          const int64_t q_at = b * qkv_n + hq * d_, kv_at = (b * Hkv_ + h) * S_ * d_;
          // this row's tokens, from its first prompt slot up to the new one
          attend<T>(qkv_.data() + q_at, q_in + q_at, kc + kv_at, vc + kv_at, pad[b], slot, d_,
                    scores_.data() + bh * S_, att_.data() + b * Hq_ * d_ + hq * d_);
        }
      });
      product<T>(layer.proj, input(att_.data(), in, Hq_ * d_), ptr_or_null(layer.proj_b), x_.data(), B_, true);

      // feed-forward: x += ffn(norm(x)), dense or mixture of experts
      norm(x_.data(), layer.ffn_norm_w, layer.ffn_norm_b, h_.data());
      if (!layer.moe) {
        feed_forward<T>(layer.ffn, input(h_.data(), in, D_), B_, F_, x_.data(), true, in);
        continue;
      }
      if (layer.experts.has_shared) {  // a dense FFN every token goes through, hidden n_shared x expert_hidden
        const int64_t shared_hidden = layer.experts.shared.out.K;
        feed_forward<T>(layer.experts.shared, input(h_.data(), in, D_), B_, shared_hidden, x_.data(), true, in);
      }
      routed_experts<T>(layer.experts, experts + moe_layer * B_ * K_, in);
      ++moe_layer;
    }
    norm(x_.data(), final_norm_w_, final_norm_b_, h_.data());
    product<T>(lm_head_, input(h_.data(), in, D_), nullptr, logits, B_, false);
  }

  int64_t L_, D_, Hq_, Hkv_, d_, F_, V_, block_, B_, S_, E_, K_, Fe_, padded_rows_, amx_min_, n_moe_ = 0;
  bool rmsnorm_, rope_, bf16_;
  int ffn_, router_;
  float eps_;
  at::ScalarType dtype_;
  Matrix lm_head_;
  Tensor tok_emb_, pos_emb_, final_norm_w_, final_norm_b_, rope_cos_, rope_sin_;
  std::vector<Layer> layers_;
  std::vector<float> x_, h_, y_, qkv_, att_, fc_, act_, scores_, route_w_, in_f32_;
  std::vector<uint16_t> in_bf16_, q_bf16_;
};

}  // namespace (internal linkage: two builds loaded in one process cannot interpose each other's code)

// hidden: two builds loaded in one process (tests do) cannot bind each other's function
__attribute__((visibility("hidden"))) void register_decode_step(pybind11::module& m) {
  // module_local: builds with other flags (tests/test_native_decode.py) load next to this one
  py::class_<DecodeStep>(m, "DecodeStep", py::module_local())
      .def(py::init<Named, std::vector<Named>, std::vector<int64_t>, std::vector<std::string>, double>())
      .def("step", &DecodeStep::step, py::call_guard<py::gil_scoped_release>());
  m.def("set_pack_min_batch", [](int64_t b) { PACK_MIN_BATCH = b; });
  m.def("set_amx_min_batch", [](int64_t b) { AMX_MIN_BATCH = b; });
  m.def("has_avx512_bf16", []() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
  });
}
