# dmsrt against llama.cpp on the default model (tests/bench/bench_vs_llamacpp.py): prefill and
# decode tokens/s of both in alternating rounds, the ratios, the bytes floor and where the figures
# were measured. bench_vs_llamacpp_smoke (label bench, so CI runs it) checks that the comparison
# runs end to end at a tiny size and asserts nothing about speed; bench_vs_llamacpp (label
# bench_full) is the measurement of docs/perf.md: 512-token prefill, 128 decode steps, 3 rounds.
if(DMSRT_PYTHON AND TARGET dmsrt AND EXISTS ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf)
  add_test(NAME bench_vs_llamacpp_smoke
           COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/bench_vs_llamacpp.py
                   --bin $<TARGET_FILE:dmsrt> --prefill 64 --decode 8 --reps 1)
  set_tests_properties(bench_vs_llamacpp_smoke PROPERTIES LABELS bench TIMEOUT 300)
  add_test(NAME bench_vs_llamacpp
           COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/bench_vs_llamacpp.py
                   --bin $<TARGET_FILE:dmsrt> --reps 3)
  set_tests_properties(bench_vs_llamacpp PROPERTIES LABELS bench_full TIMEOUT 1800 RUN_SERIAL TRUE)
endif()
