// A gRPC load generator in native code, for rates a Python client cannot offer on one core
// without its own event loop becoming the bottleneck.
//
// Sends the Recommend calls of a request file (each a 4-byte big-endian length and a serialized
// RecommendRequest, written by benchmarks/load_generator.py --write-requests) as they are, in
// turn, on several channels (one HTTP/2 connection each):
//
//   open loop   --rate R:    call n is due at start + n / R, whatever the answers;
//   closed loop --clients N: N callers, each sending its next call when the last answers.
//
// Call n sends request (first + n) modulo the file's length (--first, default 0), so that the
// phases of one run can continue along one request list. With --user-header NAME, each call
// also carries its request's user_id as metadata NAME, as clients send it for the balancers
// that route by user (recsys/serving/routing.py).
//
// Prints one JSON object: the status code and details of each kind, and for every call its
// latency: answered calls from the due time (open loop; from the send in the closed loop),
// sheds (RESOURCE_EXHAUSTED) and other codes from the actual send, and how late each send was;
// and when each call was due (or sent), answered and not, for a timeline of the run.
// benchmarks/load_generator.py turns it into the same summary as its own loops.
//
//   loadgen --target 127.0.0.1:50051 --requests REQS --seconds 10 (--rate 4000 | --clients 6)

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
const char* kMethod = "/recsys.v1.Recommender/Recommend";
const char* kCodes[] = {"OK",
                        "CANCELLED",
                        "UNKNOWN",
                        "INVALID_ARGUMENT",
                        "DEADLINE_EXCEEDED",
                        "NOT_FOUND",
                        "ALREADY_EXISTS",
                        "PERMISSION_DENIED",
                        "RESOURCE_EXHAUSTED",
                        "FAILED_PRECONDITION",
                        "ABORTED",
                        "OUT_OF_RANGE",
                        "UNIMPLEMENTED",
                        "INTERNAL",
                        "UNAVAILABLE",
                        "DATA_LOSS",
                        "UNAUTHENTICATED"};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "loadgen: " << why
            << "\nusage: loadgen --target HOST:PORT --requests FILE [--seconds S] [--channels C]"
               " [--first N] [--user-header NAME] (--rate R | --clients N)\n";
  std::exit(2);
}

struct Options {
  std::string target;
  std::string requests;
  double seconds = 10.0;
  double rate = 0.0;
  int clients = 0;
  int channels = 4;
  long first = 0;
  std::string user_header;
};

double number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || value <= 0) usage(flag + " " + text + ": expected a number > 0");
  return value;
}

long count(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 0) {
    usage(flag + " " + text + ": expected a whole number >= 0");
  }
  return value;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {
    std::string flag = argv[i];
    if (i + 1 >= argc) usage(flag + ": expected a value");
    std::string value = argv[i + 1];
    if (flag == "--target") o.target = value;
    else if (flag == "--requests") o.requests = value;
    else if (flag == "--seconds") o.seconds = number(flag, value);
    else if (flag == "--rate") o.rate = number(flag, value);
    else if (flag == "--clients") o.clients = static_cast<int>(number(flag, value));
    else if (flag == "--channels") o.channels = static_cast<int>(number(flag, value));
    else if (flag == "--first") o.first = count(flag, value);
    else if (flag == "--user-header") o.user_header = value;
    else usage("unknown flag " + flag);
  }
  if (o.target.empty() || o.requests.empty()) usage("--target and --requests are required");
  if ((o.rate > 0) == (o.clients > 0)) usage("expected one of --rate or --clients");
  return o;
}

// The user_id of a serialized RecommendRequest (field 1, length-delimited), read off the
// protobuf wire format; empty when the request has none or its bytes end early.
std::string user_id(const std::string& body) {
  size_t i = 0;
  auto varint = [&](uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64 && i < body.size(); shift += 7) {
      const auto byte = static_cast<uint8_t>(body[i++]);
      value |= uint64_t(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return true;
    }
    return false;
  };
  uint64_t key = 0, value = 0;
  while (i < body.size() && varint(key)) {
    const uint64_t field = key >> 3, type = key & 7;
    if (type == 0) {
      if (!varint(value)) break;
    } else if (type == 1 || type == 5) {
      i += type == 1 ? 8 : 4;
    } else if (type == 2) {
      if (!varint(value) || value > body.size() - i) break;
      if (field == 1) return body.substr(i, value);
      i += value;
    } else {
      break;
    }
  }
  return "";
}

// The routing header's value for a user id: its bytes percent-encoded, all but RFC 3986's
// unreserved characters, as recsys/serving/routing.py user_header_value does.
std::string header_value(const std::string& user) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : user) {
    const bool unreserved = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') ||
                            (c >= 'a' && c <= 'z') || c == '-' || c == '.' || c == '_' || c == '~';
    if (unreserved) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::vector<std::string> read_requests(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) usage("--requests " + path + ": cannot read it");
  std::vector<std::string> out;
  unsigned char head[4];
  while (in.read(reinterpret_cast<char*>(head), 4)) {
    uint32_t n = (uint32_t(head[0]) << 24) | (uint32_t(head[1]) << 16) | (uint32_t(head[2]) << 8) |
                 uint32_t(head[3]);
    std::string body(n, '\0');
    if (!in.read(body.data(), n)) usage("--requests " + path + ": truncated");
    out.push_back(std::move(body));
  }
  if (out.empty()) usage("--requests " + path + ": no requests in it");
  return out;
}

std::string json_string(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out << '\\' << c;
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out << buf;
    } else out << c;
  }
  out << '"';
  return out.str();
}

class Tally {
 public:
  // at: when the call was due (open loop) or sent (closed loop), in seconds from the start.
  void add(int code, const std::string& details, double latency, double from_send, double at) {
    std::lock_guard<std::mutex> lock(mu_);
    const char* name = code >= 0 && code < 17 ? kCodes[code] : "UNKNOWN";
    codes_[name]++;
    if (code == 0) {
      answered_.push_back(latency);
      answered_at_.push_back(at);
      return;
    }
    details_.emplace(name, details);
    (code == 8 ? shed_ : failed_).push_back(from_send);
    not_ok_at_.push_back(at);
  }
  void lag(double seconds) {
    std::lock_guard<std::mutex> lock(mu_);
    send_lag_.push_back(seconds);
  }
  std::string json() {
    std::lock_guard<std::mutex> lock(mu_);
    std::ostringstream out;
    out.precision(9);
    out << "{\"codes\":{";
    const char* sep = "";
    for (auto& [name, count] : codes_) out << sep << json_string(name) << ':' << count, sep = ",";
    out << "},\"details\":{";
    sep = "";
    for (auto& [name, text] : details_) out << sep << json_string(name) << ':' << json_string(text), sep = ",";
    out << '}';
    list(out, "answered", answered_);
    list(out, "shed", shed_);
    list(out, "failed", failed_);
    list(out, "send_lag", send_lag_);
    list(out, "answered_at", answered_at_);
    list(out, "not_ok_at", not_ok_at_);
    out << "}\n";
    return out.str();
  }

 private:
  static void list(std::ostringstream& out, const char* name, const std::vector<double>& values) {
    out << ",\"" << name << "\":[";
    for (size_t i = 0; i < values.size(); ++i) out << (i ? "," : "") << values[i];
    out << ']';
  }
  std::mutex mu_;
  std::map<std::string, long> codes_;
  std::map<std::string, std::string> details_;
  std::vector<double> answered_, shed_, failed_, send_lag_, answered_at_, not_ok_at_;
};

struct Call {
  grpc::ClientContext context;
  grpc::ByteBuffer request;
  grpc::ByteBuffer response;
};

class Generator {
 public:
  Generator(const Options& o, std::vector<std::string> requests)
      : options_(o), requests_(std::move(requests)), start_(Clock::now()) {
    if (!o.user_header.empty()) {
      for (const auto& body : requests_) users_.push_back(header_value(user_id(body)));
    }
    for (int c = 0; c < o.channels; ++c) {
      grpc::ChannelArguments args;
      args.SetInt("recsys.loadgen.channel", c);  // distinct args: a connection of its own
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      auto channel = grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args);
      if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
        std::cerr << "loadgen: --target " << o.target << ": could not connect within 10 s\n";
        std::exit(1);
      }
      stubs_.push_back(std::make_unique<grpc::GenericStub>(channel));
    }
    start_ = Clock::now();  // the schedule starts once every connection is up
  }

  double now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  // Sends call ``n``; ``done(code, now)`` runs on a gRPC thread when it ends.
  template <typename Done>
  void send(long n, Done done) {
    auto call = std::make_shared<Call>();
    const size_t which = (options_.first + n) % requests_.size();
    const std::string& body = requests_[which];
    if (!users_.empty() && !users_[which].empty()) {
      call->context.AddMetadata(options_.user_header, users_[which]);
    }
    grpc::Slice slice(body.data(), body.size());
    call->request = grpc::ByteBuffer(&slice, 1);
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    stubs_[n % stubs_.size()]->UnaryCall(
        &call->context, kMethod, grpc::StubOptions(), &call->request, &call->response,
        [this, call, done](grpc::Status status) {
          done(static_cast<int>(status.error_code()), status.error_message(), now());
        });
  }

  void open_loop() {
    const long total = static_cast<long>(options_.rate * options_.seconds);
    begin(total);
    for (long n = 0; n < total; ++n) {
      const double due = n / options_.rate;
      std::this_thread::sleep_until(start_ + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(due)));
      const double sent = now();
      tally_.lag(sent - due);
      send(n, [this, due, sent](int code, const std::string& details, double end) {
        tally_.add(code, details, end - due, end - sent, due);
        finished();
      });
    }
    wait();
  }

  void closed_loop() {
    begin(options_.clients);
    for (long k = 0; k < options_.clients; ++k) next(k);
    wait();
  }

  std::string json() { return tally_.json(); }

 private:
  void next(long n) {
    if (now() >= options_.seconds) {
      finished();  // this caller is done
      return;
    }
    const double sent = now();
    send(n, [this, n, sent](int code, const std::string& details, double end) {
      tally_.add(code, details, end - sent, end - sent, sent);
      next(n + options_.clients);
    });
  }
  void begin(long outstanding) { outstanding_ = outstanding; }
  void finished() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--outstanding_ == 0) cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return outstanding_ == 0; });
  }

  Options options_;
  std::vector<std::string> requests_;
  std::vector<std::string> users_;  // each request's user id, with --user-header
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  Clock::time_point start_;
  Tally tally_;
  std::mutex mu_;
  std::condition_variable cv_;
  long outstanding_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  Options options = parse(argc, argv);
  Generator generator(options, read_requests(options.requests));
  if (options.rate > 0) generator.open_loop();
  else generator.closed_loop();
  std::cout << generator.json();
  return 0;
}
