#pragma once
// The OpenAI-compatible API over any transport: routes, authentication, request parsing, and the
// JSON / Server-Sent-Events responses built from a job's events. The HTTP server (http_server.h)
// gives each request a ResponseWriter; tests can give their own.
//
//   POST /v1/chat/completions   POST /v1/completions   GET /v1/models
//   GET /health   GET /metrics (Prometheus)   POST /tokenize (the prompt a request renders to)
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "server/metrics.h"
#include "server/request.h"
#include "server/scheduler.h"

namespace q35::server {

struct HttpRequest {
  std::string method, path, body;
  std::string authorization;  // the Authorization header, empty if none
};

class ResponseWriter {
 public:
  virtual ~ResponseWriter() = default;
  virtual void send(int status, std::string_view content_type, const std::string& body) = 0;
  // A 200 response of unknown length (chunked); false when the client is gone.
  virtual bool start_stream(std::string_view content_type) = 0;
  virtual bool write(std::string_view chunk) = 0;
  virtual void end_stream() = 0;
  // True once the client has closed its side (polled while a job runs).
  virtual bool client_gone() = 0;
};

class Api {
 public:
  Api(ServeContext ctx, Scheduler& scheduler, Metrics& metrics, std::string api_key,
      std::function<void(const std::string&)> log);
  // Never throws: every failure becomes an error response.
  void handle(const HttpRequest& req, ResponseWriter& out);

 private:
  void generate(const HttpRequest& req, bool chat, ResponseWriter& out, int& status);
  std::string next_id(const char* prefix);

  ServeContext ctx_;
  Scheduler& scheduler_;
  Metrics& metrics_;
  std::string api_key_;
  std::function<void(const std::string&)> log_;
  uint64_t nonce_;
  std::atomic<uint64_t> counter_{0};
  int64_t created_;
};

}  // namespace q35::server
