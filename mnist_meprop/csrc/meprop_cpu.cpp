// CPU kernels for meProp: the per-example top-k backward of a linear layer, and row-sparse
// optimizer updates (exact and lazy Adam, AdaGrad). Built on first use by mnist_meprop.kernels
// (torch.utils.cpp_extension); the package falls back to equivalent PyTorch code when no compiler is available.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__SSE__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <chrono>
#include <cstring>
#include <functional>
#include <type_traits>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

// Exact Adam's idle steps use a 3-term series in eps / (b sqrt(v)) where that ratio stays below this.
constexpr double kSeriesRatio = 1e-2;
// Below this, beta^step no longer changes a bias correction 1 - beta^step in double precision.
constexpr double kSettled = 1e-17;

// sum_{q=1..n} ratio^q
inline double geometric_sum(double ratio, int64_t n) {
  if (std::abs(1.0 - ratio) < 1e-12) return static_cast<double>(n) * ratio;
  return ratio * (1.0 - std::pow(ratio, static_cast<double>(n))) / (1.0 - ratio);
}

// Below this many multiply-adds a loop runs on one thread: waking the pool costs more.
constexpr int64_t kParallelWork = 1 << 18;

// Grain for at::parallel_for over `range` items of `work_per_item` each: all in one chunk when small.
inline int64_t grain(int64_t range, int64_t work_per_item) {
  return range * work_per_item < kParallelWork ? std::max<int64_t>(range, 1)
                                               : std::max<int64_t>(kParallelWork / std::max<int64_t>(work_per_item, 1), 1);
}

// Writes the entries of bits [size] that are >= floor, and their positions (index[c], or c
// when index is null), to out_bits / out_index in order; returns how many. Branch-free, and with
// AVX-512 on 32-bit keys a compress of 16 at a time (the outputs need 16 entries of slack).
template <typename bits_t>
int64_t compact_at_least(const bits_t* bits, const int32_t* index, int64_t size, bits_t floor, bits_t* out_bits,
                         int32_t* out_index) {
  int64_t kept = 0, c = 0;
#if defined(__AVX512F__)
  if constexpr (sizeof(bits_t) == 4) {
    const __m512i floor_vec = _mm512_set1_epi32(static_cast<int32_t>(floor));
    __m512i position = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (; c + 16 <= size; c += 16) {
      const __m512i v = _mm512_loadu_si512(bits + c);
      const __m512i at = index != nullptr ? _mm512_loadu_si512(index + c) : position;
      const __mmask16 keep = _mm512_cmpge_epu32_mask(v, floor_vec);
      _mm512_storeu_si512(out_bits + kept, _mm512_maskz_compress_epi32(keep, v));
      _mm512_storeu_si512(out_index + kept, _mm512_maskz_compress_epi32(keep, at));
      kept += __builtin_popcount(keep);
      position = _mm512_add_epi32(position, sixteen);
    }
  }
#endif
  for (; c < size; ++c) {
    out_bits[kept] = bits[c];
    out_index[kept] = index != nullptr ? index[c] : static_cast<int32_t>(c);
    kept += bits[c] >= floor;
  }
  return kept;
}

// Top-k of |dy| for each row of dy [n, out]; indices (sorted) written to idx [n, k]; among equal
// magnitudes at the threshold, the first ones. A radix select on the bits of |dy| (for
// non-negative floats the bit patterns order as the values):
//  - the nonzero entries are compacted first (ReLU zeros are common, and a histogram bin hit
//    in a row stalls on its own store); rows with at most k of them take them and the first zeros;
//  - a histogram of the top 11 bits of the nonzero entries (four interleaved copies, scanned and
//    cleared over the occupied range only) finds the bin holding the k-th largest;
//  - the candidates (that bin and above) are compacted in index order, a histogram of the next 8
//    bits over the bin's members narrows the threshold to a handful of entries, and a selection
//    among those finds it.
// Measured here (one thread, n = 200, out = 500, k = 20, Gaussian dy with half zeros, loaded
// machine): see the commit message.
template <typename scalar_t>
void topk_rows(const scalar_t* dy, int64_t n, int64_t out, int64_t k, int64_t* idx) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  constexpr int kShift = 8 * sizeof(scalar_t) - 12;  // the sign bit of |x| is 0: 11 bits remain
  constexpr int kSubShift = kShift - 8;
  constexpr int64_t kBins = 2048;
  at::parallel_for(0, n, grain(n, out * 4), [&](int64_t begin, int64_t end) {
    std::vector<bits_t> bits(out), nonzero_bits(out + 16), candidate_bits(out + 16), finalists;
    std::vector<int32_t> nonzero_index(out + 16), candidate_index(out + 16);
    std::vector<int32_t> histogram(4 * kBins, 0);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* g = dy + row * out;
      int64_t* dst = idx + row * k;
      for (int64_t j = 0; j < out; ++j) {
        const scalar_t magnitude = std::abs(g[j]);
        std::memcpy(&bits[j], &magnitude, sizeof(bits_t));
      }
      const int64_t nonzero =
          compact_at_least<bits_t>(bits.data(), nullptr, out, 1, nonzero_bits.data(), nonzero_index.data());
      if (nonzero <= k) {  // every nonzero entry, then the first zeros
        int64_t zeros = k - nonzero, count = 0;
        for (int64_t j = 0; j < out && count < k; ++j)
          if (bits[j] != 0 || zeros-- > 0) dst[count++] = j;
        continue;
      }
      const bits_t* nz = nonzero_bits.data();
      bits_t top = 0, bottom = ~bits_t(0);
      for (int64_t c = 0; c < nonzero; ++c) {
        top = std::max(top, nz[c]);
        bottom = std::min(bottom, nz[c]);
      }
      const int64_t high = static_cast<int64_t>(top >> kShift), low = static_cast<int64_t>(bottom >> kShift);
      int32_t* h = histogram.data();
      int64_t c = 0;
      for (; c + 4 <= nonzero; c += 4) {
        ++h[nz[c] >> kShift];
        ++h[kBins + (nz[c + 1] >> kShift)];
        ++h[2 * kBins + (nz[c + 2] >> kShift)];
        ++h[3 * kBins + (nz[c + 3] >> kShift)];
      }
      for (; c < nonzero; ++c) ++h[nz[c] >> kShift];
      const auto bin_count = [&](int64_t b) { return h[b] + h[kBins + b] + h[2 * kBins + b] + h[3 * kBins + b]; };
      int64_t still = k, bucket = high;
      for (; bucket > low && bin_count(bucket) < still; --bucket) still -= bin_count(bucket);
      for (int64_t copy = 0; copy < 4; ++copy) std::fill(h + copy * kBins + low, h + copy * kBins + high + 1, 0);

      bits_t* cand_bits = candidate_bits.data();
      int32_t* cand_index = candidate_index.data();
      const int64_t n_candidates = compact_at_least<bits_t>(nz, nonzero_index.data(), nonzero,
                                                            static_cast<bits_t>(bucket) << kShift, cand_bits, cand_index);
      // The still-th largest member of the bin: the next 8 bits pick a sub-bin, then a selection.
      int32_t sub_histogram[256] = {0};
      for (int64_t q = 0; q < n_candidates; ++q)
        if ((cand_bits[q] >> kShift) == static_cast<bits_t>(bucket)) ++sub_histogram[(cand_bits[q] >> kSubShift) & 255];
      int64_t sub = 255;
      for (; sub > 0 && sub_histogram[sub] < still; --sub) still -= sub_histogram[sub];
      const bits_t prefix = (static_cast<bits_t>(bucket) << 8) | static_cast<bits_t>(sub);
      finalists.clear();
      for (int64_t q = 0; q < n_candidates; ++q)
        if ((cand_bits[q] >> kSubShift) == prefix) finalists.push_back(cand_bits[q]);
      bits_t threshold = finalists[0];
      if (std::any_of(finalists.begin(), finalists.end(), [&](bits_t b) { return b != threshold; })) {
        std::nth_element(finalists.begin(), finalists.begin() + (still - 1), finalists.end(), std::greater<bits_t>());
        threshold = finalists[still - 1];
      }
      int64_t above = 0;
      for (int64_t q = 0; q < n_candidates; ++q) above += cand_bits[q] > threshold;
      int64_t ties = k - above, count = 0;
      for (int64_t q = 0; q < n_candidates && count < k; ++q) {
        const bits_t b = cand_bits[q];
        if (b > threshold || (b == threshold && ties-- > 0)) dst[count++] = cand_index[q];
      }
    }
  });
}

// dst[begin:end] = sum over q < terms of coef[q] * source[q][begin:end]: a gradient row from the
// examples that kept it (dW), or an example's dx from the weight rows it kept. With AVX-512 on
// float32, a block of 128 columns stays in eight registers while every term is added, so each
// multiply-add costs one load (instead of two loads and a store through dst).
template <typename scalar_t>
void weighted_row_sum(scalar_t* __restrict__ dst, int64_t begin, int64_t end, int64_t terms, const scalar_t* coef,
                      const scalar_t* const* source) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t c = begin; c < end; c += 128) {  // eight independent chains hide the multiply-add latency
      __mmask16 lanes[8];
      for (int u = 0; u < 8; ++u) {
        const int64_t left = end - c - 16 * u;
        lanes[u] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      }
      __m512 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t q = 0; q < terms; ++q) {
        const __m512 w = _mm512_set1_ps(coef[q]);
        const float* src = source[q] + c;
        for (int u = 0; u < 8; ++u) acc[u] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes[u], src + 16 * u), acc[u]);
      }
      for (int u = 0; u < 8; ++u) _mm512_mask_storeu_ps(dst + c + 16 * u, lanes[u], acc[u]);
    }
    return;
  }
#endif
  for (int64_t c = begin; c < end; ++c) dst[c] = 0;
  for (int64_t q = 0; q < terms; ++q) {
    const scalar_t w = coef[q];
    const scalar_t* __restrict__ src = source[q];
    for (int64_t c = begin; c < end; ++c) dst[c] += w * src[c];
  }
}

#if defined(__AVX512F__)
// One register tile of gathered_gemm: R rows by V vectors of 16 columns from column c. Only the
// last, partial tile of a row masks its loads (`lanes`): with masked loads in every tile a
// 20 x 50 x 2048 product took 2.3x as long on this project's AMD EPYC (94.5 against 40.6 us).
template <int R, int V, bool kMasked>
inline void gemm_tile(float* __restrict__ dst, int64_t ldc, int64_t terms, const float* a, const float* const* b,
                      int64_t c, const __mmask16* lanes) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < terms; ++q) {
    const float* src = b[q] + c;
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(a[r * terms + q]);
      for (int v = 0; v < V; ++v) {
        const __m512 s = kMasked ? _mm512_maskz_loadu_ps(lanes[v], src + 16 * v) : _mm512_loadu_ps(src + 16 * v);
        acc[r][v] = _mm512_fmadd_ps(w, s, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      if (kMasked) _mm512_mask_storeu_ps(dst + r * ldc + c + 16 * v, lanes[v], acc[r][v]);
      else _mm512_storeu_ps(dst + r * ldc + c + 16 * v, acc[r][v]);
    }
}

// Rows [0, rows) of gathered_gemm's tiles at column c: four at a time, then the rest.
template <bool kMasked>
void gemm_tile_rows(float* dst, int64_t ldc, int64_t rows, int64_t terms, const float* a, const float* const* b,
                    int64_t c, const __mmask16* lanes) {
  constexpr int R = 4, V = 4;
  int64_t m = 0;
  for (; m + R <= rows; m += R) gemm_tile<R, V, kMasked>(dst + m * ldc, ldc, terms, a + m * terms, b, c, lanes);
  switch (rows - m) {
    case 3: gemm_tile<3, V, kMasked>(dst + m * ldc, ldc, terms, a + m * terms, b, c, lanes); break;
    case 2: gemm_tile<2, V, kMasked>(dst + m * ldc, ldc, terms, a + m * terms, b, c, lanes); break;
    case 1: gemm_tile<1, V, kMasked>(dst + m * ldc, ldc, terms, a + m * terms, b, c, lanes); break;
    default: break;
  }
}
#endif

// dst[m * ldc + c] = sum over q < terms of a[m * terms + q] * b[q][c], for rows m < rows and columns
// c in [begin, end): a small matrix product whose right-hand rows are gathered by pointer (the kept
// weight rows, or the examples' inputs). Each term is added in order, as weighted_row_sum does, but
// with AVX-512 on float32 a tile of 4 rows by 64 columns stays in registers, so each loaded source
// vector feeds four multiply-adds instead of one (the 20 kept dW rows of a 2000-wide layer at
// minibatch 50, one thread, selection included: 55 against 86 us row by row).
template <typename scalar_t>
void gathered_gemm(scalar_t* dst, int64_t ldc, int64_t rows, int64_t terms, const scalar_t* a,
                   const scalar_t* const* b, int64_t begin, int64_t end) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    constexpr int64_t kTile = 64;
    int64_t c = begin;
    __mmask16 lanes[4];
    for (; c + kTile <= end; c += kTile) gemm_tile_rows<false>(dst, ldc, rows, terms, a, b, c, lanes);
    if (c < end) {
      for (int v = 0; v < 4; ++v) {
        const int64_t left = end - c - 16 * v;
        lanes[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      }
      gemm_tile_rows<true>(dst, ldc, rows, terms, a, b, c, lanes);
    }
    return;
  }
#endif
  for (int64_t m = 0; m < rows; ++m) weighted_row_sum<scalar_t>(dst + m * ldc, begin, end, terms, a + m * terms, b);
}

// One product of gathered_gemm: dst [rows, width] = a [rows, terms] times the rows b[0..terms).
template <typename scalar_t>
struct GatheredProduct {
  scalar_t* dst;
  int64_t rows, terms;
  const scalar_t* a;
  const scalar_t* const* b;
};

// gathered_gemm of each product over all of [0, width), blocks of columns split between the threads:
// a layer's dx and dW (both as wide as the layer's input) in one parallel region.
template <typename scalar_t>
void parallel_gathered_gemms(const std::vector<GatheredProduct<scalar_t>>& products, int64_t width) {
  constexpr int64_t kColumns = 64;  // gathered_gemm's tile width
  const int64_t blocks = (width + kColumns - 1) / kColumns;
  int64_t work = 0;
  for (const auto& p : products) work += p.rows * p.terms;
  at::parallel_for(0, blocks, grain(blocks, kColumns * work), [&](int64_t b0, int64_t b1) {
    for (const auto& p : products)
      gathered_gemm<scalar_t>(p.dst, width, p.rows, p.terms, p.a, p.b, b0 * kColumns, std::min(width, b1 * kColumns));
  });
}

#if defined(__AVX512F__)
// dst[0:16 V] = sum over q < terms of coef[q] * source[q][0:16 V] for packed float32 blocks (V
// vectors per term, 16 V columns, all valid), the terms taken in CHAINS interleaved accumulators so
// that the multiply-add latency does not serialise the sum.
template <int V, int CHAINS>
void packed_block_sum(float* __restrict__ dst, int64_t terms, const float* coef, const float* const* source) {
  __m512 acc[CHAINS][V];
  for (int h = 0; h < CHAINS; ++h)
    for (int v = 0; v < V; ++v) acc[h][v] = _mm512_setzero_ps();
  int64_t q = 0;
  for (; q + CHAINS <= terms; q += CHAINS)
    for (int h = 0; h < CHAINS; ++h) {
      const __m512 w = _mm512_set1_ps(coef[q + h]);
      for (int v = 0; v < V; ++v) acc[h][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(source[q + h] + 16 * v), acc[h][v]);
    }
  for (; q < terms; ++q) {
    const __m512 w = _mm512_set1_ps(coef[q]);
    for (int v = 0; v < V; ++v) acc[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(source[q] + 16 * v), acc[0][v]);
  }
  for (int v = 0; v < V; ++v) {
    __m512 total = acc[0][v];
    for (int h = 1; h < CHAINS; ++h) total = _mm512_add_ps(total, acc[h][v]);
    _mm512_storeu_ps(dst + 16 * v, total);
  }
}
#endif

// Sources larger than this (bytes) and each read by at least kBlockedReuse terms are summed column
// block by column block (row_sums): they would not stay in a core's cache otherwise.
constexpr int64_t kBlockedBytes = int64_t(1) << 20;
constexpr int64_t kBlockedReuse = 4;

// For each output row o < n_out: dst[o * width + c] = sum over its terms q in [offsets[o],
// offsets[o + 1]) of coef[q] * src[src_row[q] * width + c], src being [n_src, width] row-major.
// Row by row (each row's whole width at once, rows split between threads), or, with `blocked`,
// column block by column block: the block's columns of every source row are first packed into a
// contiguous buffer (n_src x 32), then every output row sums from it, so the sources are read from
// memory once instead of once per term. Blocking pays when the sources do not fit in cache and each
// is read many times: the parser's minibatch of 10,000 inputs of 2,400 floats (96 MB, each read by
// its 20 kept rows); not at minibatch 200 of 784 (0.6 MB, already in cache). The blocked float32
// sum interleaves four accumulators, so its float rounding differs from the row-by-row order.
template <typename scalar_t>
void row_sums(scalar_t* dst, int64_t n_out, int64_t width, const int64_t* offsets, const scalar_t* coef,
              const int64_t* src_row, const scalar_t* src, int64_t n_src, bool blocked) {
  const int64_t terms = offsets[n_out] - offsets[0];
  if (!blocked) {
    at::parallel_for(0, n_out, grain(n_out, width * terms / std::max<int64_t>(n_out, 1)), [&](int64_t o0, int64_t o1) {
      std::vector<const scalar_t*> sources;
      for (int64_t o = o0; o < o1; ++o) {
        sources.clear();
        for (int64_t q = offsets[o]; q < offsets[o + 1]; ++q) sources.push_back(src + src_row[q] * width);
        weighted_row_sum<scalar_t>(dst + o * width, 0, width, offsets[o + 1] - offsets[o], coef + offsets[o],
                                   sources.data());
      }
    });
    return;
  }
  // Blocks of 32 columns: a block of the parser's 10,000 inputs is 1.3 MB, about a core's L2.
  constexpr int64_t kBlock = 32;
  const int64_t blocks = (width + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> packed(n_src * kBlock, scalar_t(0));  // a short last block's columns stay 0
    std::vector<const scalar_t*> sources(terms);  // every term's row in the packed block
    for (int64_t q = 0; q < terms; ++q) sources[q] = packed.data() + src_row[offsets[0] + q] * kBlock;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kBlock, columns = std::min(width, c0 + kBlock) - c0;
      for (int64_t r = 0; r < n_src; ++r)
        std::memcpy(packed.data() + r * kBlock, src + r * width + c0, columns * sizeof(scalar_t));
      for (int64_t o = 0; o < n_out; ++o) {
        const scalar_t* const* row_sources = sources.data() + (offsets[o] - offsets[0]);
        scalar_t out_block[kBlock];
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          packed_block_sum<kBlock / 16, 4>(out_block, offsets[o + 1] - offsets[o], coef + offsets[o], row_sources);
        } else
#endif
        weighted_row_sum<scalar_t>(out_block, 0, columns, offsets[o + 1] - offsets[o], coef + offsets[o],
                                   row_sources);
        std::memcpy(dst + o * width + c0, out_block, columns * sizeof(scalar_t));
      }
    }
  });
}

}  // namespace

// The inputs of a linear layer's backward: a contiguous 2-D dy [n, out], and where dW / dx are asked
// for a contiguous x [n, in] / weight [out, in]. Returns the layer's input width (0 when neither is).
int64_t check_backward_inputs(const torch::Tensor& dy, const c10::optional<torch::Tensor>& x_opt,
                              const c10::optional<torch::Tensor>& weight_opt, bool need_dx, bool need_dw) {
  TORCH_CHECK(dy.dim() == 2 && dy.is_contiguous(), "dy must be a contiguous 2-D tensor");
  TORCH_CHECK(!need_dw || (x_opt.has_value() && x_opt->is_contiguous()), "need_dw needs a contiguous x");
  TORCH_CHECK(!need_dx || (weight_opt.has_value() && weight_opt->is_contiguous()), "need_dx needs a contiguous weight");
  TORCH_CHECK(!need_dw || (x_opt->dim() == 2 && x_opt->size(0) == dy.size(0)), "x must be [n, in]");
  TORCH_CHECK(!need_dx || (weight_opt->dim() == 2 && weight_opt->size(0) == dy.size(1)), "weight must be [out, in]");
  TORCH_CHECK(!(need_dx && need_dw) || x_opt->size(1) == weight_opt->size(1), "x and weight must share in");
  return need_dw ? x_opt->size(1) : (need_dx ? weight_opt->size(1) : 0);
}

// Backward of y = x W^T + b keeping, per example, the given (or top-k) entries of dy.
// Returns {dx (or None), rows [r] sorted unique, weight values [r, in] (or None), bias values [r]}:
// the row-sparse gradient of W and b. Without idx [n, k], the top-k of |dy| of each row is used.
std::vector<torch::Tensor> per_example_backward(torch::Tensor dy, c10::optional<torch::Tensor> x_opt,
                                                c10::optional<torch::Tensor> weight_opt,
                                                c10::optional<torch::Tensor> idx_opt, int64_t k, bool need_dx,
                                                bool need_dw) {
  check_backward_inputs(dy, x_opt, weight_opt, need_dx, need_dw);
  const int64_t n = dy.size(0), out = dy.size(1);
  torch::Tensor idx = idx_opt.has_value() ? *idx_opt : torch::Tensor();
  torch::Tensor x = x_opt.has_value() ? *x_opt : torch::Tensor();
  torch::Tensor weight = weight_opt.has_value() ? *weight_opt : torch::Tensor();
  if (!idx.defined()) {
    idx = torch::empty({n, k}, dy.options().dtype(torch::kLong));
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "meprop_topk", [&] {
      topk_rows<scalar_t>(dy.data_ptr<scalar_t>(), n, out, k, idx.data_ptr<int64_t>());
    });
  }
  TORCH_CHECK(idx.is_contiguous() && idx.size(0) == n && idx.size(1) == k, "idx must be [n, k]");
  const int64_t* sel = idx.data_ptr<int64_t>();
  const int64_t pairs = n * k;

  // Group the selected (example, row) pairs by row: unique rows in increasing order, and for
  // each the examples that chose it (a counting sort), so each gradient row is written once.
  std::vector<int64_t> count(out, 0);
  for (int64_t i = 0; i < pairs; ++i) ++count[sel[i]];
  std::vector<int64_t> row_list, start_of(out, 0);
  std::vector<int64_t> offsets{0};
  for (int64_t r = 0; r < out; ++r) {
    if (count[r] == 0) continue;
    start_of[r] = offsets.back();
    row_list.push_back(r);
    offsets.push_back(offsets.back() + count[r]);
  }
  std::vector<int64_t> member(pairs);  // pair index i = example * k + j, grouped by row
  for (int64_t i = 0; i < pairs; ++i) member[start_of[sel[i]]++] = i;
  const int64_t n_rows = static_cast<int64_t>(row_list.size());
  auto rows = torch::from_blob(row_list.data(), {n_rows}, torch::kLong).clone();

  torch::Tensor dx, w_values;
  torch::Tensor b_values = torch::empty({n_rows}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "meprop_per_example_backward", [&] {
    const scalar_t* g = dy.data_ptr<scalar_t>();
    auto coef = [&](int64_t i) { return g[(i / k) * out + sel[i]]; };
    scalar_t* bv = b_values.data_ptr<scalar_t>();
    for (int64_t s = 0; s < n_rows; ++s) {
      scalar_t sum = 0;
      for (int64_t q = offsets[s]; q < offsets[s + 1]; ++q) sum += coef(member[q]);
      bv[s] = sum;
    }
    if (need_dw) {  // gradient row s: the inputs of the examples that kept it, weighted by their dy
      const int64_t in = x.size(1);
      w_values = torch::empty({n_rows, in}, dy.options());
      std::vector<scalar_t> coefs(pairs);
      std::vector<int64_t> examples(pairs);
      for (int64_t q = 0; q < pairs; ++q) {
        coefs[q] = coef(member[q]);
        examples[q] = member[q] / k;
      }
      const bool blocked = n * in * int64_t(sizeof(scalar_t)) > kBlockedBytes && k >= kBlockedReuse;
      row_sums<scalar_t>(w_values.data_ptr<scalar_t>(), n_rows, in, offsets.data(), coefs.data(), examples.data(),
                         x.data_ptr<scalar_t>(), n, blocked);
    }
    if (need_dx) {  // example e's dx: the weight rows it kept, weighted by its dy
      const int64_t in = weight.size(1);
      dx = torch::empty({n, in}, dy.options());
      std::vector<scalar_t> coefs(pairs);
      for (int64_t i = 0; i < pairs; ++i) coefs[i] = coef(i);
      std::vector<int64_t> example_offsets(n + 1);
      for (int64_t e = 0; e <= n; ++e) example_offsets[e] = e * k;
      const bool blocked = out * in * int64_t(sizeof(scalar_t)) > kBlockedBytes && pairs >= kBlockedReuse * out;
      row_sums<scalar_t>(dx.data_ptr<scalar_t>(), n, in, example_offsets.data(), coefs.data(), sel,
                         weight.data_ptr<scalar_t>(), out, blocked);
    }
  });
  return {dx, rows, w_values, b_values};
}

// Backward of y = x W^T + b keeping, for every example, the k columns of dy with the largest sum
// of |dy| over the minibatch (unified top-k; the first ones among equal sums). Same return as
// per_example_backward. Plain loops and register-blocked products (dW and dx in one parallel
// region: parallel_gathered_gemms) instead of the half dozen
// tensor ops (abs, sum, topk, sort, index_select, two matmuls) whose dispatch costs more than
// the arithmetic at the paper's sizes (minibatch 50, k = 30: 30 x 50 x 784 multiply-adds).
std::vector<torch::Tensor> unified_backward(torch::Tensor dy, c10::optional<torch::Tensor> x_opt,
                                            c10::optional<torch::Tensor> weight_opt, int64_t k, bool need_dx,
                                            bool need_dw) {
  const int64_t in = check_backward_inputs(dy, x_opt, weight_opt, need_dx, need_dw);
  const int64_t n = dy.size(0), out = dy.size(1);
  TORCH_CHECK(k >= 1 && k <= out, "k must be in 1..out");
  torch::Tensor rows = torch::empty({k}, dy.options().dtype(torch::kLong));
  torch::Tensor dx, w_values, b_values = torch::empty({k}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "meprop_unified_backward", [&] {
    const scalar_t* g = dy.data_ptr<scalar_t>();
    std::vector<scalar_t> score(out, 0);
    for (int64_t e = 0; e < n; ++e)
      for (int64_t j = 0; j < out; ++j) score[j] += std::abs(g[e * out + j]);
    int64_t* r = rows.data_ptr<int64_t>();
    topk_rows<scalar_t>(score.data(), 1, out, k, r);
    // the kept columns, gathered: column j of dy at kept[j * n + e]
    std::vector<scalar_t> kept(k * n);
    scalar_t* bv = b_values.data_ptr<scalar_t>();
    for (int64_t j = 0; j < k; ++j) {
      scalar_t sum = 0;
      for (int64_t e = 0; e < n; ++e) sum += kept[j * n + e] = g[e * out + r[j]];
      bv[j] = sum;
    }
    std::vector<GatheredProduct<scalar_t>> products;
    std::vector<const scalar_t*> x_rows(need_dw ? n : 0), w_rows(need_dx ? k : 0);
    std::vector<scalar_t> kept_t(need_dx ? n * k : 0);  // example e's kept entries at kept_t[e * k + j]
    if (need_dw) {  // dW rows: kept^T [k, n] times the inputs
      w_values = torch::empty({k, in}, dy.options());
      for (int64_t e = 0; e < n; ++e) x_rows[e] = x_opt->data_ptr<scalar_t>() + e * in;
      products.push_back({w_values.data_ptr<scalar_t>(), k, n, kept.data(), x_rows.data()});
    }
    if (need_dx) {  // dx: kept [n, k] times the kept weight rows
      dx = torch::empty({n, in}, dy.options());
      for (int64_t j = 0; j < k; ++j) w_rows[j] = weight_opt->data_ptr<scalar_t>() + r[j] * in;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t e = 0; e < n; ++e) kept_t[e * k + j] = kept[j * n + e];
      products.push_back({dx.data_ptr<scalar_t>(), n, k, kept_t.data(), w_rows.data()});
    }
    if (!products.empty()) parallel_gathered_gemms<scalar_t>(products, in);
  });
  return {dx, rows, w_values, b_values};
}

// Lazy Adam on the given rows of param (moments of other rows are left as they are, as SparseAdam).
void adam_rows(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor rows,
               torch::Tensor values, double lr, double beta1, double beta2, double eps, int64_t step) {
  const int64_t n_rows = rows.numel();
  const int64_t width = param.numel() / std::max<int64_t>(param.size(0), 1);
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const int64_t* r = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "meprop_adam_rows", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* g = values.data_ptr<scalar_t>();
    const scalar_t b1 = beta1, b2 = beta2, one_b1 = 1 - beta1, one_b2 = 1 - beta2;
    const scalar_t step_size = lr / bias1, inv_b2 = 1.0 / bias2_sqrt, e = eps;
    at::parallel_for(0, n_rows, grain(n_rows, width * 4), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t off = r[i] * width;
        scalar_t* __restrict__ pp = p + off;
        scalar_t* __restrict__ mm = m + off;
        scalar_t* __restrict__ vv = v + off;
        const scalar_t* __restrict__ gg = g + i * width;
        for (int64_t c = 0; c < width; ++c) {
          const scalar_t gc = gg[c];
          mm[c] = b1 * mm[c] + one_b1 * gc;
          vv[c] = b2 * vv[c] + one_b2 * gc * gc;
          pp[c] -= step_size * mm[c] / (std::sqrt(vv[c]) * inv_b2 + e);
        }
      }
    });
  });
}

// The element loops of exact Adam. Both are bound by square roots and divisions (two of each per
// element with idle steps pending, against one of each in a plain Adam step); with AVX-512 on
// float32 they use the hardware estimates (rsqrt14, rcp14: relative error 2^-14) refined by one
// Newton step (about 2^-27, the float rounding), so that their cost per element stays near a
// dense fused Adam step's. Elsewhere: the plain expressions.

// moved[c] = m[c] / sqrt(v[c]) * (s0 - u (s1 - u s2)) with u = 1 / sqrt(v[c]): the idle steps' series,
// and 0 where m = 0 (inputs that are always zero, such as MNIST's border pixels, keep m = v = 0).
// Returns how many elements with m != 0 have sqrt(v) <= limit (where the series does not hold).
template <typename scalar_t>
int64_t idle_series(const scalar_t* __restrict__ mm, const scalar_t* __restrict__ vv, scalar_t* __restrict__ moved,
                    int64_t width, scalar_t s0, scalar_t s1, scalar_t s2, scalar_t limit) {
  int64_t near_eps = 0, c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m512 vs0 = _mm512_set1_ps(s0), vs1 = _mm512_set1_ps(s1), vs2 = _mm512_set1_ps(s2);
    const __m512 limit_sq = _mm512_set1_ps(limit * limit), half = _mm512_set1_ps(0.5f),
                 three_halves = _mm512_set1_ps(1.5f);
    for (; c < width; c += 16) {
      const __mmask16 lanes = width - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - c)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, vv + c), m = _mm512_maskz_loadu_ps(lanes, mm + c);
      const __m512 y0 = _mm512_rsqrt14_ps(v);  // 1 / sqrt(v), refined: y0 (1.5 - 0.5 v y0^2)
      const __m512 inv = _mm512_mul_ps(y0, _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_mul_ps(half, v), y0), y0, three_halves));
      const __m512 series = _mm512_fnmadd_ps(inv, _mm512_fnmadd_ps(inv, vs2, vs1), vs0);
      const __mmask16 moving = _mm512_mask_cmp_ps_mask(lanes, m, _mm512_setzero_ps(), _CMP_NEQ_OQ);
      _mm512_mask_storeu_ps(moved + c, lanes, _mm512_maskz_mov_ps(moving, _mm512_mul_ps(_mm512_mul_ps(m, inv), series)));
      near_eps += __builtin_popcount(_mm512_mask_cmp_ps_mask(moving, v, limit_sq, _CMP_LE_OQ));
    }
    return near_eps;
  }
#endif
  for (; c < width; ++c) {
    const scalar_t root = std::sqrt(vv[c]);
    const scalar_t inv = scalar_t(1) / root;
    moved[c] = mm[c] == 0 ? scalar_t(0) : mm[c] * inv * (s0 - inv * (s1 - inv * s2));
    near_eps += root <= limit && mm[c] != 0;
  }
  return near_eps;
}

// One Adam step on a row: p = (p - moved) - step_size m / (sqrt(v) inv_b2 + eps), with the moments
// first decayed by decay1, decay2 (the idle steps; moved = nullptr: none) and then given g.
template <typename scalar_t>
void adam_row_step(scalar_t* __restrict__ pp, scalar_t* __restrict__ mm, scalar_t* __restrict__ vv,
                   const scalar_t* __restrict__ gg, const scalar_t* __restrict__ moved, int64_t width, scalar_t decay1,
                   scalar_t decay2, scalar_t beta1, scalar_t beta2, scalar_t step_size, scalar_t inv_b2, scalar_t eps) {
  const scalar_t b1 = beta1 * decay1, b2 = beta2 * decay2, one_b1 = 1 - beta1, one_b2 = 1 - beta2;
  int64_t c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m512 vb1 = _mm512_set1_ps(b1), vb2 = _mm512_set1_ps(b2), va1 = _mm512_set1_ps(one_b1),
                 va2 = _mm512_set1_ps(one_b2), vstep = _mm512_set1_ps(step_size), vinv_b2 = _mm512_set1_ps(inv_b2),
                 veps = _mm512_set1_ps(eps), one = _mm512_set1_ps(1.0f);
    for (; c < width; c += 16) {
      const __mmask16 lanes = width - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - c)) - 1);
      const __m512 g = _mm512_maskz_loadu_ps(lanes, gg + c);
      __m512 p = _mm512_maskz_loadu_ps(lanes, pp + c);
      if (moved != nullptr) p = _mm512_sub_ps(p, _mm512_maskz_loadu_ps(lanes, moved + c));
      const __m512 m = _mm512_fmadd_ps(vb1, _mm512_maskz_loadu_ps(lanes, mm + c), _mm512_mul_ps(va1, g));
      const __m512 v = _mm512_fmadd_ps(vb2, _mm512_maskz_loadu_ps(lanes, vv + c), _mm512_mul_ps(_mm512_mul_ps(va2, g), g));
      const __m512 denominator = _mm512_fmadd_ps(_mm512_sqrt_ps(v), vinv_b2, veps);
      const __m512 r0 = _mm512_rcp14_ps(denominator);  // 1 / denominator, refined: r0 + r0 (1 - d r0)
      const __m512 reciprocal = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(denominator, r0, one), r0);
      _mm512_mask_storeu_ps(mm + c, lanes, m);
      _mm512_mask_storeu_ps(vv + c, lanes, v);
      _mm512_mask_storeu_ps(pp + c, lanes, _mm512_fnmadd_ps(_mm512_mul_ps(vstep, m), reciprocal, p));
    }
    return;
  }
#endif
  for (; c < width; ++c) {
    const scalar_t gc = gg[c];
    const scalar_t caught_up = moved != nullptr ? pp[c] - moved[c] : pp[c];
    mm[c] = b1 * mm[c] + one_b1 * gc;
    vv[c] = b2 * vv[c] + one_b2 * gc * gc;
    pp[c] = caught_up - step_size * mm[c] / (std::sqrt(vv[c]) * inv_b2 + eps);
  }
}

#if defined(__AVX512F__)
// A row with idle steps pending and a gradient now, in one pass (float32, AVX-512): per block of
// 16, the idle steps' series (as idle_series), the exact step-by-step sum `near_sum(m, sqrt(v))`
// for the few elements with m != 0 whose sqrt(v) is within `limit` of eps, then the step (as
// adam_row_step). One read of m and v instead of two, and no `moved` buffer in between.
// Returns false (and does nothing) for other types.
template <typename scalar_t, typename NearSum>
bool adam_row_catch_up_step(scalar_t* __restrict__ pp, scalar_t* __restrict__ mm, scalar_t* __restrict__ vv,
                            const scalar_t* __restrict__ gg, int64_t width, scalar_t s0, scalar_t s1, scalar_t s2,
                            scalar_t limit, NearSum near_sum, scalar_t decay1, scalar_t decay2, scalar_t beta1,
                            scalar_t beta2, scalar_t step_size, scalar_t inv_b2, scalar_t eps) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    return false;
  } else {
  const __m512 vs0 = _mm512_set1_ps(s0), vs1 = _mm512_set1_ps(s1), vs2 = _mm512_set1_ps(s2),
               limit_sq = _mm512_set1_ps(limit * limit), half = _mm512_set1_ps(0.5f),
               three_halves = _mm512_set1_ps(1.5f), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 vb1 = _mm512_set1_ps(beta1 * decay1), vb2 = _mm512_set1_ps(beta2 * decay2),
               va1 = _mm512_set1_ps(1 - beta1), va2 = _mm512_set1_ps(1 - beta2), vstep = _mm512_set1_ps(step_size),
               vinv_b2 = _mm512_set1_ps(inv_b2), veps = _mm512_set1_ps(eps);
  for (int64_t c = 0; c < width; c += 16) {
    const __mmask16 lanes = width - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - c)) - 1);
    const __m512 m0 = _mm512_maskz_loadu_ps(lanes, mm + c), v0 = _mm512_maskz_loadu_ps(lanes, vv + c);
    const __m512 y0 = _mm512_rsqrt14_ps(v0);
    const __m512 inv = _mm512_mul_ps(y0, _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_mul_ps(half, v0), y0), y0, three_halves));
    const __m512 series = _mm512_fnmadd_ps(inv, _mm512_fnmadd_ps(inv, vs2, vs1), vs0);
    const __mmask16 moving = _mm512_mask_cmp_ps_mask(lanes, m0, zero, _CMP_NEQ_OQ);
    __m512 moved = _mm512_maskz_mov_ps(moving, _mm512_mul_ps(_mm512_mul_ps(m0, inv), series));
    const __mmask16 near = _mm512_mask_cmp_ps_mask(moving, v0, limit_sq, _CMP_LE_OQ);
    if (near != 0) {
      alignas(64) float exact[16];
      _mm512_store_ps(exact, moved);
      for (int lane = 0; lane < 16; ++lane)
        if (near & (1u << lane)) exact[lane] = near_sum(mm[c + lane], std::sqrt(vv[c + lane]));
      moved = _mm512_load_ps(exact);
    }
    const __m512 g = _mm512_maskz_loadu_ps(lanes, gg + c);
    const __m512 p = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, pp + c), moved);
    const __m512 m = _mm512_fmadd_ps(vb1, m0, _mm512_mul_ps(va1, g));
    const __m512 v = _mm512_fmadd_ps(vb2, v0, _mm512_mul_ps(_mm512_mul_ps(va2, g), g));
    const __m512 denominator = _mm512_fmadd_ps(_mm512_sqrt_ps(v), vinv_b2, veps);
    const __m512 r0 = _mm512_rcp14_ps(denominator);
    const __m512 reciprocal = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(denominator, r0, one), r0);
    _mm512_mask_storeu_ps(mm + c, lanes, m);
    _mm512_mask_storeu_ps(vv + c, lanes, v);
    _mm512_mask_storeu_ps(pp + c, lanes, _mm512_fnmadd_ps(_mm512_mul_ps(vstep, m), reciprocal, p));
  }
  return true;
  }
}
#endif

// Exact row-sparse Adam: the result of dense torch.optim.Adam while touching only some rows.
// A row last updated at step last_step[r] has since had zero gradient: in dense Adam its moments
// decayed (m *= beta1, v *= beta2 per step) and it kept moving on its first moment. Those idle
// steps are applied here, the first `horizon` of them (later ones shrink like (beta1 / sqrt(beta2))^i
// and are below float precision): through three per-row sums where sqrt(v) is far above eps, and
// summed step by step for the elements whose sqrt(v) is near eps (they do not factor into per-row
// scalars). The moments decay in closed form.
// With values [rows, ...], the rows catch up to step - 1 and then take this step's gradient;
// without, they catch up to `step` (a flush before the weights are read).
void adam_rows_exact(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor last_step,
                     torch::Tensor rows, c10::optional<torch::Tensor> values_opt, double lr, double beta1,
                     double beta2, double eps, int64_t step, int64_t horizon) {
  TORCH_CHECK(last_step.scalar_type() == torch::kLong && last_step.is_contiguous(), "last_step must be int64");
  const bool has_values = values_opt.has_value();
  const int64_t n_rows = rows.numel();
  const int64_t width = param.numel() / std::max<int64_t>(param.size(0), 1);
  const int64_t* r = rows.data_ptr<int64_t>();
  int64_t* last = last_step.data_ptr<int64_t>();
  const int64_t upto = has_values ? step - 1 : step;
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "meprop_adam_rows_exact", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* g = has_values ? values_opt->data_ptr<scalar_t>() : nullptr;
    const scalar_t b1 = beta1, b2 = beta2, e = eps;
    const scalar_t step_size = lr / bias1, inv_b2 = 1.0 / bias2_sqrt;
    at::parallel_for(0, n_rows, grain(n_rows, width * 8), [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> scale, shrink, moved(width);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = r[i], off = row * width;
        scalar_t* __restrict__ pp = p + off;
        scalar_t* __restrict__ mm = m + off;
        scalar_t* __restrict__ vv = v + off;
        const int64_t idle = upto - last[row];
        scalar_t decay1 = 1, decay2 = 1;
        bool pending = false;
        if (idle > 0) {
          // idle step j = last + q (q = 1..n): p -= a_q m / (b_q sqrt(v) + eps), with
          // a_q = lr beta1^q / (1 - beta1^j) and b_q = beta2^(q/2) / sqrt(1 - beta2^j).
          const int64_t n = std::min(idle, horizon);
          // Where eps / (b_q sqrt(v)) = u_q <= kSeriesRatio for every q, 1 / (1 + u) = 1 - u + u^2
          // (error below u^3 = 1e-6, relative) turns the sum into three per-row scalars:
          // series_i = sum_q a_q / b_q^(i + 1). The powers advance by one multiplication per q; once
          // the bias corrections are 1 to double precision, the sums are geometric, in closed form.
          const double first1 = std::pow(beta1, static_cast<double>(last[row] + 1));  // beta^j at q = 1
          const double first2 = std::pow(beta2, static_cast<double>(last[row] + 1));
          double series0 = 0, series1 = 0, series2 = 0, smallest_shrink;
          if (first1 < kSettled && first2 < kSettled) {  // a_q = lr beta1^q, b_q = beta2^(q/2)
            const double root2 = std::sqrt(beta2);
            series0 = lr * geometric_sum(beta1 / root2, n);
            series1 = lr * geometric_sum(beta1 / beta2, n);
            series2 = lr * geometric_sum(beta1 / (beta2 * root2), n);
            smallest_shrink = std::pow(root2, static_cast<double>(n));
          } else {
            double pow1 = beta1, pow2_half = std::sqrt(beta2), bias1 = first1, bias2 = first2;
            const double step2_half = pow2_half;
            smallest_shrink = INFINITY;
            for (int64_t q = 1; q <= n; ++q) {
              const double a = lr * pow1 / (1.0 - bias1);
              const double b = pow2_half / std::sqrt(1.0 - bias2);
              const double over_b = 1.0 / b;
              series0 += a * over_b;
              series1 += a * over_b * over_b;
              series2 += a * over_b * over_b * over_b;
              smallest_shrink = std::min(smallest_shrink, b);
              pow1 *= beta1;
              pow2_half *= step2_half;
              bias1 *= beta1;
              bias2 *= beta2;
            }
          }
          const double threshold = eps / (kSeriesRatio * smallest_shrink);
          const scalar_t s0 = series0, s1 = series1 * eps, s2 = series2 * eps * eps;
          // The series for every element, without branches so that the loop vectorises; the
          // elements with sqrt(v) near eps are counted and redone below.
          const scalar_t limit = threshold;
          // The idle steps of one element summed as they are, from tables of a_q and b_q (built
          // on first use: most rows have no element near eps).
          bool tables = false;
          const auto near_sum = [&](scalar_t m_c, scalar_t root) {
            if (!tables) {
              scale.resize(n);
              shrink.resize(n);
              double pow1 = beta1, pow2_half = std::sqrt(beta2), bias1 = first1, bias2 = first2;
              const double step2_half = pow2_half;
              for (int64_t q = 0; q < n; ++q) {
                scale[q] = lr * pow1 / (1.0 - bias1);
                shrink[q] = pow2_half / std::sqrt(1.0 - bias2);
                pow1 *= beta1;
                pow2_half *= step2_half;
                bias1 *= beta1;
                bias2 *= beta2;
              }
              tables = true;
            }
            scalar_t sum = 0;
            for (int64_t q = 0; q < n; ++q) sum += scale[q] * m_c / (shrink[q] * root + e);
            return sum;
          };
          decay1 = std::pow(beta1, static_cast<double>(idle));
          decay2 = std::pow(beta2, static_cast<double>(idle));
#if defined(__AVX512F__)
          if (g != nullptr && adam_row_catch_up_step<scalar_t>(pp, mm, vv, g + i * width, width, s0, s1, s2, limit,
                                                               near_sum, decay1, decay2, b1, b2, step_size, inv_b2, e)) {
            last[row] = step;  // caught up and stepped in one pass
            continue;
          }
#endif
          const int64_t near_eps = idle_series<scalar_t>(mm, vv, moved.data(), width, s0, s1, s2, limit);
          if (near_eps > 0) {
            for (int64_t c = 0; c < width; ++c) {
              const scalar_t root = std::sqrt(vv[c]);
              if (root > limit || mm[c] == 0) continue;
              moved[c] = near_sum(mm[c], root);
            }
          }
          pending = true;
        }
        // One pass over the row: the idle steps (if any), then this step's gradient (if any).
        const scalar_t* __restrict__ gg = g != nullptr ? g + i * width : nullptr;
        if (gg != nullptr) {
          adam_row_step<scalar_t>(pp, mm, vv, gg, pending ? moved.data() : nullptr, width, decay1, decay2, b1, b2,
                                  step_size, inv_b2, e);
        } else if (pending) {
          for (int64_t c = 0; c < width; ++c) {
            pp[c] -= moved[c];
            mm[c] *= decay1;
            vv[c] *= decay2;
          }
        }
        last[row] = has_values ? step : upto;
      }
    });
  });
}

// AdaGrad on the given rows: identical to the dense update, since other rows have zero gradient.
void adagrad_rows(torch::Tensor param, torch::Tensor state_sum, torch::Tensor rows, torch::Tensor values,
                  double lr, double eps) {
  const int64_t n_rows = rows.numel();
  const int64_t width = param.numel() / std::max<int64_t>(param.size(0), 1);
  const int64_t* r = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "meprop_adagrad_rows", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* s = state_sum.data_ptr<scalar_t>();
    const scalar_t* g = values.data_ptr<scalar_t>();
    const scalar_t rate = lr, e = eps;
    at::parallel_for(0, n_rows, grain(n_rows, width * 4), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t off = r[i] * width;
        scalar_t* __restrict__ pp = p + off;
        scalar_t* __restrict__ ss = s + off;
        const scalar_t* __restrict__ gg = g + i * width;
        for (int64_t c = 0; c < width; ++c) {
          ss[c] += gg[c] * gg[c];
          pp[c] -= rate * gg[c] / (std::sqrt(ss[c]) + e);
        }
      }
    });
  });
}

// y = x w^T + b. For a small minibatch, MKL's GEMM uses the threads poorly (this project's 2-core
// AMD EPYC VM, 2 threads, loaded machine: 10 x 784 by 784 x 500 in 109 us, against 78 us when each
// thread runs a single-threaded GEMM on half of w's rows), so there the output rows are split
// between the threads; elsewhere it is one addmm.
torch::Tensor linear_forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), out / 16);
  if (parts < 2 || n > 64 || n * in * out < (int64_t(1) << 20)) return torch::addmm(b, x, w.t());
  torch::Tensor y = torch::empty({n, out}, x.options());
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {  // a GEMM inside runs on its own thread
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = out * p / parts, j1 = out * (p + 1) / parts;
      torch::Tensor part = y.narrow(1, j0, j1 - j0);
      at::addmm_out(part, b.narrow(0, j0, j1 - j0), x, w.narrow(0, j0, j1 - j0).t());
    }
  });
  return y;
}

// Layers up to this wide, on minibatches up to kNarrowRows, take dense_backward's own loops
// instead of two GEMMs (at 10,000 rows MKL is faster: 0.94 against 1.35 ms for 10 x 200).
constexpr int64_t kNarrowOut = 32;
constexpr int64_t kNarrowRows = 512;

// Dense backward of a linear layer y = x w^T + b: {dx = dy w (or undefined), dw = dy^T x (or
// undefined), db = dy summed over examples}. A narrow layer (out <= kNarrowOut, such as the MLP's
// 10-wide output layer) goes through parallel_gathered_gemms: MKL runs these skinny products poorly
// on two threads (2000 inputs, minibatch 50: 191 us against 71 us on one thread, this project's
// 2-core AMD EPYC VM). Other layers are two mm calls.
std::vector<torch::Tensor> dense_backward(const torch::Tensor& dy, const c10::optional<torch::Tensor>& x_opt,
                                          const c10::optional<torch::Tensor>& weight_opt, bool need_dx, bool need_dw) {
  const int64_t in = check_backward_inputs(dy, x_opt, weight_opt, need_dx, need_dw);
  const int64_t n = dy.size(0), out = dy.size(1);
  torch::Tensor dx, dw;
  if (out > kNarrowOut || n > kNarrowRows) {
    if (need_dx) dx = dy.mm(*weight_opt);
    if (need_dw) dw = dy.t().mm(*x_opt);
    return {dx, dw, dy.sum(0)};
  }
  if (need_dx) dx = torch::empty({n, in}, dy.options());
  if (need_dw) dw = torch::empty({out, in}, dy.options());
  torch::Tensor db = torch::empty({out}, dy.options());  // summed here: torch's sum costs 9 us on two threads
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "meprop_dense_backward", [&] {
    const scalar_t* g = dy.data_ptr<scalar_t>();
    std::vector<scalar_t> g_t(out * n);  // dy transposed: the coefficients of each dw row
    for (int64_t e = 0; e < n; ++e)
      for (int64_t j = 0; j < out; ++j) g_t[j * n + e] = g[e * out + j];
    scalar_t* bias_grad = db.data_ptr<scalar_t>();
    for (int64_t j = 0; j < out; ++j) {
      scalar_t sum = 0;
      for (int64_t e = 0; e < n; ++e) sum += g_t[j * n + e];
      bias_grad[j] = sum;
    }
    std::vector<const scalar_t*> w_rows(need_dx ? out : 0), x_rows(need_dw ? n : 0);
    for (size_t j = 0; j < w_rows.size(); ++j) w_rows[j] = weight_opt->data_ptr<scalar_t>() + j * in;
    for (size_t e = 0; e < x_rows.size(); ++e) x_rows[e] = x_opt->data_ptr<scalar_t>() + e * in;
    std::vector<GatheredProduct<scalar_t>> products;
    if (need_dx) products.push_back({dx.data_ptr<scalar_t>(), n, out, g, w_rows.data()});
    if (need_dw) products.push_back({dw.data_ptr<scalar_t>(), out, n, g_t.data(), x_rows.data()});
    if (!products.empty()) parallel_gathered_gemms<scalar_t>(products, in);
  });
  return {dx, dw, db};
}

// One training step of the paper's MLP in a single call, so that a step pays no per-layer Python
// or autograd overhead: the forward (linear + ReLU per hidden layer, then a linear output layer),
// softmax cross-entropy, the backward with meProp on the hidden layers (top-k of each layer's
// pre-activation gradient, per example or unified; k = 0 or k >= width is plain backprop) and
// the update of the rows of every parameter that got a gradient: exact Adam (adam_rows_exact;
// states_a / states_b are the moments, last_steps the rows' last updates) or, with `adagrad`,
// AdaGrad (adagrad_rows, exact by nature; states_a are the sums of squares, the other two lists
// are empty). dx of a layer is computed before its weights are updated. Returns
// {loss, logits, seconds}: seconds holds the forward, backward, linear-backward (inside
// backward) and update times.
std::vector<torch::Tensor> mlp_train_step(torch::Tensor x, torch::Tensor y, std::vector<torch::Tensor> weights,
                                          std::vector<torch::Tensor> biases, std::vector<torch::Tensor> states_a,
                                          std::vector<torch::Tensor> states_b, std::vector<torch::Tensor> last_steps,
                                          int64_t k, bool unified, bool sum_loss, bool adagrad, double lr, double beta1,
                                          double beta2, double eps, int64_t step, int64_t horizon) {
  using Clock = std::chrono::steady_clock;
  const auto seconds = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  const int64_t n_layers = static_cast<int64_t>(weights.size());
  const size_t adam_states = adagrad ? 0 : 2 * n_layers;
  TORCH_CHECK(n_layers >= 1 && static_cast<int64_t>(biases.size()) == n_layers &&
                  static_cast<int64_t>(states_a.size()) == 2 * n_layers && states_b.size() == adam_states &&
                  last_steps.size() == adam_states,
              "mlp_train_step: one weight and bias per layer, and the optimizer's state for each of them");
  torch::NoGradGuard no_grad;
  const auto start = Clock::now();
  std::vector<torch::Tensor> inputs(n_layers);  // each layer's input (the previous layer's ReLU output)
  torch::Tensor h = x;
  for (int64_t l = 0; l < n_layers; ++l) {
    inputs[l] = h;
    h = linear_forward(h, weights[l], biases[l]);
    if (l + 1 < n_layers) h.clamp_min_(0);
  }
  const torch::Tensor logits = h.contiguous();
  // Softmax cross-entropy and its gradient d loss / d logits = softmax - one-hot (over n for the
  // mean) in one loop over the (small) logits, instead of half a dozen tensor ops.
  const int64_t n = x.size(0), n_classes = logits.size(1);
  TORCH_CHECK(y.scalar_type() == torch::kLong && y.is_contiguous() && y.numel() == n, "y must be n int64 labels");
  torch::Tensor dz = torch::empty_like(logits);
  double total_loss = 0;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "meprop_softmax_xent", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* d = dz.data_ptr<scalar_t>();
    const int64_t* label = y.data_ptr<int64_t>();
    const double scale = sum_loss ? 1.0 : 1.0 / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* zi = z + i * n_classes;
      scalar_t* di = d + i * n_classes;
      TORCH_CHECK(label[i] >= 0 && label[i] < n_classes, "label out of range");
      const double top = *std::max_element(zi, zi + n_classes);
      double sum = 0;
      for (int64_t c = 0; c < n_classes; ++c) sum += std::exp(static_cast<double>(zi[c]) - top);
      const double log_sum = std::log(sum);
      total_loss += log_sum + top - static_cast<double>(zi[label[i]]);
      for (int64_t c = 0; c < n_classes; ++c)
        di[c] = static_cast<scalar_t>((std::exp(static_cast<double>(zi[c]) - top - log_sum) - (c == label[i])) * scale);
    }
    if (!sum_loss) total_loss /= static_cast<double>(n);
  });
  torch::Tensor loss = torch::tensor(total_loss, logits.options());
  const auto forward_end = Clock::now();
  double linear_s = 0, update_s = 0;
  for (int64_t l = n_layers - 1; l >= 0; --l) {
    const auto layer_start = Clock::now();
    const torch::Tensor& weight = weights[l];
    const int64_t out = weight.size(0);
    const bool needs_dx = l > 0;
    const bool meprop = l + 1 < n_layers && k > 0 && k < out;
    torch::Tensor dx, rows, w_values, b_values;
    if (meprop && !unified) {
      auto parts = per_example_backward(dz.contiguous(), inputs[l].contiguous(),
                                        needs_dx ? c10::optional<torch::Tensor>(weight) : c10::nullopt,
                                        c10::nullopt, k, needs_dx, true);
      dx = parts[0];
      rows = parts[1];
      w_values = parts[2];
      b_values = parts[3];
    } else if (meprop) {
      auto parts = unified_backward(dz.contiguous(), inputs[l].contiguous(),
                                    needs_dx ? c10::optional<torch::Tensor>(weight) : c10::nullopt, k, needs_dx, true);
      dx = parts[0];
      rows = parts[1];
      w_values = parts[2];
      b_values = parts[3];
    } else {
      rows = torch::arange(out, torch::TensorOptions().dtype(torch::kLong));
      auto parts = dense_backward(dz.contiguous(), inputs[l].contiguous(),
                                  needs_dx ? c10::optional<torch::Tensor>(weight) : c10::nullopt, needs_dx, true);
      dx = parts[0];
      w_values = parts[1];
      b_values = parts[2];
    }
    const auto grads_end = Clock::now();
    if (adagrad) {  // the rows with a gradient (all of them without meProp)
      adagrad_rows(weight, states_a[2 * l], rows, w_values.contiguous(), lr, eps);
      adagrad_rows(biases[l], states_a[2 * l + 1], rows, b_values.contiguous(), lr, eps);
    } else {
      // Exact Adam on the rows with a gradient (all of them without meProp; rows left idle by an
      // earlier meProp phase catch up first). For a dense layer this is also faster here than
      // torch's own at::_fused_adam_ (500 x 784, 2 threads, interleaved: 186 against 293 us).
      adam_rows_exact(weight, states_a[2 * l], states_b[2 * l], last_steps[2 * l], rows, w_values.contiguous(), lr,
                      beta1, beta2, eps, step, horizon);
      adam_rows_exact(biases[l], states_a[2 * l + 1], states_b[2 * l + 1], last_steps[2 * l + 1], rows,
                      b_values.contiguous(), lr, beta1, beta2, eps, step, horizon);
    }
    const auto update_end = Clock::now();
    linear_s += seconds(layer_start, grads_end);
    update_s += seconds(grads_end, update_end);
    if (needs_dx) {  // through the ReLU that produced this layer's input
      dz = dx;
      AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "meprop_relu_backward", [&] {
        scalar_t* __restrict__ d = dz.data_ptr<scalar_t>();
        const scalar_t* __restrict__ a = inputs[l].data_ptr<scalar_t>();
        const int64_t size = dz.numel();
        for (int64_t i = 0; i < size; ++i) d[i] = a[i] > 0 ? d[i] : scalar_t(0);
      });
    }
  }
  const double total_backward = seconds(forward_end, Clock::now()) - update_s;
  auto times = torch::tensor({seconds(start, forward_end), total_backward, linear_s, update_s},
                             torch::TensorOptions().dtype(torch::kDouble));
  return {loss, logits, times};
}

// Back-propagation through time of a one-layer LSTM (gates i, f, g, o) keeping, for every example and
// time step, the k entries of each gate's pre-activation gradient largest in magnitude (the first
// ones among equal magnitudes). gates [T, N, 4H] hold i, f, g, o after their nonlinearities, cells
// [T + 1, N, H] hold c_0 .. c_T and tanh_cells [T, N, H] tanh(c_1 .. c_T) (computed vectorised by the
// caller), h_prev [T, N, H] and x [T, N, I] the inputs of each step. d_out
// [T, N, H] is the gradient of the outputs, dh / dc [N, H] those of h_T and c_T. Returns {dx [T, N, I]
// (or None), dh_0, dc_0, rows [r] (sorted: the gate rows kept at some step), their dW_ih [r, I],
// dW_hh [r, H] and masked db [r], and the full db [4H]}: one call for the whole sequence, the work of
// each step proportional to k (the 4k kept rows of W_ih and W_hh), not to H, and no dense
// weight-sized gradient written.
std::vector<torch::Tensor> lstm_per_example_backward(torch::Tensor gates, torch::Tensor cells, torch::Tensor tanh_cells,
                                                     torch::Tensor h_prev, torch::Tensor x, torch::Tensor w_ih,
                                                     torch::Tensor w_hh, torch::Tensor d_out, torch::Tensor dh_last,
                                                     torch::Tensor dc_last, int64_t k, bool need_dx) {
  for (const auto* t : {&gates, &cells, &tanh_cells, &h_prev, &x, &w_ih, &w_hh, &d_out, &dh_last, &dc_last})
    TORCH_CHECK(t->is_contiguous(), "lstm_per_example_backward: inputs must be contiguous");
  const int64_t steps = gates.size(0), n = gates.size(1), width = gates.size(2), hidden = width / 4;
  const int64_t in = x.size(2);
  TORCH_CHECK(k >= 1 && k <= hidden, "k must be in 1..hidden");
  auto dh = dh_last.clone(), dc = dc_last.clone();
  auto db_full = torch::zeros({width}, gates.options());
  torch::Tensor dx = need_dx ? torch::empty({steps, n, in}, gates.options()) : torch::Tensor();
  torch::Tensor rows, w_ih_values, w_hh_values, b_values;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "meprop_lstm_backward", [&] {
    const scalar_t* gp = gates.data_ptr<scalar_t>();
    const scalar_t* cp = cells.data_ptr<scalar_t>();
    const scalar_t* tcp = tanh_cells.data_ptr<scalar_t>();
    const scalar_t* hp = h_prev.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wi = w_ih.data_ptr<scalar_t>();
    const scalar_t* wh = w_hh.data_ptr<scalar_t>();
    const scalar_t* dop = d_out.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    scalar_t* dbf = db_full.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    std::vector<scalar_t> da(width), magnitude(hidden), dh_new(hidden);
    std::vector<int32_t> order(hidden), kept(4 * k);
    // Row-sparse weight gradients: a gate row gets a slot the first time it is kept.
    std::vector<int32_t> slot(width, -1), touched;
    std::vector<scalar_t> gi_rows, gh_rows, gb_rows;
    const int64_t most_rows = std::min<int64_t>(width, steps * n * 4 * k);
    gi_rows.reserve(most_rows * in);  // grown a row at a time below, never reallocated
    gh_rows.reserve(most_rows * hidden);
    gb_rows.reserve(most_rows);
    for (int64_t t = steps - 1; t >= 0; --t) {
      for (int64_t e = 0; e < n; ++e) {
        const int64_t row = t * n + e;
        const scalar_t* gi = gp + row * width;
        const scalar_t *ig = gi, *fg = gi + hidden, *gg = gi + 2 * hidden, *og = gi + 3 * hidden;
        const scalar_t* c_prev = cp + row * hidden;  // c_{t-1}: cells[t]
        const scalar_t* tanh_now = tcp + row * hidden;  // tanh(c_t)
        scalar_t* dhe = dhp + e * hidden;
        scalar_t* dce = dcp + e * hidden;
        const scalar_t* dout = dop + row * hidden;
        for (int64_t j = 0; j < hidden; ++j) {
          const scalar_t h_grad = dhe[j] + dout[j];
          const scalar_t tanh_c = tanh_now[j];
          const scalar_t c_grad = dce[j] + h_grad * og[j] * (1 - tanh_c * tanh_c);
          da[j] = c_grad * gg[j] * ig[j] * (1 - ig[j]);
          da[hidden + j] = c_grad * c_prev[j] * fg[j] * (1 - fg[j]);
          da[2 * hidden + j] = c_grad * ig[j] * (1 - gg[j] * gg[j]);
          da[3 * hidden + j] = h_grad * tanh_c * og[j] * (1 - og[j]);
          dce[j] = c_grad * fg[j];
        }
        for (int64_t j = 0; j < width; ++j) dbf[j] += da[j];
        for (int64_t gate = 0; gate < 4; ++gate) {  // k largest |da| of the gate, ties to the lower index
          const scalar_t* dg = da.data() + gate * hidden;
          for (int64_t j = 0; j < hidden; ++j) magnitude[j] = std::abs(dg[j]);
          int32_t* best = kept.data() + gate * k;
          if (k <= 32) {  // a sorted list of the k best so far: one comparison for most entries
            int64_t filled = 0;
            for (int32_t j = 0; j < hidden; ++j) {
              const scalar_t m = magnitude[j];
              if (filled == k && !(m > magnitude[best[k - 1]])) continue;
              int64_t at = filled < k ? filled++ : k - 1;
              while (at > 0 && m > magnitude[best[at - 1]]) {
                best[at] = best[at - 1];
                --at;
              }
              best[at] = j;
            }
          } else {
            std::iota(order.begin(), order.end(), 0);
            const scalar_t* mg = magnitude.data();
            std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [mg](int32_t a, int32_t b) {
              return mg[a] > mg[b] || (mg[a] == mg[b] && a < b);
            });
            std::copy_n(order.begin(), k, best);
          }
          for (int64_t j = 0; j < k; ++j) best[j] += static_cast<int32_t>(gate * hidden);
        }
        std::fill(dh_new.begin(), dh_new.end(), scalar_t(0));
        const scalar_t* h_in = hp + row * hidden;
        const scalar_t* x_in = xp + row * in;
        scalar_t* dx_row = need_dx ? dxp + row * in : nullptr;
        if (need_dx) std::fill(dx_row, dx_row + in, scalar_t(0));
        for (int64_t j = 0; j < 4 * k; ++j) {
          const int32_t r = kept[j];
          if (slot[r] < 0) {
            slot[r] = static_cast<int32_t>(touched.size());
            touched.push_back(r);
            gi_rows.resize(touched.size() * in, scalar_t(0));
            gh_rows.resize(touched.size() * hidden, scalar_t(0));
            gb_rows.push_back(scalar_t(0));
          }
          const scalar_t v = da[r];
          gb_rows[slot[r]] += v;
          const scalar_t* __restrict__ whr = wh + r * hidden;
          scalar_t* __restrict__ dwhr = gh_rows.data() + static_cast<int64_t>(slot[r]) * hidden;
          for (int64_t c = 0; c < hidden; ++c) {
            dh_new[c] += v * whr[c];
            dwhr[c] += v * h_in[c];
          }
          const scalar_t* __restrict__ wir = wi + r * in;
          scalar_t* __restrict__ dwir = gi_rows.data() + static_cast<int64_t>(slot[r]) * in;
          for (int64_t c = 0; c < in; ++c) dwir[c] += v * x_in[c];
          if (need_dx)
            for (int64_t c = 0; c < in; ++c) dx_row[c] += v * wir[c];
        }
        std::copy(dh_new.begin(), dh_new.end(), dhe);
      }
    }
    std::vector<int32_t> sorted(touched);
    std::sort(sorted.begin(), sorted.end());
    const int64_t r_count = static_cast<int64_t>(sorted.size());
    rows = torch::empty({r_count}, gates.options().dtype(torch::kLong));
    w_ih_values = torch::empty({r_count, in}, gates.options());
    w_hh_values = torch::empty({r_count, hidden}, gates.options());
    b_values = torch::empty({r_count}, gates.options());
    int64_t* rp = rows.data_ptr<int64_t>();
    scalar_t *vi = w_ih_values.data_ptr<scalar_t>(), *vh = w_hh_values.data_ptr<scalar_t>();
    scalar_t* vb = b_values.data_ptr<scalar_t>();
    for (int64_t i = 0; i < r_count; ++i) {
      const int64_t from = slot[sorted[i]];
      rp[i] = sorted[i];
      std::copy_n(gi_rows.data() + from * in, in, vi + i * in);
      std::copy_n(gh_rows.data() + from * hidden, hidden, vh + i * hidden);
      vb[i] = gb_rows[from];
    }
  });
  return {dx, dh, dc, rows, w_ih_values, w_hh_values, b_values, db_full};
}

// Flush-to-zero and denormals-are-zero on this thread and on every thread of ATen's pool.
// torch.set_flush_denormal sets them on the calling thread only, and a pool thread keeps the
// floating-point mode it started with. Returns false where the CPU has no such mode.
bool set_flush_denormal_all_threads(bool on) {
#if defined(__SSE__)
  const auto apply = [on] {
    constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) and DAZ (bit 6) of MXCSR
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? (csr | kFlushBits) : (csr & ~kFlushBits));
  };
  apply();
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { apply(); });  // one index per pool thread
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("per_example_backward", &per_example_backward, "meProp per-example backward (CPU)");
  m.def("unified_backward", &unified_backward, "meProp unified top-k backward (CPU)");
  m.attr("NARROW_OUT") = kNarrowOut;  // dense_backward's own-loop limits, for ops._narrow_layer_pays
  m.attr("NARROW_ROWS") = kNarrowRows;
  m.def("dense_backward", &dense_backward, "dense linear backward, narrow layers by own loops (CPU)");
  m.def("adam_rows", &adam_rows, "lazy Adam update of some rows (CPU)");
  m.def("adam_rows_exact", &adam_rows_exact, "exact (dense-equivalent) Adam update of some rows (CPU)");
  m.def("mlp_train_step", &mlp_train_step, "one fused MLP training step with meProp and exact Adam or AdaGrad (CPU)");
  m.def("set_flush_denormal_all_threads", &set_flush_denormal_all_threads,
        "flush denormals to zero on every ATen thread (x86)");
  m.def("adagrad_rows", &adagrad_rows, "AdaGrad update of some rows (CPU)");
  m.def("lstm_per_example_backward", &lstm_per_example_backward,
        "BPTT of a one-layer LSTM keeping the top-k of each gate's gradient per example and step (CPU)");
}
