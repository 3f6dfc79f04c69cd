# Greedy output pinned token for token per KV policy (tests/regression/greedy_pins.py): the
# default model under every CPU policy, tiny DMS models (Variants A and B), and the emulated CUDA
# backend when it is built. Label unit: it runs in CI and takes about a minute.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  set(pin_args --dmsrt $<TARGET_FILE:dmsrt>)
  if(TARGET dmsrt_cuda_emulated)
    list(APPEND pin_args --cuda-emulated $<TARGET_FILE:dmsrt_cuda_emulated>)
  endif()
  add_test(NAME greedy_pins COMMAND ${Python3_EXECUTABLE}
           ${PROJECT_SOURCE_DIR}/tests/regression/greedy_pins.py ${pin_args})
  set_tests_properties(greedy_pins PROPERTIES LABELS unit TIMEOUT 900)
endif()

# The committed learned DMS adapter (adapters/), found without a flag, still evicts at the rate
# recorded when it was made (tests/regression/adapter_rate.py). Label unit: about 20 s.
if(Python3_Interpreter_FOUND)
  add_test(NAME adapter_rate COMMAND ${Python3_EXECUTABLE}
           ${PROJECT_SOURCE_DIR}/tests/regression/adapter_rate.py --dmsrt $<TARGET_FILE:dmsrt>)
  set_tests_properties(adapter_rate PROPERTIES LABELS unit TIMEOUT 300)
endif()

# tools/calibrate_dms.py from a cached (synthetic) set of dense runs to the adapter file: the fit,
# the thresholds, the writer and the runtime's formula on what it wrote
# (tests/regression/calibrate_tool_test.py; needs numpy, torch and safetensors, which
# launch/setup.sh --test-deps installs). Label unit: a few seconds.
if(Python3_Interpreter_FOUND)
  add_test(NAME calibrate_tool COMMAND ${Python3_EXECUTABLE}
           ${PROJECT_SOURCE_DIR}/tests/regression/calibrate_tool_test.py)
  set_tests_properties(calibrate_tool PROPERTIES LABELS unit TIMEOUT 300)
endif()
