// Fused flash attention for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// XLA:CPU cannot fuse a matmul with the softmax around it, so blocked attention written in JAX
// streams every [queries, keys] score block through memory several times (scale, mask, max, exp,
// sum, divide, and as many again in the backward). Here each (batch row, head) is one task: its
// keys and values are copied once into contiguous, padded panels, and every 32 x 64 tile of
// scores lives in a small stack buffer from its matmul to its use, the online softmax of flash
// attention (Dao et al., 2022) in the forward and its recomputing backward.
//
// Contract (kernels/native_attention.py holds the Python side; tests/test_native_attention.py the
// reference it must match). Queries and keys come in two parts concatenated along the head
// (H = Hn + Hr), so that MLA's shared rotary key is never broadcast or concatenated in memory:
//   forward  (q_nope [B,T,N,Hn], q_rope [B,T,N,Hr], k_nope [B,S,N,Hn], k_rope [B,S,1 or N,Hr],
//             v [B,S,N,V] float32, segment ids [B,L] int32, L >= T, S;
//             attrs scale: f32, causal: i32) -> out [B,T,N,V], lse [B,N,T] float32
//   backward (the forward's operands, out, lse, dout [B,T,N,V])
//            -> dq_nope, dq_rope, dk_nope, dk_rope per head [B,S,N,Hr], dv (float32)
// Key s is visible to query t when their segment ids are equal and, if causal, s <= t. A query
// that sees no key gets a zero output, lse = +inf, and zero gradients.
//
// Tasks run on XLA's intra-op thread pool; the calling thread works too, so a pool busy with
// other thunks never blocks the call.

#include "cpu_common.h"

namespace {

using namespace deepjax;  // cpu_common.h: Vec, Splat, RoundUp, Buffer, ParallelFor.

constexpr int64_t kBlockQ = 32;  // Queries per tile (a multiple of kRows).
constexpr int64_t kBlockK = 64;  // Keys per tile: four vectors of 16 floats.
constexpr int64_t kRows = 4;     // Rows per microkernel call: they share every panel load.
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline float MaxLanes(Vec v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float SumLanes(Vec v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) per lane (Cephes' expf: range reduction by ln 2, degree-6 polynomial; relative error
// ~1e-7); -inf lanes give 0.
inline Vec Exp(Vec x) {
  const Vec clamped = x < Splat(-87.0f) ? Splat(-87.0f) : (x > Splat(88.0f) ? Splat(88.0f) : x);
  const Vec t = clamped * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to integer.
  const Vec k = t - 12582912.0f;
  const Vec r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
  const Vec y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                   4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r +
                r + 1.0f;
  const VecI bits = (__builtin_convertvector(k, VecI) + 127) << 23;
  Vec two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  const Vec e = y * two_k;
  return x == Splat(-kInf) ? Splat(0.0f) : e;
}

inline float Exp(float x) { return Exp(Splat(x))[0]; }

// out[r][0:64] = sum_d a[r][d] * panel[d][0:64] for kBlockQ rows r. `panel` points at a tile's
// first column inside a [depth][ldp] row-major panel (64-byte aligned rows).
void TileScores(const float* a, int64_t lda, int64_t depth, const float* panel, int64_t ldp,
                float* out) {
  for (int64_t r = 0; r < kBlockQ; r += kRows) {
    Vec acc[kRows][4] = {};
    for (int64_t d = 0; d < depth; ++d) {
      const Vec* p = reinterpret_cast<const Vec*>(panel + d * ldp);
      const Vec p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
      for (int64_t i = 0; i < kRows; ++i) {
        const float x = a[(r + i) * lda + d];
        acc[i][0] += x * p0;
        acc[i][1] += x * p1;
        acc[i][2] += x * p2;
        acc[i][3] += x * p3;
      }
    }
    for (int64_t i = 0; i < kRows; ++i) {
      std::memcpy(out + (r + i) * kBlockK, acc[i], sizeof acc[i]);
    }
  }
}

// out[r][0:width] += sum_d coef[r * row_stride + d * depth_stride] * mat[d][0:width] for `rows`
// rows (a multiple of kRows); width a multiple of kLanes, mat and out rows 64-byte aligned. The
// strides let a tile's transpose be the coefficients without copying it.
void TileAccumulate(const float* coef, int64_t row_stride, int64_t depth_stride, int64_t depth,
                    const float* mat, int64_t ldm, int64_t width, float* out, int64_t ldo,
                    int64_t rows) {
  for (int64_t c = 0; c < width; c += kLanes) {
    for (int64_t r = 0; r < rows; r += kRows) {
      Vec acc[kRows];
      for (int64_t i = 0; i < kRows; ++i) acc[i] = *reinterpret_cast<Vec*>(out + (r + i) * ldo + c);
      for (int64_t d = 0; d < depth; ++d) {
        const Vec m = *reinterpret_cast<const Vec*>(mat + d * ldm + c);
        for (int64_t i = 0; i < kRows; ++i) acc[i] += coef[(r + i) * row_stride + d * depth_stride] * m;
      }
      for (int64_t i = 0; i < kRows; ++i) *reinterpret_cast<Vec*>(out + (r + i) * ldo + c) = acc[i];
    }
  }
}

// Queries and keys come in two parts, concatenated along the head: a per-head part ("nope") and
// a rotary part ("rope") that the keys may share across heads (MLA's decoupled RoPE key: one
// head). Plain attention passes the whole head as the first part and a zero-width second part.
struct Dims {
  int64_t b, t, s, n, hn, hr, nr, v, l;  // nr: heads of the rotary keys (1 or n).
  int64_t h, hp, vp, sp;  // h = hn + hr; h, v padded to kLanes; s padded to kBlockK.
};

struct Operands {
  const float *q_nope, *q_rope, *k_nope, *k_rope, *v;
  const int32_t* seg;
};

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q_nope, const ffi::Buffer<ffi::F32>& q_rope,
                     const ffi::Buffer<ffi::F32>& k_nope, const ffi::Buffer<ffi::F32>& k_rope,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& seg, Dims& d,
                     Operands& x) {
  const auto qn = q_nope.dimensions(), qr = q_rope.dimensions(), kn = k_nope.dimensions(),
             kr = k_rope.dimensions(), vd = v.dimensions(), sd = seg.dimensions();
  if (qn.size() != 4 || qr.size() != 4 || kn.size() != 4 || kr.size() != 4 || vd.size() != 4 ||
      sd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "flash_attention_cpu: queries, keys and values need rank 4, segment ids rank 2");
  }
  d = Dims{qn[0], qn[1], kn[1], qn[2], qn[3], qr[3], kr[2], vd[3], sd[1], 0, 0, 0, 0};
  const bool ok = qr[0] == d.b && qr[1] == d.t && qr[2] == d.n && kn[0] == d.b && kn[2] == d.n &&
                  kn[3] == d.hn && kr[0] == d.b && kr[1] == d.s && (d.nr == 1 || d.nr == d.n) &&
                  kr[3] == d.hr && vd[0] == d.b && vd[1] == d.s && vd[2] == d.n && sd[0] == d.b &&
                  d.l >= std::max(d.t, d.s);
  if (!ok) {
    return ffi::Error::InvalidArgument("flash_attention_cpu: inconsistent query/key/value/segment shapes");
  }
  d.h = d.hn + d.hr;
  d.hp = RoundUp(d.h, kLanes);
  d.vp = RoundUp(d.v, kLanes);
  d.sp = RoundUp(std::max<int64_t>(d.s, 1), kBlockK);
  x = Operands{q_nope.typed_data(), q_rope.typed_data(), k_nope.typed_data(), k_rope.typed_data(),
               v.typed_data(), seg.typed_data()};
  return ffi::Error::Success();
}

// Key s of head n, both parts, into dst[0:h].
void LoadKey(const Dims& d, const Operands& x, int64_t b, int64_t n, int64_t s, float* dst) {
  std::memcpy(dst, x.k_nope + ((b * d.s + s) * d.n + n) * d.hn, d.hn * sizeof(float));
  if (d.hr) {
    const int64_t head = d.nr == 1 ? 0 : n;
    std::memcpy(dst + d.hn, x.k_rope + ((b * d.s + s) * d.nr + head) * d.hr, d.hr * sizeof(float));
  }
}

// Per (batch row, head): keys and values as padded panels, the keys' segment ids (padded), and
// each key block's segment range.
struct HeadPanels {
  HeadPanels(const Dims& d, const Operands& x, int64_t b, int64_t n, bool backward)
      : kt(d.hp * d.sp), kr(backward ? d.sp * d.hp : 0), vr(d.sp * d.vp),
        vt(backward ? d.vp * d.sp : 0), key_seg(d.sp), seg_min(d.sp / kBlockK),
        seg_max(d.sp / kBlockK) {
    std::vector<float> key(d.h);
    for (int64_t s = 0; s < d.s; ++s) {
      LoadKey(d, x, b, n, s, key.data());
      const float* vs = x.v + ((b * d.s + s) * d.n + n) * d.v;
      for (int64_t h = 0; h < d.h; ++h) kt.data[h * d.sp + s] = key[h];
      std::memcpy(vr.data + s * d.vp, vs, d.v * sizeof(float));
      if (backward) {
        std::memcpy(kr.data + s * d.hp, key.data(), d.h * sizeof(float));
        for (int64_t c = 0; c < d.v; ++c) vt.data[c * d.sp + s] = vs[c];
      }
    }
    const int32_t* ks = x.seg + b * d.l;
    int32_t* key_seg_data = reinterpret_cast<int32_t*>(key_seg.data);
    std::memcpy(key_seg_data, ks, d.s * sizeof(int32_t));  // Padding keys are masked by position.
    for (int64_t j = 0; j < d.sp / kBlockK; ++j) {
      seg_min[j] = std::numeric_limits<int32_t>::max();
      seg_max[j] = std::numeric_limits<int32_t>::min();
      for (int64_t s = j * kBlockK; s < std::min(d.s, (j + 1) * kBlockK); ++s) {
        seg_min[j] = std::min(seg_min[j], ks[s]);
        seg_max[j] = std::max(seg_max[j], ks[s]);
      }
    }
  }
  const int32_t* KeySegments() const { return reinterpret_cast<const int32_t*>(key_seg.data); }
  Buffer kt, kr, vr, vt;  // K^T [hp][sp], K [sp][hp], V [sp][vp], V^T [vp][sp].
  Buffer key_seg;         // int32 [sp].
  std::vector<int32_t> seg_min, seg_max;
};

// A query tile: rows [q0, q0 + rows) of one head, copied (zero-padded) into [kBlockQ][ld].
void LoadRows(const float* x, const Dims& d, int64_t width, int64_t b, int64_t n, int64_t q0,
              int64_t rows, int64_t ld, float* out) {
  std::memset(out, 0, kBlockQ * ld * sizeof(float));
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(out + i * ld, x + ((b * d.t + q0 + i) * d.n + n) * width, width * sizeof(float));
  }
}

// A query tile's rows, both parts, copied (zero-padded) into [kBlockQ][hp].
void LoadQueries(const Dims& d, const Operands& x, int64_t b, int64_t n, int64_t q0, int64_t rows,
                 float* out) {
  std::memset(out, 0, kBlockQ * d.hp * sizeof(float));
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = (b * d.t + q0 + i) * d.n + n;
    std::memcpy(out + i * d.hp, x.q_nope + row * d.hn, d.hn * sizeof(float));
    if (d.hr) std::memcpy(out + i * d.hp + d.hn, x.q_rope + row * d.hr, d.hr * sizeof(float));
  }
}

// One query tile's rows and their segment range.
struct QueryTile {
  QueryTile(const Dims& d, const int32_t* seg_row, int64_t q0)
      : q0(q0), rows(std::min(kBlockQ, d.t - q0)), seg_row(seg_row) {
    for (int64_t i = 0; i < rows; ++i) {
      seg_min = std::min(seg_min, seg_row[q0 + i]);
      seg_max = std::max(seg_max, seg_row[q0 + i]);
    }
  }
  int64_t q0, rows;
  const int32_t* seg_row;
  int32_t seg_min = std::numeric_limits<int32_t>::max();
  int32_t seg_max = std::numeric_limits<int32_t>::min();
};

enum class Visibility { kNone, kSome, kAll };

// Which keys of tile [k0, k0 + kBlockK) the tile's queries see, without looking at each pair
// where the segment ranges and the causal diagonal decide it.
Visibility TileVisibility(const Dims& d, const HeadPanels& panels, const QueryTile& tile,
                          bool causal, int64_t k0) {
  const int64_t kb = k0 / kBlockK;
  if (panels.seg_max[kb] < tile.seg_min || panels.seg_min[kb] > tile.seg_max) {
    return Visibility::kNone;
  }
  const bool one_segment = tile.seg_min == tile.seg_max && panels.seg_min[kb] == tile.seg_min &&
                           panels.seg_max[kb] == tile.seg_min;
  const bool below_diagonal = !causal || k0 + kBlockK - 1 <= tile.q0;
  return one_segment && below_diagonal && tile.rows == kBlockQ && k0 + kBlockK <= d.s
             ? Visibility::kAll
             : Visibility::kSome;
}

// Scores of keys a query does not see (and of padding rows and columns) become -inf. Returns
// whether any key is visible.
bool MaskTile(const Dims& d, const HeadPanels& panels, const QueryTile& tile, bool causal,
              int64_t k0, float* scores) {
  static const VecI kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const Vec hidden = Splat(-kInf);
  const VecI* key_seg = reinterpret_cast<const VecI*>(panels.KeySegments() + k0);
  bool any = false;
  for (int64_t i = 0; i < kBlockQ; ++i) {
    Vec* row = reinterpret_cast<Vec*>(scores + i * kBlockK);
    if (i >= tile.rows) {
      for (int64_t u = 0; u < kBlockK / kLanes; ++u) row[u] = hidden;
      continue;
    }
    const int32_t query_seg = tile.seg_row[tile.q0 + i];
    const int32_t last = static_cast<int32_t>(  // The last key this query may see.
        std::min(causal ? tile.q0 + i : d.s - 1, d.s - 1));
    VecI seen = VecI{};
    for (int64_t u = 0; u < kBlockK / kLanes; ++u) {
      const VecI position = kIota + static_cast<int32_t>(k0 + u * kLanes);
      const VecI visible = (key_seg[u] == query_seg) & (position <= last);
      row[u] = visible ? row[u] : hidden;
      seen |= visible;
    }
    for (int64_t l = 0; l < kLanes; ++l) any |= seen[l] != 0;
  }
  return any;
}

void ForwardHead(const Dims& d, const Operands& x, float scale, bool causal, float* out,
                 float* lse, int64_t b, int64_t n) {
  HeadPanels panels(d, x, b, n, /*backward=*/false);
  const int32_t* seg_row = x.seg + b * d.l;
  Buffer qt(kBlockQ * d.hp), acc(kBlockQ * d.vp), scores(kBlockQ * kBlockK);
  float m[kBlockQ], l[kBlockQ];
  for (int64_t q0 = 0; q0 < d.t; q0 += kBlockQ) {
    const QueryTile tile(d, seg_row, q0);
    LoadQueries(d, x, b, n, q0, tile.rows, qt.data);
    for (int64_t i = 0; i < kBlockQ * d.hp; ++i) qt.data[i] *= scale;
    std::memset(acc.data, 0, kBlockQ * d.vp * sizeof(float));
    for (int64_t i = 0; i < kBlockQ; ++i) {
      m[i] = -kInf;
      l[i] = 0.0f;
    }
    const int64_t key_end = causal ? std::min(q0 + tile.rows, d.s) : d.s;
    for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
      const Visibility visibility = TileVisibility(d, panels, tile, causal, k0);
      if (visibility == Visibility::kNone) continue;
      float* sc = scores.data;
      TileScores(qt.data, d.hp, d.h, panels.kt.data + k0, d.sp, sc);
      if (visibility == Visibility::kSome && !MaskTile(d, panels, tile, causal, k0, sc)) continue;
      for (int64_t i = 0; i < kBlockQ; ++i) {
        Vec* row = reinterpret_cast<Vec*>(sc + i * kBlockK);
        Vec top = (row[0] > row[1] ? row[0] : row[1]);
        top = top > row[2] ? top : row[2];
        top = top > row[3] ? top : row[3];
        const float mx = std::max(m[i], MaxLanes(top));
        if (mx == -kInf) {  // Nothing visible to this row yet (or a padding row).
          for (int64_t u = 0; u < 4; ++u) row[u] = Splat(0.0f);
          continue;
        }
        Vec sum = Splat(0.0f);
        for (int64_t u = 0; u < 4; ++u) {
          row[u] = Exp(row[u] - mx);
          sum += row[u];
        }
        const float correction = Exp(m[i] - mx);  // 0 when m[i] is -inf.
        l[i] = l[i] * correction + SumLanes(sum);
        m[i] = mx;
        if (correction != 1.0f) {
          float* a = acc.data + i * d.vp;
          for (int64_t c = 0; c < d.vp; ++c) a[c] *= correction;
        }
      }
      TileAccumulate(sc, kBlockK, 1, kBlockK, panels.vr.data + k0 * d.vp, d.vp, d.vp, acc.data,
                     d.vp, kBlockQ);
    }
    for (int64_t i = 0; i < tile.rows; ++i) {
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      float* o = out + ((b * d.t + q0 + i) * d.n + n) * d.v;
      for (int64_t c = 0; c < d.v; ++c) o[c] = acc.data[i * d.vp + c] * inv;
      lse[(b * d.n + n) * d.t + q0 + i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kInf;
    }
  }
}

// Gradients of both query parts, both key parts (the rotary keys' per head: [B, S, N, hr], summed
// over heads by the caller when they are shared) and the values.
struct Gradients {
  float *q_nope, *q_rope, *k_nope, *k_rope, *v;
};

void BackwardHead(const Dims& d, const Operands& x, float scale, bool causal, const float* out,
                  const float* lse, const float* dout, const Gradients& g, int64_t b, int64_t n) {
  HeadPanels panels(d, x, b, n, /*backward=*/true);
  const int32_t* seg_row = x.seg + b * d.l;
  Buffer dk_acc(d.sp * d.hp), dv_acc(d.sp * d.vp);
  Buffer qt(kBlockQ * d.hp), dot(kBlockQ * d.vp), ot(kBlockQ * d.vp), dq_acc(kBlockQ * d.hp);
  Buffer probs(kBlockQ * kBlockK), dscores(kBlockQ * kBlockK);
  float row_lse[kBlockQ], delta[kBlockQ];
  for (int64_t q0 = 0; q0 < d.t; q0 += kBlockQ) {
    const QueryTile tile(d, seg_row, q0);
    LoadQueries(d, x, b, n, q0, tile.rows, qt.data);
    LoadRows(dout, d, d.v, b, n, q0, tile.rows, d.vp, dot.data);
    LoadRows(out, d, d.v, b, n, q0, tile.rows, d.vp, ot.data);
    std::memset(dq_acc.data, 0, kBlockQ * d.hp * sizeof(float));
    for (int64_t i = 0; i < kBlockQ; ++i) {
      row_lse[i] = i < tile.rows ? lse[(b * d.n + n) * d.t + q0 + i] : kInf;
      float s = 0.0f;  // delta = sum_s p * dp = dout . out.
      for (int64_t c = 0; c < d.vp; ++c) s += dot.data[i * d.vp + c] * ot.data[i * d.vp + c];
      delta[i] = s;
    }
    const int64_t key_end = causal ? std::min(q0 + tile.rows, d.s) : d.s;
    for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
      const Visibility visibility = TileVisibility(d, panels, tile, causal, k0);
      if (visibility == Visibility::kNone) continue;
      float* p = probs.data;
      TileScores(qt.data, d.hp, d.h, panels.kt.data + k0, d.sp, p);
      if (visibility == Visibility::kSome && !MaskTile(d, panels, tile, causal, k0, p)) continue;
      for (int64_t i = 0; i < kBlockQ; ++i) {  // P = exp(s * scale - lse); 0 where hidden.
        Vec* row = reinterpret_cast<Vec*>(p + i * kBlockK);
        for (int64_t u = 0; u < 4; ++u) row[u] = Exp(row[u] * scale - row_lse[i]);
      }
      // dV[keys] += P^T dO.
      TileAccumulate(p, 1, kBlockK, kBlockQ, dot.data, d.vp, d.vp, dv_acc.data + k0 * d.vp, d.vp,
                     kBlockK);
      // dS = P * (dO V^T - delta) * scale.
      float* ds = dscores.data;
      TileScores(dot.data, d.vp, d.v, panels.vt.data + k0, d.sp, ds);
      for (int64_t i = 0; i < kBlockQ; ++i) {
        Vec* ds_row = reinterpret_cast<Vec*>(ds + i * kBlockK);
        const Vec* p_row = reinterpret_cast<const Vec*>(p + i * kBlockK);
        for (int64_t u = 0; u < 4; ++u) ds_row[u] = p_row[u] * (ds_row[u] - delta[i]) * scale;
      }
      // dQ += dS K; dK[keys] += dS^T Q.
      TileAccumulate(ds, kBlockK, 1, kBlockK, panels.kr.data + k0 * d.hp, d.hp, d.hp, dq_acc.data,
                     d.hp, kBlockQ);
      TileAccumulate(ds, 1, kBlockK, kBlockQ, qt.data, d.hp, d.hp, dk_acc.data + k0 * d.hp, d.hp,
                     kBlockK);
    }
    for (int64_t i = 0; i < tile.rows; ++i) {
      const int64_t row = (b * d.t + q0 + i) * d.n + n;
      std::memcpy(g.q_nope + row * d.hn, dq_acc.data + i * d.hp, d.hn * sizeof(float));
      if (d.hr) std::memcpy(g.q_rope + row * d.hr, dq_acc.data + i * d.hp + d.hn, d.hr * sizeof(float));
    }
  }
  for (int64_t s = 0; s < d.s; ++s) {
    const int64_t row = (b * d.s + s) * d.n + n;
    std::memcpy(g.k_nope + row * d.hn, dk_acc.data + s * d.hp, d.hn * sizeof(float));
    if (d.hr) std::memcpy(g.k_rope + row * d.hr, dk_acc.data + s * d.hp + d.hn, d.hr * sizeof(float));
    std::memcpy(g.v + row * d.v, dv_acc.data + s * d.vp, d.v * sizeof(float));
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                   ffi::Buffer<ffi::F32> q_rope, ffi::Buffer<ffi::F32> k_nope,
                   ffi::Buffer<ffi::F32> k_rope, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, float scale, int32_t causal,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  Operands x;
  if (ffi::Error error = CheckDims(q_nope, q_rope, k_nope, k_rope, v, seg, d, x);
      error.failure()) {
    return error;
  }
  float* o = out->typed_data();
  float* l = lse->typed_data();
  ParallelFor(pool, d.b * d.n, [&](int64_t task) {
    ForwardHead(d, x, scale, causal != 0, o, l, task / d.n, task % d.n);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                    ffi::Buffer<ffi::F32> q_rope, ffi::Buffer<ffi::F32> k_nope,
                    ffi::Buffer<ffi::F32> k_rope, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    int32_t causal, ffi::ResultBuffer<ffi::F32> dq_nope,
                    ffi::ResultBuffer<ffi::F32> dq_rope, ffi::ResultBuffer<ffi::F32> dk_nope,
                    ffi::ResultBuffer<ffi::F32> dk_rope, ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  Operands x;
  if (ffi::Error error = CheckDims(q_nope, q_rope, k_nope, k_rope, v, seg, d, x);
      error.failure()) {
    return error;
  }
  const Gradients g{dq_nope->typed_data(), dq_rope->typed_data(), dk_nope->typed_data(),
                    dk_rope->typed_data(), dv->typed_data()};
  ParallelFor(pool, d.b * d.n, [&](int64_t task) {
    BackwardHead(d, x, scale, causal != 0, out.typed_data(), lse.typed_data(), dout.typed_data(),
                 g, task / d.n, task % d.n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_nope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_nope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_rope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment ids
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_nope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_nope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_rope
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_nope
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_rope
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk_nope
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk_rope, per head
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
