# gRPC end-to-end tests (label e2e): a 2-replica `dmsrt serve` under mpirun on loopback, driven by
# `dmsrt submit` and by the Python client (examples/python/dmsrt_client.py). The driver is pytest
# (tests/e2e/); it starts and stops its own servers on free 127.0.0.1 ports and bounds every wait.
# Registered only when the binary has gRPC and MPI and python3 has pytest.
if(DMSRT_HAVE_GRPC AND DMSRT_HAVE_MPI)
  find_program(DMSRT_MPIRUN NAMES mpirun mpiexec)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(DMSRT_MPIRUN AND Python3_Interpreter_FOUND)
    execute_process(COMMAND ${Python3_EXECUTABLE} -c "import pytest"
                    RESULT_VARIABLE DMSRT_PYTEST_RC OUTPUT_QUIET ERROR_QUIET)
    if(DMSRT_PYTEST_RC EQUAL 0)
      add_test(NAME e2e_service
               COMMAND ${Python3_EXECUTABLE} -m pytest -x -q -p no:cacheprovider
                       ${PROJECT_SOURCE_DIR}/tests/e2e)
      set_tests_properties(e2e_service PROPERTIES
        LABELS e2e TIMEOUT 900 RUN_SERIAL TRUE
        ENVIRONMENT "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_SOURCE_DIR=${PROJECT_SOURCE_DIR};DMSRT_MPIRUN=${DMSRT_MPIRUN}")
    else()
      message(STATUS "dmsrt: e2e tests off (python3 has no pytest)")
    endif()
  else()
    message(STATUS "dmsrt: e2e tests off (no mpirun or python3)")
  endif()
endif()
