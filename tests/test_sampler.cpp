#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/core/sampler.h"

using namespace q35;

TEST_CASE("argmax picks the largest, lowest index on ties") {
  std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
  CHECK(argmax(l) == 1);
}

TEST_CASE("temperature 0 is greedy") {
  Sampler s({.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 7});
  std::vector<float> l = {0.1f, 0.2f, 3.0f, 0.0f};
  for (int i = 0; i < 10; ++i) CHECK(s.sample(l) == 2);
}

TEST_CASE("top-k 1 is greedy at any temperature") {
  Sampler s({.temperature = 5.0f, .top_k = 1, .top_p = 1.0f, .seed = 1});
  std::vector<float> l = {0.1f, 0.2f, 0.3f, 0.25f};
  for (int i = 0; i < 20; ++i) CHECK(s.sample(l) == 2);
}

TEST_CASE("top-k restricts the support and frequencies follow the softmax") {
  Sampler s({.temperature = 1.0f, .top_k = 2, .top_p = 1.0f, .seed = 3});
  std::vector<float> l = {0.0f, std::log(3.0f), -1.0f, 0.5f};  // top-2: ids 1 (p=3/(3+e^.5)), 3
  std::map<int, int> count;
  const int n = 20000;
  for (int i = 0; i < n; ++i) count[s.sample(l)]++;
  CHECK(count.count(0) == 0);
  CHECK(count.count(2) == 0);
  double p1 = 3.0 / (3.0 + std::exp(0.5));
  CHECK(double(count[1]) / n == doctest::Approx(p1).epsilon(0.03));
}

TEST_CASE("top-p keeps the smallest nucleus") {
  // probs ~ {0.6, 0.3, 0.1}: top_p 0.5 keeps only id 0; top_p 0.8 keeps ids 0 and 1.
  std::vector<float> l = {std::log(0.6f), std::log(0.3f), std::log(0.1f)};
  Sampler a({.temperature = 1.0f, .top_k = 0, .top_p = 0.5f, .seed = 11});
  for (int i = 0; i < 200; ++i) CHECK(a.sample(l) == 0);
  Sampler b({.temperature = 1.0f, .top_k = 0, .top_p = 0.8f, .seed = 11});
  std::map<int, int> count;
  for (int i = 0; i < 5000; ++i) count[b.sample(l)]++;
  CHECK(count.count(2) == 0);
  CHECK(double(count[0]) / 5000 == doctest::Approx(0.6 / 0.9).epsilon(0.05));
}

TEST_CASE("same seed, same sequence; other seed, other sequence") {
  std::vector<float> l(50);
  for (size_t i = 0; i < l.size(); ++i) l[i] = float(i % 7) * 0.3f;
  auto run = [&](uint64_t seed) {
    Sampler s({.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = seed});
    std::vector<int> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.sample(l));
    return out;
  };
  CHECK(run(5) == run(5));
  CHECK(run(5) != run(6));
}

TEST_CASE("bad parameters are errors naming the flag") {
  CHECK_THROWS_WITH_AS(Sampler({.temperature = 1.0f, .top_k = -1, .top_p = 1.0f, .seed = 0}),
                       doctest::Contains("--top-k"), Error);
  CHECK_THROWS_WITH_AS(Sampler({.temperature = 1.0f, .top_k = 0, .top_p = 0.0f, .seed = 0}),
                       doctest::Contains("--top-p"), Error);
}
