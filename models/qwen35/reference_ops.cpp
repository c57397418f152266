// Plain fp32 CPU reference ops; see reference_ops.h. The formulas follow Hugging Face's
// modeling_qwen3_5_moe.py line by line (same order of multiplies where it is cheap to keep).
#include "models/qwen35/reference_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <numeric>
#include <thread>
#include <vector>

#include "runtime/core/error.h"

namespace q35::qwen35::ref {
namespace {

void check_size(size_t found, int64_t expected, const char* op, const char* arg) {
  if (int64_t(found) < expected) fail("ref::{}: {} has {} elements, expected at least {}", op, arg, found, expected);
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float silu(float x) { return x / (1.0f + std::exp(-x)); }  // torch's CPU silu

// Dot product with 8 independent partial sums, so the compiler can keep them in vector lanes.
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Four dot products sharing one W row: y[m] = x[m] . w for m < 4 (x rows are K apart).
void dot4(const float* x, const float* w, int64_t K, float* y, int64_t y_stride) {
  float acc[4][8] = {};
  int64_t i = 0;
  for (; i + 8 <= K; i += 8)
    for (int m = 0; m < 4; ++m)
      for (int l = 0; l < 8; ++l) acc[m][l] += x[m * K + i + l] * w[i + l];
  for (int m = 0; m < 4; ++m) {
    float tail = 0.0f;
    for (int64_t j = i; j < K; ++j) tail += x[m * K + j] * w[j];
    const float* a = acc[m];
    y[m * y_stride] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + tail;
  }
}

// y[:, n0:n1] of y[M, N] = x[M, K] . W[N, K]^T, in blocks of 16 W rows that stay in cache
// while every x row passes over them.
void matmul_columns(const float* x, const float* W, float* y, int64_t M, int64_t N, int64_t K,
                    int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 16) {
    int64_t ne = std::min(n1, nb + 16);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      for (int64_t n = nb; n < ne; ++n) dot4(x + m * K, W + n * K, K, y + m * N + n, N);
    for (; m < M; ++m)
      for (int64_t n = nb; n < ne; ++n) y[m * N + n] = dot(x + m * K, W + n * K, K);
  }
}

// Below this many multiply-adds a matmul runs on the calling thread (a thread start costs ~20 us).
constexpr int64_t kMinParallelWork = int64_t(1) << 20;

// y[rows, n] = x * rsqrt(mean(x^2) + eps) * scale(i), scale(i) = (1 + w[i]) or w[i].
void rmsnorm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps,
                  bool zero_centred) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float inv = 1.0f / std::sqrt(dot(xr, xr, n) / float(n) + eps);
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * (zero_centred ? 1.0f + w[i] : w[i]);
  }
}

}  // namespace

void embedding(std::span<const float> table, int64_t vocab, int64_t H,
               std::span<const int32_t> tokens, std::span<float> out) {
  check_size(table.size(), vocab * H, "embedding", "table");
  check_size(out.size(), int64_t(tokens.size()) * H, "embedding", "out");
  for (size_t t = 0; t < tokens.size(); ++t) {
    int32_t id = tokens[t];
    if (id < 0 || id >= vocab) fail("token id {} at index {} is outside the vocabulary [0, {})", id, t, vocab);
    std::copy_n(table.data() + int64_t(id) * H, H, out.data() + int64_t(t) * H);
  }
}

void rmsnorm(std::span<const float> x, std::span<const float> w, std::span<float> y, int64_t rows,
             int64_t n, float eps) {
  check_size(x.size(), rows * n, "rmsnorm", "x");
  check_size(w.size(), n, "rmsnorm", "w");
  check_size(y.size(), rows * n, "rmsnorm", "y");
  rmsnorm_rows(x.data(), w.data(), y.data(), rows, n, eps, true);
}

void add_rmsnorm(std::span<float> residual, std::span<const float> delta, std::span<const float> w,
                 std::span<float> y, int64_t rows, int64_t n, float eps) {
  check_size(residual.size(), rows * n, "add_rmsnorm", "residual");
  check_size(delta.size(), rows * n, "add_rmsnorm", "delta");
  for (int64_t i = 0; i < rows * n; ++i) residual[i] += delta[i];
  rmsnorm(residual, w, y, rows, n, eps);
}

void gated_rmsnorm(std::span<const float> x, std::span<const float> z, std::span<const float> w,
                   std::span<float> y, int64_t rows, int64_t n, float eps) {
  check_size(x.size(), rows * n, "gated_rmsnorm", "x");
  check_size(z.size(), rows * n, "gated_rmsnorm", "z");
  check_size(w.size(), n, "gated_rmsnorm", "w");
  check_size(y.size(), rows * n, "gated_rmsnorm", "y");
  rmsnorm_rows(x.data(), w.data(), y.data(), rows, n, eps, false);
  for (int64_t i = 0; i < rows * n; ++i) y[i] *= silu(z[i]);
}

void matmul(std::span<const float> x, std::span<const float> W, std::span<float> y, int64_t M,
            int64_t N, int64_t K) {
  check_size(x.size(), M * K, "matmul", "x");
  check_size(W.size(), N * K, "matmul", "W");
  check_size(y.size(), M * N, "matmul", "y");
  int64_t threads = std::min<int64_t>(std::max(1u, std::thread::hardware_concurrency()), N);
  if (M * N * K < kMinParallelWork) threads = 1;
  if (threads == 1) {
    matmul_columns(x.data(), W.data(), y.data(), M, N, K, 0, N);
    return;
  }
  std::vector<std::jthread> pool;
  int64_t per = (N + threads - 1) / threads;
  for (int64_t i = 1; i < threads; ++i) {
    int64_t n0 = i * per, n1 = std::min(N, n0 + per);
    if (n0 < n1) pool.emplace_back(matmul_columns, x.data(), W.data(), y.data(), M, N, K, n0, n1);
  }
  matmul_columns(x.data(), W.data(), y.data(), M, N, K, 0, std::min(N, per));
}

void qk_norm_rope(std::span<float> x, std::span<const float> w, int64_t T, int64_t heads,
                  int64_t head_dim, int64_t rotary_dim, double theta, int64_t pos0, float eps) {
  check_size(x.size(), T * heads * head_dim, "qk_norm_rope", "x");
  check_size(w.size(), head_dim, "qk_norm_rope", "w");
  if (rotary_dim % 2 != 0 || rotary_dim > head_dim)
    fail("ref::qk_norm_rope: rotary_dim {} must be even and <= head_dim {}", rotary_dim, head_dim);
  rmsnorm(x, w, x, T * heads, head_dim, eps);
  // As HF: inv_freq = 1 / theta^(2j/r) and the angle p * inv_freq, both in fp32.
  int64_t half = rotary_dim / 2;
  std::vector<float> inv_freq(half);  // [r/2]
  for (int64_t j = 0; j < half; ++j)
    inv_freq[j] = 1.0f / std::pow(float(theta), float(2 * j) / float(rotary_dim));
  std::vector<float> cos_a(half), sin_a(half);  // [r/2]
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < half; ++j) {
      float a = float(pos0 + t) * inv_freq[j];
      cos_a[j] = std::cos(a);
      sin_a[j] = std::sin(a);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x.data() + (t * heads + h) * head_dim;
      for (int64_t j = 0; j < half; ++j) {
        float x1 = xh[j], x2 = xh[j + half];
        xh[j] = x1 * cos_a[j] - x2 * sin_a[j];
        xh[j + half] = x2 * cos_a[j] + x1 * sin_a[j];
      }
    }
  }
}

void attention(std::span<const float> q, std::span<const float> k_cache,
               std::span<const float> v_cache, std::span<const float> gate, std::span<float> out,
               int64_t T, int64_t pos0, int64_t Hq, int64_t Hkv, int64_t D, float scale) {
  check_size(q.size(), T * Hq * D, "attention", "q");
  check_size(k_cache.size(), (pos0 + T) * Hkv * D, "attention", "k_cache");
  check_size(v_cache.size(), (pos0 + T) * Hkv * D, "attention", "v_cache");
  if (!gate.empty()) check_size(gate.size(), T * Hq * D, "attention", "gate");
  check_size(out.size(), T * Hq * D, "attention", "out");
  if (Hkv <= 0 || Hq % Hkv != 0) fail("ref::attention: {} query heads are not a multiple of {} kv heads", Hq, Hkv);
  int64_t group = Hq / Hkv;
  std::vector<float> p(pos0 + T);  // [keys]
  for (int64_t t = 0; t < T; ++t) {
    int64_t keys = pos0 + t + 1;  // causal: positions 0 .. pos0+t
    for (int64_t h = 0; h < Hq; ++h) {
      const float* qh = q.data() + (t * Hq + h) * D;
      int64_t kvh = h / group;
      float mx = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = dot(qh, k_cache.data() + (j * Hkv + kvh) * D, D) * scale;
        mx = std::max(mx, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      float* oh = out.data() + (t * Hq + h) * D;
      std::fill_n(oh, D, 0.0f);
      for (int64_t j = 0; j < keys; ++j) {
        float pj = p[j] / sum;
        const float* vj = v_cache.data() + (j * Hkv + kvh) * D;
        for (int64_t d = 0; d < D; ++d) oh[d] += pj * vj[d];
      }
      if (!gate.empty()) {
        const float* gh = gate.data() + (t * Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) oh[d] *= sigmoid(gh[d]);
      }
    }
  }
}

void conv1d_causal(std::span<const float> x, std::span<float> state, std::span<const float> w,
                   std::span<float> y, int64_t T, int64_t C, int64_t K) {
  check_size(x.size(), T * C, "conv1d_causal", "x");
  check_size(state.size(), C * (K - 1), "conv1d_causal", "state");
  check_size(w.size(), C * K, "conv1d_causal", "w");
  check_size(y.size(), T * C, "conv1d_causal", "y");
  std::vector<float> xx(K - 1 + T);  // [K-1+T] one channel of (state ++ x)
  for (int64_t c = 0; c < C; ++c) {
    float* st = state.data() + c * (K - 1);
    const float* wc = w.data() + c * K;
    std::copy_n(st, K - 1, xx.data());
    for (int64_t t = 0; t < T; ++t) xx[K - 1 + t] = x[t * C + c];
    for (int64_t t = 0; t < T; ++t) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += wc[k] * xx[t + k];
      y[t * C + c] = silu(acc);
    }
    std::copy_n(xx.data() + T, K - 1, st);
  }
}

void l2norm(std::span<float> x, int64_t rows, int64_t n, float eps, float scale) {
  check_size(x.size(), rows * n, "l2norm", "x");
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x.data() + r * n;
    float inv = 1.0f / std::sqrt(dot(xr, xr, n) + eps);
    for (int64_t i = 0; i < n; ++i) xr[i] = xr[i] * inv * scale;
  }
}

void gdn_gates(std::span<const float> a, std::span<const float> b, std::span<const float> A_log,
               std::span<const float> dt_bias, std::span<float> g, std::span<float> beta, int64_t T,
               int64_t Hv) {
  check_size(a.size(), T * Hv, "gdn_gates", "a");
  check_size(b.size(), T * Hv, "gdn_gates", "b");
  check_size(A_log.size(), Hv, "gdn_gates", "A_log");
  check_size(dt_bias.size(), Hv, "gdn_gates", "dt_bias");
  check_size(g.size(), T * Hv, "gdn_gates", "g");
  check_size(beta.size(), T * Hv, "gdn_gates", "beta");
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hv; ++h) {
      int64_t i = t * Hv + h;
      float s = a[i] + dt_bias[h];
      float softplus = s > 20.0f ? s : std::log1p(std::exp(s));
      g[i] = -std::exp(A_log[h]) * softplus;
      beta[i] = sigmoid(b[i]);
    }
}

namespace {
void check_gdn_args(const char* op, std::span<const float> q, std::span<const float> k,
                    std::span<const float> v, std::span<const float> g, std::span<const float> beta,
                    std::span<float> state, std::span<float> out, int64_t T, int64_t Hk, int64_t Hv,
                    int64_t dk, int64_t dv) {
  check_size(q.size(), T * Hk * dk, op, "q");
  check_size(k.size(), T * Hk * dk, op, "k");
  check_size(v.size(), T * Hv * dv, op, "v");
  check_size(g.size(), T * Hv, op, "g");
  check_size(beta.size(), T * Hv, op, "beta");
  check_size(state.size(), Hv * dk * dv, op, "state");
  check_size(out.size(), T * Hv * dv, op, "out");
  if (Hk <= 0 || Hv % Hk != 0) fail("ref::{}: {} value heads are not a multiple of {} key heads", op, Hv, Hk);
}
}  // namespace

void gdn_recurrent(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                   std::span<const float> g, std::span<const float> beta, std::span<float> state,
                   std::span<float> out, int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv) {
  check_gdn_args("gdn_recurrent", q, k, v, g, beta, state, out, T, Hk, Hv, dk, dv);
  int64_t per_key = Hv / Hk;
  std::vector<float> u(dv);  // [dv] S^T k, then delta
  for (int64_t j = 0; j < Hv; ++j) {
    float* S = state.data() + j * dk * dv;  // [dk, dv]
    for (int64_t t = 0; t < T; ++t) {
      const float* qt = q.data() + (t * Hk + j / per_key) * dk;
      const float* kt = k.data() + (t * Hk + j / per_key) * dk;
      const float* vt = v.data() + (t * Hv + j) * dv;
      float decay = std::exp(g[t * Hv + j]), bt = beta[t * Hv + j];
      for (int64_t i = 0; i < dk * dv; ++i) S[i] *= decay;
      std::fill(u.begin(), u.end(), 0.0f);
      for (int64_t a = 0; a < dk; ++a)
        for (int64_t c = 0; c < dv; ++c) u[c] += S[a * dv + c] * kt[a];
      for (int64_t c = 0; c < dv; ++c) u[c] = (vt[c] - u[c]) * bt;
      for (int64_t a = 0; a < dk; ++a)
        for (int64_t c = 0; c < dv; ++c) S[a * dv + c] += kt[a] * u[c];
      float* ot = out.data() + (t * Hv + j) * dv;
      std::fill_n(ot, dv, 0.0f);
      for (int64_t a = 0; a < dk; ++a)
        for (int64_t c = 0; c < dv; ++c) ot[c] += S[a * dv + c] * qt[a];
    }
  }
}

// Per value head and chunk of L <= 64 tokens (gam = inclusive cumsum of g in the chunk):
//   A[i,j]  = (beta_i k_i . k_j) exp(gam_i - gam_j), j < i        (the "UT system")
//   U  = (I + A)^-1 (beta v),   Wd = (I + A)^-1 (beta k exp(gam))  (forward substitution)
//   Vn = U - Wd S
//   O  = (q exp(gam)) S + [(q_i . k_j) exp(gam_i - gam_j)]_{j<=i} Vn
//   S  = exp(gam_last) S + (k exp(gam_last - gam))^T Vn
// HF pads T to a multiple of 64 with zeros (g = beta = k = v = 0); the padded rows add exact
// zeros to every real row and to S, so a short last chunk computes the same numbers.
void gdn_chunked(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                 std::span<const float> g, std::span<const float> beta, std::span<float> state,
                 std::span<float> out, int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv) {
  check_gdn_args("gdn_chunked", q, k, v, g, beta, state, out, T, Hk, Hv, dk, dv);
  constexpr int64_t C = kGdnChunk;
  int64_t per_key = Hv / Hk;
  std::vector<float> gam(C), A(C * C), QK(C * C);        // [C], [C, C], [C, C]
  std::vector<float> U(C * dv), Wd(C * dk), Vn(C * dv);  // [C, dv], [C, dk], [C, dv]
  std::vector<float> kd(dk);                             // [dk] one decayed key row
  for (int64_t j = 0; j < Hv; ++j) {
    float* S = state.data() + j * dk * dv;  // [dk, dv]
    int64_t kh = j / per_key;
    for (int64_t t0 = 0; t0 < T; t0 += C) {
      int64_t L = std::min(C, T - t0);
      auto q_row = [&](int64_t i) { return q.data() + ((t0 + i) * Hk + kh) * dk; };
      auto k_row = [&](int64_t i) { return k.data() + ((t0 + i) * Hk + kh) * dk; };
      auto v_row = [&](int64_t i) { return v.data() + ((t0 + i) * Hv + j) * dv; };
      auto beta_at = [&](int64_t i) { return beta[(t0 + i) * Hv + j]; };
      double cum = 0.0;  // torch's CPU cumsum accumulates fp32 in double
      for (int64_t i = 0; i < L; ++i) {
        cum += g[(t0 + i) * Hv + j];
        gam[i] = float(cum);
      }
      for (int64_t i = 0; i < L; ++i)
        for (int64_t m = 0; m <= i; ++m) {
          float decay = std::exp(gam[i] - gam[m]);
          float kk = 0.0f;  // (beta_i k_i) . k_m, as HF forms k_beta first
          const float* ki = k_row(i);
          const float* km = k_row(m);
          for (int64_t a = 0; a < dk; ++a) kk += (ki[a] * beta_at(i)) * km[a];
          A[i * C + m] = kk * decay;
          QK[i * C + m] = dot(q_row(i), km, dk) * decay;
        }
      for (int64_t i = 0; i < L; ++i) {
        float* Ui = U.data() + i * dv;
        float* Wi = Wd.data() + i * dk;
        const float* vi = v_row(i);
        const float* ki = k_row(i);
        float eg = std::exp(gam[i]);
        for (int64_t c = 0; c < dv; ++c) Ui[c] = vi[c] * beta_at(i);
        for (int64_t a = 0; a < dk; ++a) Wi[a] = ki[a] * beta_at(i) * eg;
        for (int64_t m = 0; m < i; ++m) {
          float aim = A[i * C + m];
          for (int64_t c = 0; c < dv; ++c) Ui[c] -= aim * U[m * dv + c];
          for (int64_t a = 0; a < dk; ++a) Wi[a] -= aim * Wd[m * dk + a];
        }
      }
      for (int64_t i = 0; i < L; ++i) {
        float* Vi = Vn.data() + i * dv;
        std::copy_n(U.data() + i * dv, dv, Vi);
        for (int64_t a = 0; a < dk; ++a) {
          float w = Wd[i * dk + a];
          for (int64_t c = 0; c < dv; ++c) Vi[c] -= w * S[a * dv + c];
        }
      }
      for (int64_t i = 0; i < L; ++i) {
        float* Oi = out.data() + ((t0 + i) * Hv + j) * dv;
        const float* qi = q_row(i);
        float eg = std::exp(gam[i]);
        std::fill_n(Oi, dv, 0.0f);
        for (int64_t a = 0; a < dk; ++a) {
          float qa = qi[a] * eg;
          for (int64_t c = 0; c < dv; ++c) Oi[c] += qa * S[a * dv + c];
        }
        for (int64_t m = 0; m <= i; ++m) {
          float w = QK[i * C + m];
          for (int64_t c = 0; c < dv; ++c) Oi[c] += w * Vn[m * dv + c];
        }
      }
      float last = gam[L - 1], e_last = std::exp(last);
      for (int64_t i = 0; i < dk * dv; ++i) S[i] *= e_last;
      for (int64_t i = 0; i < L; ++i) {
        const float* ki = k_row(i);
        float decay = std::exp(last - gam[i]);
        for (int64_t a = 0; a < dk; ++a) kd[a] = ki[a] * decay;
        for (int64_t a = 0; a < dk; ++a)
          for (int64_t c = 0; c < dv; ++c) S[a * dv + c] += kd[a] * Vn[i * dv + c];
      }
    }
  }
}

namespace {

// Round to the nearest bf16 (ties to even), as cvt.rn.bf16.f32.
float bf16_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
// x -> (hi, lo) for split bf16, or (x, 0).
std::pair<float, float> split_value(float x, bool split) {
  if (!split) return {x, 0.0f};
  const float hi = bf16_round(x);
  return {hi, bf16_round(x - hi)};
}

void check_chunk_sizes(const char* op, size_t gam, size_t U, size_t W, int64_t T, int64_t Hv, int64_t dk,
                       int64_t dv) {
  const int64_t rows = (T + kGdnChunk - 1) / kGdnChunk * kGdnChunk;
  check_size(gam, rows * Hv, op, "gam");
  if (U) check_size(U, rows * Hv * dv, op, "U");
  if (W) check_size(W, rows * Hv * 2 * dk, op, "W");
}

}  // namespace

std::vector<float> unit_lower_inverse_blocked(std::span<const float> A, int64_t n) {
  check_size(A.size(), n * n, "unit_lower_inverse_blocked", "A");
  if (n % 16 != 0) fail("ref::unit_lower_inverse_blocked: n = {} is not a multiple of 16", n);
  const int64_t nb = n / 16;
  std::vector<float> T(n * n, 0.0f), X(16 * 16);
  for (int64_t b = 0; b < nb; ++b)  // diagonal blocks: x_r = [r == c] - sum_{m < r} A_rm x_m
    for (int64_t c = 0; c < 16; ++c)
      for (int64_t r = 0; r < 16; ++r) {
        float acc = r == c ? 1.0f : 0.0f;
        for (int64_t m = 0; m < r; ++m) acc -= A[(16 * b + r) * n + 16 * b + m] * T[(16 * b + m) * n + 16 * b + c];
        T[(16 * b + r) * n + 16 * b + c] = acc;
      }
  for (int64_t d = 1; d < nb; ++d)  // Tm_ij = -Tm_ii sum_{j <= k < i} A_ik Tm_kj, i - j = d
    for (int64_t jb = 0; jb + d < nb; ++jb) {
      const int64_t ib = jb + d;
      for (int64_t rr = 0; rr < 16; ++rr)
        for (int64_t cc = 0; cc < 16; ++cc) {
          float acc = 0.0f;
          for (int64_t m = 16 * jb; m < 16 * ib; ++m) acc += A[(16 * ib + rr) * n + m] * T[m * n + 16 * jb + cc];
          X[rr * 16 + cc] = acc;
        }
      for (int64_t rr = 0; rr < 16; ++rr)
        for (int64_t cc = 0; cc < 16; ++cc) {
          float acc = 0.0f;
          for (int64_t m = 0; m <= rr; ++m) acc -= T[(16 * ib + rr) * n + 16 * ib + m] * X[m * 16 + cc];
          T[(16 * ib + rr) * n + 16 * jb + cc] = acc;
        }
    }
  return T;
}

void gdn_chunk_prepare(std::span<const float> k, std::span<const float> v, std::span<const float> g,
                       std::span<const float> beta, std::span<float> gam, std::span<float> U, std::span<float> W,
                       int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, bool split_bf16) {
  constexpr int64_t L = kGdnChunk;
  check_size(k.size(), T * Hk * dk, "gdn_chunk_prepare", "k");
  check_size(v.size(), T * Hv * dv, "gdn_chunk_prepare", "v");
  check_size(g.size(), T * Hv, "gdn_chunk_prepare", "g");
  check_size(beta.size(), T * Hv, "gdn_chunk_prepare", "beta");
  check_chunk_sizes("gdn_chunk_prepare", gam.size(), U.size(), W.size(), T, Hv, dk, dv);
  if (Hk <= 0 || Hv % Hk != 0) fail("ref::gdn_chunk_prepare: {} value heads are not a multiple of {} key heads", Hv, Hk);
  const int64_t chunks = (T + L - 1) / L;
  std::vector<float> A(L * L), bet(L), kc(L * dk), vc(L * dv), Ph(L * L), Pl(L * L), Qh(L * L), Ql(L * L);
  for (int64_t n = 0; n < chunks; ++n)
    for (int64_t j = 0; j < Hv; ++j) {
      const int64_t t0 = n * L, rows = std::min(L, T - t0), kh = j / (Hv / Hk);
      float* gm = gam.data() + (n * Hv + j) * L;
      float cum = 0.0f;
      for (int64_t i = 0; i < L; ++i) {
        const bool in = i < rows;
        cum += in ? g[(t0 + i) * Hv + j] : 0.0f;
        gm[i] = cum;
        bet[i] = in ? beta[(t0 + i) * Hv + j] : 0.0f;
        for (int64_t a = 0; a < dk; ++a) kc[i * dk + a] = in ? k[((t0 + i) * Hk + kh) * dk + a] : 0.0f;
        for (int64_t c = 0; c < dv; ++c) vc[i * dv + c] = in ? v[((t0 + i) * Hv + j) * dv + c] : 0.0f;
      }
      for (int64_t i = 0; i < L; ++i)
        for (int64_t m = 0; m < L; ++m)
          A[i * L + m] = m < i ? bet[i] * dot(&kc[i * dk], &kc[m * dk], dk) * std::exp(gm[i] - gm[m]) : 0.0f;
      const std::vector<float> Tm = unit_lower_inverse_blocked(A, L);
      for (int64_t i = 0; i < L; ++i)
        for (int64_t m = 0; m < L; ++m) {
          const float u = Tm[i * L + m] * bet[m];
          std::tie(Ph[i * L + m], Pl[i * L + m]) = split_value(u, split_bf16);
          std::tie(Qh[i * L + m], Ql[i * L + m]) = split_value(u * std::exp(gm[m]), split_bf16);
        }
      float* Uo = U.data() + (n * Hv + j) * L * dv;
      float* Wo = W.data() + (n * Hv + j) * 2 * L * dk;
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t c = 0; c < dv; ++c) {
          float acc = 0.0f;
          for (int64_t m = 0; m <= i; ++m) acc += Ph[i * L + m] * vc[m * dv + c] + Pl[i * L + m] * vc[m * dv + c];
          Uo[i * dv + c] = acc;
        }
        for (int64_t a = 0; a < dk; ++a) {
          float acc = 0.0f;
          for (int64_t m = 0; m <= i; ++m) acc += Qh[i * L + m] * kc[m * dk + a] + Ql[i * L + m] * kc[m * dk + a];
          std::tie(Wo[i * dk + a], Wo[L * dk + i * dk + a]) = split_value(acc, split_bf16);
        }
      }
    }
}

void gdn_chunk_state(std::span<const float> k, std::span<const float> gam, std::span<const float> U,
                     std::span<const float> W, std::span<float> state, std::span<float> h, std::span<float> Vn,
                     int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, bool split_bf16) {
  constexpr int64_t L = kGdnChunk;
  check_size(k.size(), T * Hk * dk, "gdn_chunk_state", "k");
  check_chunk_sizes("gdn_chunk_state", gam.size(), U.size(), W.size(), T, Hv, dk, dv);
  check_size(state.size(), Hv * dk * dv, "gdn_chunk_state", "state");
  const int64_t chunks = (T + L - 1) / L;
  check_size(h.size(), chunks * Hv * 2 * dk * dv, "gdn_chunk_state", "h");
  check_size(Vn.size(), chunks * Hv * 2 * L * dv, "gdn_chunk_state", "Vn");
  if (Hk <= 0 || Hv % Hk != 0) fail("ref::gdn_chunk_state: {} value heads are not a multiple of {} key heads", Hv, Hk);
  std::vector<float> Xh(L * dv), Xl(L * dv);
  for (int64_t j = 0; j < Hv; ++j) {
    float* S = state.data() + j * dk * dv;  // [dk, dv]
    const int64_t kh = j / (Hv / Hk);
    for (int64_t n = 0; n < chunks; ++n) {
      const int64_t t0 = n * L, rows = std::min(L, T - t0);
      const float* gm = gam.data() + (n * Hv + j) * L;
      const float* Un = U.data() + (n * Hv + j) * L * dv;
      const float* Wh = W.data() + (n * Hv + j) * 2 * L * dk;
      const float* Wl = Wh + L * dk;
      float* Sh = h.data() + (n * Hv + j) * 2 * dk * dv;
      float* Sl = Sh + dk * dv;
      for (int64_t e = 0; e < dk * dv; ++e) std::tie(Sh[e], Sl[e]) = split_value(S[e], split_bf16);
      float* Vh = Vn.data() + (n * Hv + j) * 2 * L * dv;
      float* Vl = Vh + L * dv;
      const float last = gm[L - 1];
      for (int64_t i = 0; i < L; ++i) {
        const float dcy = std::exp(last - gm[i]);
        for (int64_t c = 0; c < dv; ++c) {
          float p = 0.0f;
          for (int64_t a = 0; a < dk; ++a) {
            const float wh = Wh[i * dk + a], wl = Wl[i * dk + a], sh = Sh[a * dv + c], sl = Sl[a * dv + c];
            p += wh * sh + wh * sl + wl * sh;
          }
          const float vn = Un[i * dv + c] - p;
          std::tie(Vh[i * dv + c], Vl[i * dv + c]) = split_value(vn, split_bf16);
          std::tie(Xh[i * dv + c], Xl[i * dv + c]) = split_value(dcy * vn, split_bf16);
        }
      }
      const float e_last = std::exp(last);
      for (int64_t e = 0; e < dk * dv; ++e) S[e] *= e_last;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t a = 0; a < dk; ++a) {
          const float ka = k[((t0 + i) * Hk + kh) * dk + a];
          for (int64_t c = 0; c < dv; ++c) S[a * dv + c] += ka * Xh[i * dv + c] + ka * Xl[i * dv + c];
        }
    }
  }
}

void gdn_chunk_output(std::span<const float> q, std::span<const float> k, std::span<const float> gam,
                      std::span<const float> h, std::span<const float> Vn, std::span<float> out, int64_t T,
                      int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, bool split_bf16) {
  constexpr int64_t L = kGdnChunk;
  check_size(q.size(), T * Hk * dk, "gdn_chunk_output", "q");
  check_size(k.size(), T * Hk * dk, "gdn_chunk_output", "k");
  check_chunk_sizes("gdn_chunk_output", gam.size(), 0, 0, T, Hv, dk, dv);
  const int64_t chunks = (T + L - 1) / L;
  check_size(h.size(), chunks * Hv * 2 * dk * dv, "gdn_chunk_output", "h");
  check_size(Vn.size(), chunks * Hv * 2 * L * dv, "gdn_chunk_output", "Vn");
  check_size(out.size(), T * Hv * dv, "gdn_chunk_output", "out");
  if (Hk <= 0 || Hv % Hk != 0) fail("ref::gdn_chunk_output: {} value heads are not a multiple of {} key heads", Hv, Hk);
  std::vector<float> QKh(L * L), QKl(L * L);
  for (int64_t n = 0; n < chunks; ++n)
    for (int64_t j = 0; j < Hv; ++j) {
      const int64_t t0 = n * L, rows = std::min(L, T - t0), kh = j / (Hv / Hk);
      const float* gm = gam.data() + (n * Hv + j) * L;
      const float* Sh = h.data() + (n * Hv + j) * 2 * dk * dv;
      const float* Sl = Sh + dk * dv;
      const float* Vh = Vn.data() + (n * Hv + j) * 2 * L * dv;
      const float* Vl = Vh + L * dv;
      auto q_row = [&](int64_t i) { return q.data() + ((t0 + i) * Hk + kh) * dk; };
      auto k_row = [&](int64_t i) { return k.data() + ((t0 + i) * Hk + kh) * dk; };
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t m = 0; m < rows; ++m) {
          const float x = m <= i ? dot(q_row(i), k_row(m), dk) * std::exp(gm[i] - gm[m]) : 0.0f;
          std::tie(QKh[i * L + m], QKl[i * L + m]) = split_value(x, split_bf16);
        }
      for (int64_t i = 0; i < rows; ++i) {
        const float* qi = q_row(i);
        const float eg = std::exp(gm[i]);
        float* o = out.data() + ((t0 + i) * Hv + j) * dv;
        for (int64_t c = 0; c < dv; ++c) {
          float acc = 0.0f;
          for (int64_t a = 0; a < dk; ++a) acc += qi[a] * Sh[a * dv + c] + qi[a] * Sl[a * dv + c];
          acc *= eg;
          for (int64_t m = 0; m <= i; ++m)
            acc += QKh[i * L + m] * Vh[m * dv + c] + QKh[i * L + m] * Vl[m * dv + c] + QKl[i * L + m] * Vh[m * dv + c];
          o[c] = acc;
        }
      }
    }
}

void gdn_chunked_staged(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                        std::span<const float> g, std::span<const float> beta, std::span<float> state,
                        std::span<float> out, int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv,
                        bool split_bf16) {
  check_gdn_args("gdn_chunked_staged", q, k, v, g, beta, state, out, T, Hk, Hv, dk, dv);
  const int64_t chunks = (T + kGdnChunk - 1) / kGdnChunk, rows = chunks * kGdnChunk;
  std::vector<float> gam(rows * Hv), U(rows * Hv * dv), W(rows * Hv * 2 * dk), h(chunks * Hv * 2 * dk * dv),
      Vn(rows * Hv * 2 * dv);
  gdn_chunk_prepare(k, v, g, beta, gam, U, W, T, Hk, Hv, dk, dv, split_bf16);
  gdn_chunk_state(k, gam, U, W, state, h, Vn, T, Hk, Hv, dk, dv, split_bf16);
  gdn_chunk_output(q, k, gam, h, Vn, out, T, Hk, Hv, dk, dv, split_bf16);
}

void moe_router(std::span<const float> logits, std::span<float> weights, std::span<int32_t> ids,
                int64_t T, int64_t E, int64_t top_k) {
  check_size(logits.size(), T * E, "moe_router", "logits");
  check_size(weights.size(), T * top_k, "moe_router", "weights");
  check_size(ids.size(), T * top_k, "moe_router", "ids");
  if (top_k <= 0 || top_k > E) fail("ref::moe_router: top_k {} must be in [1, {}]", top_k, E);
  std::vector<float> p(E);        // [E]
  std::vector<int32_t> order(E);  // [E]
  for (int64_t t = 0; t < T; ++t) {
    const float* lt = logits.data() + t * E;
    float mx = *std::max_element(lt, lt + E);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(lt[e] - mx);
      sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    // torch.topk on CPU leaves the order of equal values unspecified; lower index first here.
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int32_t x, int32_t y) { return p[x] > p[y] || (p[x] == p[y] && x < y); });
    float top_sum = 0.0f;
    for (int64_t i = 0; i < top_k; ++i) top_sum += p[order[i]];
    for (int64_t i = 0; i < top_k; ++i) {
      ids[t * top_k + i] = order[i];
      weights[t * top_k + i] = p[order[i]] / top_sum;
    }
  }
}

void moe_experts(std::span<const float> x, std::span<const int32_t> ids,
                 std::span<const float> weights, std::span<const float> gate_up,
                 std::span<const float> down, std::span<float> out, int64_t T, int64_t H, int64_t E,
                 int64_t I, int64_t top_k) {
  check_size(x.size(), T * H, "moe_experts", "x");
  check_size(ids.size(), T * top_k, "moe_experts", "ids");
  check_size(weights.size(), T * top_k, "moe_experts", "weights");
  check_size(gate_up.size(), E * 2 * I * H, "moe_experts", "gate_up");
  check_size(down.size(), E * H * I, "moe_experts", "down");
  check_size(out.size(), T * H, "moe_experts", "out");
  // The (token, slot) pairs of each expert, then one batched matmul per hit expert.
  std::vector<std::vector<int64_t>> pairs(E);  // [E][n_e] of t * top_k + slot
  for (int64_t i = 0; i < T * top_k; ++i) {
    int32_t e = ids[i];
    if (e < 0 || e >= E) fail("ref::moe_experts: expert id {} outside [0, {})", e, E);
    pairs[e].push_back(i);
  }
  std::fill_n(out.data(), T * H, 0.0f);
  std::vector<float> xe, gu, act, ye;
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = int64_t(pairs[e].size());
    if (n == 0) continue;
    xe.resize(n * H);       // [n, H]
    gu.resize(n * 2 * I);   // [n, 2I]
    act.resize(n * I);      // [n, I]
    ye.resize(n * H);       // [n, H]
    for (int64_t r = 0; r < n; ++r) std::copy_n(x.data() + pairs[e][r] / top_k * H, H, xe.data() + r * H);
    matmul(xe, gate_up.subspan(e * 2 * I * H, 2 * I * H), gu, n, 2 * I, H);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < I; ++i) act[r * I + i] = silu(gu[r * 2 * I + i]) * gu[r * 2 * I + I + i];
    matmul(act, down.subspan(e * H * I, H * I), ye, n, H, I);
    for (int64_t r = 0; r < n; ++r) {
      float w = weights[pairs[e][r]];
      float* ot = out.data() + pairs[e][r] / top_k * H;
      for (int64_t h = 0; h < H; ++h) ot[h] += ye[r * H + h] * w;
    }
  }
}

void shared_expert(std::span<const float> x, std::span<const float> gate, std::span<const float> up,
                   std::span<const float> down, std::span<const float> gate_w, std::span<float> out,
                   int64_t T, int64_t H, int64_t Is) {
  check_size(out.size(), T * H, "shared_expert", "out");
  std::vector<float> g(T * Is), u(T * Is), sg(T);  // [T, Is], [T, Is], [T, 1]
  matmul(x, gate, g, T, Is, H);
  matmul(x, up, u, T, Is, H);
  for (int64_t i = 0; i < T * Is; ++i) g[i] = silu(g[i]) * u[i];
  matmul(g, down, out, T, H, Is);
  matmul(x, gate_w, sg, T, 1, H);
  for (int64_t t = 0; t < T; ++t) {
    float s = sigmoid(sg[t]);
    for (int64_t h = 0; h < H; ++h) out[t * H + h] *= s;
  }
}

void lm_head(std::span<const float> x, std::span<const float> norm_w, std::span<const float> W,
             std::span<float> logits, int64_t T, int64_t H, int64_t V, float eps) {
  std::vector<float> xn(T * H);  // [T, H]
  rmsnorm(x, norm_w, xn, T, H, eps);
  matmul(xn, W, logits, T, V, H);
}

}  // namespace q35::qwen35::ref
