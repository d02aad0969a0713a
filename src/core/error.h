// defines: tf::Error, TF_CHECK, TF_FAIL
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tf {

// Every failure tightfit reports is an Error whose message says what failed and where
// (a file and tensor for user input, a source location for internal checks).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace tf

// TF_CHECK(cond, parts...): throws tf::Error "<parts> (file:line)" when cond is false.
#define TF_CHECK(cond, ...)                                                                        \
  do {                                                                                             \
    if (!(cond)) ::tf::detail::throw_error(__FILE__, __LINE__, ::tf::detail::concat(__VA_ARGS__)); \
  } while (0)
#define TF_FAIL(...) ::tf::detail::throw_error(__FILE__, __LINE__, ::tf::detail::concat(__VA_ARGS__))
