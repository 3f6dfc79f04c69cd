# Tensor parallelism of the CUDA backend on the emulated device (label mpi): every rank of a real
# mpirun is one emulated GPU (DMSRT_CUDA_EMULATOR_DEVICES gives each node as many GPUs as ranks,
# so each rank must take the device of its local rank) and NCCL runs over MPI
# (tests/cuda_emulator/nccl_api.cc). Registered when the emulator carries NCCL
# (tests/cmake/cuda_emulator.cmake: CUDA headers, NCCL and MPI found).
#
#   nccl_emulated_np{2,3}       NcclComm's collectives, split, stream binding, watchdog

if(NOT DMSRT_EMULATED_NCCL)
  return()
endif()
find_program(DMSRT_TPC_MPIEXEC NAMES mpiexec mpirun HINTS ${MPIEXEC_EXECUTABLE})
if(MPIEXEC_EXECUTABLE)
  set(DMSRT_TPC_MPIEXEC ${MPIEXEC_EXECUTABLE})
endif()
if(NOT DMSRT_TPC_MPIEXEC)
  message(STATUS "dmsrt: mpiexec not found; CUDA tensor-parallel tests not registered")
  return()
endif()
find_package(Python3 COMPONENTS Interpreter)
execute_process(COMMAND ${DMSRT_TPC_MPIEXEC} --version OUTPUT_VARIABLE dmsrt_tpc_version ERROR_QUIET)
set(DMSRT_TPC_FLAGS "")
if(dmsrt_tpc_version MATCHES "Open MPI|OpenRTE")
  set(DMSRT_TPC_FLAGS --allow-run-as-root --oversubscribe)
endif()
set(DMSRT_TPC_ENV OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1)
set(DMSRT_TPC_MODELS ${PROJECT_BINARY_DIR}/tests/tp_cuda_models)
set(DMSRT_TPC_MAKE ${PROJECT_SOURCE_DIR}/tests/fixtures/make_tiny_model.py)

# dmsrt_tpc_gtest(<name> <source>): a gtest binary on the emulated device with its own main.
function(dmsrt_tpc_gtest name src)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE dmsrt_cuda_emulator dmsrt_runtime GTest::gtest)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
endfunction()

# dmsrt_tpc_run(<test> <np> <timeout> <command...>): under mpirun with np emulated devices.
function(dmsrt_tpc_run test np timeout)
  add_test(NAME ${test} COMMAND ${DMSRT_TPC_MPIEXEC} ${DMSRT_TPC_FLAGS} -np ${np} ${ARGN})
  set_tests_properties(${test} PROPERTIES LABELS mpi TIMEOUT ${timeout} PROCESSORS ${np}
                       ENVIRONMENT "${DMSRT_TPC_ENV};DMSRT_CUDA_EMULATOR_DEVICES=${np};DMSRT_TP_CUDA_MODELS=${DMSRT_TPC_MODELS}")
endfunction()

dmsrt_tpc_gtest(nccl_emulated_test ${CMAKE_CURRENT_SOURCE_DIR}/mpi/nccl_emulated_test.cc)
foreach(np 2 3)
  dmsrt_tpc_run(nccl_emulated_np${np} ${np} 90 $<TARGET_FILE:nccl_emulated_test>)
endforeach()

