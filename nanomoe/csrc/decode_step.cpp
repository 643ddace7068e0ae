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
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using at::Tensor;

// Batch sizes from which weights are repacked for the batched kernel (below it, matrix-vector).
int64_t PACK_MIN_BATCH = 2;
// and from which the packed weights go through AMX tiles (where the CPU has them)
int64_t AMX_MIN_BATCH = 8;

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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NANOMOE_VECTOR_ATTENTION 1
// e^x, 16 lanes: 2^n e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial (relative error
// ~1e-7); inputs clamped to where fp32 e^x is finite and normal.
inline __m512 exp_vec(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#endif

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
    padded = torch::zeros({blocks * PACK_ROWS, K}, W.options());
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
  if (pack && w.scalar_type() == torch::kBFloat16 && m.K % 2 == 0) m.packed = pack_pairs(w);
#endif
  return m;
}

template <typename T>
void apply(const Matrix& m, const T* X, const float* bias, float* Y, int64_t B, bool accumulate) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
#if defined(NANOMOE_AMX)
    if (m.packed.defined() && B >= AMX_MIN_BATCH && m.K % 32 == 0 && amx_ready()) {
      return linear_amx(X, m.packed, bias, Y, B, m.K, m.N, accumulate);
    }
#endif
    if (m.packed.defined()) return linear_packed(X, m.packed, bias, Y, B, m.K, m.N, accumulate);
  }
#endif
  linear<T>(X, reinterpret_cast<const T*>(m.w.data_ptr()), bias, Y, B, m.K, m.N, accumulate);
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

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
#if defined(NANOMOE_VECTOR_ATTENTION)
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
#if defined(NANOMOE_VECTOR_ATTENTION)
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
  return present(t) ? t.detach().to(torch::kFloat32).contiguous().clone() : Tensor();
}

const float* ptr_or_null(const Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }

struct Layer {
  Matrix qkv, proj, fc, out;
  Tensor attn_norm_w, attn_norm_b, qkv_b, proj_b;
  Tensor ffn_norm_w, ffn_norm_b, fc_b, out_b;
  Tensor k_cache, v_cache;  // (B, Hkv, S, d), the Python decoder's own buffers
};

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
    const bool pack = B_ >= PACK_MIN_BATCH;
    lm_head_ = make_matrix(matrices[2], pack);
    final_norm_w_ = fp32_copy(vectors[0]);
    final_norm_b_ = fp32_copy(vectors[1]);
    rope_cos_ = fp32_copy(vectors[2]);
    rope_sin_ = fp32_copy(vectors[3]);
    for (int64_t l = 0; l < L_; ++l) {
      Layer layer;
      layer.qkv = make_matrix(matrices[3 + 4 * l], pack);
      layer.proj = make_matrix(matrices[4 + 4 * l], pack);
      layer.fc = make_matrix(matrices[5 + 4 * l], pack);
      layer.out = make_matrix(matrices[6 + 4 * l], pack);
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
    padded_rows_ = B_ >= AMX_MIN_BATCH ? (B_ + 31) / 32 * 32 : B_;  // AMX reads rows in 32s
    in_bf16_.resize(bf16_ ? padded_rows_ * widest : 0);
    q_bf16_.resize(bf16_ ? B_ * qkv : 0);
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
      run<uint16_t>(tok_p, pad_p, pos.data(), slot, logits.data_ptr<float>(), in_bf16_, q_bf16_);
    } else {
      run<float>(tok_p, pad_p, pos.data(), slot, logits.data_ptr<float>(), in_f32_, in_f32_);
    }
    return logits;
  }

 private:
  template <typename T>
  static const T* data(const Tensor& t) {
    return reinterpret_cast<const T*>(t.data_ptr());
  }

  // B rows of K activations as a matrix product's input
  template <typename T>
  const T* input(const float* x, std::vector<T>& buf, int64_t K) const {
    return as_input(x, buf, B_ * K, padded_rows_ * K);
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
    for (const Layer& layer : layers_) {
      // attention: x += proj(attend(qkv(norm(x))))
      norm(x_.data(), layer.attn_norm_w, layer.attn_norm_b, h_.data());
      apply<T>(layer.qkv, input(h_.data(), in, D_), ptr_or_null(layer.qkv_b), qkv_.data(), B_, false);
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
      apply<T>(layer.proj, input(att_.data(), in, Hq_ * d_), ptr_or_null(layer.proj_b), x_.data(), B_, true);

      // feed-forward: x += out(act(fc(norm(x))))
      norm(x_.data(), layer.ffn_norm_w, layer.ffn_norm_b, h_.data());
      const int64_t fc_n = (ffn_ == 2 ? 2 : 1) * F_;
      apply<T>(layer.fc, input(h_.data(), in, D_), ptr_or_null(layer.fc_b), fc_.data(), B_, false);
      at::parallel_for(0, B_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) activation(fc_.data() + b * fc_n, act_.data() + b * F_, F_, ffn_);
      });
      apply<T>(layer.out, input(act_.data(), in, F_), ptr_or_null(layer.out_b), x_.data(), B_, true);
    }
    norm(x_.data(), final_norm_w_, final_norm_b_, h_.data());
    apply<T>(lm_head_, input(h_.data(), in, D_), nullptr, logits, B_, false);
  }

  int64_t L_, D_, Hq_, Hkv_, d_, F_, V_, block_, B_, S_, padded_rows_;
  bool rmsnorm_, rope_, bf16_;
  int ffn_;
  float eps_;
  Matrix lm_head_;
  Tensor tok_emb_, pos_emb_, final_norm_w_, final_norm_b_, rope_cos_, rope_sin_;
  std::vector<Layer> layers_;
  std::vector<float> x_, h_, qkv_, att_, fc_, act_, scores_, in_f32_;
  std::vector<uint16_t> in_bf16_, q_bf16_;
};

}  // namespace (internal linkage: two builds loaded in one process cannot interpose each other's code)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<int64_t>,
                    std::vector<std::string>, double>())
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
