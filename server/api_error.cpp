#include "server/api_error.h"

namespace q35::server {

nlohmann::json ApiError::body() const {
  auto or_null = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
  return {{"error", {{"message", message_}, {"type", type_}, {"param", or_null(param_)}, {"code", or_null(code_)}}}};
}

}  // namespace q35::server
