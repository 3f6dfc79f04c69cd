# Multi-rank tests (label mpi) and the all-reduce benchmark.
#
# Included by tests/CMakeLists.txt. The same file doubles as a ctest helper when run in script
# mode (cmake -P mpi.cmake): it runs a command that must FAIL and checks that its output matches a
# pattern, for the test in which one rank aborts the job.

if(CMAKE_SCRIPT_MODE_FILE)
  # Script mode: -DDMSRT_CMD="a|b|c" -DDMSRT_EXPECT="regex" [-DDMSRT_TIMEOUT=60]
  string(REPLACE "|" ";" cmd "${DMSRT_CMD}")
  if(NOT DMSRT_TIMEOUT)
    set(DMSRT_TIMEOUT 60)
  endif()
  execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  TIMEOUT ${DMSRT_TIMEOUT})
  message("exit: ${rc}\n--- stdout ---\n${out}\n--- stderr ---\n${err}")
  if("${rc}" STREQUAL "0")
    message(FATAL_ERROR "expected the job to fail (non-zero exit), it exited 0")
  endif()
  if(NOT "${out}${err}" MATCHES "${DMSRT_EXPECT}")
    message(FATAL_ERROR "job output does not match '${DMSRT_EXPECT}'")
  endif()
  message("ok: job failed with exit '${rc}' and the output names the failed rank")
  return()
endif()

# ---- the benchmark (built with or without MPI: LocalComm or a one-GPU NcclComm without it) ----
add_executable(allreduce_bench ${CMAKE_CURRENT_SOURCE_DIR}/bench/allreduce_bench.cc)
target_link_libraries(allreduce_bench PRIVATE dmsrt_parallel)
set_target_properties(allreduce_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)

if(NOT DMSRT_HAVE_MPI)
  return()
endif()

find_program(DMSRT_MPIEXEC NAMES mpiexec mpirun HINTS ${MPIEXEC_EXECUTABLE})
if(MPIEXEC_EXECUTABLE)
  set(DMSRT_MPIEXEC ${MPIEXEC_EXECUTABLE})
endif()
if(NOT DMSRT_MPIEXEC)
  message(STATUS "dmsrt: mpiexec not found; multi-rank tests not registered")
  return()
endif()
execute_process(COMMAND ${DMSRT_MPIEXEC} --version OUTPUT_VARIABLE dmsrt_mpiexec_version
                ERROR_QUIET)
set(DMSRT_MPIEXEC_FLAGS "")
if(dmsrt_mpiexec_version MATCHES "Open MPI|OpenRTE")
  # Containers run as root; CI machines have fewer cores than ranks.
  set(DMSRT_MPIEXEC_FLAGS --allow-run-as-root --oversubscribe)
endif()
set(DMSRT_MPI_ENV OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1)

# dmsrt_mpi_test(<name> <np> <timeout> <command...>)
function(dmsrt_mpi_test name np timeout)
  add_test(NAME ${name}
           COMMAND ${DMSRT_MPIEXEC} ${DMSRT_MPIEXEC_FLAGS} -np ${np} ${ARGN})
  set_tests_properties(${name} PROPERTIES LABELS mpi TIMEOUT ${timeout} PROCESSORS ${np}
                       ENVIRONMENT "${DMSRT_MPI_ENV}")
endfunction()

add_executable(mpi_comm_test ${CMAKE_CURRENT_SOURCE_DIR}/mpi/mpi_comm_test.cc)
target_link_libraries(mpi_comm_test PRIVATE dmsrt_parallel GTest::gtest)
set_target_properties(mpi_comm_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
foreach(np 2 3 4)
  dmsrt_mpi_test(mpi_comm_np${np} ${np} 90 $<TARGET_FILE:mpi_comm_test>)
endforeach()
# Without mpirun the binary must skip every test (and exit 0) instead of hanging.
add_test(NAME mpi_comm_without_mpirun COMMAND mpi_comm_test)
set_tests_properties(mpi_comm_without_mpirun PROPERTIES LABELS mpi TIMEOUT 30
                     PASS_REGULAR_EXPRESSION "SKIPPED")

add_executable(mpi_abort_probe ${CMAKE_CURRENT_SOURCE_DIR}/mpi/mpi_abort_probe.cc)
target_link_libraries(mpi_abort_probe PRIVATE dmsrt_parallel)
set_target_properties(mpi_abort_probe PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
foreach(np 2 3)
  math(EXPR last "${np} - 1")
  string(REPLACE ";" "|" abort_cmd
         "${DMSRT_MPIEXEC};${DMSRT_MPIEXEC_FLAGS};-np;${np};$<TARGET_FILE:mpi_abort_probe>")
  add_test(NAME mpi_abort_np${np}
           COMMAND ${CMAKE_COMMAND} "-DDMSRT_CMD=${abort_cmd}"
                   "-DDMSRT_EXPECT=dmsrt: rank ${last} failed: DATA_LOSS: injected failure"
                   -DDMSRT_TIMEOUT=60 -P ${CMAKE_CURRENT_LIST_FILE})
  set_tests_properties(mpi_abort_np${np} PROPERTIES LABELS mpi TIMEOUT 90 PROCESSORS ${np}
                       ENVIRONMENT "${DMSRT_MPI_ENV}")
endforeach()

# Benchmark smoke run: tiny sizes, checks #wrong == 0 (exit status).
dmsrt_mpi_test(allreduce_bench_smoke 2 60 $<TARGET_FILE:allreduce_bench>
               -b 8 -e 64K -f 8 -n 5 -w 1 -r 3)
