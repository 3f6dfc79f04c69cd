# `dmsrt eval` on the command line (tests/eval/eval_cli_test.py, label unit, seconds each):
# errors for a corrupt model, an empty corpus and a context longer than the model's, and a tiny
# run on the default model (skipped when it is not installed). The computation itself is tested
# on a synthetic model by tests/unit/eval_test.cc.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  foreach(case corrupt_model empty_corpus too_long tiny_run threshold_rate passkey_prompts)
    add_test(NAME eval_cli_${case}
             COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/eval/eval_cli_test.py
                     $<TARGET_FILE:dmsrt> ${case})
    set_tests_properties(eval_cli_${case} PROPERTIES LABELS unit TIMEOUT 300 SKIP_RETURN_CODE 77)
  endforeach()
endif()

# Speed of `dmsrt eval` against `dmsrt score` (tests/bench/eval_bench.py, label bench_full: left
# out of CI, run with ctest -L bench_full): one policy
# over 4096 tokens must take at most 2 x score of the same tokens + 20% (a dense and a policy
# pass). Minutes on 2 cores; not a timed unit test.
if(Python3_Interpreter_FOUND)
  add_test(NAME eval_bench
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/eval_bench.py
                   --bin $<TARGET_FILE:dmsrt> --tokens 4096 --check
                   --json ${PROJECT_BINARY_DIR}/eval_bench.json)
  set_tests_properties(eval_bench PROPERTIES LABELS bench_full TIMEOUT 1800 RUN_SERIAL TRUE)
endif()
