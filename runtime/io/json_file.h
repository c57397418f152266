#pragma once
// Reads a whole JSON file. Errors name the file: a missing or unreadable file, or malformed JSON
// (with the parser's line and column).
#include <filesystem>

#include <nlohmann/json.hpp>

namespace q35 {

nlohmann::json read_json_file(const std::filesystem::path& path);

}  // namespace q35
