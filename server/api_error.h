#pragma once
// OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP status. Every
// way a request can be refused is one of these; nothing else reaches a client.
#include <fmt/format.h>

#include <exception>
#include <string>

#include <nlohmann/json.hpp>

namespace q35::server {

class ApiError : public std::exception {
 public:
  ApiError(int status, std::string type, std::string message, std::string param = {}, std::string code = {})
      : status_(status), type_(std::move(type)), message_(std::move(message)), param_(std::move(param)),
        code_(std::move(code)) {}
  const char* what() const noexcept override { return message_.c_str(); }
  int status() const { return status_; }
  const std::string& type() const { return type_; }
  const std::string& param() const { return param_; }
  const std::string& code() const { return code_; }
  // The response body; param and code are null when empty.
  nlohmann::json body() const;

 private:
  int status_;
  std::string type_, message_, param_, code_;
};

// 400 invalid_request_error naming the field (`param`, e.g. "messages[2].content").
template <typename... Args>
[[noreturn]] void bad_request(const std::string& param, fmt::format_string<Args...> format, Args&&... args) {
  throw ApiError(400, "invalid_request_error", fmt::format(format, std::forward<Args>(args)...), param);
}

}  // namespace q35::server
