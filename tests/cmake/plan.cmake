# `dmsrt plan` on the command line (tests/plan/plan_cli_test.py, label unit, seconds each): a
# datasheet run and its JSON, and clear errors for bad input. The planner itself is tested by
# tests/unit/plan_test.cc.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  foreach(case datasheet bad_profile negative_rate no_slo no_fit trace)
    add_test(NAME plan_cli_${case}
             COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/plan/plan_cli_test.py
                     $<TARGET_FILE:dmsrt> ${case})
    set_tests_properties(plan_cli_${case} PROPERTIES LABELS unit TIMEOUT 120)
  endforeach()
endif()
