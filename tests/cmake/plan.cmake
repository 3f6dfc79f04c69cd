# `dmsrt plan` on the command line (tests/plan/plan_cli_test.py, label unit, seconds each): a
# datasheet run and its JSON, clear errors for bad input, a step log checked against a profile,
# a simulated run's own step log.
# The planner itself is tested by tests/unit/plan_test.cc.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  foreach(case datasheet bad_profile negative_rate no_slo no_fit trace check_steps step_log)
    add_test(NAME plan_cli_${case}
             COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/plan/plan_cli_test.py
                     $<TARGET_FILE:dmsrt> ${case})
    set_tests_properties(plan_cli_${case} PROPERTIES LABELS unit TIMEOUT 120)
  endforeach()
endif()

# The planner against real runs (tests/bench/plan_validation.py): scenarios of N, eviction rate,
# lengths and arrival rate, each predicted by `dmsrt plan --trace` on a CPU profile measured at
# the start and replayed on a real `dmsrt serve` with loadgen (the same job trace).
# plan_validation_smoke (label bench, about 20-40 s): one tiny scenario, one run; checks the
# mechanics (both sides run, every figure is there, no job fails), not the accuracy.
# plan_validation_full (label bench_full, about 90 minutes on 2 cores): seven scenarios, 3 runs
# each, the table of predicted against measured jobs/h and p50/p90/p99 with the verdicts
# (throughput within 10 %, p90 within 20 %), by the method of docs/planning.md: a profile
# before each scenario and each run, and the serving overhead from calibration jobs' steps.
# Run it with
#   ctest --test-dir build -R plan_validation_full -V
if(DMSRT_HAVE_GRPC AND Python3_Interpreter_FOUND AND TARGET dmsrt AND
   EXISTS ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf)
  add_test(NAME plan_validation_smoke
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/plan_validation.py
                   --binary $<TARGET_FILE:dmsrt> --smoke
                   --workdir ${PROJECT_BINARY_DIR}/plan_validation_smoke
                   --json ${PROJECT_BINARY_DIR}/plan_validation_smoke.json)
  set_tests_properties(plan_validation_smoke PROPERTIES LABELS bench TIMEOUT 300 RUN_SERIAL TRUE)
  add_test(NAME plan_validation_full
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/plan_validation.py
                   --binary $<TARGET_FILE:dmsrt> --runs 3
                   --profile-each-run --serve-overhead --step-log
                   --workdir ${PROJECT_BINARY_DIR}/plan_validation_full
                   --json ${PROJECT_BINARY_DIR}/plan_validation_full.json)
  set_tests_properties(plan_validation_full PROPERTIES LABELS bench_full TIMEOUT 7200 RUN_SERIAL TRUE)
endif()
