#include "server/http_server.h"

#include <poll.h>
#include <sys/socket.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

#include <list>
#include <mutex>
#include <thread>

#include "runtime/core/error.h"

namespace q35::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

class BeastWriter final : public ResponseWriter {
 public:
  BeastWriter(tcp::socket& sock, unsigned version, bool keep_alive)
      : sock_(sock), version_(version), keep_alive_(keep_alive) {}

  void send(int status, std::string_view content_type, const std::string& body) override {
    http::response<http::string_body> res{http::status(status), version_};
    res.set(http::field::server, "q35jit");
    res.set(http::field::content_type, content_type);
    res.keep_alive(keep_alive_ && status < 500 && status != 413);
    res.body() = body;
    res.prepare_payload();
    beast::error_code ec;
    http::write(sock_, res, ec);
    ok_ = !ec && res.keep_alive();
  }

  bool start_stream(std::string_view content_type) override {
    http::response<http::empty_body> res{http::status::ok, version_};
    res.set(http::field::server, "q35jit");
    res.set(http::field::content_type, content_type);
    res.set(http::field::cache_control, "no-cache");
    res.keep_alive(keep_alive_);
    res.chunked(true);
    http::response_serializer<http::empty_body> sr{res};
    beast::error_code ec;
    http::write_header(sock_, sr, ec);
    ok_ = !ec;
    return ok_;
  }

  bool write(std::string_view chunk) override {
    if (!ok_) return false;
    beast::error_code ec;
    asio::write(sock_, http::make_chunk(asio::const_buffer(chunk.data(), chunk.size())), ec);
    ok_ = !ec;
    return ok_;
  }

  void end_stream() override {
    if (!ok_) return;
    beast::error_code ec;
    asio::write(sock_, http::make_chunk_last(), ec);
    ok_ = !ec && keep_alive_;
  }

  bool client_gone() override {
    pollfd p{sock_.native_handle(), POLLRDHUP, 0};
    return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
  }

  // Whether the connection can serve another request.
  bool ok() const { return ok_; }

 private:
  tcp::socket& sock_;
  unsigned version_;
  bool keep_alive_;
  bool ok_ = true;
};

// Sends an error response and half-closes, then reads (and drops) what the client still sends for
// a moment, so that it sees the response instead of a reset.
void refuse(tcp::socket& sock, int status, const std::string& type, const std::string& message, const std::string& code,
            size_t drain_bytes) {
  BeastWriter w(sock, 11, false);
  w.send(status, "application/json", ApiError(status, type, message, "", code).body().dump());
  beast::error_code ec;
  sock.shutdown(tcp::socket::shutdown_send, ec);
  char buf[65536];
  for (size_t n = 0; n < drain_bytes;) {
    pollfd p{sock.native_handle(), POLLIN, 0};
    if (::poll(&p, 1, 2000) <= 0) break;  // quiet for 2 s
    size_t got = sock.read_some(asio::buffer(buf), ec);
    if (ec) break;
    n += got;
  }
}

}  // namespace

struct HttpServer::Impl {
  HttpOptions options;
  Api& api;
  asio::io_context io;
  tcp::acceptor acceptor{io};

  struct Connection {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
    int fd;
  };
  std::mutex mutex;
  std::list<Connection> connections;

  Impl(HttpOptions o, Api& a) : options(std::move(o)), api(a) {}

  void session(tcp::socket& sock) {
    beast::flat_buffer buffer;
    while (true) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(options.max_body_bytes);
      parser.header_limit(64 * 1024);
      beast::error_code ec;
      http::read(sock, buffer, parser, ec);
      if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset) return;
      if (ec == http::error::body_limit) {
        refuse(sock, 413, "invalid_request_error",
               fmt::format("The request body exceeds {} bytes", options.max_body_bytes), "request_too_large",
               options.max_body_bytes * 4);
        return;
      }
      if (ec) {
        refuse(sock, 400, "invalid_request_error", fmt::format("Malformed HTTP request: {}", ec.message()),
                 "bad_http", 1 << 20);
        return;
      }
      const auto& req = parser.get();
      HttpRequest r;
      r.method = std::string(req.method_string());
      std::string_view target = req.target();
      r.path = std::string(target.substr(0, target.find('?')));
      r.body = req.body();
      if (auto it = req.find(http::field::authorization); it != req.end()) r.authorization = std::string(it->value());
      BeastWriter w(sock, req.version(), req.keep_alive());
      api.handle(r, w);
      if (!w.ok()) return;
    }
  }

  void reap(bool all) {
    std::lock_guard lock(mutex);
    for (auto it = connections.begin(); it != connections.end();) {
      if (all && !*it->done) ::shutdown(it->fd, SHUT_RDWR);  // wakes its blocking read
      if (all || *it->done) {
        it->thread.join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
  }
};

HttpServer::HttpServer(HttpOptions options, Api& api) : impl_(std::make_unique<Impl>(std::move(options), api)) {
  beast::error_code ec;
  auto addr = asio::ip::make_address(impl_->options.host, ec);
  if (ec) fail("--host {}: not an IP address ({})", impl_->options.host, ec.message());
  tcp::endpoint ep(addr, uint16_t(impl_->options.port));
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) fail("cannot listen on {}:{}: {}", impl_->options.host, impl_->options.port, ec.message());
}

HttpServer::~HttpServer() { impl_->reap(true); }

int HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

void HttpServer::run(const std::atomic<bool>& stop) {
  Impl& m = *impl_;
  while (!stop) {
    pollfd p{m.acceptor.native_handle(), POLLIN, 0};
    int ready = ::poll(&p, 1, 100);
    m.reap(false);
    if (ready <= 0) continue;
    beast::error_code ec;
    tcp::socket sock(m.io);
    m.acceptor.accept(sock, ec);
    if (ec) continue;
    // Streamed tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds each one back
    // until the client acknowledges the previous one (up to its delayed-ACK timeout, ~40 ms).
    sock.set_option(tcp::no_delay(true), ec);
    std::lock_guard lock(m.mutex);
    if (m.connections.size() >= m.options.max_connections) {
      refuse(sock, 503, "server_error", "Too many open connections", "too_many_connections", 0);
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    const int fd = sock.native_handle();
    m.connections.push_back({std::thread([&m, done, s = std::move(sock)]() mutable {
                               m.session(s);
                               beast::error_code ignored;
                               s.shutdown(tcp::socket::shutdown_both, ignored);
                               s.close(ignored);
                               *done = true;
                             }),
                             done, fd});
  }
  m.reap(true);
}

}  // namespace q35::server
