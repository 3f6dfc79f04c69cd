# Best-of-N at equal memory (tests/bench/bestofn_equal_memory.py): dense against the default
# model's learned DMS adapter, one budget-mode job per question under the same KV budget, on real
# `dmsrt serve` replicas over loopback gRPC.
#
# bestofn_equal_memory_small (label e2e, so it runs in `ctest -LE bench_full`; about 40 s on 2
# loaded cores): one question, checks the mechanics only: both configurations run, every job
# ends with an answer (or none), the figures are printed, and dms admits at least 2x dense's
# threads because the coordinator plans a fresh dms replica with the adapter's calibrated
# eviction rate. Nothing about accuracy is asserted. bestofn_equal_memory_full (label
# bench_full, about 25 minutes on 2 loaded cores) is the measurement: every question of
# tests/data/bestofn/tasks.jsonl (result in tests/data/bestofn/README.md). Run it with
#   ctest --test-dir build -R bestofn_equal_memory_full -V
# Without the adapter file (adapters/SmolLM2-135M-Instruct.dms.safetensors) the script falls back
# to forced synthetic eviction (rate 0.875, w = 32) and says so. The glob below makes CMake look
# again when adapters/ changes.
if(DMSRT_HAVE_GRPC AND DMSRT_PYTHON AND TARGET dmsrt AND
   EXISTS ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf)
  execute_process(COMMAND ${DMSRT_PYTHON} -c "import grpc, grpc_tools"
                  RESULT_VARIABLE dmsrt_bestofn_grpc_rc OUTPUT_QUIET ERROR_QUIET)
  if(dmsrt_bestofn_grpc_rc EQUAL 0)
    file(GLOB dmsrt_bestofn_adapters CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/adapters/*.safetensors)
    set(dmsrt_bestofn_adapter ${PROJECT_SOURCE_DIR}/adapters/SmolLM2-135M-Instruct.dms.safetensors)
    set(dmsrt_bestofn_args)
    if(EXISTS ${dmsrt_bestofn_adapter})
      set(dmsrt_bestofn_args --adapter ${dmsrt_bestofn_adapter})
    endif()
    add_test(NAME bestofn_equal_memory_small
             COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/bestofn_equal_memory.py
                     ${dmsrt_bestofn_args} --questions 1 --check-admitted-ratio 3
                     --json-out ${PROJECT_BINARY_DIR}/bestofn_equal_memory_small.json)
    set_tests_properties(bestofn_equal_memory_small PROPERTIES
      LABELS e2e TIMEOUT 300 RUN_SERIAL TRUE ENVIRONMENT "DMSRT_BIN=$<TARGET_FILE:dmsrt>")
    add_test(NAME bestofn_equal_memory_full
             COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/bestofn_equal_memory.py
                     ${dmsrt_bestofn_args} --verbose
                     --json-out ${PROJECT_BINARY_DIR}/bestofn_equal_memory_full.json)
    set_tests_properties(bestofn_equal_memory_full PROPERTIES
      LABELS bench_full TIMEOUT 7200 RUN_SERIAL TRUE ENVIRONMENT "DMSRT_BIN=$<TARGET_FILE:dmsrt>")
  else()
    message(STATUS "dmsrt: best-of-N benchmark off (python3 has no grpcio / grpcio-tools)")
  endif()
endif()
