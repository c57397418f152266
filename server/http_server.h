#pragma once
// A small blocking HTTP/1.1 server (Boost.Beast, header-only) for the API: one thread per
// connection (keep-alive, chunked responses for streams), a bound on open connections (503 beyond
// it), a body size limit (413), and a clean stop that wakes every connection. Malformed HTTP gets
// a 400 and the connection is closed. An idle client holds its connection until it closes it.
#include <atomic>
#include <cstddef>
#include <memory>
#include <string>

#include "server/api.h"

namespace q35::server {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (see HttpServer::port)
  size_t max_body_bytes = size_t(8) << 20;
  size_t max_connections = 256;
};

class HttpServer {
 public:
  // Binds and listens (Error naming host:port if it cannot).
  HttpServer(HttpOptions options, Api& api);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;
  // Serves until `stop` becomes true, then closes every connection and joins their threads.
  void run(const std::atomic<bool>& stop);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace q35::server
