// Grouped matmul for XLA:CPU as an XLA FFI custom call: the routed experts' products on exactly
// their rows, reading each expert's weights in place.
//
// XLA:CPU has no grouped matmul: the blocked JAX path pads every group to whole blocks and copies
// each block's weights (a one-hot matmul), and its backward moves [blocks, K, N] weight
// gradients through memory. Here rows stay sorted by group and every group's product is a
// cache-blocked matmul (packed panels, a 6 x 32 register tile) on the group's own rows.
//
// Contract (kernels/native_grouped_matmul.py holds the Python side; tests/test_grouped_matmul.py
// the reference it must match). Rows [M] are sorted by group; group g owns rows
// [start_g, start_g + sizes_g), start_g the sum of the sizes before it (negative sizes count as
// 0, rows past M are cut off). All float32. attr `mode`:
//   0 "nn": lhs [M, K], rhs [G, K, N]      -> out [M, N]     out_g = lhs_g rhs[g]
//   1 "nt": lhs [M, N], rhs [G, K, N]      -> out [M, K]     out_g = lhs_g rhs[g]^T  (d lhs)
//   2 "tn": lhs [M, K], rhs [M, N]         -> out [G, K, N]  out[g] = lhs_g^T rhs_g  (d weights)
// Rows past the last group get zero output ("nn", "nt"); a group without rows gets zero weights'
// gradient ("tn").
//
// Tasks (a group's block of output rows and columns) run on XLA's intra-op thread pool; the
// calling thread works too.

#include "cpu_common.h"

namespace {

using namespace deepjax;  // cpu_common.h: Vec, Splat, RoundUp, Buffer, ParallelFor.

constexpr int64_t kTileRows = 6;            // Microkernel rows: 12 accumulators with kTileCols.
constexpr int64_t kTileCols = 2 * kLanes;   // Microkernel columns: two vectors.
constexpr int64_t kDepthBlock = 256;        // Depth of the packed panels.
constexpr int64_t kMaxRowBlock = 192;       // Output rows per task at most.
constexpr int64_t kColBlock = 256;          // Output columns per task (a multiple of kTileCols).
constexpr int64_t kDirectRows = 24;         // Blocks of at most this many rows read b in place.
constexpr int64_t kInlineFlops = 1 << 21;   // Calls with less work run on the calling thread.

// A strided view: element (i, j) at p[i * rs + j * cs].
struct View {
  const float* p;
  int64_t rs, cs;
  float at(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
};

// a[rows r0.., depth d0..] into slivers of kTileRows rows: [sliver][depth][kTileRows], zero-padded.
void PackLhs(View a, int64_t r0, int64_t rows, int64_t d0, int64_t depth, float* out) {
  for (int64_t s = 0; s < rows; s += kTileRows) {
    const int64_t n = std::min(kTileRows, rows - s);
    float* dst = out + s * depth;
    for (int64_t d = 0; d < depth; ++d) {
      for (int64_t i = 0; i < n; ++i) dst[d * kTileRows + i] = a.at(r0 + s + i, d0 + d);
      for (int64_t i = n; i < kTileRows; ++i) dst[d * kTileRows + i] = 0.0f;
    }
  }
}

// b[depth d0.., cols c0..] into slivers of kTileCols columns: [sliver][depth][kTileCols],
// zero-padded. Rows of b contiguous in memory (cs == 1) are copied as runs.
void PackRhs(View b, int64_t d0, int64_t depth, int64_t c0, int64_t cols, float* out) {
  for (int64_t s = 0; s < cols; s += kTileCols) {
    const int64_t n = std::min(kTileCols, cols - s);
    float* dst = out + s * depth;
    for (int64_t d = 0; d < depth; ++d) {
      float* row = dst + d * kTileCols;
      if (b.cs == 1) {
        std::memcpy(row, b.p + (d0 + d) * b.rs + c0 + s, n * sizeof(float));
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = b.at(d0 + d, c0 + s + j);
      }
      for (int64_t j = n; j < kTileCols; ++j) row[j] = 0.0f;
    }
  }
}

// c[0:rows, 0:cols] (+)= a_sliver [depth][kTileRows] x b [depth][kTileCols] (rows ldb apart: a
// packed sliver, or b itself); rows <= kTileRows, cols <= kTileCols; `accumulate` adds to c
// instead of overwriting it.
void MicroKernel(int64_t depth, const float* a, const float* b, int64_t ldb, float* c,
                 int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  Vec acc[kTileRows][2] = {};
  for (int64_t d = 0; d < depth; ++d) {
    Vec b0, b1;
    std::memcpy(&b0, b + d * ldb, sizeof b0);  // Unaligned when b is read in place.
    std::memcpy(&b1, b + d * ldb + kLanes, sizeof b1);
    const float* ad = a + d * kTileRows;
    for (int64_t i = 0; i < kTileRows; ++i) {
      const Vec x = Splat(ad[i]);
      acc[i][0] += x * b0;
      acc[i][1] += x * b1;
    }
  }
  if (rows == kTileRows && cols == kTileCols) {
    for (int64_t i = 0; i < kTileRows; ++i) {
      Vec* out = reinterpret_cast<Vec*>(c + i * ldc);  // Unaligned stores: memcpy.
      if (accumulate) {
        Vec o0, o1;
        std::memcpy(&o0, out, sizeof o0);
        std::memcpy(&o1, reinterpret_cast<float*>(out) + kLanes, sizeof o1);
        acc[i][0] += o0;
        acc[i][1] += o1;
      }
      std::memcpy(out, &acc[i][0], sizeof acc[i][0]);
      std::memcpy(reinterpret_cast<float*>(out) + kLanes, &acc[i][1], sizeof acc[i][1]);
    }
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const float v = acc[i][j / kLanes][j % kLanes];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
  }
}

// c[rows r0.., cols c0..] = a[r0.., :depth] x b[:depth, c0..] for one task's block; c points at
// the block's first element. Depth 0 writes zeros. A block of few rows reuses each column sliver
// of b too little to pay for packing it: whole slivers of a b with contiguous rows are read in
// place, only a ragged last one is packed.
void MatmulBlock(View a, View b, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                 int64_t depth, float* c, int64_t ldc) {
  if (depth == 0) {
    for (int64_t i = 0; i < rows; ++i) std::memset(c + i * ldc, 0, cols * sizeof(float));
    return;
  }
  const bool direct = b.cs == 1 && rows <= kDirectRows;
  const int64_t panel_depth = std::min(kDepthBlock, depth);
  Buffer lhs(RoundUp(rows, kTileRows) * panel_depth, /*zero=*/false);
  Buffer rhs((direct ? kTileCols : RoundUp(cols, kTileCols)) * panel_depth, /*zero=*/false);
  for (int64_t d0 = 0; d0 < depth; d0 += kDepthBlock) {
    const int64_t dn = std::min(kDepthBlock, depth - d0);
    PackLhs(a, r0, rows, d0, dn, lhs.data);
    if (!direct) PackRhs(b, d0, dn, c0, cols, rhs.data);
    for (int64_t j = 0; j < cols; j += kTileCols) {
      const int64_t width = std::min(kTileCols, cols - j);
      const float* sliver = rhs.data + j * dn;
      int64_t ldb = kTileCols;
      if (direct && width == kTileCols) {
        sliver = b.p + d0 * b.rs + c0 + j;
        ldb = b.rs;
      } else if (direct) {
        PackRhs(b, d0, dn, c0 + j, width, rhs.data);
        sliver = rhs.data;
      }
      for (int64_t i = 0; i < rows; i += kTileRows) {
        MicroKernel(dn, lhs.data + i * dn, sliver, ldb, c + i * ldc + j, ldc,
                    std::min(kTileRows, rows - i), width, d0 > 0);
      }
    }
  }
}

// One group's product: out (rows x cols, leading dimension ldc) = a (rows x depth) x b (depth x
// cols).
struct GroupProduct {
  View a, b;
  int64_t rows, cols, depth;
  float* out;
  int64_t ldc;
};

// One task: a block of a group's output.
struct Task {
  int64_t product, r0, rows, c0, cols;
};

// Splits every product's output into blocks of at most kMaxRowBlock rows (evenly, in whole
// microkernel tiles) and kColBlock columns, and runs them on the pool (on this thread alone when
// there is too little work to share).
void RunProducts(ffi::ThreadPool& pool, const std::vector<GroupProduct>& products) {
  std::vector<Task> tasks;
  int64_t flops = 0;
  for (int64_t p = 0; p < static_cast<int64_t>(products.size()); ++p) {
    const GroupProduct& g = products[p];
    if (g.rows == 0 || g.cols == 0) continue;
    flops += 2 * g.rows * g.cols * g.depth;
    const int64_t row_blocks = (g.rows + kMaxRowBlock - 1) / kMaxRowBlock;
    const int64_t block = RoundUp((g.rows + row_blocks - 1) / row_blocks, kTileRows);
    for (int64_t r0 = 0; r0 < g.rows; r0 += block) {
      for (int64_t c0 = 0; c0 < g.cols; c0 += kColBlock) {
        tasks.push_back(
            {p, r0, std::min(block, g.rows - r0), c0, std::min(kColBlock, g.cols - c0)});
      }
    }
  }
  auto run = [&](int64_t t) {
    const Task& task = tasks[t];
    const GroupProduct& g = products[task.product];
    MatmulBlock(g.a, g.b, task.r0, task.rows, task.c0, task.cols, g.depth,
                g.out + task.r0 * g.ldc + task.c0, g.ldc);
  };
  if (flops < kInlineFlops) {
    for (int64_t t = 0; t < static_cast<int64_t>(tasks.size()); ++t) run(t);
  } else {
    ParallelFor(pool, static_cast<int64_t>(tasks.size()), run);
  }
}

ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                         ffi::Buffer<ffi::F32> rhs, ffi::Buffer<ffi::S32> sizes,
                         ffi::ResultBuffer<ffi::F32> out, int32_t mode) {
  const auto ld = lhs.dimensions(), rd = rhs.dimensions(), od = out->dimensions();
  const int64_t groups = sizes.element_count();
  bool shapes_ok = ld.size() == 2;
  if (shapes_ok && mode == 0) {  // [M, K] x [G, K, N] -> [M, N].
    shapes_ok = rd.size() == 3 && rd[0] == groups && rd[1] == ld[1] && od.size() == 2 &&
                od[0] == ld[0] && od[1] == rd[2];
  } else if (shapes_ok && mode == 1) {  // [M, N] x [G, K, N]^T -> [M, K].
    shapes_ok = rd.size() == 3 && rd[0] == groups && rd[2] == ld[1] && od.size() == 2 &&
                od[0] == ld[0] && od[1] == rd[1];
  } else if (shapes_ok && mode == 2) {  // [M, K]^T x [M, N] -> [G, K, N].
    shapes_ok = rd.size() == 2 && rd[0] == ld[0] && od.size() == 3 && od[0] == groups &&
                od[1] == ld[1] && od[2] == rd[1];
  } else {
    shapes_ok = false;
  }
  if (!shapes_ok) {
    return ffi::Error::InvalidArgument("grouped_matmul_cpu: operand shapes do not match mode " +
                                       std::to_string(mode));
  }
  const int64_t m = ld[0];
  const float* a = lhs.typed_data();
  const float* b = rhs.typed_data();
  float* o = out->typed_data();
  std::vector<GroupProduct> products;
  int64_t start = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rows = std::min<int64_t>(std::max<int32_t>(sizes.typed_data()[g], 0), m - start);
    if (mode == 0) {  // lhs [M, K] x rhs[g] [K, N] -> out [M, N].
      const int64_t k = ld[1], n = rd[2];
      products.push_back({{a + start * k, k, 1}, {b + g * k * n, n, 1}, rows, n, k,
                          o + start * n, n});
    } else if (mode == 1) {  // lhs [M, N] x rhs[g]^T [N, K] -> out [M, K].
      const int64_t k = rd[1], n = rd[2];
      products.push_back({{a + start * n, n, 1}, {b + g * k * n, 1, n}, rows, k, n,
                          o + start * k, k});
    } else {  // lhs_g^T [K, rows] x rhs_g [rows, N] -> out[g] [K, N].
      const int64_t k = ld[1], n = rd[1];
      products.push_back({{a + start * k, 1, k}, {b + start * n, n, 1}, k, n, rows,
                          o + g * k * n, n});
    }
    start += rows;
  }
  if (mode != 2 && start < m) {  // Rows past the last group: zero.
    const int64_t width = od[1];
    std::memset(o + start * width, 0, (m - start) * width * sizeof(float));
  }
  RunProducts(pool, products);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedMatmulCpu, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lhs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rhs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group sizes [G]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int32_t>("mode"));
