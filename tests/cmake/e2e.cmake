# gRPC and HTTP end-to-end tests (label e2e): a 2-replica `dmsrt serve` under mpirun on loopback, driven by
# `dmsrt submit` and by the Python client (examples/python/dmsrt_client.py), plus tensor-parallel
# replicas (tests/e2e/test_tp_serve.py), the OpenAI-compatible HTTP API with the `openai` client
# (tests/e2e/test_openai_http.py) and replicas on the CUDA backend over the device
# emulator (tests/e2e/test_cuda_emulated.py, with the CUDA headers only: one device, and a
# tensor-parallel replica of two emulated devices with NCCL over MPI). The driver is pytest
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
        ENVIRONMENT "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_SOURCE_DIR=${PROJECT_SOURCE_DIR};DMSRT_MPIRUN=${DMSRT_MPIRUN};DMSRT_EMU_BIN=$<$<BOOL:${DMSRT_HAVE_CUDA}>:${PROJECT_BINARY_DIR}/tests/dmsrt_cuda_emulated>")

      # Budget mode, measured (tests/bench/budget_bench.py): a `none` and a `forced` replica with
      # the same KV budget each run one budget-mode job; the test fails unless forced admits and
      # runs at least 4x the threads, every thread runs to full length, nothing is preempted and
      # peak KV stays within the budget. budget_bench_small (label e2e, 35-45 s) is a scaled-down
      # check: 384-token threads, window 16. budget_bench_4k (label bench_full, 10-16 minutes on 2
      # cores; not run by launch/test.sh) is the measurement in docs/perf.md: 4096-token threads,
      # window 512. Run it with: ctest --test-dir build -L bench_full --output-on-failure -V
      set(dmsrt_budget_env "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt")
      add_test(NAME budget_bench_small
               COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/budget_bench.py
                       --tokens 384 --window 16 --budget 52MiB --check-ratio 4
                       --json ${PROJECT_BINARY_DIR}/budget_bench_small.json)
      set_tests_properties(budget_bench_small PROPERTIES
        LABELS e2e TIMEOUT 300 RUN_SERIAL TRUE ENVIRONMENT "${dmsrt_budget_env}")
      add_test(NAME budget_bench_4k
               COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/budget_bench.py
                       --tokens 4096 --window 512 --budget 768MiB --check-ratio 4
                       --json ${PROJECT_BINARY_DIR}/budget_bench_4k.json)
      set_tests_properties(budget_bench_4k PROPERTIES
        LABELS bench_full TIMEOUT 3600 RUN_SERIAL TRUE ENVIRONMENT "${dmsrt_budget_env}")

      # The HTTP front door under load (tests/bench/http_load_bench.py, label bench): 100
      # concurrent streaming chat completions from 20 openai clients, none may be lost, with the
      # gRPC path's time to first token from the same server beside it (docs/perf.md).
      add_test(NAME http_load_bench
               COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/http_load_bench.py
                       --json ${PROJECT_BINARY_DIR}/http_load_bench.json)
      set_tests_properties(http_load_bench PROPERTIES
        LABELS bench TIMEOUT 900 RUN_SERIAL TRUE
        ENVIRONMENT "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_SOURCE_DIR=${PROJECT_SOURCE_DIR};DMSRT_MPIRUN=${DMSRT_MPIRUN}")
    else()
      message(STATUS "dmsrt: e2e tests off (python3 has no pytest)")
    endif()
  else()
    message(STATUS "dmsrt: e2e tests off (no mpirun or python3)")
  endif()
endif()
