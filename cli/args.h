#pragma once
// A small command-line parser: `--flag value`, `--flag=value` and boolean `--flag`. Every flag
// a subcommand accepts is declared with its help text; anything else is an error naming it.
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace q35::cli {

struct FlagSpec {
  std::string name;         // without the leading "--"
  std::string value_name;   // empty: a boolean flag
  std::string help;
};

class Args {
 public:
  // Parses argv[first..argc). Throws q35::Error on an unknown flag, a missing value, a repeated
  // flag or a positional argument.
  Args(std::string command, std::vector<FlagSpec> specs, int argc, char** argv, int first);

  bool help() const { return help_; }
  const std::string& command() const { return command_; }
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  std::optional<std::string> get(const std::string& name) const;
  std::string require(const std::string& name) const;  // Error "q35jit run: --model is required"
  int64_t get_int(const std::string& name, int64_t fallback, int64_t min, int64_t max) const;
  double get_double(const std::string& name, double fallback) const;
  bool flag(const std::string& name) const { return has(name); }
  std::string usage() const;

 private:
  std::string command_;
  std::vector<FlagSpec> specs_;
  std::map<std::string, std::string> values_;
  bool help_ = false;
};

}  // namespace q35::cli
