// defines: tf::dist::mpi_world, the MPI communicator's constructor (built only with TIGHTFIT_MPI)
#pragma once

#include <memory>

#include "src/dist/comm.h"

namespace tf::dist {

// Initialises MPI and returns MPI_COMM_WORLD as a communicator; refuses a world whose size is not
// `expected`, the size the launcher announced. MPI_Finalize runs when it is destroyed.
std::unique_ptr<Communicator> mpi_world(int expected);

}  // namespace tf::dist
