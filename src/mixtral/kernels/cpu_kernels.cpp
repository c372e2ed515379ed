// AVX2 matrix-vector kernels for decode on x86 CPUs: fp32, int8 (per-row scale) and int4 (group-wise
// scale + min) weights against fp32 activations, plus the whole SwiGLU experts step of one MoE
// layer in one call (no host synchronisation, no per-expert Python).
//
// Decode reads every chosen weight once per token, so the kernels are written to stream weights at
// memory speed: weights are widened to fp32 in registers, never in memory. They serve few rows
// (decode, small batches); prefill goes through dequantize + matrix product in Python instead.
//
// Layouts (see mixtral/quant/__init__.py for the file format):
//   int8: q (O, K) int8, scale (O,) fp32:           w[o, k] = q[o, k] * scale[o]
//   int4: q (O, K/2) uint8, scale/min (O, K/G) fp32: w[o, k] = nibble(o, k) * scale[o, g] + min[o, g]
//         in each run of 32 weights, byte j holds weight j (low nibble) and weight j+16 (high).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// ---- one weight row . one activation row, per format --------------------------------------------

struct F32Rows {
  const float* w; int64_t K;
  inline float dot(int64_t o, const float* x, const float*) const {
    const float* r = w + o * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += r[k] * x[k];
    return s;
  }
};

inline __m256 widen8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

struct Q8Rows {
  const int8_t* q; const float* scale; int64_t K;
  inline float dot(int64_t o, const float* x, const float*) const {
    const int8_t* r = q + o * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(widen8_i8(r + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(widen8_i8(r + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(widen8_i8(r + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(widen8_i8(r + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(widen8_i8(r + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += float(r[k]) * x[k];
    return s * scale[o];
  }
};

// int4: K and the group size G are multiples of 32. xsum holds the sum of x over each group, so the
// min term costs one multiply-add per group: sum_k (n*s + m) x = s * sum_k n x + m * sum_k x.
struct Q4Rows {
  const uint8_t* q; const float* scale; const float* minv; int64_t K, G;
  inline float dot(int64_t o, const float* x, const float* xsum) const {
    const uint8_t* r = q + o * (K / 2);
    const int64_t ng = K / G;
    const float* sc = scale + o * ng;
    const float* mn = minv + o * ng;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k / 2));
        __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + k + 8), a1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + k + 16), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + k + 24), a1);
      }
      acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sc[g]), acc);
      tail += mn[g] * xsum[g];
    }
    return hsum(acc) + tail;
  }
};

// Per-row group sums of x (only int4 needs them).
std::vector<float> group_sums(const float* x, int64_t N, int64_t K, int64_t G) {
  if (G <= 0) return {};
  std::vector<float> s(N * (K / G), 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) s[n * (K / G) + k / G] += x[n * K + k];
  return s;
}

constexpr int64_t kGrain = 16;  // output rows per task: small enough to split a 576-row matrix evenly

template <class Rows>
void gemv_rows(const Rows& rows, const float* x, const float* xsum, int64_t N, int64_t K, int64_t O,
               int64_t ng, float* y) {
  at::parallel_for(0, O, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t n = 0; n < N; ++n) y[n * O + o] = rows.dot(o, x + n * K, xsum + n * ng);
  });
}

// The experts step for N tokens: for each token, the K chosen experts' gate|up rows in one parallel
// pass, SwiGLU, then the down rows of all K experts in a second pass, weighted and summed.
template <class MakeRows>
torch::Tensor experts_impl(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights,
                           int64_t E, int64_t I, int64_t G, MakeRows make) {
  const int64_t N = x.size(0), H = x.size(1), K = ids.size(1);
  auto out = torch::empty({N, H}, x.options());
  auto hbuf = torch::empty({K, 2 * I}, x.options());
  auto abuf = torch::empty({K, I}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  float* h = hbuf.data_ptr<float>();
  float* a = abuf.data_ptr<float>();
  std::vector<float> xs = group_sums(xp, N, H, G), as(G > 0 ? K * (I / G) : 0);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = xp + n * H;
    const float* xsn = G > 0 ? xs.data() + n * (H / G) : nullptr;
    std::vector<int64_t> ex(K);
    for (int64_t k = 0; k < K; ++k) {
      ex[k] = idp[n * K + k];
      TORCH_CHECK(ex[k] >= 0 && ex[k] < E, "expert id out of range");
    }
    at::parallel_for(0, K * 2 * I, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        int64_t k = j / (2 * I), o = j % (2 * I);
        h[j] = make.gate_up(ex[k]).dot(o, xn, xsn);
      }
    });
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < I; ++i) {
        float g = h[k * 2 * I + i];
        a[k * I + i] = g / (1.f + std::exp(-g)) * h[k * 2 * I + I + i];
      }
    if (G > 0)
      for (int64_t k = 0; k < K; ++k) {
        auto s = group_sums(a + k * I, 1, I, G);
        std::copy(s.begin(), s.end(), as.begin() + k * (I / G));
      }
    float* yn = out.data_ptr<float>() + n * H;
    at::parallel_for(0, H, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k)
          s += wp[n * K + k] * make.down(ex[k]).dot(o, a + k * I, G > 0 ? as.data() + k * (I / G) : nullptr);
        yn[o] = s;
      }
    });
  }
  return out;
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be contiguous fp32 (N, K)");
}

}  // namespace

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w) {
  const int64_t O = w.size(0), K = w.size(1), N = x.size(0);
  check_x(x, K);
  auto y = torch::empty({N, O}, x.options());
  gemv_rows(F32Rows{w.data_ptr<float>(), K}, x.data_ptr<float>(), nullptr, N, K, O, 0, y.data_ptr<float>());
  return y;
}

torch::Tensor linear_q8(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t O = q.size(0), K = q.size(1), N = x.size(0);
  check_x(x, K);
  auto y = torch::empty({N, O}, x.options());
  gemv_rows(Q8Rows{q.data_ptr<int8_t>(), scale.data_ptr<float>(), K}, x.data_ptr<float>(), nullptr, N, K, O, 0,
            y.data_ptr<float>());
  return y;
}

torch::Tensor linear_q4(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor minv) {
  const int64_t O = q.size(0), K = q.size(1) * 2, N = x.size(0), ng = scale.size(1), G = K / ng;
  check_x(x, K);
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "int4 group size must be a multiple of 32 dividing K");
  auto xs = group_sums(x.data_ptr<float>(), N, K, G);
  auto y = torch::empty({N, O}, x.options());
  gemv_rows(Q4Rows{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), minv.data_ptr<float>(), K, G},
            x.data_ptr<float>(), xs.data(), N, K, O, ng, y.data_ptr<float>());
  return y;
}

torch::Tensor experts_f32(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor gate_up,
                          torch::Tensor down) {
  const int64_t E = gate_up.size(0), I = down.size(2), H = down.size(1);
  check_x(x, H);
  const float* gu = gate_up.data_ptr<float>();
  const float* dn = down.data_ptr<float>();
  struct Make {
    const float *gu, *dn; int64_t H, I;
    F32Rows gate_up(int64_t e) const { return {gu + e * 2 * I * H, H}; }
    F32Rows down(int64_t e) const { return {dn + e * H * I, I}; }
  } make{gu, dn, H, I};
  return experts_impl(x, ids, weights, E, I, 0, make);
}

torch::Tensor experts_q8(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor gu_q,
                         torch::Tensor gu_s, torch::Tensor dn_q, torch::Tensor dn_s) {
  const int64_t E = gu_q.size(0), I = dn_q.size(2), H = dn_q.size(1);
  check_x(x, H);
  struct Make {
    const int8_t *gq, *dq; const float *gs, *ds; int64_t H, I;
    Q8Rows gate_up(int64_t e) const { return {gq + e * 2 * I * H, gs + e * 2 * I, H}; }
    Q8Rows down(int64_t e) const { return {dq + e * H * I, ds + e * H, I}; }
  } make{gu_q.data_ptr<int8_t>(), dn_q.data_ptr<int8_t>(), gu_s.data_ptr<float>(), dn_s.data_ptr<float>(), H, I};
  return experts_impl(x, ids, weights, E, I, 0, make);
}

// int4 experts: gate_up and down must share one group size G (dividing both H and I).
torch::Tensor experts_q4(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor gu_q,
                         torch::Tensor gu_s, torch::Tensor gu_m, torch::Tensor dn_q, torch::Tensor dn_s,
                         torch::Tensor dn_m) {
  const int64_t E = gu_q.size(0), H = gu_q.size(2) * 2, I = dn_q.size(2) * 2;
  const int64_t G = H / gu_s.size(2);
  TORCH_CHECK(G % 32 == 0 && I / dn_s.size(2) == G, "int4 experts need one group size (multiple of 32)");
  check_x(x, H);
  struct Make {
    const uint8_t *gq, *dq; const float *gs, *gm, *ds, *dm; int64_t H, I, G;
    Q4Rows gate_up(int64_t e) const {
      return {gq + e * 2 * I * H / 2, gs + e * 2 * I * (H / G), gm + e * 2 * I * (H / G), H, G};
    }
    Q4Rows down(int64_t e) const { return {dq + e * H * I / 2, ds + e * H * (I / G), dm + e * H * (I / G), I, G}; }
  } make{gu_q.data_ptr<uint8_t>(), dn_q.data_ptr<uint8_t>(), gu_s.data_ptr<float>(), gu_m.data_ptr<float>(),
         dn_s.data_ptr<float>(), dn_m.data_ptr<float>(), H, I, G};
  return experts_impl(x, ids, weights, E, I, G, make);
}

// RMSNorm of a few rows, serial: at decode sizes the op's dispatch and threading cost more than the math.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t H = w.size(0), N = x.numel() / H;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && w.is_contiguous(), "fp32 contiguous");
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* r = xp + n * H;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= H; k += 8) { __m256 v = _mm256_loadu_ps(r + k); acc = _mm256_fmadd_ps(v, v, acc); }
    float ss = hsum(acc);
    for (; k < H; ++k) ss += r[k] * r[k];
    const float inv = 1.f / std::sqrt(ss / float(H) + float(eps));
    for (k = 0; k < H; ++k) yp[n * H + k] = wp[k] * (r[k] * inv);
  }
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
  const int64_t O = q.size(0), K = q.size(1) * 2, ng = scale.size(1), G = K / ng;
  auto w = torch::empty({O, K}, scale.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *mp = minv.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t c = 0; c < K; c += 32)
        for (int64_t j = 0; j < 16; ++j) {
          const uint8_t byte = qp[o * (K / 2) + c / 2 + j];
          const int64_t g0 = (c + j) / G, g1 = (c + j + 16) / G;
          wp[o * K + c + j] = float(byte & 15) * sp[o * ng + g0] + mp[o * ng + g0];
          wp[o * K + c + j + 16] = float(byte >> 4) * sp[o * ng + g1] + mp[o * ng + g1];
        }
  });
  return w;
}

// ---- decode attention and routing: the small per-layer ops of one decode step, one call each ------

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x (hd,) -> y (hd,) in the rotate-half layout: y = x * cos + cat(-x[half:], x[:half]) * sin.
inline void rotate_half(const float* x, const float* c, const float* s, int64_t hd, float* y) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] - x[i + half] * s[i];
  for (int64_t i = half; i < hd; ++i) y[i] = x[i] * c[i] + x[i - half] * s[i];
}

// One query per row (decode): rotary on q and k, k/v written into cache slot `slot`, then attention of
// every query head over the S keys held (GQA: query head h reads kv head h / (nh / nkv)).
//   qkv (B, (nh + 2 nkv) hd) | cos, sin (B, hd) | k_cache, v_cache (B, nkv, C, hd)
//   key_index (S,) token index per key, -1 = empty | key_valid (B, >= S) bool, any row stride
// Key j is visible iff key_index[j] in (qpos - window, qpos] (window 0 = none) and key_valid[b, j];
// a row that sees nothing sees everything (as build_mask does: its output is never used).
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t slot, int64_t S, torch::Tensor key_index,
                               torch::Tensor key_valid, int64_t qpos, int64_t window, int64_t num_heads) {
  const int64_t B = k_cache.size(0), nkv = k_cache.size(1), C = k_cache.size(2), hd = k_cache.size(3);
  const int64_t nh = num_heads, rep = nh / nkv;
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat && qkv.is_contiguous() && qkv.dim() == 2 && qkv.size(0) == B
              && qkv.size(1) == (nh + 2 * nkv) * hd, "qkv must be contiguous fp32 (B, (nh + 2 nkv) hd)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat
              && v_cache.sizes() == k_cache.sizes(), "caches must be contiguous fp32 (B, nkv, C, hd)");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * hd && sin.numel() == B * hd,
              "cos/sin must be contiguous (B, hd)");
  TORCH_CHECK(nh % nkv == 0 && hd % 2 == 0 && slot >= 0 && slot < C && S >= 1 && S <= C, "bad sizes");
  TORCH_CHECK(key_index.scalar_type() == torch::kLong && key_index.is_contiguous() && key_index.numel() >= S,
              "key_index must be contiguous int64 (>= S,)");
  TORCH_CHECK(key_valid.scalar_type() == torch::kBool && key_valid.dim() == 2 && key_valid.size(0) == B
              && key_valid.size(1) >= S && key_valid.stride(1) == 1, "key_valid must be bool (B, >= S)");
  auto out = torch::empty({B, nh * hd}, qkv.options());
  auto qrot = torch::empty({B, nh * hd}, qkv.options());
  auto allowed = std::vector<uint8_t>(B * S);
  const float *qp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *qr = qrot.data_ptr<float>();
  const int64_t* ki = key_index.data_ptr<int64_t>();
  const bool* kv = key_valid.data_ptr<bool>();
  const int64_t kv_stride = key_valid.stride(0), D = (nh + 2 * nkv) * hd;
  for (int64_t b = 0; b < B; ++b) {
    const float *row = qp + b * D, *c = cp + b * hd, *s = sp + b * hd;
    for (int64_t h = 0; h < nh; ++h) rotate_half(row + h * hd, c, s, hd, qr + (b * nh + h) * hd);
    for (int64_t g = 0; g < nkv; ++g) {
      const int64_t at = ((b * nkv + g) * C + slot) * hd;
      rotate_half(row + (nh + g) * hd, c, s, hd, kc + at);
      std::copy(row + (nh + nkv + g) * hd, row + (nh + nkv + g + 1) * hd, vc + at);
    }
    bool any = false;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t t = ki[j];
      const bool ok = t >= 0 && t <= qpos && (window <= 0 || t > qpos - window) && kv[b * kv_stride + j];
      allowed[b * S + j] = ok;
      any = any || ok;
    }
    if (!any) std::fill(allowed.begin() + b * S, allowed.begin() + (b + 1) * S, 1);
  }
  const float scale = 1.f / std::sqrt(float(hd));
  float* op = out.data_ptr<float>();
  // Threads only pay off for long contexts: below ~64K multiply-adds per task, run serially.
  const int64_t grain = std::max<int64_t>(1, 65536 / (S * hd));
  at::parallel_for(0, B * nh, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nh, g = (bh % nh) / rep;
      const float* q = qr + bh * hd;
      const float* keys = kc + (b * nkv + g) * C * hd;
      const float* vals = vc + (b * nkv + g) * C * hd;
      const uint8_t* ok = allowed.data() + b * S;
      float mx = -INFINITY;
      for (int64_t j = 0; j < S; ++j)
        if (ok[j]) { p[j] = dot_f32(q, keys + j * hd, hd) * scale; mx = std::max(mx, p[j]); }
      float sum = 0.f;
      for (int64_t j = 0; j < S; ++j) { p[j] = ok[j] ? std::exp(p[j] - mx) : 0.f; sum += p[j]; }
      float* o = op + bh * hd;
      std::fill(o, o + hd, 0.f);
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < S; ++j) {
        if (!ok[j]) continue;
        const float w = p[j] * inv;
        const float* v = vals + j * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += w * v[d];
      }
    }
  });
  return out;
}

// The router for a few rows: logits = x w^T, softmax in fp32, top-k (lowest index first on ties),
// renormalized. Returns (logits (N, E), weights (N, K) fp32, ids (N, K) int64).
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor w, int64_t top_k) {
  const int64_t E = w.size(0), H = w.size(1), N = x.size(0);
  check_x(x, H);
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == torch::kFloat && top_k >= 1 && top_k <= E, "bad router");
  auto logits = torch::empty({N, E}, x.options());
  auto weights = torch::empty({N, top_k}, x.options());
  auto ids = torch::empty({N, top_k}, x.options().dtype(torch::kLong));
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *lp = logits.data_ptr<float>(), *op = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<float> prob(E);
  std::vector<uint8_t> taken(E);
  for (int64_t n = 0; n < N; ++n) {
    float* l = lp + n * E;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; ++e) { l[e] = dot_f32(xp + n * H, wp + e * H, H); mx = std::max(mx, l[e]); }
    for (int64_t e = 0; e < E; ++e) { prob[e] = std::exp(l[e] - mx); sum += prob[e]; }
    std::fill(taken.begin(), taken.end(), 0);
    float top = 0.f;
    for (int64_t k = 0; k < top_k; ++k) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || prob[e] > prob[best])) best = e;
      taken[best] = 1;
      ip[n * top_k + k] = best;
      op[n * top_k + k] = prob[best] / sum;
      top += prob[best] / sum;
    }
    for (int64_t k = 0; k < top_k; ++k) op[n * top_k + k] /= top;
  }
  return {logits, weights, ids};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_q8", &dequantize_q8);
  m.def("dequantize_q4", &dequantize_q4);
  m.def("rms_norm", &rms_norm);
  m.def("linear_f32", &linear_f32);
  m.def("linear_q8", &linear_q8);
  m.def("linear_q4", &linear_q4);
  m.def("experts_f32", &experts_f32);
  m.def("experts_q8", &experts_q8);
  m.def("experts_q4", &experts_q4);
  m.def("decode_attention", &decode_attention);
  m.def("route", &route);
}
