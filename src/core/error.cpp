#include "src/core/error.h"

#include <cstring>

namespace tf::detail {

void throw_error(const char* file, int line, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  throw Error(concat(msg, " (", base ? base + 1 : file, ":", line, ")"));
}

}  // namespace tf::detail
