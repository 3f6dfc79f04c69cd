# Score-threshold eviction against kvpress's DMSPress(KnormPress) on the default model (label
# oracle; skips with the reason where torch, transformers or kvpress is missing).
find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND)
  add_test(NAME oracle_threshold
           COMMAND ${Python3_EXECUTABLE} -m pytest -q -s -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_threshold_oracle.py)
  set_tests_properties(oracle_threshold PROPERTIES LABELS oracle TIMEOUT 900
    ENVIRONMENT "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_ORACLE_REPORT=${PROJECT_BINARY_DIR}/oracle_report.json;HF_HUB_OFFLINE=1")
endif()
