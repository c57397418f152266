// The CPU reference ops against hand-computed numbers and independent naive formulations
// (double precision, written differently from the op).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "models/qwen35/reference_ops.h"
#include "runtime/core/error.h"
#include "tests/test_util.h"

namespace ref = q35::qwen35::ref;
using Vec = std::vector<float>;
using q35::test::error_of;

namespace {

Vec random_vec(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  Vec v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// max |a - b| / max |b|
double rel_err(const Vec& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / den;
}
double rel_err(const Vec& a, const Vec& b) { return rel_err(a, std::vector<double>(b.begin(), b.end())); }

double sigmoid_d(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double silu_d(double x) { return x * sigmoid_d(x); }

}  // namespace

TEST_CASE("rmsnorm: zero-centred (1 + w) scale, by hand") {
  Vec x = {1, 2, 3}, w = {0, 0, 0}, y(3);
  ref::rmsnorm(x, w, y, 1, 3, 1e-6f);
  double inv = 1.0 / std::sqrt(14.0 / 3.0 + 1e-6);  // mean(x^2) = 14/3
  CHECK(y[0] == doctest::Approx(1 * inv).epsilon(1e-6));
  CHECK(y[1] == doctest::Approx(2 * inv).epsilon(1e-6));
  CHECK(y[2] == doctest::Approx(3 * inv).epsilon(1e-6));
  CHECK(y[2] == doctest::Approx(1.3887301));

  Vec w2 = {0.5f, 0.0f, -1.0f};
  ref::rmsnorm(x, w2, y, 1, 3, 1e-6f);
  CHECK(y[0] == doctest::Approx(1.5 * inv).epsilon(1e-6));
  CHECK(y[1] == doctest::Approx(2 * inv).epsilon(1e-6));
  CHECK(y[2] == 0.0f);

  // Two rows are normalised independently; eps matters for a tiny row.
  Vec x2 = {1, 2, 3, 1e-3f, 0, 0}, y2(6);
  ref::rmsnorm(x2, w, y2, 2, 3, 1e-6f);
  CHECK(y2[0] == doctest::Approx(inv).epsilon(1e-6));
  CHECK(y2[3] == doctest::Approx(1e-3 / std::sqrt(1e-6 / 3 + 1e-6)).epsilon(1e-5));
}

TEST_CASE("add_rmsnorm: residual += delta, then normalise the sum") {
  Vec res = {0.5f, 1, 4}, delta = {0.5f, 1, -1}, w = {0, 0, 0}, y(3), expect(3);
  ref::add_rmsnorm(res, delta, w, y, 1, 3, 1e-6f);
  CHECK(res == Vec{1, 2, 3});
  ref::rmsnorm(Vec{1, 2, 3}, w, expect, 1, 3, 1e-6f);
  CHECK(y == expect);
}

TEST_CASE("gated_rmsnorm: plain weight, norm before the silu(z) gate, by hand") {
  Vec x = {3, 4}, z = {0, 1}, w = {2, 1}, y(2);
  ref::gated_rmsnorm(x, z, w, y, 1, 2, 1e-6f);
  double inv = 1.0 / std::sqrt(12.5 + 1e-6);
  CHECK(y[0] == 0.0f);  // silu(0) = 0
  CHECK(y[1] == doctest::Approx(4 * inv * 1 * silu_d(1)).epsilon(1e-6));
  // A weight of 1 is the identity scale (not 1 + w = 2).
  Vec w1 = {1, 1}, z1 = {20, 20};
  ref::gated_rmsnorm(x, z1, w1, y, 1, 2, 1e-6f);
  CHECK(y[0] == doctest::Approx(3 * inv * 20).epsilon(1e-5));
}

TEST_CASE("matmul: y = x W^T against a double loop, single- and multi-threaded sizes") {
  struct Shape { int64_t M, N, K; };
  for (Shape s : {Shape{1, 7, 5}, Shape{5, 3, 13}, Shape{9, 17, 64}, Shape{8, 300, 512}, Shape{1, 3000, 512}}) {
    CAPTURE(s.M); CAPTURE(s.N); CAPTURE(s.K);
    Vec x = random_vec(s.M * s.K, 1), W = random_vec(s.N * s.K, 2), y(s.M * s.N);
    ref::matmul(x, W, y, s.M, s.N, s.K);
    std::vector<double> expect(s.M * s.N);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t k = 0; k < s.K; ++k) expect[m * s.N + n] += double(x[m * s.K + k]) * W[n * s.K + k];
    CHECK(rel_err(y, expect) < 1e-6);
  }
  Vec x(6), W(6), y(3);
  CHECK_THROWS_AS(ref::matmul(x, W, y, 2, 2, 3), q35::Error);  // y needs 4 elements
}

TEST_CASE("embedding: copies rows, rejects ids outside the vocabulary") {
  Vec table = {0, 1, 10, 11, 20, 21};  // [3, 2]
  std::vector<int32_t> ids = {2, 0, 2};
  Vec out(6);
  ref::embedding(table, 3, 2, ids, out);
  CHECK(out == Vec{20, 21, 0, 1, 20, 21});
  std::vector<int32_t> bad = {1, 3};
  CHECK_THROWS_WITH_AS(ref::embedding(table, 3, 2, bad, out), doctest::Contains("token id 3"), q35::Error);
  std::vector<int32_t> neg = {-1};
  CHECK_THROWS_AS(ref::embedding(table, 3, 2, neg, out), q35::Error);
}

TEST_CASE("qk_norm_rope: NeoX pairs j / j + r/2 on the first rotary_dim dims only") {
  const int64_t D = 16, r = 8, half = r / 2;
  const double theta = 10000.0;
  Vec w = random_vec(D, 3, -0.3f, 0.3f);
  Vec x = random_vec(D, 4);
  for (int64_t pos : {0, 1, 7, 1000}) {
    CAPTURE(pos);
    Vec normed(D), y = x;
    ref::rmsnorm(x, w, normed, 1, D, 1e-6f);
    ref::qk_norm_rope(y, w, 1, 1, D, r, theta, pos, 1e-6f);
    for (int64_t j = 0; j < half; ++j) {
      double a = double(pos) * std::pow(theta, -2.0 * j / r);
      double y1 = normed[j] * std::cos(a) - normed[j + half] * std::sin(a);
      double y2 = normed[j + half] * std::cos(a) + normed[j] * std::sin(a);
      CHECK(y[j] == doctest::Approx(y1).epsilon(1e-4).scale(1));
      CHECK(y[j + half] == doctest::Approx(y2).epsilon(1e-4).scale(1));
    }
    for (int64_t j = r; j < D; ++j) CHECK(y[j] == normed[j]);  // pass-through
    double n0 = 0, n1 = 0;
    for (int64_t j = 0; j < r; ++j) {
      n0 += double(normed[j]) * normed[j];
      n1 += double(y[j]) * y[j];
    }
    CHECK(n1 == doctest::Approx(n0).epsilon(1e-5));  // a rotation keeps the norm
  }
  // Relative positions: <rope(q, p1), rope(k, p2)> depends only on p1 - p2.
  Vec q = random_vec(2 * D, 5), k = random_vec(2 * D, 6);  // [1, 2 heads, D]
  auto score = [&](int64_t pq, int64_t pk) {
    Vec qr = q, kr = k;
    ref::qk_norm_rope(qr, w, 1, 2, D, r, theta, pq, 1e-6f);
    ref::qk_norm_rope(kr, w, 1, 2, D, r, theta, pk, 1e-6f);
    double s = 0;
    for (int64_t j = 0; j < 2 * D; ++j) s += double(qr[j]) * kr[j];
    return s;
  };
  CHECK(score(5, 3) == doctest::Approx(score(12, 10)).epsilon(1e-5));
  CHECK(score(5, 3) != doctest::Approx(score(5, 4)).epsilon(1e-3));
  // T > 1: token t is rotated at position pos0 + t.
  Vec two = random_vec(2 * D, 7), first(two.begin(), two.begin() + D), second(two.begin() + D, two.end());
  ref::qk_norm_rope(two, w, 2, 1, D, r, theta, 40, 1e-6f);
  ref::qk_norm_rope(first, w, 1, 1, D, r, theta, 40, 1e-6f);
  ref::qk_norm_rope(second, w, 1, 1, D, r, theta, 41, 1e-6f);
  CHECK(Vec(two.begin(), two.begin() + D) == first);
  CHECK(Vec(two.begin() + D, two.end()) == second);
}

TEST_CASE("attention: causal GQA softmax over the cache with sigmoid gate, vs a direct loop") {
  const int64_t Hq = 4, Hkv = 2, D = 8, pos0 = 5, T = 3, S = pos0 + T;
  const float scale = 1.0f / std::sqrt(float(D));
  Vec q = random_vec(T * Hq * D, 10, -2, 2), kc = random_vec(S * Hkv * D, 11, -2, 2),
      vc = random_vec(S * Hkv * D, 12), gate = random_vec(T * Hq * D, 13, -3, 3), out(T * Hq * D);
  ref::attention(q, kc, vc, gate, out, T, pos0, Hq, Hkv, D, scale);
  std::vector<double> expect(T * Hq * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hq; ++h) {
      int64_t kvh = h / (Hq / Hkv);  // repeat_kv: heads 0,1 -> kv 0; 2,3 -> kv 1
      std::vector<double> s(pos0 + t + 1);
      for (int64_t j = 0; j <= pos0 + t; ++j)
        for (int64_t d = 0; d < D; ++d) s[j] += double(q[(t * Hq + h) * D + d]) * kc[(j * Hkv + kvh) * D + d] * scale;
      double mx = *std::max_element(s.begin(), s.end()), sum = 0;
      for (double& e : s) sum += (e = std::exp(e - mx));
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j <= pos0 + t; ++j) o += s[j] / sum * vc[(j * Hkv + kvh) * D + d];
        expect[(t * Hq + h) * D + d] = o * sigmoid_d(gate[(t * Hq + h) * D + d]);
      }
    }
  CHECK(rel_err(out, expect) < 1e-6);

  // One key: the output is that value (no gate: empty span).
  Vec q1 = random_vec(D, 14), k1 = random_vec(D, 15), v1 = random_vec(D, 16), o1(D);
  ref::attention(q1, k1, v1, {}, o1, 1, 0, 1, 1, D, scale);
  CHECK(rel_err(o1, v1) < 1e-7);
}

TEST_CASE("conv1d_causal: by hand, and with state == over the concatenated sequence") {
  // One channel, K = 4, w picks the input 3 steps back: y[t] = silu(x[t-3]), zeros before start.
  Vec x = {1, 2, 3, 4, 5}, w = {1, 0, 0, 0}, state = {0, 0, 0}, y(5);
  ref::conv1d_causal(x, state, w, y, 5, 1, 4);
  CHECK(y[0] == 0.0f);
  CHECK(y[2] == 0.0f);
  CHECK(y[3] == doctest::Approx(silu_d(1)));
  CHECK(y[4] == doctest::Approx(silu_d(2)));
  CHECK(state == Vec{3, 4, 5});  // the last K-1 pre-conv inputs, oldest first
  Vec wc = {0, 0, 0, 2};  // w[K-1] multiplies the current token
  Vec st2 = {0, 0, 0}, y2(5);
  ref::conv1d_causal(x, st2, wc, y2, 5, 1, 4);
  CHECK(y2[0] == doctest::Approx(silu_d(2)));

  const int64_t C = 5, K = 4, T1 = 2, T2 = 7;
  Vec xs = random_vec((T1 + T2) * C, 20), wr = random_vec(C * K, 21), st0 = random_vec(C * (K - 1), 22);
  Vec st_a = st0, y_all((T1 + T2) * C);
  ref::conv1d_causal(xs, st_a, wr, y_all, T1 + T2, C, K);
  Vec st_b = st0, y_1(T1 * C), y_2(T2 * C);
  ref::conv1d_causal(std::span<const float>(xs).first(T1 * C), st_b, wr, y_1, T1, C, K);
  ref::conv1d_causal(std::span<const float>(xs).subspan(T1 * C), st_b, wr, y_2, T2, C, K);
  Vec joined = y_1;
  joined.insert(joined.end(), y_2.begin(), y_2.end());
  CHECK(joined == y_all);
  CHECK(st_a == st_b);
  // The first output against the formula with the initial state.
  for (int64_t c = 0; c < C; ++c) {
    double acc = double(wr[c * K + 3]) * xs[c];
    for (int64_t k = 0; k < 3; ++k) acc += double(wr[c * K + k]) * st0[c * 3 + k];
    CHECK(y_all[c] == doctest::Approx(silu_d(acc)).epsilon(1e-5));
  }
}

TEST_CASE("l2norm and gdn_gates, by hand") {
  Vec x = {3, 4, 0, 0};
  ref::l2norm(x, 2, 2, 1e-6f, 0.5f);
  CHECK(x[0] == doctest::Approx(0.3).epsilon(1e-6));
  CHECK(x[1] == doctest::Approx(0.4).epsilon(1e-6));
  CHECK(x[2] == 0.0f);  // eps keeps a zero row finite

  Vec a = {0, 30, -2, 5}, b = {0, 2, -1, 0}, A_log = {0, std::log(3.0f), 0.5f, 0}, dt = {0, 0, 1, 0}, g(4), beta(4);
  ref::gdn_gates(a, b, A_log, dt, g, beta, 1, 4);
  CHECK(g[0] == doctest::Approx(-std::log(2.0)));          // -1 * softplus(0)
  CHECK(g[1] == doctest::Approx(-3.0 * 30.0));              // softplus(30) = 30 past the threshold
  CHECK(g[2] == doctest::Approx(-std::exp(0.5) * std::log1p(std::exp(-1.0))));
  CHECK(g[3] == doctest::Approx(-std::log1p(std::exp(5.0))));  // below the threshold: log(1 + e^x)
  CHECK(beta[0] == 0.5f);
  CHECK(beta[1] == doctest::Approx(sigmoid_d(2)));
  CHECK(beta[2] == doctest::Approx(sigmoid_d(-1)));
}

namespace {

struct GdnInputs {
  int64_t T = 0, Hk = 2, Hv = 4, dk = 16, dv = 8;
  Vec q, k, v, g, beta, state;
};

GdnInputs gdn_inputs(int64_t T, uint32_t seed, float g_min = -0.3f) {
  GdnInputs in;
  in.T = T;
  in.q = random_vec(T * in.Hk * in.dk, seed + 1);
  in.k = random_vec(T * in.Hk * in.dk, seed + 2);
  ref::l2norm(in.q, T * in.Hk, in.dk, 1e-6f, 1.0f / std::sqrt(float(in.dk)));
  ref::l2norm(in.k, T * in.Hk, in.dk, 1e-6f, 1.0f);
  in.v = random_vec(T * in.Hv * in.dv, seed + 3);
  in.g = random_vec(T * in.Hv, seed + 4, g_min, -0.001f);
  in.beta = random_vec(T * in.Hv, seed + 5, 0.05f, 0.95f);
  in.state = random_vec(in.Hv * in.dk * in.dv, seed + 6, -0.5f, 0.5f);
  return in;
}

// The delta rule in double, in matrix form per value head j (key head j / 2):
// S <- exp(g) S + beta k (v - exp(g) S^T k)^T, o = S^T q.
std::vector<double> gdn_naive(const GdnInputs& in, std::vector<double>& S) {
  std::vector<double> out(in.T * in.Hv * in.dv);
  for (int64_t t = 0; t < in.T; ++t)
    for (int64_t j = 0; j < in.Hv; ++j) {
      int64_t kh = j / (in.Hv / in.Hk);
      const float* q = &in.q[(t * in.Hk + kh) * in.dk];
      const float* k = &in.k[(t * in.Hk + kh) * in.dk];
      const float* v = &in.v[(t * in.Hv + j) * in.dv];
      double decay = std::exp(double(in.g[t * in.Hv + j])), b = in.beta[t * in.Hv + j];
      double* Sj = &S[j * in.dk * in.dv];
      std::vector<double> err(in.dv);
      for (int64_t c = 0; c < in.dv; ++c) {
        double pred = 0;
        for (int64_t a = 0; a < in.dk; ++a) pred += decay * Sj[a * in.dv + c] * k[a];
        err[c] = v[c] - pred;
      }
      for (int64_t a = 0; a < in.dk; ++a)
        for (int64_t c = 0; c < in.dv; ++c) Sj[a * in.dv + c] = decay * Sj[a * in.dv + c] + b * k[a] * err[c];
      for (int64_t c = 0; c < in.dv; ++c) {
        double o = 0;
        for (int64_t a = 0; a < in.dk; ++a) o += Sj[a * in.dv + c] * q[a];
        out[(t * in.Hv + j) * in.dv + c] = o;
      }
    }
  return out;
}

}  // namespace

TEST_CASE("gdn_recurrent: matches the delta rule in double, value head j reads key head j / 2") {
  GdnInputs in = gdn_inputs(20, 100);
  std::vector<double> S(in.state.begin(), in.state.end());
  std::vector<double> expect = gdn_naive(in, S);
  Vec state = in.state, out(in.T * in.Hv * in.dv);
  ref::gdn_recurrent(in.q, in.k, in.v, in.g, in.beta, state, out, in.T, in.Hk, in.Hv, in.dk, in.dv);
  CHECK(rel_err(out, expect) < 1e-5);
  CHECK(rel_err(state, S) < 1e-5);
  // Swapping key heads changes value heads 0, 1 (key head 0) only when key head 0 changes.
  GdnInputs swapped = in;
  for (int64_t t = 0; t < in.T; ++t)
    std::swap_ranges(&swapped.k[(t * 2 + 0) * in.dk], &swapped.k[(t * 2 + 0) * in.dk] + in.dk, &swapped.k[(t * 2 + 1) * in.dk]);
  Vec state2 = in.state, out2(out.size());
  ref::gdn_recurrent(swapped.q, swapped.k, swapped.v, swapped.g, swapped.beta, state2, out2, in.T, in.Hk, in.Hv, in.dk, in.dv);
  CHECK(out2 != out);
}

TEST_CASE("gdn_chunked == gdn_recurrent across chunk boundaries, with an initial state") {
  for (int64_t T : {1, 2, 63, 64, 65, 130}) {
    CAPTURE(T);
    GdnInputs in = gdn_inputs(T, 200 + uint32_t(T));
    Vec s_rec = in.state, s_chk = in.state, o_rec(T * in.Hv * in.dv), o_chk(o_rec.size());
    ref::gdn_recurrent(in.q, in.k, in.v, in.g, in.beta, s_rec, o_rec, T, in.Hk, in.Hv, in.dk, in.dv);
    ref::gdn_chunked(in.q, in.k, in.v, in.g, in.beta, s_chk, o_chk, T, in.Hk, in.Hv, in.dk, in.dv);
    CHECK(rel_err(o_chk, o_rec) < 1e-5);
    CHECK(rel_err(s_chk, s_rec) < 1e-5);
  }
  // Strong decay (exp of the in-chunk cumsum underflows in fp32, as it does in HF).
  GdnInputs strong = gdn_inputs(130, 250, -6.0f);
  Vec s_rec = strong.state, s_chk = strong.state, o_rec(130 * strong.Hv * strong.dv), o_chk(o_rec.size());
  ref::gdn_recurrent(strong.q, strong.k, strong.v, strong.g, strong.beta, s_rec, o_rec, 130, 2, 4, 16, 8);
  ref::gdn_chunked(strong.q, strong.k, strong.v, strong.g, strong.beta, s_chk, o_chk, 130, 2, 4, 16, 8);
  CHECK(rel_err(o_chk, o_rec) < 1e-5);
  CHECK(rel_err(s_chk, s_rec) < 1e-5);
  // Two calls carrying the state (70 + 60 tokens) == one call over 130.
  GdnInputs in = gdn_inputs(130, 300);
  Vec s_one = in.state, o_one(130 * in.Hv * in.dv);
  ref::gdn_chunked(in.q, in.k, in.v, in.g, in.beta, s_one, o_one, 130, in.Hk, in.Hv, in.dk, in.dv);
  Vec s_two = in.state, o_two(o_one.size());
  auto part = [&](const Vec& x, int64_t t0, int64_t n, int64_t row) {
    return std::span<const float>(x).subspan(t0 * row, n * row);
  };
  for (auto [t0, n] : {std::pair<int64_t, int64_t>{0, 70}, {70, 60}})
    ref::gdn_chunked(part(in.q, t0, n, in.Hk * in.dk), part(in.k, t0, n, in.Hk * in.dk),
                     part(in.v, t0, n, in.Hv * in.dv), part(in.g, t0, n, in.Hv), part(in.beta, t0, n, in.Hv),
                     s_two, std::span<float>(o_two).subspan(t0 * in.Hv * in.dv, n * in.Hv * in.dv), n, in.Hk,
                     in.Hv, in.dk, in.dv);
  CHECK(rel_err(o_two, o_one) < 1e-5);
  CHECK(rel_err(s_two, s_one) < 1e-5);
}

TEST_CASE("unit_lower_inverse_blocked == (I + A)^-1 by forward substitution") {
  const int64_t n = 64;
  Vec A(n * n, 0.0f);
  Vec r = random_vec(n * n, 400, -0.3f, 0.3f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t m = 0; m < i; ++m) A[i * n + m] = r[i * n + m];
  const Vec T = ref::unit_lower_inverse_blocked(A, n);
  // (I + A) T == I, in double.
  double err = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < n; ++c) {
      double acc = T[i * n + c];
      for (int64_t m = 0; m < n; ++m) acc += double(A[i * n + m]) * T[m * n + c];
      err = std::max(err, std::abs(acc - (i == c ? 1.0 : 0.0)));
    }
  CHECK(err < 1e-5);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = i + 1; c < n; ++c) CHECK(T[i * n + c] == 0.0f);
  CHECK(error_of([] { ref::unit_lower_inverse_blocked(Vec(20 * 20), 20); }).find("multiple of 16") != std::string::npos);
}

namespace {

// Runs `calls` consecutive calls (lengths in order) of the staged chunked rule over `in`, carrying the state.
void staged_calls(const GdnInputs& in, const std::vector<int64_t>& calls, bool split, Vec& state, Vec& out) {
  auto part = [&](const Vec& x, int64_t t0, int64_t n, int64_t row) {
    return std::span<const float>(x).subspan(t0 * row, n * row);
  };
  int64_t t0 = 0;
  for (int64_t n : calls) {
    ref::gdn_chunked_staged(part(in.q, t0, n, in.Hk * in.dk), part(in.k, t0, n, in.Hk * in.dk),
                            part(in.v, t0, n, in.Hv * in.dv), part(in.g, t0, n, in.Hv), part(in.beta, t0, n, in.Hv),
                            state, std::span<float>(out).subspan(t0 * in.Hv * in.dv, n * in.Hv * in.dv), n, in.Hk,
                            in.Hv, in.dk, in.dv, split);
    t0 += n;
  }
}

GdnInputs bf16_inputs(GdnInputs in) {
  auto round = [](Vec& x) {
    for (float& f : x) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
      std::memcpy(&f, &u, 4);
    }
  };
  round(in.q), round(in.k), round(in.v);
  return in;
}

}  // namespace

TEST_CASE("gdn_chunked_staged (the GPU kernels' split, fp32) == gdn_recurrent at every length, continuing") {
  for (int64_t T : {1, 2, 5, 16, 17, 63, 64, 65, 300}) {
    CAPTURE(T);
    GdnInputs in = gdn_inputs(T, 500 + uint32_t(T));
    Vec s_rec = in.state, s_chk = in.state, o_rec(T * in.Hv * in.dv), o_chk(o_rec.size());
    ref::gdn_recurrent(in.q, in.k, in.v, in.g, in.beta, s_rec, o_rec, T, in.Hk, in.Hv, in.dk, in.dv);
    staged_calls(in, {T}, false, s_chk, o_chk);
    CHECK(rel_err(o_chk, o_rec) < 1e-5);
    CHECK(rel_err(s_chk, s_rec) < 1e-5);
  }
  // Strong decay, and calls that continue a sequence (partial chunks mid-sequence, 1-token calls).
  GdnInputs strong = gdn_inputs(130, 550, -6.0f);
  Vec s_rec = strong.state, s_chk = strong.state, o_rec(130 * strong.Hv * strong.dv), o_chk(o_rec.size());
  ref::gdn_recurrent(strong.q, strong.k, strong.v, strong.g, strong.beta, s_rec, o_rec, 130, 2, 4, 16, 8);
  staged_calls(strong, {130}, false, s_chk, o_chk);
  CHECK(rel_err(o_chk, o_rec) < 1e-5);
  CHECK(rel_err(s_chk, s_rec) < 1e-5);
  GdnInputs in = gdn_inputs(300, 560);
  Vec s_one = in.state, o_one(300 * in.Hv * in.dv);
  ref::gdn_recurrent(in.q, in.k, in.v, in.g, in.beta, s_one, o_one, 300, in.Hk, in.Hv, in.dk, in.dv);
  Vec s_many = in.state, o_many(o_one.size());
  staged_calls(in, {1, 5, 63, 1, 64, 65, 1, 100}, false, s_many, o_many);
  CHECK(rel_err(o_many, o_one) < 1e-5);
  CHECK(rel_err(s_many, s_one) < 1e-5);
  // The stage references name the tensor whose size is wrong.
  Vec gam(64 * 4), U(64 * 4 * 8), W(64 * 4 * 2 * 16 + 1);
  CHECK(error_of([&] {
          ref::gdn_chunk_prepare(in.k, in.v, in.g, in.beta, gam, U, W, 300, 2, 4, 16, 8, false);
        }).find("gam") != std::string::npos);
}

TEST_CASE("split bf16 (the GPU kernels' roundings): error ~5e-6 at every length, far below bf16 rounding") {
  // The 35B head dims (128 x 128), bf16 q, k, v (as gdn_prologue writes them), a random initial
  // state (a continuing sequence) and a zero one; errors against the delta rule in double.
  for (bool from_zero : {true, false})
    for (int64_t T : {1, 2, 5, 17, 63, 64, 65, 300}) {
      CAPTURE(T);
      CAPTURE(from_zero);
      GdnInputs in;
      in.T = T, in.Hk = 1, in.Hv = 2, in.dk = 128, in.dv = 128;
      const uint32_t seed = 600 + uint32_t(T);
      in.q = random_vec(T * in.dk, seed + 1);
      in.k = random_vec(T * in.dk, seed + 2);
      ref::l2norm(in.q, T, in.dk, 1e-6f, 1.0f / std::sqrt(float(in.dk)));
      ref::l2norm(in.k, T, in.dk, 1e-6f, 1.0f);
      in.v = random_vec(T * in.Hv * in.dv, seed + 3);
      in.g = random_vec(T * in.Hv, seed + 4, -2.0f, -0.001f);
      in.beta = random_vec(T * in.Hv, seed + 5, 0.05f, 0.95f);
      in.state = from_zero ? Vec(in.Hv * in.dk * in.dv, 0.0f) : random_vec(in.Hv * in.dk * in.dv, seed + 6, -0.5f, 0.5f);
      in = bf16_inputs(in);
      std::vector<double> S(in.state.begin(), in.state.end());
      const std::vector<double> o_exact = gdn_naive(in, S);
      Vec s_rec = in.state, o_rec(T * in.Hv * in.dv), s_spl = in.state, o_spl(o_rec.size());
      ref::gdn_recurrent(in.q, in.k, in.v, in.g, in.beta, s_rec, o_rec, T, in.Hk, in.Hv, in.dk, in.dv);
      staged_calls(in, {T}, true, s_spl, o_spl);
      const double rec_o = rel_err(o_rec, o_exact), rec_s = rel_err(s_rec, S);
      const double spl_o = rel_err(o_spl, o_exact), spl_s = rel_err(s_spl, S);
      INFO("rel_l2 vs double: recurrence o ", rec_o, " S ", rec_s, "; split bf16 o ", spl_o, " S ", spl_s);
      // Measured: recurrence ~2e-7 (o) / ~6e-8 (S); split bf16 2e-6 .. 5.4e-6 at every length, not
      // growing with T (the split keeps 16 mantissa bits, 2^-17 ~ 7.6e-6 per rounding, and the decay
      // damps old errors). Both are three orders below the bf16 rounding of y (~1.6e-3) and of q, k, v.
      CHECK(rec_o < 1e-6);
      CHECK(rec_s < 1e-6);
      CHECK(spl_o < 1.5e-5);
      CHECK(spl_s < 1.5e-5);
    }
}

TEST_CASE("moe_router: softmax over all experts, top-k, renormalised") {
  // p ∝ [1, 2, 3, 4]: top-2 = experts 3, 2 with weights 4/7, 3/7.
  Vec logits = {0, std::log(2.0f), std::log(3.0f), std::log(4.0f)}, w(2);
  std::vector<int32_t> ids(2);
  ref::moe_router(logits, w, ids, 1, 4, 2);
  CHECK(ids == std::vector<int32_t>{3, 2});
  CHECK(w[0] == doctest::Approx(4.0 / 7.0));
  CHECK(w[1] == doctest::Approx(3.0 / 7.0));
  // Equal values: lower index first.
  Vec flat = {1, 1, 1, 1};
  ref::moe_router(flat, w, ids, 1, 4, 2);
  CHECK(ids == std::vector<int32_t>{0, 1});
  CHECK(w[0] == 0.5f);

  const int64_t T = 6, E = 16, K = 4;
  Vec lg = random_vec(T * E, 30, -3, 3), wk(T * K);
  std::vector<int32_t> ik(T * K);
  ref::moe_router(lg, wk, ik, T, E, K);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return lg[t * E + a] > lg[t * E + b]; });
    double sum = 0, top_exp = 0;
    for (int64_t i = 0; i < K; ++i) {
      CHECK(ik[t * K + i] == order[i]);  // softmax is monotone: the largest logits win
      sum += wk[t * K + i];
      top_exp += std::exp(double(lg[t * E + order[i]]));
    }
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(wk[t * K] == doctest::Approx(std::exp(double(lg[t * E + order[0]])) / top_exp).epsilon(1e-5));
  }
}

TEST_CASE("moe_experts and shared_expert vs a per-token loop") {
  const int64_t T = 5, H = 12, E = 6, I = 8, K = 2, Is = 10;
  Vec x = random_vec(T * H, 40), gate_up = random_vec(E * 2 * I * H, 41), down = random_vec(E * H * I, 42);
  std::vector<int32_t> ids = {0, 5, 5, 2, 3, 0, 1, 4, 2, 3};  // expert 5 twice in a row, every token mixes two
  Vec wts = random_vec(T * K, 43, 0, 1), out(T * H);
  ref::moe_experts(x, ids, wts, gate_up, down, out, T, H, E, I, K);
  std::vector<double> expect(T * H);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < K; ++s) {
      int64_t e = ids[t * K + s];
      std::vector<double> act(I);
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < H; ++h) {
          g += double(gate_up[(e * 2 * I + i) * H + h]) * x[t * H + h];
          u += double(gate_up[(e * 2 * I + I + i) * H + h]) * x[t * H + h];
        }
        act[i] = silu_d(g) * u;
      }
      for (int64_t h = 0; h < H; ++h) {
        double y = 0;
        for (int64_t i = 0; i < I; ++i) y += double(down[(e * H + h) * I + i]) * act[i];
        expect[t * H + h] += wts[t * K + s] * y;
      }
    }
  CHECK(rel_err(out, expect) < 1e-6);
  std::vector<int32_t> bad = ids;
  bad[3] = int32_t(E);
  CHECK_THROWS_AS(ref::moe_experts(x, bad, wts, gate_up, down, out, T, H, E, I, K), q35::Error);

  Vec sg = random_vec(Is * H, 44), su = random_vec(Is * H, 45), sd = random_vec(H * Is, 46), gw = random_vec(H, 47);
  Vec sout(T * H);
  ref::shared_expert(x, sg, su, sd, gw, sout, T, H, Is);
  std::vector<double> sexp(T * H);
  for (int64_t t = 0; t < T; ++t) {
    double gate = 0;
    for (int64_t h = 0; h < H; ++h) gate += double(gw[h]) * x[t * H + h];
    std::vector<double> act(Is);
    for (int64_t i = 0; i < Is; ++i) {
      double g = 0, u = 0;
      for (int64_t h = 0; h < H; ++h) {
        g += double(sg[i * H + h]) * x[t * H + h];
        u += double(su[i * H + h]) * x[t * H + h];
      }
      act[i] = silu_d(g) * u;
    }
    for (int64_t h = 0; h < H; ++h) {
      double y = 0;
      for (int64_t i = 0; i < Is; ++i) y += double(sd[h * Is + i]) * act[i];
      sexp[t * H + h] = sigmoid_d(gate) * y;
    }
  }
  CHECK(rel_err(sout, sexp) < 1e-6);
}

TEST_CASE("lm_head: final zero-centred norm, then x W^T") {
  Vec x = {1, 2, 3}, nw = {0, 1, 0}, W = {1, 0, 0, 0, 1, 0, 1, 1, 1}, logits(3);  // W [3, 3]
  ref::lm_head(x, nw, W, logits, 1, 3, 3, 1e-6f);
  double inv = 1.0 / std::sqrt(14.0 / 3.0 + 1e-6);
  CHECK(logits[0] == doctest::Approx(1 * inv));
  CHECK(logits[1] == doctest::Approx(4 * inv));  // (1 + 1) * 2
  CHECK(logits[2] == doctest::Approx(8 * inv));
}
