# Long-context decode, dense against window eviction (tests/bench/long_context_decode.py), as a
# smoke run with tiny sizes (label bench; no timing is asserted). Run it by hand with the defaults
# (4096 tokens, batch 1 and 8, window 512) for the figures in docs/perf.md, or as the ctest
# long_context_decode (label bench_full).
if(DMSRT_PYTHON AND TARGET dmsrt AND EXISTS ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf)
  add_test(NAME long_context_decode_smoke
           COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/long_context_decode.py
                   --bin $<TARGET_FILE:dmsrt> --context 256 --batch 1,2 --kv-window 32 --steps 2
                   --rounds 1 --kv-budget 256MiB)
  set_tests_properties(long_context_decode_smoke PROPERTIES LABELS bench TIMEOUT 300)
  add_test(NAME long_context_decode
           COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/long_context_decode.py
                   --bin $<TARGET_FILE:dmsrt>)
  set_tests_properties(long_context_decode PROPERTIES LABELS bench_full TIMEOUT 3600 RUN_SERIAL TRUE)
endif()
