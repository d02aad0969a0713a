// defines: the out-of-line part of kernels/sim/intrinsics.h: the checks of __constant__ uploads
#include "kernels/sim/intrinsics.h"

#include <string>

#include "src/core/error.h"

namespace tf::sim {

void check_constant_upload(const Region& table, size_t bytes, std::source_location loc) {
  std::string file = loc.file_name();
  file = file.substr(file.find_last_of('/') + 1);
  TF_CHECK(bytes <= table.bytes, "simulator: upload of ", bytes, " bytes into __constant__ table '",
           table.name, "' of ", table.bytes, " bytes at ", file, ":", loc.line());
}

}  // namespace tf::sim
