// Fused CPU kernels for bfloat16 decode rows (one new token per sequence), compiled on first use
// by offramp/model/fused.py. Each function does in one call what decoder.py does in several small
// eager ops between the matrix products, rounding to bfloat16 at the same points, so the outputs
// match the eager path up to the order of float32 sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The product kernels need AVX-512 with bfloat16 dot products (vdpbf16ps); elsewhere torch's run.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define OFFRAMP_DP 1
#else
#define OFFRAMP_DP 0
#endif
// Without them, AVX2 with FMA has its own int4 product (float32 FMAs).
#if !OFFRAMP_DP && defined(__AVX2__) && defined(__FMA__)
#define OFFRAMP_AVX2 1
#else
#define OFFRAMP_AVX2 0
#endif

namespace {

using bf16 = at::BFloat16;

// A row's activations as 15-bit integers per block of 32 columns: xq = round(x * kQ16 / max|x|), the scale
// d = max|x| / kQ16. Their rounding (2^-15 of the block's largest) is far below that of the bfloat16 values
// they come from (2^-9 of each), so the products keep the float32 path's quality (llama.cpp's int8, 2^-8
// of the block's largest, cost the default model 3 points of agreement with HF here). The int4 product
// splits each into int8 halves, xq = 128 hi + lo (lo in 0..127), for vpmaddubsw.
constexpr float kQ16 = 16383.f;

void quantize_row_q16(const float* x, int64_t k, int16_t* xq, float* d) {
  for (int64_t b = 0; b < k; b += 32) {
    float amax = 0.f;
    for (int64_t c = b; c < b + 32; ++c) amax = std::max(amax, std::fabs(x[c]));
    const float id = amax > 0.f ? kQ16 / amax : 0.f;
    d[b / 32] = amax / kQ16;
    for (int64_t c = b; c < b + 32; ++c) xq[c] = static_cast<int16_t>(std::nearbyint(x[c] * id));
  }
}

inline float to_f(bf16 v) { return static_cast<float>(v); }
inline float round_bf16(float v) { return static_cast<float>(bf16(v)); }

// bfloat16 bits -> float32, written so that loops over it vectorise
inline float bits_to_f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX2__) && defined(__FMA__)
// 8-lane helpers (the AVX2 kernels; the norms in every x86 build)
// The first min(n, 8) lanes set, for masked loads and stores of a row's tail.
inline __m256i tail_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 bfloat16 (bits) -> float32
inline __m256 load_bf16x8(const void* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// float32 -> bfloat16 bits in the low half of each lane, rounded to nearest even as c10::BFloat16 does (NaN
// to its quiet NaN)
inline __m256i to_bf16_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

inline __m256 round_bf16x8(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(to_bf16_bits8(v), 16)); }

// 8 lanes of bfloat16 bits (low halves) -> 8 packed bfloat16 stored at p
inline void store_bf16x8(void* p, __m256i b) {
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              ": expected a contiguous bfloat16 CPU tensor");
}

// out = w * bf16(x * rsqrt(mean(x^2) + eps)), as decoder.rms_norm computes it for bfloat16 x.
void norm_row(const bf16* x, const bf16* w, bf16* out, int64_t n, float eps) {
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0) {  // 8 lanes, the same roundings
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 v = load_bf16x8(x + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum8(acc) / static_cast<float>(n) + eps));
    for (int64_t i = 0; i < n; i += 8)
      store_bf16x8(out + i, to_bf16_bits8(_mm256_mul_ps(load_bf16x8(w + i), round_bf16x8(_mm256_mul_ps(load_bf16x8(x + i), inv)))));
    return;
  }
#endif
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float v = to_f(x[i]);
    ss += v * v;
  }
  float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(to_f(w[i]) * round_bf16(to_f(x[i]) * inv));
}

}  // namespace

// x: [n, hidden] bfloat16 -> rms_norm(x) [n, hidden]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bf16(x, "x");
  check_bf16(weight, "weight");
  auto out = at::empty_like(x);
  const int64_t n = x.size(0), h = x.size(1);
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  for (int64_t r = 0; r < n; ++r) norm_row(xp + r * h, wp, op + r * h, h, static_cast<float>(eps));
  return out;
}

// s = x + y (rounded to bfloat16, as the eager residual add), and rms_norm(s): two [n, hidden] tensors
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, double eps) {
  check_bf16(x, "x");
  check_bf16(y, "y");
  check_bf16(weight, "weight");
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y differ in shape");
  auto sum = at::empty_like(x);
  auto out = at::empty_like(x);
  const int64_t n = x.size(0), h = x.size(1);
  const bf16 *xp = x.data_ptr<bf16>(), *yp = y.data_ptr<bf16>(), *wp = weight.data_ptr<bf16>();
  bf16 *sp = sum.data_ptr<bf16>(), *op = out.data_ptr<bf16>();
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n * h; i += 8) store_bf16x8(sp + i, to_bf16_bits8(_mm256_add_ps(load_bf16x8(xp + i), load_bf16x8(yp + i))));
#endif
  for (; i < n * h; ++i) sp[i] = bf16(to_f(xp[i]) + to_f(yp[i]));
  for (int64_t r = 0; r < n; ++r) norm_row(sp + r * h, wp, op + r * h, h, static_cast<float>(eps));
  return {sum, out};
}

// gate_up: [n, 2 * inter] (gate then up) -> silu(gate) * up: [n, inter], with ATen's own kernels (the
// eager ops, vectorised; one call from here instead of three from Python)
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_bf16(gate_up, "gate_up");
  const int64_t inter = gate_up.size(1) / 2;
  return at::silu(gate_up.narrow(1, 0, inter)).mul_(gate_up.narrow(1, inter, inter));
}


// Cephes' single-precision exp: x = k ln 2 + r (ln 2 in two parts), e^r by a degree-6 polynomial
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// sc[p] = exp(sc[p] - mx) for p < n; returns their sum. Vectorised (16 lanes) with the single-precision
// exp of Cephes (range reduction by ln 2, degree-6 polynomial, about 1 ulp); scalar std::exp elsewhere.
inline float exp_shifted(float* sc, int64_t n, float mx) {
#if defined(__AVX512F__)
  const __m512 vmx = _mm512_set1_ps(mx), log2e = _mm512_set1_ps(kLog2e);
  const __m512 ln2_hi = _mm512_set1_ps(kLn2Hi), ln2_lo = _mm512_set1_ps(kLn2Lo);
  const float* c = kExpPoly;
  __m512 total = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 mask = n - p >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - p)) - 1);
    __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + p), vmx);  // <= 0 (masked-off lanes unused)
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));  // below it exp underflows to 0 either way
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, ln2_hi, x);
    r = _mm512_fnmadd_ps(k, ln2_lo, r);
    __m512 poly = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c[i]));
    poly = _mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512 e = _mm512_scalef_ps(poly, k);  // poly * 2^k
    _mm512_mask_storeu_ps(sc + p, mask, e);
    total = _mm512_mask_add_ps(total, mask, total, e);
  }
  return _mm512_reduce_add_ps(total);
#elif OFFRAMP_AVX2
  const __m256 vmx = _mm256_set1_ps(mx), log2e = _mm256_set1_ps(kLog2e);
  const __m256 ln2_hi = _mm256_set1_ps(kLn2Hi), ln2_lo = _mm256_set1_ps(kLn2Lo);
  const float* c = kExpPoly;
  __m256 total = _mm256_setzero_ps();
  for (int64_t p = 0; p < n; p += 8) {
    const __m256i mask = tail_mask8(n - p);
    __m256 x = _mm256_sub_ps(_mm256_maskload_ps(sc + p, mask), vmx);  // <= 0 (masked-off lanes unused)
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));  // below it exp underflows to 0 either way; 2^k stays normal
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, x);
    r = _mm256_fnmadd_ps(k, ln2_lo, r);
    __m256 poly = _mm256_set1_ps(c[0]);
    for (int i = 1; i < 6; ++i) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c[i]));
    poly = _mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    // 2^k from its exponent bits (k in -126..0)
    const __m256 pow2k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
    const __m256 e = _mm256_and_ps(_mm256_mul_ps(poly, pow2k), _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(sc + p, mask, e);
    total = _mm256_add_ps(total, e);
  }
  return hsum8(total);
#else
  float total = 0.f;
  for (int64_t p = 0; p < n; ++p) {
    sc[p] = std::exp(sc[p] - mx);
    total += sc[p];
  }
  return total;
#endif
}

// The two halves of one (row, kv head)'s attention over `span` positions with vector instructions, for
// head_dim 64 or 128 (false elsewhere: the caller's loops run). key(i) / value(i) point at position i's
// K / V row (bfloat16 bits). The query heads' values are bfloat16 numbers held in float32 (RoPE rounds
// them), so bfloat16 dot products of q and k are exact products summed in float32, like the loops.
template <int C, class Row>  // C: head_dim / 32
void scores_dp(const float* q, int64_t group, int64_t span, Row key, float scale, float* score) {
#if OFFRAMP_DP
  __m512bh qb[8][C];  // group <= 8 (checked by the caller)
  for (int64_t g = 0; g < group; ++g)
    for (int c = 0; c < C; ++c)
      qb[g][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + g * C * 32 + 32 * c + 16), _mm512_loadu_ps(q + g * C * 32 + 32 * c));
  for (int64_t i = 0; i < span; ++i) {
    const uint16_t* k = key(i);
    __m512bh kb[C];
    for (int c = 0; c < C; ++c) kb[c] = (__m512bh)_mm512_loadu_si512(k + 32 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[g][0], kb[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_dpbf16_ps(acc, qb[g][c], kb[c]);
      score[g * span + i] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
#endif
}

// AVX2: the same with float32 FMAs over K rows widened to float32 once per position (C: head_dim / 8).
template <int C, class Row>
void scores_fma8(const float* q, int64_t group, int64_t span, Row key, float scale, float* score) {
#if OFFRAMP_AVX2
  for (int64_t i = 0; i < span; ++i) {
    const uint16_t* k = key(i);
    __m256 kf[C];
    for (int c = 0; c < C; ++c) kf[c] = load_bf16x8(k + 8 * c);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * C * 8;
      __m256 acc0 = _mm256_mul_ps(_mm256_loadu_ps(qg), kf[0]);
      __m256 acc1 = _mm256_mul_ps(_mm256_loadu_ps(qg + 8), kf[1]);
      for (int c = 2; c < C; c += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), kf[c], acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c + 8), kf[c + 1], acc1);
      }
      score[g * span + i] = hsum8(_mm256_add_ps(acc0, acc1)) * scale;
    }
  }
#endif
}

template <class Row>
bool attend_scores_fast(const float* q, int64_t group, int64_t hd, int64_t span, Row key, float scale, float* score) {
#if OFFRAMP_DP
  if (group > 8) return false;
  if (hd == 64) scores_dp<2>(q, group, span, key, scale, score);
  else if (hd == 128) scores_dp<4>(q, group, span, key, scale, score);
  else return false;
  return true;
#elif OFFRAMP_AVX2
  if (hd == 64) scores_fma8<8>(q, group, span, key, scale, score);
  else if (hd == 128) scores_fma8<16>(q, group, span, key, scale, score);
  else return false;
  return true;
#else
  return false;
#endif
}

template <int C, class Row>  // C: head_dim / 16
void values_fma(const float* score, int64_t group, int64_t span, Row value, float* acc_out) {
#if defined(__AVX512F__)
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_loadu_ps(acc_out + g * C * 16 + 16 * c);
    const float* w = score + g * span;
    for (int64_t i = 0; i < span; ++i) {
      const uint16_t* v = value(i);
      const __m512 wi = _mm512_set1_ps(w[i]);
      for (int c = 0; c < C; ++c) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * c)));
        acc[c] = _mm512_fmadd_ps(wi, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)), acc[c]);
      }
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc_out + g * C * 16 + 16 * c, acc[c]);
  }
#endif
}

// AVX2: acc[g, d] += score[g, i] v_i[d], 64 columns (8 registers) at a time.
template <class Row>
void values_fma8(const float* score, int64_t group, int64_t hd, int64_t span, Row value, float* acc_out) {
#if OFFRAMP_AVX2
  for (int64_t g = 0; g < group; ++g) {
    const float* w = score + g * span;
    for (int64_t d0 = 0; d0 < hd; d0 += 64) {
      float* out = acc_out + g * hd + d0;
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(out + 8 * c);
      for (int64_t i = 0; i < span; ++i) {
        const uint16_t* v = value(i) + d0;
        const __m256 wi = _mm256_set1_ps(w[i]);
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(wi, load_bf16x8(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
    }
  }
#endif
}

template <class Row>
bool attend_values_fast(const float* score, int64_t group, int64_t hd, int64_t span, Row value, float* acc) {
#if defined(__AVX512F__)
  if (hd == 64) values_fma<4>(score, group, span, value, acc);
  else if (hd == 128) values_fma<8>(score, group, span, value, acc);
  else return false;
  return true;
#elif OFFRAMP_AVX2
  if (hd % 64 != 0) return false;
  values_fma8(score, group, hd, span, value, acc);
  return true;
#else
  return false;
#endif
}

// RoPE of one head as the loop in rope_attend computes it (x * cos and roll(x) * signed sin each rounded
// to bfloat16, their sum rounded again), 16 lanes at a time where half the head_dim is a multiple of 16
// (AVX2: 8 lanes, half the head_dim a multiple of 8).
// Writes q as float32 (qdst) or k as bfloat16 (kdst). False where the loop must run instead.
inline bool rope_head_fast(const bf16* x, const bf16* c, const bf16* s, int64_t hd, float* qdst, bf16* kdst) {
#if OFFRAMP_DP
  if (hd % 32 != 0 || hd > 512) return false;
  auto load = [](const bf16* p) {  // 16 bfloat16 -> float32
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  };
  auto round = [](__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); };  // to bfloat16 (RNE) and back
  const int64_t chunks = hd / 16, half = chunks / 2;
  for (int64_t j = 0; j < chunks; ++j) {
    const __m512 a = round(_mm512_mul_ps(load(x + 16 * j), load(c + 16 * j)));
    const __m512 b = round(_mm512_mul_ps(load(x + 16 * ((j + half) % chunks)), load(s + 16 * j)));
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(a, b));
    if (qdst) _mm512_storeu_ps(qdst + 16 * j, _mm512_cvtpbh_ps(v));
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(kdst + 16 * j), (__m256i)v);
  }
  return true;
#elif OFFRAMP_AVX2
  if (hd % 16 != 0 || hd > 512) return false;
  const int64_t chunks = hd / 8, half = chunks / 2;  // 8 lanes a chunk
  for (int64_t j = 0; j < chunks; ++j) {
    const __m256 a = round_bf16x8(_mm256_mul_ps(load_bf16x8(x + 8 * j), load_bf16x8(c + 8 * j)));
    const __m256 b = round_bf16x8(_mm256_mul_ps(load_bf16x8(x + 8 * ((j + half) % chunks)), load_bf16x8(s + 8 * j)));
    const __m256i v = to_bf16_bits8(_mm256_add_ps(a, b));
    if (qdst) _mm256_storeu_ps(qdst + 8 * j, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    else store_bf16x8(kdst + 8 * j, v);
  }
  return true;
#else
  return false;
#endif
}

constexpr int64_t kSlice = 64;  // context positions per attention work item (see rope_attend)

// Rows of new tokens (one per decoding sequence, or a few of one sequence: drafts, redo rows): RoPE on
// their q and k heads, every row's K/V written to the paged store at slots[r] first, then attention of
// row r's q over the positions before lens[r] through its own page table pages[r] (causal).
//   qkv:   [n, (nh + 2 nkv) * hd] bfloat16 (q heads, k heads, v heads)
//   cos, sin: [n, hd] bfloat16 (sin signed: rotate_half(x) * sin == roll(x, hd / 2) * signed_sin)
//   k_store, v_store: [slots, nkv, hd] bfloat16
//   slots: [n] long; pages: [n, max_pages] long; lens: [n] long (context length including the new token)
// Returns [n, nh * hd] bfloat16.
at::Tensor rope_attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_store,
                       at::Tensor v_store, const at::Tensor& slots, const at::Tensor& pages, const at::Tensor& lens,
                       int64_t nh, int64_t nkv, int64_t hd, int64_t page_size) {
  check_bf16(qkv, "qkv");
  check_bf16(cos, "cos");
  check_bf16(sin, "sin");
  check_bf16(k_store, "k_store");
  check_bf16(v_store, "v_store");
  TORCH_CHECK(slots.scalar_type() == at::kLong && pages.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "slots, pages and lens must be long tensors");
  TORCH_CHECK(hd % 2 == 0 && nh % nkv == 0, "head_dim must be even and heads a multiple of kv heads");
  TORCH_CHECK(page_size > 0 && (page_size & (page_size - 1)) == 0, "page_size must be a power of two");
  TORCH_CHECK(hd <= 512, "head_dim above 512");
  int64_t page_shift = 0;
  while ((int64_t{1} << page_shift) < page_size) ++page_shift;
  auto pages_c = pages.contiguous();
  const int64_t n = qkv.size(0), width = qkv.size(1), max_pages = pages_c.size(1), half = hd / 2;
  TORCH_CHECK(width == (nh + 2 * nkv) * hd, "qkv width does not match the head counts");
  const bf16 *qp = qkv.data_ptr<bf16>(), *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
  bf16 *kp = k_store.data_ptr<bf16>(), *vp = v_store.data_ptr<bf16>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* page = pages_c.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t kv_row = nkv * hd;  // elements per slot
  const int64_t num_slots = k_store.size(0);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(slot[r] >= 0 && slot[r] < num_slots, "slot outside the KV store");
    TORCH_CHECK(len[r] >= 1 && (len[r] + page_size - 1) / page_size <= max_pages, "context longer than its page table");
    for (int64_t i = 0; i < (len[r] + page_size - 1) / page_size; ++i)
      TORCH_CHECK(page[r * max_pages + i] >= 0 && (page[r * max_pages + i] + 1) * page_size <= num_slots,
                  "page outside the KV store");
  }
  // RoPE'd q (float32, [n, nh, hd]); RoPE'd k and raw v go to the store
  std::vector<float> q(n * nh * hd);
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* row = qp + r * width;
      const bf16 *c = cp + r * hd, *s = sp + r * hd;
      for (int64_t head = 0; head < nh + nkv; ++head) {
        const bf16* x = row + head * hd;
        float* qdst = head < nh ? q.data() + (r * nh + head) * hd : nullptr;
        bf16* kdst = head < nh ? nullptr : kp + slot[r] * kv_row + (head - nh) * hd;
        if (rope_head_fast(x, c, s, hd, qdst, kdst)) continue;
        for (int64_t d = 0; d < hd; ++d) {
          float a = round_bf16(to_f(x[d]) * to_f(c[d]));
          float b = round_bf16(to_f(x[(d + half) % hd]) * to_f(s[d]));
          bf16 v = bf16(a + b);
          if (qdst) qdst[d] = to_f(v);
          else kdst[d] = v;
        }
      }
      std::memcpy(vp + slot[r] * kv_row, row + (nh + nkv) * hd, kv_row * sizeof(bf16));
    }
  });
  auto out = at::empty({n, nh * hd}, qkv.options());
  bf16* op = out.data_ptr<bf16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t group = nh / nkv;  // query heads per kv head (head h reads kv head h / group)
  const uint16_t* kbits = reinterpret_cast<const uint16_t*>(kp);
  const uint16_t* vbits = reinterpret_cast<const uint16_t*>(vp);
  // An item is one row's kv head, all query heads that read it (each K/V row is loaded once for all
  // of them), and one slice of kSlice positions of the row's context: the threads share even one
  // request's work (3 kv heads on 2 threads), and the slices' partial softmax sums are merged after (max,
  // sum of exp, weighted V sum per slice). The slices are fixed positions, so a row's result does not
  // depend on the rows beside it: a verification step's rows equal plain decode steps' bit for bit.
  int64_t max_len = 1;
  for (int64_t r = 0; r < n; ++r) max_len = std::max(max_len, len[r]);
  const int64_t splits = (max_len + kSlice - 1) / kSlice;  // slices per (row, kv head); the tail ones empty
  const int64_t items = n * nkv * splits;
  std::vector<float> part_max(items * group), part_sum(items * group), part_acc(items * group * hd);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score, row(hd);
    float* f = row.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / splits, slice = item % splits, r = pair / nkv, kvh = pair % nkv;
      const int64_t ctx = len[r], lo = std::min(ctx, slice * kSlice), hi = std::min(ctx, lo + kSlice), span = hi - lo;
      const float* qg = q.data() + (r * nh + kvh * group) * hd;  // [group, hd]
      const int64_t* table = page + r * max_pages;
      // slot of position p; page_size is a power of two (checked), so no division per position
      auto slot_of = [&](int64_t p) { return table[p >> page_shift] * page_size + (p & (page_size - 1)); };
      float* pm = part_max.data() + item * group;
      float* ps = part_sum.data() + item * group;
      float* pa = part_acc.data() + item * group * hd;
      std::fill(pa, pa + group * hd, 0.f);
      if (span == 0) {
        std::fill(pm, pm + group, -INFINITY);
        std::fill(ps, ps + group, 0.f);
        continue;
      }
      score.resize(group * span);
      if (!attend_scores_fast(qg, group, hd, span, [&](int64_t i) { return kbits + slot_of(lo + i) * kv_row + kvh * hd; },
                              scale, score.data())) {
        for (int64_t p = lo; p < hi; ++p) {
          const uint16_t* k = kbits + slot_of(p) * kv_row + kvh * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) f[d] = bits_to_f(k[d]);
          for (int64_t g = 0; g < group; ++g) {
            const float* qv = qg + g * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < hd; ++d) dot += qv[d] * f[d];
            score[g * span + p - lo] = dot * scale;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = score.data() + g * span;
        float mx = -INFINITY;
        for (int64_t p = 0; p < span; ++p) mx = std::max(mx, sc[p]);
        pm[g] = mx;
        ps[g] = exp_shifted(sc, span, mx);
      }
      if (!attend_values_fast(score.data(), group, hd, span,
                              [&](int64_t i) { return vbits + slot_of(lo + i) * kv_row + kvh * hd; }, pa)) {
        for (int64_t p = lo; p < hi; ++p) {
          const uint16_t* v = vbits + slot_of(p) * kv_row + kvh * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) f[d] = bits_to_f(v[d]);
          for (int64_t g = 0; g < group; ++g) {
            float* a = pa + g * hd;
            const float w = score[g * span + p - lo];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) a[d] += w * f[d];
          }
        }
      }
    }
  });
  // merge the slices: softmax over the whole context = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c
  for (int64_t pair = 0; pair < n * nkv; ++pair) {
    const int64_t r = pair / nkv, kvh = pair % nkv;
    for (int64_t g = 0; g < group; ++g) {
      float mx = -INFINITY;
      for (int64_t c = 0; c < splits; ++c) mx = std::max(mx, part_max[(pair * splits + c) * group + g]);
      float total = 0.f;
      float acc[512];  // hd <= 512, checked above
      std::fill(acc, acc + hd, 0.f);
      for (int64_t c = 0; c < splits; ++c) {
        const int64_t item = pair * splits + c;
        if (part_sum[item * group + g] == 0.f) continue;
        const float w = std::exp(part_max[item * group + g] - mx);
        total += w * part_sum[item * group + g];
        const float* pa = part_acc.data() + (item * group + g) * hd;
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * pa[d];
      }
      const float inv = 1.f / total;
      bf16* dst = op + r * nh * hd + (kvh * group + g) * hd;
      for (int64_t d = 0; d < hd; ++d) dst[d] = bf16(acc[d] * inv);
    }
  }
  return out;
}

// Dot products of R float32 activation rows (stride k) with one int8 weight row whose groups of `group`
// input columns (a multiple of 32) have the float32 scales s[]: out[r] = sum_j x[r, j] q[j] s[j / group].
// Each 32 weights become float32 once (q * s is exact) for all R rows. One weight row at a time keeps
// the weights one sequential stream (four rows interleaved ran at a third of the speed: the hardware
// prefetchers follow them badly).
template <int R>
void dot_int8(const float* x, int64_t k, const int8_t* w, const float* s, int64_t group, float* out) {
#if defined(__AVX512F__)
  // one sum per row, in the same order for every R: a row's result does not depend on the rows beside it
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  auto wv = [&](int64_t at, __m512 sv) {
    return _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + at)))), sv);
  };
  for (int64_t j = 0; j < k; j += 32) {
    const __m512 sv = _mm512_set1_ps(s[j / group]);
    const __m512 w0 = wv(j, sv), w1 = wv(j + 16, sv);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + j), w0, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + j + 16), w1, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  auto wv = [&](int64_t at, __m256 sv) {
    return _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + at)))), sv);
  };
  for (int64_t j = 0; j < k; j += 32) {
    const __m256 sv = _mm256_set1_ps(s[j / group]);
    const __m256 w0 = wv(j, sv), w1 = wv(j + 8, sv), w2 = wv(j + 16, sv), w3 = wv(j + 24, sv);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * k + j;
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), w2, acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), w3, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {  // horizontal sum, one order for every R
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out[r] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
#else
  for (int r = 0; r < R; ++r) {
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) acc += x[r * k + j] * (static_cast<float>(w[j]) * s[j / group]);
    out[r] = acc;
  }
#endif
}

#if !OFFRAMP_DP && OFFRAMP_AVX2
// One int8 weight row (scales s[] per group of `group` columns) against R rows of int16 activations (xq,
// stride k; block scales xd, stride k / 32): out[r] = sum_b s[b] xd[r, b] sum_c q[c] xq[r, c]. The weights
// widen to int16 once for all rows; vpmaddwd multiplies 16 pairs and sums them in pairs to int32 (exact).
template <int R>
void dot_q16(const int16_t* xq, const float* xd, int64_t k, const int8_t* w, const float* s, int64_t group,
             float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < k; j += 32) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 16)));
    const float sw = s[j / group];
    for (int r = 0; r < R; ++r) {
      const __m256i* xr = reinterpret_cast<const __m256i*>(xq + r * k + j);
      const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xr)),
                                            _mm256_madd_epi16(w1, _mm256_loadu_si256(xr + 1)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(sw * xd[r * (k / 32) + j / 32]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {  // horizontal sum, one order for every R
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out[r] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
}

template <int R>
void dot_q16_dispatch(int64_t rows, const int16_t* xq, const float* xd, int64_t k, const int8_t* w, const float* s,
                      int64_t group, float* out) {
  if constexpr (R > 1) {
    if (rows < R) return dot_q16_dispatch<R - 1>(rows, xq, xd, k, w, s, group, out);
  }
  dot_q16<R>(xq, xd, k, w, s, group, out);
}
#endif

template <int R>
void dot_int8_dispatch(int64_t rows, const float* x, int64_t k, const int8_t* w, const float* s, int64_t group,
                       float* out) {
  if constexpr (R > 1) {
    if (rows < R) return dot_int8_dispatch<R - 1>(rows, x, k, w, s, group, out);
  }
  dot_int8<R>(x, k, w, s, group, out);
}

constexpr int64_t kInt8RowTile = 16, kInt8WeightBlock = 64, kInt8Ahead = 16;

// float16 scales -> float32 (F16C, 8 at a time, where the CPU has it)
inline void scales_to_float(const at::Half* src, int64_t n, float* dst) {
  int64_t g = 0;
#if defined(__F16C__)
  for (; g + 8 <= n; g += 8)
    _mm256_storeu_ps(dst + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g))));
#endif
  for (; g < n; ++g) dst[g] = static_cast<float>(src[g]);
}

// y = x @ (q * scale).T for x [m, K] bfloat16 (any m), int8 weights q [N, K] and float16 scales [N, K / g]
// per group of g input columns (g a multiple of 32: GGUF's Q8_0 layout). Blocks of 64 weight rows (kept in
// cache) against tiles of up to 16 activation rows: with a decode step's few rows every weight row is read
// once, as one stream. Each row's sums are the same at any batch size; from dense_from_rows rows (> 0: a
// prompt chunk outside the fused step) see below.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t dense_from_rows,
                   bool int16_act) {
  check_bf16(x, "x");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) == x.size(1),
              "q: int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == q.size(0) && scale.size(1) > 0 && q.size(1) % scale.size(1) == 0,
              "scale: float16 [N, K / group]");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), groups = scale.size(1), group = k / groups;
  TORCH_CHECK(group % 32 == 0, "int8_mm: groups must be a multiple of 32 columns");
  TORCH_CHECK(!int16_act || (!OFFRAMP_DP && OFFRAMP_AVX2), "int8_mm: int16 activations are the AVX2 kernels'");
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  if (dense_from_rows > 0 && m >= dense_from_rows) {
    // Prompt chunks: the weights de-quantized to bfloat16 (q * s rounded once, 2^-9 relative) and one
    // bfloat16 matrix product (oneDNN), several times faster than float32 FMAs over many rows.
    auto w = at::empty({n, k}, x.options());
    bf16* wp = w.data_ptr<bf16>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int8_t* src = qp + row * k;
        bf16* dst = wp + row * k;
#if OFFRAMP_DP
        for (int64_t j = 0; j < k; j += 32) {  // k and group are multiples of 32 (checked)
          const __m512 sv = _mm512_set1_ps(static_cast<float>(sp[row * groups + j / group]));
          auto part = [&](int64_t at) {
            return _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + at)))), sv);
          };
          _mm512_storeu_si512(dst + j, (__m512i)_mm512_cvtne2ps_pbh(part(j + 16), part(j)));
        }
#else
        for (int64_t j = 0; j < k; ++j) dst[j] = bf16(static_cast<float>(src[j]) * static_cast<float>(sp[row * groups + j / group]));
#endif
      }
    });
#if OFFRAMP_DP
    return at::linear(x, w);
#else
    // without AVX512-BF16 a bfloat16 product of many rows runs emulated (10x slower): float32 instead
    return at::linear(x.to(at::kFloat), w.to(at::kFloat)).to(x.scalar_type());
#endif
  }
  const bf16* xp = x.data_ptr<bf16>();
  std::vector<float> xf(m * k);
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_f(xp[i]);
  auto out = at::empty({m, n}, x.options());
  bf16* op = out.data_ptr<bf16>();
  std::vector<int16_t> xq;  // int16 activations (see dot_q16): the rows quantized once
  std::vector<float> xd;
#if !OFFRAMP_DP && OFFRAMP_AVX2
  if (int16_act) {
    xq.resize(m * k);
    xd.resize(m * k / 32);
    for (int64_t i = 0; i < m; ++i) quantize_row_q16(xf.data() + i * k, k, xq.data() + i * k, xd.data() + i * k / 32);
  }
#endif
  at::parallel_for(0, (n + kInt8WeightBlock - 1) / kInt8WeightBlock, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sg(groups);
    float acc[kInt8RowTile];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t lo = blk * kInt8WeightBlock, hi = std::min(n, lo + kInt8WeightBlock);
      for (int64_t i = 0; i < m; i += kInt8RowTile) {
        const int64_t rows = std::min(kInt8RowTile, m - i);
        for (int64_t row = lo; row < hi; ++row) {
          if (i == 0 && row + kInt8Ahead < end * kInt8WeightBlock && row + kInt8Ahead < n) {
            // the row kInt8Ahead rows on: the stream runs ahead of the products (2x the bandwidth of the
            // hardware prefetchers alone on the LM head, which leaves every cache between steps)
            const char* ahead = reinterpret_cast<const char*>(qp + (row + kInt8Ahead) * k);
            for (int64_t off = 0; off < k; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
          }
          scales_to_float(sp + row * groups, groups, sg.data());
#if !OFFRAMP_DP && OFFRAMP_AVX2
          if (int16_act)
            dot_q16_dispatch<kInt8RowTile>(rows, xq.data() + i * k, xd.data() + i * k / 32, k, qp + row * k, sg.data(),
                                           group, acc);
          else
#endif
            dot_int8_dispatch<kInt8RowTile>(rows, xf.data() + i * k, k, qp + row * k, sg.data(), group, acc);
          for (int64_t j = 0; j < rows; ++j) op[(i + j) * n + row] = bf16(acc[j]);
        }
      }
    }
  });
  return out;
}

// Does torch's CPU int4 packing on this machine come in blocks of `rows` output rows (64 with AVX-512, 32
// with AVX2), per block and input column k rows / 2 bytes, byte d holding row d (low nibble) and row
// d + rows / 2 (high)? The layout follows the CPU's vector width, so it is checked once by packing a known
// matrix; int4_mm reads that layout.
bool packs_in_blocks_of(int64_t rows) {
  const int64_t half = rows / 2;
  auto codes = at::arange(rows * 64, at::kInt).remainder(16).reshape({rows, 64}).contiguous();
  codes = (codes + at::arange(rows, at::kInt).reshape({rows, 1})).remainder(16).contiguous();  // row-dependent
  auto packed = at::_convert_weight_to_int4pack_for_cpu(codes, 1).contiguous();
  if (packed.size(0) != rows || packed.size(1) != 32) return false;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const int32_t* c = codes.data_ptr<int32_t>();
  for (int64_t k = 0; k < 64; ++k)
    for (int64_t d = 0; d < half; ++d) {
      const uint8_t b = p[k * half + d];
      if ((b & 15) != c[d * 64 + k] || (b >> 4) != c[(d + half) * 64 + k]) return false;
    }
  return true;
}

#if OFFRAMP_DP
// The int4 product as bfloat16 dot products (vdpbf16ps: each float32 lane adds a[2i] b[2i] + a[2i+1] b[2i+1]).
// A pair of input columns (k, k + 1) of one block's 64 rows unpacks to four vectors whose 32-bit lane i
// holds 16 + q of row 16 j + i at k and at k + 1 as bfloat16, and one broadcast of the pair x[r, k:k + 2]
// multiplies them for 64 rows at once: per weight, one instruction serves two input columns, against one
// FMA per column from float32. 16 + q is exact in bfloat16 (16.0 is 0x4180; q fills mantissa bits 3..6), so
// a code becomes a bfloat16 by masking and one OR, with no lookup. Per group of input columns the sums are
// scaled: sum x (q - 8) = acc - 24 sum x, so y += s * acc + (z - 24 s) * sum x.
constexpr float kCodeBias = 24.f;  // (16 + q) - (q - 8)

#if defined(__AVX512VBMI__)
// Two vpermb indices: 32-bit lane i takes byte i (column k) and byte 32 + i (column k + 1) of a pair's 64
// bytes (lo), or bytes 16 + i and 48 + i (hi); the lanes' other bytes are masked off after.
struct Int4Unpack {
  __m512i lo, hi;
};

inline Int4Unpack int4_unpack() {
  alignas(64) uint8_t lo[64] = {}, hi[64] = {};
  for (int i = 0; i < 16; ++i) {
    lo[4 * i] = i, lo[4 * i + 2] = 32 + i;
    hi[4 * i] = 16 + i, hi[4 * i + 2] = 48 + i;
  }
  return {_mm512_load_si512(lo), _mm512_load_si512(hi)};
}

inline void unpack_pair(const uint8_t* bk, const Int4Unpack& u, __m512i w[4]) {  // bk: column k's 32 bytes, then k + 1's
  const __m512i src = _mm512_loadu_si512(bk);  // byte d: row d (low nibble), row d + 32 (high)
  // each byte's low (high) nibble moved to its bits 3..6; the bits shifted in from the next byte are masked off
  const __m512i low = _mm512_slli_epi16(src, 3), high = _mm512_srli_epi16(src, 1);
  const __m512i mask = _mm512_set1_epi32(0x00780078), sixteen = _mm512_set1_epi32(0x41804180);
  constexpr int kAndOr = 0xEA;  // vpternlogd: (a & b) | c
  w[0] = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi8(u.lo, low), mask, sixteen, kAndOr);   // rows 0..15
  w[1] = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi8(u.hi, low), mask, sixteen, kAndOr);   // rows 16..31
  w[2] = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi8(u.lo, high), mask, sixteen, kAndOr);  // rows 32..47
  w[3] = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi8(u.hi, high), mask, sixteen, kAndOr);  // rows 48..63
}
#else
// Without VBMI's byte permute: the codes widen to 32-bit lanes and a vpermw lookup gives the same bfloat16.
struct Int4Unpack {
  __m512i table;
};

inline Int4Unpack int4_unpack() {
  uint16_t lut[32] = {};
  for (int q = 0; q < 16; ++q) lut[q] = static_cast<uint16_t>(0x4180 | q << 3);  // 16 + q
  return {_mm512_loadu_si512(lut)};
}

inline void unpack_pair(const uint8_t* bk, const Int4Unpack& u, __m512i w[4]) {  // bk: column k's 32 bytes
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  for (int h = 0; h < 2; ++h) {  // bytes 16 h .. 16 h + 15: rows 16 h + i (low nibble), 32 + 16 h + i (high)
    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 16 * h)));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 32 + 16 * h)));
    const __m512i v = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));  // lane: byte at k | byte at k + 1 << 16
    w[h] = _mm512_permutexvar_epi16(_mm512_and_si512(v, nib), u.table);
    w[2 + h] = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi32(v, 4), nib), u.table);
  }
}
#endif

inline __m512 bcast_pair(const bf16* x) {  // x[0], x[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  return _mm512_castsi512_ps(_mm512_set1_epi32(pair));
}

// R rows (stride k) of one group (columns k0 .. k0 + 2 pairs) against the group's unpacked pairs wbuf
// [pairs][4], then y [R][64] += s * acc + z * xs (z: the group's zeros less kCodeBias * s). With wbuf null, the
// pairs are unpacked here from block.
template <int R>
void int4_group_rows(const bf16* x, int64_t k, int64_t k0, int64_t pairs, const __m512i* wbuf, const uint8_t* block,
                     const Int4Unpack& unpack, const __m512 s[4], const __m512 z[4], const float* xs, int64_t xs_stride,
                     float* y) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i w[4];
    if (wbuf) {
      for (int j = 0; j < 4; ++j) w[j] = _mm512_load_si512(wbuf + 4 * p + j);
    } else {
      unpack_pair(block + (k0 + 2 * p) * 32, unpack, w);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xp = (__m512bh)bcast_pair(x + r * k + k0 + 2 * p);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)w[j], xp);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 xsum = _mm512_set1_ps(xs[r * xs_stride]);
    for (int j = 0; j < 4; ++j) {
      __m512 out = _mm512_fmadd_ps(s[j], acc[r][j], _mm512_loadu_ps(y + r * 64 + j * 16));
      _mm512_storeu_ps(y + r * 64 + j * 16, _mm512_fmadd_ps(z[j], xsum, out));
    }
  }
}

template <int R>
void int4_group_dispatch(int64_t rows, const bf16* x, int64_t k, int64_t k0, int64_t pairs, const __m512i* wbuf,
                         const uint8_t* block, const Int4Unpack& unpack, const __m512 s[4], const __m512 z[4],
                         const float* xs, int64_t xs_stride, float* y) {
  if constexpr (R > 1) {
    if (rows < R) {
      int4_group_dispatch<R - 1>(rows, x, k, k0, pairs, wbuf, block, unpack, s, z, xs, xs_stride, y);
      return;
    }
  }
  int4_group_rows<R>(x, k, k0, pairs, wbuf, block, unpack, s, z, xs, xs_stride, y);
}

#ifdef OFFRAMP_NO_PREFETCH
constexpr bool kPrefetch = false;
#else
constexpr bool kPrefetch = true;
#endif
#ifndef PF_BYTES
#define PF_BYTES 2048
#endif
#ifndef PF_GROUPS
#define PF_GROUPS 2
#endif
constexpr int64_t kPrefetchBytes = PF_BYTES, kPrefetchGroups = PF_GROUPS;
constexpr int64_t kRowTile = 6;  // 24 accumulators + 4 weight vectors + the broadcast fit the 32 registers

// y = x @ w.T for x [m, K] bfloat16 (any m) and int4 weights in torch's CPU layout (packed [N_pad, K / 2],
// scale_zero [K / group, N_pad, 2]: w = (q - 8) * scale + zero), N_pad a multiple of 64. One block of 64
// output rows at a time: its bytes are one sequential stream. Up to kRowTile rows unpack each column pair
// in registers; more rows unpack a group's pairs once into a buffer that every tile of rows reads.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group,
                   int64_t out_features, int64_t dense_from_rows, bool int16_act) {
  check_bf16(x, "x");
  check_bf16(scale_zero, "scale_zero");
  TORCH_CHECK(!int16_act, "int4_mm: int16 activations are the AVX2 kernels' (bfloat16 dot products here)");
  const int64_t m = x.size(0), k = x.size(1), n_pad = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == k,
              "packed: uint8 [N_pad, K / 2]");
  TORCH_CHECK(n_pad % 64 == 0 && group % 2 == 0 && k % group == 0 && m >= 1 && out_features <= n_pad,
              "int4_mm: unsupported shape");
  TORCH_CHECK(scale_zero.size(0) == k / group && scale_zero.size(1) == n_pad, "scale_zero: [K / group, N_pad, 2]");
  const int64_t groups = k / group, pairs = group / 2;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16* szp = scale_zero.data_ptr<bf16>();
  if (dense_from_rows > 0 && m >= dense_from_rows) {
    // A prompt chunk: the weights de-quantized once to bfloat16 as w.T [K, N_pad] (each block's 64 rows of
    // one column are contiguous there, so no transpose; (q - 8) s + z rounded once, 2^-9 relative) and one
    // bfloat16 product (oneDNN), which is faster than the dot products above over many rows.
    auto wt = at::empty({k, n_pad}, x.options());
    bf16* wp = wt.data_ptr<bf16>();
    at::parallel_for(0, n_pad / 64, 1, [&](int64_t begin, int64_t end) {
      const __m512i low = _mm512_set1_epi32(15), high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      for (int64_t nb = begin; nb < end; ++nb) {
        const uint8_t* block = pp + nb * 64 * (k / 2);
        for (int64_t g = 0; g < groups; ++g) {
          const int32_t* lanes = reinterpret_cast<const int32_t*>(szp + (g * n_pad + nb * 64) * 2);
          __m512 s[4], z[4];  // w = q s + (z - 8 s)
          for (int j = 0; j < 4; ++j) {
            const __m512i pair = _mm512_loadu_si512(lanes + j * 16);
            s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            z[j] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s[j], _mm512_castsi512_ps(_mm512_and_si512(pair, high_half)));
          }
          for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
            const uint8_t* b = block + kk * 32;
            const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
            const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
            const __m512i q[4] = {_mm512_and_si512(b0, low), _mm512_and_si512(b1, low), _mm512_srli_epi32(b0, 4),
                                  _mm512_srli_epi32(b1, 4)};
            __m512 w[4];
            for (int j = 0; j < 4; ++j) w[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[j]), s[j], z[j]);
            bf16* dst = wp + kk * n_pad + nb * 64;
            _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
            _mm512_storeu_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]));
          }
        }
      }
    });
    auto y = at::mm(x, wt);  // [m, N_pad]
    return out_features == n_pad ? y : y.narrow(1, 0, out_features).contiguous();
  }
  const bf16* xp = x.data_ptr<bf16>();
  std::vector<float> xsum(m * groups, 0.f);  // [m, groups]
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < k; ++j) xsum[i * groups + j / group] += to_f(xp[i * k + j]);
  });
  static const Int4Unpack unpack = int4_unpack();  // constants, built once
  auto out = at::empty({m, out_features}, x.options());
  bf16* op = out.data_ptr<bf16>();
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  at::parallel_for(0, n_pad / 64, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(m * 64);
    std::vector<__m512i> wbuf(m > kRowTile ? pairs * 4 : 0);
    for (int64_t nb = begin; nb < end; ++nb) {
      std::fill(y.begin(), y.end(), 0.f);
      const uint8_t* block = pp + nb * 64 * (k / 2);  // [K][32] bytes
      for (int64_t g = 0; g < groups; ++g) {
        const int32_t* lanes = reinterpret_cast<const int32_t*>(szp + (g * n_pad + nb * 64) * 2);  // (s, z) per row
        // bytes kPrefetchBytes ahead in this thread's stream of blocks (one sequential run of memory), and the
        // scales kPrefetchGroups groups ahead (strided: one row of scale_zero per group), are on their way from
        // memory while this group computes: the hardware prefetcher alone leaves two cores at ~10 GB/s
        if (kPrefetch) {
          const uint8_t* ahead = block + g * group * 32 + kPrefetchBytes;
          const uint8_t* stop = pp + end * 64 * (k / 2);
          for (int64_t off = 0; off < group * 32 && ahead + off < stop; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
          const int64_t ga = g + kPrefetchGroups, nba = nb + ga / groups;
          if (nba < end) {
            const char* sz_ahead = reinterpret_cast<const char*>(szp + ((ga % groups) * n_pad + nba * 64) * 2);
            for (int off = 0; off < 256; off += 64) _mm_prefetch(sz_ahead + off, _MM_HINT_T0);
          }
        }
        __m512 s[4], z[4];
        for (int j = 0; j < 4; ++j) {
          const __m512i pair = _mm512_loadu_si512(lanes + j * 16);
          s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
          z[j] = _mm512_fnmadd_ps(_mm512_set1_ps(kCodeBias), s[j], _mm512_castsi512_ps(_mm512_and_si512(pair, high_half)));
        }
        const __m512i* wb = nullptr;
        if (m > kRowTile) {
          for (int64_t p = 0; p < pairs; ++p) unpack_pair(block + (g * group + 2 * p) * 32, unpack, wbuf.data() + 4 * p);
          wb = wbuf.data();
        }
        for (int64_t i = 0; i < m; i += kRowTile)
          int4_group_dispatch<kRowTile>(std::min(kRowTile, m - i), xp + i * k, k, g * group, pairs, wb, block, unpack, s,
                                        z, xsum.data() + i * groups + g, groups, y.data() + i * 64);
      }
      const int64_t rows = std::min<int64_t>(64, out_features - nb * 64);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < rows; ++r) op[i * out_features + nb * 64 + r] = bf16(y[i * 64 + r]);
    }
  });
  return out;
}
#elif OFFRAMP_AVX2
// AVX2 machines (no AVX-512): torch's CPU int4 layout there is blocks of 32 output rows; per block and
// input column k, 16 bytes: byte d holds row d (low nibble) and row d + 16 (high). float32 FMAs: each
// group's codes unpack once to float32 ([group][32], in L1) for every row of the step, then per row
// acc = sum_k x[r, k] q[k] and y += s acc + (z - 8 s) sum_k x[r, k] (w = (q - 8) s + z). Each row's sums
// run in one order whatever the number of rows beside it (batch-invariant, as above).

constexpr int64_t kInt4Block = 32, kAvx2RowTile = 3;

inline void unpack_column16(const uint8_t* b, float* dst) {  // 16 bytes -> rows 0..31 as float32 codes
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m256i low = _mm256_set1_epi32(15);
  const __m256i b0 = _mm256_cvtepu8_epi32(bytes), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  _mm256_store_ps(dst, _mm256_cvtepi32_ps(_mm256_and_si256(b0, low)));
  _mm256_store_ps(dst + 8, _mm256_cvtepi32_ps(_mm256_and_si256(b1, low)));
  _mm256_store_ps(dst + 16, _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)));
  _mm256_store_ps(dst + 24, _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)));
}

template <int R>
void int4_group_rows_avx2(const float* x, int64_t k, int64_t k0, int64_t group, const float* wf, const __m256 s[4],
                          const __m256 z[4], const float* xs, int64_t xs_stride, float* y) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < group; ++c) {
    const float* w = wf + c * 32;
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * k + k0 + c);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(xb, _mm256_load_ps(w + 8 * j), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 xsum = _mm256_set1_ps(xs[r * xs_stride]);
    for (int j = 0; j < 4; ++j) {
      __m256 out = _mm256_fmadd_ps(s[j], acc[r][j], _mm256_loadu_ps(y + r * 32 + j * 8));
      _mm256_storeu_ps(y + r * 32 + j * 8, _mm256_fmadd_ps(z[j], xsum, out));
    }
  }
}

// One row of one group straight from the packed codes (no buffer): the values and the FMA order of
// int4_group_rows_avx2, so a decode row alone gets the bits it gets in a batch.
inline void int4_group_row_direct(const float* x, int64_t k0, int64_t group, const uint8_t* block, const __m256 s[4],
                                  const __m256 z[4], float xs, float* y) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(15);
  const uint8_t* b = block + k0 * 16;
  for (int64_t c = 0; c < group; ++c, b += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    const __m256i b0 = _mm256_cvtepu8_epi32(bytes), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
    const __m256 xb = _mm256_broadcast_ss(x + k0 + c);
    acc0 = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_and_si256(b0, low)), acc0);
    acc1 = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_and_si256(b1, low)), acc1);
    acc2 = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), acc2);
    acc3 = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), acc3);
  }
  const __m256 xsum = _mm256_set1_ps(xs), acc[4] = {acc0, acc1, acc2, acc3};
  for (int j = 0; j < 4; ++j) {
    __m256 out = _mm256_fmadd_ps(s[j], acc[j], _mm256_loadu_ps(y + j * 8));
    _mm256_storeu_ps(y + j * 8, _mm256_fmadd_ps(z[j], xsum, out));
  }
}

template <int R>
void int4_group_dispatch_avx2(int64_t rows, const float* x, int64_t k, int64_t k0, int64_t group, const float* wf,
                              const __m256 s[4], const __m256 z[4], const float* xs, int64_t xs_stride, float* y) {
  if constexpr (R > 1) {
    if (rows < R) return int4_group_dispatch_avx2<R - 1>(rows, x, k, k0, group, wf, s, z, xs, xs_stride, y);
  }
  int4_group_rows_avx2<R>(x, k, k0, group, wf, s, z, xs, xs_stride, y);
}

// int4 products with int16 activations (quantize_row_q16), as integers: vpmaddubsw multiplies 32 byte
// pairs per instruction, codes (unsigned) by activations (signed), summing each row's pair of columns
// (q[r, c] a[c] + q[r, c + 1] a[c + 1]) to int16. An activation is two such bytes, xq = 128 hi + lo, so two
// products per pair of columns, each exact in int16 for 8 pairs (8 * 2 * 15 * 128 < 2^15) and then added
// to int32 as 128 sum_hi + sum_lo. Per block acc += d * sum_c q xq, per group y += s acc + (z - 8 s) sum_c x
// (that sum exact, from float32). For a lone row (a decode step of one sequence) this is 1.4x faster
// than float32 FMAs, which must unpack every code to float32 for that one row; several rows share each
// unpacked code there, and the float32 path is the faster one, so int4_mm takes this path for one row only
// (an engine that needs a row's bits to be the same in any batch keeps float32: LLMEngine).

// One column pair (c, c + 1) of a block's 32 rows as two registers of byte pairs (q[r, c], q[r, c + 1]):
// rows 0-15 (low nibbles) and rows 16-31 (high), in row order, as vpmaddubsw reads them.
// The bytes are interleaved first (byte d of column c beside byte d of column c + 1: one permute, one shuffle),
// then split into nibbles: 6 instructions for the pair.
inline void pair_codes(const uint8_t* b, __m256i& rows_lo, __m256i& rows_hi) {
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i interleave = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,  //
                                              0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));  // column c, then column c + 1
  // lane 0: bytes 0-7 of both columns, lane 1: bytes 8-15; then (c, c + 1) byte pairs in byte order
  const __m256i pairs = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(v, 0xD8), interleave);
  rows_lo = _mm256_and_si256(pairs, low);
  rows_hi = _mm256_and_si256(_mm256_srli_epi16(pairs, 4), low);
}

// A row's activations as the two byte planes of int4_q16_group_row: hi[c] = xq[c] >> 7, lo[c] = xq[c] & 127.
void split_q16(const int16_t* xq, int64_t k, int8_t* hi, int8_t* lo) {
  for (int64_t c = 0; c < k; ++c) {
    hi[c] = static_cast<int8_t>(xq[c] >> 7);
    lo[c] = static_cast<int8_t>(xq[c] & 127);
  }
}

// One row of one group: codes from `w` (group * 16 bytes), activation bytes hi/lo (group values) with block
// scales xd, exact sum xs.
inline void int4_q16_group_row(const uint8_t* w, const int8_t* hi, const int8_t* lo, const float* xd, int64_t group,
                               const __m256 s[4], const __m256 z[4], float xs, float* y) {
  __m256 accf[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < group; b += 32) {
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t half = b; half < b + 32; half += 16) {  // 8 pairs: int16 sums stay exact
      __m256i h_lo = _mm256_setzero_si256(), h_hi = _mm256_setzero_si256();
      __m256i l_lo = _mm256_setzero_si256(), l_hi = _mm256_setzero_si256();
      for (int64_t c = half; c < half + 16; c += 2) {
        __m256i rows_lo, rows_hi;
        pair_codes(w + c * 16, rows_lo, rows_hi);
        int16_t ph, pl;
        std::memcpy(&ph, hi + c, 2);
        std::memcpy(&pl, lo + c, 2);
        const __m256i xh = _mm256_set1_epi16(ph), xl = _mm256_set1_epi16(pl);
        h_lo = _mm256_add_epi16(h_lo, _mm256_maddubs_epi16(rows_lo, xh));
        h_hi = _mm256_add_epi16(h_hi, _mm256_maddubs_epi16(rows_hi, xh));
        l_lo = _mm256_add_epi16(l_lo, _mm256_maddubs_epi16(rows_lo, xl));
        l_hi = _mm256_add_epi16(l_hi, _mm256_maddubs_epi16(rows_hi, xl));
      }
      // rows 0-7, 8-15 (from the low-nibble registers), 16-23, 24-31: 128 hi + lo, in int32
      const __m128i parts_h[4] = {_mm256_castsi256_si128(h_lo), _mm256_extracti128_si256(h_lo, 1),
                                  _mm256_castsi256_si128(h_hi), _mm256_extracti128_si256(h_hi, 1)};
      const __m128i parts_l[4] = {_mm256_castsi256_si128(l_lo), _mm256_extracti128_si256(l_lo, 1),
                                  _mm256_castsi256_si128(l_hi), _mm256_extracti128_si256(l_hi, 1)};
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(parts_h[j]), 7),
                                                           _mm256_cvtepi16_epi32(parts_l[j])));
    }
    const __m256 d = _mm256_set1_ps(xd[b / 32]);
    for (int j = 0; j < 4; ++j) accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j]), d, accf[j]);
  }
  const __m256 xsum = _mm256_set1_ps(xs);
  for (int j = 0; j < 4; ++j) {
    const __m256 out = _mm256_fmadd_ps(s[j], accf[j], _mm256_loadu_ps(y + j * 8));
    _mm256_storeu_ps(y + j * 8, _mm256_fmadd_ps(z[j], xsum, out));
  }
}

// Group g of block nb + 1 into the cache while block nb's runs: its scales (a strided stream: one 128-byte
// piece per group, n_pad * 4 bytes apart) and its codes. A decode step reads the weights from memory (the
// model does not fit in the caches); for a lone row this made the 30 layers' products 1.3x faster.
inline void prefetch_next_group(const uint8_t* pp, const bf16* szp, int64_t n_pad, int64_t k, int64_t group,
                                int64_t nb, int64_t g) {
  const char* sz_next = reinterpret_cast<const char*>(szp + (g * n_pad + (nb + 1) * kInt4Block) * 2);
  _mm_prefetch(sz_next, _MM_HINT_T0);
  _mm_prefetch(sz_next + 64, _MM_HINT_T0);
  const char* codes_next = reinterpret_cast<const char*>(pp + (nb + 1) * kInt4Block * (k / 2) + g * group * 16);
  for (int64_t off = 0; off < group * 16; off += 64) _mm_prefetch(codes_next + off, _MM_HINT_T0);
}

// y = x @ w.T as above (torch's AVX2 layout, N_pad a multiple of 32); from dense_from_rows rows (a prompt
// chunk outside the fused step) the weights de-quantize to float32 once and one float32 product runs.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group,
                   int64_t out_features, int64_t dense_from_rows, bool int16_act) {
  check_bf16(x, "x");
  check_bf16(scale_zero, "scale_zero");
  const int64_t m = x.size(0), k = x.size(1), n_pad = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == k,
              "packed: uint8 [N_pad, K / 2]");
  TORCH_CHECK(n_pad % kInt4Block == 0 && group % 8 == 0 && k % group == 0 && m >= 1 && out_features <= n_pad,
              "int4_mm: unsupported shape");
  TORCH_CHECK(scale_zero.size(0) == k / group && scale_zero.size(1) == n_pad, "scale_zero: [K / group, N_pad, 2]");
  const int64_t groups = k / group, blocks = n_pad / kInt4Block;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16* szp = scale_zero.data_ptr<bf16>();
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  auto scales = [&](int64_t g, int64_t nb, __m256 s[4], __m256 z[4]) {  // (s, z - 8 s) of the block's 32 rows
    const int32_t* lanes = reinterpret_cast<const int32_t*>(szp + (g * n_pad + nb * kInt4Block) * 2);
    for (int j = 0; j < 4; ++j) {
      const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + j * 8));
      s[j] = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
      z[j] = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s[j], _mm256_castsi256_ps(_mm256_and_si256(pair, high_half)));
    }
  };
  if (dense_from_rows > 0 && m >= dense_from_rows) {
    auto wt = at::empty({k, n_pad}, x.options().dtype(at::kFloat));  // w.T, float32
    float* wp = wt.data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(32) float q[32];
      for (int64_t nb = begin; nb < end; ++nb) {
        const uint8_t* block = pp + nb * kInt4Block * (k / 2);
        for (int64_t g = 0; g < groups; ++g) {
          __m256 s[4], z[4];
          scales(g, nb, s, z);
          for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
            unpack_column16(block + kk * 16, q);
            float* dst = wp + kk * n_pad + nb * kInt4Block;
            for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + 8 * j, _mm256_fmadd_ps(_mm256_load_ps(q + 8 * j), s[j], z[j]));
          }
        }
      }
    });
    auto y = at::mm(x.to(at::kFloat), wt).to(x.scalar_type());  // [m, N_pad]
    return out_features == n_pad ? y : y.narrow(1, 0, out_features).contiguous();
  }
  const bf16* xp = x.data_ptr<bf16>();
  std::vector<float> xf(m * k), xsum(m * groups, 0.f);  // [m, K], [m, groups]
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      xf[i * k + j] = to_f(xp[i * k + j]);
      xsum[i * groups + j / group] += xf[i * k + j];
    }
  auto out = at::empty({m, out_features}, x.options());
  bf16* op = out.data_ptr<bf16>();
  if (int16_act && group % 32 == 0 && m == 1) {  // a lone row: integer products (int4_q16_group_row)
    std::vector<int16_t> xq(k);
    std::vector<int8_t> xhi(k), xlo(k);
    std::vector<float> xd(k / 32);
    quantize_row_q16(xf.data(), k, xq.data(), xd.data());
    split_q16(xq.data(), k, xhi.data(), xlo.data());
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(32) float y[kInt4Block];
      for (int64_t nb = begin; nb < end; ++nb) {
        std::fill(y, y + kInt4Block, 0.f);
        const uint8_t* block = pp + nb * kInt4Block * (k / 2);  // [K][16] bytes
        for (int64_t g = 0; g < groups; ++g) {
          if (nb + 1 < end) prefetch_next_group(pp, szp, n_pad, k, group, nb, g);
          __m256 s[4], z[4];
          scales(g, nb, s, z);
          int4_q16_group_row(block + g * group * 16, xhi.data() + g * group, xlo.data() + g * group,
                             xd.data() + g * group / 32, group, s, z, xsum[g], y);
        }
        const int64_t rows = std::min<int64_t>(kInt4Block, out_features - nb * kInt4Block);
        for (int64_t r = 0; r < rows; ++r) op[nb * kInt4Block + r] = bf16(y[r]);
      }
    });
    return out;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(m * kInt4Block);
    float* wf = static_cast<float*>(std::aligned_alloc(32, group * kInt4Block * sizeof(float)));
    for (int64_t nb = begin; nb < end; ++nb) {
      std::fill(y.begin(), y.end(), 0.f);
      const uint8_t* block = pp + nb * kInt4Block * (k / 2);  // [K][16] bytes
      for (int64_t g = 0; g < groups; ++g) {
        if (nb + 1 < end) prefetch_next_group(pp, szp, n_pad, k, group, nb, g);
        __m256 s[4], z[4];
        scales(g, nb, s, z);
        if (m == 1) {  // a lone decode row: codes straight from memory
          int4_group_row_direct(xf.data(), g * group, group, block, s, z, xsum[g], y.data());
          continue;
        }
        for (int64_t c = 0; c < group; ++c) unpack_column16(block + (g * group + c) * 16, wf + c * kInt4Block);
        for (int64_t i = 0; i < m; i += kAvx2RowTile)
          int4_group_dispatch_avx2<kAvx2RowTile>(std::min(kAvx2RowTile, m - i), xf.data() + i * k, k, g * group, group,
                                                 wf, s, z, xsum.data() + i * groups + g, groups, y.data() + i * kInt4Block);
      }
      const int64_t rows = std::min<int64_t>(kInt4Block, out_features - nb * kInt4Block);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < rows; ++r) op[i * out_features + nb * kInt4Block + r] = bf16(y[i * kInt4Block + r]);
    }
    std::free(wf);
  });
  return out;
}
#else
at::Tensor int4_mm(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "int4_mm needs AVX-512 with bfloat16 dot products, or AVX2 with FMA");
}
#endif

// Whether int4_mm and int8_mm take int16 activations here (the AVX2 kernels, without AVX512-BF16).
bool int16_activations_available() { return !OFFRAMP_DP && OFFRAMP_AVX2; }

// Output rows per block of the int4 layout int4_mm reads (torch's CPU packing on this machine).
int64_t int4_block_rows() { return OFFRAMP_DP ? 64 : 32; }

bool int4_layout_matches() {
  static const bool ok = packs_in_blocks_of(int4_block_rows());
  return ok;
}

// Whether int4_mm runs on this machine (AVX512-BF16 or AVX2 + FMA, and torch's packing is the one it reads).
bool int4_mm_available() { return (OFFRAMP_DP || OFFRAMP_AVX2) && int4_layout_matches(); }

// Whether int8_mm has its vector kernel here (else a scalar loop: the upcast product is the better choice).
bool int8_mm_fast() {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  return true;
#else
  return false;
#endif
}

namespace {

// One linear as decoder.linear computes it: kind 0 a bfloat16 weight a [N, K] (bias added by the same
// product); 1 int8 with a float16 scale per `group` columns (a codes, b scales); 2 int4 in torch's CPU
// layout (a packed, b scales and zeros), out_features the rows to keep. kInt16Act added to 1 or 2: the
// product takes int16 activations (the AVX2 kernels).
constexpr int64_t kInt16Act = 8;

at::Tensor linear_w(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                    int64_t spec_kind, int64_t group, int64_t out_features) {
  const bool int16_act = spec_kind & kInt16Act;
  const int64_t kind = spec_kind & ~kInt16Act;
  if (kind == 0) return bias.numel() ? at::linear(x, a, bias) : at::linear(x, a);
  at::Tensor y;
  if (kind == 1) {
    y = int8_mm_fast() ? int8_mm(x, a, b, 0, int16_act)
                       : at::linear(x, (a.to(at::kFloat) * b.to(at::kFloat).repeat_interleave(group, 1)).to(x.scalar_type()));
  } else {
    if (a.size(0) % int4_block_rows() == 0 && int4_mm_available()) {
      y = int4_mm(x, a, b, group, out_features, 0, int16_act);  // decode steps: the same sums at every batch size
    } else {
      y = at::_weight_int4pack_mm_for_cpu(x, a, group, b);
      if (y.size(1) != out_features) y = y.narrow(1, 0, out_features).contiguous();
    }
  }
  return bias.numel() ? y + bias : y;
}

}  // namespace

// Layers of one block for rows that rope_attend can take, each as decoder.decoder_layer computes it:
// one call instead of ~12 from Python per layer. Per layer, `layers` holds 11 tensors (input_norm,
// post_norm, qkv a, qkv b, qkv bias (empty: none), o a, o b, gate_up a, gate_up b, down a, down b) and
// `specs` 12 ints ((kind, group, out_features) of qkv, o, gate_up, down; see linear_w).
at::Tensor decode_block(const at::Tensor& hidden, const std::vector<at::Tensor>& layers, const std::vector<int64_t>& specs,
                        const std::vector<at::Tensor>& k_stores, const std::vector<at::Tensor>& v_stores,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots, const at::Tensor& pages,
                        const at::Tensor& lens, int64_t nh, int64_t nkv, int64_t hd, int64_t page_size, double eps) {
  const size_t num = k_stores.size();
  TORCH_CHECK(layers.size() == 11 * num && specs.size() == 12 * num && v_stores.size() == num && num > 0,
              "decode_block: 11 tensors and 12 ints per layer");
  const at::Tensor no_bias = at::empty({0}, hidden.options());
  at::Tensor x = hidden.contiguous();
  at::Tensor h = rms_norm(x, layers[0], eps);
  for (size_t i = 0; i < num; ++i) {
    const at::Tensor* t = layers.data() + 11 * i;
    const int64_t* sp = specs.data() + 12 * i;
    at::Tensor qkv = linear_w(h, t[2], t[3], t[4], sp[0], sp[1], sp[2]);
    at::Tensor attn = rope_attend(qkv, cos, sin, k_stores[i], v_stores[i], slots, pages, lens, nh, nkv, hd, page_size);
    auto xh = add_rms_norm(x, linear_w(attn, t[5], t[6], no_bias, sp[3], sp[4], sp[5]), t[1], eps);
    at::Tensor act = silu_mul(linear_w(xh[1], t[7], t[8], no_bias, sp[6], sp[7], sp[8]));
    at::Tensor down = linear_w(act, t[9], t[10], no_bias, sp[9], sp[10], sp[11]);
    if (i + 1 < num) {
      auto next = add_rms_norm(xh[0], down, layers[11 * (i + 1)], eps);
      x = next[0];
      h = next[1];
    } else {
      x = xh[0] + down;
    }
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weight-only product (torch's CPU layout), bfloat16 dot products");
  m.def("int4_layout_matches", &int4_layout_matches, "whether torch's CPU int4 packing is the layout int4_mm reads");
  m.def("int4_mm_available", &int4_mm_available, "whether int4_mm runs on this machine");
  m.def("int4_block_rows", &int4_block_rows, "output rows per block of the int4 layout int4_mm reads");
  m.def("int16_activations_available", &int16_activations_available, "whether the products take int16 activations here");
  m.def("int8_mm", &int8_mm, "group-wise int8 weight-only product (float16 scales per 32+ columns)");
  m.def("int8_mm_fast", &int8_mm_fast, "whether int8_mm has its vector kernel here");
  m.def("rope_attend", &rope_attend, "RoPE, K/V write and paged attention of decode rows (decode_block's)");
  m.def("add_rms_norm", &add_rms_norm, "residual add and RMSNorm (decode_block's)");
  m.def("decode_block", &decode_block, "the layers of one block for rows rope_attend takes");
}
