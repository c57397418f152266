#include "cli/args.h"

#include <charconv>
#include <cstdlib>

#include "runtime/core/error.h"

namespace q35::cli {

Args::Args(std::string command, std::vector<FlagSpec> specs, int argc, char** argv, int first)
    : command_(std::move(command)), specs_(std::move(specs)) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      help_ = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) fail("q35jit {}: unexpected argument '{}' (see q35jit {} --help)", command_, a, command_);
    std::string name = a.substr(2), value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    const FlagSpec* spec = nullptr;
    for (const auto& s : specs_)
      if (s.name == name) spec = &s;
    if (!spec) fail("q35jit {}: unknown flag --{} (see q35jit {} --help)", command_, name, command_);
    if (values_.count(name)) fail("q35jit {}: --{} given twice", command_, name);
    if (spec->value_name.empty()) {
      if (inline_value) fail("q35jit {}: --{} takes no value", command_, name);
    } else if (!inline_value) {
      if (i + 1 >= argc) fail("q35jit {}: --{} needs a value ({})", command_, name, spec->value_name);
      value = argv[++i];
    }
    values_[name] = value;
  }
}

std::optional<std::string> Args::get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::string Args::require(const std::string& name) const {
  auto v = get(name);
  if (!v) fail("q35jit {}: --{} is required (see q35jit {} --help)", command_, name, command_);
  return *v;
}

int64_t Args::get_int(const std::string& name, int64_t fallback, int64_t min, int64_t max) const {
  auto v = get(name);
  if (!v) return fallback;
  int64_t out = 0;
  auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
  if (ec != std::errc() || p != v->data() + v->size())
    fail("q35jit {}: --{} expects an integer, got '{}'", command_, name, *v);
  if (out < min || out > max) fail("q35jit {}: --{} must be in [{}, {}], got {}", command_, name, min, max, out);
  return out;
}

double Args::get_double(const std::string& name, double fallback) const {
  auto v = get(name);
  if (!v) return fallback;
  char* end = nullptr;
  double out = std::strtod(v->c_str(), &end);
  if (v->empty() || end != v->c_str() + v->size())
    fail("q35jit {}: --{} expects a number, got '{}'", command_, name, *v);
  return out;
}

std::string Args::usage() const {
  std::string out;
  for (const auto& s : specs_) {
    std::string left = "  --" + s.name + (s.value_name.empty() ? "" : " " + s.value_name);
    out += fmt::format("{:<28} {}\n", left, s.help);
  }
  out += fmt::format("{:<28} {}\n", "  -h, --help", "show this help");
  return out;
}

}  // namespace q35::cli
