// AVX2 kernels for decode on x86 CPUs: matrix-vector products over fp32, int8 (per-row scale) and int4
// (group-wise scale + min) weights, the SwiGLU experts step, decode attention, the router, and
// `decode_layers`, which runs every decoder layer of one decode step in a single call.
//
// Decode reads every chosen weight once per token, so the kernels are written to stream weights at
// memory speed. fp32 weights meet fp32 activations. Quantized weights meet activations quantized to
// int8 in blocks of 32 (one fp32 scale per block, as llama.cpp's Q8_0/Q8_1 do), so the inner loop is
// an integer dot product (vpmaddubsw) instead of widening every weight to fp32, which is what bounds a
// widening kernel on a small CPU. With `quant_act` false they widen weights to fp32 instead (exact
// weight-only numbers, slower). Kernels serve few rows (decode, small batches); prefill dequantizes and
// uses fp32 matrix products in Python.
//
// Layouts (see mixtral/quant/__init__.py for the file format):
//   int8: q (O, K) int8, scale (O,) fp32:           w[o, k] = q[o, k] * scale[o]
//   int4: q (O, K/2) uint8, scale/min (O, K/G) fp16: w[o, k] = nibble(o, k) * scale[o, g] + min[o, g]
//         weights in blocks of 32; blocks pair up: bytes [32p, 32p + 32) of a row hold block 2p in
//         their low nibbles and block 2p + 1 in their high nibbles (one load and two masks unpack 64
//         weights); an unpaired last block holds weight j (low) and j + 16 (high) in its byte j.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t QB = 32;  // activation quantization block

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Eight weights widened to fp32, per stored type.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// sum_k w[k] x[k], w widened in registers; four accumulators so the fma latency does not bound it.
template <class T>
inline float dot_widened(const T* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += float(w[k]) * x[k];
  return s;
}

// ---- activations ----------------------------------------------------------------------------------

// One activation row as the row kernels read it: fp32 values, and for quantized weights either its
// int8 blocks (q, d: scale per block of 32, s: d * sum of the block's q) or fp32 group sums (gsum, for
// the int4 min term on the fp32 path).
struct Act {
  const float* x;
  const int8_t* q = nullptr;
  const float* d = nullptr;
  const float* s = nullptr;
  const float* gsum = nullptr;
};

// Block b (32 values at v) to int8: scale = max|v| / 127. Writes q, d[b] and s[b] = d * sum(q).
inline void quantize_block(const float* v, int8_t* q, float* d, float* s) {
  float amax = 0.f;
  for (int64_t i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  for (int64_t i = 0; i < QB; ++i) {
    const int qi = int(std::nearbyint(v[i] * inv));
    q[i] = int8_t(qi);
    sum += qi;
  }
  *d = amax / 127.f;
  *s = *d * float(sum);
}

// N activation rows of K, prepared once and read by every weight row. `quantized()` says whether the
// rows are (to be) int8 blocks; a producer may fill them block by block with `quantize(n, b)` after
// writing x (the experts step does, inside its parallel pass), or all at once with `fill()`.
struct Acts {
  const float* x;
  int64_t N, K, G;
  std::vector<int8_t> q;
  std::vector<float> d, s, gsum;
  int64_t ng = 0;

  Acts(const float* x_, int64_t N_, int64_t K_, bool quant, int64_t G_) : x(x_), N(N_), K(K_), G(G_) {
    if (quant && K % QB == 0) {
      q.resize(N * K);
      d.resize(N * (K / QB));
      s.resize(N * (K / QB));
    } else if (G > 0) {
      ng = K / G;
    }
  }
  bool quantized() const { return !q.empty(); }
  void quantize(int64_t n, int64_t b) {
    const int64_t at = n * (K / QB) + b;
    quantize_block(x + at * QB, q.data() + at * QB, d.data() + at, s.data() + at);
  }
  Acts& fill() {
    if (quantized()) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < K / QB; ++b) quantize(n, b);
    } else if (ng > 0) {
      gsum.assign(N * ng, 0.f);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) gsum[n * ng + k / G] += x[n * K + k];
    }
    return *this;
  }
  Act row(int64_t n) const {
    Act a{x + n * K};
    if (quantized()) {
      a.q = q.data() + n * K;
      a.d = d.data() + n * (K / QB);
      a.s = s.data() + n * (K / QB);
    } else if (ng > 0) {
      a.gsum = gsum.data() + n * ng;
    }
    return a;
  }
};

// 32 signed int8 products summed in fours to 8 int32 lanes, as floats. vpmaddubsw wants one unsigned
// operand: |w| times x carrying w's sign gives the same products.
inline __m256 dot_i8_block(__m256i w, __m256i x) {
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

// 32 unsigned nibbles (0..15) times 32 signed int8: no sign trick needed.
inline __m256 dot_u4_block(__m256i w, __m256i x) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// ---- one weight row . one activation row, per format --------------------------------------------

struct F32Rows {
  const float* w; int64_t K;
  inline float dot(int64_t o, const Act& a) const { return dot_widened(w + o * K, a.x, K); }
};

struct Q8Rows {
  const int8_t* q; const float* scale; int64_t K;
  inline float dot(int64_t o, const Act& a) const {
    const int8_t* r = q + o * K;
    if (a.q) {  // int8 x int8 blocks
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t b = 0;
      const int64_t nb = K / QB;
      for (; b + 2 <= nb; b += 2) {
        a0 = _mm256_fmadd_ps(dot_i8_block(load32(r + b * QB), load32(a.q + b * QB)), _mm256_set1_ps(a.d[b]), a0);
        a1 = _mm256_fmadd_ps(dot_i8_block(load32(r + (b + 1) * QB), load32(a.q + (b + 1) * QB)),
                             _mm256_set1_ps(a.d[b + 1]), a1);
      }
      if (b < nb) a0 = _mm256_fmadd_ps(dot_i8_block(load32(r + b * QB), load32(a.q + b * QB)), _mm256_set1_ps(a.d[b]), a0);
      return hsum(_mm256_add_ps(a0, a1)) * scale[o];
    }
    return dot_widened(r, a.x, K) * scale[o];  // fp32 activations: widen the weights
  }
};

// The 32 nibbles of block b (of nb in the row starting at r), one per byte, in input order.
inline __m256i nibbles(const uint8_t* r, int64_t b, int64_t nb) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  if (b + 1 < nb || b % 2 == 1) {  // in a pair
    const __m256i raw = load32(r + (b & ~int64_t(1)) * QB / 2);
    return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(raw, 4) : raw, low);
  }
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + b * QB / 2));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// int4 (layout above): K and the group size G are multiples of 32. The min term costs one
// multiply-add per block: sum_k (n*s + m) x = s * sum_k n x + m * sum_k x.
struct Q4Rows {
  const uint8_t* q; const uint16_t* scale; const uint16_t* minv; int64_t K, G;
  inline float dot(int64_t o, const Act& a) const {
    const uint8_t* r = q + o * (K / 2);
    const int64_t ng = K / G, nb = K / QB, per = G / QB;
    const uint16_t* sc = scale + o * ng;
    const uint16_t* mn = minv + o * ng;
    if (a.q) return a_int8(r, sc, mn, nb, per, a);
    // fp32 activations: widen the nibbles; group sums of x carry the min term.
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t b = g * per; b < (g + 1) * per; ++b) {
        const __m256i w = nibbles(r, b, nb);
        const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
        const float* x = a.x + b * QB;
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + 8), a1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + 24), a1);
      }
      acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(half_to_float(sc[g])), acc);
      tail += half_to_float(mn[g]) * a.gsum[g];
    }
    return hsum(acc) + tail;
  }

  // Nibbles times int8 activation blocks. Per chunk of 8 blocks the combined scales (weight scale
  // times activation block scale) go to a small array first, with one fp16 conversion for all 8
  // when groups are 32 wide; two accumulators, as one fma chain would bound the loop by latency.
  static float a_int8(const uint8_t* r, const uint16_t* sc, const uint16_t* mn, int64_t nb, int64_t per,
                      const Act& a) {
    alignas(32) float sd[8];
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), tail = _mm256_setzero_ps();
    float tail1 = 0.f;
    int64_t g = 0, in_group = 0;  // group of the next block, and that block's index inside it
    for (int64_t b = 0; b < nb; b += 8) {
      const int64_t n = std::min<int64_t>(8, nb - b);
      if (per == 1 && n == 8) {
        const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + b)));
        const __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + b)));
        _mm256_store_ps(sd, _mm256_mul_ps(s8, _mm256_loadu_ps(a.d + b)));
        tail = _mm256_fmadd_ps(m8, _mm256_loadu_ps(a.s + b), tail);
        g += 8;
      } else {
        for (int64_t j = 0; j < n; ++j) {
          sd[j] = half_to_float(sc[g]) * a.d[b + j];
          tail1 += half_to_float(mn[g]) * a.s[b + j];
          if (++in_group == per) { in_group = 0; ++g; }
        }
      }
      int64_t j = 0;
      for (; j + 2 <= n && b + j + 1 < nb; j += 2) {  // a pair of blocks: one 32-byte load
        const __m256i raw = load32(r + (b + j) * QB / 2);
        const __m256i low = _mm256_set1_epi8(0x0F);
        acc0 = _mm256_fmadd_ps(dot_u4_block(_mm256_and_si256(raw, low), load32(a.q + (b + j) * QB)),
                               _mm256_broadcast_ss(sd + j), acc0);
        acc1 = _mm256_fmadd_ps(dot_u4_block(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
                                            load32(a.q + (b + j + 1) * QB)), _mm256_broadcast_ss(sd + j + 1), acc1);
      }
      if (j < n)  // the unpaired last block
        acc0 = _mm256_fmadd_ps(dot_u4_block(nibbles(r, b + j, nb), load32(a.q + (b + j) * QB)),
                               _mm256_broadcast_ss(sd + j), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + hsum(tail) + tail1;
  }
};

constexpr int64_t kGrain = 16;  // output rows per task: small enough to split a 576-row matrix evenly

template <class Rows>
void gemv_rows(const Rows& rows, const Acts& acts, int64_t N, int64_t O, float* y) {
  at::parallel_for(0, O, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t n = 0; n < N; ++n) {
      const Act a = acts.row(n);
      for (int64_t o = b; o < e; ++o) y[n * O + o] = rows.dot(o, a);
    }
  });
}

// ---- a weight in any of the three formats ----------------------------------------------------------

enum Kind : int64_t { F32 = 0, Q8 = 1, Q4 = 2 };

// The tensors of one weight, as Python passes them: [w] fp32 | [q, scale] int8 | [q, scale, min] int4.
// A stack of experts has a leading E dimension; `at(e)` gives expert e's matrix.
struct Weight {
  Kind kind = F32;
  const void* q = nullptr;
  const float* scale = nullptr;     // int8: fp32 per row
  const uint16_t* hscale = nullptr;  // int4: fp16 per group
  const uint16_t* hmin = nullptr;
  int64_t O = 0, K = 0, G = 0;  // one matrix: O rows of K inputs; int4 groups of G
  int64_t ng = 0;

  static Weight of(const torch::Tensor* t, int64_t n, bool stacked) {
    Weight w;
    const int64_t lead = stacked ? 1 : 0;
    TORCH_CHECK(n >= 1 && n <= 3, "a weight is 1 (fp32), 2 (int8) or 3 (int4) tensors");
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(t[i].is_contiguous() && t[i].device().is_cpu(), "weights must be contiguous CPU tensors");
    TORCH_CHECK(t[0].dim() == 2 + lead, "weight has ", t[0].dim(), " dims, expected ", 2 + lead);
    w.kind = Kind(n - 1);
    w.O = t[0].size(lead);
    if (w.kind == F32) {
      TORCH_CHECK(t[0].scalar_type() == torch::kFloat, "fp32 weight expected");
      w.K = t[0].size(lead + 1);
    } else if (w.kind == Q8) {
      TORCH_CHECK(t[0].scalar_type() == torch::kChar && t[1].scalar_type() == torch::kFloat, "int8 weight expected");
      w.K = t[0].size(lead + 1);
      w.scale = t[1].data_ptr<float>();
    } else {
      TORCH_CHECK(t[0].scalar_type() == torch::kByte && t[1].scalar_type() == torch::kHalf
                  && t[2].scalar_type() == torch::kHalf && t[1].sizes() == t[2].sizes(),
                  "int4 weight expected: uint8 nibbles, fp16 scales and mins");
      w.K = t[0].size(lead + 1) * 2;
      w.ng = t[1].size(lead + 1);
      w.G = w.K / w.ng;
      TORCH_CHECK(w.G % 32 == 0 && w.K % w.G == 0, "int4 group size must be a multiple of 32 dividing K");
      w.hscale = reinterpret_cast<const uint16_t*>(t[1].data_ptr<at::Half>());
      w.hmin = reinterpret_cast<const uint16_t*>(t[2].data_ptr<at::Half>());
    }
    w.q = t[0].data_ptr();
    return w;
  }

  // Expert e of a stack.
  Weight at(int64_t e) const {
    Weight w = *this;
    if (kind == F32) {
      w.q = static_cast<const float*>(q) + e * O * K;
    } else if (kind == Q8) {
      w.q = static_cast<const int8_t*>(q) + e * O * K;
      w.scale = scale + e * O;
    } else {
      w.q = static_cast<const uint8_t*>(q) + e * O * K / 2;
      w.hscale = hscale + e * O * ng;
      w.hmin = hmin + e * O * ng;
    }
    return w;
  }

  F32Rows f32() const { return {static_cast<const float*>(q), K}; }
  Q8Rows q8() const { return {static_cast<const int8_t*>(q), scale, K}; }
  Q4Rows q4() const { return {static_cast<const uint8_t*>(q), hscale, hmin, K, G}; }

  // Activations as this weight's kernel reads them (unfilled: see Acts).
  Acts acts_for(const float* x, int64_t N, bool quant_act) const {
    return Acts(x, N, K, quant_act && kind != F32, kind == Q4 ? G : 0);
  }

  // y (N, O) = x (N, K) . w^T, activations from `acts_for(...).fill()`.
  void apply(const Acts& acts, int64_t N, float* y) const {
    switch (kind) {
      case F32: gemv_rows(f32(), acts, N, O, y); break;
      case Q8: gemv_rows(q8(), acts, N, O, y); break;
      case Q4: gemv_rows(q4(), acts, N, O, y); break;
    }
  }
  void apply(const float* x, int64_t N, float* y, bool quant_act) const { apply(acts_for(x, N, quant_act).fill(), N, y); }

  float dot(int64_t o, const Act& a) const {
    switch (kind) {
      case F32: return f32().dot(o, a);
      case Q8: return q8().dot(o, a);
      default: return q4().dot(o, a);
    }
  }
};

// ---- the per-layer pieces, on raw pointers ------------------------------------------------------

// RMSNorm of a few rows, serial: at decode sizes threading costs more than the math.
void rms_norm_rows(const float* x, const float* w, int64_t N, int64_t H, double eps, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const float* r = x + n * H;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= H; k += 8) { __m256 v = _mm256_loadu_ps(r + k); acc = _mm256_fmadd_ps(v, v, acc); }
    float ss = hsum(acc);
    for (; k < H; ++k) ss += r[k] * r[k];
    const float inv = 1.f / std::sqrt(ss / float(H) + float(eps));
    for (k = 0; k < H; ++k) y[n * H + k] = w[k] * (r[k] * inv);
  }
}

// The experts step for N tokens, grouped by expert: each chosen expert's weights are read once per call
// however many tokens chose it. (Token by token, a batch of 8 rows reads ~16 expert matrices a layer,
// each from memory again once they outgrow the cache; grouped, at most the 8 there are.)
// Pass 1 runs in parallel over (expert hit, block of 32 intermediate units): each task reads the
// block's gate and up rows once, and for every slot of that expert applies SwiGLU and quantizes the
// block for the down product, so nothing between the two products runs serially. Pass 2 runs in
// parallel over output rows: each down row is read once for all slots of its expert, and each token's
// K results are then weighted and summed in k order (added to y if `accumulate`: the residual add of
// the fused layer). Every value is computed as it would be for that token alone, so a token's output
// does not depend on what else is in the batch (bitwise).
void experts_rows(const Weight& gate_up, const Weight& down, const float* x, const int64_t* ids,
                  const float* weights, int64_t N, int64_t K, int64_t E, bool quant_act, bool accumulate, float* y) {
  const int64_t H = gate_up.K, I = down.K, nblk = (I + QB - 1) / QB, S = N * K;
  // Slot s = n * K + k. Expert e's slots, in slot order: order[first[e] .. first[e + 1]).
  std::vector<int64_t> first(E + 1, 0), order(S), hit;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(ids[s] >= 0 && ids[s] < E, "expert id ", ids[s], " out of range [0, ", E, ")");
    ++first[ids[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) {
    if (first[e + 1] > 0) hit.push_back(e);
    first[e + 1] += first[e];
  }
  std::vector<int64_t> fill_at(first.begin(), first.end() - 1);
  for (int64_t s = 0; s < S; ++s) order[fill_at[ids[s]]++] = s;

  const Acts xa = std::move(gate_up.acts_for(x, N, quant_act).fill());
  std::vector<float> act(S * I);
  Acts aa = down.acts_for(act.data(), S, quant_act);
  const int64_t nhit = hit.size();
  at::parallel_for(0, nhit * nblk, 1, [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t) {
      const int64_t e = hit[t / nblk], blk = t % nblk, i0 = blk * QB, i1 = std::min(I, i0 + QB);
      const Weight gu = gate_up.at(e);
      // Slot by slot over the block's rows: they stay in cache for the next slot, and the row loop
      // is the tight one (a decode layer's dots are short: H values).
      for (int64_t j = first[e]; j < first[e + 1]; ++j) {
        const int64_t s = order[j];
        const Act xr = xa.row(s / K);
        float* out = act.data() + s * I;
        for (int64_t i = i0; i < i1; ++i) {
          const float g = gu.dot(i, xr), u = gu.dot(I + i, xr);
          out[i] = g / (1.f + std::exp(-g)) * u;
        }
        if (aa.quantized()) aa.quantize(s, blk);
      }
    }
  });
  if (!aa.quantized()) aa.fill();  // fp32 int4 path: group sums
  std::vector<Act> ar(S);
  for (int64_t s = 0; s < S; ++s) ar[s] = aa.row(s);
  std::vector<float> ys(S * H);  // per slot: its expert's down product, before weighting
  std::vector<Weight> dn(nhit);
  for (int64_t h = 0; h < nhit; ++h) dn[h] = down.at(hit[h]);
  at::parallel_for(0, H, kGrain, [&](int64_t b, int64_t end) {
    // Row by row across the experts hit: one read stream per expert, as many in flight as experts.
    for (int64_t o = b; o < end; ++o)
      for (int64_t h = 0; h < nhit; ++h) {
        const int64_t e = hit[h];
        for (int64_t j = first[e]; j < first[e + 1]; ++j) ys[order[j] * H + o] = dn[h].dot(o, ar[order[j]]);
      }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = b; o < end; ++o) {
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += weights[n * K + k] * ys[(n * K + k) * H + o];
        y[n * H + o] = accumulate ? y[n * H + o] + sum : sum;
      }
  });
}

// x (hd,) -> y (hd,) in the rotate-half layout: y = x * cos + cat(-x[half:], x[:half]) * sin.
inline void rotate_half(const float* x, const float* c, const float* s, int64_t hd, float* y) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] - x[i + half] * s[i];
  for (int64_t i = half; i < hd; ++i) y[i] = x[i] * c[i] + x[i - half] * s[i];
}

// The step's attention geometry, shared by all layers of a decode step. Rows need not share a cache
// tensor: the server decodes requests of different lengths together, each in a cache of its own, so
// every row has its own capacity, the slot its new key goes to and the number of leading slots it
// attends over (S is the largest).
struct Step {
  int64_t B, nh, nkv, hd, S, qpos, window;
  const float *cos, *sin;         // (B, hd)
  const int64_t* key_index;       // (>= S,) token index per key, -1 = empty
  const bool* key_valid;          // (B, >= S) with row stride kv_stride
  int64_t kv_stride;
  std::vector<int64_t> cap, slot, len;  // per row
  std::vector<uint8_t> allowed;   // (B, S): the mask rule, evaluated once per step
};

// Key j < len[b] is visible iff key_index[j] in (qpos - window, qpos] (window 0 = none) and
// key_valid[b, j]: mixtral.layers.build_mask's rule. A row that sees nothing comes out as zeros, as
// SDPA gives it (attention_rows skips every key).
void fill_allowed(Step& st) {
  st.allowed.assign(st.B * st.S, 0);
  for (int64_t b = 0; b < st.B; ++b) {
    for (int64_t j = 0; j < st.len[b]; ++j) {
      const int64_t t = st.key_index[j];
      st.allowed[b * st.S + j] = t >= 0 && t <= st.qpos && (st.window <= 0 || t > st.qpos - st.window)
                                 && st.key_valid[b * st.kv_stride + j];
    }
  }
}

// One query per row: rotary on q and k, k/v written into the row's cache slot, then attention of every
// query head over the row's keys (GQA: query head h reads kv head h / (nh / nkv)).
// qkv (B, (nh + 2 nkv) hd) -> out (B, nh hd); kc[b], vc[b]: row b's cache (nkv, cap[b], hd).
void attention_rows(const Step& st, const float* qkv, const std::vector<float*>& kc, const std::vector<float*>& vc,
                    float* out) {
  const int64_t B = st.B, nh = st.nh, nkv = st.nkv, hd = st.hd, S = st.S, rep = nh / nkv;
  const int64_t D = (nh + 2 * nkv) * hd;
  std::vector<float> qr(B * nh * hd);
  for (int64_t b = 0; b < B; ++b) {
    const float *row = qkv + b * D, *c = st.cos + b * hd, *s = st.sin + b * hd;
    for (int64_t h = 0; h < nh; ++h) rotate_half(row + h * hd, c, s, hd, qr.data() + (b * nh + h) * hd);
    for (int64_t g = 0; g < nkv; ++g) {
      const int64_t at = (g * st.cap[b] + st.slot[b]) * hd;
      rotate_half(row + (nh + g) * hd, c, s, hd, kc[b] + at);
      std::copy(row + (nh + nkv + g) * hd, row + (nh + nkv + g + 1) * hd, vc[b] + at);
    }
  }
  const float scale = 1.f / std::sqrt(float(hd));
  // Threads only pay off for long contexts: below ~64K multiply-adds per task, run serially.
  const int64_t grain = std::max<int64_t>(1, 65536 / (S * hd));
  at::parallel_for(0, B * nh, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nh, g = (bh % nh) / rep, n = st.len[b];
      const float* q = qr.data() + bh * hd;
      const float* keys = kc[b] + g * st.cap[b] * hd;
      const float* vals = vc[b] + g * st.cap[b] * hd;
      const uint8_t* ok = st.allowed.data() + b * S;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j)
        if (ok[j]) { p[j] = dot_widened(q, keys + j * hd, hd) * scale; mx = std::max(mx, p[j]); }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) { p[j] = ok[j] ? std::exp(p[j] - mx) : 0.f; sum += p[j]; }
      float* o = out + bh * hd;
      std::fill(o, o + hd, 0.f);
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < n; ++j) {
        if (!ok[j]) continue;
        const float w = p[j] * inv;
        const float* v = vals + j * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += w * v[d];
      }
    }
  });
}

// The router for a few rows: logits = x w^T, softmax in fp32, top-k (lowest index first on ties),
// renormalized. logits may be null (not wanted).
void route_rows(const float* x, const float* w, int64_t N, int64_t H, int64_t E, int64_t top_k, float* logits,
                float* weights, int64_t* ids) {
  std::vector<float> l(E), prob(E);
  std::vector<uint8_t> taken(E);
  for (int64_t n = 0; n < N; ++n) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; ++e) { l[e] = dot_widened(x + n * H, w + e * H, H); mx = std::max(mx, l[e]); }
    if (logits) std::copy(l.begin(), l.end(), logits + n * E);
    for (int64_t e = 0; e < E; ++e) { prob[e] = std::exp(l[e] - mx); sum += prob[e]; }
    std::fill(taken.begin(), taken.end(), 0);
    float top = 0.f;
    for (int64_t k = 0; k < top_k; ++k) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || prob[e] > prob[best])) best = e;
      taken[best] = 1;
      ids[n * top_k + k] = best;
      weights[n * top_k + k] = prob[best] / sum;
      top += prob[best] / sum;
    }
    for (int64_t k = 0; k < top_k; ++k) weights[n * top_k + k] /= top;
  }
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be contiguous fp32 (N, ", K, "), got ", x.sizes());
}

// `caches`: one layer's cache tensors, each (rows, nkv, capacity, hd), holding the B rows in order (one
// tensor for a batch cache, one per request for the server). `slots` / `lengths`: per row, the slot the
// new key goes to and how many leading slots it attends over.
Step make_step(const torch::Tensor& cos, const torch::Tensor& sin, const std::vector<torch::Tensor>& caches,
               const std::vector<int64_t>& slots, const std::vector<int64_t>& lengths, const torch::Tensor& key_index,
               const torch::Tensor& key_valid, int64_t qpos, int64_t window, int64_t num_heads) {
  TORCH_CHECK(!caches.empty() && caches[0].dim() == 4, "caches must be (rows, nkv, capacity, hd) tensors");
  Step st;
  st.nkv = caches[0].size(1); st.hd = caches[0].size(3);
  st.nh = num_heads; st.qpos = qpos; st.window = window;
  for (const auto& c : caches) {
    TORCH_CHECK(c.dim() == 4 && c.size(1) == st.nkv && c.size(3) == st.hd, "caches of one step must agree in ",
                "(nkv, hd): ", c.sizes(), " vs ", caches[0].sizes());
    for (int64_t r = 0; r < c.size(0); ++r) st.cap.push_back(c.size(2));
  }
  st.B = st.cap.size();
  TORCH_CHECK(int64_t(slots.size()) == st.B && int64_t(lengths.size()) == st.B, "one slot and length per row (",
              st.B, " rows), got ", slots.size(), " and ", lengths.size());
  st.slot = slots; st.len = lengths;
  st.S = 0;
  for (int64_t b = 0; b < st.B; ++b) {
    TORCH_CHECK(st.slot[b] >= 0 && st.slot[b] < st.len[b] && st.len[b] <= st.cap[b], "row ", b, ": slot ",
                st.slot[b], " and length ", st.len[b], " do not fit its cache of ", st.cap[b]);
    st.S = std::max(st.S, st.len[b]);
  }
  TORCH_CHECK(st.nh % st.nkv == 0 && st.hd % 2 == 0, "bad attention sizes");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat
              && sin.scalar_type() == torch::kFloat && cos.numel() == st.B * st.hd && sin.numel() == st.B * st.hd,
              "cos/sin must be contiguous fp32 (B, hd)");
  TORCH_CHECK(key_index.scalar_type() == torch::kLong && key_index.is_contiguous() && key_index.numel() >= st.S,
              "key_index must be contiguous int64 (>= S,)");
  TORCH_CHECK(key_valid.scalar_type() == torch::kBool && key_valid.dim() == 2 && key_valid.size(0) == st.B
              && key_valid.size(1) >= st.S && key_valid.stride(1) == 1, "key_valid must be bool (B, >= S)");
  st.cos = cos.data_ptr<float>(); st.sin = sin.data_ptr<float>();
  st.key_index = key_index.data_ptr<int64_t>();
  st.key_valid = key_valid.data_ptr<bool>();
  st.kv_stride = key_valid.stride(0);
  fill_allowed(st);
  return st;
}

// Each row's (nkv, capacity, hd) block in one layer's k or v cache tensors, checked against the step.
std::vector<float*> cache_rows(const std::vector<torch::Tensor>& caches, const Step& st) {
  std::vector<float*> rows;
  for (const auto& c : caches) {
    TORCH_CHECK(c.is_contiguous() && c.scalar_type() == torch::kFloat && c.device().is_cpu() && c.dim() == 4
                && c.size(1) == st.nkv && c.size(3) == st.hd, "caches must be contiguous fp32 CPU (rows, ", st.nkv,
                ", capacity, ", st.hd, "), got ", c.sizes());
    for (int64_t r = 0; r < c.size(0); ++r) {
      const int64_t b = rows.size();
      TORCH_CHECK(b < st.B && c.size(2) == st.cap[b], "every layer's caches must hold the rows alike");
      rows.push_back(c.data_ptr<float>() + r * st.nkv * st.cap[b] * st.hd);
    }
  }
  TORCH_CHECK(int64_t(rows.size()) == st.B, "a layer's caches hold ", rows.size(), " rows, the step ", st.B);
  return rows;
}

}  // namespace

// ---- Python entry points ---------------------------------------------------------------------------

// y = x w^T for a few rows; `weight` is [w] (fp32), [q, scale] (int8) or [q, scale, min] (int4).
torch::Tensor linear(torch::Tensor x, std::vector<torch::Tensor> weight, bool quant_act) {
  const Weight w = Weight::of(weight.data(), weight.size(), false);
  check_x(x, w.K);
  auto y = torch::empty({x.size(0), w.O}, x.options());
  w.apply(x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), quant_act);
  return y;
}

// The SwiGLU experts step for a few tokens over stacked weights (E, 2I, H) and (E, H, I), any format.
torch::Tensor experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, std::vector<torch::Tensor> gate_up,
                      std::vector<torch::Tensor> down, bool quant_act) {
  const Weight gu = Weight::of(gate_up.data(), gate_up.size(), true);
  const Weight dn = Weight::of(down.data(), down.size(), true);
  const int64_t E = gate_up[0].size(0);
  TORCH_CHECK(gu.kind == dn.kind && gu.O == 2 * dn.K && dn.O == gu.K && down[0].size(0) == E,
              "gate_up (E, 2I, H) and down (E, H, I) must match in format and sizes");
  TORCH_CHECK(gu.kind != Q4 || gu.G == dn.G, "int4 experts need one group size");
  check_x(x, gu.K);
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.dim() == 2 && ids.size(0) == x.size(0)
              && weights.scalar_type() == torch::kFloat && weights.is_contiguous() && weights.sizes() == ids.sizes(),
              "ids (N, K) int64 and weights (N, K) fp32 expected");
  auto out = torch::empty_like(x);
  experts_rows(gu, dn, x.data_ptr<float>(), ids.data_ptr<int64_t>(), weights.data_ptr<float>(), x.size(0),
               ids.size(1), E, quant_act, false, out.data_ptr<float>());
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t H = w.size(0);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && w.is_contiguous() && x.size(-1) == H,
              "fp32 contiguous");
  auto y = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), x.numel() / H, H, eps, y.data_ptr<float>());
  return y;
}

// Dequantize one (O, K) matrix to fp32 in one pass (prefill: the matrix product then runs in fp32).
torch::Tensor dequantize_q8(torch::Tensor q, torch::Tensor scale) {
  const int64_t O = q.size(0), K = q.size(1);
  auto w = torch::empty({O, K}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t k = 0; k < K; ++k) wp[o * K + k] = float(qp[o * K + k]) * sp[o];
  });
  return w;
}

torch::Tensor dequantize_q4(torch::Tensor q, torch::Tensor scale, torch::Tensor minv) {
  const torch::Tensor t[3] = {q.contiguous(), scale.contiguous(), minv.contiguous()};
  const Weight wt = Weight::of(t, 3, false);
  const int64_t O = wt.O, K = wt.K, ng = wt.ng, G = wt.G, nb = K / QB;
  auto w = torch::empty({O, K}, scale.options().dtype(torch::kFloat));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, O, 64, [&](int64_t b0, int64_t e) {
    alignas(32) uint8_t n[32];
    for (int64_t o = b0; o < e; ++o) {
      const uint8_t* r = static_cast<const uint8_t*>(wt.q) + o * (K / 2);
      for (int64_t b = 0; b < nb; ++b) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(n), nibbles(r, b, nb));
        const int64_t g = o * ng + b * QB / G;
        const float s = half_to_float(wt.hscale[g]), m = half_to_float(wt.hmin[g]);
        for (int64_t j = 0; j < QB; ++j) wp[o * K + b * QB + j] = float(n[j]) * s + m;
      }
    }
  });
  return w;
}

// Decode attention of one layer: qkv (B, (nh + 2 nkv) hd), cos/sin (B, hd), the layer's k and v cache
// tensors (see make_step), key_index (>= S,) token index per key (-1 = empty), key_valid (B, >= S)
// -> (B, nh hd).
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                               std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                               std::vector<int64_t> slots, std::vector<int64_t> lengths, torch::Tensor key_index,
                               torch::Tensor key_valid, int64_t qpos, int64_t window, int64_t num_heads) {
  const Step st = make_step(cos, sin, k_caches, slots, lengths, key_index, key_valid, qpos, window, num_heads);
  const std::vector<float*> kc = cache_rows(k_caches, st), vc = cache_rows(v_caches, st);
  check_x(qkv, (st.nh + 2 * st.nkv) * st.hd);
  TORCH_CHECK(qkv.size(0) == st.B, "qkv has ", qkv.size(0), " rows, the cache ", st.B);
  auto out = torch::empty({st.B, st.nh * st.hd}, qkv.options());
  attention_rows(st, qkv.data_ptr<float>(), kc, vc, out.data_ptr<float>());
  return out;
}

// The router: returns (logits (N, E), weights (N, K) fp32, ids (N, K) int64).
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor w, int64_t top_k) {
  const int64_t E = w.size(0), H = w.size(1), N = x.size(0);
  check_x(x, H);
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == torch::kFloat && top_k >= 1 && top_k <= E, "bad router");
  auto logits = torch::empty({N, E}, x.options());
  auto weights = torch::empty({N, top_k}, x.options());
  auto ids = torch::empty({N, top_k}, x.options().dtype(torch::kLong));
  route_rows(x.data_ptr<float>(), w.data_ptr<float>(), N, H, E, top_k, logits.data_ptr<float>(),
             weights.data_ptr<float>(), ids.data_ptr<int64_t>());
  return {logits, weights, ids};
}

// Every decoder layer of one decode step, in one call: per layer, RMSNorm, q|k|v projection, decode
// attention (rotary, cache write, GQA over the keys held), o projection and residual, RMSNorm, router,
// experts and residual. Replaces ~30 torch ops and module calls per layer, whose dispatch costs more
// than the arithmetic at one token. x (B, H) is the embeddings; returns the last layer's output
// (before the final norm).
//
// `tensors` holds each layer's weights in order: input norm, qkv, o, post-attention norm, router,
// gate_up, down; `counts` holds, per layer, how many tensors its qkv, o, gate_up and down take (1 fp32,
// 2 int8, 3 int4). k_caches / v_caches: per layer, its cache tensors (see make_step).
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> tensors,
                            std::vector<int64_t> counts, std::vector<std::vector<torch::Tensor>> k_caches,
                            std::vector<std::vector<torch::Tensor>> v_caches, std::vector<int64_t> slots,
                            std::vector<int64_t> lengths, torch::Tensor key_index, torch::Tensor key_valid,
                            int64_t qpos, int64_t window, int64_t num_heads, double eps, int64_t top_k,
                            bool quant_act) {
  const int64_t L = k_caches.size();
  TORCH_CHECK(L >= 1 && v_caches.size() == size_t(L) && counts.size() == size_t(4 * L),
              "k and v caches and four weight counts per layer");
  const Step st = make_step(cos, sin, k_caches[0], slots, lengths, key_index, key_valid, qpos, window, num_heads);
  const int64_t B = st.B, H = x.size(1), D = (st.nh + 2 * st.nkv) * st.hd, A = st.nh * st.hd;
  check_x(x, H);
  TORCH_CHECK(x.size(0) == B, "x has ", x.size(0), " rows, the cache ", B);
  auto out = x.clone();
  float* h = out.data_ptr<float>();
  std::vector<float> xn(B * H), qkv(B * D), attn(B * A), rw(B * top_k);
  std::vector<int64_t> ids(B * top_k);
  size_t i = 0;
  auto vec = [&](int64_t n) -> const float* {
    TORCH_CHECK(i < tensors.size() && tensors[i].scalar_type() == torch::kFloat && tensors[i].is_contiguous()
                && tensors[i].numel() == n, "norm/router weight ", i, " must be contiguous fp32 of ", n, " values");
    return tensors[i++].data_ptr<float>();
  };
  auto weight = [&](int64_t n, bool stacked) {
    TORCH_CHECK(i + n <= tensors.size(), "fewer weight tensors than counts say");
    Weight w = Weight::of(tensors.data() + i, n, stacked);
    i += n;
    return w;
  };
  for (int64_t l = 0; l < L; ++l) {
    const std::vector<float*> kc = cache_rows(k_caches[l], st), vc = cache_rows(v_caches[l], st);
    const float* ln1 = vec(H);
    const Weight wqkv = weight(counts[4 * l], false);
    const Weight wo = weight(counts[4 * l + 1], false);
    const float* ln2 = vec(H);
    TORCH_CHECK(i < tensors.size() && tensors[i].dim() == 2 && tensors[i].size(1) == H, "router must be (E, H)");
    const int64_t E = tensors[i].size(0);
    const float* router = vec(E * H);
    const Weight gu = weight(counts[4 * l + 2], true);
    const Weight dn = weight(counts[4 * l + 3], true);
    TORCH_CHECK(wqkv.K == H && wqkv.O == D && wo.K == A && wo.O == H, "layer ", l, ": attention weights do not match");
    TORCH_CHECK(gu.K == H && gu.O == 2 * dn.K && dn.O == H && gu.kind == dn.kind && (gu.kind != Q4 || gu.G == dn.G),
                "layer ", l, ": expert weights do not match");
    TORCH_CHECK(top_k <= E, "top_k ", top_k, " > ", E, " experts");

    rms_norm_rows(h, ln1, B, H, eps, xn.data());
    wqkv.apply(xn.data(), B, qkv.data(), quant_act);
    attention_rows(st, qkv.data(), kc, vc, attn.data());
    wo.apply(attn.data(), B, xn.data(), quant_act);  // xn reused as the o-projection output
    for (int64_t j = 0; j < B * H; ++j) h[j] += xn[j];
    rms_norm_rows(h, ln2, B, H, eps, xn.data());
    route_rows(xn.data(), router, B, H, E, top_k, nullptr, rw.data(), ids.data());
    experts_rows(gu, dn, xn.data(), ids.data(), rw.data(), B, top_k, E, quant_act, true, h);
  }
  TORCH_CHECK(i == tensors.size(), "more weight tensors than counts say");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_q8", &dequantize_q8);
  m.def("dequantize_q4", &dequantize_q4);
  m.def("rms_norm", &rms_norm);
  m.def("linear", &linear);
  m.def("experts", &experts);
  m.def("decode_attention", &decode_attention);
  m.def("route", &route);
  m.def("decode_layers", &decode_layers);
}
