#pragma once
// One exception type for every user-facing failure. Messages say what was expected and
// what was found, and name the file / tensor / flag involved. main() prints e.what() on one
// line and exits non-zero; nothing below main() swallows an Error.
#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace q35 {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace q35
