# The CPU forward pass against llama.cpp on the default model (label oracle).
find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND)
  add_test(NAME oracle_model
           COMMAND ${Python3_EXECUTABLE} -m pytest -q -s -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_model_oracle.py)
  set_tests_properties(oracle_model PROPERTIES LABELS oracle TIMEOUT 900
    ENVIRONMENT "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_ORACLE_REPORT=${PROJECT_BINARY_DIR}/oracle_report.json")
endif()
